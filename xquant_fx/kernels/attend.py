"""Flash-decoding attention over the packed quantized KV cache.

Computes ``quant.attend(q, quant.read_keys(...), quant.read_values(...), n, scale)`` without
materialising the dequantized cache: each code word is read once and dequantized in registers
(shift, mask, multiply by the scale, add the zero point); positions at or past the key / value
boundary are read from the full-precision ring window in the same pass.

Stage 1, :func:`_attend_split_kernel`, grid ``(b * Hkv, S)``: program ``(bh, s)`` takes KV head
``bh`` and the ``s``-th of ``S`` equal slices of the ``n`` stored positions, and runs all
``GROUP * Lq`` query rows that read that KV head (the GQA group's ``Hq / Hkv`` heads times the
``Lq`` new tokens) against it with an online softmax in float32. ``S`` is a static function of the
cache capacity, the number of (sequence, KV head) pairs and the device, never of ``n``: slice
bounds are computed in the kernel from ``n``, so the launch is CUDA-graph safe. With ``S == 1``
the program writes the normalised output directly.

Stage 2, :func:`_attend_merge_kernel`, grid ``(b * Hkv * GROUP * Lq,)``: one program per query row
merges the ``S`` partial ``(max, sum, acc)`` triples.

Positions ``[0, n)`` split into: ``[0, Nv)`` keys and values from codes, ``[Nv, Nk)`` keys from
codes and values from the ring, ``[Nk, n)`` both from the ring (``Nk - Nv < G``, ``n - Nk <= R``).
Blocks that lie entirely below ``Nv`` take a fast path with no ring loads and no masking (query
row ``i`` sees positions up to ``n - Lq + i >= Nv`` because ``Lq <= R``); the rest take the mixed
path.

Performance (H200, Triton 3.6, ``benchmarks/results/attention.md``): the kernel reads the packed
cache at 0.35-0.55 TB/s, 0.55-0.8x the speed of bf16 SDPA over a 5-6x larger cache. It is bound by
instruction issue, not memory: the unpacked tile is held one channel per thread, so every
dequantized element costs about 11 SASS instructions, among them a 2-byte shared-memory store
on its way to the mma operand layout, at two programs per SM (213 registers). Reaching the memory
roofline needs the codes unpacked straight into the mma fragment layout (two elements per
instruction, as weight-only GEMM kernels do), which Triton's layout choice does not give here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .common import check_bits, check_pow2, codes_to_float, interpreting, launch, round_to

_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
MAX_QUERY_LEN = 16


@triton.jit
def _dot_operand(x, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """float32 ``x`` rounded to the cache dtype, as a ``DOT_DTYPE`` dot operand. Under the
    interpreter (``DOT_DTYPE`` float32 for a bfloat16 cache) the rounding is done exactly, since the
    interpreter's own bfloat16 conversion truncates."""
    if DOT_DTYPE == KV_DTYPE:
        return x.to(KV_DTYPE)
    else:
        return round_to(x, KV_DTYPE).to(DOT_DTYPE)


