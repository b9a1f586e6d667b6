"""Compile-time cost of the ``xquant::attend`` host code, measurable without a GPU.

``torch.compile`` traces into each ``triton_op`` (fake tensors, then the functional graph) and so
runs its Python launch code once per call site and trace. This script compiles a function making
``--calls`` attend calls (static storage, a dynamic batch, as in a decode step) with the
``aot_eager`` backend, the kernel path forced and its launches replaced by no-ops, and prints the
compile time; the difference between two call counts is the host code's cost per call.

    python benchmarks/host_trace_cost.py --calls 1 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))


def compile_seconds(calls: int, heads: int = 8, gqa: int = 4, head_dim: int = 128, k_bits: int = 2,
                    v_bits: int = 1, context: int = 4096) -> float:
    from test_kernels import make_storage, storage_args  # tests/kernels/test_kernels.py: the cache layout

    import xquant_fx.kernels.attend as kernel
    import xquant_fx.ops as ops

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kernel.launch = lambda fn: _NoLaunch()
    ops.uses_kernels = lambda t: True
    G, R = 32, 128
    storage = make_storage(4, heads, head_dim, head_dim, k_bits, v_bits, G, R, context + R, torch.bfloat16, seed=1)
    layers = [storage_args(storage) for _ in range(calls)]
    for args in layers:
        for t in args:
            if t is not None:
                torch._dynamo.mark_static_address(t)
    n = torch.tensor(200)

    def step(q):
        out = q
        for args in layers:
            out = torch.ops.xquant.attend(out, *args, n, k_bits, v_bits, G, 0.125)
        return out

    q = torch.zeros(3, heads * gqa, 1, head_dim, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(q, 0)
    torch._dynamo.reset()
    start = time.perf_counter()
    torch.compile(step, backend="aot_eager", fullgraph=True)(q)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    results = {c: compile_seconds(c) for c in args.calls}
    for c, s in results.items():
        print(f"{c:4d} attend calls: compile {s:.2f} s")
    if len(results) > 1:
        lo, hi = min(results), max(results)
        print(f"per call: {(results[hi] - results[lo]) / (hi - lo) * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
