"""Ablation of the cache's quality options on real SmolLM2: perplexity under decode conditions.

Each config (a spec, :meth:`XQuantConfig.from_spec`) is scored by
:class:`xquant_fx.config_search.DecodeSimulator`: one parallel forward that reproduces the
token-by-token decode of ``python -m xquant_fx eval`` (same corpus, windows, prefill; the
equality with the real cache, quality options included, is tested in
``tests/config_search/test_search.py::test_simulator_equals_decode``), so a table of a dozen configs takes
minutes on a CPU instead of hours. Retrieval is not measured here.

    python benchmarks/quality_ablation.py --out benchmarks/results/quality/ablation SPEC [SPEC ...]
    python benchmarks/quality_ablation.py --segments 4 --segment-len 2048 --out .../ablation_2048 SPEC ...

Writes ``<out>.md`` and ``<out>.csv`` (date, versions, settings and the command in both).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
import time
from pathlib import Path

import torch
import transformers

from xquant_fx import XQuantCache, evaluate, smollm2
from xquant_fx.config import XQuantConfig
from xquant_fx.config_search import DecodeSimulator

FIELDS = ("config", "code_bits", "stored_bits", "ppl", "ppl_ratio", "delta_ppl_pct", "kl", "seconds")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation windows, threads and output path, as this script and ``search_options.py`` take them."""
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=640)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="config specs, e.g. kivi-2:rotation=hadamard")
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [XQuantConfig.from_spec(s) for s in args.specs]
    model, tokenizer = smollm2.load(torch.float32)
    ids = tokenizer(evaluate.default_corpus(), return_tensors="pt").input_ids[0]
    need = args.segments * args.segment_len
    if ids.numel() < need:
        raise ValueError(f"the corpus has {ids.numel()} tokens; {need} are needed")
    ids = ids[:need].view(args.segments, args.segment_len)
    simulators: dict[tuple, DecodeSimulator] = {}
    rows = []
    for xq in configs:
        key = (xq.group_size, xq.residual_length, xq.metadata_dtype)
        if key not in simulators:
            simulators[key] = DecodeSimulator(model, ids, prefill=args.prefill, group_size=key[0],
                                              residual_length=key[1], metadata_dtype=key[2])
        sim = simulators[key]
        start = time.time()
        score = sim.score(xq)
        # Sizes as the eval table gives them: a bf16 cache of 8k tokens.
        report = XQuantCache(model.config, xq, max_cache_len=8192).memory_report(torch.bfloat16)
        ref = math.exp(sim.reference.nll)
        ppl = math.exp(score.nll)
        rows.append(dict(config=xq.name, code_bits=round(report["code_bits"], 4),
                         stored_bits=round(report["stored_bits"], 3), ppl=round(ppl, 3),
                         ppl_ratio=round(ppl / ref, 4), delta_ppl_pct=round(100 * (ppl / ref - 1), 2),
                         kl=round(score.kl, 4), seconds=round(time.time() - start, 1)))
        print(rows[-1], flush=True)
    write(rows, args, ids.numel() - args.segments * args.prefill)
    return 0


def write(rows: list[dict], args, scored: int) -> None:
    from tabulate import tabulate

    command = "python benchmarks/quality_ablation.py " + " ".join(sys.argv[1:])
    meta = (f"SmolLM2-135M-Instruct, {scored} scored tokens ({args.segments} x {args.segment_len}, "
            f"prefill {args.prefill}, corpus=default), {datetime.date.today()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, fp32 CPU, decode simulator")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = tabulate([[r[f] for f in FIELDS] for r in rows],
                     headers=("config", "code bits", "stored bits (bf16, 8k)", "ppl", "ppl / fp", "Δppl %",
                              "KL nats/token", "s"), tablefmt="github")
    args.out.with_suffix(".md").write_text(f"# Ablation, {meta}\n\nCommand: `{command}`\n\n{table}\n")
    write_csv(args.out.with_suffix(".csv"), meta, command, FIELDS, rows)


def write_csv(path: Path, meta: str, command: str, fields, rows: list[dict]) -> None:
    """``rows`` as CSV under two comment lines: the run's settings and the command that made it."""
    with open(path, "w", newline="") as f:
        f.write(f"# {meta}\n# command: {command}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
