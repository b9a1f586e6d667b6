"""Per-kernel device time of a callable, from torch.profiler (the benchmarks' kernel breakdowns)."""

from __future__ import annotations

import torch


def kernel_times(fn, iters: int = 50, warmup: int = 5) -> list[tuple[str, float, float]]:
    """``(kernel, µs per call, launches per call)`` of ``fn``'s device work, longest first
    (eager calls: what the kernels themselves take, without the gaps between launches)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    found = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0:
            found.append((e.key, us / iters, e.count / iters))
    return sorted(found, key=lambda r: -r[1])
