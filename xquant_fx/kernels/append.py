"""Decode-step write of the quantized KV cache: :func:`xquant_fx.quant.append_token` in one launch.

One new token per sequence at position ``pos`` (a 0-d int64 device tensor, read inside the
kernel: no host synchronisation, a grid that depends on shapes only, so the launch can be captured
in a CUDA graph). With ``q = max(pos - R, 0)`` each program, one per (sequence, KV head):

1. quantizes the value in ring slot ``q % R`` (position ``pos - R``; while ``pos < R`` a
   placeholder that ``pos = R`` rewrites) per token, in groups of ``VG`` channels, into row ``q``
   of ``v_codes`` / ``v_scale`` / ``v_zero``;
2. when ``pos >= R`` and ``(pos - R) % G == 0`` (one step in ``G``; a branch on ``pos``, the same
   for the whole program), quantizes the key group ``g = q // G`` (ring slots of tokens
   ``g*G .. g*G + G - 1``) per channel and stores its codes, scale and zero point;
3. writes the new ``k`` / ``v`` into ring slot ``pos % R``.

The codes, scales and zero points are bit-identical to the reference: statistics in float32, the
reciprocal ``levels / rng`` formed as torch forms it (``reciprocal(rng) * levels``), rounding as
``floor(x + 0.5)``, and no fused multiply-add (launched with ``enable_fp_fusion=False``). Scales
and zero points are stored in their tensors' dtype, the model's or float8 e4m3 (clamped to +-448
first, as :func:`xquant_fx.quant.to_metadata` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import value_group
from .common import bitwise_or, check_bits, check_metadata, check_pow2, launch, seq_head, to_metadata


@triton.jit
def _quant_params(mn, rng, c1, c2, LEVELS: tl.constexpr, CALIBRATE: tl.constexpr):
    """Per-group ``(inv, scale, zero)`` from the group minimum ``mn`` and range ``rng`` (fp32).

    ``inv = levels / rng`` (0 where ``rng == 0``) is evaluated as torch evaluates a scalar divided
    by a tensor: ``reciprocal(rng) * levels``. ``scale = rng / levels`` as
    :func:`xquant_fx.quant.quantize_groups` forms it on every device: the product with
    ``fp32(1 / levels)``. Calibration: ``s^ = c1 * s``, ``z^ = mn + c2 * s`` with
    ``c1 = fp32(1 - 2 eta)``, ``c2 = fp32(eta * levels)``.
    """
    nonzero = rng > 0
    one = tl.full(rng.shape, 1.0, tl.float32)
    recip = tl.math.div_rn(one, tl.where(nonzero, rng, one))
    inv = tl.where(nonzero, recip * LEVELS, 0.0)
    lv = tl.full(rng.shape, LEVELS, tl.float32)
    scale = rng * tl.math.div_rn(one, lv)
    if CALIBRATE:
        zero = mn + c2 * scale
        scale = c1 * scale
    else:
        zero = mn
    return inv, scale, zero


@triton.jit
def _codes(x, mn, inv, LEVELS: tl.constexpr):
    """``clamp(floor((x - mn) * inv + 0.5), 0, levels)`` as int32; ``mn``/``inv`` broadcast to x."""
    c = tl.floor((x - mn) * inv + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), LEVELS * 1.0)
    return c.to(tl.int32)


@triton.jit
def _append_token_kernel(
    k_ptr, v_ptr, pos_ptr,
    kc_ptr, ks_ptr, kz_ptr, kw_ptr,
    vc_ptr, vs_ptr, vz_ptr, vw_ptr,
    # strides: new tokens [b, H, 1, D] (batch, head, channel)
    s_kb, s_kh, s_kd,
    s_vb, s_vh, s_vd,
    # storage (batch, head, row; channels contiguous): k_codes [B, H, Tq*KB/32, DK], k_scale /
    # k_zero [B, H, Tq/G, DK], k_window [B, H, R, DK]; v_codes [B, H, Tq, DV*VB/32], v_scale /
    # v_zero [B, H, Tq, DV/VG], v_window [B, H, R, DV]
    s_kcb, s_kch, s_kct, s_ksb, s_ksh, s_kst, s_kwb, s_kwh, s_kwt,
    s_vcb, s_vch, s_vct, s_vsb, s_vsh, s_vst, s_vwb, s_vwh, s_vwt,
    num_heads,
    k_c1, k_c2, v_c1, v_c2,
    DK: tl.constexpr, DV: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    G: tl.constexpr, VG: tl.constexpr, R: tl.constexpr,
    HAS_K_CODES: tl.constexpr, HAS_V_CODES: tl.constexpr,
    K_CALIBRATE: tl.constexpr, V_CALIBRATE: tl.constexpr,
):
    """Grid ``(b * H,)``: program ``pid`` stores the token of sequence ``pid // H``, head ``pid % H``.

    Scale/zero tensors share strides with each other (``k_scale`` / ``k_zero``, ``v_scale`` /
    ``v_zero``). ``kc_ptr`` / ``vc_ptr`` are ignored when ``HAS_K_CODES`` / ``HAS_V_CODES`` is
    False (a layer that reads its partner's codes).
    """
    # Float arguments may arrive as float64 (Inductor's launcher): round them as torch does.
    k_c1, k_c2 = tl.cast(k_c1, tl.float32), tl.cast(k_c2, tl.float32)
    v_c1, v_c2 = tl.cast(v_c1, tl.float32), tl.cast(v_c2, tl.float32)
    bi, hi = seq_head(tl.program_id(0), num_heads)
    pos = tl.load(pos_ptr)
    q = tl.maximum(pos - R, 0)  # oldest ring position, quantized this step
    K_LEVELS: tl.constexpr = (1 << KB) - 1
    V_LEVELS: tl.constexpr = (1 << VB) - 1
    K_PER: tl.constexpr = 32 // KB  # key codes per word (tokens)
    V_PER: tl.constexpr = 32 // VB  # value codes per word (channels)
    KWG: tl.constexpr = G // K_PER  # key words per group and channel
    VW: tl.constexpr = DV // V_PER  # value words per token
    NGV: tl.constexpr = DV // VG  # value groups per token

    # ---------------------------------------------------------------- value of position q
    dv = tl.arange(0, DV)
    vw_base = vw_ptr + bi * s_vwb + hi * s_vwh
    x = tl.load(vw_base + (q % R) * s_vwt + dv).to(tl.float32)  # [DV]
    x = tl.reshape(x, (NGV, VG))  # [NGV, VG]: groups of VG channels
    mn = tl.min(x, axis=1)  # [NGV]
    rng = tl.max(x, axis=1) - mn
    inv, scale, zero = _quant_params(mn, rng, v_c1, v_c2, V_LEVELS, V_CALIBRATE)
    codes = _codes(x, mn[:, None], inv[:, None], V_LEVELS)  # [NGV, VG]
    codes = tl.reshape(codes, (VW, V_PER))  # channel w * V_PER + i
    shifts = (tl.arange(0, V_PER) * VB)[None, :]
    words = tl.reduce(codes << shifts, 1, bitwise_or)  # [VW]
    if HAS_V_CODES:
        tl.store(vc_ptr + bi * s_vcb + hi * s_vch + q * s_vct + tl.arange(0, VW), words)
    gv = tl.arange(0, NGV)
    vs_off = bi * s_vsb + hi * s_vsh + q * s_vst + gv
    tl.store(vs_ptr + vs_off, to_metadata(scale, vs_ptr.dtype.element_ty))
    tl.store(vz_ptr + vs_off, to_metadata(zero, vz_ptr.dtype.element_ty))

    # ---------------------------------------------------------------- key group starting at q
    # Only when the group starts exactly at pos - R: the other G - 1 steps skip its loads and math.
    # (Its names differ from the value section's: a compiled if block may not give a name another
    # type, which the interpreter does not check.)
    dk = tl.arange(0, DK)
    kw_base = kw_ptr + bi * s_kwb + hi * s_kwh
    if (pos >= R) & ((pos - R) % G == 0):
        g = q // G
        tok = g * G + tl.arange(0, G)  # [G] positions of the group
        kx = tl.load(kw_base + (tok % R)[:, None] * s_kwt + dk[None, :]).to(tl.float32)  # [G, DK]
        kmn = tl.min(kx, axis=0)  # [DK]
        krng = tl.max(kx, axis=0) - kmn
        kinv, kscale, kzero = _quant_params(kmn, krng, k_c1, k_c2, K_LEVELS, K_CALIBRATE)
        if HAS_K_CODES:
            kcodes = _codes(kx, kmn[None, :], kinv[None, :], K_LEVELS)  # [G, DK]
            kcodes = tl.reshape(kcodes, (KWG, K_PER, DK))  # token w * K_PER + i
            kshifts = (tl.arange(0, K_PER) * KB)[None, :, None]
            kwords = tl.reduce(kcodes << kshifts, 1, bitwise_or)  # [KWG, DK]
            rows = g * KWG + tl.arange(0, KWG)
            tl.store(kc_ptr + bi * s_kcb + hi * s_kch + rows[:, None] * s_kct + dk[None, :], kwords)
        ks_off = bi * s_ksb + hi * s_ksh + g * s_kst + dk
        tl.store(ks_ptr + ks_off, to_metadata(kscale, ks_ptr.dtype.element_ty))
        tl.store(kz_ptr + ks_off, to_metadata(kzero, kz_ptr.dtype.element_ty))

    # ---------------------------------------------------------------- the new token into slot pos % R
    k_new = tl.load(k_ptr + bi * s_kb + hi * s_kh + dk * s_kd)
    v_new = tl.load(v_ptr + bi * s_vb + hi * s_vh + dv * s_vd)
    # Every thread must have read the ring (slot pos % R is among the slots read above) first.
    tl.debug_barrier()
    slot = pos % R
    tl.store(kw_base + slot * s_kwt + dk, k_new.to(kw_ptr.dtype.element_ty))
    tl.store(vw_base + slot * s_vwt + dv, v_new.to(vw_ptr.dtype.element_ty))


def append_token(
    k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
    k_codes: torch.Tensor | None, k_scale: torch.Tensor, k_zero: torch.Tensor, k_window: torch.Tensor,
    v_codes: torch.Tensor | None, v_scale: torch.Tensor, v_zero: torch.Tensor, v_window: torch.Tensor,
    k_bits: int, v_bits: int, group: int, k_eta: float, v_eta: float,
) -> None:
    """Launch the decode-step write; arguments and effect as :func:`xquant_fx.quant.append_token`.

    ``k [b, H, 1, Dk]``, ``v [b, H, 1, Dv]`` (any strides), ``pos`` a 0-d int64 tensor on the
    storage device; storage tensors as in :mod:`xquant_fx.cache` (batch ``>= b``, channels contiguous;
    only the first ``b`` sequences are touched). ``k_codes`` / ``v_codes`` ``None``: a sharing layer, which writes
    only its own scale, zero point and window. Grid ``(b * H,)``, one program per sequence and head.
    """
    check_bits("k_bits", k_bits)
    check_bits("v_bits", v_bits)
    b, heads, one, dk = k.shape
    dv = v.shape[-1]
    R = k_window.shape[-2]
    if one != 1 or v.shape[:3] != (b, heads, 1):
        raise ValueError(f"append_token stores one token per sequence: k {tuple(k.shape)}, v {tuple(v.shape)}")
    v_group = value_group(v_window, v_scale)
    for name, value in (("head_dim (keys)", dk), ("head_dim (values)", dv), ("group_size", group),
                        ("value group size", v_group)):
        check_pow2(name, value)
    if k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        raise ValueError("append_token: scale and zero-point tensors must share strides")
    check_metadata("key", k_scale, k_zero, k_window)
    check_metadata("value", v_scale, v_zero, v_window)
    if group * k_bits % 32 or dv * v_bits % 32:
        raise ValueError(
            f"group_size={group} with {k_bits}-bit keys / {v_bits}-bit values and value head_dim {dv} "
            "does not fill whole 32-bit words"
        )
    if R % group:
        raise ValueError(f"residual length R={R} is not a multiple of group_size={group}")
    # A sharing layer has no codes tensor: hand the kernel a stand-in pointer it never touches.
    kc = k_codes if k_codes is not None else k_scale
    vc = v_codes if v_codes is not None else v_scale
    storage = {"k_codes": kc, "k_scale": k_scale, "k_window": k_window, "v_codes": vc, "v_scale": v_scale,
               "v_window": v_window}
    for name, t in storage.items():
        if t.stride(-1) != 1:
            raise ValueError(f"append_token: {name} must have contiguous channels (last stride 1), "
                             f"got strides {t.stride()}")
    kc_strides = k_codes.stride()[:3] if k_codes is not None else (0, 0, 0)
    vc_strides = v_codes.stride()[:3] if v_codes is not None else (0, 0, 0)
    k_lv, v_lv = (1 << k_bits) - 1, (1 << v_bits) - 1
    launch(_append_token_kernel)[(b * heads,)](
        k, v, pos,
        kc, k_scale, k_zero, k_window,
        vc, v_scale, v_zero, v_window,
        k.stride(0), k.stride(1), k.stride(3),
        v.stride(0), v.stride(1), v.stride(3),
        *kc_strides, *k_scale.stride()[:3], *k_window.stride()[:3],
        *vc_strides, *v_scale.stride()[:3], *v_window.stride()[:3],
        heads,
        1.0 - 2.0 * k_eta, k_eta * k_lv, 1.0 - 2.0 * v_eta, v_eta * v_lv,
        DK=dk, DV=dv, KB=k_bits, VB=v_bits, G=group, VG=v_group, R=R,
        HAS_K_CODES=k_codes is not None, HAS_V_CODES=v_codes is not None,
        K_CALIBRATE=k_eta != 0.0, V_CALIBRATE=v_eta != 0.0,
        num_warps=4, enable_fp_fusion=False,
    )
