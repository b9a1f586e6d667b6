"""Reference math of the quantized KV cache, in plain torch (docs/how-it-works.md, "The method").

Everything here is the oracle the Triton kernels are tested against, so each step is written in a
form a kernel can reproduce bit for bit: statistics and codes in float32, rounding as
``floor(x + 0.5)``, ``levels / range`` as ``reciprocal(range) * levels`` and ``range / levels`` as
``range * float32(1 / levels)``, once per group.

Quantizer (KIVI): for a group ``X`` with ``mn = min X``, ``rng = max X - mn`` and
``levels = 2^B - 1``::

    q  = clamp(floor((X - mn) * (levels / rng) + 0.5), 0, levels)     (q = 0 where rng == 0)
    s  = rng / levels
    s^ = (1 - 2 eta) * s                                               calibrated scale
    z^ = mn + (eta * levels) * s                                       calibrated zero point
    X^ = q * s^ + z^

Keys are grouped per channel over ``G`` consecutive tokens, values per token over ``G``
consecutive channels. Codes are packed little-end-first into int32 words, ``32 / B`` codes a word:
keys along the token axis (``[B, H, T*bits/32, D]``), values along the channel axis
(``[B, H, T, D*bits/32]``), so a kernel reads one word per (token-block, channel) or
(token, channel-block).

Quality options (``XQuantConfig``): ``level_fit="lsq"`` replaces min-max + calibration by a
least-squares refit of ``s``/``z`` to the group (:func:`fit_levels`; decoding unchanged);
``rotation="hadamard"`` quantizes ``x @ H`` instead of ``x`` (:func:`hadamard`, the cache rotates
reads back); ``sink_tokens`` keeps the first positions whole (:func:`append_sink`,
:func:`merge_sink`).

Scales and zero points are stored in the model dtype, or with ``XQuantConfig.metadata_dtype=
"float8_e4m3fn"`` in float8: :func:`to_metadata` clamps them to +-448 (the format's finite range)
and rounds to nearest even; every read converts the stored value to float32, whatever its dtype.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import FP8_E4M3_MAX, QUANT_BITS

#: Storage dtypes of scales / zero points other than the model's (``XQuantConfig.metadata_dtype``).
METADATA_TORCH_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn}


def metadata_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype scales and zero points are stored in: ``model_dtype`` for ``None``."""
    return model_dtype if name is None else METADATA_TORCH_DTYPES[name]


def to_metadata(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 scales / zero points as stored in ``dtype``: a plain cast, except that float8 is
    first clamped to its finite range (+-448), so that an out-of-range value saturates instead of
    becoming NaN."""
    if dtype == torch.float8_e4m3fn:
        x = x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.to(dtype)


def _put(t: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """``t[:, :, index] = value``: ``index_copy_`` along dim 2, or for float8 an indexed assignment
    (torch's CPU ``index_copy_`` has no float8 kernel; Inductor compiles the assignment
    correctly, but not a copy through a ``uint8`` view, which it writes back as a value
    conversion)."""
    if t.dtype == torch.float8_e4m3fn:
        t[:, :, index] = value
    else:
        t.index_copy_(2, index, value)


def _where_metadata(cond: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` (float32) as stored in ``old.dtype`` where ``cond``, else ``old``. float8 selects in
    float32 (exact: every float8 value is a float32 one; Inductor has no float8 ``where``)."""
    if old.dtype == torch.float8_e4m3fn:
        return to_metadata(torch.where(cond, new, old.float()), old.dtype)
    return torch.where(cond, to_metadata(new, old.dtype), old)


def levels(bits: int) -> int:
    return (1 << bits) - 1


def codes_per_word(bits: int) -> int:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits!r}: packing supports {QUANT_BITS}")
    return 32 // bits


