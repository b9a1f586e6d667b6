"""End-to-end decode benchmark: transformers' compiled bf16 StaticCache vs ``xquant.optimize``.

A script, not a test. For each model shape (random weights: speed only, never quality), batch and
context: prefill a random prompt of ``context`` tokens, then time ``--new`` decode steps of
``generate`` (greedy), after a warm-up call that pays the compilation (reported as compile time).
Both paths compile the decode step through generate's ``CompileConfig``: transformers' default
(Inductor, ``reduce-overhead``) over a bf16 ``StaticCache``, and ``xquant.optimize`` (the
``xquant`` backend, ``reduce-overhead``) over an ``XQuantCache``. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed call.

    python benchmarks/bench_e2e.py --out benchmarks/results [--models smollm2-135m] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

import xquant_fx  # noqa: E402
from xquant_fx.api import cache_argument  # noqa: E402
from xquant_fx.memory import load_config, with_layers  # noqa: E402


def build(name: str, device, dtype, layers: int | None):
    config = with_layers(load_config(name), layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def timed_generate(model, ids, new: int, **kwargs):
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    sync()
    return out, time.perf_counter() - start


def run_one(name, layers, batch, context, new, device, dtype, method, preset):
    model = build(name, device, dtype, layers)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
    length = context + new
    if method == "bf16-static":
        def cache():
            return {cache_argument(model): StaticCache(config=model.config, max_cache_len=length)}
        if device.type == "cpu":
            model.generation_config.compile_config = transformers.CompileConfig(mode="default")
            model.generation_config.compile_config._compile_all_devices = True
    else:
        xquant_fx.optimize(model, preset, compile=True, mode=None if device.type == "cuda" else "default")
        def cache():
            return {}
    start = time.perf_counter()
    timed_generate(model, ids, new, **cache())  # warm-up: compiles the decode step
    warm = time.perf_counter() - start
    _, prefill_only = timed_generate(model, ids, 1, **cache())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, total = timed_generate(model, ids, new, **cache())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    decode = max(total - prefill_only, 1e-9)
    row = dict(model=name, layers=model.config.num_hidden_layers, method=method if method == "bf16-static" else preset,
               batch=batch, context=context, new=new, compile_s=round(warm - total, 1),
               ms_per_step=round(1e3 * decode / (new - 1), 2), tokens_per_s=round(batch * (new - 1) / decode, 1),
               peak_gib=round(peak, 2))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--layers", type=int, default=None, help="override the layer count (smaller runs)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--contexts", nargs="+", type=int, default=[4096])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--preset", default="xquant-1.38")
    p.add_argument("--methods", nargs="+", default=["bf16-static", "xquant"], choices=["bf16-static", "xquant"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in args.models:
        for batch in args.batches:
            for context in args.contexts:
                outs = {}
                for method in args.methods:
                    row, out = run_one(name, args.layers, batch, context, args.new, device, dtype, method, args.preset)
                    rows.append(row)
                    outs[method] = out
                    print(row, flush=True)
                    write(rows, device, args.out)  # after every row: a cut-short run keeps what it measured
    return 0


def write(rows, device, out: Path) -> None:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = (f"{gpu}, {datetime.date.today()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"random weights, bf16 on GPU")
    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out / "e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# End-to-end decode, {meta}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
