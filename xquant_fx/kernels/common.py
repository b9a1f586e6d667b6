"""Helpers shared by the cache kernels: code-word packing and unpacking, metadata storage, launch
plumbing."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..config import FP8_E4M3_MAX, QUANT_BITS
#: Largest finite float8 e4m3 value (``XQuantConfig.metadata_dtype="float8_e4m3fn"``).
FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
#: Mantissa bits and exponent bias of the 16-bit cache dtypes, whose bit patterns the packed
#: decoders build directly (pick one with ``FP16_MANT if KV_DTYPE == tl.float16 else BF16_MANT``).
FP16_MANT, FP16_BIAS = tl.constexpr(10), tl.constexpr(15)
BF16_MANT, BF16_BIAS = tl.constexpr(7), tl.constexpr(127)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel):
    """The launchable form of ``kernel``: through :func:`torch.library.wrap_triton`, so that a
    launch inside a ``torch.library.triton_op`` is traced as a Triton kernel call by
    ``torch.compile`` / AOTInductor, and runs the kernel directly in eager mode."""
    return torch.library.wrap_triton(kernel)


def check_bits(name: str, bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"{name}={bits!r}: the kernels unpack {QUANT_BITS}-bit codes")


def check_pow2(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two for the Triton kernels")


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    """Compute capability of a CUDA device, asked once (:func:`check_metadata` runs every step)."""
    return torch.cuda.get_device_capability(device_index)


def check_metadata(kind: str, scale: torch.Tensor, zero: torch.Tensor, window: torch.Tensor) -> None:
    """Scales and zero points of ``kind`` (keys / values) share one dtype: the window's (the model
    dtype) or float8 e4m3 (``XQuantConfig.metadata_dtype``), which on CUDA needs sm_89 or newer."""
    if scale.dtype != zero.dtype or scale.dtype not in (window.dtype, torch.float8_e4m3fn):
        raise ValueError(
            f"{kind} scale / zero point are {scale.dtype} / {zero.dtype}: both must be the cache dtype "
            f"{window.dtype} or torch.float8_e4m3fn"
        )
    if scale.dtype == torch.float8_e4m3fn and scale.device.type == "cuda" and not interpreting():
        major, minor = _capability(scale.device.index if scale.device.index is not None else torch.cuda.current_device())
        if (major, minor) < (8, 9):
            raise ValueError(
                f"float8 scales / zero points (metadata_dtype='float8_e4m3fn') need a GPU of compute capability "
                f"8.9 or newer; this one is {major}.{minor}"
            )


@triton.jit
def seq_head(pid, num_heads):
    """``(sequence, head)`` of program ``pid`` of a ``(batch * num_heads, ...)`` grid, as int64 (they
    scale strides)."""
    return (pid // num_heads).to(tl.int64), (pid % num_heads).to(tl.int64)


@triton.jit
def head_bases(c_ptr, s_ptr, z_ptr, bi, hi, s_cb, s_ch, s_sb, s_sh):
    """The codes, scales and zero points (the last two share strides) of sequence ``bi``, head
    ``hi``: ``(c_base, s_base, z_base)``."""
    return c_ptr + bi * s_cb + hi * s_ch, s_ptr + bi * s_sb + hi * s_sh, z_ptr + bi * s_sb + hi * s_sh


@triton.jit
def bitwise_or(a, b):
    """Combine function of ``tl.reduce``: OR of disjoint bit fields packs codes into words."""
    return a | b


@triton.jit
def codes_to_float(codes):
    """Small non-negative int32 codes (< 2^23) -> exact float32, without an int-to-float
    conversion instruction: ``2^23 + c`` has ``c`` in its mantissa, so OR the code into the bit
    pattern of ``2^23`` and subtract ``2^23`` again."""
    magic = (codes | 0x4B000000).to(tl.float32, bitcast=True)
    return magic - 8388608.0


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 ``x`` -> ``dtype``, rounding to nearest even like ``torch.Tensor.to``.

    bfloat16 is rounded with integer arithmetic on the bit pattern: the GPU's conversion rounds
    to nearest even too, but Triton's CPU interpreter truncates, and the stored scales must be
    bit-exact on both. (Finite values and the usual NaNs; a NaN whose payload sits only in the low
    16 bits would come out as infinity.)
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def to_metadata(x, dtype: tl.constexpr):
    """float32 scales / zero points as stored in ``dtype`` (:func:`xquant_fx.quant.to_metadata`):
    16-bit floats as :func:`round_to`; float8 e4m3 clamped to +-448 and rounded to nearest even
    (:func:`_to_fp8e4m3`)."""
    if dtype == tl.float8e4nv:
        return _to_fp8e4m3(x)
    else:
        return round_to(x, dtype)


@triton.jit
def _to_fp8e4m3(x):
    """float32 -> float8 e4m3 (``torch.float8_e4m3fn``: bias 7, 3 mantissa bits, no infinities,
    largest finite 448), as ``x.clamp(-448, 448).to(torch.float8_e4m3fn)``: NaN stays NaN, the
    rest is clamped, then rounded to nearest even, subnormals included.

    Rounded with integer arithmetic on the bit pattern, like :func:`round_to`'s bfloat16: Triton's
    CPU interpreter rounds this conversion wrongly (no carry into the exponent, halves up,
    subnormals flushed), and the stored metadata must be bit-exact on both.
    """
    x = tl.where(x > FP8_MAX, FP8_MAX, tl.where(x < -FP8_MAX, -FP8_MAX, x))  # NaN compares false: kept
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # Normal results (|x| >= 2^-6): drop 20 of float32's 23 mantissa bits, rounding to nearest
    # even; a carry moves into the exponent by itself. Then rebias the exponent (127 -> 7).
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # Subnormal results (|x| < 2^-6): m = |x| / 2^-9 rounded to nearest even, 0..8 (8 encodes
    # 2^-6, the smallest normal). |x| = mant * 2^(e - 150), so m = mant >> (141 - e), rounded.
    e = a >> 23
    mant = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(tl.maximum(141 - e, 21), 25)  # 21..25 here (25 or more leaves 0: mant < 2^24)
    sub = (mant + (1 << (shift - 1)) - 1 + ((mant >> shift) & 1)) >> shift
    code = tl.where(a >= 0x3C800000, normal, sub)  # 0x3C800000: 2^-6
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return (sign | code).to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def pair_order(N: tl.constexpr, PER: tl.constexpr):
    """``[N]``: the element (token or channel) that slot ``i`` of a packed tile holds.

    A code word holds ``PER`` elements; its two 16-bit halves are decoded together, so slots
    ``2j`` and ``2j + 1`` of each run of ``PER`` hold elements ``j`` and ``j + PER / 2``.
    """
    i = tl.arange(0, N)
    r = i % PER
    return i - r + r // 2 + (r % 2) * (PER // 2)


@triton.jit
def pair_slot_constants(NS: tl.constexpr, B: tl.constexpr, KV_DTYPE: tl.constexpr):
    """Per slot ``j < NS`` (code ``j`` of each 16-bit half of a word, at bit ``B * j``):
    ``(shift, mask, magic, neg_magic)``, int32 ``[NS]``, each of the last three the same 16-bit
    pattern in both halves.

    ``(word >> shift) & mask`` leaves the code at bit ``k < MANT - B + 1`` of each half, inside the
    16-bit float's mantissa; OR-ing ``magic``, the bit pattern of ``2^(MANT - k)``, makes the half
    the float ``2^(MANT - k) + code`` exactly, and adding ``neg_magic`` (``-2^(MANT - k)``) leaves
    the code as a float. ``MANT // B`` consecutive slots share one shift.
    """
    MANT: tl.constexpr = FP16_MANT if KV_DTYPE == tl.float16 else BF16_MANT
    BIAS: tl.constexpr = FP16_BIAS if KV_DTYPE == tl.float16 else BF16_BIAS
    SPB: tl.constexpr = MANT // B  # slots per shift
    j = tl.arange(0, NS)
    k = B * (j % SPB)
    shift = (B * SPB) * (j // SPB)
    mask = ((1 << B) - 1) << k
    magic = (BIAS + MANT - k) << MANT
    neg = magic | 0x8000
    return shift, mask | (mask << 16), magic | (magic << 16), neg | (neg << 16)


@triton.jit
def half_to_float(x, KV_DTYPE: tl.constexpr):
    """The low 16 bits of int32 ``x`` read as a ``KV_DTYPE`` float, in float32 (interpreter)."""
    if KV_DTYPE == tl.float16:
        return (x & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return ((x & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def decode_pairs(x, mask, magic, neg_magic, s_lo, s_hi, z_lo, z_hi,
                 KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Dequantize two codes per int32 element of ``x`` (shifted code words, see
    :func:`pair_slot_constants`): ``(lo, hi)``, the values ``code * s + z`` of the codes in the low
    and high 16-bit halves, rounded to ``KV_DTYPE`` (as ``quant.read_keys`` / ``read_values``
    return them), in ``DOT_DTYPE``. ``s_*`` / ``z_*``: scale and zero point of each half
    (``KV_DTYPE``: a float8 scale or zero point must be converted to it first).

    On the GPU, three instructions per pair: ``lop3`` (mask and magic in one), a packed
    ``add`` (subtract the magic) and a packed ``fma`` with the scale and zero point broadcast from
    16-bit registers. The interpreter, which runs no PTX, decodes the same bit patterns in
    float32.
    """
    if INTERPRET:
        t = (x & mask) | magic
        c_lo = half_to_float(t, KV_DTYPE) + half_to_float(neg_magic, KV_DTYPE)
        c_hi = half_to_float(t >> 16, KV_DTYPE) + half_to_float(neg_magic >> 16, KV_DTYPE)
        lo = round_to(c_lo * s_lo.to(tl.float32) + z_lo.to(tl.float32), KV_DTYPE).to(DOT_DTYPE)
        hi = round_to(c_hi * s_hi.to(tl.float32) + z_hi.to(tl.float32), KV_DTYPE).to(DOT_DTYPE)
    else:
        if KV_DTYPE == tl.float16:
            REGS: tl.constexpr = "{ .reg .b32 t, s2, z2; "
            UNMAGIC: tl.constexpr = "add.rn.f16x2 t, t, $4; "
            FMA: tl.constexpr = "fma.rn.f16x2 $0, t, s2, z2; }"
        else:  # bfloat16: the magic taken out as t * 1 + neg_magic
            REGS: tl.constexpr = "{ .reg .b32 t, one, s2, z2; "
            UNMAGIC: tl.constexpr = "mov.b32 one, 0x3F803F80; fma.rn.bf16x2 t, t, one, $4; "
            FMA: tl.constexpr = "fma.rn.bf16x2 $0, t, s2, z2; }"
        y = tl.inline_asm_elementwise(
            REGS + "lop3.b32 t, $1, $2, $3, 0xEA; " + UNMAGIC + "mov.b32 s2, {$5, $6}; mov.b32 z2, {$7, $8}; " + FMA,
            "=r,r,r,r,r,h,h,h,h",
            [x, mask, magic, neg_magic, s_lo.to(tl.int16, bitcast=True), s_hi.to(tl.int16, bitcast=True),
             z_lo.to(tl.int16, bitcast=True), z_hi.to(tl.int16, bitcast=True)],
            dtype=tl.int32, is_pure=True, pack=1)
        lo = y.to(tl.int16).to(KV_DTYPE, bitcast=True)
        hi = (y >> 16).to(tl.int16).to(KV_DTYPE, bitcast=True)
    return lo, hi


@triton.jit
def mask_values(m, MASK_BOOL: tl.constexpr):
    """Loaded mask values -> keep flags (bool masks) or additive terms in log2 units. A finite
    additive value stays finite (quant.attend adds it in float32: a row masked everywhere by the
    dtype's minimum averages uniformly there too)."""
    if MASK_BOOL:
        return m != 0
    else:
        m = m.to(tl.float32)
        return tl.where(m == float("-inf"), m, tl.maximum(m, -2.3586e38) * 1.4426950408889634)


@triton.jit
def load_mask(ptrs, ok, MASK_BOOL: tl.constexpr):
    """Raw mask values at ``ptrs``; where not ``ok`` (past the mask's length, a row or group that
    does not exist) the value that masks: False (0) for a bool mask, ``-inf`` for an additive one."""
    if MASK_BOOL:
        return tl.load(ptrs, mask=ok, other=0)
    else:
        return tl.load(ptrs, mask=ok, other=float("-inf"))


@triton.jit
def apply_mask(scores, m, MASK_BOOL: tl.constexpr):
    """``scores`` (log2 units) with the mask values ``m`` of :func:`mask_values` applied."""
    if MASK_BOOL:
        return tl.where(m, scores, float("-inf"))
    else:
        return scores + m