# --------------------------------------------------------------------------- packing
def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into int32 words along ``dim``.

    Code ``i`` of word ``w`` is element ``w * (32 // bits) + i`` and sits at bit ``i * bits``.
    The length of ``dim`` must be a multiple of ``32 // bits``.
    """
    per = codes_per_word(bits)
    dim = dim % codes.dim()
    n = codes.shape[dim]
    if n % per:
        raise ValueError(f"pack: length {n} along dim {dim} is not a multiple of {per} ({bits}-bit codes)")
    c = codes.movedim(dim, -1).to(torch.int64)
    c = c.reshape(*c.shape[:-1], n // per, per)
    shifts = torch.arange(per, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2^32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> uint8 codes, ``32 // bits`` codes per word."""
    per = codes_per_word(bits)
    dim = dim % words.dim()
    w = words.movedim(dim, -1).unsqueeze(-1)
    shifts = torch.arange(per, device=w.device, dtype=torch.int32) * bits
    codes = (w >> shifts) & levels(bits)  # arithmetic shift; the mask drops the sign bits
    codes = codes.reshape(*codes.shape[:-2], -1).to(torch.uint8)
    return codes.movedim(-1, dim)


# --------------------------------------------------------------------------- group quantizer
def quantize_groups(x: torch.Tensor, bits: int, eta: float = 0.0, fit: str = "minmax", codes: torch.Tensor | None = None):
    """Quantize groups along the last dim of ``x`` ``[..., G]``.

    Returns ``(codes uint8 [..., G], scale fp32 [...], zero fp32 [...])``. ``fit="minmax"``: the
    calibrated ``scale``/``zero`` of the module docstring (``eta = 0``: plain KIVI min-max).
    ``fit="lsq"`` (``eta`` unused): min-max codes, scale and zero refitted by :func:`fit_levels`,
    codes moved to the nearest refitted level, refitted again. ``codes`` (``"lsq"`` only): fit
    scale and zero to these given codes (a layer reading its partner's codes) and return them.
    """
    if codes is not None:
        if fit != "lsq":
            raise ValueError(f"quantize_groups: given codes need fit='lsq', not {fit!r}")
        scale, zero = fit_levels(x, codes)
        return codes, scale, zero
    xf = x.float()
    mn = xf.amin(-1)
    rng = xf.amax(-1) - mn
    lv = levels(bits)
    # Both quotients as products with a float32 reciprocal, so CPU, CUDA and the kernels agree to
    # the bit (torch's own scalar division differs between its CPU and CUDA kernels).
    inv = torch.where(rng > 0, torch.reciprocal(torch.where(rng > 0, rng, 1.0)) * lv, 0.0)
    codes = torch.floor((xf - mn[..., None]) * inv[..., None] + 0.5).clamp_(0, lv).to(torch.uint8)
    if fit == "lsq":
        scale, zero = fit_levels(xf, codes)
        # One Lloyd step: each value to its nearest refitted level (the refit can only lower the
        # squared error of the new assignment), then the final fit for those codes.
        inv = torch.where(scale > 0, torch.reciprocal(torch.where(scale > 0, scale, 1.0)), 0.0)
        codes = torch.floor((xf - zero[..., None]) * inv[..., None] + 0.5).clamp_(0, lv).to(torch.uint8)
        scale, zero = fit_levels(xf, codes)
        return codes, scale, zero
    scale, zero = calibrate(rng * (1.0 / lv), mn, bits, eta)
    return codes, scale, zero


def fit_levels(x: torch.Tensor, codes: torch.Tensor):
    """Least-squares ``scale, zero`` (fp32 ``[...]``) of ``x ~ codes * scale + zero`` over the last
    dim of ``x``/``codes`` ``[..., G]``: the decoder stays the affine one, only its two parameters
    move. For one-bit codes this puts the levels at the means of the values coded 0 and 1. A group
    whose codes are all equal gets scale 0 and its mean as the zero point."""
    xf, q = x.float(), codes.float()
    g = x.shape[-1]
    sq, sx = q.sum(-1), xf.sum(-1)
    # Centred sums: the textbook n*sum(q^2) - sum(q)^2 cancels badly in float32.
    qc = q - (sq / g)[..., None]
    var = (qc * qc).sum(-1)
    cov = (qc * xf).sum(-1)
    scale = torch.where(var > 0, cov / torch.where(var > 0, var, 1.0), 0.0)
    zero = (sx - scale * sq) / g
    return scale, zero


def calibrate(scale: torch.Tensor, zero: torch.Tensor, bits: int, eta: float):
    """XQuant data-free calibration: ``z^ = z + eta*s*(2^B-1)``, ``s^ = (1-2*eta)*s``."""
    if eta == 0.0:
        return scale, zero
    return (1.0 - 2.0 * eta) * scale, zero + (eta * levels(bits)) * scale


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes [..., G] * scale[..., None] + zero[..., None]`` in float32."""
    return codes.float() * scale.float()[..., None] + zero.float()[..., None]


# --------------------------------------------------------------------------- keys / values
def quantize_keys(k: torch.Tensor, bits: int, group: int, eta: float = 0.0, fit: str = "minmax",
                  codes: torch.Tensor | None = None):
    """Per-channel key quantization. ``k [..., N, D]`` with ``N % group == 0`` ->
    ``codes uint8 [..., N, D]``, ``scale, zero fp32 [..., N/group, D]``. ``fit``/``codes`` as in
    :func:`quantize_groups` (``codes [..., N, D]``)."""
    *lead, n, d = k.shape
    if n % group:
        raise ValueError(f"quantize_keys: {n} tokens is not a multiple of the group size {group}")

    def groups(t):  # [..., N, D] -> [..., N/G, D, G]
        return t.reshape(*lead, n // group, group, d).transpose(-1, -2)

    codes, scale, zero = quantize_groups(groups(k), bits, eta, fit, None if codes is None else groups(codes))
    return codes.transpose(-1, -2).reshape(*lead, n, d), scale, zero


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """``codes [..., N, D]``, ``scale/zero [..., N/group, D]`` -> fp32 ``[..., N, D]``."""
    return codes.float() * scale.float().repeat_interleave(group, -2) + zero.float().repeat_interleave(group, -2)


def quantize_values(v: torch.Tensor, bits: int, group: int, eta: float = 0.0, fit: str = "minmax",
                    codes: torch.Tensor | None = None):
    """Per-token value quantization. ``v [..., N, D]`` with ``D % group == 0`` ->
    ``codes uint8 [..., N, D]``, ``scale, zero fp32 [..., N, D/group]``. ``fit``/``codes`` as in
    :func:`quantize_groups` (``codes [..., N, D]``)."""
    *lead, d = v.shape
    if d % group:
        raise ValueError(f"quantize_values: head_dim {d} is not a multiple of the group size {group}")
    given = None if codes is None else codes.reshape(*lead, d // group, group)
    codes, scale, zero = quantize_groups(v.reshape(*lead, d // group, group), bits, eta, fit, given)
    return codes.reshape(*lead, d), scale, zero


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """``codes [..., D]``, ``scale/zero [..., D/group]`` -> fp32 ``[..., D]``."""
    return codes.float() * scale.float().repeat_interleave(group, -1) + zero.float().repeat_interleave(group, -1)


# --------------------------------------------------------------------------- the cache's rules
def value_group(window: torch.Tensor, scale: torch.Tensor) -> int:
    """Channels per value group of a value storage: the head dim (``window [..., D]``) over the
    groups per token (``scale [..., D / group]``). Ops that take one ``group`` argument for keys
    and values read the values' from their storage this way (``XQuantConfig.value_group_size``).
    Raises ``ValueError`` when the scales do not split the head dim into equal groups."""
    d, groups = window.shape[-1], scale.shape[-1]
    if groups == 0 or d % groups:
        raise ValueError(f"value scales {tuple(scale.shape)} do not divide head_dim {d} into groups")
    return d // groups


# Shared by XQuantLayer (eager), the custom ops' reference implementations and the kernels' tests.
def key_boundary(n, residual: int, group: int):
    """Nk(n) = G * ceil((n - R) / G), at least 0: keys of tokens below it are read from codes."""
    if isinstance(n, int):
        return max(0, -(-(n - residual) // group) * group)
    return torch.div(n - residual + group - 1, group, rounding_mode="floor").clamp(min=0) * group


def value_boundary(n, residual: int):
    """Nv(n) = max(n - R, 0): values of tokens below it are read from codes."""
    return max(0, n - residual) if isinstance(n, int) else (n - residual).clamp(min=0)


def read_keys(codes, scale, zero, window, n, bits: int, group: int, length: int) -> torch.Tensor:
    """Keys ``[b, H, length, D]`` as attention sees them with ``n`` tokens stored.

    ``codes [b, H, Tq*bits/32, D]`` (a sharing layer passes its partner's), ``scale/zero
    [b, H, Tq/G, D]``, ``window [b, H, R, D]`` (ring). Positions below Nk(n) come from codes, the
    rest from the ring; positions at or past ``n`` hold finite filler for the caller to mask.
    """
    deq = dequantize_keys(unpack(codes, bits, dim=-2), scale, zero, group).to(window.dtype)
    return _merge(deq, window, key_boundary(n, window.shape[-2], group), length)


def read_values(codes, scale, zero, window, n, bits: int, group: int, length: int) -> torch.Tensor:
    """Values ``[b, H, length, D]``; layout as in :func:`read_keys` with ``codes [b, H, Tq,
    D*bits/32]`` and ``scale/zero [b, H, Tq, D/G]``."""
    deq = dequantize_values(unpack(codes, bits, dim=-1), scale, zero, group).to(window.dtype)
    return _merge(deq, window, value_boundary(n, window.shape[-2]), length)


def _merge(deq: torch.Tensor, window: torch.Tensor, boundary, length: int) -> torch.Tensor:
    tq = deq.shape[2]
    if tq >= length:
        deq = deq[:, :, :length]
    else:
        deq = torch.cat([deq, deq.new_zeros(*deq.shape[:2], length - tq, deq.shape[-1])], dim=2)
    pos = torch.arange(length, device=window.device)
    ring = window.index_select(2, pos % window.shape[-2])
    return torch.where((pos < boundary)[:, None], deq, ring)


def append_token(
    k, v, pos,
    k_codes, k_scale, k_zero, k_window,
    v_codes, v_scale, v_zero, v_window,
    k_bits: int, v_bits: int, group: int, k_eta: float, v_eta: float,
) -> None:
    """Store one token per sequence at position ``pos`` (0-d int64 tensor), in place, branch-free.

    ``k [b, H, 1, Dk]``, ``v [b, H, 1, Dv]``; storage as in :func:`read_keys`; ``k_codes`` /
    ``v_codes`` is ``None`` for a layer that shares its partner's codes (it then writes only its
    own scale and zero point). ``pos`` itself is not advanced. ``group`` is the key group; the
    values' is their storage's (:func:`value_group`).
    """
    append_value(v, pos, v_codes, v_scale, v_zero, v_window, v_bits, value_group(v_window, v_scale), v_eta)
    append_key(k, pos, k_codes, k_scale, k_zero, k_window, k_bits, group, k_eta)


def append_value(v, pos, codes, scale, zero, window, bits: int, group: int, eta: float,
                 fit: str = "minmax", shared_codes=None) -> None:
    """Before the token at ``pos`` overwrites ring slot ``pos % R``, quantize the value it evicts
    (position ``pos - R``). While ``pos < R`` the result lands at position 0, rewritten at ``pos = R``.
    ``fit`` as in :func:`quantize_groups`; with ``fit="lsq"`` a sharing layer (``codes`` None)
    passes its partner's codes as ``shared_codes`` (already written for this position) and fits
    its scale and zero point to them."""
    R = window.shape[-2]
    q = (pos - R).clamp(min=0).reshape(1)
    given = None
    if fit == "lsq" and codes is None:
        given = unpack(shared_codes.index_select(2, q), bits, -1)
    c, s, z = quantize_values(window.index_select(2, q % R), bits, group, eta, fit, given)
    if codes is not None:
        codes.index_copy_(2, q, pack(c, bits, -1))
    _put(scale, q, to_metadata(s, scale.dtype))
    _put(zero, q, to_metadata(z, zero.dtype))
    window.index_copy_(2, pos.reshape(1) % R, v)


def append_key(k, pos, codes, scale, zero, window, bits: int, group: int, eta: float,
               fit: str = "minmax", shared_codes=None) -> None:
    """Before the token at ``pos`` overwrites ring slot ``pos % R``, quantize the key group that
    starts at ``pos - R`` if one does; the write is masked, not branched, so shapes stay static.
    ``fit`` / ``shared_codes`` as in :func:`append_value`."""
    R = window.shape[-2]
    q = (pos - R).clamp(min=0).reshape(1)
    g = torch.div(q, group, rounding_mode="floor")
    tokens = g * group + torch.arange(group, device=k.device)
    per_group = group * bits // 32
    words = g * per_group + torch.arange(per_group, device=k.device)
    given = None
    if fit == "lsq" and codes is None:
        given = unpack(shared_codes.index_select(2, words), bits, -2)
    c, s, z = quantize_keys(window.index_select(2, tokens % R), bits, group, eta, fit, given)
    flush = (pos >= R) & ((pos - R) % group == 0)
    if codes is not None:
        codes.index_copy_(2, words, torch.where(flush, pack(c, bits, -2), codes.index_select(2, words)))
    _put(scale, g, _where_metadata(flush, s, scale.index_select(2, g)))
    _put(zero, g, _where_metadata(flush, z, zero.index_select(2, g)))
    window.index_copy_(2, pos.reshape(1) % R, k)


# --------------------------------------------------------------------------- sink tokens
def append_sink(x, pos, sink, window=None) -> None:
    """Keep the token ``x [b, H, 1, D]`` at ``pos`` (0-d int64 tensor) in ``sink [b, H, S, D]``
    if ``pos < S``; masked, not branched. Call it before the token enters the ring.

    With ``window`` (keys): when ``pos == S``, the ring slots of positions ``0 .. S-1`` get copies
    of this token. Those positions are read from ``sink`` from now on, so their slots are free,
    and the key group that holds them is later quantized per channel from the ring: with the
    sink keys (often far off the others) replaced by a neighbour they no longer stretch that
    group's range. ``S < R`` (the config checks it), so the slots still hold positions ``< S``.
    """
    S = sink.shape[-2]
    idx = pos.clamp(max=S - 1).reshape(1)
    sink.index_copy_(2, idx, torch.where(pos < S, x, sink.index_select(2, idx)))
    if window is not None:
        slots = torch.arange(S, device=x.device)
        window.index_copy_(2, slots, torch.where(pos == S, x.expand(-1, -1, S, -1), window.index_select(2, slots)))


def merge_sink(x: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """``x [b, H, T, D]`` (a read) with positions ``< S`` taken from ``sink [b, H, S, D]``."""
    return torch.cat([sink.to(x.dtype), x[:, :, sink.shape[-2]:]], dim=2)


# --------------------------------------------------------------------------- rotation
@functools.lru_cache(maxsize=None)
def hadamard_matrix(d: int, device: torch.device | None = None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``[d, d]`` (float32): orthogonal and symmetric, so
    it is its own inverse. ``d`` must be a power of two.

    Built in closed form, ``H[i, j] = (-1)^popcount(i & j) / sqrt(d)``."""
    if not isinstance(d, int) or d < 1 or d & (d - 1):
        raise ValueError(f"hadamard_matrix: d={d!r} must be a power of two")
    i = torch.arange(d, device=device)
    both = i[:, None] & i[None, :]
    odd = torch.zeros_like(both)
    for bit in range(d.bit_length() - 1):
        odd = odd ^ ((both >> bit) & 1)
    return (1 - 2 * odd).to(torch.float32) * (1.0 / math.sqrt(d))


def hadamard(x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ H`` over the last dim (float32 arithmetic, result in ``x.dtype``). The same call
    rotates and rotates back: ``hadamard(hadamard(x)) == x`` up to rounding. ``matrix``: ``H``
    already built (:func:`hadamard_matrix`), else it is built here."""
    h = matrix if matrix is not None else hadamard_matrix(x.shape[-1], x.device)
    return (x.float() @ h).to(x.dtype)


def hadamard_butterfly(x: torch.Tensor) -> torch.Tensor:
    """:func:`hadamard` computed from ``x`` alone: the fast Walsh-Hadamard transform, ``log2 d``
    butterfly steps ``(a, b) -> (a + b, a - b)`` over pairs ``h`` apart (``h = 1, 2, 4, ...``),
    which is ``x @ H`` in the Sylvester order, scaled by ``1 / sqrt(d)``. What compiled graphs
    run (:mod:`xquant_fx.passes.inline_rotations`): no matrix to build or hold, only pointwise ops
    and views of ``x`` that the compiler fuses."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard_butterfly: the last dim {d} must be a power of two")
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2).reshape(-1, d)
        h *= 2
    return (y * (1.0 / math.sqrt(d))).reshape(x.shape).to(x.dtype)


