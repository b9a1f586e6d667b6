"""Flash-decoding attention over the packed quantized KV cache.

Computes ``quant.attend(q, quant.read_keys(...), quant.read_values(...), n, scale, mask)`` without
materialising the dequantized cache: each code word is read once and dequantized in registers;
positions at or past the key / value boundary come from the full-precision ring window.

Three launches (two for ``mma`` at small capacities, below), all with shape-only grids (``n`` is read on the device, the split count is a
function of capacity, batch and device: CUDA-graph safe; counts are not specialized on, so a new
batch size or split count does not recompile, and the host code takes the batch through
arithmetic only, so that under ``torch.compile`` with a dynamic batch one graph serves every
batch size):

1. Stage 1, :func:`_attend_kernel`, grid ``(b * Hkv, S)``: the blocks of ``BLOCK_N`` positions
   below ``F = Nv // BLOCK_N * BLOCK_N``, where keys and values all come from codes, cut into
   ``S`` slices. Program ``(bh, s)`` runs the ``GROUP * Lq`` query rows of KV head ``bh`` (padded
   to ``BLOCK_M``) over slice ``s`` with an online softmax in float32 and writes a partial
   ``(acc, max, sum)``. No masked loads, no ring reads, no causal test: the fast path only.
2. Stage 2, the same :func:`_attend_kernel` with ``STAGE=2``, grid ``(b * Hkv, T)``: the ``< R +
   BLOCK_N`` positions ``[F, n)`` (codes next to the boundaries, the ring, the causal edge), one
   ``TAIL_BLOCK_N`` block per program, as partials ``S .. S + T - 1``. A separate compilation (the
   ``STAGE`` branch is a constant) because the two-source, masked blocks need many more
   registers than stage 1's loop; compiled into one program they would set the occupancy of both
   (255 registers instead of 162). The ``mma`` variant runs stage 2 as the first ``T`` programs of
   its own stage-1 launch up to ``MMA_TAIL_PROGRAMS_CAPACITY`` positions of cache
   (:func:`mma_tail_programs`, :func:`_attend_mma_kernel`): there its one-warp program already
   holds ~240 registers, so the tail's code costs 255 and a few spill reloads in the loop, which
   pay where the loops are short (the launch and the wait for it gone: 1 / 4k 18.1 against 21.9
   µs) and not where they are long (3-10% slower from ~1k positions a split; run 47).
3. Stage 3, :func:`_attend_merge_kernel`, grid ``(b * Hkv * GROUP * Lq,)``: merges the ``S + T``
   partials of one query row, ``MERGE_BLOCK`` at a time (their count is a run-time value).

Variants of stage 1 (``attend(..., variant=)``, :data:`VARIANTS`; the default,
:func:`default_variant`, is ``mma`` wherever it fits, else ``warps-t`` for 16-bit caches with at
most 16 query rows per KV head, ``packed`` above, ``generic`` for float32):

* ``mma`` (:mod:`~xquant_fx.kernels.attend_mma`): raw codes straight into ``mma.sync``
  register fragments (``prmt`` + ``lop3``, no dequantizing multiply, no shared-memory transpose),
  key scales folded into ``q``, value scales into ``P``, one partial per warp, loads pipelined by
  hand one phase ahead; 16-bit caches, G = 32 (value groups too), 1-2 bit codes, at most 8 query
  rows, no mask or one that the query rows of a KV head share (a model's decode mask).
  Run 40 (``benchmarks/NOTES.md``, H100) checked it against the reference on the GPU, with and
  without the decode mask, and measured it ahead of ``warps-t`` at every shape (batch 1-32,
  4k-128k; batch 8, 128k: 509 against 626 µs, 2.76x cuDNN bf16 SDPA), so it is the default
  wherever it fits.

* ``warps-t``: each of the ``W`` warps takes its own sub-block of ``BLOCK_N / W``
  positions with its own running max / sum / accumulator (a leading batch axis of size ``W``,
  which Triton maps one batch per warp in a 3-d ``tl.dot``), combined once at the end. Nothing
  crosses warps in the softmax, and each warp's products are m16n8k16 ``mma`` with the
  dequantized tile as one operand, transposed (``-t``: ``S^T = K q^T``, ``O^T = V^T P^T``, so the
  query rows are the n8 side: ``BLOCK_M`` pads ``GROUP * Lq`` to 8, not 16, halving the
  accumulator).
* ``packed``: all warps share one block (the layout of the first kernel), same dequantization,
  ``S = q K^T``. Used when the rows do not fit a per-warp accumulator (``GROUP * Lq > 16``).
* ``generic``: the first kernel's element-wise dequantization in float32 (any cache dtype), kept
  for float32 caches.

Each variant is the default of some layout; the orientations and warp splits no default used
(``warps``, ``packed-t``, ``generic-t``) were removed after run 40.

Why it is built this way: the first kernel read the cache at 0.35-0.55 TB/s, 0.55-0.8x bf16 SDPA
(``benchmarks/results/attention.md``), because it issued ~89 warp instructions per (position, KV
head) (offline sm_90 compile, Triton 3.6): ~11 per dequantized element, among them a 2-byte
shared-memory store into the mma operand layout. The packed variants cut that as follows:

* Two codes per instruction. A code word's two 16-bit halves hold codes ``j`` and ``j + 16 / B``;
  ``lop3`` masks both and ORs in the bit pattern of ``2^(MANT - k)`` (the code sits at mantissa bit
  ``k``), which makes each half the 16-bit float ``2^(MANT - k) + code`` exactly; one packed
  ``add`` removes the magic and one packed ``fma`` applies the scale and zero point, both
  broadcast from 16-bit registers (``.H0_H0``). Three instructions per two elements, no
  int-to-float conversion; ``MANT / B`` slots share one shift
  (:func:`~xquant_fx.kernels.common.decode_pairs`, PTX through ``tl.inline_asm_elementwise``;
  the interpreter decodes the same bit patterns in float32). The result equals
  ``read_keys`` / ``read_values`` up to the bfloat16 rounding of ``code * s + z`` (one rounding
  instead of the reference's two).
* No repacking. The decoded pair stays in one 32-bit register and sits in adjacent tile slots
  (positions permuted within a word for keys, channels for values,
  :func:`~xquant_fx.kernels.common.pair_order`; values' rows and the output columns follow the
  same maps), so tiles reach shared memory in 16-byte stores and the tensor cores through
  ``ldmatrix``.
* Lazy rescaling. The running max moves only when a score exceeds it by more than 2^8
  (``RESCALE_THRESHOLD``, one uniform branch per block); sums are kept per thread and reduced
  once. The accumulator rescale and the per-block row reductions leave the common path.
* Every stage-1 load is staged by cp.async (value rows, a few words long, get their row stride
  as a constant so Triton knows them aligned); a mask shared by all of a program's rows (the
  usual ``[b, 1, 1, M]`` decode mask) is read contiguously one block ahead.

Result (offline sm_90 compile, Triton 3.6, K2/V1, head_dim 128, GQA 4, stage-1 loop): ~29 warp
instructions per (position, KV head) for ``warps-t`` at 16 positions per warp (162 registers, 3
programs per SM), ~26 at 32 (227, 2), ``warps`` ~30 (226), ``packed`` ~38 (168), ``generic`` ~70;
of these ~12 are the dequantization itself (3 per pair), ~4 shared-memory traffic and barriers,
~4 register moves Triton inserts around ``ldmatrix`` / ``mma``, ~2 the softmax. What the GPU
makes of it is in ``benchmarks/NOTES.md``.

Not done, with reasons: folding the key scale into ``q`` per group (``q' = q * s``) costs as much
as it saves here, because the padded query tile is replicated in every warp; a CUDA-core product
(no ``tl.dot``) needs ``GROUP`` FMAs per element, well above the three instructions per pair
spent now; Hopper's ``wgmma`` (the 2-d ``-t`` variants) reads operands from shared memory, but
Triton stores the decoded tile into its swizzled layout two bytes at a time.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math

import torch
import triton
import triton.language as tl

from ..quant import value_group
from . import attend_mma
from .attend_mma import _stage1_program
from .common import (apply_mask, check_bits, check_metadata, check_pow2, codes_to_float, decode_pairs, head_bases,
                     interpreting, launch, load_mask, mask_values, pair_order, pair_slot_constants, round_to, seq_head)

_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
MAX_QUERY_LEN = 16

#: Kernel variants (see the module docstring), each the default of some layout
#: (:func:`default_variant`). ``mma``: raw codes into tensor-core fragments; ``warps-t`` /
#: ``packed``: two codes dequantized per instruction (float16 / bfloat16 caches), each warp on its
#: own positions (``warps-t``, transposed products) or all warps on one block (``packed``);
#: ``generic``: one element at a time in float32 (any dtype; the float32 path).
VARIANTS = ("mma", "warps-t", "packed", "generic")
#: Most query rows (``Hq / Hkv * Lq``, padded) ``warps-t`` takes: every warp holds its own
#: accumulator of that many rows.
WARPS_MAX_ROWS = 16


# ------------------------------------------------------------------------------------ generic tiles
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
def _load_if(ptrs, ok, other, MIXED: tl.constexpr):
    """``tl.load(ptrs)``; in a ``MIXED`` block masked by ``ok`` (``other`` elsewhere)."""
    if MIXED:
        return tl.load(ptrs, mask=ok, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_coded(c_ptrs, s_base, z_base, s_off, c_ok, s_ok, MIXED: tl.constexpr, META_DTYPE: tl.constexpr):
    """Code words at ``c_ptrs`` and their scales / zero points at ``s_off`` from ``s_base`` /
    ``z_base`` (in ``META_DTYPE``): ``(words, scale, zero)``. In a ``MIXED`` block only where coded
    (``c_ok`` / ``s_ok``), zeros elsewhere."""
    words = _load_if(c_ptrs, c_ok, 0, MIXED)
    scale = _load_if(s_base + s_off, s_ok, 0.0, MIXED).to(META_DTYPE)
    zero = _load_if(z_base + s_off, s_ok, 0.0, MIXED).to(META_DTYPE)
    return words, scale, zero


@triton.jit
def _load_keys(
    kt, start, nk, n,
    KB: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DK: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Keys of positions ``start .. start + BLOCK_N - 1``: ``[BLOCK_N, DK]`` in ``DOT_DTYPE``.
    ``kt``: the keys' storage of this (sequence, head), :func:`_storage_view`.

    Each code word is loaded once (``[KW, DK]``, ``KW = BLOCK_N * KB / 32``), expanded in
    registers to ``[KW, 32 / KB, DK]`` (token ``w * 32 / KB + i`` from bits ``i * KB``),
    dequantized in float32 with its group's scale / zero point and reshaped to ``[BLOCK_N, DK]``.
    Fast path: all from codes. Mixed: codes below ``nk``, ring slot ``pos % R`` in ``[nk, n)``,
    0 past ``n`` (finite filler for masked scores).
    """
    kc_base, ks_base, kz_base, kw_base, s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd = kt
    PER: tl.constexpr = 32 // KB  # tokens per code word
    KW: tl.constexpr = BLOCK_N // PER  # code words per channel in the block
    dk = tl.arange(0, DK)
    wrow = start // PER + tl.arange(0, KW)  # [KW]
    kc_ptrs = kc_base + wrow[:, None] * s_kct + dk[None, :] * s_kcd  # [KW, DK]
    ks_off = (wrow * PER // G)[:, None] * s_kst + dk[None, :] * s_ksd  # the group of each word
    # Nk is a multiple of G, so no word straddles it.
    coded = (wrow * PER < nk)[:, None] & (dk[None, :] >= 0) if MIXED else None
    words, scale, zero = _load_coded(kc_ptrs, ks_base, kz_base, ks_off, coded, coded, MIXED, tl.float32)
    shifts = (tl.arange(0, PER) * KB)[None, :, None]
    codes = (words[:, None, :] >> shifts) & ((1 << KB) - 1)  # [KW, PER, DK]
    keys = codes_to_float(codes) * scale[:, None, :] + zero[:, None, :]
    keys = tl.reshape(_dot_operand(keys, KV_DTYPE, DOT_DTYPE), (BLOCK_N, DK))
    if MIXED:
        keys = _with_ring(keys, start + tl.arange(0, BLOCK_N), nk, n, kw_base, s_kwt, s_kwd, R, DK, DOT_DTYPE)
    return keys


@triton.jit
def _with_ring(x, pos, lo, n, w_base, s_wt, s_wd, R: tl.constexpr, D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``x [BLOCK_N, D]`` (dequantized codes at positions ``pos``) with positions in ``[lo, n)``
    taken from the full-precision ring (slot ``pos % R``) and positions past ``n`` zero."""
    d = tl.arange(0, D)
    in_ring = (pos >= lo) & (pos < n)
    ring = tl.load(w_base + (pos % R)[:, None] * s_wt + d[None, :] * s_wd,
                   mask=in_ring[:, None] & (d[None, :] >= 0), other=0.0)
    return tl.where((pos < lo)[:, None], x, ring.to(DOT_DTYPE))


@triton.jit
def _load_values(
    vt, start, nv, n,
    VB: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Values of positions ``start .. start + BLOCK_N - 1``: ``[BLOCK_N, DV]`` in ``DOT_DTYPE``
    (``vt``: the values' storage, :func:`_storage_view`).

    Words ``[BLOCK_N, VW]`` (``VW = DV * VB / 32``) expand to ``[BLOCK_N, VW, 32 / VB]`` (channel
    ``w * 32 / VB + i``), dequantized with the scale / zero point of each word's channel group,
    then reshaped. Codes below ``nv``, ring in ``[nv, n)``, 0 past ``n`` (fast path: all codes).
    """
    vc_base, vs_base, vz_base, vw_base, s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd = vt
    PER: tl.constexpr = 32 // VB  # channels per code word
    VW: tl.constexpr = DV // PER  # code words per token
    pos = start + tl.arange(0, BLOCK_N)
    wcol = tl.arange(0, VW)
    vc_ptrs = vc_base + pos[:, None] * s_vct + wcol[None, :] * s_vcd  # [BLOCK_N, VW]
    # The group of each word, or (G < PER) of each channel.
    GW: tl.constexpr = 1 if G >= PER else PER
    ch = (wcol * PER)[None, :, None] + tl.arange(0, GW)[None, None, :]  # [1, VW, GW]
    vs_off = pos[:, None, None] * s_vst + (ch // G) * s_vsd  # [BLOCK_N, VW, GW]
    coded = (pos < nv)[:, None] & (wcol[None, :] >= 0) if MIXED else None
    words, scale, zero = _load_coded(vc_ptrs, vs_base, vz_base, vs_off, coded, coded[:, :, None] if MIXED else None,
                                     MIXED, tl.float32)
    shifts = (tl.arange(0, PER) * VB)[None, None, :]
    codes = (words[:, :, None] >> shifts) & ((1 << VB) - 1)  # [BLOCK_N, VW, PER]
    values = codes_to_float(codes) * scale + zero
    values = tl.reshape(_dot_operand(values, KV_DTYPE, DOT_DTYPE), (BLOCK_N, DV))
    if MIXED:
        values = _with_ring(values, pos, nv, n, vw_base, s_vwt, s_vwd, R, DV, DOT_DTYPE)
    return values


# ------------------------------------------------------------------------------------ packed tiles
@triton.jit
def _with_ring_packed(x, pos, lo, n, w_base, s_wt, s_wd, chan, R: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                      DOT_DTYPE: tl.constexpr):
    """:func:`_with_ring` for ``W`` sub-blocks: ``x [W, BN, D]`` (``[W, D, BN]`` with
    ``CHANNELS_FIRST``) at positions ``pos [W, BN]``, column ``c`` channel ``chan[c]``; positions
    in ``[lo, n)`` from ring slot ``pos % R``, past ``n`` zero."""
    in_ring = (pos >= lo) & (pos < n)
    if CHANNELS_FIRST:
        ring = tl.load(w_base + (pos % R)[:, None, :] * s_wt + chan[None, :, None] * s_wd,
                       mask=in_ring[:, None, :] & (chan[None, :, None] >= 0), other=0.0)
        x = tl.where((pos < lo)[:, None, :], x, ring.to(DOT_DTYPE))
    else:
        ring = tl.load(w_base + (pos % R)[:, :, None] * s_wt + chan[None, None, :] * s_wd,
                       mask=in_ring[:, :, None] & (chan[None, None, :] >= 0), other=0.0)
        x = tl.where((pos < lo)[:, :, None], x, ring.to(DOT_DTYPE))
    return x


@triton.jit
def _load_keys_packed(
    kt, start, nk, n,
    KB: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DK: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
    MIXED: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
    KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Keys of ``W`` sub-blocks of ``BN`` positions: sub-block ``w`` holds positions
    ``start + w * BN + pair_order(BN, 32 / KB)``; ``[W, BN, DK]``, or ``[W, DK, BN]`` with
    ``CHANNELS_FIRST`` (the right operand of ``q K^T``).

    Words ``[W, KW, DK]`` expand to ``[W, KW, NS, DK]`` int32 (``NS = 16 / KB`` slots, each a pair
    of tokens ``j`` and ``j + NS`` of the word), are decoded pairwise
    (:func:`~xquant_fx.kernels.common.decode_pairs`) and joined so that the pair sits in adjacent
    tile slots along the token axis: each thread then holds runs of consecutive tile slots, which
    reach the tensor cores through 16-byte shared memory stores and ``ldmatrix`` with no
    repacking. A word's tokens share one group, so its scale and zero point are one 16-bit
    register each.
    """
    kc_base, ks_base, kz_base, kw_base, s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd = kt
    PER: tl.constexpr = 32 // KB  # tokens per code word
    NS: tl.constexpr = PER // 2  # token pairs per word
    KW: tl.constexpr = BN // PER  # code words per channel in a sub-block
    dk = tl.arange(0, DK)
    wrow = (start + tl.arange(0, W) * BN)[:, None] // PER + tl.arange(0, KW)[None, :]  # [W, KW]
    kc_ptrs = kc_base + wrow[:, :, None] * s_kct + dk[None, None, :] * s_kcd  # [W, KW, DK]
    ks_off = (wrow * PER // G)[:, :, None] * s_kst + dk[None, None, :] * s_ksd  # the group of each word
    coded = (wrow * PER < nk)[:, :, None] & (dk[None, None, :] >= 0) if MIXED else None  # Nk: a multiple of G
    words, scale, zero = _load_coded(kc_ptrs, ks_base, kz_base, ks_off, coded, coded, MIXED, KV_DTYPE)
    shift, mask, magic, neg_magic = pair_slot_constants(NS, KB, KV_DTYPE)
    x = words[:, :, None, :] >> shift[None, None, :, None]  # [W, KW, NS, DK]
    sc = scale[:, :, None, :]
    zc = zero[:, :, None, :]
    lo, hi = decode_pairs(x, mask[None, None, :, None], magic[None, None, :, None], neg_magic[None, None, :, None],
                          sc, sc, zc, zc, KV_DTYPE, DOT_DTYPE, INTERPRET)
    keys = tl.join(lo, hi)  # [W, KW, NS, DK, 2]: token w * BN + kw * PER + j + h * NS
    # Built channels-first in both orientations: the transpose is then a relabelling that keeps
    # runs of positions in each thread (16-byte shared-memory stores, ``ldmatrix.trans``).
    keys = tl.reshape(tl.permute(keys, (0, 3, 1, 2, 4)), (W, DK, BN))
    if not CHANNELS_FIRST:
        keys = tl.permute(keys, (0, 2, 1))
    if MIXED:
        pos = (start + tl.arange(0, W) * BN)[:, None] + pair_order(BN, PER)[None, :]  # [W, BN]
        keys = _with_ring_packed(keys, pos, nk, n, kw_base, s_kwt, s_kwd, dk, R, CHANNELS_FIRST, DOT_DTYPE)
    return keys


@triton.jit
def _load_values_packed(vt, pos, nv, n, VB: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DV: tl.constexpr,
                        W: tl.constexpr, BN: tl.constexpr, MIXED: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                        KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Values of positions ``pos [W, BN]``: ``[W, BN, DV]`` whose column ``c`` is channel
    ``pair_order(DV, 32 / VB)[c]``, or ``[W, DV, BN]`` with ``CHANNELS_FIRST``.

    Words ``[W, BN, NG, WPG]`` (``NG`` groups of ``WPG`` words per token) expand to
    ``[NS, W, BN, NG, WPG]`` pairs of channels ``j``, ``j + NS`` (the slot axis leads, so that each
    thread holds all slots of its words in registers: Triton spreads the trailing axes over the
    lanes), decoded and joined as the keys are, with the pair adjacent along the channel axis.
    Scales and zero points load as ``[W, BN, NG]``, a contiguous vector per token. The permuted
    channel order costs nothing: the output columns are stored through the same map.
    """
    vc_base, vs_base, vz_base, vw_base, s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd = vt
    PER: tl.constexpr = 32 // VB  # channels per code word
    NS: tl.constexpr = PER // 2  # channel pairs per word
    if G >= PER:
        # A word's channels share one group: words [W, BN, NG, WPG] (WPG words per group), the
        # group's scale and zero point [W, BN, NG], contiguous (one vector load per token).
        NG: tl.constexpr = DV // G
        WPG: tl.constexpr = G // PER
        gcol = tl.arange(0, NG)
        wcol = (gcol * WPG)[:, None] + tl.arange(0, WPG)[None, :]  # [NG, WPG]
        vc_ptrs = vc_base + pos[:, :, None, None] * s_vct + wcol[None, None, :, :] * s_vcd
        vs_off = pos[:, :, None] * s_vst + gcol[None, None, :] * s_vsd  # [W, BN, NG]
        coded = (pos < nv)[:, :, None] & (gcol[None, None, :] >= 0) if MIXED else None
        words, scale, zero = _load_coded(vc_ptrs, vs_base, vz_base, vs_off,
                                         coded[:, :, :, None] & (wcol[None, None, :, :] >= 0) if MIXED else None,
                                         coded, MIXED, KV_DTYPE)
        shift, mask, magic, neg_magic = pair_slot_constants(NS, VB, KV_DTYPE)
        x = words[None, :, :, :, :] >> shift[:, None, None, None, None]  # [NS, W, BN, NG, WPG]
        sc = scale[None, :, :, :, None]
        zc = zero[None, :, :, :, None]
        lo, hi = decode_pairs(x, mask[:, None, None, None, None], magic[:, None, None, None, None],
                              neg_magic[:, None, None, None, None], sc, sc, zc, zc,
                              KV_DTYPE, DOT_DTYPE, INTERPRET)
        # [W, BN, NG, WPG, NS, 2]: column word * PER + 2j + h holds channel word * PER + j + h * NS
        values = tl.reshape(tl.permute(tl.join(lo, hi), (1, 2, 3, 4, 0, 5)), (W, BN, DV))
    else:  # the two halves of a word may lie in different groups
        VW: tl.constexpr = DV // PER  # code words per token
        wcol = tl.arange(0, VW)
        vc_ptrs = vc_base + pos[:, :, None] * s_vct + wcol[None, None, :] * s_vcd  # [W, BN, VW]
        ch = tl.arange(0, NS)[:, None, None, None] + (wcol * PER)[None, None, None, :]  # [NS, 1, 1, VW]
        off_lo = pos[None, :, :, None] * s_vst + (ch // G) * s_vsd
        off_hi = pos[None, :, :, None] * s_vst + ((ch + NS) // G) * s_vsd
        coded = (pos < nv)[:, :, None] & (wcol[None, None, :] >= 0) if MIXED else None
        words = _load_if(vc_ptrs, coded, 0, MIXED)
        coded4 = coded[None, :, :, :] & (ch >= 0) if MIXED else None
        s_lo = _load_if(vs_base + off_lo, coded4, 0.0, MIXED).to(KV_DTYPE)
        s_hi = _load_if(vs_base + off_hi, coded4, 0.0, MIXED).to(KV_DTYPE)
        z_lo = _load_if(vz_base + off_lo, coded4, 0.0, MIXED).to(KV_DTYPE)
        z_hi = _load_if(vz_base + off_hi, coded4, 0.0, MIXED).to(KV_DTYPE)
        shift, mask, magic, neg_magic = pair_slot_constants(NS, VB, KV_DTYPE)
        x = words[None, :, :, :] >> shift[:, None, None, None]  # [NS, W, BN, VW]
        lo, hi = decode_pairs(x, mask[:, None, None, None], magic[:, None, None, None],
                              neg_magic[:, None, None, None], s_lo, s_hi, z_lo, z_hi,
                              KV_DTYPE, DOT_DTYPE, INTERPRET)
        # [W, BN, VW, NS, 2]: column w * PER + 2j + h holds channel w * PER + j + h * NS
        values = tl.reshape(tl.permute(tl.join(lo, hi), (1, 2, 3, 0, 4)), (W, BN, DV))
    if MIXED:
        values = _with_ring_packed(values, pos, nv, n, vw_base, s_vwt, s_vwd, pair_order(DV, PER), R, False,
                                   DOT_DTYPE)
    if CHANNELS_FIRST:
        values = tl.permute(values, (0, 2, 1))
    return values


# ------------------------------------------------------------------------------------ softmax
@triton.jit
def _shared_mask(mask_ptr, s_mt, start, mask_len, W: tl.constexpr, BN: tl.constexpr, PER: tl.constexpr,
                 MASK_BOOL: tl.constexpr):
    """The mask of a program whose query rows share one mask row (``Lq = 1`` or a mask constant
    along it, and constant across the GQA group): ``[W, BN]`` values (see :func:`~xquant_fx.kernels.common.mask_values`)
    of positions ``start + w * BN + pair_order(BN, PER)`` (``PER == 0``: in order). Read in
    order (contiguous per sub-block), then permuted in registers; positions at or past
    ``mask_len`` are masked. Stage 1 reads it one block ahead of its use: byte-wide loads are not
    staged by cp.async, and this keeps their latency off the loop's critical path."""
    if PER > 0:
        KW: tl.constexpr = BN // PER
        NS: tl.constexpr = PER // 2
        pos = ((start + tl.arange(0, W) * BN)[:, None, None, None] + (tl.arange(0, KW) * PER)[None, :, None, None]
               + (tl.arange(0, 2) * NS)[None, None, :, None] + tl.arange(0, NS)[None, None, None, :])
        # pos [W, KW, 2, NS]: in order
    else:
        pos = (start + tl.arange(0, W) * BN)[:, None] + tl.arange(0, BN)[None, :]
    m = mask_values(load_mask(mask_ptr + pos * s_mt, pos < mask_len, MASK_BOOL), MASK_BOOL)
    if PER > 0:  # natural [.., h, j] -> slot 2j + h
        m = tl.reshape(tl.permute(m, (0, 1, 3, 2)), (W, BN))
    return m


@triton.jit
def _mask_scores(scores, pos, qpos, row_ok, m_row, shared, mask_ptr, s_mt, mask_len,
                 MIXED: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_SHARED: tl.constexpr,
                 SINKS: tl.constexpr):
    """Apply the causal limit (``MIXED`` blocks: ``pos <= qpos``), the sink floor (``SINKS > 0``:
    positions below it are the sink buffers', attended apart) and the caller's mask to
    ``scores`` (log2 units). ``pos`` / ``qpos`` / ``row_ok`` / ``m_row`` / ``shared`` broadcast
    against ``scores``: positions, each row's position, whether the row is a real query row, each
    row's offset into the mask, and (``MASK_SHARED``) the mask values all rows share
    (:func:`_shared_mask`). Mask positions at or past ``mask_len`` are masked."""
    if MIXED:
        scores = tl.where(pos <= qpos, scores, float("-inf"))
    if SINKS > 0:
        scores = tl.where(pos >= SINKS, scores, float("-inf"))
    if HAS_MASK:
        if MASK_SHARED:
            m = shared
        else:
            m = mask_values(load_mask(mask_ptr + m_row + pos * s_mt, (pos < mask_len) & row_ok, MASK_BOOL),
                            MASK_BOOL)
        scores = apply_mask(scores, m, MASK_BOOL)
    return scores


#: Lazy rescaling: the running max of a row moves only when a score exceeds it by more than
#: this (log2 units), so probabilities stay below 2^8 and the accumulator is rescaled on a few
#: blocks only.
RESCALE_THRESHOLD = tl.constexpr(8.0)


@triton.jit
def _online_softmax(scores, m_i, l_part, acc, AXIS: tl.constexpr):
    """One online-softmax step: ``scores`` (log2 units) reduced along ``AXIS`` (the position
    axis; ``acc``'s channel axis sits at the same index). Returns ``(p, m_i, l_part, acc)`` with
    ``p`` the float32 probabilities relative to the (possibly stale) running max ``m_i``.

    ``l_part`` has the shape of ``scores``: each thread sums its own probabilities, reduced along
    ``AXIS`` once after the loop (no shuffles per block). ``m_i`` moves, and ``l_part`` / ``acc``
    are rescaled, only on blocks where some score exceeds its row's max by more than
    ``RESCALE_THRESHOLD`` (one uniform branch, tested elementwise): after the first block of a
    row that is rare. A row with nothing visible yet keeps ``m = -inf`` and gets ``p = 0``.
    """
    grow = scores > tl.expand_dims(m_i + RESCALE_THRESHOLD, AXIS)
    if tl.max(grow.to(tl.int32)) > 0:
        m_new = tl.maximum(m_i, tl.max(scores, axis=AXIS))
        alpha = tl.expand_dims(tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new)), AXIS)
        l_part = l_part * alpha
        acc = acc * alpha
        m_i = m_new
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    p = tl.math.exp2(scores - tl.expand_dims(m_ref, AXIS))
    return p, m_i, l_part + p, acc


@triton.jit
def _attend_block(
    q, m_i, l_i, acc, qpos, row_ok, m_row, m_row0, shared, kt, vt, mask_ptr, s_mt,
    start, nk, nv, n, qk_scale, mask_len,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, VG: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MIXED: tl.constexpr,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_SHARED: tl.constexpr,
    KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    SINKS: tl.constexpr,
):
    """One online-softmax step of the shared-block kernel over ``BLOCK_N`` positions for the
    ``BLOCK_M`` query rows.

    ``m_i [BLOCK_M]``: running max (log2 units); ``l_i``: partial sums (the shape of the scores,
    see :func:`_online_softmax`); ``qpos [BLOCK_M]``: each row's position (causal limit);
    ``row_ok`` / ``m_row`` / ``shared``: see :func:`_mask_scores` (``shared`` None: read here;
    ``m_row0`` is the shared row's offset); ``kt`` / ``vt``: the keys' / values' storage
    (:func:`_storage_view`). Keys and values are rounded to the cache dtype (as ``read_keys`` /
    ``read_values`` return them) and multiplied on the tensor cores with float32 accumulation
    (operands in ``DOT_DTYPE``: the cache dtype, or float32 where the interpreter cannot multiply
    bfloat16).

    ``PACKED`` blocks hold their positions in :func:`~xquant_fx.kernels.common.pair_order` (keys
    and values alike, so the softmax never notices), generic blocks in order. ``S = q K^T``,
    ``O = P V`` (``q [BLOCK_M, DK]``, ``acc [BLOCK_M, DV]``).
    """
    if PACKED:
        pos = start + pair_order(BLOCK_N, 32 // KB)
        keys = _load_keys_packed(kt, start, nk, n, KB, G, R, DK, 1, BLOCK_N, MIXED, True,
                                 KV_DTYPE, DOT_DTYPE, INTERPRET)
        values = _load_values_packed(vt, pos[None, :], nv, n, VB, VG, R, DV, 1, BLOCK_N, MIXED, False,
                                     KV_DTYPE, DOT_DTYPE, INTERPRET)
        keys = tl.reshape(keys, (DK, BLOCK_N))
        values = tl.reshape(values, (BLOCK_N, DV))
    else:
        pos = start + tl.arange(0, BLOCK_N)
        keys = _load_keys(kt, start, nk, n, KB, G, R, DK, BLOCK_N, MIXED, KV_DTYPE, DOT_DTYPE)  # [BLOCK_N, DK]
        values = _load_values(vt, start, nv, n, VB, VG, R, DV, BLOCK_N, MIXED, KV_DTYPE, DOT_DTYPE)  # [BLOCK_N, DV]
        keys = tl.trans(keys)
    if not (HAS_MASK and MASK_SHARED):
        shared = pos  # placeholder when the rows do not share the mask
    elif shared is None:  # stage 2 does not prefetch
        shared = _shared_mask(mask_ptr + m_row0, s_mt, start, mask_len, 1, BLOCK_N,
                              32 // KB if PACKED else 0, MASK_BOOL)
    shared = tl.reshape(shared, (BLOCK_N,))
    scores = tl.dot(q, keys, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    scores = _mask_scores(scores, pos[None, :], qpos[:, None], row_ok[:, None], m_row[:, None], shared[None, :],
                          mask_ptr, s_mt, mask_len, MIXED, HAS_MASK, MASK_BOOL, MASK_SHARED, SINKS)
    p, m_i, l_i, acc = _online_softmax(scores, m_i, l_i, acc, 1)
    acc += tl.dot(_dot_operand(p, KV_DTYPE, DOT_DTYPE), values, input_precision=DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _attend_warps_block(
    q, m_i, l_i, acc, qpos, row_ok, m_row, m_row0, shared, kt, vt, mask_ptr, s_mt,
    start, nk, nv, n, qk_scale, mask_len,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, VG: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, MIXED: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_SHARED: tl.constexpr,
    KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, SINKS: tl.constexpr,
):
    """One online-softmax step of the warp-split kernel: ``W`` sub-blocks of ``BN`` positions,
    sub-block ``w`` for warp ``w`` (a leading batch axis: Triton gives each warp one batch of a
    3-d ``tl.dot``), each with its own running state ``m_i [W, BLOCK_M]``, ``l_i`` (partial sums
    shaped as the scores), ``acc``.

    Transposed products, ``S^T = K q^T`` and ``O^T = V^T P^T``: ``q [W, DK, BLOCK_M]``, the same in
    every batch; ``acc [W, DV, BLOCK_M]``. Nothing crosses warps in the softmax but the one-flag
    test of :func:`_online_softmax`; ``P`` reaches the second product through a small
    shared-memory tile.
    """
    pos = (start + tl.arange(0, W) * BN)[:, None] + pair_order(BN, 32 // KB)[None, :]  # [W, BN]
    keys = _load_keys_packed(kt, start, nk, n, KB, G, R, DK, W, BN, MIXED, False,
                             KV_DTYPE, DOT_DTYPE, INTERPRET)
    values = _load_values_packed(vt, pos, nv, n, VB, VG, R, DV, W, BN, MIXED, True,
                                 KV_DTYPE, DOT_DTYPE, INTERPRET)
    if not (HAS_MASK and MASK_SHARED):
        shared = pos  # placeholder when the rows do not share the mask
    scores = tl.dot(keys, q) * qk_scale  # [W, BN, BLOCK_M]
    scores = _mask_scores(scores, pos[:, :, None], qpos[None, None, :], row_ok[None, None, :],
                          m_row[None, None, :], shared[:, :, None], mask_ptr, s_mt, mask_len,
                          MIXED, HAS_MASK, MASK_BOOL, MASK_SHARED, SINKS)
    p, m_i, l_i, acc = _online_softmax(scores, m_i, l_i, acc, 1)
    acc += tl.dot(values, _dot_operand(p, KV_DTYPE, DOT_DTYPE))
    return m_i, l_i, acc


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _positions(n_ptr, R: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    """``(n, nv, nk, fast)``: the positions stored (``n``, read on the device), the boundary of the
    value codes (``Nv = max(n - R, 0)``) and of the key codes (``Nk``, ``Nv`` rounded up to whole
    groups), and ``F = Nv // BLOCK * BLOCK``, where stage 1 stops and stage 2 starts."""
    n = tl.load(n_ptr).to(tl.int32)
    nv = tl.maximum(n - R, 0)
    nk = (nv + G - 1) // G * G
    return n, nv, nk, nv // BLOCK * BLOCK


@triton.jit
def _storage_view(c_ptr, s_ptr, z_ptr, w_ptr, bi, hi, s_cb, s_ch, s_sb, s_sh, s_wb, s_wh,
                  s_ct, s_cd, s_st, s_sd, s_wt, s_wd):
    """The keys' (or values') storage of sequence ``bi``, KV head ``hi`` as the loaders take it:
    ``(c_base, s_base, z_base, w_base, s_ct, s_cd, s_st, s_sd, s_wt, s_wd)``, the codes, scales,
    zero points and ring window there, then the token and channel strides of the codes, of the
    scales and zero points (which share strides) and of the window."""
    c_base, s_base, z_base = head_bases(c_ptr, s_ptr, z_ptr, bi, hi, s_cb, s_ch, s_sb, s_sh)
    return c_base, s_base, z_base, w_ptr + bi * s_wb + hi * s_wh, s_ct, s_cd, s_st, s_sd, s_wt, s_wd


@triton.jit
def _load_query(q_ptr, s_qb, s_qh, s_ql, s_qd, s_mb, s_mh, s_ml, bi, hi, n,
                LQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, DK: tl.constexpr,
                KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The ``GROUP * LQ`` query rows of KV head ``hi`` of sequence ``bi``, padded to ``BLOCK_M``:
    ``(q [BLOCK_M, DK], qpos, row_ok, m_row, m_row0)``. Row ``r`` is head ``hi * GROUP + r // LQ``,
    new token ``qi = r % LQ`` at position ``qpos = n - LQ + qi``; padding rows are zero. ``m_row``:
    each row's offset into the mask; ``m_row0``: the offset of the mask row all rows share
    (``MASK_SHARED``)."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * LQ
    head = hi * GROUP + rows // LQ
    qi = rows % LQ
    qpos = n - LQ + qi
    dk = tl.arange(0, DK)
    q_ptrs = q_ptr + bi * s_qb + head[:, None] * s_qh + qi[:, None] * s_ql + dk[None, :] * s_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (dk[None, :] >= 0), other=0.0)
    m_row = bi * s_mb + head * s_mh + qi * s_ml  # [BLOCK_M]
    m_row0 = bi * s_mb + (hi * GROUP) * s_mh
    return q.to(KV_DTYPE).to(DOT_DTYPE), qpos, row_ok, m_row, m_row0


@triton.jit
def _mask_ahead(mask_ptr, s_mt, start, mask_len, W: tl.constexpr, BN: tl.constexpr, PER: tl.constexpr,
                SHARED: tl.constexpr, MASK_BOOL: tl.constexpr):
    """:func:`_shared_mask` of the ``W`` sub-blocks at ``start`` when the rows share the mask
    (``SHARED``), else a placeholder of its shape."""
    if SHARED:
        return _shared_mask(mask_ptr, s_mt, start, mask_len, W, BN, PER, MASK_BOOL)
    else:
        return tl.zeros((W, BN), tl.int1)


@triton.jit
def _store_partial(part_acc_ptr, part_ml_ptr, part, acc, m_i, l_i, row_ok,
                   M: tl.constexpr, BLOCK_M: tl.constexpr, DV: tl.constexpr, VB: tl.constexpr, PACKED: tl.constexpr):
    """Write partial ``part`` (``(acc [BLOCK_M, DV], m_i, l_i)``) to the workspace, channels in
    order (``PACKED`` accumulators hold their channels in ``pair_order(DV, 32 / VB)``)."""
    if PACKED:
        chan = pair_order(DV, 32 // VB)  # the channel of each accumulator column
    else:
        chan = tl.arange(0, DV)
    rows = tl.arange(0, BLOCK_M)
    tl.store(part_acc_ptr + (part * M + rows[:, None]) * DV + chan[None, :], acc,
             mask=row_ok[:, None] & (chan[None, :] >= 0))
    tl.store(part_ml_ptr + part * 2 * M + rows, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 * M + M + rows, l_i, mask=row_ok)


@triton.jit
def _sink_partial(q, qpos, row_ok, m_row, k_ptr, v_ptr, s_kt, s_kd, s_vt, s_vd, mask_ptr, s_mt, qk_scale, mask_len,
                  SINKS: tl.constexpr, SB: tl.constexpr, BLOCK_M: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, VB: tl.constexpr, PACKED: tl.constexpr, HAS_MASK: tl.constexpr,
                  MASK_BOOL: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The sink tokens' partial ``(m [BLOCK_M], l [BLOCK_M], acc [BLOCK_M, DV])`` of the query rows
    ``q`` over the ``SINKS`` full-precision positions of one (sequence, KV head) at ``k_ptr`` /
    ``v_ptr``: sink ``j`` is position ``j``, visible to a row at ``qpos >= j`` that the caller's
    mask keeps. One block of ``SB >= SINKS`` positions (at least 16, the ``tl.dot`` minimum), the
    padding masked. ``PACKED``: the accumulator's columns in the packed decoders' channel order,
    as :func:`_store_partial` takes them."""
    if PACKED:
        chan = pair_order(DV, 32 // VB)
    else:
        chan = tl.arange(0, DV)
    j = tl.arange(0, SB)
    ok = j < SINKS
    k = tl.load(k_ptr + j[:, None] * s_kt + tl.arange(0, DK)[None, :] * s_kd, mask=ok[:, None], other=0.0)
    v = tl.load(v_ptr + j[:, None] * s_vt + chan[None, :] * s_vd, mask=ok[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, SB]
    scores = tl.where(ok[None, :], scores, float("-inf"))
    scores = _mask_scores(scores, j[None, :], qpos[:, None], row_ok[:, None], m_row[:, None], None, mask_ptr, s_mt,
                          mask_len, True, HAS_MASK, MASK_BOOL, False, 0)
    m_i = tl.max(scores, axis=1)
    p = tl.math.exp2(scores - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
    acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return m_i, tl.sum(p, axis=1), acc


@triton.jit
def _program_view(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, pid_bh, num_kv_heads,
    s_qb, s_qh, s_ql, s_qd, s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd, s_kwb, s_kwh, s_kwt, s_kwd,
    s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd, s_vwb, s_vwh, s_vwt, s_vwd, s_mb, s_mh, s_ml,
    LQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, FAST_BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """What a stage-1 or stage-2 program of (sequence, KV head) ``pid_bh`` starts from: ``(bi, hi,
    n, nv, nk, fast, q, qpos, row_ok, m_row, m_row0, kt, vt)``, the sequence and KV head,
    :func:`_positions`, :func:`_load_query` and the keys' and values' :func:`_storage_view`."""
    bi, hi = seq_head(pid_bh, num_kv_heads)
    KV_DTYPE: tl.constexpr = kw_ptr.dtype.element_ty
    n, nv, nk, fast = _positions(n_ptr, R, G, FAST_BLOCK)
    q, qpos, row_ok, m_row, m_row0 = _load_query(q_ptr, s_qb, s_qh, s_ql, s_qd, s_mb, s_mh, s_ml, bi, hi, n,
                                                 LQ, GROUP, BLOCK_M, DK, KV_DTYPE, DOT_DTYPE)
    kt = _storage_view(kc_ptr, ks_ptr, kz_ptr, kw_ptr, bi, hi, s_kcb, s_kch, s_ksb, s_ksh, s_kwb, s_kwh,
                       s_kct, s_kcd, s_kst, s_ksd, s_kwt, s_kwd)
    vt = _storage_view(vc_ptr, vs_ptr, vz_ptr, vw_ptr, bi, hi, s_vcb, s_vch, s_vsb, s_vsh, s_vwb, s_vwh,
                       s_vct, s_vcd, s_vst, s_vsd, s_vwt, s_vwd)
    return bi, hi, n, nv, nk, fast, q, qpos, row_ok, m_row, m_row0, kt, vt


@triton.jit
def _tail_program(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, mask_ptr, xk_ptr, xv_ptr,
    part_acc_ptr, part_ml_ptr, pid_bh, program, first_parts,
    s_qb, s_qh, s_ql, s_qd, s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd, s_kwb, s_kwh, s_kwt, s_kwd,
    s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd, s_vwb, s_vwh, s_vwt, s_vwd,
    s_mb, s_mh, s_ml, s_mt, s_xkb, s_xkh, s_xkt, s_xkd, s_xvb, s_xvh, s_xvt, s_xvd,
    num_kv_heads, qk_scale, mask_len,
    LQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    G: tl.constexpr, VG: tl.constexpr, R: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_SHARED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, TAIL_PARTS: tl.constexpr,
    SINKS: tl.constexpr, SINK_BLOCK: tl.constexpr, FAST_BLOCK: tl.constexpr,
):
    """Stage 2's program ``program`` of (sequence, KV head) ``pid_bh``: the block of ``BLOCK_N``
    positions at ``F + program * BLOCK_N`` (``F`` in blocks of ``FAST_BLOCK``, where stage 1
    stopped; the ring window, the codes next to it, the causal edge) on all the program's warps
    (:func:`_attend_block`, mixed path), or with ``SINKS > 0`` and ``program == TAIL_PARTS - 1`` the
    sink buffers (:func:`_sink_partial`); written as partial ``first_parts + program`` of the
    ``first_parts + TAIL_PARTS``. Arguments as :func:`_attend_kernel` takes them. Run by
    :func:`_attend_kernel` (``STAGE=2``) and by the tail programs of :func:`_attend_mma_kernel`."""
    KV_DTYPE: tl.constexpr = kw_ptr.dtype.element_ty
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor's launcher may pass float64
    bi, hi, n, nv, nk, fast, q, qpos, row_ok, m_row, m_row0, kt, vt = _program_view(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, pid_bh, num_kv_heads,
        s_qb, s_qh, s_ql, s_qd, s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd, s_kwb, s_kwh, s_kwt, s_kwd,
        s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd, s_vwb, s_vwh, s_vwt, s_vwd, s_mb, s_mh, s_ml,
        LQ, GROUP, BLOCK_M, G, R, DK, FAST_BLOCK, DOT_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = tl.zeros((BLOCK_M, DV), tl.float32)
    for start in range(fast + program * BLOCK_N, tl.minimum(fast + (program + 1) * BLOCK_N, n), BLOCK_N):
        m_i, l_i, acc = _attend_block(
            q, m_i, l_i, acc, qpos, row_ok, m_row, m_row0, None, kt, vt, mask_ptr, s_mt,
            start, nk, nv, n, qk_scale, mask_len,
            KB, VB, G, VG, R, DK, DV, BLOCK_N, True, PACKED, HAS_MASK, MASK_BOOL, MASK_SHARED,
            KV_DTYPE, DOT_DTYPE, DOT_PRECISION, INTERPRET, SINKS,
        )
    l_i = tl.sum(l_i, axis=1)
    if SINKS > 0:
        if program == TAIL_PARTS - 1:
            m_i, l_i, acc = _sink_partial(
                q, qpos, row_ok, m_row, xk_ptr + bi * s_xkb + hi * s_xkh, xv_ptr + bi * s_xvb + hi * s_xvh,
                s_xkt, s_xkd, s_xvt, s_xvd, mask_ptr, s_mt, qk_scale, mask_len,
                SINKS, SINK_BLOCK, BLOCK_M, DK, DV, VB, PACKED, HAS_MASK, MASK_BOOL, DOT_DTYPE, DOT_PRECISION)
    _store_partial(part_acc_ptr, part_ml_ptr, pid_bh.to(tl.int64) * (first_parts + TAIL_PARTS) + first_parts + program,
                   acc, m_i, l_i, row_ok, GROUP * LQ, BLOCK_M, DV, VB, PACKED)


@triton.jit(do_not_specialize=["num_kv_heads", "num_splits"])
def _attend_mma_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, mask_ptr, xk_ptr, xv_ptr,
    part_acc_ptr, part_ml_ptr,
    s_qb, s_qh, s_ql, s_qd,
    s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd, s_kwb, s_kwh, s_kwt, s_kwd,
    s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd, s_vwb, s_vwh, s_vwt, s_vwd,
    s_mb, s_mh, s_ml, s_mt,
    s_xkb, s_xkh, s_xkt, s_xkd, s_xvb, s_xvh, s_xvt, s_xvd,
    num_kv_heads, num_splits, qk_scale, mask_len,
    LQ: tl.constexpr, GROUP: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, TAIL_PARTS: tl.constexpr, META16: tl.constexpr,
    VC_ROW: tl.constexpr, VS_ROW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    SINKS: tl.constexpr, INTERPRET: tl.constexpr, W: tl.constexpr, LAZY: tl.constexpr,
    TAIL_PROGRAMS: tl.constexpr, TAIL_BLOCK_M: tl.constexpr, TAIL_BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, SINK_BLOCK: tl.constexpr,
):
    """Stage 1 of the ``mma`` variant on raw codes, and with ``TAIL_PROGRAMS`` stage 2 in the same
    launch.

    Arguments as :func:`_attend_kernel` takes them. Grid ``(b * Hkv, S)``, or with
    ``TAIL_PROGRAMS`` ``(b * Hkv, T + S)``: programs ``0 .. T - 1`` of each (sequence, KV head)
    are stage 2's (:func:`_tail_program`: the ring window, the codes next to it and the sinks, on
    this launch's warps), the others stage 1's splits
    (:func:`~xquant_fx.kernels.attend_mma._stage1_program`). In one launch the tail's blocks run
    beside stage 1's loops instead of after them, and a launch is gone; both branches are
    compiled into one program (255 registers at one warp, against 241 for stage 1 alone), which
    is why the host code takes it at small capacities only (:func:`mma_tail_programs`)."""
    pid_bh = tl.program_id(0)
    program = tl.program_id(1)
    if TAIL_PROGRAMS:
        if program < TAIL_PARTS:
            _tail_program(
                q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, mask_ptr, xk_ptr, xv_ptr,
                part_acc_ptr, part_ml_ptr, pid_bh, program, num_splits * W,
                s_qb, s_qh, s_ql, s_qd, s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd,
                s_kwb, s_kwh, s_kwt, s_kwd, s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd,
                s_vwb, s_vwh, s_vwt, s_vwd, s_mb, s_mh, s_ml, s_mt,
                s_xkb, s_xkh, s_xkt, s_xkd, s_xvb, s_xvh, s_xvt, s_xvd,
                num_kv_heads, qk_scale, mask_len,
                LQ, GROUP, TAIL_BLOCK_M, KB, VB, 32, 32, R, DK, DV, TAIL_BLOCK_N, True,  # groups of 32 tokens
                HAS_MASK, MASK_BOOL, HAS_MASK, DOT_DTYPE, None, INTERPRET, TAIL_PARTS, SINKS, SINK_BLOCK, 32,
            )
        else:
            _stage1_program(
                q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, n_ptr, mask_ptr, part_acc_ptr, part_ml_ptr,
                pid_bh, program - TAIL_PARTS,
                s_qb, s_qh, s_ql, s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst,
                s_mb, s_mh, s_mt, num_kv_heads, num_splits, qk_scale, mask_len,
                LQ, GROUP, KB, VB, R, DK, DV, TAIL_PARTS, META16, VC_ROW, VS_ROW, HAS_MASK, MASK_BOOL, SINKS,
                INTERPRET, W, LAZY,
            )
    else:
        _stage1_program(
            q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, n_ptr, mask_ptr, part_acc_ptr, part_ml_ptr,
            pid_bh, program,
            s_qb, s_qh, s_ql, s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst,
            s_mb, s_mh, s_mt, num_kv_heads, num_splits, qk_scale, mask_len,
            LQ, GROUP, KB, VB, R, DK, DV, TAIL_PARTS, META16, VC_ROW, VS_ROW, HAS_MASK, MASK_BOOL, SINKS, INTERPRET,
            W, LAZY,
        )


@triton.jit(do_not_specialize=["num_kv_heads", "num_splits", "mask_len"])
def _attend_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, mask_ptr, xk_ptr, xv_ptr,
    part_acc_ptr, part_ml_ptr,
    # q [b, Hq, Lq, DK]
    s_qb, s_qh, s_ql, s_qd,
    # k_codes [B, H, Tq*KB/32, DK]; k_scale / k_zero [B, H, Tq/G, DK]; k_window [B, H, R, DK]
    s_kcb, s_kch, s_kct, s_kcd,
    s_ksb, s_ksh, s_kst, s_ksd,
    s_kwb, s_kwh, s_kwt, s_kwd,
    # v_codes [B, H, Tq, DV*VB/32]; v_scale / v_zero [B, H, Tq, DV/VG]; v_window [B, H, R, DV]
    s_vcb, s_vch, s_vct, s_vcd,
    s_vsb, s_vsh, s_vst, s_vsd,
    s_vwb, s_vwh, s_vwt, s_vwd,
    # mask [b, Hq, Lq, mask_len] (broadcast dims: stride 0)
    s_mb, s_mh, s_ml, s_mt,
    # k_sink [B, H, SINKS, DK], v_sink [B, H, SINKS, DV] (SINKS > 0)
    s_xkb, s_xkh, s_xkt, s_xkd,
    s_xvb, s_xvh, s_xvt, s_xvd,
    num_kv_heads, num_splits, qk_scale, mask_len,
    LQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, VG: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPLIT: tl.constexpr,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    MASK_SHARED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    VC_ROW: tl.constexpr, VS_ROW: tl.constexpr, TAIL_PARTS: tl.constexpr, SINKS: tl.constexpr,
    SINK_BLOCK: tl.constexpr, STAGE: tl.constexpr, FAST_BLOCK: tl.constexpr,
):
    """Stages 1 and 2 (``STAGE``) of the decode attention; see the module docstring.

    Stage 1, grid ``(b * Hkv, S)``: the whole blocks below ``F = Nv // BLOCK_N * BLOCK_N`` (keys
    and values all from codes; ``FAST_BLOCK == BLOCK_N``), split ``S`` ways. ``WARP_SPLIT``: the
    number of warps ``W`` taking ``BLOCK_N / W`` positions each (:func:`_attend_warps_block`,
    transposed products), or 0 for the shared-block loop (:func:`_attend_block`).

    Stage 2, grid ``(b * Hkv, T)`` with ``T = TAIL_PARTS``: the positions ``[F, n)`` that stage 1
    left (``F`` in blocks of ``FAST_BLOCK``, stage 1's; fewer than ``R + FAST_BLOCK <= T' *
    BLOCK_N``: the ring window, the codes next to it, the causal edge), one block of ``BLOCK_N``
    positions per program, on all warps (:func:`_attend_block`, mixed path, ``q K^T``
    orientation; ``WARP_SPLIT = 0``), on programs ``0 .. T' - 1``; with
    ``SINKS > 0``, ``T = T' + 1`` and the last program attends the sink buffers instead
    (:func:`_sink_partial`: its block range lies past ``n``, so its loop is empty). Compiled apart
    from stage 1 (the ``STAGE`` branch is resolved at compile time), so that its masked,
    two-source blocks (codes below the boundaries, ring slots above) do not raise stage 1's
    register count.

    Program ``p`` writes partial ``p`` (stage 1) or ``S + p`` (stage 2): ``part_acc [b * Hkv, S +
    T, GROUP * Lq, DV]`` unnormalised output and ``part_ml [b * Hkv, S + T, 2, GROUP * Lq]``
    running max (log2 units) and sum, float32 (an empty slice writes ``-inf, 0, 0``). Query row
    ``r`` of the block is head ``kv_head * GROUP + r // Lq``, new token ``r % Lq``.
    """
    pid_bh = tl.program_id(0)
    program = tl.program_id(1)
    if STAGE == 2:
        _tail_program(
            q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, mask_ptr, xk_ptr, xv_ptr,
            part_acc_ptr, part_ml_ptr, pid_bh, program, num_splits,
            s_qb, s_qh, s_ql, s_qd, s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd, s_kwb, s_kwh, s_kwt, s_kwd,
            s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd, s_vwb, s_vwh, s_vwt, s_vwd,
            s_mb, s_mh, s_ml, s_mt, s_xkb, s_xkh, s_xkt, s_xkd, s_xvb, s_xvh, s_xvt, s_xvd,
            num_kv_heads, qk_scale, mask_len,
            LQ, GROUP, BLOCK_M, KB, VB, G, VG, R, DK, DV, BLOCK_N, PACKED, HAS_MASK, MASK_BOOL, MASK_SHARED,
            DOT_DTYPE, DOT_PRECISION, INTERPRET, TAIL_PARTS, SINKS, SINK_BLOCK, FAST_BLOCK,
        )
    else:
        KV_DTYPE: tl.constexpr = kw_ptr.dtype.element_ty
        # Per-token rows of the value codes / scales are a few words long, not a multiple of 16
        # elements, so Triton would not know them aligned: with their lengths as constants it loads
        # each row as one vector (and stages it with cp.async).
        if VC_ROW > 0:
            s_vct = VC_ROW
        if VS_ROW > 0:
            s_vst = VS_ROW

        qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor's launcher may pass float64
        bi, hi, n, nv, nk, fast, q, qpos, row_ok, m_row, m_row0, kt, vt = _program_view(
            q_ptr, kc_ptr, ks_ptr, kz_ptr, kw_ptr, vc_ptr, vs_ptr, vz_ptr, vw_ptr, n_ptr, pid_bh, num_kv_heads,
            s_qb, s_qh, s_ql, s_qd, s_kcb, s_kch, s_kct, s_kcd, s_ksb, s_ksh, s_kst, s_ksd, s_kwb, s_kwh, s_kwt, s_kwd,
            s_vcb, s_vch, s_vct, s_vcd, s_vsb, s_vsh, s_vst, s_vsd, s_vwb, s_vwh, s_vwt, s_vwd, s_mb, s_mh, s_ml,
            LQ, GROUP, BLOCK_M, G, R, DK, FAST_BLOCK, DOT_DTYPE)

        # This split's slice [lo, hi) of [0, F), in whole blocks.
        chunk = tl.cdiv(tl.cdiv(fast, num_splits), BLOCK_N) * BLOCK_N
        lo = program * chunk
        hi_pos = tl.minimum(lo + chunk, fast)

        if WARP_SPLIT > 0:
            W: tl.constexpr = WARP_SPLIT
            BN: tl.constexpr = BLOCK_N // WARP_SPLIT
            m_i = tl.full((W, BLOCK_M), float("-inf"), tl.float32)
            q = tl.broadcast_to(tl.trans(q)[None, :, :], (W, DK, BLOCK_M))
            acc = tl.zeros((W, DV, BLOCK_M), tl.float32)
            l_i = tl.zeros((W, BN, BLOCK_M), tl.float32)
        else:
            W: tl.constexpr = 1
            BN: tl.constexpr = BLOCK_N
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            acc = tl.zeros((BLOCK_M, DV), tl.float32)
            l_i = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # A mask shared by all rows is read one block ahead (byte-wide loads are not staged by
        # cp.async): its latency hides behind a whole block.
        PER: tl.constexpr = 32 // KB if PACKED else 0
        PREFETCH: tl.constexpr = HAS_MASK and MASK_SHARED
        shared = _mask_ahead(mask_ptr + m_row0, s_mt, lo, mask_len, W, BN, PER, PREFETCH, MASK_BOOL)
        for start in range(lo, hi_pos, BLOCK_N):
            ahead = _mask_ahead(mask_ptr + m_row0, s_mt, start + BLOCK_N, mask_len, W, BN, PER, PREFETCH, MASK_BOOL)
            if WARP_SPLIT > 0:
                m_i, l_i, acc = _attend_warps_block(
                    q, m_i, l_i, acc, qpos, row_ok, m_row, m_row0, shared, kt, vt, mask_ptr, s_mt,
                    start, nk, nv, n, qk_scale, mask_len,
                    KB, VB, G, VG, R, DK, DV, W, BN, False, HAS_MASK, MASK_BOOL, MASK_SHARED,
                    KV_DTYPE, DOT_DTYPE, INTERPRET, SINKS,
                )
            else:
                m_i, l_i, acc = _attend_block(
                    q, m_i, l_i, acc, qpos, row_ok, m_row, m_row0, shared, kt, vt, mask_ptr, s_mt,
                    start, nk, nv, n, qk_scale, mask_len,
                    KB, VB, G, VG, R, DK, DV, BLOCK_N, False, PACKED, HAS_MASK, MASK_BOOL, MASK_SHARED,
                    KV_DTYPE, DOT_DTYPE, DOT_PRECISION, INTERPRET, SINKS,
                )
            shared = ahead
        if WARP_SPLIT > 0:
            # Combine the warps' states (once per program).
            l_i = tl.sum(l_i, axis=1)  # [W, BLOCK_M]
            m_w = m_i
            m_i = tl.max(m_w, axis=0)  # [BLOCK_M]
            wgt = tl.math.exp2(m_w - tl.where(m_i == float("-inf"), 0.0, m_i)[None, :])  # [W, BLOCK_M]
            l_i = tl.sum(l_i * wgt, axis=0)
            acc = tl.trans(tl.sum(acc * wgt[:, None, :], axis=0))  # [BLOCK_M, DV]
        else:
            l_i = tl.sum(l_i, axis=1)
        _store_partial(part_acc_ptr, part_ml_ptr, pid_bh.to(tl.int64) * (num_splits + TAIL_PARTS) + program,
                       acc, m_i, l_i, row_ok, GROUP * LQ, BLOCK_M, DV, VB, PACKED)


@triton.jit(do_not_specialize=["num_kv_heads", "num_parts"])
def _attend_merge_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr,
    s_ob, s_oh, s_ol, s_od,
    num_kv_heads, num_parts,
    LQ: tl.constexpr, GROUP: tl.constexpr, DV: tl.constexpr, PARTS_BLOCK: tl.constexpr,
):
    """Stage 3, grid ``(b * Hkv * GROUP * Lq,)``: program ``pid`` merges the ``S + T`` partials
    of query row ``pid % (GROUP * Lq)`` of (sequence, KV head) ``pid // (GROUP * Lq)`` into
    ``out``, ``PARTS_BLOCK`` partials at a time (the count is a run-time value: it follows the
    batch, which is dynamic under ``torch.compile``)."""
    M: tl.constexpr = GROUP * LQ
    pid = tl.program_id(0)
    bh = (pid // M).to(tl.int64)
    r = pid % M
    bi = bh // num_kv_heads
    head = (bh % num_kv_heads) * GROUP + r // LQ
    qi = r % LQ
    dv = tl.arange(0, DV)
    m_run = tl.full((1,), float("-inf"), tl.float32)
    l_run = tl.zeros((1,), tl.float32)
    acc_run = tl.zeros((DV,), tl.float32)
    for start in range(0, num_parts, PARTS_BLOCK):
        s = start + tl.arange(0, PARTS_BLOCK)
        ok = s < num_parts
        part = bh * num_parts + s  # [P]
        m = tl.load(part_ml_ptr + part * 2 * M + r, mask=ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + part * 2 * M + M + r, mask=ok, other=0.0)
        acc = tl.load(part_acc_ptr + (part * M + r)[:, None] * DV + dv[None, :],
                      mask=ok[:, None] & (dv[None, :] >= 0), other=0.0)  # [P, DV]
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        # Partials with nothing visible (m = -inf) weigh 0; a row masked everywhere gives 0 / 0 =
        # NaN, as the reference softmax does.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(m - ref)
        keep = tl.math.exp2(m_run - ref)
        l_run = l_run * keep + tl.sum(l * w, axis=0)
        acc_run = acc_run * keep + tl.sum(acc * w[:, None], axis=0)
        m_run = m_new
    out = acc_run / l_run
    tl.store(out_ptr + bi * s_ob + head * s_oh + qi * s_ol + dv * s_od, out.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------ launch
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Fewest positions a split is given (at capacity): below this a split's fixed cost dominates.
MIN_SPLIT_TOKENS = 256
#: Share of the resident program slots the last round of stage 1 must fill (wave quantization).
MIN_ROUND_FILL = 0.85
#: Multiprocessors assumed by the CPU interpreter (keeps interpreted runs small but split).
INTERPRETER_SMS = 2
#: Positions per iteration of stage 2 (the tail: ring window and the codes next to it).
TAIL_BLOCK_N = 32
#: Partials stage 3 merges per iteration.
MERGE_BLOCK = 32


def _workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uninitialised float32 buffer for the partials (every element is written)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def num_splits(batch_kv_heads, capacity: int, device: torch.device, ctas_per_sm: int = 3,
               min_split_tokens: int = MIN_SPLIT_TOKENS):
    """Sequence slices per (sequence, KV head) for stage 1. Static: a function of the cache
    capacity, the batch and the device, never of ``n`` (CUDA-graph safe).

    ``ctas_per_sm``: stage-1 programs resident per multiprocessor (from the kernel's registers,
    :class:`AttendConfig`). The count is the fewest splits that fill every resident slot if the
    last round of programs is then at least ``MIN_ROUND_FILL`` full; else the most splits that fit
    the fewest rounds that guarantee that fill (``programs <= rounds * resident`` and more than
    ``rounds * resident - batch_kv_heads``); at most one slice per ``min_split_tokens`` positions
    of ``capacity``.

    Arithmetic only, with ``torch.sym_*`` for the choices: ``batch_kv_heads`` is a SymInt under
    ``torch.compile`` with a dynamic batch, and a Python ``if`` or ``int()`` on it would specialize
    the compiled graph to one batch size.
    """
    device = torch.device(device)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else INTERPRETER_SMS
    resident = sms * ctas_per_sm
    most = max(1, math.ceil(capacity / min_split_tokens))
    bh = batch_kv_heads
    fill = fractions.Fraction(MIN_ROUND_FILL).limit_denominator(100)  # 17 / 20: integers only
    fill_num, fill_den = fill.numerator, fill.denominator
    # fewest splits filling every slot, and the rounds they take
    fewest = (resident + bh - 1) // bh
    fewest_rounds = (bh * fewest + resident - 1) // resident
    fewest_ok = bh * fewest * fill_den >= fewest_rounds * resident * fill_num
    # rounds whose last one is at least MIN_ROUND_FILL full however the programs fall
    rounds = (bh * fill_den + (fill_den - fill_num) * resident - 1) // ((fill_den - fill_num) * resident)
    filled = torch.sym_max(1, rounds * resident // bh)
    return torch.sym_min(most, torch.sym_ite(fewest_ok, fewest, filled))


@dataclasses.dataclass(frozen=True)
class AttendConfig:
    """Launch configuration of stage 1: positions per iteration (all warps together), warps,
    software-pipelining stages, and the programs expected resident per multiprocessor (from the
    compiled kernel's registers: 65536 / (128 * registers) at 4 warps), which sizes the split."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    ctas_per_sm: int = 2


def _row_stride(t: torch.Tensor) -> int:
    """The token stride of a per-token tensor ``[B, H, T, C]`` when its rows are contiguous and
    short (a kernel constant then), else 0 (taken at run time)."""
    return t.stride(2) if t.stride(3) == 1 and 0 < t.stride(2) <= 64 else 0


def default_variant(dtype: torch.dtype, block_m: int = 16, mma_ok: bool = False) -> str:
    """The variant :func:`attend` runs for a cache of ``dtype`` and ``block_m`` padded query rows;
    ``mma_ok``: the layer and call fit :mod:`~xquant_fx.kernels.attend_mma`. The one measured
    fastest (``benchmarks/NOTES.md``, runs 40 and 44-46): ``mma`` wherever it fits (ahead of
    ``warps-t`` at every benchmarked batch and context), else ``warps-t``, ``packed`` for more query rows than a
    warp's accumulator holds, ``generic`` for float32."""
    if mma_ok:
        return "mma"
    if dtype == torch.float32:
        return "generic"
    return "warps-t" if block_m <= WARPS_MAX_ROWS else "packed"


def block_config(variant: str, block_m: int, dk: int, dv: int, k_bits: int = 2) -> AttendConfig:
    """Stage-1 configuration of ``variant`` for ``block_m`` (padded) query rows, the head dims and
    the key width (a warp's sub-block holds whole key words: ``>= 32 / k_bits`` positions).

    Register counts are from offline sm_90 compiles with Triton 3.6 (K2/V1, head_dim 128, GQA 4):
    ``warps-t`` 162 at 16 positions per warp, 227 at 32 (the default up to head_dim 128 and 8 rows);
    ``packed`` 162 at 64 positions; ``generic`` 168.
    """
    if variant == "warps-t":
        # 32 positions per warp measured faster than 16 at every benchmarked shape (run 35: batch 8,
        # 128k 618 against 714 µs) where the accumulator is small (head_dim <= 128, <= 8 rows).
        wide = max(dk, dv) <= 128 and block_m <= 8
        per_warp = 32 if wide else max(16, 32 // k_bits)
        big = per_warp > 16 or max(dk, dv) > 128 or block_m > 8
        return AttendConfig(block_n=4 * per_warp, num_warps=4, num_stages=4, ctas_per_sm=2 if big else 3)
    if variant == "packed":
        if block_m >= 64 or max(dk, dv) > 128:
            return AttendConfig(block_n=64, num_warps=8, num_stages=3, ctas_per_sm=1)
        return AttendConfig(block_n=64, num_warps=4, num_stages=3, ctas_per_sm=3)
    # Measured on an H200 (K2/V1, head_dim 128, GQA 4, Lq 1, batch 1 / 8 / 32): 64 positions,
    # 4 warps, 2 stages led at batch 8 and 32 (3 stages: +8% at batch 1, -15% at batch 8);
    # 128 positions or 8 warps were 1.3-2x slower, the transposed (wgmma) product 1.2-1.3x.
    if block_m >= 64 or max(dk, dv) > 128:
        return AttendConfig(block_n=64, num_warps=8, num_stages=2, ctas_per_sm=1)
    return AttendConfig(block_n=64, num_warps=4, num_stages=2, ctas_per_sm=2)


def attend(
    q: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, k_window: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, v_window: torch.Tensor,
    n: torch.Tensor,
    k_bits: int, v_bits: int, group: int, scale: float, mask: torch.Tensor | None = None,
    *, splits: int | None = None, out: torch.Tensor | None = None, config: AttendConfig | None = None,
    variant: str | None = None, k_sink: torch.Tensor | None = None, v_sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of ``q [b, Hq, Lq, Dk]`` (positions ``n - Lq .. n - 1``, causal among
    them) over a quantized layer; returns ``out [b, Hq, Lq, Dv]`` in ``q.dtype``.

    Storage as in :mod:`xquant_fx.cache` (batch ``>= b``, ``Hkv`` KV heads with ``Hq % Hkv == 0``;
    scales and zero points in the cache dtype or float8 e4m3, converted on load: to float32 in the
    generic variants, to the cache dtype for the packed decoders); a sharing layer passes its
    partner's ``k_codes`` / ``v_codes``. ``n`` is a 0-d int64 device
    tensor. ``mask`` as :func:`xquant_fx.quant.attend` takes it: broadcastable to
    ``[b, Hq, Lq, M]``, bool (True attends) or additive float, positions at or past ``M`` masked.
    ``splits`` overrides :func:`num_splits`; ``out`` receives the result; ``config`` overrides
    :func:`block_config` (for ``variant="mma"`` an :class:`~xquant_fx.kernels.attend_mma.MmaConfig`);
    ``variant`` (one of :data:`VARIANTS`) overrides :func:`default_variant` (tests, benchmarks).
    ``k_sink [B, Hkv, S, Dk]`` / ``v_sink [B, Hkv, S, Dv]`` (``XQuantConfig.sink_tokens``, both or
    neither): positions ``< S`` are read from them, not from the codes or the ring, by one more
    stage-2 program (:func:`_sink_partial`).
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
    v_group = value_group(v_window, v_scale)  # channels per value group (``group``: the keys')
    for name, value in (("head_dim (keys)", dk), ("head_dim (values)", dv), ("group_size", group),
                        ("value group size", v_group)):
        check_pow2(name, value)
    if group * k_bits % 32 or dv * v_bits % 32:
        raise ValueError(f"group_size={group} does not tile {k_bits}-bit key words, "
                         f"or {v_bits}-bit value codes do not fill whole words")
    if k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        raise ValueError("attend: scale and zero-point tensors must share strides")
    check_metadata("key", k_scale, k_zero, k_window)
    check_metadata("value", v_scale, v_zero, v_window)
    if lq > R:
        raise ValueError(f"{lq} query tokens exceed the residual window R={R}")
    sinks = _check_sinks(k_sink, v_sink, b, hkv, dk, dv, q.dtype)
    group_rows = hq // hkv * lq
    block_m = _rows_block(group_rows)
    mask, mask_bool, mask_len, mask_strides = _expand_mask(mask, b, hq, lq)
    # One mask row for all of a program's query rows: constant along Lq (or Lq = 1) and across
    # the GQA group (or one head per group).
    mask_shared = mask is not None and (lq == 1 or mask_strides[2] == 0) and (hq == hkv or mask_strides[1] == 0)
    mma_ok = (mask is None or mask_shared) and v_group == group and attend_mma.supports(
        q.dtype, k_bits, v_bits, group, dk, dv, group_rows, _mma_layout_ok(q, k_codes, k_scale, v_codes, v_scale))
    variant = variant or default_variant(q.dtype, block_m, mma_ok)
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    qk_scale = scale * _LOG2E  # scores in log2 units
    storage, storage_strides = _stage_storage(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero,
                                              v_window, n, mask, mask_strides, k_sink, v_sink)
    if isinstance(config, attend_mma.MmaConfig) != (variant == "mma") and config is not None:
        raise ValueError(f"config={config!r} does not configure variant {variant!r} (mma takes an "
                         "attend_mma.MmaConfig, the others an AttendConfig)")
    if variant == "mma":
        if not mma_ok:
            raise ValueError("variant 'mma' takes 16-bit caches, group_size 32 (keys and values), 1-2 bit codes, "
                             "power-of-two head dims of at least 32 (values 64), at most 8 query rows per KV head, "
                             "unit channel strides, key and value metadata of one dtype in whole int32 words, and no "
                             "mask or one that all query rows of a KV head share")
        return _attend_mma(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n,
                           k_bits, v_bits, group, qk_scale, splits, out, mask, mask_bool, mask_len, mask_strides,
                           sinks, storage, storage_strides, config)
    packed = not variant.startswith("generic")
    if packed and q.dtype == torch.float32:
        raise ValueError(f"variant {variant!r} decodes into 16-bit floats; a float32 cache runs 'generic'")
    if variant == "warps-t":  # the rows are the n8 side of the products: pad to 8 only
        block_m = max(8, triton.next_power_of_2(group_rows))
    cfg = config or block_config(variant, block_m, dk, dv, k_bits)
    warp_split = cfg.num_warps if variant == "warps-t" else 0
    per_block = cfg.block_n // max(warp_split, 1)  # positions of one sub-block
    if per_block < 16 or per_block & (per_block - 1) or per_block * k_bits < 32:
        raise ValueError(f"block_n={cfg.block_n} over {max(warp_split, 1)} sub-blocks: each a power of two "
                         f">= 16 positions holding whole {k_bits}-bit key words")
    if warp_split and block_m > WARPS_MAX_ROWS:
        raise ValueError(f"variant {variant!r} takes at most {WARPS_MAX_ROWS} query rows per KV head, got {block_m}")
    capacity = v_scale.shape[2] + R  # positions the cache can hold (>= max_cache_len)
    splits = splits or num_splits(b * hkv, capacity, q.device, cfg.ctas_per_sm)

    tail_parts = _tail_parts(R, cfg.block_n, sinks)  # stage 2 programs per (sequence, KV head)
    out, part_acc, part_ml = _buffers(q, dv, hkv, splits + tail_parts, out)  # stage 1's S, then stage 2's T
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 caches: no TF32 rounding
    interpret = interpreting()
    common = dict(LQ=lq, GROUP=hq // hkv, KB=k_bits, VB=v_bits, G=group, VG=v_group, R=R, DK=dk, DV=dv, PACKED=packed,
                  HAS_MASK=mask is not None, MASK_BOOL=mask_bool, MASK_SHARED=mask_shared,
                  DOT_DTYPE=_dot_dtype(q.dtype, interpret), DOT_PRECISION=precision, INTERPRET=interpret,
                  SINKS=sinks, SINK_BLOCK=_sink_block(sinks))
    launch(_attend_kernel)[(b * hkv, splits)](
        *storage, part_acc, part_ml,
        *q.stride(), *storage_strides,
        hkv, splits, qk_scale, mask_len,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, WARP_SPLIT=warp_split,
        VC_ROW=_row_stride(v_codes), VS_ROW=_row_stride(v_scale), TAIL_PARTS=tail_parts, **common,
        STAGE=1, FAST_BLOCK=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _tail_and_merge(storage, storage_strides, out, part_acc, part_ml, hkv, splits, tail_parts, qk_scale,
                           mask_len, cfg.block_n, common)


def _expand_mask(mask, b: int, hq: int, lq: int):
    """``(mask, is_bool, mask_len, strides)``: the caller's mask expanded to ``[b, Hq, Lq, M]``
    (broadcast dims get stride 0), or ``(None, False, 0, (0, 0, 0, 0))``."""
    if mask is None:
        return None, False, 0, (0, 0, 0, 0)
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dims, got {tuple(mask.shape)}")
    mask_bool = mask.dtype == torch.bool
    # A bool mask goes to the kernels as it is (Triton loads its bytes): a conversion to uint8
    # was a copy kernel per call and layer (2-4 µs, runs 44-46), and a dtype view is not lowered
    # by Inductor on every torch version.
    mask = mask.expand(b, hq, lq, mask.shape[-1])
    return mask, mask_bool, mask.shape[-1], mask.stride()


def _check_sinks(k_sink, v_sink, b, hkv: int, dk: int, dv: int, dtype: torch.dtype) -> int:
    """The number of sink tokens ``S`` (0 without sinks), after checking the two buffers."""
    if k_sink is None and v_sink is None:
        return 0
    if k_sink is None or v_sink is None:
        raise ValueError("attend: pass both k_sink and v_sink, or neither")
    S = k_sink.shape[2]
    for name, t, d in (("k_sink", k_sink, dk), ("v_sink", v_sink, dv)):
        if t.dim() != 4 or t.shape[1] != hkv or t.shape[2] != S or t.shape[3] != d or t.dtype != dtype:
            raise ValueError(f"attend: {name} {tuple(t.shape)} {t.dtype} is not [batch, {hkv}, S, {d}] {dtype}")
    if S < 1:
        raise ValueError("attend: sink buffers must hold at least one position")
    return S


def _stage_storage(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n, mask, mask_strides,
                   k_sink, v_sink):
    """``(storage, storage_strides)``: the tensors and strides stages 1 and 2 of
    :func:`_attend_kernel` take after ``q``, in its parameter order (an absent mask or absent sink
    buffers are replaced by ``q``, with zero strides)."""
    sinks = k_sink is not None
    storage = (q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n,
               mask if mask is not None else q, *((k_sink, v_sink) if sinks else (q, q)))
    strides = (*k_codes.stride(), *k_scale.stride(), *k_window.stride(), *v_codes.stride(), *v_scale.stride(),
               *v_window.stride(), *mask_strides, *((*k_sink.stride(), *v_sink.stride()) if sinks else (0,) * 8))
    return storage, strides


def _rows_block(group_rows: int) -> int:
    """``BLOCK_M`` of the shared-block programs (``tl.dot``'s rows): a KV head's ``GROUP * Lq``
    query rows padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(group_rows))


def _sink_block(sinks: int) -> int:
    """Positions of the sink program's one block: ``sinks`` padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(sinks)) if sinks else 0


def _tail_parts(R: int, fast_block: int, sinks: int, block: int = TAIL_BLOCK_N) -> int:
    """Stage-2 programs per (sequence, KV head): enough blocks of ``block`` positions for the fewer
    than ``R + fast_block`` positions stage 1 leaves, and one more for the sink tokens."""
    return math.ceil((R + fast_block) / block) + (1 if sinks else 0)


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    """The Triton dtype of the dot operands for a cache of ``dtype``: its own, but float32 for
    bfloat16 under Triton's interpreter, which multiplies bfloat16 operands as raw integers."""
    return _TL_DTYPES[torch.float32 if interpret and dtype == torch.bfloat16 else dtype]


def _buffers(q: torch.Tensor, dv: int, hkv: int, parts, out: torch.Tensor | None):
    """``(out, part_acc, part_ml)``: the output (``out`` when given) and the workspace of ``parts``
    partials per (sequence, KV head) that the stages write and the merge reads."""
    b, hq, lq, _ = q.shape
    if out is None:
        out = torch.empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    group_rows = hq // hkv * lq
    return (out, _workspace((b * hkv, parts, group_rows, dv), q.device),
            _workspace((b * hkv, parts, 2, group_rows), q.device))


def _tail_and_merge(storage, storage_strides, out, part_acc, part_ml, hkv, first_parts, tail_parts, qk_scale,
                    mask_len, fast_block, common):
    """Stage 2 over the positions stage 1 left (from ``Nv // fast_block * fast_block`` on) and the
    sink tokens (:func:`_tail_parts`), as partials ``first_parts ..``, then stage 3: every partial
    merged into ``out``. ``storage`` / ``storage_strides``: the tensors and strides as stage 1
    takes them; ``common``: the constants both stages take."""
    q = storage[0]
    (b, hq, lq, _), dv = q.shape, out.shape[3]
    group_rows = hq // hkv * lq
    launch(_attend_kernel)[(b * hkv, tail_parts)](
        *storage, part_acc, part_ml,
        *q.stride(), *storage_strides,
        hkv, first_parts, qk_scale, mask_len,
        BLOCK_M=_rows_block(group_rows), BLOCK_N=TAIL_BLOCK_N, WARP_SPLIT=0,
        VC_ROW=0, VS_ROW=0, TAIL_PARTS=tail_parts, **common, STAGE=2, FAST_BLOCK=fast_block,
        num_warps=4, num_stages=1,
    )
    return _merge(out, part_acc, part_ml, hkv, first_parts + tail_parts)


def _merge(out, part_acc, part_ml, hkv: int, parts):
    """Stage 3: the ``parts`` partials of each query row merged into ``out``."""
    b, hq, lq, dv = out.shape
    launch(_attend_merge_kernel)[(b * hq * lq,)](
        out, part_acc, part_ml, *out.stride(), hkv, parts,
        LQ=lq, GROUP=hq // hkv, DV=dv, PARTS_BLOCK=MERGE_BLOCK,
        num_warps=4,
    )
    return out



def mma_splits(batch_kv_heads, capacity: int, device: torch.device, config) -> int:
    """:func:`num_splits` for the ``mma`` variant's launch ``config``
    (:class:`~xquant_fx.kernels.attend_mma.MmaConfig`): ``MIN_SPLIT_TOKENS`` is a four-warp
    program's least share, so a program of fewer warps takes proportionally fewer positions."""
    return num_splits(batch_kv_heads, capacity, device, config.ctas_per_sm,
                      max(attend_mma.GROUP_TOKENS, MIN_SPLIT_TOKENS * config.num_warps // 4))


#: Largest cache capacity (positions) whose ``mma`` launch runs stage 2 as programs of stage 1's
#: (:func:`mma_tail_programs`).
MMA_TAIL_PROGRAMS_CAPACITY = 8192


def mma_tail_programs(config, capacity: int) -> bool:
    """Whether the ``mma`` launch runs stage 2 as programs of stage 1's (``config.tail_programs``,
    else by ``capacity``, a shape-only rule).

    Measured (H100, ``benchmarks/NOTES.md`` runs 47-50): in one launch the tail's blocks run beside
    stage 1's and a launch is gone (1 / 4k: 18.1 against 21.9 µs; 16-64 / 4k and 1-4 at 8k-32k:
    1-4% faster), but the compiled program then holds the tail's code too: 255 registers, and 4
    spill reloads in stage 1's loop, so where the loops are long (at least ~1k positions a split:
    8 / 16k, 1 / 128k, every 64k-128k shape) it was 3-10% slower. Up to 8k positions of capacity a
    split holds at most ~512 at every batch; above it, long splits come from small batches too, and
    the rule keeps the separate launch (1-2 / 16k-32k lose 2-4%)."""
    if config.tail_programs is not None:
        return config.tail_programs
    return capacity <= MMA_TAIL_PROGRAMS_CAPACITY


def _mma_layout_ok(q, k_codes, k_scale, v_codes, v_scale) -> bool:
    """Layouts :mod:`~xquant_fx.kernels.attend_mma` takes: unit channel strides, and key and value
    metadata of one dtype in rows it can load as whole int32 words (two 16-bit or four float8
    values each)."""
    per_word = 4 // k_scale.element_size()
    v_word = min(per_word, v_scale.shape[3])  # a value row of two float8 groups is one 16-bit load
    return (k_scale.dtype == v_scale.dtype and q.stride(3) == 1 and k_codes.stride(3) == 1
            and k_scale.stride(3) == 1 and v_codes.stride(3) == 1 and v_scale.stride(3) == 1
            and all(st % per_word == 0 for st in k_scale.stride()[:3])
            and all(st % v_word == 0 for st in v_scale.stride()[:3]))


def _attend_mma(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n,
                k_bits, v_bits, group, qk_scale, splits, out, mask, mask_bool, mask_len, mask_strides, sinks,
                storage, storage_strides, config=None):
    """The ``mma`` variant: stage 1 of :mod:`~xquant_fx.kernels.attend_mma` (one partial per warp),
    then this module's stage 2 over the positions from ``Nv // 32 * 32`` on, and the merge
    (``storage`` / ``storage_strides``: :func:`_stage_storage`)."""
    b, hq, lq, dk = q.shape
    hkv, R, dv = v_window.shape[1], v_window.shape[2], v_window.shape[3]
    capacity = v_scale.shape[2] + R
    config = config or attend_mma.MmaConfig()
    splits = splits or mma_splits(b * hkv, capacity, q.device, config)
    warps = config.num_warps
    fast_block = attend_mma.GROUP_TOKENS
    tail_programs = mma_tail_programs(config, capacity)
    # Tail programs in stage 1's launch have its warps (one by default): blocks of one key word's
    # positions (16 at 2 bits) spill less of their tiles than 32 positions (560 against 700 bytes).
    tail_block = max(32 // k_bits, 16) if tail_programs else TAIL_BLOCK_N
    tail_parts = _tail_parts(R, fast_block, sinks, tail_block)
    out, part_acc, part_ml = _buffers(q, dv, hkv, splits * warps + tail_parts, out)
    interpret = interpreting()
    common = dict(LQ=lq, GROUP=hq // hkv, KB=k_bits, VB=v_bits, G=group, VG=group, R=R, DK=dk, DV=dv, PACKED=True,
                  HAS_MASK=mask is not None, MASK_BOOL=mask_bool, MASK_SHARED=mask is not None,
                  DOT_DTYPE=_dot_dtype(q.dtype, interpret), DOT_PRECISION=None, INTERPRET=interpret, SINKS=sinks,
                  SINK_BLOCK=_sink_block(sinks))
    grid = (b * hkv, splits + tail_parts if tail_programs else splits)
    launch(_attend_mma_kernel)[grid](
        *storage, part_acc, part_ml,
        *q.stride(), *storage_strides,
        hkv, splits, qk_scale, mask_len,
        LQ=lq, GROUP=hq // hkv, KB=k_bits, VB=v_bits, R=R, DK=dk, DV=dv, TAIL_PARTS=tail_parts,
        META16=k_scale.dtype != torch.float8_e4m3fn and v_scale.dtype != torch.float8_e4m3fn,
        VC_ROW=_row_stride(v_codes), VS_ROW=_row_stride(v_scale), HAS_MASK=mask is not None, MASK_BOOL=mask_bool,
        SINKS=sinks, INTERPRET=interpret, W=warps, LAZY=config.lazy, TAIL_PROGRAMS=tail_programs,
        TAIL_BLOCK_M=_rows_block(hq // hkv * lq), TAIL_BLOCK_N=tail_block, DOT_DTYPE=common["DOT_DTYPE"],
        SINK_BLOCK=common["SINK_BLOCK"],
        num_warps=warps, num_stages=1,  # the loads are pipelined by hand (attend_mma's loop)
        **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}),
    )
    if tail_programs:
        return _merge(out, part_acc, part_ml, hkv, splits * warps + tail_parts)
    return _tail_and_merge(storage, storage_strides, out, part_acc, part_ml, hkv, splits * warps, tail_parts,
                           qk_scale, mask_len, fast_block, common)
