"""Command line: ``python -m xquant_fx demo | eval | memory``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import demo, memory
from .config import METADATA_DTYPES, XQuantConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xquant_fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="real SmolLM2: answers, speed and memory, full vs quantized cache"))
    memory.add_arguments(sub.add_parser("memory", help="how many tokens / what batch fits on a GPU, for any HF config"))
    add_eval_arguments(sub.add_parser("eval", help="perplexity, agreement and retrieval of presets (and searched configs) on a real model"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    runner = {"demo": demo.run, "memory": memory.run, "eval": run_eval}[args.command]
    try:
        return runner(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a local HF model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--presets", nargs="+", default=list(XQuantConfig.PRESETS), type=memory.spec_arg, metavar="SPEC",
                        help="presets to evaluate, each optionally modified: PRESET:field=value[,field=value...] "
                             "(e.g. kivi-2:metadata_dtype=float8_e4m3fn, xquant-1.38:group_size=64); a row is "
                             "named by its spec")
    parser.add_argument("--text", type=Path, default=None, help="corpus file (default: CPython LICENSE + docstrings)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=640)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--depths", nargs="*", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--filler", type=int, default=100, help="filler sentences of the pass-key prompt")
    parser.add_argument("--out", type=Path, default=Path("eval-results"))
    parser.add_argument("--append", action="store_true",
                        help="merge the new rows into --out's eval.csv (a row of the same name is replaced in place, "
                             "others kept) and rewrite eval.md / eval.csv / eval.png from all of them; refused when "
                             "the table comes from a run with other settings, model or versions")
    parser.add_argument("--search", type=_budget_list, default=None, metavar="BUDGET[,BUDGET...]",
                        help="also search a config for each code-bit budget (e.g. 1.5,1.4,1.25) and evaluate it "
                             "as search-<budget>")
    parser.add_argument("--search-text", type=Path, default=None,
                        help="calibration text of the search (default: docstrings of standard-library modules "
                             "that the evaluation corpus does not use); must not overlap the evaluation text")
    parser.add_argument("--search-tokens", type=int, default=384, help="calibration tokens of the search")
    parser.add_argument("--search-stored", type=float, default=None, metavar="BITS",
                        help="also bound the searched configs' stored bits (bf16, 8k tokens)")
    parser.add_argument("--search-metadata-dtype", default=None, choices=METADATA_DTYPES,
                        help="searched configs store scales and zero points so (default: the model dtype)")


def _budget_list(text: str) -> list[float]:
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--search {text!r}: comma-separated code-bit budgets, e.g. 1.5,1.4,1.25")
    if not budgets or any(not b > 0 for b in budgets):
        raise argparse.ArgumentTypeError(f"--search {text!r}: budgets must be positive numbers of code bits")
    return budgets


def run_eval(args: argparse.Namespace) -> int:
    import datetime

    import torch
    import transformers

    from . import evaluate, smollm2

    name = "SmolLM2-135M-Instruct" if args.model is None else str(args.model)
    text = args.text.read_text() if args.text else None
    run = evaluate.RunInfo(
        model=name,
        scored_tokens=args.segments * (args.segment_len - args.prefill),
        settings=evaluate.run_settings(args.segments, args.segment_len, args.prefill, args.depths, args.filler, text),
        environment=f"torch {torch.__version__}, transformers {transformers.__version__}, fp32 CPU",
        date=str(datetime.date.today()),
    )
    old_rows = []
    if args.append and (args.out / "eval.csv").exists():
        old_rows = evaluate.load_rows(args.out)
        # Refuse before spending the run: this run's rows must be able to join the table.
        planned = evaluate.EvalRow("(this run)", 0.0, 0.0, 0.0, 0.0, 0.0, "", run.scored_tokens)
        try:
            evaluate.check_same_run(old_rows + evaluate.stamp([planned], run))
        except ValueError as err:
            raise ValueError(f"--append to {args.out / 'eval.csv'}: {err}") from None
    if args.model is None:
        model, tokenizer = smollm2.load(torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    configs: list = list(args.presets)
    found = []
    if args.search:
        from . import config_search as search

        calibration = args.search_text.read_text() if args.search_text else search.calibration_text()
        search.check_disjoint(calibration, text or evaluate.default_corpus())
        found = search.search(model, args.search, tokenizer, text=calibration if args.search_text else None,
                              tokens=args.search_tokens, stored_budget_bits=args.search_stored,
                              metadata_dtype=args.search_metadata_dtype, progress=True)
        print(search.format_results(found), end="\n\n")
        configs += [result.config for result in found]
    rows = evaluate.stamp(evaluate.evaluate(model, tokenizer, configs, text, args.segments, args.segment_len,
                                            args.prefill, args.depths, args.filler), run)
    meta = evaluate.meta_line(rows)
    try:
        table = evaluate.merge_rows(old_rows, rows)
    except ValueError as err:  # keep what the run measured
        kept = evaluate.save(rows, args.out / "unmerged", meta)
        raise ValueError(
            f"--append to {args.out / 'eval.csv'}: {err}; this run's rows are in {kept[0].parent}"
        ) from None
    paths = evaluate.save(table, args.out, evaluate.meta_line(table))
    if found:
        source = args.search_text or "docstrings of Python's " + ", ".join(search.CALIBRATION_MODULES)
        report = (f"# Searched configs, {meta}\n\nCalibration text (disjoint from the evaluation corpus): {source}."
                  "\nCommand: python -m xquant_fx " + " ".join(getattr(args, "argv", [])) + "\n\n```\n"
                  + search.format_results(found) + "\n```\n")
        previous = args.out / "search.md"
        if old_rows and previous.exists():  # --append: the earlier searches' reports stay
            report = previous.read_text().rstrip("\n") + "\n\n" + report.replace("# Searched configs", "## Searched configs", 1)
        previous.write_text(report)
        paths.append(args.out / "search.md")
    print(evaluate.format_table(rows))
    if old_rows:
        print(f"merged into {args.out / 'eval.csv'}: {len(table)} rows")
    print("saved: " + ", ".join(str(p) for p in paths))
    return 0
