"""Stage 1 of the decode attention (:mod:`xquant_fx.kernels.attend`) on raw codes: ``mma.sync``
fragments built in registers, the scales folded into the other operand.

Layout and grid
---------------
:func:`_stage1_program`, run by :func:`~xquant_fx.kernels.attend._attend_mma_kernel` on grid
``(b * Hkv, S)`` (or ``(b * Hkv, T + S)`` with stage 2's ``T`` programs first), ``W`` warps per
program (:class:`MmaConfig`; one by default, eight programs per multiprocessor). Program
``(bh, s)`` takes the whole key groups
(``G = 32`` tokens) of its slice of ``[0, F)``, ``F = Nv // 32 * 32``; warp ``w`` takes groups
``w, w + W, ...`` of the slice with its own online softmax and writes its own partial
(``s * W + w``), which the merge kernel combines with the others. All of a warp's data lives in
``mma.sync.m16n8k16`` fragments: lane ``(g, t)`` (``lane = 4 g + t``) holds rows ``g``, ``g + 8``
and columns ``2t, 2t + 1`` (``+ 8``) of each tile. Each tensor here is ``[32 * W]``, one element
per thread, so each Triton value is one register of each lane.

Keys, ``S^T = K q^T`` (M: 16 tokens, N: the ``GROUP * Lq <= 8`` query rows, K: 16 channels):
key ``K = c * s + z`` with ``s, z`` per (group, channel), so over a group
``K q^T = c (q * s)^T + z q^T``: the codes multiply ``q' = q * s`` (one packed multiply per
channel pair and group, rounded to the cache dtype) and ``z q^T`` is one more short product. A
code becomes a 16-bit float without arithmetic: ``prmt`` puts the byte of channel ``c`` and of
``c + 1`` that this lane needs in the two halves of a register, and one ``lop3`` masks the code
and ORs in the bit pattern of ``2^(MANT - k)`` (code at mantissa bit ``k``): the half is then
``off + code`` exactly, ``off = 2^(MANT - k)``. The offsets are taken out with ``off * sum(q')``
(a product of ``q'`` with ones) in the accumulator's initial value. Each lane takes four tokens
of a group, the four codes of one byte of a code word (2-bit keys: byte ``g // 2`` of word row
``g % 2``; 1-bit: nibble ``g``), so a word serves four tiles: ~1.5 instructions per register of
two codes, no shared memory, no dequantizing multiply.

Values, ``O^T = V^T P^T`` (M: 16 channels of one value group, N: query rows, K: 16 tokens):
``V = c * s + z`` with ``s, z`` per (token, channel group), so
``V^T P^T = c^T (P * s)^T + z^T P^T`` per group: the codes multiply ``P' = P * s`` (one packed
multiply per token pair and group), and ``z^T P^T`` and the offsets' ``s^T P^T`` come from one
more product per group with ``z`` in rows 0-7 and ``s`` in rows 8-15. ``P`` leaves the score
accumulator as bfloat16 pairs and is transposed into the B operand by ``movmatrix``. The token
order of the value tiles follows the score tiles; the channel order (lane ``g`` takes byte
``g // 2`` or nibble ``g`` of its word) is undone when the partial is stored.

Loads, software-pipelined by hand one phase ahead: each iteration issues the group's value loads
before its scores are computed and the next group's key loads before its values are used, each
set alone in a block behind an always-taken branch (ptxas otherwise sinks loads to their first
use, also into the block after a branch: compiled that way, each group waited for its keys and
then again for its values, two memory latencies per iteration with nothing else to run on 8 warps
per multiprocessor). The loads of one group, per lane: keys 8 x 16 B of codes and 16 x 8 B of
scales / zero points, values 8 x 16 B of codes (32 x 4 B for 2-bit values) and 16 x 8 B of
scales / zero points; metadata is loaded as int32 words (two 16-bit or four float8 values) and
converted where it is used, so a group in flight is ~64 registers per phase. Lanes that share a
vector load it each (8 lanes for value rows and metadata, 4 for key codes): one request per warp
all the same, no shared-memory staging.

Budget per (position, KV head) at K2/V1, head_dim 128 (offline sm_90 compile, Triton 3.6): 80 B
read; 648 SASS instructions a warp executes per group of 32 positions without a mask, 20.3 per
position (691 with a decode mask): 139 LOP3 (128 decode codes, one per register of two through
inline ``lop3``: from plain Triton, ptxas emitted an AND and an OR), 72 HMMA, 64 PRMT, 56 FMUL
(48: the accumulator rescale), 48 LDG, 42 IMAD, 37 SHF, 36 IADD3, 32 HMUL2 (scale folds), the
softmax ~45; 240 registers, 8 warps per multiprocessor, no shared memory, no spills. Four
changes took it there from 808 (run 40's build, profiled at 8 warps per SM issuing 0.47
instructions per cycle per scheduler, i.e. bound by issue): the zero-point product of the
keys as two m16n8k8 products of the pair as loaded (the 16x16 fragment ``(z, z, z', z')`` cost
four copies per chunk), the A operand of the value offsets' sums as four loop-invariant registers
(ptxas rebuilt the constant quad before each product), key metadata addressed from one word
pointer per group (per-chunk element offsets divided by two cost ~8 instructions an address), and
the never-taken side of the value loads' branch kept in its own block (its zeros were set before
the branch, 32 instructions every iteration). Measured (H100, ``benchmarks/NOTES.md`` runs
44-46), they did not pay: 562 µs at batch 8 / 128k against run 40's 509. What did is the lazy
rescale (:class:`MmaConfig` ``lazy``, the default): the running output is rescaled only when a
query row's max grows by more than ``2^LAZY_GROWTH``, a warp-uniform branch that most groups skip
with their 48 multiplies, so ``P`` stays below ``2^8`` (bf16 holds it; fp16 caches rescale at every
group that raises the max, since ``P * s`` must stay in fp16's range). The test must be one
warp's, hence one warp per program: 468 µs at 8 / 128k (2.98x cuDNN SDPA, 48% of copy
bandwidth), 1788 µs at 32 / 128k (3.08x, 50%); one warp per program without it ran as four did.

Requirements (:func:`supports`; else :mod:`xquant_fx.kernels.attend` runs another variant, and
refuses an explicit ``variant="mma"``): 16-bit cache, ``G == 32``, 1- or 2-bit codes, power-of-two
head dims (values at least 64), at most 8 query rows per KV head, channel strides 1, key and
value metadata of one dtype in rows of whole int32 words, and a mask (if any) whose one row serves
all of a program's query rows (decode: ``Lq = 1``; transformers' masks are shared across heads).
The mask's four values per lane and group are loaded with the group's keys, one phase ahead; sink
positions are masked here and attended by the merge, as in the other variants. Under Triton's interpreter the
PTX (``prmt``, ``lop3``, ``mma``, ``movmatrix``, packed multiplies) is emulated on whole tensors
with the same fragment layouts.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from .common import (BF16_BIAS, BF16_MANT, FP16_BIAS, FP16_MANT, apply_mask, head_bases, load_mask, mask_values,
                     round_to, seq_head)

#: Warps per program (the default): each takes its own key groups and writes its own partial.
#: One, so that the lazy rescale's test is one warp's (measured, ``benchmarks/NOTES.md`` runs
#: 44-46: at four warps per program and one, without it, the times were equal).
WARPS = 1
#: Programs resident per multiprocessor at the default (sm_90: 240-246 registers, one warp each).
CTAS_PER_SM = 8


@dataclasses.dataclass(frozen=True)
class MmaConfig:
    """Launch options of :func:`~xquant_fx.kernels.attend._attend_mma_kernel` (``attend(..., variant="mma", config=)``).

    ``num_warps``: warps per program (any of 1, 2, 4: the warps are independent); ``maxnreg``: a register
    cap for ``ptxas`` (None: its own choice; above the need it spills); ``ctas_per_sm``: programs
    expected resident per multiprocessor, which sizes the split (from the registers:
    ``65536 // (32 * num_warps * registers)``, at most 32); ``lazy`` (one warp per program only):
    rescale the running output only when a query row's max grows by more than ``2^LAZY_GROWTH``,
    not at every group that raises it (bf16 caches; with fp16 ``P * s`` must stay in range, so
    those rescale at every group that raises the max, as without ``lazy``); ``tail_programs``: run
    stage 2 (the window, the codes next to it, the sinks) as programs of this launch (True), as a
    launch of its own after it (False), or by the cache's capacity (None:
    :func:`~xquant_fx.kernels.attend.mma_tail_programs`)."""

    num_warps: int = WARPS
    maxnreg: int | None = None
    ctas_per_sm: int = CTAS_PER_SM
    lazy: bool = True
    tail_programs: bool | None = None

    def __post_init__(self):
        if self.num_warps not in (1, 2, 4):
            raise ValueError(f"MmaConfig.num_warps={self.num_warps!r}: expected 1, 2 or 4")
        if self.lazy and self.num_warps != 1:
            raise ValueError("MmaConfig.lazy needs num_warps=1 (the rescale test is a branch per program)")
#: Tokens of one key group, the only group size this stage takes.
GROUP_TOKENS = 32
#: ``MmaConfig.lazy``: how far (log2 units) a row's max may grow before the state is rescaled.
LAZY_GROWTH = tl.constexpr(8.0)


# ------------------------------------------------------------------------------------ bit helpers
@triton.jit
def _half_bits(x):
    """16-bit float (or int16) ``x`` -> its bit pattern in the low half of an int32."""
    return x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pack(lo, hi):
    """Two 16-bit floats -> one int32 register (``lo`` in bits 0-15)."""
    return _half_bits(lo) | (_half_bits(hi) << 16)


@triton.jit
def _unpack(x, KV_DTYPE: tl.constexpr):
    """int32 register -> its two 16-bit floats as float32 (low half first)."""
    lo = (x & 0xFFFF).to(tl.int16).to(KV_DTYPE, bitcast=True).to(tl.float32)
    hi = ((x >> 16) & 0xFFFF).to(tl.int16).to(KV_DTYPE, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pack_f32(lo, hi, KV_DTYPE: tl.constexpr):
    """Two float32 values rounded to ``KV_DTYPE`` (to nearest even) and packed."""
    return _pack(round_to(lo, KV_DTYPE), round_to(hi, KV_DTYPE))


@triton.jit
def _x2_asm(OP: tl.constexpr, OPERANDS: tl.constexpr, CONSTRAINTS: tl.constexpr, x, y, KV_DTYPE: tl.constexpr):
    """One packed PTX instruction ``OP.bf16x2`` / ``OP.f16x2`` (as ``KV_DTYPE``) ``OPERANDS`` on
    ``x`` and ``y``, an int32 register of two 16-bit floats per element."""
    X2: tl.constexpr = ".bf16x2" if KV_DTYPE == tl.bfloat16 else ".f16x2"
    return tl.inline_asm_elementwise(OP + X2 + OPERANDS, CONSTRAINTS, [x, y], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _cvt_pack(lo, hi, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """:func:`_pack_f32` in one instruction on the GPU (``cvt.rn.bf16x2.f32`` / ``.f16x2``)."""
    if INTERPRET:
        return _pack_f32(lo, hi, KV_DTYPE)
    else:
        return _x2_asm("cvt.rn", ".f32 $0, $2, $1;", "=r,f,f", lo, hi, KV_DTYPE)


@triton.jit
def _prmt(a, b, sel, INTERPRET: tl.constexpr):
    """PTX ``prmt.b32``: byte ``i`` of the result is byte ``sel[4i + 3 : 4i] & 7`` of ``{b, a}``."""
    if INTERPRET:
        out = tl.zeros_like(a)
        for i in tl.static_range(4):
            n = (sel >> (4 * i)) & 7
            src = tl.where(n < 4, a, b)
            out = out | (((src >> (8 * (n & 3))) & 0xFF) << (8 * i))
        return out
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mul2(x, y, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Packed multiply of two registers of 16-bit floats, rounded to ``KV_DTYPE``."""
    if INTERPRET:
        xl, xh = _unpack(x, KV_DTYPE)
        yl, yh = _unpack(y, KV_DTYPE)
        return _pack_f32(xl * yl, xh * yh, KV_DTYPE)
    else:
        return _x2_asm("mul.rn", " $0, $1, $2;", "=r,r,r", x, y, KV_DTYPE)


