"""``eval``: perplexity, agreement and retrieval of presets (and searched configs) on a real model
(:mod:`xquant_fx.evaluate` does the measuring)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import METADATA_DTYPES, XQuantConfig
from ..evaluate import RETRIEVAL_DEPTHS, RETRIEVAL_LENGTHS
from .memory import spec_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="a local HF model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--presets", nargs="+", default=list(XQuantConfig.PRESETS), type=spec_arg, metavar="SPEC",
                        help="presets to evaluate, each optionally modified: PRESET:field=value[,field=value...] "
                             "(e.g. kivi-2:metadata_dtype=float8_e4m3fn, xquant-1.38:group_size=64); a row is "
                             "named by its spec")
    parser.add_argument("--text", type=Path, default=None, help="corpus file (default: CPython LICENSE + docstrings)")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=640)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--depths", nargs="*", type=float, default=list(RETRIEVAL_DEPTHS), metavar="D",
                        help="pass-key retrieval: where the key sits, as fractions of the filler text (0: first, "
                             "1: last, before the question); each depth runs at each --retrieval-lengths "
                             "(default: %(default)s); no values: no retrieval")
    parser.add_argument("--retrieval-lengths", nargs="*", type=int, default=list(RETRIEVAL_LENGTHS), metavar="TOKENS",
                        help="pass-key prompt lengths in tokens, up to the model's max_position_embeddings "
                             "(default: %(default)s). A config's retrieval prefills len(--depths) x their sum "
                             "tokens: the default 24 cases take about a minute per config with SmolLM2-135M on "
                             "2 CPU cores. No values: no retrieval")
    parser.add_argument("--retrieval-seed", type=int, default=0, metavar="N",
                        help="seed of the pass keys (the same cases for every config of a run)")
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
    parser.add_argument("--search-copy-windows", type=int, default=1, metavar="N",
                        help="calibration windows that repeat their first half (long-range copying, as retrieval "
                             "needs); 0 for plain text only")
    parser.add_argument("--search-stored", type=float, default=None, metavar="BITS",
                        help="also bound the searched configs' stored bits (bf16, 8k tokens)")
    parser.add_argument("--search-value-group-size", type=int, default=None, metavar="CHANNELS",
                        help="channels per value group of the searched configs (default: the group size)")
    parser.add_argument("--search-metadata-dtype", default="search", choices=("search", "model", *METADATA_DTYPES),
                        help="how searched configs store scales and zero points: 'search' (default) tries float8 "
                             "when --search-stored bounds the stored bits, else keeps the model dtype; 'model' or "
                             "a dtype fixes it")


def _metadata_choice(value: str):
    """``--search-metadata-dtype`` as :func:`xquant_fx.search` takes it (``"model"``: None)."""
    return None if value == "model" else value


def _budget_list(text: str) -> list[float]:
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--search {text!r}: comma-separated code-bit budgets, e.g. 1.5,1.4,1.25")
    if not budgets or any(not b > 0 for b in budgets):
        raise argparse.ArgumentTypeError(f"--search {text!r}: budgets must be positive numbers of code bits")
    return budgets


def _read_text(path: Path, option: str) -> str:
    """The text of a file named by ``option``, or ``ValueError`` saying why it cannot be read."""
    if not path.exists():
        raise ValueError(f"{option} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{option} {path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot be read ({err.strerror})") from None
    if not text.strip():
        raise ValueError(f"{option} {path}: the file is empty")
    return text


def _check_writable_dir(path: Path, option: str) -> None:
    """``path`` is, or can become, a directory this process writes to: checked before a run whose
    results would otherwise be lost at the end."""
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{option} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path}: the directory is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot be created ({parent} is not a writable directory)")


def check_arguments(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Every ``eval`` argument checked before the model loads; returns the texts of ``--text`` and
    ``--search-text`` (``None``: the defaults). Raises ``ValueError`` naming the option."""
    if args.model is not None:
        if not args.model.exists():
            raise ValueError(f"--model {args.model}: no such directory (a local Hugging Face model directory "
                             "with config.json, weights and tokenizer)")
        if not args.model.is_dir() or not (args.model / "config.json").is_file():
            raise ValueError(f"--model {args.model}: not a Hugging Face model directory (no config.json in it)")
    else:
        from .. import smollm2

        try:
            smollm2.gguf_path()
        except RuntimeError as err:
            raise ValueError(str(err)) from None
    for name, value, low in (("--segments", args.segments, 1), ("--segment-len", args.segment_len, 2),
                             ("--prefill", args.prefill, 1), ("--search-tokens", args.search_tokens, 2),
                             ("--search-copy-windows", args.search_copy_windows, 0),
                             *(("--retrieval-lengths", n, 64) for n in args.retrieval_lengths)):
        if value < low:
            raise ValueError(f"{name} {value}: must be at least {low}")
    # Decode-condition scoring prefills at most the full-precision window of every config (fp16,
    # the reference, included), and scores at least one token per segment.
    configs = [XQuantConfig.from_spec(spec) for spec in ["fp16", *args.presets]]
    moe = [xq.name for xq in configs if xq.prunes_experts]
    if moe:
        raise ValueError(f"--presets {' '.join(moe)}: MoE options (moe_*) are not measured by eval, which keeps the "
                         "model's own routing; measure expert pruning through optimize() (README, MoE quality)")
    window = min(xq.residual_length for xq in configs)
    if args.prefill > min(window, args.segment_len - 1):
        raise ValueError(f"--prefill {args.prefill}: must be at most the smallest residual_length of the configs "
                         f"({window}) and below --segment-len {args.segment_len}")
    bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"--depths {' '.join(f'{d:g}' for d in bad)}: depths are fractions of the filler in [0, 1]")
    if args.search_stored is not None and not args.search_stored > 0:
        raise ValueError(f"--search-stored {args.search_stored:g}: a positive number of stored bits")
    if args.search_text is not None and not args.search:
        raise ValueError("--search-text is used by --search only; give --search BUDGET[,BUDGET...] too")
    _check_writable_dir(args.out, "--out")
    text = _read_text(args.text, "--text") if args.text is not None else None
    search_text = _read_text(args.search_text, "--search-text") if args.search_text is not None else None
    return text, search_text


