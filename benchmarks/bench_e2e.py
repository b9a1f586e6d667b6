"""End-to-end decode benchmark: ``xquant.optimize`` against two bf16 paths, same process.

A script, not a test. For each model shape (random weights: speed only, never quality), batch and
context: prefill a random prompt of ``context`` tokens, then time ``--new`` decode steps of
``generate`` (greedy), after a warm-up call that pays the compilation. Every path compiles the
decode step through generate (``reduce-overhead``, CUDA graphs):

* ``bf16-static``: transformers' default, a bf16 ``StaticCache`` with its sdpa attention (a mask
  over the whole cache and ``repeat_kv`` copies of the GQA heads);
* ``bf16-strong``: the same cache with :mod:`bf16_baseline`'s attention (no GQA copies; the
  strongest exact bf16 path we run), the baseline every speed-up is measured against;
* ``xquant``: ``xquant.optimize(model, preset, max_cache_len=context + new, max_batch_size=batch)``.

Columns: ``compile_s`` (warm-up call minus a timed call of the same size), ``graphs`` (Dynamo
graphs compiled during the warm-up), ``ms_per_step`` and ``tokens_per_s`` of the decode steps,
``floor_ms`` (bytes a step must read, the weights plus the stored cache of ``context`` tokens,
over the copy bandwidth measured at the start of the run) and ``x_floor``, ``peak_gib``
(``torch.cuda.max_memory_allocated`` over the timed call), ``x_strong`` (tokens/s over
``bf16-strong``'s in the same row group).

With ``XQUANT_BENCH_COMPILE_TIMES=1`` each warm-up prints Dynamo's compile phases.
``--serve N`` then runs ``N`` more ``generate`` calls on the optimized model with random batch
sizes (1..batch) and prompt lengths (1..context) and reports the graphs they compiled (the
decode step should need at most two for any mix, ``xquant_fx.api``).

    python benchmarks/bench_e2e.py --models llama-3.1-8b --batches 16 64 --contexts 4096 --new 64 [--serve 20]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

import torch._dynamo.utils as dynamo_utils  # noqa: E402

import xquant_fx  # noqa: E402
from bf16_baseline import use_strong_bf16_attention  # noqa: E402
from xquant_fx.api import cache_argument  # noqa: E402
from xquant_fx.memory import load_config, with_layers  # noqa: E402

METHODS = ("bf16-static", "bf16-strong", "xquant")


def graphs() -> int:
    return dynamo_utils.counters["stats"]["unique_graphs"]


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / sorted(times[2:])[len(times[2:]) // 2]


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


def cache_bytes(model, method, preset, batch, context) -> int:
    """Bytes of K/V cache a decode step must read at ``context`` tokens."""
    from xquant_fx import XQuantCache

    if method == "xquant":
        report = XQuantCache(model.config, preset, max_batch_size=batch, max_cache_len=context).memory_report(model.dtype)
        return report["bytes"]
    layers, heads, k_dim, v_dim = xquant_fx.cache.kv_geometry(model.config)
    return batch * context * layers * heads * (k_dim + v_dim) * model.dtype.itemsize


def run_one(name, layers, batch, context, new, device, dtype, method, preset, bandwidth, serve=0):
    model = build(name, device, dtype, layers)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
    length = context + new
    if method.startswith("bf16"):
        if method == "bf16-strong":
            use_strong_bf16_attention(model)

        def cache():
            return {cache_argument(model): StaticCache(config=model.config, max_cache_len=length)}
        if device.type == "cpu":
            model.generation_config.compile_config = transformers.CompileConfig(mode="default")
            model.generation_config.compile_config._compile_all_devices = True
    else:
        xquant_fx.optimize(model, preset, compile=True, mode=None if device.type == "cuda" else "default",
                           max_cache_len=length, max_batch_size=batch)

        def cache():
            return {}
    before = graphs()
    start = time.perf_counter()
    timed_generate(model, ids, new, **cache())  # warm-up: compiles the decode step
    warm = time.perf_counter() - start
    compiled = graphs() - before
    if os.environ.get("XQUANT_BENCH_COMPILE_TIMES"):
        print(f"[{method}] compile phases:\n{dynamo_utils.compile_times(repr='str', aggregate=True)}", flush=True)
    _, prefill_only = timed_generate(model, ids, 1, **cache())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, total = timed_generate(model, ids, new, **cache())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    decode = max(total - prefill_only, 1e-9)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = 1e3 * (weights + cache_bytes(model, method, preset, batch, context)) / bandwidth
    step_ms = 1e3 * decode / (new - 1)
    row = dict(model=name, layers=model.config.num_hidden_layers, method=method if method != "xquant" else preset,
               batch=batch, context=context, new=new, compile_s=round(warm - total, 1), graphs=compiled,
               ms_per_step=round(step_ms, 2), tokens_per_s=round(batch * (new - 1) / decode, 1),
               floor_ms=round(floor_ms, 2), x_floor=round(step_ms / floor_ms, 2), peak_gib=round(peak, 2))
    if serve and method == "xquant":
        row["serve_graphs"] = serve_loop(model, batch, context, serve)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row, out


def serve_loop(model, batch: int, context: int, calls: int) -> int:
    """Graphs compiled by ``calls`` generate calls of random batch (1..batch) and prompt length."""
    gen = torch.Generator().manual_seed(0)
    before = graphs()
    for _ in range(calls):
        b = int(torch.randint(1, batch + 1, (1,), generator=gen))
        p = int(torch.randint(1, context + 1, (1,), generator=gen))
        ids = torch.randint(1, model.config.vocab_size, (b, p), generator=gen).to(model.device)
        model.generate(ids, max_new_tokens=4, do_sample=False)
    return graphs() - before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--layers", type=int, default=None, help="override the layer count (smaller runs)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--contexts", nargs="+", type=int, default=[4096])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--preset", default="xquant-1.38")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--serve", type=int, default=0, help="generate calls of random shapes after timing (xquant)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for name in args.models:
        for batch in args.batches:
            for context in args.contexts:
                outs = {}
                for method in args.methods:
                    try:
                        row, out = run_one(name, args.layers, batch, context, args.new, device, dtype, method,
                                           args.preset, bandwidth, args.serve)
                    except torch.OutOfMemoryError:
                        row, out = dict(model=name, method=method, batch=batch, context=context, tokens_per_s="OOM"), None
                        torch.cuda.empty_cache()
                    rows.append(row)
                    outs[method] = out
                    print(row, flush=True)
                    write(rows, device, args.out, bandwidth)  # after every row: a cut-short run keeps it
                strong = next((r for r in rows[-len(args.methods):] if r.get("method") == "bf16-strong"), None)
                for r in rows[-len(args.methods):]:
                    if strong and isinstance(r.get("tokens_per_s"), float) and isinstance(strong.get("tokens_per_s"), float):
                        r["x_strong"] = round(r["tokens_per_s"] / strong["tokens_per_s"], 2)
                write(rows, device, args.out, bandwidth)
    return 0


def write(rows, device, out: Path, bandwidth: float) -> None:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = (f"{gpu}, {datetime.date.today()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"random weights, bf16 on GPU, copy bandwidth {bandwidth / 1e12:.2f} TB/s; `{' '.join(sys.argv)}`")
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# End-to-end decode, {meta}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
