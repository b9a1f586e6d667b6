"""Helpers shared by the cache kernels: code-word packing and launch plumbing."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

QUANT_BITS = (1, 2, 4)


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