def attend(q, keys, values, n, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of ``q [b, Hq, Lq, D]`` (positions ``n - Lq .. n - 1``) over ``keys/values
    [b, Hkv, T, D]`` as returned by :func:`read_keys` / :func:`read_values` with ``n`` tokens
    stored; causal among the ``Lq`` new tokens; grouped-query heads share KV heads.

    ``mask`` (optional, what transformers passes to SDPA): broadcastable to ``[b, Hq, Lq, M]``,
    bool (True attends) or additive float; positions at or past ``M`` are masked. It only ever
    removes positions (left padding); positions at or past ``n`` are masked regardless.
    """
    b, hq, lq, _ = q.shape
    hkv, length = keys.shape[1], keys.shape[2]
    pos = torch.arange(length, device=q.device)
    qpos = n - lq + torch.arange(lq, device=q.device)
    causal = pos[None, :] <= qpos[:, None]  # [Lq, T]
    keys = keys.repeat_interleave(hq // hkv, dim=1).float()
    values = values.repeat_interleave(hq // hkv, dim=1).float()
    scores = (q.float() @ keys.transpose(-1, -2)) * scale
    if mask is not None:
        m = mask[..., :length]
        if m.shape[-1] < length:
            fill = False if m.dtype == torch.bool else float("-inf")
            m = torch.cat([m, m.new_full((*m.shape[:-1], length - m.shape[-1]), fill)], dim=-1)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1) @ values).to(q.dtype)