def run(args: argparse.Namespace) -> int:
    import datetime

    text, search_text = check_arguments(args)  # before the model loads

    import torch
    import transformers

    from .. import evaluate, smollm2

    name = "SmolLM2-135M-Instruct" if args.model is None else str(args.model)
    run = evaluate.RunInfo(
        model=name,
        scored_tokens=args.segments * (args.segment_len - args.prefill),
        settings=evaluate.run_settings(args.segments, args.segment_len, args.prefill, args.depths,
                                       args.retrieval_lengths, text, args.retrieval_seed),
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
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                                      local_files_only=True).eval()
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            # transformers' messages run to several lines; the first names what is missing.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"--model {args.model}: cannot load a causal LM and its tokenizer: {first}") from None
    configs: list = list(args.presets)
    found = []
    if args.search:
        from .. import config_search as search

        calibration = search_text if search_text is not None else search.calibration_text()
        search.check_disjoint(calibration, text or evaluate.default_corpus())
        found = search.search(model, args.search, tokenizer, text=search_text,
                              tokens=args.search_tokens, copy_windows=args.search_copy_windows,
                              stored_budget_bits=args.search_stored,
                              value_group_size=args.search_value_group_size,
                              metadata_dtype=_metadata_choice(args.search_metadata_dtype),
                              progress=True)
        print(search.format_results(found), end="\n\n")
        configs += [result.config for result in found]
    rows = evaluate.stamp(evaluate.evaluate(model, tokenizer, configs, text, args.segments, args.segment_len,
                                            args.prefill, args.depths, args.retrieval_lengths,
                                            retrieval_seed=args.retrieval_seed), run)
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
