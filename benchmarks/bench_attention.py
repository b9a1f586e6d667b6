"""Decode-attention benchmark of the quantized KV cache kernels (a script, not a test).

Run on a CUDA GPU (written for an H200: torch 2.11, triton 3.6, no network)::

    python benchmarks/bench_attention.py [--out benchmarks/results] [--quick | --shapes 8x131072,..]
        [--variants mma,mma:lazy:sep,warps-t] [--time-budget 330]
    python benchmarks/bench_attention.py --profile mma     # one shape, for ncu (see profile())
    python benchmarks/bench_attention.py --options         # decode cost of the quality options

1. Checks the kernels against the ``xquant_fx.quant`` reference on the GPU (asserts): the write
   kernel bit-exact over several decode steps; fused attention, every variant of ``--variants``
   at each layout it is timed at, within 2e-2 (bf16 / fp16), with and without a mask (bool left
   padding, additive ``-inf``); this is the only place where the kernels' PTX runs. Each variant
   and layout is a compile (~15 s on an H200 host for ``mma``): keep sweeps to a few variants.
2. Measures the device-to-device copy bandwidth (bytes read + written) as the ceiling.
3. Times decode attention at Llama-3-8B shapes (32 query / 8 KV heads, head_dim 128, one new
   token) for batch 1, 8, 32 and context 4k .. 128k, with ``n = context``:

   * ``sdpa-bf16``: ``F.scaled_dot_product_attention`` over a bf16 cache (``enable_gqa=True``),
     the fastest backend that runs (named in the table);
   * ``attend-k2v1/<variant>``: the fused kernel, 2-bit keys and 1-bit values
     (``xquant-1.38``-like), for each variant of ``--variants`` (``NAME[@BLOCK_N[xSTAGES]]``:
     a variant of :data:`xquant_fx.kernels.attend.VARIANTS`, optionally with stage 1's
     positions per iteration and pipelining stages; ``mma[:wW][:lazy][:rREGS][:sep|:fused]``: the
     ``mma`` stage 1 with an ``MmaConfig``). A sharing layer runs the same kernel with
     its partner's codes: same bytes, same time;
   * ``attend-kivi-2/<variant>``: 2-bit keys and values, the first variant only;
   * ``deq-sdpa-k2v1``: ``quant.read_keys`` / ``read_values`` to a bf16 cache, then SDPA (batch
     1 and 8 up to 16k: it is 10-100x slower);
   * ``append-k2v1``: the decode-step write (one token per sequence, all 8 KV heads), at a step
     that stores no key group, and ``append-k2v1-group`` at the one step in G that does.

   Each is captured in a CUDA graph and timed with ``triton.testing.do_bench`` (median, L2
   flushed between runs). ``GB/s`` counts the bytes the method must read (codes, scales, zero
   points, window, q; the bf16 cache for SDPA) over its time; ``%copy`` compares with step 2.
   Configurations still untimed when ``--time-budget`` seconds have passed are skipped (and
   listed), so that one run stays within about six minutes.

``--options`` instead measures what each quality option of ``XQuantConfig`` costs a decode step
(``xquant-1.38`` layout, K2/V1, through the ops a compiled model calls): the attend op plain, with
4 and 8 sink tokens, with float8 metadata, with the Hadamard rotation moved onto the query and the
output (twice, as the fuse pass places it: the eager ``xquant::hadamard`` op, and the Walsh-Hadamard
transform that ``inline_rotations`` leaves in a compiled model), and all together; and the write:
the append kernel (min-max levels) against the torch write with min-max and with least-squares
levels (``level_fit="lsq"`` stays on the torch write), eager and compiled. It checks the options'
attend against ``quant`` first and writes ``attention_options.md`` / ``.csv``.

Caches are filled with random codes and scales (no write path for 128k tokens). Writes
``attention.md`` and ``attention.csv`` into ``--out`` (GPU, date, versions, registers of each
variant's stage-1 kernel) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import xquant_fx.ops  # noqa: E402,F401  (registers torch.ops.xquant.*)
from xquant_fx import quant  # noqa: E402
from xquant_fx.kernels import attend as attend_kernels  # noqa: E402
from profiling import kernel_times  # noqa: E402

HQ, HKV, D = 32, 8, 128  # Llama-3-8B
G, R = 32, 128  # xquant defaults (group_size, residual_length)
DTYPE = torch.bfloat16
MEMORY_LIMIT = 100e9  # bytes a configuration may allocate
LAYOUTS = {"kivi-2": (2, 2, 0.0, 0.0), "k2v1": (2, 1, 0.045, 1 / 6)}  # k_bits, v_bits, k_eta, v_eta
DEFAULT_VARIANTS = "mma,mma:lazy:sep,warps-t"  # the default, with stage 2 always a launch of its own, CUDA-core decoding


# --------------------------------------------------------------------------- variants
def parse_variant(spec: str):
    """``NAME[@BLOCK_N[xSTAGES]]`` -> (variant, config or None for the launcher's default);
    ``mma[:wW][:lazy][:rREGS][:sep|:fused]`` -> ("mma", an ``MmaConfig`` of W warps per program,
    the lazy rescale, a register cap, stage 2 as a launch of its own (``sep``) or as programs of
    stage 1's (``fused``; neither: by capacity, the default's rule); the programs per
    multiprocessor follow from the cap, else from 240 registers, the default build's)."""
    if spec.startswith("mma:"):
        opts = spec.split(":")[1:]
        warps = next((int(o[1:]) for o in opts if o.startswith("w")), attend_kernels.attend_mma.WARPS)
        cap = next((int(o[1:]) for o in opts if o.startswith("r")), None)
        unknown = [o for o in opts if o not in ("lazy", "sep", "fused") and o[:1] not in ("w", "r")]
        if unknown:
            raise SystemExit(f"{spec!r}: unknown mma options {unknown}; expected wW, lazy, rREGS, sep or fused")
        if {"sep", "fused"} <= set(opts):
            raise SystemExit(f"{spec!r}: sep and fused place stage 2 apart and in one launch: give one")
        regs = -(-(cap or 240) // 8) * 8  # allocated per thread in steps of 8
        return "mma", attend_kernels.attend_mma.MmaConfig(
            num_warps=warps, maxnreg=cap, ctas_per_sm=min(32, 65536 // (32 * warps * regs)),
            lazy="lazy" in opts,  # explicit: "mma:w1" is one warp without the lazy rescale
            tail_programs=True if "fused" in opts else False if "sep" in opts else None)
    name, _, rest = spec.partition("@")
    if name not in attend_kernels.VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; expected one of {attend_kernels.VARIANTS}")
    if not rest:
        return name, None
    block, _, stages = rest.partition("x")
    base = attend_kernels.block_config(name, 8 if name == "warps-t" else 16, D, D, 2)
    per_warp = int(block) // base.num_warps
    ctas = 2 if name.startswith("warps") and per_warp > 16 else base.ctas_per_sm
    return name, attend_kernels.AttendConfig(block_n=int(block), num_warps=base.num_warps,
                                             num_stages=int(stages) if stages else base.num_stages,
                                             ctas_per_sm=ctas)


def run_variant(spec, q, args, n, kb, vb, mask=None, splits=None):
    variant, config = parse_variant(spec)
    return attend_kernels.attend(q, *args, n, kb, vb, G, D**-0.5, mask, variant=variant, config=config,
                                 splits=splits)


# --------------------------------------------------------------------------- storage
def make_storage(b: int, ctx: int, kb: int, vb: int, device, seed: int = 0, dtype=DTYPE) -> dict:
    """Random codes / scales / zeros / windows of one layer with capacity ``ctx`` (cache.py layout)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tq = math.ceil(max(ctx - R, 1) / G) * G

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, device=device, dtype=torch.int32)

    def uniform(*shape, lo, hi):
        return (torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo).to(dtype)

    return dict(
        k_codes=words(b, HKV, tq * kb // 32, D),
        k_scale=uniform(b, HKV, tq // G, D, lo=0.02, hi=0.2),
        k_zero=uniform(b, HKV, tq // G, D, lo=-0.5, hi=0.5),
        k_window=torch.randn(b, HKV, R, D, generator=gen, device=device).to(dtype),
        v_codes=words(b, HKV, tq, D * vb // 32),
        v_scale=uniform(b, HKV, tq, D // G, lo=0.02, hi=0.5),
        v_zero=uniform(b, HKV, tq, D // G, lo=-0.5, hi=0.5),
        v_window=torch.randn(b, HKV, R, D, generator=gen, device=device).to(dtype),
    )


ORDER = ("k_codes", "k_scale", "k_zero", "k_window", "v_codes", "v_scale", "v_zero", "v_window")


def storage_args(st: dict) -> list:
    return [st[name] for name in ORDER]


def quant_read_bytes(b: int, n: int, kb: int, vb: int, meta_bytes: int = 2) -> int:
    """Bytes the fused kernel must read for ``n`` stored tokens (codes, scales, zeros, windows, q);
    ``meta_bytes`` per scale or zero point (1: float8 metadata)."""
    nq = max(n - R, 0)
    per_head = (nq * D * kb // 8 + 2 * math.ceil(nq / G) * D * meta_bytes  # key codes, scale + zero
                + nq * D * vb // 8 + 2 * nq * (D // G) * meta_bytes  # value codes, scale + zero
                + 2 * min(n, R) * D * 2)  # windows
    return b * HKV * per_head + b * HQ * D * 2


def sdpa_read_bytes(b: int, n: int) -> int:
    return 2 * b * HKV * n * D * 2 + b * HQ * D * 2


# --------------------------------------------------------------------------- timing
def time_graph(fn, warmup_calls: int = 2) -> float:
    """Median µs of ``fn`` captured in a CUDA graph (L2 flushed between replays by do_bench)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    ms = do_bench(graph.replay, warmup=10, rep=40, return_mode="median")
    del graph
    return ms * 1e3


def kernel_breakdown(fn) -> str:
    """``"name µs, .."`` per kernel of ``fn`` (:func:`profiling.kernel_times`, best effort), against
    the graph's time for the whole call: the rest is the gaps between dependent launches."""
    try:
        return ", ".join(f"{name.split('(')[0]} {us:.1f}" for name, us, _ in kernel_times(fn, iters=20))
    except Exception as exc:  # noqa: BLE001
        return f"kernel times unavailable ({type(exc).__name__})"


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    nbytes = 4 << 30
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def time_sdpa(q, k, v) -> tuple[float, str]:
    """Best (µs, backend) of SDPA with enable_gqa over the backends that accept the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (float("inf"), "none")
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None or (name == "MATH" and best[0] < float("inf")):
            continue

        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            run()
            torch.cuda.synchronize()
            us = time_graph(run)
        except Exception:  # backend refuses these inputs (or cannot be graph-captured)
            torch.cuda.synchronize()
            continue
        best = min(best, (us, name.lower()))
    return best


# --------------------------------------------------------------------------- checks
def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    if out.isnan().any():
        return float("inf")
    return (out - ref).abs().max().item() / ref.abs().max().item()


def check_kernels(device, variants: list[str]) -> None:
    """Kernels vs reference on the GPU; asserts."""
    torch.manual_seed(0)
    # Decode-step write: bit-exact over steps before / at / after R and across group boundaries.
    for kb, vb, k_eta, v_eta in LAYOUTS.values():
        ref = make_storage(2, 512, kb, vb, device, seed=1)
        got = {name: t.clone() for name, t in ref.items()}
        for pos in (0, R - 1, R, R + 1, R + G - 1, R + G, R + 5 * G + 3):
            k = torch.randn(2, HKV, 1, D, device=device, dtype=DTYPE)
            v = torch.randn(2, HKV, 1, D, device=device, dtype=DTYPE)
            p = torch.tensor(pos, device=device)
            quant.append_token(k, v, p, *storage_args(ref), kb, vb, G, k_eta, v_eta)
            torch.ops.xquant.append_token(k, v, p, *storage_args(got), kb, vb, G, k_eta, v_eta)
            for name in ORDER:
                assert torch.equal(got[name], ref[name]), f"append K{kb}/V{vb}: {name} differs at pos={pos}"

    def reference(st, q, nt, kb, vb, mask=None):
        length = st["v_scale"].shape[2] + R
        keys = quant.read_keys(st["k_codes"], st["k_scale"], st["k_zero"], st["k_window"], nt, kb, G, length)
        values = quant.read_values(st["v_codes"], st["v_scale"], st["v_zero"], st["v_window"], nt, vb, G, length)
        return quant.attend(q, keys, values, nt, D**-0.5, mask)

    # Every variant at the benchmark's shapes (GQA 4, Lq 1, bf16), ragged n, several split counts,
    # at each layout it is timed at (kivi-2: the first variant only; each layout is a compile).
    for (kb, vb, _, _), n in ((LAYOUTS["kivi-2"], 1000), (LAYOUTS["k2v1"], 3001), (LAYOUTS["k2v1"], 200)):
        st = make_storage(2, 4096, kb, vb, device, seed=n)
        q = torch.randn(2, HQ, 1, D, device=device, dtype=DTYPE)
        nt = torch.tensor(n, device=device)
        ref = reference(st, q, nt, kb, vb)
        for spec in variants if (kb, vb) == LAYOUTS["k2v1"][:2] else variants[:1]:
            for splits in (None, 1, 7):
                err = rel_err(run_variant(spec, q, storage_args(st), nt, kb, vb, splits=splits), ref)
                assert err < 2e-2, f"attend {spec} K{kb}/V{vb} n={n} splits={splits}: rel err {err:.3g}"
    # The default path through the op at other shapes and dtypes.
    for (kb, vb, _, _), n, lq, gqa, dtype in (
        (LAYOUTS["k2v1"], 777, 4, 4, torch.float16),
        (LAYOUTS["k2v1"], 129, 16, 8, torch.bfloat16),
        ((4, 4, 0, 0), 2048, 2, 1, torch.float16),
        ((1, 2, 0, 0), 1500, 1, 8, torch.bfloat16),
    ):
        st = make_storage(2, 4096, kb, vb, device, seed=n, dtype=dtype)
        q = torch.randn(2, HKV * gqa, lq, D, device=device, dtype=dtype)
        nt = torch.tensor(n, device=device)
        got = torch.ops.xquant.attend(q, *storage_args(st), nt, kb, vb, G, D**-0.5)
        err = rel_err(got, reference(st, q, nt, kb, vb))
        assert err < 2e-2, f"attend op K{kb}/V{vb} n={n} Lq={lq} GQA={gqa} {dtype}: rel err {err:.3g}"
    # Masks (transformers' SDPA masks: bool left padding, additive -inf) through the op and each variant.
    kb, vb, _, _ = LAYOUTS["k2v1"]
    n, M = 3001, 3100
    st = make_storage(2, 4096, kb, vb, device, seed=5)
    q = torch.randn(2, HQ, 1, D, device=device, dtype=DTYPE)
    nt = torch.tensor(n, device=device)
    keep = torch.arange(M, device=device)[None, :] >= torch.tensor([0, 1234], device=device)[:, None]
    keep = keep[:, None, None, :]  # [b, 1, 1, M]
    for mask in (keep, torch.zeros(keep.shape, device=device, dtype=DTYPE).masked_fill(~keep, float("-inf"))):
        ref = reference(st, q, nt, kb, vb, mask)
        err = rel_err(torch.ops.xquant.attend(q, *storage_args(st), nt, kb, vb, G, D**-0.5, mask), ref)
        assert err < 2e-2, f"attend op with a {mask.dtype} mask: rel err {err:.3g}"
        if mask.dtype == torch.bool:
            for spec in variants:
                err = rel_err(run_variant(spec, q, storage_args(st), nt, kb, vb, mask=mask), ref)
                assert err < 2e-2, f"attend {spec} with a bool mask: rel err {err:.3g}"
    print("checks passed: append bit-exact, attend within 2e-2 (every variant, with and without masks)", flush=True)


def check_compile(device) -> str:
    """torch.compile (Inductor) of a decode step through the ops vs eager; returns a verdict."""
    kb, vb, k_eta, v_eta = LAYOUTS["k2v1"]
    st_eager = make_storage(1, 1024, kb, vb, device, seed=3)
    st_comp = {name: t.clone() for name, t in st_eager.items()}
    k = torch.randn(1, HKV, 1, D, device=device, dtype=DTYPE)
    v = torch.randn(1, HKV, 1, D, device=device, dtype=DTYPE)
    q = torch.randn(1, HQ, 1, D, device=device, dtype=DTYPE)
    mask = torch.ones(1, 1, 1, 1024, device=device, dtype=torch.bool)
    mask[..., :7] = False

    def step(st, pos):
        torch.ops.xquant.append_token(k, v, pos, *storage_args(st), kb, vb, G, k_eta, v_eta)
        return torch.ops.xquant.attend(q, *storage_args(st), pos + 1, kb, vb, G, D**-0.5, mask)

    try:
        compiled = torch.compile(step, fullgraph=True)
        for pos in (R + G, R + G + 1):
            p = torch.tensor(pos, device=device)
            eager_out, comp_out = step(st_eager, p), compiled(st_comp, p)
            for name in ORDER:
                if not torch.equal(st_eager[name], st_comp[name]):
                    return f"compiled append differs from eager in {name}"
            if not torch.equal(eager_out, comp_out):
                err = (eager_out.float() - comp_out.float()).abs().max().item()
                return f"compiled attend differs from eager by {err:.3g}"
    except Exception as exc:  # report, do not abort the benchmark
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return "torch.compile(fullgraph=True) of append + masked attend matches eager bit for bit"


def kernel_stats(kernel, **constants) -> str:
    """Registers, spills and shared memory of the compilation of ``kernel`` whose constexprs
    include ``constants`` (best effort: compiled-kernel internals differ across Triton versions)."""
    try:
        for cache in kernel.device_caches.values():
            for ck in cache[0].values():
                names = ck.src.fn.arg_names
                have = {names[k[0] if isinstance(k, tuple) else k]: v for k, v in ck.src.constants.items()}
                if all(have.get(name) == value for name, value in constants.items()):
                    ck._init_handles()
                    return f"{ck.n_regs} regs, {ck.n_spills} spills, {ck.metadata.shared // 1024} KB smem"
        return "stats unavailable (no matching compilation)"
    except Exception as exc:  # noqa: BLE001
        return f"stats unavailable ({type(exc).__name__})"


# --------------------------------------------------------------------------- benchmark
#: Shapes whose first variant's kernels are also timed one by one (:func:`kernel_breakdown`).
BREAKDOWN_SHAPES = ((1, 4096), (1, 16384), (8, 16384))


def estimate_bytes(b: int, ctx: int) -> int:
    """Bytes a configuration holds at once without the dequantize-then-SDPA baseline."""
    return sdpa_read_bytes(b, ctx) + quant_read_bytes(b, ctx, 2, 2) + quant_read_bytes(b, ctx, 2, 1)


def dequant_temp_bytes(b: int, ctx: int) -> int:
    """Peak temporaries of ``quant.read_keys`` + ``read_values`` (uint8 codes, float32 products and
    repeated scales / zeros, bf16 results: about 24 bytes per element of one tensor)."""
    return 24 * b * HKV * ctx * D


def bench_config(b: int, ctx: int, device, copy_gbps: float, variants: list[str], stats: dict,
                 with_mask: bool = False) -> list[dict]:
    rows = []
    n = torch.tensor(ctx, device=device)
    q = torch.randn(b, HQ, 1, D, device=device, dtype=DTYPE)
    # transformers' decode mask over a cache without padding: [b, 1, 1, ctx], all True
    mask = torch.ones(b, 1, 1, ctx, device=device, dtype=torch.bool) if with_mask else None

    def add(method, us, nbytes, note=""):
        rows.append(dict(method=method, batch=b, context=ctx, us=us, bytes=nbytes,
                         gbps=nbytes / (us * 1e-6) / 1e9, pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy_gbps,
                         note=note))

    # bf16 SDPA
    k = torch.randn(b, HKV, ctx, D, device=device, dtype=DTYPE)
    v = torch.randn(b, HKV, ctx, D, device=device, dtype=DTYPE)
    us, backend = time_sdpa(q, k, v)
    add("sdpa-bf16", us, sdpa_read_bytes(b, ctx), backend)
    del k, v
    torch.cuda.empty_cache()

    for name, (kb, vb, k_eta, v_eta) in LAYOUTS.items():
        st = make_storage(b, ctx, kb, vb, device, seed=b * 7 + ctx)
        args = storage_args(st)
        capacity = st["v_scale"].shape[2] + R
        for spec in variants if name == "k2v1" else variants[:1]:
            variant, config = parse_variant(spec)
            us = time_graph(lambda: run_variant(spec, q, args, n, kb, vb, mask=mask))
            if variant == "mma":
                cfg = config or attend_kernels.attend_mma.MmaConfig()
                splits = attend_kernels.mma_splits(b * HKV, capacity, device, cfg)
            else:
                cfg = config or attend_kernels.block_config(variant, 8 if variant == "warps-t" else 16, D, D, kb)
                splits = attend_kernels.num_splits(b * HKV, capacity, device, cfg.ctas_per_sm)
            key = (spec, name)
            if key not in stats:
                if variant == "mma":  # its own kernel (run 35's table showed another kernel's numbers here)
                    stats[key] = kernel_stats(attend_kernels._attend_mma_kernel, KB=kb, VB=vb,
                                              HAS_MASK=with_mask, W=cfg.num_warps, LAZY=cfg.lazy,
                                              TAIL_PROGRAMS=attend_kernels.mma_tail_programs(cfg, capacity))
                else:
                    stats[key] = kernel_stats(
                        attend_kernels._attend_kernel, BLOCK_N=cfg.block_n, KB=kb, VB=vb, HAS_MASK=with_mask,
                        WARP_SPLIT=cfg.num_warps if variant == "warps-t" else 0,
                        PACKED=variant != "generic")
            note = f"{splits} splits"
            if spec == variants[0] and (b, ctx) in BREAKDOWN_SHAPES:
                note += "; kernels (µs): " + kernel_breakdown(lambda: run_variant(spec, q, args, n, kb, vb, mask=mask))
            add(f"attend-{name}/{spec}", us, quant_read_bytes(b, ctx, kb, vb), note)
        if name == "k2v1":
            length = capacity

            def dequant_sdpa():
                keys = quant.read_keys(st["k_codes"], st["k_scale"], st["k_zero"], st["k_window"], n, kb, G, length)
                values = quant.read_values(st["v_codes"], st["v_scale"], st["v_zero"], st["v_window"], n, vb, G,
                                           length)
                return F.scaled_dot_product_attention(q, keys[:, :, :ctx], values[:, :, :ctx], enable_gqa=True)

            if b <= 8 and ctx <= 16384 and estimate_bytes(b, ctx) + dequant_temp_bytes(b, ctx) <= MEMORY_LIMIT:
                add("deq-sdpa-k2v1", time_graph(dequant_sdpa), quant_read_bytes(b, ctx, kb, vb),
                    "quant.read_* + SDPA")
            kn = torch.randn(b, HKV, 1, D, device=device, dtype=DTYPE)
            vn = torch.randn(b, HKV, 1, D, device=device, dtype=DTYPE)
            # G - 1 steps in G store no key group (ctx - 1 is one of them); the G-th quantizes one
            pos = torch.tensor(ctx - 1, device=device)
            us = time_graph(lambda: torch.ops.xquant.append_token(kn, vn, pos, *args, kb, vb, G, k_eta, v_eta))
            add("append-k2v1", us, b * HKV * 3 * D * 2, "per decode step, all KV heads")  # ring value + new token
            flush = torch.tensor(R + (ctx - 1 - R) // G * G, device=device)
            us = time_graph(lambda: torch.ops.xquant.append_token(kn, vn, flush, *args, kb, vb, G, k_eta, v_eta))
            add("append-k2v1-group", us, b * HKV * (G + 3) * D * 2, "the step that stores a key group (1 in G)")
        del st, args
        torch.cuda.empty_cache()
    sdpa_us = rows[0]["us"]
    for row in rows:
        row["speedup"] = sdpa_us / row["us"] if not row["method"].startswith("append") else float("nan")
    return rows


OPTION_SHAPES = ((1, 4096), (8, 32768), (32, 32768))


def with_options(st: dict, b: int, sinks: int, fp8: bool, device, seed: int = 0) -> tuple[dict, dict]:
    """``st`` with float8 metadata if ``fp8`` (clamped as the cache stores it), and the sink
    buffers ``k_sink`` / ``v_sink [b, Hkv, sinks, D]`` as attend keyword arguments."""
    if fp8:
        st = {name: quant.to_metadata(t, torch.float8_e4m3fn) if name.endswith(("scale", "zero")) else t
              for name, t in st.items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    extra = {}
    if sinks:
        extra = {name: torch.randn(b, HKV, sinks, D, generator=gen, device=device).to(DTYPE)
                 for name in ("k_sink", "v_sink")}
    return st, extra


def check_options(device) -> None:
    """The attend op with sinks, float8 metadata and both, against ``quant`` (asserts)."""
    kb, vb, _, _ = LAYOUTS["k2v1"]
    for sinks, fp8, n in ((4, False, 3001), (0, True, 3001), (8, True, 777), (8, True, 5)):
        st, extra = with_options(make_storage(2, 4096, kb, vb, device, seed=n), 2, sinks, fp8, device, seed=n)
        q = torch.randn(2, HQ, 1, D, device=device, dtype=DTYPE)
        nt = torch.tensor(n, device=device)
        length = st["v_scale"].shape[2] + R
        keys = quant.read_keys(st["k_codes"], st["k_scale"], st["k_zero"], st["k_window"], nt, kb, G, length)
        values = quant.read_values(st["v_codes"], st["v_scale"], st["v_zero"], st["v_window"], nt, vb, G, length)
        if sinks:
            keys, values = quant.merge_sink(keys, extra["k_sink"]), quant.merge_sink(values, extra["v_sink"])
        ref = quant.attend(q, keys, values, nt, D**-0.5)
        got = torch.ops.xquant.attend(q, *storage_args(st), nt, kb, vb, G, D**-0.5, **extra)
        err = rel_err(got, ref)
        assert err < 2e-2, f"attend with {sinks} sinks, fp8={fp8}, n={n}: rel err {err:.3g}"
    print("option checks passed: attend with sinks / float8 metadata within 2e-2 of quant", flush=True)


def bench_options(device, copy_gbps: float, time_budget: float, started: float) -> tuple[list[dict], list[str]]:
    """Decode cost of each quality option (see the module docstring); rows and skipped shapes."""
    kb, vb, k_eta, v_eta = LAYOUTS["k2v1"]
    rows, skipped = [], []
    rotations = {"op": torch.ops.xquant.hadamard,  # eager, as the op runs outside compiled graphs
                 # what a compiled model runs (xquant_fx.passes.inline_rotations)
                 "compiled": torch.compile(quant.hadamard_butterfly, fullgraph=True, dynamic=False)}

    def torch_write(kn, vn, pos, st, fit):
        quant.append_key(kn, pos, st["k_codes"], st["k_scale"], st["k_zero"], st["k_window"], kb, G, k_eta, fit)
        quant.append_value(vn, pos, st["v_codes"], st["v_scale"], st["v_zero"], st["v_window"], vb, G, v_eta, fit)

    compiled_writes = {fit: torch.compile(torch_write, fullgraph=True) for fit in ("minmax", "lsq")}
    for b, ctx in OPTION_SHAPES:
        if time.time() - started > time_budget:
            skipped.append(f"batch {b} context {ctx // 1024}k (time budget)")
            continue
        n = torch.tensor(ctx, device=device)
        q = torch.randn(b, HQ, 1, D, device=device, dtype=DTYPE)
        base = make_storage(b, ctx, kb, vb, device, seed=b + ctx)
        plain_us = None
        for label, sinks, fp8, rotate in (("plain", 0, False, None), ("4 sinks", 4, False, None),
                                          ("8 sinks", 8, False, None), ("float8 metadata", 0, True, None),
                                          ("hadamard (eager op)", 0, False, "op"),
                                          ("hadamard (compiled)", 0, False, "compiled"),
                                          ("4 sinks + hadamard (compiled) + float8", 4, True, "compiled")):
            st, extra = with_options(base, b, sinks, fp8, device)
            args = storage_args(st)

            def step(args=args, extra=extra, rotate=rotations.get(rotate)):
                qq = rotate(q) if rotate else q
                out = torch.ops.xquant.attend(qq, *args, n, kb, vb, G, D**-0.5, **extra)
                return rotate(out) if rotate else out

            us = time_graph(step)
            plain_us = plain_us or us
            nbytes = quant_read_bytes(b, ctx, kb, vb, meta_bytes=1 if fp8 else 2)
            rows.append(dict(method="attend", option=label, batch=b, context=ctx, us=us, vs_plain=us / plain_us,
                             gbps=nbytes / (us * 1e-6) / 1e9, pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy_gbps))
        # The write of one decode step (all KV heads), at a position that completes a key group.
        kn = torch.randn(b, HKV, 1, D, device=device, dtype=DTYPE)
        vn = torch.randn(b, HKV, 1, D, device=device, dtype=DTYPE)
        pos = torch.tensor(ctx - G, device=device)  # pos - R starts a key group: the write quantizes it
        st = {name: t.clone() for name, t in base.items()}
        args = storage_args(st)

        def write(fit, compiled=False):
            fn = compiled_writes[fit] if compiled else torch_write
            return lambda: fn(kn, vn, pos, st, fit)

        writes = [("append kernel (min-max)",
                   lambda: torch.ops.xquant.append_token(kn, vn, pos, *args, kb, vb, G, k_eta, v_eta)),
                  ("torch write, min-max, eager", write("minmax")),
                  ("torch write, lsq, eager", write("lsq")),
                  ("torch write, min-max, compiled", write("minmax", True)),
                  ("torch write, lsq, compiled", write("lsq", True))]
        kernel_us = None
        for label, fn in writes:
            try:
                us = time_graph(fn)
            except Exception as exc:  # noqa: BLE001  (report, do not abort the run)
                print(f"  write {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                continue
            kernel_us = kernel_us or us
            rows.append(dict(method="append", option=label, batch=b, context=ctx, us=us, vs_plain=us / kernel_us,
                             gbps=float("nan"), pct_copy=float("nan")))
        for row in (row for row in rows if (row["batch"], row["context"]) == (b, ctx)):
            print(f"  {row['method']:>6} {row['option']:>32} b={b:<3} ctx={ctx:<6} {row['us']:9.1f} us  "
                  f"x{row['vs_plain']:5.2f}", flush=True)
        del base, st, args
        torch.cuda.empty_cache()
    return rows, skipped


def write_options(rows, meta, skipped, out_dir: Path) -> str:
    write_csv(out_dir / "attention_options.csv", meta, rows,
              ["method", "option", "batch", "context", "us", "vs_plain", "gbps", "pct_copy"])
    lines = [
        "# Decode cost of the quality options (xquant-1.38 layout: K2/V1, Llama-3-8B attention shapes)",
        "",
        f"GPU {meta['gpu']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}. "
        f"Copy bandwidth {meta['copy_gbps']:.0f} GB/s. Each row one CUDA graph, median of "
        "`triton.testing.do_bench` (L2 flushed). `attend` rows: one layer's attention op as a compiled "
        "model calls it (`hadamard`: plus the rotation of the query and the output, as the eager "
        "`xquant::hadamard` op or as the Walsh-Hadamard transform a compiled model runs); "
        "x = time over the plain row. `append` rows: one layer's decode-step write at a position that "
        "quantizes a key group; x = time over the append kernel.",
        "",
        "Command: `python benchmarks/bench_attention.py --options`.",
        "",
    ]
    columns = [("op", False), ("option", False), ("batch", True), ("context", True), ("µs", True),
               ("× plain", True), ("% copy BW", True)]
    cells = [[row["method"], row["option"], str(row["batch"]), f"{row['context'] // 1024}k", f"{row['us']:.1f}",
              f"{row['vs_plain']:.2f}", "" if math.isnan(row["pct_copy"]) else f"{row['pct_copy']:.0f}"]
             for row in rows]
    return write_markdown(out_dir / "attention_options.md", lines, skipped, columns, cells)


def write_csv(path: Path, meta: dict, rows: list[dict], fields: list[str]) -> None:
    """``rows`` (their ``fields``) as CSV, each row prefixed with the run's GPU, date and versions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["gpu", "date", "torch", "triton", "copy_gbps", *fields])
        for row in rows:
            writer.writerow([meta["gpu"], meta["date"], meta["torch"], meta["triton"], f"{meta['copy_gbps']:.0f}",
                             *[f"{row[f]:.2f}" if isinstance(row[f], float) else row[f] for f in fields]])


def write_markdown(path: Path, intro: list[str], skipped: list[str], columns: list[tuple[str, bool]],
                   cells: list[list[str]]) -> str:
    """``intro`` lines, the configurations skipped, then a table of ``cells`` under ``columns``
    (``(title, right-aligned)``); written to ``path`` and returned."""
    lines = list(intro)
    if skipped:
        lines += ["Skipped: " + ", ".join(skipped) + ".", ""]
    lines += ["| " + " | ".join(title for title, _ in columns) + " |",
              "| " + " | ".join("---:" if right else "---" for _, right in columns) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def write_results(rows, meta, out_dir: Path) -> str:
    write_csv(out_dir / "attention.csv", meta, rows,
              ["method", "batch", "context", "us", "speedup", "bytes", "gbps", "pct_copy", "note"])
    lines = [
        "# Decode attention, Llama-3-8B shapes (32 q / 8 kv heads, head_dim 128, Lq = 1, n = context)",
        "",
        f"GPU {meta['gpu']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}. "
        f"Copy bandwidth {meta['copy_gbps']:.0f} GB/s (read + write). G={G}, R={R}, bf16.",
        "",
        f"Checks: {meta['checks']}. Compile: {meta['compile']}. "
        f"Attend calls {'with' if meta.get('mask') else 'without'} a decode mask (bool [b, 1, 1, n], all True).",
        "",
        "Stage-1 kernels: " + "; ".join(f"{spec} ({layout}): {s}" for (spec, layout), s in meta["stats"].items()) + ".",
        "",
    ]
    columns = [("method", False), ("batch", True), ("context", True), ("µs", True), ("× sdpa-bf16", True),
               ("MB read", True), ("GB/s", True), ("% copy BW", True), ("note", False)]
    cells = [[row["method"], str(row["batch"]), f"{row['context'] // 1024}k", f"{row['us']:.1f}",
              "" if math.isnan(row["speedup"]) else f"{row['speedup']:.2f}", f"{row['bytes'] / 1e6:.1f}",
              f"{row['gbps']:.0f}", f"{row['pct_copy']:.0f}", row["note"]] for row in rows]
    return write_markdown(out_dir / "attention.md", lines, meta["skipped"], columns, cells)


def profile(spec: str, device, b: int = 8, ctx: int = 131072) -> int:
    """Run ``spec`` (K2/V1) five times at batch ``b``, context ``ctx``, for a profiler to pick a
    launch of its stage-1 kernel::

        ncu --clock-control none -k regex:'_attend_mma_kernel|_attend_kernel' --launch-skip 2 \
            --launch-count 1 --set full python benchmarks/bench_attention.py --profile mma
    """
    kb, vb, _, _ = LAYOUTS["k2v1"]
    st = make_storage(b, ctx, kb, vb, device, seed=1)
    q = torch.randn(b, HQ, 1, D, device=device, dtype=DTYPE)
    n = torch.tensor(ctx, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        start.record()
        run_variant(spec, q, storage_args(st), n, kb, vb)
        end.record()
        torch.cuda.synchronize()
        print(f"{spec} b={b} ctx={ctx}: {start.elapsed_time(end) * 1e3:.1f} us (all stages, eager)", flush=True)
    return 0


def _shapes(text: str) -> list[tuple[int, int]]:
    """``"1x4096,8x131072"`` -> [(1, 4096), (8, 131072)]."""
    try:
        return [(int(b), int(c)) for b, c in (pair.split("x") for pair in text.split(",") if pair)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxCONTEXT pairs, e.g. 1x4096,8x131072") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="batch 1, 8 and context 4k, 16k only")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated NAME[@BLOCK_N[xSTAGES]] or mma[:wW][:lazy][:rREGS][:sep|:fused] (the first also runs kivi-2)")
    parser.add_argument("--shapes", type=_shapes, metavar="BxCTX,..",
                        help="only these batch x context pairs, e.g. 1x4096,8x131072 (overrides --quick)")
    parser.add_argument("--time-budget", type=float, default=330.0,
                        help="seconds after which configurations still untimed are skipped")
    parser.add_argument("--no-compile-check", action="store_true")
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks (not for reports)")
    parser.add_argument("--mask", action="store_true",
                        help="attend calls take transformers' decode mask (bool [b, 1, 1, n], all True), as in a model")
    parser.add_argument("--options", action="store_true",
                        help="only the decode cost of the quality options (sinks, float8 metadata, rotation, lsq)")
    parser.add_argument("--profile", metavar="SPEC",
                        help="only run variant SPEC at batch 8, 128k, five times, no CUDA graph (for ncu)")
    args = parser.parse_args(argv)
    variants = [spec.strip() for spec in args.variants.split(",") if spec.strip()]
    for spec in variants:
        parse_variant(spec)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to benchmark", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.profile:
        return profile(args.profile, device)
    started = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(device), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, stats={}, skipped=[], mask=args.mask)
    print(f"{meta['gpu']} torch {meta['torch']} triton {meta['triton']} variants {variants}", flush=True)
    if args.options:
        check_options(device)
        meta["copy_gbps"] = copy_bandwidth(device)
        rows, skipped = bench_options(device, meta["copy_gbps"], args.time_budget, started)
        print(write_options(rows, meta, skipped, args.out))
        print(f"total {time.time() - started:.0f} s")
        return 0

    if not args.skip_checks:
        check_kernels(device, variants)
    meta["checks"] = ("skipped" if args.skip_checks else
                      "append bit-exact vs quant.append_token, attend (every variant at the layouts it is timed at, "
                      "with and without masks) within 2e-2 of quant.attend")
    meta["compile"] = "skipped" if args.no_compile_check else check_compile(device)
    print(f"compile: {meta['compile']} ({time.time() - started:.0f} s)", flush=True)
    meta["copy_gbps"] = copy_bandwidth(device)
    print(f"copy bandwidth: {meta['copy_gbps']:.0f} GB/s", flush=True)

    batches = (1, 8) if args.quick else (1, 8, 32)
    contexts = (4096, 16384) if args.quick else (4096, 16384, 65536, 131072)
    shapes = args.shapes or [(b, ctx) for b in batches for ctx in contexts]
    rows = []
    for b, ctx in shapes:
        if estimate_bytes(b, ctx) > MEMORY_LIMIT:
            print(f"skip batch {b} context {ctx}: over {MEMORY_LIMIT / 1e9:.0f} GB", flush=True)
            continue
        if time.time() - started > args.time_budget:
            meta["skipped"].append(f"batch {b} context {ctx // 1024}k (time budget)")
            print(f"skip batch {b} context {ctx}: past the time budget", flush=True)
            continue
        config_rows = bench_config(b, ctx, device, meta["copy_gbps"], variants, meta["stats"], args.mask)
        for row in config_rows:
            print(f"  {row['method']:>26} b={b:<3} ctx={ctx:<7} {row['us']:9.1f} us  "
                  f"x{row['speedup']:5.2f}  {row['gbps']:6.0f} GB/s  {row['note']}", flush=True)
        rows.extend(config_rows)
        torch.cuda.empty_cache()
    for (spec, layout), s in meta["stats"].items():
        print(f"stage 1 {spec} ({layout}): {s}")
    print()
    print(write_results(rows, meta, args.out))
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