# ------------------------------------------------------------------------------------ fragments
@triton.jit
def _lanes(NT: tl.constexpr):
    """``(g, t)`` of each thread: ``lane = 4 g + t``."""
    lane = tl.arange(0, NT) % 32
    return lane // 4, lane % 4


@triton.jit
def _to_warps(x, NT: tl.constexpr):
    """``[NT]`` -> ``[W, 8, 4]`` (warp, g, t): a relabelling, no data moves."""
    return tl.reshape(x, (NT // 32, 8, 4))


@triton.jit
def _unpack_tile(r0, r1, NT: tl.constexpr, KV_DTYPE: tl.constexpr):
    """Interpreter: two registers holding an 8x16 slab (``r0``: columns ``2t, 2t + 1``, ``r1``: the
    same plus 8, row ``g``) -> float32 ``[W, 8, 16]``."""
    W: tl.constexpr = NT // 32
    a_lo, a_hi = _unpack(_to_warps(r0, NT), KV_DTYPE)
    b_lo, b_hi = _unpack(_to_warps(r1, NT), KV_DTYPE)
    left = tl.reshape(tl.join(a_lo, a_hi), (W, 8, 8))
    right = tl.reshape(tl.join(b_lo, b_hi), (W, 8, 8))
    return tl.reshape(tl.permute(tl.join(left, right), (0, 1, 3, 2)), (W, 8, 16))


@triton.jit
def _rows_to_lanes(d, NT: tl.constexpr):
    """Interpreter: float32 ``[W, 8, 8]`` (row ``g``, column ``2t + e``) -> the two registers
    ``e = 0, 1`` of each lane."""
    W: tl.constexpr = NT // 32
    lo, hi = tl.split(tl.reshape(d, (W, 8, 4, 2)))
    return tl.reshape(lo, (NT,)), tl.reshape(hi, (NT,))


@triton.jit
def _product_to_lanes(d, c0, c1, c2, c3, NT: tl.constexpr):
    """Interpreter: a product ``[W, 16, 8]`` plus ``C``, as the four accumulator registers of
    each lane (rows ``g`` and ``g + 8``, columns ``2t, 2t + 1``)."""
    W: tl.constexpr = NT // 32
    d_top, d_bottom = tl.split(tl.permute(tl.reshape(d, (W, 2, 8, 8)), (0, 2, 3, 1)))
    d0, d1 = _rows_to_lanes(d_top, NT)
    d2, d3 = _rows_to_lanes(d_bottom, NT)
    return d0 + c0, d1 + c1, d2 + c2, d3 + c3


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3,
         NT: tl.constexpr, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``D = A B + C``, ``mma.sync.aligned.m16n8k16`` with float32 accumulation (A 16x16 and B 16x8
    as 16-bit float registers, C / D 16x8 float32), each argument one register per lane in the
    PTX fragment layout."""
    if INTERPRET:
        W: tl.constexpr = NT // 32
        top = _unpack_tile(a0, a2, NT, KV_DTYPE)  # rows g
        bottom = _unpack_tile(a1, a3, NT, KV_DTYPE)  # rows g + 8
        a = tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (W, 16, 16))
        # B: register b0 of lane (g, t) holds B[2t + e, g], b1 holds B[8 + 2t + e, g]
        bt = _unpack_tile(b0, b1, NT, KV_DTYPE)  # [W, 8 (n = g), 16 (k)]
        d = tl.dot(a, tl.permute(bt, (0, 2, 1)), input_precision="ieee")  # [W, 16, 8]
        return _product_to_lanes(d, c0, c1, c2, c3, NT)
    else:
        AB: tl.constexpr = ".bf16.bf16" if KV_DTYPE == tl.bfloat16 else ".f16.f16"
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32" + AB + ".f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
            "{$10,$11,$12,$13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _unpack_half(r, NT: tl.constexpr, KV_DTYPE: tl.constexpr):
    """Interpreter: one register holding an 8x8 slab (row ``g``, columns ``2t, 2t + 1``) -> float32
    ``[W, 8, 8]``."""
    W: tl.constexpr = NT // 32
    lo, hi = _unpack(_to_warps(r, NT), KV_DTYPE)
    return tl.reshape(tl.join(lo, hi), (W, 8, 8))


@triton.jit
def _mma_k8(a0, a1, b0, c0, c1, c2, c3, NT: tl.constexpr, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``D = A B + C``, ``mma.sync.aligned.m16n8k8`` (A 16x8: ``a0`` rows ``g``, ``a1`` rows
    ``g + 8``; B 8x8: ``b0`` = ``B[2t + e, g]``; C / D as in :func:`_mma`). Where one operand pair
    is already two adjacent registers (a 64-bit load), two of these spare the copies a 16x16
    fragment of repeated registers costs."""
    if INTERPRET:
        W: tl.constexpr = NT // 32
        top = _unpack_half(a0, NT, KV_DTYPE)
        bottom = _unpack_half(a1, NT, KV_DTYPE)
        a = tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (W, 16, 8))
        b = tl.permute(_unpack_half(b0, NT, KV_DTYPE), (0, 2, 1))  # [W, 8 (k), 8 (n)]
        d = tl.sum(a[:, :, :, None] * b[:, None, :, :], axis=2)  # [W, 16, 8] (tl.dot takes k >= 16)
        return _product_to_lanes(d, c0, c1, c2, c3, NT)
    else:
        AB: tl.constexpr = ".bf16.bf16" if KV_DTYPE == tl.bfloat16 else ".f16.f16"
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k8.row.col.f32" + AB + ".f32 {$0,$1,$2,$3}, {$4,$5}, {$6}, {$7,$8,$9,$10};",
            "=f,=f,=f,=f,r,r,r,0,1,2,3", [a0, a1, b0, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _transpose8(x, NT: tl.constexpr, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``movmatrix.sync.aligned.m8n8.trans.b16``: lane ``(g, t)`` holding ``X[g, 2t + e]`` gets
    ``X[2t + e, g]``."""
    if INTERPRET:
        W: tl.constexpr = NT // 32
        lo, hi = _unpack(_to_warps(x, NT), KV_DTYPE)
        m = tl.reshape(tl.join(lo, hi), (W, 8, 8))
        mt = tl.reshape(tl.permute(m, (0, 2, 1)), (W, 8, 4, 2))
        a, b = tl.split(mt)
        return tl.reshape(_pack_f32(a, b, KV_DTYPE), (NT,))
    else:
        return tl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [x],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _codes4(x, sh, BITS: tl.constexpr, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The four codes of the byte (or nibble at bit ``sh``) that ``x`` holds in each half (see
    :func:`_byte_pairs`), as four registers of two 16-bit floats ``off_j + code``; the offsets are
    :func:`_offset` ``(j)``. 2-bit: codes at bits 0, 2, 4, 6 (the last shifted to bit 4: bit 7 is
    bfloat16's exponent); 1-bit: bits ``sh .. sh + 3``."""
    MANT: tl.constexpr = FP16_MANT if KV_DTYPE == tl.float16 else BF16_MANT
    BIAS: tl.constexpr = FP16_BIAS if KV_DTYPE == tl.float16 else BF16_BIAS
    if BITS == 2:
        r0 = _and_or(x, 0x00030003, ((BIAS + MANT) << MANT) * 0x10001, INTERPRET)
        r1 = _and_or(x, 0x000C000C, ((BIAS + MANT - 2) << MANT) * 0x10001, INTERPRET)
        r2 = _and_or(x, 0x00300030, ((BIAS + MANT - 4) << MANT) * 0x10001, INTERPRET)
        r3 = _and_or(x >> 2, 0x00300030, ((BIAS + MANT - 4) << MANT) * 0x10001, INTERPRET)
    else:
        y = x >> sh
        r0 = _and_or(y, 0x00010001, ((BIAS + MANT) << MANT) * 0x10001, INTERPRET)
        r1 = _and_or(y, 0x00020002, ((BIAS + MANT - 1) << MANT) * 0x10001, INTERPRET)
        r2 = _and_or(y, 0x00040004, ((BIAS + MANT - 2) << MANT) * 0x10001, INTERPRET)
        r3 = _and_or(y, 0x00080008, ((BIAS + MANT - 3) << MANT) * 0x10001, INTERPRET)
    return r0, r1, r2, r3


@triton.jit
def _and_or(x, MASK: tl.constexpr, MAGIC: tl.constexpr, INTERPRET: tl.constexpr):
    """``(x & MASK) | MAGIC`` as one ``lop3`` (left to itself, ptxas emits an AND and an OR, each
    with its constant as an immediate; here the magic is a register operand)."""
    if INTERPRET:
        return (x & MASK) | MAGIC
    else:
        return tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, {MAGIC}, 0xEA;", "=r,r", [x],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _offset(j: tl.constexpr, BITS: tl.constexpr, KV_DTYPE: tl.constexpr):
    """The constant ``off_j`` that :func:`_codes4` adds to code ``j`` of a byte."""
    MANT: tl.constexpr = FP16_MANT if KV_DTYPE == tl.float16 else BF16_MANT
    if BITS == 2:
        K: tl.constexpr = 4 if j == 3 else 2 * j
    else:
        K: tl.constexpr = j
    return float(2 ** (MANT - K))


@triton.jit
def _split4(x, NT: tl.constexpr):
    """``[NT, 4]`` -> its four columns, each ``[NT]``."""
    a, b = tl.split(tl.reshape(x, (NT, 2, 2)))  # a: columns 0, 2; b: 1, 3
    x0, x2 = tl.split(a)
    x1, x3 = tl.split(b)
    return x0, x1, x2, x3


@triton.jit
def _load4(base, off, NT: tl.constexpr):
    """Four consecutive elements at ``base + off`` per lane (one vector load), as four ``[NT]``."""
    return _split4(tl.load(base + off[:, None] + tl.arange(0, 4)[None, :]), NT)


@triton.jit
def _byte_sel(byte):
    """``prmt`` selector that puts byte ``byte`` of ``a`` in bits 0-7 and of ``b`` in bits 16-23."""
    return byte | ((byte + 4) << 8)


# ------------------------------------------------------------------------------------ kernel
@triton.jit
def _load_words2(words, NT: tl.constexpr):
    """The two int32 words at ``words`` (an int32 pointer per lane) in one 8-byte load."""
    w = tl.load(words[:, None] + tl.arange(0, 2)[None, :])
    return tl.split(tl.reshape(w, (NT, 2)))


@triton.jit
def _load_pairs(base, off, NT: tl.constexpr):
    """Two int32 words at ``base + off`` (16-bit elements, ``off`` even, 4-byte aligned) per lane:
    four 16-bit scales or zero points in one 8-byte load."""
    return _load_words2(base.to(tl.pointer_type(tl.int32)) + off // 2, NT)


@triton.jit
def _key_loads(kc_base, ks_base, kz_base, group, valid, g, t, s_kct, s_kst,
               KB: tl.constexpr, DK: tl.constexpr, NT: tl.constexpr, META16: tl.constexpr):
    """The loads of one key group per warp, nothing computed from them (the loop issues them one
    phase ahead of their use): per 16-channel chunk ``k``, the lane's four code words (channels
    ``16 k + 4 t ..``, word row :func:`_token`'s ``g % 2`` for 2-bit keys) and its four channels'
    scales and zero points (``META16``: two words of two 16-bit values; else one word of four
    float8 values: metadata is loaded as words, so a group's loads stay few registers).
    ``valid``: whether this warp's group exists (else group 0 is read: the scores are dropped)."""
    NCH: tl.constexpr = DK // 16
    grp = tl.where(valid, group, 0).to(tl.int64)
    if KB == 2:
        row = 2 * grp + g % 2
    else:
        row = grp
    # Metadata as int32 words from one word address per lane and group, each chunk at a constant
    # offset from it (the group stride is a whole number of words: ``_mma_layout_ok``); computed
    # per chunk from element offsets, each address cost ~8 instructions.
    PER_WORD: tl.constexpr = 2 if META16 else 4
    meta = grp * (s_kst // PER_WORD) + (4 // PER_WORD) * t
    ks_words = ks_base.to(tl.pointer_type(tl.int32)) + meta
    kz_words = kz_base.to(tl.pointer_type(tl.int32)) + meta
    words = ()
    scales = ()
    zeros = ()
    for k in tl.static_range(NCH):
        ch = 16 * k + 4 * t  # the lane's 4 channels of this chunk
        words = words + (_load4(kc_base, row * s_kct + ch, NT),)
        if META16:  # two words of two 16-bit values
            scales = scales + (_load_words2(ks_words + 8 * k, NT),)
            zeros = zeros + (_load_words2(kz_words + 8 * k, NT),)
        else:  # four float8 values: one word
            scales = scales + (tl.load(ks_words + 4 * k),)
            zeros = zeros + (tl.load(kz_words + 4 * k),)
    return words, scales, zeros


@triton.jit
def _mask_loads(mask_row, group, valid, g, s_mt, mask_len, KB: tl.constexpr, HAS_MASK: tl.constexpr,
                MASK_BOOL: tl.constexpr):
    """The caller's mask at the four tokens of a key group this lane's score rows hold
    (:func:`_token` ``(g, j)``, ``j < 4``): raw values, issued with the group's key loads.
    ``mask_row``: the row all query rows of the program share. Positions at or past ``mask_len``
    (and groups that do not exist) read as masked. Without a mask: an empty tuple."""
    vals = ()
    if HAS_MASK:
        pos = tl.where(valid, group, 0).to(tl.int64) * 32 + _token(g, 0, KB)
        for j in tl.static_range(4):
            vals = vals + (load_mask(mask_row + (pos + j) * s_mt, valid & (pos + j < mask_len), MASK_BOOL),)
    return vals


@triton.jit
def _mask_group(x, mvals, gbase, g, KB: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                SINKS: tl.constexpr):
    """The scores ``x`` of one group (``x[i]``: token :func:`_token` ``(g, i // 2)``, log2 units)
    with the caller's mask (``mvals`` from :func:`_mask_loads`) and the sink floor applied
    (positions below ``SINKS`` are the sink buffers', attended apart)."""
    out = ()
    for i in tl.static_range(8):
        xi = x[i]
        if HAS_MASK:
            xi = apply_mask(xi, mask_values(mvals[i // 2], MASK_BOOL), MASK_BOOL)
        if SINKS > 0:
            xi = tl.where(gbase + _token(g, i // 2, KB) >= SINKS, xi, float("-inf"))
        out = out + (xi,)
    return out


@triton.jit
def _fp8_byte(w, i: tl.constexpr, INTERPRET: tl.constexpr):
    """Byte ``i`` of int32 ``w`` read as a float8 e4m3 value, in float32. By bits, in four
    instructions: the byte at the top of a word (``prmt``), shifted arithmetically by 4 and masked,
    is the float32 with e4m3's sign, exponent and mantissa, i.e. the value times 2^-120
    (subnormals included); one multiply by 2^120 restores it. (Triton's own conversion took more
    instructions and registers than this kernel has to spare: the float8 build spilled.)"""
    top = _prmt(w, w * 0, (i << 12) | 0x444, INTERPRET)  # byte i in bits 24-31, zeros below
    bits = (top >> 4) & -0x78100000  # 0x87F00000: the sign, then exponent and mantissa at bit 20
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120


@triton.jit
def _meta_pairs(x, META16: tl.constexpr, KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A chunk's four key scales (or zero points) as loaded by :func:`_key_loads` -> two registers
    of two 16-bit floats (channels 0, 1 and 2, 3)."""
    if META16:
        return x
    else:
        # exact: every e4m3 value is a 16-bit float
        return (_cvt_pack(_fp8_byte(x, 0, INTERPRET), _fp8_byte(x, 1, INTERPRET), KV_DTYPE, INTERPRET),
                _cvt_pack(_fp8_byte(x, 2, INTERPRET), _fp8_byte(x, 3, INTERPRET), KV_DTYPE, INTERPRET))


@triton.jit
def _key_group(kd, qb, g,
               KB: tl.constexpr, DK: tl.constexpr, NT: tl.constexpr, META16: tl.constexpr,
               KV_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Scores of one key group per warp from its loads ``kd`` (:func:`_key_loads`):
    ``((S00, S01, S02, S03), (S10, ...))``, the accumulators of the two 16-token tiles (rows ``g``
    / ``g + 8``: tokens :func:`_token` ``(g, 2m)`` / ``(g, 2m + 1)``, columns: query rows
    ``2t, 2t + 1``), unscaled ``q . k``.

    ``qb``: the query's B fragments (``2 * DK / 16`` registers: channels ``16 k + 4 t + (0, 1)``
    and ``+ (2, 3)`` of query row ``g``)."""
    NCH: tl.constexpr = DK // 16
    words, scales, zeros = kd
    sel = _byte_sel(g // 2)
    if KB == 2:
        sh = g * 0
    else:
        sh = 4 * (g % 2)
    ones = tl.full((NT,), 1.0, tl.float32)
    one2 = _pack_f32(ones, ones, KV_DTYPE)
    zero = tl.zeros((NT,), tl.float32)
    # z q^T as two m16n8k8 products of the pair (z01, z23) as loaded (one 64-bit load: adjacent
    # registers; a 16x16 fragment (z01, z01, z23, z23) cost four copies per chunk): rows g of
    # ``za`` take z01 . q0, rows g + 8 of ``zb`` z23 . q1, the other rows are scratch. Rows g + 8
    # of the ``qs`` product repeat rows g: scratch too. The accumulators run on across chunks.
    za0, za1, za2, za3 = zero, zero, zero, zero
    zb0, zb1, zb2, zb3 = zero, zero, zero, zero
    qs0, qs1, qs2, qs3 = zero, zero, zero, zero
    frags = ()
    for k in tl.static_range(NCH):
        w0, w1, w2, w3 = words[k]
        s01_, s23_ = _meta_pairs(scales[k], META16, KV_DTYPE, INTERPRET)
        z01_, z23_ = _meta_pairs(zeros[k], META16, KV_DTYPE, INTERPRET)
        q0 = qb[2 * k]
        q1 = qb[2 * k + 1]
        p0 = _mul2(q0, s01_, KV_DTYPE, INTERPRET)
        p1 = _mul2(q1, s23_, KV_DTYPE, INTERPRET)
        # z q^T and the sum of q' (for the code offsets)
        za0, za1, za2, za3 = _mma_k8(z01_, z23_, q0, za0, za1, za2, za3, NT, KV_DTYPE, INTERPRET)
        zb0, zb1, zb2, zb3 = _mma_k8(z01_, z23_, q1, zb0, zb1, zb2, zb3, NT, KV_DTYPE, INTERPRET)
        qs0, qs1, qs2, qs3 = _mma(one2, one2, one2, one2, p0, p1, qs0, qs1, qs2, qs3, NT, KV_DTYPE, INTERPRET)
        frags = frags + ((_prmt(w0, w1, sel, INTERPRET), _prmt(w2, w3, sel, INTERPRET), p0, p1),)
    zq0 = za0 + zb2
    zq1 = za1 + zb3
    # Initial accumulators: z q^T minus the offsets' share, row half h of tile m holding code j = 2m + h.
    s00 = zq0 - _offset(0, KB, KV_DTYPE) * qs0
    s01 = zq1 - _offset(0, KB, KV_DTYPE) * qs1
    s02 = zq0 - _offset(1, KB, KV_DTYPE) * qs0
    s03 = zq1 - _offset(1, KB, KV_DTYPE) * qs1
    s10 = zq0 - _offset(2, KB, KV_DTYPE) * qs0
    s11 = zq1 - _offset(2, KB, KV_DTYPE) * qs1
    s12 = zq0 - _offset(3, KB, KV_DTYPE) * qs0
    s13 = zq1 - _offset(3, KB, KV_DTYPE) * qs1
    for k in tl.static_range(NCH):
        x01, x23, p0, p1 = frags[k]
        c0, c1, c2, c3 = _codes4(x01, sh, KB, KV_DTYPE, INTERPRET)  # channels (0, 1) of the chunk, codes j = 0..3
        d0, d1, d2, d3 = _codes4(x23, sh, KB, KV_DTYPE, INTERPRET)  # channels (2, 3)
        s00, s01, s02, s03 = _mma(c0, c1, d0, d1, p0, p1, s00, s01, s02, s03, NT, KV_DTYPE, INTERPRET)
        s10, s11, s12, s13 = _mma(c2, c3, d2, d3, p0, p1, s10, s11, s12, s13, NT, KV_DTYPE, INTERPRET)
    return (s00, s01, s02, s03), (s10, s11, s12, s13)


@triton.jit
def _token(r, j, KB: tl.constexpr):
    """Token (within its group) of code ``j`` of lane row ``r``: byte ``r // 2`` of word row
    ``r % 2`` (2-bit keys) or nibble ``r`` (1-bit)."""
    if KB == 2:
        return 16 * (r % 2) + 4 * (r // 2) + j
    else:
        return 4 * r + j


@triton.jit
def _value_loads(vc_base, vs_base, vz_base, tok, g, s_vct, s_vst,
                 VB: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr, META16: tl.constexpr):
    """The loads of token ``tok``'s value row, nothing computed from them (issued one phase ahead
    of their use): the code word of each of the ``DV / 32`` channel groups that this lane reads
    (2-bit: the group's word ``g % 2``), and the group scales and zero points as words
    (``META16``: two 16-bit values a word; else four float8 values, two for head_dim 64)."""
    NG: tl.constexpr = DV // 32
    words = ()
    if VB == 1:  # one word per group, NG consecutive words: vector loads
        for q in tl.static_range(NG // 4):
            words = words + _load4(vc_base, tok * s_vct + 4 * q, NT)
        if NG < 4:
            words = words + tl.split(tl.reshape(tl.load(vc_base + tok[:, None] * s_vct + tl.arange(0, 2)[None, :]),
                                                (NT, 2)))
    else:  # two words per group: this lane's is the odd one for odd g
        for gr in tl.static_range(NG):
            words = words + (tl.load(vc_base + tok * s_vct + 2 * gr + g % 2),)
    scales = ()
    zeros = ()
    if META16:
        for q in tl.static_range(NG // 4):
            scales = scales + _load_pairs(vs_base, tok * s_vst + 4 * q, NT)
            zeros = zeros + _load_pairs(vz_base, tok * s_vst + 4 * q, NT)
        if NG < 4:
            scales = scales + (tl.load(vs_base.to(tl.pointer_type(tl.int32)) + tok * s_vst // 2),)
            zeros = zeros + (tl.load(vz_base.to(tl.pointer_type(tl.int32)) + tok * s_vst // 2),)
    else:  # float8: four per word (two groups: one 16-bit load)
        for q in tl.static_range(NG // 4):
            scales = scales + (tl.load(vs_base.to(tl.pointer_type(tl.int32)) + tok * s_vst // 4 + q),)
            zeros = zeros + (tl.load(vz_base.to(tl.pointer_type(tl.int32)) + tok * s_vst // 4 + q),)
        if NG < 4:
            scales = scales + (tl.load(vs_base.to(tl.pointer_type(tl.int16)) + tok * s_vst // 2).to(tl.int32),)
            zeros = zeros + (tl.load(vz_base.to(tl.pointer_type(tl.int16)) + tok * s_vst // 2).to(tl.int32),)
    return words, scales, zeros


@triton.jit
def _value_group_loads(vc_base, vs_base, vz_base, gbase, tok_a, tok_b, g, s_vct, s_vst,
                       VB: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr, META16: tl.constexpr):
    """:func:`_value_loads` of the eight tokens of a group this lane holds in B fragments (tokens
    ``gbase + tok_a + j`` and ``gbase + tok_b + j``, ``j < 4``), as pairs per ``j``."""
    vd = ()
    for j in tl.static_range(4):
        vd = vd + ((_value_loads(vc_base, vs_base, vz_base, gbase + tok_a + j, g, s_vct, s_vst, VB, DV, NT, META16),
                    _value_loads(vc_base, vs_base, vz_base, gbase + tok_b + j, g, s_vct, s_vst, VB, DV, NT, META16)),)
    return vd


@triton.jit
def _value_group_zeros(VB: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr, META16: tl.constexpr):
    """Zeros shaped like :func:`_value_group_loads`' result (constants: nothing stays live)."""
    NG: tl.constexpr = DV // 32
    word = tl.zeros((NT,), tl.int32)
    words = ()
    for _ in tl.static_range(NG):
        words = words + (word,)
    metas = ()
    for _ in tl.static_range(NG // 2 if META16 else (NG + 3) // 4):
        metas = metas + (word,)
    vd = ()
    for _ in tl.static_range(4):
        vd = vd + (((words, metas, metas), (words, metas, metas)),)
    return vd


@triton.jit
def _token_pair_meta(a, b, gr: tl.constexpr, NT: tl.constexpr, META16: tl.constexpr, KV_DTYPE: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """Group ``gr``'s scale (or zero point) of two tokens, as loaded by :func:`_value_loads`
    (``a``, ``b``), in one register: ``a``'s in the low half, ``b``'s in the high half."""
    if META16:  # one prmt: half gr % 2 of word gr // 2 of each
        sel = tl.full((NT,), 0x7632 if gr % 2 == 1 else 0x5410, tl.int32)
        return _prmt(a[gr // 2], b[gr // 2], sel, INTERPRET)
    else:
        return _cvt_pack(_fp8_byte(a[gr // 4], gr % 4, INTERPRET), _fp8_byte(b[gr // 4], gr % 4, INTERPRET),
                         KV_DTYPE, INTERPRET)


@triton.jit
def _stage1_program(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, n_ptr, mask_ptr,
    part_acc_ptr, part_ml_ptr, pid_bh, split,
    s_qb, s_qh, s_ql,
    s_kcb, s_kch, s_kct,
    s_ksb, s_ksh, s_kst,
    s_vcb, s_vch, s_vct,
    s_vsb, s_vsh, s_vst,
    s_mb, s_mh, s_mt,
    num_kv_heads, num_splits, qk_scale, mask_len,
    LQ: tl.constexpr, GROUP: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, TAIL_PARTS: tl.constexpr, META16: tl.constexpr,
    VC_ROW: tl.constexpr, VS_ROW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    SINKS: tl.constexpr, INTERPRET: tl.constexpr, W: tl.constexpr, LAZY: tl.constexpr,
):
    """Stage 1's split ``split`` of (sequence, KV head) ``pid_bh`` (see the module docstring). Writes partials
    ``split * W + w`` of ``part_acc [b * Hkv, S * W + T, GROUP * Lq, DV]`` /
    ``part_ml [.., 2, GROUP * Lq]`` as the other stage-1 kernels do (max in log2 units).
    ``HAS_MASK``: the caller's mask, one row ``[mask_len]`` shared by all the program's query rows
    (``Lq = 1`` or constant along it, and constant across the GQA group or ``GROUP = 1``), bool
    (``MASK_BOOL``) or additive; ``SINKS``: positions below it are masked here."""
    NT: tl.constexpr = 32 * W
    NG: tl.constexpr = DV // 32
    M: tl.constexpr = GROUP * LQ
    KV_DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    # fp16: P' = P * s must stay in range, so P <= 1 (a rescale at every group that raises the max)
    LAZY_RESCALE: tl.constexpr = LAZY and KV_DTYPE == tl.bfloat16
    bi, hi = seq_head(pid_bh, num_kv_heads)
    # Value rows are a few words long: their lengths as constants let Triton load them as vectors.
    if VC_ROW > 0:
        s_vct = VC_ROW
    if VS_ROW > 0:
        s_vst = VS_ROW
    qk_scale = tl.cast(qk_scale, tl.float32)
    n = tl.load(n_ptr).to(tl.int32)
    groups = tl.maximum(n - R, 0) // 32  # whole key groups below Nv
    per_split = tl.cdiv(groups, num_splits)
    g_lo = split * per_split
    g_hi = tl.minimum(g_lo + per_split, groups)

    warp = tl.arange(0, NT) // 32
    g, t = _lanes(NT)
    # Query B fragments: row g (zero past the M rows), channels 16k + 4t + (0, 1) | (2, 3).
    row_ok = g < M
    head = hi * GROUP + g // LQ
    q_row = q_ptr + bi * s_qb + head * s_qh + (g % LQ) * s_ql
    qb = ()
    for kq in tl.static_range(DK // 16):
        qx = tl.load(q_row[:, None] + (16 * kq + 4 * t)[:, None] + tl.arange(0, 4)[None, :],
                     mask=row_ok[:, None], other=0.0)
        x0, x1, x2, x3 = _split4(qx, NT)
        qb = qb + (_pack(x0, x1), _pack(x2, x3))

    kc_base, ks_base, kz_base = head_bases(kc_ptr, ks_ptr, kz_ptr, bi, hi, s_kcb, s_kch, s_ksb, s_ksh)
    vc_base, vs_base, vz_base = head_bases(vc_ptr, vs_ptr, vz_ptr, bi, hi, s_vcb, s_vch, s_vsb, s_vsh)
    mask_row = mask_ptr + bi.to(tl.int64) * s_mb + (hi * GROUP).to(tl.int64) * s_mh

    zero = tl.zeros((NT,), tl.float32)
    m0 = tl.full((NT,), float("-inf"), tl.float32)  # running max of query rows 2t, 2t + 1
    m1 = m0
    l0, l1 = zero, zero
    acc = ()
    for _ in tl.static_range(4 * 2 * NG + 4 * NG):  # 2 tiles of 16 channels per group, then z / s terms
        acc = acc + (zero,)
    if KB == 2:
        tok_a = 4 * t  # tokens of B rows 2t (a) and 2t + 1 (b) in tile half h, code j = 2m + h
        tok_b = 16 + 4 * t
    else:
        tok_a = 8 * t
        tok_b = 8 * t + 4
    sh_v = 4 * (g % 2) if VB == 1 else g * 0
    sel_v = _byte_sel(g // 2)
    one2 = _pack_f32(tl.full((NT,), 1.0, tl.float32), tl.full((NT,), 1.0, tl.float32), KV_DTYPE)
    nil = one2 * 0
    # The A operand of the products that sum P' (rows g + 8 of the zero-point accumulators): four
    # distinct loop-invariant registers, so the loop does not rebuild the quad for every product.
    # (Selected on values of n that never occur, so that ptxas cannot see them as constants, which
    # it would set again before each use.)
    ones_a = (tl.where(n == -3, g, nil), tl.where(n == -4, g, one2), tl.where(n == -5, g, nil),
              tl.where(n == -6, g, one2))
    # Software pipelining by hand, one phase ahead: a group's value loads are issued before its
    # scores are computed, the next group's key loads before this group's values are used, so
    # each warp always has one phase's loads in flight (Triton's pipeliner does not stage these
    # per-lane loads; left to ptxas, each group waited for its keys and then for its values).
    # ptxas sinks loads towards their first use, also past branches into the block after them,
    # so each phase's loads sit alone in a block behind a branch that is always taken (``n`` is
    # never negative; two different tests, so that LLVM does not merge the blocks): moving them
    # out of it would execute them on the other path, which ptxas does not do.
    kd = _key_loads(kc_base, ks_base, kz_base, g_lo + warp, g_lo + warp < g_hi, g, t, s_kct, s_kst,
                    KB, DK, NT, META16)
    md = _mask_loads(mask_row, g_lo + warp, g_lo + warp < g_hi, g, s_mt, mask_len, KB, HAS_MASK, MASK_BOOL)
    for r in range(0, tl.cdiv(g_hi - g_lo, W)):
        group = g_lo + r * W + warp
        valid = group < g_hi
        gbase = tl.where(valid, group, 0).to(tl.int64) * 32
        if n != -1:
            vd = _value_group_loads(vc_base, vs_base, vz_base, gbase, tok_a, tok_b, g, s_vct, s_vst, VB, DV, NT, META16)
        else:  # never runs. The store (masked off) keeps this block apart: without it the zeros
            # the untaken side yields were set before the branch, 64 registers every iteration.
            vd = _value_group_zeros(VB, DV, NT, META16)
            tl.store(part_ml_ptr + warp, m0, mask=warp < 0)
        s0, s1 = _key_group(kd, qb, g, KB, DK, NT, META16, KV_DTYPE, INTERPRET)
        mv = md
        if n != -2:
            kd = _key_loads(kc_base, ks_base, kz_base, group + W, group + W < g_hi, g, t, s_kct, s_kst,
                            KB, DK, NT, META16)
            md = _mask_loads(mask_row, group + W, group + W < g_hi, g, s_mt, mask_len, KB, HAS_MASK, MASK_BOOL)
        # (not folded into q: q * scale rounded to 16 bits would put an error of its own on
        # z . q, the same at every position of the codes but not at the window's)
        x = (s0[0] * qk_scale, s0[1] * qk_scale, s0[2] * qk_scale, s0[3] * qk_scale,
             s1[0] * qk_scale, s1[1] * qk_scale, s1[2] * qk_scale, s1[3] * qk_scale)
        if HAS_MASK or SINKS > 0:
            x = _mask_group(x, mv, gbase, g, KB, HAS_MASK, MASK_BOOL, SINKS)
        # x[4m + 2h + e]: token _token(g + 8h ... ) code j = 2m + h, query row 2t + e
        bx0 = tl.maximum(tl.maximum(x[0], x[2]), tl.maximum(x[4], x[6]))
        bx1 = tl.maximum(tl.maximum(x[1], x[3]), tl.maximum(x[5], x[7]))
        bx0 = tl.where(valid, bx0, float("-inf"))
        bx1 = tl.where(valid, bx1, float("-inf"))
        bx0 = tl.reshape(tl.broadcast_to(tl.max(_to_warps(bx0, NT), axis=1, keep_dims=True), (W, 8, 4)), (NT,))
        bx1 = tl.reshape(tl.broadcast_to(tl.max(_to_warps(bx1, NT), axis=1, keep_dims=True), (W, 8, 4)), (NT,))
        n0 = tl.maximum(m0, bx0)
        n1 = tl.maximum(m1, bx1)
        if LAZY_RESCALE:
            # The reference max moves (and the state is rescaled) only when a row's max grows by
            # more than LAZY_GROWTH (log2 units): P then stays below 2^LAZY_GROWTH, and most groups
            # skip the 12 * NG multiplies. One warp per program, so the test is warp-uniform.
            grow = tl.max(((n0 > m0 + LAZY_GROWTH) | (n1 > m1 + LAZY_GROWTH)).to(tl.int32), axis=0)
            if grow != 0:
                acc, l0, l1, m0, m1 = _move_max(acc, l0, l1, m0, m1, n0, n1, NG)
        else:
            acc, l0, l1, m0, m1 = _move_max(acc, l0, l1, m0, m1, n0, n1, NG)
        r0 = tl.where(m0 == float("-inf"), 0.0, m0)
        r1 = tl.where(m1 == float("-inf"), 0.0, m1)
        p = ()
        for i in tl.static_range(8):
            pe = tl.math.exp2(x[i] - (r0 if i % 2 == 0 else r1))
            p = p + (tl.where(valid, pe, 0.0),)
        l0 = l0 + (p[0] + p[2] + p[4] + p[6])
        l1 = l1 + (p[1] + p[3] + p[5] + p[7])
        # P^T as B fragments: block (m, h) holds tokens of code j = 2m + h at rows g; transposed,
        # lane (g, t) holds query row g of tokens rows 2t, 2t + 1 (tok_a + j, tok_b + j).
        pb = ()
        for i in tl.static_range(4):
            pb = pb + (_transpose8(_cvt_pack(p[2 * i], p[2 * i + 1], KV_DTYPE, INTERPRET), NT, KV_DTYPE, INTERPRET),)
        out = ()
        zacc = ()
        for gr in tl.static_range(NG):
            # the running state, already on the reference max (columns 2t / 2t + 1 of the tiles)
            t0 = (acc[8 * gr], acc[8 * gr + 1], acc[8 * gr + 2], acc[8 * gr + 3])
            t1 = (acc[8 * gr + 4], acc[8 * gr + 5], acc[8 * gr + 6], acc[8 * gr + 7])
            zt = (acc[8 * NG + 4 * gr], acc[8 * NG + 4 * gr + 1], acc[8 * NG + 4 * gr + 2], acc[8 * NG + 4 * gr + 3])
            # k-chunk c: B rows 0-7 hold code j = 2c (tokens tok_a / tok_b + 2c), rows 8-15 j = 2c + 1
            for c in tl.static_range(2):
                a0_, b0_ = vd[2 * c]  # (words, scales, zeros) of tokens tok_a / tok_b + 2c
                a1_, b1_ = vd[2 * c + 1]
                e0, e1, e2, e3 = _codes4(_prmt(a0_[0][gr], b0_[0][gr], sel_v, INTERPRET), sh_v, VB, KV_DTYPE, INTERPRET)
                f0, f1, f2, f3 = _codes4(_prmt(a1_[0][gr], b1_[0][gr], sel_v, INTERPRET), sh_v, VB, KV_DTYPE, INTERPRET)
                s_lo = _token_pair_meta(a0_[1], b0_[1], gr, NT, META16, KV_DTYPE, INTERPRET)
                s_hi = _token_pair_meta(a1_[1], b1_[1], gr, NT, META16, KV_DTYPE, INTERPRET)
                z_lo = _token_pair_meta(a0_[2], b0_[2], gr, NT, META16, KV_DTYPE, INTERPRET)
                z_hi = _token_pair_meta(a1_[2], b1_[2], gr, NT, META16, KV_DTYPE, INTERPRET)
                p_lo = _mul2(pb[2 * c], s_lo, KV_DTYPE, INTERPRET)
                p_hi = _mul2(pb[2 * c + 1], s_hi, KV_DTYPE, INTERPRET)
                # channel tiles of the group: rows g / g + 8 hold channel codes i = 0 / 1 (t0), 2 / 3 (t1)
                t0 = _mma(e0, e1, f0, f1, p_lo, p_hi, t0[0], t0[1], t0[2], t0[3], NT, KV_DTYPE, INTERPRET)
                t1 = _mma(e2, e3, f2, f3, p_lo, p_hi, t1[0], t1[1], t1[2], t1[3], NT, KV_DTYPE, INTERPRET)
                # rows 0-7: z^T P^T; rows 8-15: the sums of P' (the code offsets' share, over the
                # rounded P' the codes were multiplied with)
                zt = _mma(z_lo, nil, z_hi, nil, pb[2 * c], pb[2 * c + 1], zt[0], zt[1], zt[2], zt[3],
                          NT, KV_DTYPE, INTERPRET)
                zt = _mma(ones_a[0], ones_a[1], ones_a[2], ones_a[3], p_lo, p_hi, zt[0], zt[1], zt[2], zt[3],
                          NT, KV_DTYPE, INTERPRET)
            out = out + t0 + t1
            zacc = zacc + zt
        acc = out + zacc
    _store_warp_partials(part_acc_ptr, part_ml_ptr, pid_bh, split, num_splits, warp, g, t, acc, m0, m1, l0, l1,
                         M, NG, VB, DV, NT, TAIL_PARTS, KV_DTYPE)


@triton.jit
def _move_max(acc, l0, l1, m0, m1, n0, n1, NG: tl.constexpr):
    """The running state moved from the maxima ``m0, m1`` of query rows ``2t, 2t + 1`` to
    ``n0, n1``: the accumulators (even registers: row 2t; odd: 2t + 1) and sums times
    ``2^(m - n)``; returns ``(acc, l0, l1, n0, n1)``."""
    a0 = tl.math.exp2(m0 - tl.where(n0 == float("-inf"), 0.0, n0))
    a1 = tl.math.exp2(m1 - tl.where(n1 == float("-inf"), 0.0, n1))
    out = ()
    for i in tl.static_range(12 * NG):
        out = out + (acc[i] * (a0 if i % 2 == 0 else a1),)
    return out, l0 * a0, l1 * a1, n0, n1


@triton.jit
def _row_sum(x, NT: tl.constexpr):
    """Sum over the 8 lanes ``g`` that share ``t`` (a query row's share of a warp), broadcast back."""
    W: tl.constexpr = NT // 32
    return tl.reshape(tl.broadcast_to(tl.sum(_to_warps(x, NT), axis=1, keep_dims=True), (W, 8, 4)), (NT,))


@triton.jit
def _store_warp_partials(part_acc_ptr, part_ml_ptr, pid_bh, split, num_splits, warp, g, t, acc, m0, m1, l0, l1,
                         M: tl.constexpr, NG: tl.constexpr, VB: tl.constexpr, DV: tl.constexpr, NT: tl.constexpr,
                         TAIL_PARTS: tl.constexpr, KV_DTYPE: tl.constexpr):
    """Each warp's partial ``split * W + warp``: running max and sum of query rows ``2t, 2t + 1``
    (from lanes ``g = 0``), and the output columns with the value-code offsets and zero points
    applied (``acc + z^T P^T - off_i * s^T P^T``), channels in order."""
    W: tl.constexpr = NT // 32
    part = pid_bh.to(tl.int64) * (num_splits * W + TAIL_PARTS) + split * W + warp
    l0 = _row_sum(l0, NT)
    l1 = _row_sum(l1, NT)
    first = g == 0
    for e in tl.static_range(2):
        row = 2 * t + e
        ok = row < M
        tl.store(part_ml_ptr + part * 2 * M + row, m0 if e == 0 else m1, mask=ok & first)
        tl.store(part_ml_ptr + part * 2 * M + M + row, l0 if e == 0 else l1, mask=ok & first)
        for gr in tl.static_range(NG):
            zz = acc[8 * NG + 4 * gr + e]
            zs = acc[8 * NG + 4 * gr + 2 + e]
            for i in tl.static_range(4):
                if VB == 1:
                    ch = 32 * gr + 4 * g + i
                else:
                    ch = 32 * gr + 16 * (g % 2) + 4 * (g // 2) + i
                val = acc[8 * gr + 4 * (i // 2) + 2 * (i % 2) + e] + zz - _offset(i, VB, KV_DTYPE) * zs
                tl.store(part_acc_ptr + (part * M + row) * DV + ch, val, mask=ok)


def supports(dtype, k_bits: int, v_bits: int, group: int, dk: int, dv: int, rows: int, strides_ok: bool) -> bool:
    """Whether :func:`~xquant_fx.kernels.attend._attend_mma_kernel` takes a layer of this shape (see the module docstring)."""
    import torch

    return (dtype in (torch.float16, torch.bfloat16) and group == GROUP_TOKENS and k_bits in (1, 2)
            and v_bits in (1, 2) and dk % 32 == 0 and dv % 32 == 0 and dv >= 64 and dk >= 32 and rows <= 8
            and strides_ok)

