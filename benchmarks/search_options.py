"""Config search with the quality options on real SmolLM2, scored on the evaluation corpus.

For each ``CODE:STORED`` budget pair, ``xquant_fx.search`` (default: it chooses per-layer bits,
sharing, eta, sink tokens, rotation, level fit and metadata dtype) runs on its calibration text
(standard-library docstrings disjoint from the evaluation corpus, checked), and the config it
returns is scored as ``benchmarks/quality_ablation.py`` scores specs: by
:class:`xquant_fx.config_search.DecodeSimulator` over the same 4096 tokens of the eval corpus (8 x 640,
prefill 128; equal to the token-by-token decode of ``python -m xquant_fx eval``, tested in
``tests/config_search/test_search.py``). A per-layer config has no spec string, hence this script.

    python benchmarks/search_options.py --budget 1.4:2.1 --budget 2.0:2.6 \
        --out benchmarks/results/quality/search_options

Writes ``<out>.md`` and ``<out>.csv`` (date, versions, command, per-layer plans, the search reports).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import sys
import time
from pathlib import Path

import torch
import transformers

from xquant_fx import XQuantCache, evaluate, smollm2
from xquant_fx.config_search import DecodeSimulator, calibration_text, check_disjoint, search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_ablation import add_scoring_arguments, write_csv  # noqa: E402

FIELDS = ("budget", "options", "config", "sink_tokens", "rotation", "level_fit", "metadata_dtype", "eta", "code_bits",
          "stored_bits", "ppl", "ppl_ratio", "delta_ppl_pct", "kl", "calib_kl", "search_s", "eval_s", "k_bits",
          "v_bits", "k_share_from", "v_share_from")


def _pair(text: str) -> tuple[float, float | None]:
    code, _, stored = text.partition(":")
    return float(code), (float(stored) if stored else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=_pair, action="append", required=True, metavar="CODE[:STORED]",
                        help="code-bit budget and optional stored-bit budget (bf16, 8k tokens), e.g. 1.4:2.1")
    parser.add_argument("--options", default="search", choices=("search", "off"), help="search(..., options=)")
    parser.add_argument("--search-tokens", type=int, default=384, help="calibration window of the search (tokens)")
    parser.add_argument("--search-segments", type=int, default=1, help="calibration windows of the search")
    parser.add_argument("--search-copy-windows", type=int, default=1,
                        help="calibration windows repeating their first half (search(copy_windows=))")
    parser.add_argument("--value-group-size", type=int, default=None,
                        help="channels per value group of the searched configs (search(value_group_size=))")
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("xquant_fx.config_search").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = smollm2.load(torch.float32)
    corpus = evaluate.default_corpus()
    check_disjoint(calibration_text(), corpus)
    ids = tokenizer(corpus, return_tensors="pt").input_ids[0]
    need = args.segments * args.segment_len
    if ids.numel() < need:
        raise ValueError(f"the corpus has {ids.numel()} tokens; {need} are needed")
    ids = ids[:need].view(args.segments, args.segment_len)
    rows, reports = [], []
    sim = None
    for code, stored in args.budget:
        start = time.time()
        found = search(model, code, tokenizer, stored_budget_bits=stored, options=args.options,
                       tokens=args.search_tokens, segments=args.search_segments,
                       copy_windows=args.search_copy_windows, value_group_size=args.value_group_size,
                       progress=False)
        search_s = time.time() - start
        print(found.summary(), flush=True)
        reports.append(found.summary())
        cfg = found.config
        start = time.time()
        if sim is None:  # group size and window are the search's defaults for every budget
            sim = DecodeSimulator(model, ids, prefill=args.prefill, group_size=cfg.group_size,
                                  residual_length=cfg.residual_length)
        score = sim.score(cfg)
        eval_s = time.time() - start
        report = XQuantCache(model.config, cfg, max_cache_len=8192).memory_report(torch.bfloat16)
        ref = math.exp(sim.reference.nll)
        ppl = math.exp(score.nll)
        rows.append(dict(
            budget=f"{code:g}" + (f" / {stored:g}" if stored is not None else ""), options=args.options,
            config=cfg.name, sink_tokens=cfg.sink_tokens, rotation=cfg.rotation, level_fit=cfg.level_fit,
            metadata_dtype=cfg.metadata_dtype, eta="/".join(f"{b}:{e:.4g}" for b, e in sorted(cfg.eta.items())) or "none",
            code_bits=round(report["code_bits"], 4), stored_bits=round(report["stored_bits"], 3), ppl=round(ppl, 3),
            ppl_ratio=round(ppl / ref, 4), delta_ppl_pct=round(100 * (ppl / ref - 1), 2), kl=round(score.kl, 4),
            calib_kl=round(found.score.kl, 4), search_s=round(search_s, 1), eval_s=round(eval_s, 1),
            k_bits="/".join(f"{p.k_bits}{'s' if p.k_shares else ''}" for p in cfg.resolve(found.num_layers)),
            v_bits="/".join(f"{p.v_bits}{'s' if p.v_shares else ''}" for p in cfg.resolve(found.num_layers)),
            k_share_from=cfg.k_share_from, v_share_from=cfg.v_share_from,
        ))
        print(rows[-1], f"(full precision ppl {ref:.3f})", flush=True)
    write(rows, reports, args, ids.numel() - args.segments * args.prefill, math.exp(sim.reference.nll))
    return 0


def write(rows: list[dict], reports: list[str], args, scored: int, ref_ppl: float) -> None:
    from tabulate import tabulate

    command = "python benchmarks/search_options.py " + " ".join(sys.argv[1:])
    meta = (f"SmolLM2-135M-Instruct, {scored} scored tokens ({args.segments} x {args.segment_len}, prefill "
            f"{args.prefill}, corpus=default), {datetime.date.today()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, fp32 CPU, decode simulator; full precision ppl {ref_ppl:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cols = ("budget", "sink_tokens", "rotation", "level_fit", "metadata_dtype", "eta", "code_bits", "stored_bits",
            "ppl", "ppl_ratio", "delta_ppl_pct", "kl", "calib_kl", "search_s", "eval_s")
    table = tabulate([[r[c] for c in cols] for r in rows], tablefmt="github",
                     headers=("budget code / stored", "sinks", "rotation", "level fit", "metadata", "eta", "code bits",
                              "stored bits (bf16, 8k)", "ppl", "ppl / fp", "Δppl %", "KL nats/token",
                              "KL on calibration", "search s", "eval s"))
    body = "\n\n".join(f"```\n{r}\n```" for r in reports)
    args.out.with_suffix(".md").write_text(
        f"# Searched configs with quality options, {meta}\n\nCommand: `{command}`\n\n{table}\n\n"
        f"## Search reports (calibration text)\n\n{body}\n")
    write_csv(args.out.with_suffix(".csv"), meta, command, FIELDS, rows)


if __name__ == "__main__":
    raise SystemExit(main())