@triton.jit
def _load_keys(
    kc_base, ks_base, kz_base, kw_base,
    s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd,
    start, nk, n,
    KB: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DK: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Keys of positions ``start .. start + BLOCK_N - 1``: ``[BLOCK_N, DK]`` in ``DOT_DTYPE``.

    Each code word is loaded once (``[KW, DK]``, ``KW = BLOCK_N * KB / 32``), expanded in
    registers to ``[KW, 32 / KB, DK]`` (token ``w * 32 / KB + i`` from bits ``i * KB``),
    dequantized with its group's scale / zero point (broadcast along the expanded axis) and
    reshaped to ``[BLOCK_N, DK]``. Fast path: all from codes. Mixed: codes below ``nk``, ring
    slot ``pos % R`` in ``[nk, n)``, 0 past ``n`` (finite filler for masked scores).
    """
    PER: tl.constexpr = 32 // KB  # tokens per code word
    KW: tl.constexpr = BLOCK_N // PER  # code words per channel in the block
    dk = tl.arange(0, DK)
    wrow = start // PER + tl.arange(0, KW)  # [KW]
    kc_ptrs = kc_base + wrow[:, None] * s_kct + dk[None, :] * s_kcd  # [KW, DK]
    ks_off = (wrow * PER // G)[:, None] * s_kst + dk[None, :] * s_ksd  # the group of each word
    if MIXED:
        # Nk is a multiple of G, so no word straddles it.
        coded = (wrow * PER < nk)[:, None] & (dk[None, :] >= 0)
        words = tl.load(kc_ptrs, mask=coded, other=0)
        scale = tl.load(ks_base + ks_off, mask=coded, other=0.0).to(tl.float32)
        zero = tl.load(kz_base + ks_off, mask=coded, other=0.0).to(tl.float32)
    else:
        words = tl.load(kc_ptrs)
        scale = tl.load(ks_base + ks_off).to(tl.float32)
        zero = tl.load(kz_base + ks_off).to(tl.float32)
    shifts = (tl.arange(0, PER) * KB)[None, :, None]
    codes = (words[:, None, :] >> shifts) & ((1 << KB) - 1)  # [KW, PER, DK]
    keys = codes_to_float(codes) * scale[:, None, :] + zero[:, None, :]
    keys = tl.reshape(_dot_operand(keys, KV_DTYPE, DOT_DTYPE), (BLOCK_N, DK))
    if MIXED:
        pos = start + tl.arange(0, BLOCK_N)
        in_ring = (pos >= nk) & (pos < n)
        ring = tl.load(kw_base + (pos % R)[:, None] * s_kwt + dk[None, :] * s_kwd,
                       mask=in_ring[:, None] & (dk[None, :] >= 0), other=0.0)
        keys = tl.where((pos < nk)[:, None], keys, ring.to(DOT_DTYPE))
    return keys


@triton.jit
def _load_values(
    vc_base, vs_base, vz_base, vw_base,
    s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd,
    start, nv, n,
    VB: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Values of positions ``start .. start + BLOCK_N - 1``: ``[BLOCK_N, DV]`` in ``DOT_DTYPE``.

    Words ``[BLOCK_N, VW]`` (``VW = DV * VB / 32``) expand to ``[BLOCK_N, VW, 32 / VB]`` (channel
    ``w * 32 / VB + i``), dequantized with the scale / zero point of each word's channel group,
    then reshaped. Codes below ``nv``, ring in ``[nv, n)``, 0 past ``n`` (fast path: all codes).
    """
    PER: tl.constexpr = 32 // VB  # channels per code word
    VW: tl.constexpr = DV // PER  # code words per token
    pos = start + tl.arange(0, BLOCK_N)
    wcol = tl.arange(0, VW)
    vc_ptrs = vc_base + pos[:, None] * s_vct + wcol[None, :] * s_vcd  # [BLOCK_N, VW]
    vs_off = pos[:, None] * s_vst + (wcol * PER // G)[None, :] * s_vsd  # the group of each word
    if MIXED:
        coded = (pos < nv)[:, None] & (wcol[None, :] >= 0)
        words = tl.load(vc_ptrs, mask=coded, other=0)
        scale = tl.load(vs_base + vs_off, mask=coded, other=0.0).to(tl.float32)
        zero = tl.load(vz_base + vs_off, mask=coded, other=0.0).to(tl.float32)
    else:
        words = tl.load(vc_ptrs)
        scale = tl.load(vs_base + vs_off).to(tl.float32)
        zero = tl.load(vz_base + vs_off).to(tl.float32)
    shifts = (tl.arange(0, PER) * VB)[None, None, :]
    codes = (words[:, :, None] >> shifts) & ((1 << VB) - 1)  # [BLOCK_N, VW, PER]
    values = codes_to_float(codes) * scale[:, :, None] + zero[:, :, None]
    values = tl.reshape(_dot_operand(values, KV_DTYPE, DOT_DTYPE), (BLOCK_N, DV))
    if MIXED:
        dv = tl.arange(0, DV)
        in_ring = (pos >= nv) & (pos < n)
        ring = tl.load(vw_base + (pos % R)[:, None] * s_vwt + dv[None, :] * s_vwd,
                       mask=in_ring[:, None] & (dv[None, :] >= 0), other=0.0)
        values = tl.where((pos < nv)[:, None], values, ring.to(DOT_DTYPE))
    return values


@triton.jit
def _attend_block(
    q, m_i, l_i, acc, qpos,
    kc_base, ks_base, kz_base, kw_base, vc_base, vs_base, vz_base, vw_base,
    s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd,
    s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd,
    start, nk, nv, n, qk_scale,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MIXED: tl.constexpr,
    TRANSPOSED: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over ``BLOCK_N`` positions for the ``BLOCK_M`` query rows.

    ``m_i`` / ``l_i [BLOCK_M]``: running max (log2 units) and sum; ``qpos [BLOCK_M]``: each row's
    position (causal limit). Keys and values are rounded to the cache dtype (as ``read_keys`` /
    ``read_values`` return them) and multiplied on the tensor cores with float32 accumulation
    (operands in ``DOT_DTYPE``: the cache dtype, or float32 where the interpreter cannot multiply
    bfloat16).

    ``TRANSPOSED`` computes ``S^T = K q^T`` and ``O^T = V^T P^T`` (``q [DK, BLOCK_M]``,
    ``acc [DV, BLOCK_M]``): the dequantized tiles are the left operands, with ``BLOCK_N`` rows,
    which lets Hopper take them from registers (wgmma) instead of shared memory. Otherwise
    ``q [BLOCK_M, DK]``, ``acc [BLOCK_M, DV]``.
    """
    keys = _load_keys(kc_base, ks_base, kz_base, kw_base, s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd,
                      start, nk, n, KB, G, R, DK, BLOCK_N, MIXED, KV_DTYPE, DOT_DTYPE)  # [BLOCK_N, DK]
    values = _load_values(vc_base, vs_base, vz_base, vw_base, s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd,
                          start, nv, n, VB, G, R, DV, BLOCK_N, MIXED, KV_DTYPE, DOT_DTYPE)  # [BLOCK_N, DV]
    if TRANSPOSED:
        scores = tl.dot(keys, q, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if MIXED:
            pos = start + tl.arange(0, BLOCK_N)
            scores = tl.where(pos[:, None] <= qpos[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        # A row with nothing visible yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(scores - m_ref[None, :])  # [BLOCK_N, BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        p = _dot_operand(p, KV_DTYPE, DOT_DTYPE)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(values), p, input_precision=DOT_PRECISION)
    else:
        scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MIXED:
            pos = start + tl.arange(0, BLOCK_N)
            scores = tl.where(pos[None, :] <= qpos[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(scores - m_ref[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = _dot_operand(p, KV_DTYPE, DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p, values, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_split_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    # q [b, Hq, Lq, DK]; out [b, Hq, Lq, DV]
    s_qb, s_qh, s_ql, s_qd,
    s_ob, s_oh, s_ol, s_od,
    # k_codes [B, H, Tq*KB/32, DK]; k_scale / k_zero [B, H, Tq/G, DK]; k_window [B, H, R, DK]
    s_kcb, s_kch, s_kct, s_kcd,
    s_ksb, s_ksh, s_kst, s_ksd,
    s_kwb, s_kwh, s_kwt, s_kwd,
    # v_codes [B, H, Tq, DV*VB/32]; v_scale / v_zero [B, H, Tq, DV/G]; v_window [B, H, R, DV]
    s_vcb, s_vch, s_vct, s_vcd,
    s_vsb, s_vsh, s_vst, s_vsd,
    s_vwb, s_vwh, s_vwt, s_vwd,
    num_kv_heads, num_splits, qk_scale,
    LQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    TRANSPOSED: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(b * Hkv, S)``; see the module docstring. ``TRANSPOSED``: product orientation, see
    :func:`_attend_block`.

    Partials (``S > 1``): ``part_acc [b * Hkv, S, GROUP * Lq, DV]`` unnormalised output and
    ``part_ml [b * Hkv, S, 2, GROUP * Lq]`` running max (log2 units) and sum, float32. Query row
    ``r`` of the block is head ``kv_head * GROUP + r // Lq``, new token ``r % Lq``.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    bi = (pid_bh // num_kv_heads).to(tl.int64)
    hi = (pid_bh % num_kv_heads).to(tl.int64)
    KV_DTYPE: tl.constexpr = kw_ptr.dtype.element_ty
    M: tl.constexpr = GROUP * LQ

    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor's launcher may pass float64
    n = tl.load(n_ptr).to(tl.int32)
    nv = tl.maximum(n - R, 0)
    nk = (nv + G - 1) // G * G

    rows = tl.arange(0, BLOCK_M)
    head = hi * GROUP + rows // LQ
    qi = rows % LQ
    qpos = n - LQ + qi  # [BLOCK_M]
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    q_ptrs = q_ptr + bi * s_qb + head[:, None] * s_qh + qi[:, None] * s_ql + dk[None, :] * s_qd
    q = tl.load(q_ptrs, mask=(rows < M)[:, None] & (dk[None, :] >= 0), other=0.0)  # [BLOCK_M, DK]
    q = q.to(KV_DTYPE).to(DOT_DTYPE)
    if TRANSPOSED:
        q = tl.trans(q)  # [DK, BLOCK_M]

    kc_base = kc_ptr + bi * s_kcb + hi * s_kch
    ks_base = ks_ptr + bi * s_ksb + hi * s_ksh
    kz_base = kz_ptr + bi * s_ksb + hi * s_ksh
    kw_base = kw_ptr + bi * s_kwb + hi * s_kwh
    vc_base = vc_ptr + bi * s_vcb + hi * s_vch
    vs_base = vs_ptr + bi * s_vsb + hi * s_vsh
    vz_base = vz_ptr + bi * s_vsb + hi * s_vsh
    vw_base = vw_ptr + bi * s_vwb + hi * s_vwh

    # This split's slice [lo, hi) of [0, n), in whole blocks.
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi_pos = tl.minimum(lo + chunk, n)
    fast_end = tl.maximum(lo, lo + (tl.minimum(hi_pos, nv) - lo) // BLOCK_N * BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if TRANSPOSED:
        acc = tl.zeros((DV, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, DV), tl.float32)
    for start in range(lo, fast_end, BLOCK_N):
        m_i, l_i, acc = _attend_block(
            q, m_i, l_i, acc, qpos,
            kc_base, ks_base, kz_base, kw_base, vc_base, vs_base, vz_base, vw_base,
            s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd, s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd,
            start, nk, nv, n, qk_scale,
            KB, VB, G, R, DK, DV, BLOCK_N, False, TRANSPOSED, KV_DTYPE, DOT_DTYPE, DOT_PRECISION,
        )
    for start in range(fast_end, hi_pos, BLOCK_N):
        m_i, l_i, acc = _attend_block(
            q, m_i, l_i, acc, qpos,
            kc_base, ks_base, kz_base, kw_base, vc_base, vs_base, vz_base, vw_base,
            s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd, s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd,
            start, nk, nv, n, qk_scale,
            KB, VB, G, R, DK, DV, BLOCK_N, True, TRANSPOSED, KV_DTYPE, DOT_DTYPE, DOT_PRECISION,
        )

    if TRANSPOSED:
        acc = tl.trans(acc)  # [BLOCK_M, DV]
    row_ok = rows < M
    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + bi * s_ob + head[:, None] * s_oh + qi[:, None] * s_ol + dv[None, :] * s_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] >= 0))
    else:
        part = pid_bh.to(tl.int64) * num_splits + split
        a_ptrs = part_acc_ptr + (part * M + rows[:, None]) * DV + dv[None, :]
        tl.store(a_ptrs, acc, mask=row_ok[:, None] & (dv[None, :] >= 0))
        tl.store(part_ml_ptr + part * 2 * M + rows, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 * M + M + rows, l_i, mask=row_ok)


@triton.jit
def _attend_merge_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr,
    s_ob, s_oh, s_ol, s_od,
    num_kv_heads, num_splits,
    LQ: tl.constexpr, GROUP: tl.constexpr, DV: tl.constexpr, SPLITS_POW2: tl.constexpr,
):
    """Grid ``(b * Hkv * GROUP * Lq,)``: program ``pid`` merges the ``S`` partials of query row
    ``pid % (GROUP * Lq)`` of (sequence, KV head) ``pid // (GROUP * Lq)`` into ``out``."""
    M: tl.constexpr = GROUP * LQ
    pid = tl.program_id(0)
    bh = (pid // M).to(tl.int64)
    r = pid % M
    bi = bh // num_kv_heads
    head = (bh % num_kv_heads) * GROUP + r // LQ
    qi = r % LQ
    s = tl.arange(0, SPLITS_POW2)
    dv = tl.arange(0, DV)
    ok = s < num_splits
    part = bh * num_splits + s  # [S]
    m = tl.load(part_ml_ptr + part * 2 * M + r, mask=ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 * M + M + r, mask=ok, other=0.0)
    acc = tl.load(part_acc_ptr + (part * M + r)[:, None] * DV + dv[None, :],
                  mask=ok[:, None] & (dv[None, :] >= 0), other=0.0)  # [S, DV]
    m_max = tl.max(m, axis=0)  # finite: every row sees position 0
    w = tl.math.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + bi * s_ob + head * s_oh + qi * s_ol + dv * s_od, out.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------ launch
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Fewest positions a split is given (at capacity): below this a split's fixed cost dominates.
MIN_SPLIT_TOKENS = 256
#: Programs per multiprocessor that stage 1 aims at, so that slices of uneven cost even out.
WAVES = 4
#: Multiprocessors assumed by the CPU interpreter (keeps interpreted runs small but split).
INTERPRETER_SMS = 2


def _workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uninitialised float32 buffer for the split partials (every element is written)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def num_splits(batch_kv_heads: int, capacity: int, device: torch.device) -> int:
    """Sequence slices per (sequence, KV head): enough programs to fill the GPU ``WAVES`` times,
    at most one per ``MIN_SPLIT_TOKENS`` positions of ``capacity``. Static: independent of ``n``."""
    device = torch.device(device)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else INTERPRETER_SMS
    want = math.ceil(WAVES * sms / batch_kv_heads)
    return max(1, min(want, math.ceil(capacity / MIN_SPLIT_TOKENS)))


@dataclasses.dataclass(frozen=True)
class AttendConfig:
    """Launch configuration of stage 1: positions per iteration, warps, software-pipelining
    stages, and the product orientation (see :func:`_attend_block`)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    transposed: bool = False


def block_config(block_m: int, dk: int, dv: int) -> AttendConfig:
    """Stage-1 configuration for ``block_m`` (padded) query rows and the head dims."""
    # Measured on an H200 (K2/V1, head_dim 128, GQA 4, Lq 1, batch 1 / 8 / 32): 64 positions,
    # 4 warps, 2 stages led at batch 8 and 32 (3 stages: +8% at batch 1, -15% at batch 8);
    # 128 positions or 8 warps were 1.3-2x slower, the transposed (wgmma) product 1.2-1.3x.
    if block_m >= 64 or max(dk, dv) > 128:
        return AttendConfig(block_n=64, num_warps=8, num_stages=2)
    return AttendConfig(block_n=64, num_warps=4, num_stages=2)


def attend(
    q: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, k_window: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, v_window: torch.Tensor,
    n: torch.Tensor,
    k_bits: int, v_bits: int, group: int, scale: float,
    *, splits: int | None = None, out: torch.Tensor | None = None, config: AttendConfig | None = None,
) -> torch.Tensor:
    """Decode attention of ``q [b, Hq, Lq, Dk]`` (positions ``n - Lq .. n - 1``, causal among
    them) over a quantized layer; returns ``out [b, Hq, Lq, Dv]`` in ``q.dtype``.

    Storage as in :mod:`xquant_fx.cache` (batch ``>= b``, ``Hkv`` KV heads with ``Hq % Hkv == 0``);
    a sharing layer passes its partner's ``k_codes`` / ``v_codes``. ``n`` is a 0-d int64 device
    tensor. ``splits`` overrides :func:`num_splits`; ``out`` receives the result; ``config``
    overrides :func:`block_config` (tests, benchmarks).
    """
    check_bits("k_bits", k_bits)
    check_bits("v_bits", v_bits)
    b, hq, lq, dk = q.shape
    hkv, R, dv = v_window.shape[1], v_window.shape[2], v_window.shape[3]
    if not 1 <= lq <= MAX_QUERY_LEN:
        raise ValueError(f"attend handles 1..{MAX_QUERY_LEN} query tokens, got {lq}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k_window.shape[-1] != dk:
        raise ValueError(f"q head_dim {dk} does not match the key head_dim {k_window.shape[-1]}")
    if q.dtype != k_window.dtype or q.dtype != v_window.dtype:
        raise ValueError(f"q is {q.dtype} but the cache holds {k_window.dtype}")
    for name, value in (("head_dim (keys)", dk), ("head_dim (values)", dv), ("group_size", group)):
        check_pow2(name, value)
    if dv % group or group * k_bits % 32:
        raise ValueError(f"group_size={group} does not tile value head_dim {dv} / {k_bits}-bit key words")
    if k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        raise ValueError("attend: scale and zero-point tensors must share strides")
    if lq > R:
        raise ValueError(f"{lq} query tokens exceed the residual window R={R}")

    group_rows = hq // hkv * lq
    block_m = max(16, triton.next_power_of_2(group_rows))
    cfg = config or block_config(block_m, dk, dv)
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1) or cfg.block_n * k_bits < 32:
        raise ValueError(f"block_n={cfg.block_n}: a power of two >= 16 holding whole {k_bits}-bit key words")
    capacity = v_scale.shape[2] + R  # positions the cache can hold (>= max_cache_len)
    splits = splits or num_splits(b * hkv, capacity, q.device)

    if out is None:
        out = torch.empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    if splits > 1:
        part_acc = _workspace((b * hkv, splits, group_rows, dv), q.device)
        part_ml = _workspace((b * hkv, splits, 2, group_rows), q.device)
    else:  # unused: the single split writes `out`
        part_acc = part_ml = out
    qk_scale = scale * _LOG2E
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 caches: no TF32 rounding
    # Triton's interpreter multiplies bfloat16 dot operands as raw integers: give it float32.
    dot_dtype = torch.float32 if interpreting() and q.dtype == torch.bfloat16 else q.dtype
    launch(_attend_split_kernel)[(b * hkv, splits)](
        q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n,
        out, part_acc, part_ml,
        *q.stride(), *out.stride(),
        *k_codes.stride(), *k_scale.stride(), *k_window.stride(),
        *v_codes.stride(), *v_scale.stride(), *v_window.stride(),
        hkv, splits, qk_scale,
        LQ=lq, GROUP=hq // hkv, BLOCK_M=block_m,
        KB=k_bits, VB=v_bits, G=group, R=R, DK=dk, DV=dv, BLOCK_N=cfg.block_n,
        TRANSPOSED=cfg.transposed, SINGLE_SPLIT=splits == 1, DOT_DTYPE=_TL_DTYPES[dot_dtype], DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        launch(_attend_merge_kernel)[(b * hkv * group_rows,)](
            out, part_acc, part_ml,
            *out.stride(),
            hkv, splits,
            LQ=lq, GROUP=hq // hkv, DV=dv, SPLITS_POW2=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return out
