"""Command line: ``python -m xquant_fx demo | eval | memory``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import demo, memory
from .config import XQuantConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xquant_fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="real SmolLM2: answers, speed and memory, full vs quantized cache"))
    memory.add_arguments(sub.add_parser("memory", help="how many tokens / what batch fits on a GPU, for any HF config"))
    add_eval_arguments(sub.add_parser("eval", help="perplexity, agreement and retrieval of presets on a real model"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runner = {"demo": demo.run, "memory": memory.run, "eval": run_eval}[args.command]
    try:
        return runner(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a local HF model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--presets", nargs="+", default=list(XQuantConfig.PRESETS))
    parser.add_argument("--text", type=Path, default=None, help="corpus file (default: CPython LICENSE + docstrings)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=640)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--depths", nargs="*", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--filler", type=int, default=100, help="filler sentences of the pass-key prompt")
    parser.add_argument("--out", type=Path, default=Path("eval-results"))


def run_eval(args: argparse.Namespace) -> int:
    import datetime

    import torch
    import transformers

    from . import evaluate, smollm2

    if args.model is None:
        model, tokenizer = smollm2.load(torch.float32)
        name = "SmolLM2-135M-Instruct"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        name = str(args.model)
    text = args.text.read_text() if args.text else None
    rows = evaluate.evaluate(model, tokenizer, args.presets, text, args.segments, args.segment_len, args.prefill,
                             args.depths, args.filler)
    meta = (f"{name}, {rows[0].scored_tokens} scored tokens, {datetime.date.today()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, fp32 CPU")
    paths = evaluate.save(rows, args.out, meta)
    print(evaluate.format_table(rows))
    print("saved: " + ", ".join(str(p) for p in paths))
    return 0
