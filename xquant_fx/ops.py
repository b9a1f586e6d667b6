"""Custom ops: the quantized KV cache (``xquant::append_token``, ``xquant::attend``) and the routed
experts and routers of MoE layers (``xquant::moe_experts``, ``xquant::router_topk``, ``xquant::router``).

All but ``read_keys`` / ``read_values`` (below) are ``torch.library.triton_op`` s:
``torch.compile`` and AOTInductor trace into them and see the Triton kernel launches (through
``torch.library.wrap_triton``) instead of an opaque call. Each dispatches at run time:

* CUDA tensors, or any tensors while ``XQUANT_FORCE_KERNELS=1`` (with ``TRITON_INTERPRET=1``:
  Triton's CPU interpreter, for tests): the kernels of :mod:`xquant_fx.kernels`;
* otherwise: the plain-torch reference (:mod:`xquant_fx.quant`, :mod:`xquant_fx.moe`, ``torch.topk``).

Importing this module does not initialise CUDA, and imports the kernels (hence ``triton``) only
on the first kernel launch.

Signatures (storage layout as in :mod:`xquant_fx.cache`; a sharing layer passes ``None`` codes to
``append_token`` and its partner's codes to ``attend``; scales and zero points are in the cache
dtype or, with ``XQuantConfig.metadata_dtype="float8_e4m3fn"``, ``torch.float8_e4m3fn``: written
clamped to +-448 and rounded, read as float32, on both paths alike)::

    xquant::append_token(Tensor k, Tensor v, Tensor pos,
        Tensor(a!)? k_codes, Tensor(b!) k_scale, Tensor(c!) k_zero, Tensor(d!) k_window,
        Tensor(e!)? v_codes, Tensor(f!) v_scale, Tensor(g!) v_zero, Tensor(h!) v_window,
        int k_bits, int v_bits, int group, float k_eta, float v_eta) -> ()
    xquant::attend(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor k_window,
        Tensor v_codes, Tensor v_scale, Tensor v_zero, Tensor v_window, Tensor n,
        int k_bits, int v_bits, int group, float scale, Tensor? mask=None,
        Tensor? k_sink=None, Tensor? v_sink=None) -> Tensor
    xquant::read_keys(Tensor codes, Tensor scale, Tensor zero, Tensor window, Tensor n,
        int bits, int group, int length, Tensor? sink=None) -> Tensor   # quant.read_keys, plain torch
    xquant::read_values(...same...) -> Tensor                 # quant.read_values, plain torch
    xquant::hadamard(Tensor x) -> Tensor                      # quant.hadamard, plain torch
    xquant::moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down, int keep=-1)
        -> Tensor                                            # moe.experts_reference; slots >= keep unread
    xquant::router_topk(Tensor scores, int k, int keep=-1, float fill=0., int sentinel=0)
        -> (Tensor, Tensor)                                  # torch.topk, sorted; slots >= keep dropped
    xquant::router(Tensor x, Tensor weight, int k, int keep=-1, float fill=0., int sentinel=0,
        bool normalize=False, ScalarType? logits_dtype=None, ScalarType? values_dtype=None)
        -> (Tensor, Tensor, Tensor)                          # softmax router: values, indices, logits

``read_keys`` / ``read_values`` are the eager cache read (dequantize everything, attention runs
on the result). They are ops, not inline torch code, so that the graph pass
:mod:`xquant_fx.passes.fuse_kv_attention` can find them and fuse them with the attention that
reads them into one ``attend``. With ``XQuantConfig.sink_tokens`` the reads and ``attend`` take the
layer's sink buffers (``[B, H, S, D]``, the first ``S`` positions in full precision), which stand
in for those positions.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch.library import triton_op

from . import quant

__all__ = ["append_token", "attend", "hadamard", "moe_experts", "read_keys", "read_values", "router", "router_topk",
           "uses_kernels"]


def uses_kernels(t: torch.Tensor) -> bool:
    """Whether the ops run the Triton kernels for tensors like ``t``: on CUDA, or anywhere when
    ``XQUANT_FORCE_KERNELS=1`` (CPU tests, under Triton's interpreter)."""
    return t.device.type == "cuda" or os.environ.get("XQUANT_FORCE_KERNELS", "0") == "1"


# --------------------------------------------------------------------------- append_token
@triton_op(
    "xquant::append_token",
    mutates_args=("k_codes", "k_scale", "k_zero", "k_window", "v_codes", "v_scale", "v_zero", "v_window"),
)
def append_token(
    k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
    k_codes: Optional[torch.Tensor], k_scale: torch.Tensor, k_zero: torch.Tensor, k_window: torch.Tensor,
    v_codes: Optional[torch.Tensor], v_scale: torch.Tensor, v_zero: torch.Tensor, v_window: torch.Tensor,
    k_bits: int, v_bits: int, group: int, k_eta: float, v_eta: float,
) -> None:
    """Store one token per sequence (``k [b, H, 1, Dk]``, ``v [b, H, 1, Dv]``) at position
    ``pos`` (0-d int64 tensor) in place: :func:`xquant_fx.quant.append_token`."""
    if uses_kernels(k):
        from .kernels.append import append_token as kernel_append

        kernel_append(k, v, pos, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                      k_bits, v_bits, group, k_eta, v_eta)
    else:
        quant.append_token(k, v, pos, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                           k_bits, v_bits, group, k_eta, v_eta)


@append_token.register_fake
def _append_token_fake(k, v, pos, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window,
                       k_bits, v_bits, group, k_eta, v_eta) -> None:
    return None


# --------------------------------------------------------------------------- attend
@triton_op("xquant::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, k_window: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, v_window: torch.Tensor,
    n: torch.Tensor,
    k_bits: int, v_bits: int, group: int, scale: float, mask: Optional[torch.Tensor] = None,
    k_sink: Optional[torch.Tensor] = None, v_sink: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of ``q [b, Hq, Lq, Dk]`` (positions ``n - Lq .. n - 1``) over the quantized
    layer holding ``n`` tokens (0-d int64 tensor); ``[b, Hq, Lq, Dv]`` in ``q.dtype``.
    ``quant.attend(q, quant.read_keys(..., k_sink), quant.read_values(..., v_sink), n, scale, mask)``;
    ``mask`` as transformers passes it to SDPA (bool or additive, broadcastable to ``[b, Hq, Lq,
    M]``); ``k_sink`` / ``v_sink`` (both or neither, ``[B, Hkv, S, D]``) hold positions ``< S``.
    ``group`` is the key group; the values' is their storage's (:func:`xquant_fx.quant.value_group`)."""
    if (k_sink is None) != (v_sink is None):
        raise ValueError("attend: pass both k_sink and v_sink, or neither")
    if uses_kernels(q):
        from .kernels.attend import attend as kernel_attend

        return kernel_attend(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n,
                             k_bits, v_bits, group, scale, mask, k_sink=k_sink, v_sink=v_sink)
    b = q.shape[0]
    length = v_scale.shape[2] + v_window.shape[2]  # code capacity + ring: every position < n
    keys = quant.read_keys(k_codes[:b], k_scale[:b], k_zero[:b], k_window[:b], n, k_bits, group, length)
    values = quant.read_values(v_codes[:b], v_scale[:b], v_zero[:b], v_window[:b], n, v_bits,
                               quant.value_group(v_window, v_scale), length)
    if k_sink is not None:
        keys, values = quant.merge_sink(keys, k_sink[:b]), quant.merge_sink(values, v_sink[:b])
    return quant.attend(q, keys, values, n, scale, mask)


@attend.register_fake
def _attend_fake(q, k_codes, k_scale, k_zero, k_window, v_codes, v_scale, v_zero, v_window, n,
                 k_bits, v_bits, group, scale, mask=None, k_sink=None, v_sink=None) -> torch.Tensor:
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hq, lq, v_window.shape[-1]))


# --------------------------------------------------------------------------- read_keys / read_values
@torch.library.custom_op("xquant::read_keys", mutates_args=())
def read_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, window: torch.Tensor,
              n: torch.Tensor, bits: int, group: int, length: int,
              sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keys ``[b, H, length, D]`` as attention sees them: :func:`xquant_fx.quant.read_keys`, with
    positions ``< S`` from ``sink [b, H, S, D]`` if given (:func:`xquant_fx.quant.merge_sink`)."""
    keys = quant.read_keys(codes, scale, zero, window, n, bits, group, length)
    return keys if sink is None else quant.merge_sink(keys, sink)


@torch.library.custom_op("xquant::read_values", mutates_args=())
def read_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, window: torch.Tensor,
                n: torch.Tensor, bits: int, group: int, length: int,
                sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Values ``[b, H, length, D]`` as attention sees them: :func:`xquant_fx.quant.read_values`, with
    positions ``< S`` from ``sink`` if given."""
    values = quant.read_values(codes, scale, zero, window, n, bits, group, length)
    return values if sink is None else quant.merge_sink(values, sink)


def _read_fake(codes, scale, zero, window, n, bits, group, length, sink=None):
    return window.new_empty((window.shape[0], window.shape[1], length, window.shape[-1]))


read_keys.register_fake(_read_fake)
read_values.register_fake(_read_fake)


# --------------------------------------------------------------------------- hadamard
@torch.library.custom_op("xquant::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x`` times the normalized Hadamard matrix over its last dim (a power of two), in
    ``x.dtype``: :func:`xquant_fx.quant.hadamard`. The cache of ``XQuantConfig(rotation=
    "hadamard")`` rotates keys and values with it before storing them and rotates reads back; an
    op, not inline torch, so that :mod:`xquant_fx.passes.fuse_kv_attention` can find the read's
    rotation and move it onto the query and the attention output around the fused ``attend``.
    Compiled graphs do not keep it: :mod:`xquant_fx.passes.inline_rotations` replaces what the
    fusion leaves with :func:`xquant_fx.quant.hadamard` itself, which Inductor sees through."""
    return quant.hadamard(x, _hadamard_matrix(x.shape[-1], x.device))


@functools.lru_cache(maxsize=16)
def _hadamard_matrix(d: int, device: torch.device) -> torch.Tensor:
    """:func:`xquant_fx.quant.hadamard_matrix`, built once per size and device (eager calls)."""
    return quant.hadamard_matrix(d, device)


@hadamard.register_fake
def _hadamard_fake(x):
    return torch.empty_like(x)


# --------------------------------------------------------------------------- moe_experts
@triton_op("xquant::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, keep: int = -1) -> torch.Tensor:
    """Routed experts of tokens ``x [T, H]`` over slots ``ids``/``weights [T, K]`` (``ids >= E``:
    sentinel, skipped), ``gate_up [E, 2I, H]``, ``down [E, H, I]``, SiLU gating:
    :func:`xquant_fx.moe.experts_reference`. With ``0 < keep < K`` only each token's first ``keep``
    slots are read, as if the others were sentinels: the router pass sets it where a router drops
    the slots from ``keep`` on itself (static pruning), so that the kernels size their launches
    for the slots that do work (at batch 1, a step pruned from 8 experts to 4 splits the up
    projection 4 ways instead of 2, and launches no programs for the dropped slots)."""
    from .moe.reference import experts_reference

    if x.dim() != 2 or ids.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"moe_experts: x must be [T, H] and ids/weights [T, K]; got x {tuple(x.shape)}, ids {tuple(ids.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    if keep != -1 and not 1 <= keep <= ids.shape[1]:
        raise ValueError(f"moe_experts: keep={keep} must be in 1..K={ids.shape[1]} (or -1: every slot)")
    e, two_i, hid = gate_up.shape
    if hid != x.shape[1] or down.shape != (e, hid, two_i // 2):
        raise ValueError(
            f"moe_experts: gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not match hidden size "
            f"{x.shape[1]} ([E, 2I, H] and [E, H, I] expected)"
        )
    if uses_kernels(x):
        from .kernels.moe import moe_experts as kernel_moe

        return kernel_moe(x, ids, weights, gate_up, down, keep)
    if keep != -1:
        ids, weights = ids[:, :keep], weights[:, :keep]
    return experts_reference(x, ids, weights, gate_up, down)


@moe_experts.register_fake
def _moe_experts_fake(x, ids, weights, gate_up, down, keep=-1) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as both real paths return it (empty_like keeps x's strides)


# --------------------------------------------------------------------------- router_topk
#: Widest router the top-k kernel takes (one program holds a row).
ROUTER_TOPK_MAX_WIDTH = 4096


@triton_op("xquant::router_topk", mutates_args=())
def router_topk(
    scores: torch.Tensor, k: int, keep: int = -1, fill: float = 0.0, sentinel: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's top-k: ``torch.topk(scores, k, dim=-1, largest=True, sorted=True)`` (values,
    int64 indices), one launch on the kernel path where ``torch.topk`` takes two; ties go to the
    lower index there. With ``0 < keep < k`` the slots ranked ``keep`` and below are dropped in the
    same launch: value ``fill``, index ``sentinel`` (static expert pruning,
    :func:`xquant_fx.moe.prune_routes` with only ``keep``)."""
    if scores.dim() == 0 or not scores.is_floating_point():
        raise ValueError(f"router_topk: needs floating-point scores [..., N]; got {scores.dtype} {tuple(scores.shape)}")
    keep = _check_topk("router_topk", scores.shape[-1], k, keep)
    if uses_kernels(scores):
        from .kernels.moe import topk

        return topk(scores, k, keep, fill, sentinel)
    return _topk_reference(scores, k, keep, fill, sentinel)


@router_topk.register_fake
def _router_topk_fake(scores, k, keep=-1, fill=0.0, sentinel=0):
    shape = (*scores.shape[:-1], k)
    return scores.new_empty(shape), scores.new_empty(shape, dtype=torch.int64)


def _check_topk(name: str, n: int, k: int, keep: int) -> int:
    """``keep`` with -1 resolved, after checking ``1 <= keep <= k <= n <= ROUTER_TOPK_MAX_WIDTH``."""
    if not 1 <= k <= n or n > ROUTER_TOPK_MAX_WIDTH:
        raise ValueError(f"{name}: needs 1 <= k <= N <= {ROUTER_TOPK_MAX_WIDTH} (N: number of experts); "
                         f"got N={n}, k={k}")
    keep = k if keep == -1 else keep
    if not 1 <= keep <= k:
        raise ValueError(f"{name}: keep={keep} must be in 1..k={k} (or -1: keep all)")
    return keep


def _topk_reference(scores: torch.Tensor, k: int, keep: int, fill: float, sentinel: int):
    """``torch.topk(scores, k, sorted=True)`` with slots ``keep`` and after holding ``fill`` /
    ``sentinel``: the reference of both router ops' top-k."""
    values, indices = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    if keep < k:
        values = torch.cat([values[..., :keep], values.new_full((*values.shape[:-1], k - keep), fill)], -1)
        indices = torch.cat([indices[..., :keep], indices.new_full((*indices.shape[:-1], k - keep), sentinel)], -1)
    return values, indices


# --------------------------------------------------------------------------- router
@triton_op("xquant::router", mutates_args=())
def router(
    x: torch.Tensor, weight: torch.Tensor, k: int, keep: int = -1, fill: float = 0.0, sentinel: int = 0,
    normalize: bool = False, logits_dtype: Optional[torch.dtype] = None, values_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A softmax router in one op: ``logits = F.linear(x, weight)`` (``x [T, H]``, ``weight [E, H]``;
    float32 sums rounded to ``logits_dtype``: ``x.dtype`` (the default; ``weight`` in the same
    dtype) or float32 (any input dtypes, as ``F.linear(x.float(), weight.float())``)),
    ``probs = logits.float().softmax(-1)`` (on the kernel path to float32 rounding, not bitwise
    torch's),
    the ``k`` largest (sorted; slots from ``keep`` on dropped as in :func:`router_topk`), divided by
    the kept values' sum if ``normalize``, in ``values_dtype`` (default float32). Returns
    ``(values, indices, logits)``. On the kernel path a step of at most 16 tokens takes two
    launches (GEMV over the GPU, then softmax, top-k and normalization in one program per token)
    where the traced router takes four or five; larger steps compute the logits with
    ``torch.matmul``."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router: x must be [T, H] and weight [E, H]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"router: x and weight must be floating point; got {x.dtype} and {weight.dtype}")
    keep = _check_topk("router", weight.shape[0], k, keep)
    if normalize and fill != 0.0:
        raise ValueError(f"router: normalize needs dropped slots to hold 0, not fill={fill}")
    logits_dtype = logits_dtype or x.dtype
    if logits_dtype != torch.float32 and not x.dtype == weight.dtype == logits_dtype:
        raise ValueError(f"router: logits in {logits_dtype} need x and weight in {logits_dtype} too (got {x.dtype} and "
                         f"{weight.dtype}); float32 logits take any input dtypes")
    values_dtype = values_dtype or torch.float32
    if uses_kernels(x):
        from .kernels.moe import router as kernel_router

        return kernel_router(x, weight, k, keep, fill, sentinel, normalize, logits_dtype, values_dtype)
    logits = torch.nn.functional.linear(x.to(logits_dtype), weight.to(logits_dtype))
    values, indices = _topk_reference(logits.float().softmax(-1), k, keep, fill, sentinel)
    if normalize:
        values = values / values.sum(-1, keepdim=True)
    return values.to(values_dtype), indices, logits


@router.register_fake
def _router_fake(x, weight, k, keep=-1, fill=0.0, sentinel=0, normalize=False, logits_dtype=None,
                 values_dtype=None):
    t, e = x.shape[0], weight.shape[0]
    return (x.new_empty((t, k), dtype=values_dtype or torch.float32), x.new_empty((t, k), dtype=torch.int64),
            x.new_empty((t, e), dtype=logits_dtype or x.dtype))
