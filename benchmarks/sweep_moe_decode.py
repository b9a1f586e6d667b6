"""How a batch-1 MoE step should spread over the GPU: ``xquant::moe_experts`` kernels at several
:class:`xquant_fx.kernels.moe.Decode` settings (split-K target of the up projection, reduction
tiles, pipeline stages, the combine folded into the down kernel), and the softmax router op
against torch's linear + softmax + top-k.

A script, not a test (random weights: speed only). Qwen3-30B-A3B shapes (128 experts, hidden 2048,
expert intermediate 768, bf16), batch 1, each setting checked against
:func:`xquant_fx.moe.experts_reference` (fails above 1e-2 relative error), then timed as one
CUDA-graph replay of the kernels alone (no Inductor, no router).

    python benchmarks/sweep_moe_decode.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

import xquant_fx  # noqa: E402
from xquant_fx.kernels import moe as kernels  # noqa: E402
from xquant_fx.moe import experts_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import COPY_BW, graph_time  # noqa: E402

SETTINGS = [  # Decode(up programs, up BK, down BK, stages, combine folded into the down kernel)
    (0, 128, 128, 3, False), (384, 128, 128, 3, False), (384, 128, 128, 3, True), (384, 128, 256, 3, True),
    (384, 64, 128, 4, True),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", nargs="+", type=int, default=[8, 4, 2])
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "sweep_moe_decode.py times CUDA graphs: run it on a GPU"
    torch.manual_seed(0)
    e, hid, inter, dev, bf16 = 128, 2048, 768, "cuda", torch.bfloat16
    gate_up = torch.randn(e, 2 * inter, hid, device=dev, dtype=bf16) * 0.02
    down = torch.randn(e, hid, inter, device=dev, dtype=bf16) * 0.02
    router_w = torch.randn(e, hid, device=dev, dtype=bf16) * 0.02
    x = torch.randn(1, hid, device=dev, dtype=bf16)
    expert_bytes = 3 * hid * inter * 2
    lines = [f"# Batch-1 MoE kernels: decode split settings\n\n{torch.cuda.get_device_name()}, {datetime.date.today()}, "
             f"torch {torch.__version__}, triton {triton.__version__}, xquant_fx {xquant_fx.__version__}; Qwen3-30B-A3B "
             f"expert shapes, bf16, random weights, CUDA-graph replays of the kernels alone. "
             f"`python benchmarks/sweep_moe_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "| k | up programs | up BK | down BK | stages | fold combine | µs | floor µs | rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for k in args.ks:
        ids = torch.randperm(e, device=dev)[:k].view(1, k)
        w = torch.rand(1, k, device=dev).to(bf16)
        ref = experts_reference(x, ids, w, gate_up, down).float()
        for setting in SETTINGS:
            kernels.DECODE = kernels.Decode(*setting)
            got = kernels.moe_experts(x, ids, w, gate_up, down).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            us = graph_time(lambda: kernels.moe_experts(x, ids, w, gate_up, down), args.iters) * 1e6
            floor = k * expert_bytes / COPY_BW * 1e6
            lines.append(f"| {k} | {' | '.join(map(str, setting))} | {us:.1f} | {floor:.1f} | {err:.1e} |")
            print(lines[-1], flush=True)
    kernels.DECODE = kernels.Decode()

    lines += ["", "Router at batch 1 (128 experts, k=8, normalized): `xquant::router`'s kernels against torch's "
              "linear, softmax and top-k (eager, graph-captured).", "", "| router | µs |", "|---|---|"]
    ours = lambda: kernels.router(x, router_w, 8, normalize=True)  # noqa: E731

    def torch_router():
        values, indices = torch.topk(F.softmax(F.linear(x, router_w), dim=-1, dtype=torch.float32), 8)
        return values / values.sum(-1, keepdim=True), indices

    (v, i, _), (rv, ri) = ours(), torch_router()
    assert torch.equal(i, ri) or (v.sort().values - rv.sort().values).abs().max() < 1e-3, "router disagrees"
    for name, fn in (("xquant::router kernels", ours), ("torch linear + softmax + topk + normalize", torch_router)):
        lines.append(f"| {name} | {graph_time(fn, args.iters) * 1e6:.1f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_decode_sweep.md").write_text("\n".join(lines) + "\n")
    print(f"worst relative error {worst:.1e}")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
