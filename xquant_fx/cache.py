"""XQuantCache: a transformers ``Cache`` whose layers keep the KV cache quantized (DESIGN §2, §4).

Storage of one quantized layer (``B`` = max batch, ``H`` = KV heads, ``T`` = max_cache_len,
``Tq`` = code capacity, ``G`` = group size, ``R`` = residual window)::

    k_codes  int32  [B, H, Tq*kb/32, Dk]   keys, per-channel groups of G tokens, packed over tokens
    k_scale  mdtype [B, H, Tq/G, Dk]       calibrated scale / zero point of each key group
    k_zero   mdtype [B, H, Tq/G, Dk]
    v_codes  int32  [B, H, Tq, Dv*vb/32]   values, per-token groups of G channels, packed over channels
    v_scale  mdtype [B, H, Tq, Dv/G]
    v_zero   mdtype [B, H, Tq, Dv/G]
    k_window dtype  [B, H, R, Dk]          ring buffer: token t lives in slot t % R
    v_window dtype  [B, H, R, Dv]

    k_sink   dtype  [B, H, S, Dk]          with XQuantConfig.sink_tokens = S > 0: positions < S, whole
    v_sink   dtype  [B, H, S, Dv]

``dtype`` is the model's; ``mdtype`` the metadata dtype, the model's too unless
``XQuantConfig.metadata_dtype`` asks for ``float8_e4m3fn`` (written through
:func:`quant.to_metadata`: clamped to +-448, then cast; read back as float32).

A layer that shares codes (the odd layer of a pair, XQuant §3.3) has no ``k_codes``/``v_codes``
and reads its partner's. A tensor with 16 bits is kept whole (``keys``/``values [B, H, T, D]``).

With ``n`` tokens stored, keys below ``Nk(n) = G * ceil((n - R) / G)`` (0 while ``n <= R``) and
values below ``Nv(n) = n - R`` are read from codes; the rest from the window. So keys leave the
window a whole group at a time (it holds between R - G + 1 and R keys) and values one token at a
time (it holds the newest R). Tokens are quantized at the step their ring slot is about to be
reused, which keeps a decode step free of data-dependent shapes and host synchronisation: every
step quantizes the value at position ``p - R`` and the key group starting there, and the key write
is masked off unless that group really starts at ``p - R`` (see :func:`quant.append_key`).

Prefill (more than one new token) attends over the new tokens in full precision and the existing
cache as stored, then stores the new tokens with the same rule, so a prompt prefilled at once and
one fed token by token leave the same storage.

What attention sees (and the mask size, :meth:`XQuantLayer.get_mask_sizes`, which transformers
may take before the forward runs, eagerly, for a forward that is then compiled): a decode step
(one new token) sees all ``max_cache_len`` positions, static shapes for compiled steps and CUDA
graphs; compiled, the graph pass fuses that read into ``xquant::attend``, which reads only the
stored positions. A prefill of ``L > 1`` tokens sees only the ``p0`` positions stored before it
and its own (except in ``torch.export``, whose prefill program reads every cache tensor it shares
with the decode program, :mod:`xquant_fx.aoti`): its memory follows the prompt, not the capacity, and a long prompt prefilled in
chunks (``generate(prefill_chunk_size=...)``) needs no more than one chunk's. Eager reads
dequantize :data:`READ_BLOCK` positions at a time into the cache dtype
(:meth:`XQuantLayer.read_stored`), never the whole capacity in float32.

A cache no longer than the residual window (``max_cache_len <= residual_length``) never quantizes
a token, so it keeps its layers in full precision and costs what a 16-bit cache costs.

Quality options (:class:`XQuantConfig`). ``sink_tokens``: positions below S are written to the
sink buffers as they arrive and always read from there; when position S is stored, the ring slots
of positions < S take a copy of it, so that the key group holding the sinks is quantized from
ordinary tokens (:func:`quant.append_sink`). A read with sinks is not a bare read op, so the fuse
pass leaves such layers on dequantize + SDPA (the attend kernel would need a third source for
positions < S). ``rotation="hadamard"``: every quantized tensor, window and sinks included, is
stored multiplied by the Hadamard matrix (``xquant::hadamard``, its own inverse) and reads are
multiplied back; the fuse pass rotates the query and the attention output instead.
``level_fit="lsq"``: decode steps store through the reference (:func:`quant.append_key` /
:func:`quant.append_value`) rather than the ``append_token`` kernel, which fits min-max levels only.

Sliding-window layers (Mistral, Gemma 2/3 local layers) keep transformers' own full-precision
``StaticSlidingWindowLayer``: they hold at most ``sliding_window`` tokens, and the memory report
counts them at 16 bits.

Tensor parallelism (``tp_size=N``, see :mod:`xquant_fx.distributed`): each rank's cache holds its
``H/N`` KV heads, quantized locally; ``H`` here is then the per-rank head count, and every size
above, ``memory_report()`` included, is per rank.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from transformers.cache_utils import Cache, StaticLayer, StaticSlidingWindowLayer

from . import quant
from .config import FULL_PRECISION, LayerPlan, XQuantConfig
from .distributed import config_tensor_parallel_size, split_kv_heads

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
#: Positions an eager read dequantizes at once (a multiple of every group size and code word).
READ_BLOCK = 4096


def _ops():
    """``torch.ops.xquant``, registering the ops on first use (``import xquant_fx`` stays free of
    triton)."""
    from . import ops  # noqa: F401

    return torch.ops.xquant
_SUPPORTED_TYPES = ("full_attention",) + _SLIDING_TYPES


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def kv_geometry(model_config) -> tuple[int, int, int, int]:
    """``(num_layers, kv_heads, k_head_dim, v_head_dim)`` of a decoder config.

    Raises ``ValueError`` naming the missing attribute for configs the cache cannot hold.
    """
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    name = type(cfg).__name__
    for attr in ("num_hidden_layers", "num_attention_heads"):
        if getattr(cfg, attr, None) is None:
            raise ValueError(f"{name} has no `{attr}`: XQuantCache needs a decoder-only attention model")
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if getattr(cfg, "qk_nope_head_dim", None) is not None:  # DeepSeek multi-head latent attention
        k_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        v_dim = cfg.v_head_dim
    else:
        k_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        v_dim = k_dim
    return cfg.num_hidden_layers, heads, k_dim, v_dim


def layer_types(model_config) -> list[str]:
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    unsupported = sorted({t for t in types if t not in _SUPPORTED_TYPES})
    if unsupported:
        raise ValueError(
            f"{type(cfg).__name__} has layer types {unsupported}: XQuantCache supports {list(_SUPPORTED_TYPES)}"
        )
    return list(types)


class XQuantLayer(StaticLayer):
    """One decoder layer's quantized KV cache; see the module docstring for layout and rules."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        plan: LayerPlan,
        config: XQuantConfig,
        max_cache_len: int,
        max_batch_size: int,
        partner: "XQuantLayer | None" = None,
    ):
        super().__init__(max_cache_len=max_cache_len)
        if (plan.k_shares or plan.v_shares) and partner is None:
            raise ValueError(f"layer {plan.index} shares codes but has no partner layer")
        self.plan = plan
        self.partner = partner
        self.max_batch_size = max_batch_size
        self.G = config.group_size
        self.R = config.residual_length
        self.metadata_dtype_name = config.metadata_dtype
        self.S = config.sink_tokens
        self.rotation = config.rotation
        self.fit = config.level_fit
        self.k_eta = config.eta_for(plan.k_bits) if plan.k_bits != FULL_PRECISION else 0.0
        self.v_eta = config.eta_for(plan.v_bits) if plan.v_bits != FULL_PRECISION else 0.0
        # Positions [0, Tq) can ever be quantized: the newest R tokens never are.
        self.Tq = _ceil_to(max(max_cache_len - self.R, 1), self.G)

    # ------------------------------------------------------------------ allocation
    def storage_spec(self, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype) -> dict[str, tuple]:
        """Name -> (shape, dtype) of every tensor this layer allocates (``dtype``: the model's)."""
        B, H, T, Tq, G, R = self.max_batch_size, heads, self.max_cache_len, self.Tq, self.G, self.R
        kb, vb = self.plan.k_bits, self.plan.v_bits
        mdtype = quant.metadata_dtype(self.metadata_dtype_name, dtype)
        spec: dict[str, tuple] = {}
        for bits, dim, kind in ((kb, k_dim, "key"), (vb, v_dim, "value")):
            if self.rotation is not None and bits != FULL_PRECISION and dim & (dim - 1):
                raise ValueError(
                    f"rotation={self.rotation!r} needs a power-of-two head dim; the {kind} head_dim is {dim}"
                )
        if kb == FULL_PRECISION:
            spec["keys"] = ((B, H, T, k_dim), dtype)
        else:
            if not self.plan.k_shares:
                spec["k_codes"] = ((B, H, Tq * kb // 32, k_dim), torch.int32)
            spec["k_scale"] = ((B, H, Tq // G, k_dim), mdtype)
            spec["k_zero"] = ((B, H, Tq // G, k_dim), mdtype)
            spec["k_window"] = ((B, H, R, k_dim), dtype)
            if self.S:
                spec["k_sink"] = ((B, H, self.S, k_dim), dtype)
        if vb == FULL_PRECISION:
            spec["values"] = ((B, H, T, v_dim), dtype)
        else:
            if v_dim % G:
                raise ValueError(
                    f"value head_dim {v_dim} is not a multiple of group_size {G}: values are quantized in groups "
                    "of group_size channels"
                )
            if (v_dim * vb) % 32:
                raise ValueError(f"value head_dim {v_dim} at {vb} bits does not fill whole 32-bit words")
            if not self.plan.v_shares:
                spec["v_codes"] = ((B, H, Tq, v_dim * vb // 32), torch.int32)
            spec["v_scale"] = ((B, H, Tq, v_dim // G), mdtype)
            spec["v_zero"] = ((B, H, Tq, v_dim // G), mdtype)
            spec["v_window"] = ((B, H, R, v_dim), dtype)
            if self.S:
                spec["v_sink"] = ((B, H, self.S, v_dim), dtype)
        return spec

    def allocate(self, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, device) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"XQuantCache stores float16, bfloat16 or float32 activations, not {dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        self.num_heads, self.k_head_dim, self.v_head_dim = heads, k_dim, v_dim
        self.batch_size = self.max_batch_size
        self.storage = {
            name: torch.zeros(shape, dtype=dt, device=self.device)
            for name, (shape, dt) in self.storage_spec(heads, k_dim, v_dim, dtype).items()
        }
        # "cuda" allocates on the current device, "cuda:0" names it: keep the concrete device the
        # storage landed on, which is what every key/value tensor reports
        self.device = next(iter(self.storage.values())).device
        for name, tensor in self.storage.items():
            setattr(self, name, tensor)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for tensor in (*self.storage.values(), self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[1], key_states.shape[-1], value_states.shape[-1], key_states.dtype, key_states.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values()) if self.is_initialized else 0

    # ------------------------------------------------------------------ checks
    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        if b > self.max_batch_size:
            raise ValueError(f"batch size {b} is larger than the cache's max_batch_size={self.max_batch_size}")
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if t.dtype != self.dtype:
                raise ValueError(f"{name} are {t.dtype} but the cache was allocated for {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} are on {t.device} but the cache lives on {self.device}")
        if key_states.shape[1] != self.num_heads or key_states.shape[-1] != self.k_head_dim:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} do not match the cache's {self.num_heads} heads x "
                f"head_dim {self.k_head_dim}"
            )

    # ------------------------------------------------------------------ update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        if key_states.shape[-2] == 1:
            k, v = self._rotate("k", key_states), self._rotate("v", value_states)
            if torch.compiler.is_compiling():
                self._append_one(k, v)
                return self.read(key_states.shape[0], self.cumulative_length)
            stored = int(self.cumulative_length)
            self._check_room(stored, 1)
            self._append_one(k, v)
            b, n = key_states.shape[0], stored + 1
            return self.read_stored("k", b, n, self.max_cache_len), self.read_stored("v", b, n, self.max_cache_len)
        return self._prefill(key_states, value_states)

    def _rotate(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as this layer stores it: rotated when ``rotation`` is set and the tensor is
        quantized (the Hadamard matrix is its own inverse, so this also rotates a read back)."""
        bits = self.plan.k_bits if kind == "k" else self.plan.v_bits
        return x if self.rotation is None or bits == FULL_PRECISION else _ops().hadamard(x)

    def _check_room(self, stored: int, new: int) -> None:
        if stored + new > self.max_cache_len:
            raise ValueError(
                f"the cache holds {stored} tokens and {new} more would pass max_cache_len={self.max_cache_len}; "
                "allocate a larger cache (max_cache_len=...)"
            )

    def _shared_codes(self, kind: str, b: int) -> torch.Tensor | None:
        """The partner's codes a sharing layer fits its levels to (``level_fit="lsq"``), else None."""
        shares = self.plan.k_shares if kind == "k" else self.plan.v_shares
        return self._src_codes(kind)[:b] if shares and self.fit == "lsq" else None

    def _src_codes(self, kind: str) -> torch.Tensor:
        shares = self.plan.k_shares if kind == "k" else self.plan.v_shares
        return getattr(self.partner if shares else self, f"{kind}_codes")

    def _append_one(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token per sequence (k, v: [b, H, 1, D], rotated if the layer rotates) at
        position cumulative_length."""
        b, p, plan = k.shape[0], self.cumulative_length, self.plan
        k_codes = None if plan.k_shares or plan.k_bits == FULL_PRECISION else self.k_codes[:b]
        v_codes = None if plan.v_shares or plan.v_bits == FULL_PRECISION else self.v_codes[:b]
        if self.S:
            if plan.k_bits != FULL_PRECISION:
                quant.append_sink(k, p, self.k_sink[:b], self.k_window[:b])
            if plan.v_bits != FULL_PRECISION:
                quant.append_sink(v, p, self.v_sink[:b])
        if plan.k_bits != FULL_PRECISION and plan.v_bits != FULL_PRECISION and self.fit == "minmax":
            _ops().append_token(
                k, v, p,
                k_codes, self.k_scale[:b], self.k_zero[:b], self.k_window[:b],
                v_codes, self.v_scale[:b], self.v_zero[:b], self.v_window[:b],
                plan.k_bits, plan.v_bits, self.G, self.k_eta, self.v_eta,
            )
        else:
            # A full-precision tensor: plain copies for it. The reference for a quantized one: the
            # append kernel knows min-max levels only, so level_fit="lsq" stays on the reference
            # (torch.compile compiles it; the kernel path is used again once it fits by least squares).
            if plan.k_bits == FULL_PRECISION:
                self.keys[:b].index_copy_(2, p.reshape(1), k)
            else:
                quant.append_key(k, p, k_codes, self.k_scale[:b], self.k_zero[:b], self.k_window[:b],
                                 plan.k_bits, self.G, self.k_eta, self.fit, self._shared_codes("k", b))
            if plan.v_bits == FULL_PRECISION:
                self.values[:b].index_copy_(2, p.reshape(1), v)
            else:
                quant.append_value(v, p, v_codes, self.v_scale[:b], self.v_zero[:b], self.v_window[:b],
                                   plan.v_bits, self.G, self.v_eta, self.fit, self._shared_codes("v", b))
        self.cumulative_length.add_(1)

    def _prefill(self, k: torch.Tensor, v: torch.Tensor):
        """Store L > 1 new tokens (host-side positions); return what attention must see: the
        ``p0`` stored positions and the new ones (every capacity position when compiling)."""
        b, L = k.shape[0], k.shape[-2]
        p0 = int(self.cumulative_length)
        self._check_room(p0, L)
        n = p0 + L
        if torch.compiler.is_exporting():
            out_k, out_v = self.read(b, p0)
            out_k = out_k.clone() if self.plan.k_bits == FULL_PRECISION else out_k
            out_v = out_v.clone() if self.plan.v_bits == FULL_PRECISION else out_v
            out_k[:, :, p0:n] = k
            out_v[:, :, p0:n] = v
        else:
            out_k = torch.cat([self.read_stored("k", b, p0), k], dim=2)
            out_v = torch.cat([self.read_stored("v", b, p0), v], dim=2)
        self._store_many("k", self._rotate("k", k), p0)
        self._store_many("v", self._rotate("v", v), p0)
        self.cumulative_length.add_(L)
        return out_k, out_v

    def _store_many(self, kind: str, new: torch.Tensor, p0: int) -> None:
        b, L = new.shape[0], new.shape[-2]
        n, R, G = p0 + L, self.R, self.G
        bits = self.plan.k_bits if kind == "k" else self.plan.v_bits
        if bits == FULL_PRECISION:
            getattr(self, "keys" if kind == "k" else "values")[:b, :, p0:n] = new
            return
        window = getattr(self, f"{kind}_window")[:b]
        base = max(0, p0 - R)  # oldest position still in the ring
        old = window.index_select(2, torch.arange(base, p0, device=self.device) % R)
        seq = torch.cat([old, new], dim=2)  # positions [base, n)
        S = self.S
        if S and p0 < S:
            getattr(self, f"{kind}_sink")[:b, :, p0 : min(n, S)] = new[:, :, : min(n, S) - p0]
        if S and kind == "k" and p0 <= S < n:  # as quant.append_sink does at pos == S
            seq[:, :, : S - base] = seq[:, :, S - base : S - base + 1]
        shares = self.plan.k_shares if kind == "k" else self.plan.v_shares
        src = self._src_codes(kind)[:b] if shares and self.fit == "lsq" else None
        if kind == "k":
            lo, hi = quant.key_boundary(p0, R, G), quant.key_boundary(n, R, G)
            if hi > lo:
                given = None if src is None else quant.unpack(src[:, :, lo * bits // 32 : hi * bits // 32], bits, -2)
                codes, scale, zero = quant.quantize_keys(seq[:, :, lo - base : hi - base], bits, G, self.k_eta,
                                                         self.fit, given)
                if not shares:
                    self.k_codes[:b, :, lo * bits // 32 : hi * bits // 32] = quant.pack(codes, bits, -2)
                self.k_scale[:b, :, lo // G : hi // G] = quant.to_metadata(scale, self.k_scale.dtype)
                self.k_zero[:b, :, lo // G : hi // G] = quant.to_metadata(zero, self.k_zero.dtype)
        else:
            lo, hi = quant.value_boundary(p0, R), quant.value_boundary(n, R)
            if hi > lo:
                given = None if src is None else quant.unpack(src[:, :, lo:hi], bits, -1)
                codes, scale, zero = quant.quantize_values(seq[:, :, lo - base : hi - base], bits, G, self.v_eta,
                                                           self.fit, given)
                if not shares:
                    self.v_codes[:b, :, lo:hi] = quant.pack(codes, bits, -1)
                self.v_scale[:b, :, lo:hi] = quant.to_metadata(scale, self.v_scale.dtype)
                self.v_zero[:b, :, lo:hi] = quant.to_metadata(zero, self.v_zero.dtype)
        keep = max(base, n - R)
        window.index_copy_(2, torch.arange(keep, n, device=self.device) % R, seq[:, :, keep - base :])

    # ------------------------------------------------------------------ read
    def read(self, b: int, n) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b, H, T, D]`` as attention sees them with ``n`` tokens stored:
        dequantized below the window boundary, full precision in the window, zeros-derived finite
        values past ``n`` (masked by the caller)."""
        return self._read_one("k", b, n), self._read_one("v", b, n)

    def _read_one(self, kind: str, b: int, n) -> torch.Tensor:
        bits = self.plan.k_bits if kind == "k" else self.plan.v_bits
        if bits == FULL_PRECISION:
            return getattr(self, "keys" if kind == "k" else "values")[:b]
        if isinstance(n, int):
            n = torch.tensor(n, device=self.device)
        reader = _ops().read_keys if kind == "k" else _ops().read_values
        x = reader(
            self._src_codes(kind)[:b],
            getattr(self, f"{kind}_scale")[:b],
            getattr(self, f"{kind}_zero")[:b],
            getattr(self, f"{kind}_window")[:b],
            n, bits, self.G, self.max_cache_len,
        )
        # Sinks make the read something other than a bare read op, so the fuse_kv_attention pass
        # leaves this layer on dequantize + SDPA: the attend kernel has no sink input yet.
        if self.S:
            x = quant.merge_sink(x, getattr(self, f"{kind}_sink")[:b])
        return self._rotate(kind, x)

    def read_stored(self, kind: str, b: int, n: int, length: int | None = None) -> torch.Tensor:
        """``[b, H, length or n, D]`` in the cache dtype: ``read(b, n)``'s first ``n`` positions
        (sinks and rotation included), exactly, dequantized :data:`READ_BLOCK` positions at a time (eager reads; module
        docstring), then zeros up to ``length``."""
        bits = self.plan.k_bits if kind == "k" else self.plan.v_bits
        length = n if length is None else length
        if bits == FULL_PRECISION:
            return getattr(self, "keys" if kind == "k" else "values")[:b, :, :length]
        G, R = self.G, self.R
        window = getattr(self, f"{kind}_window")[:b]
        codes = self._src_codes(kind)[:b]
        scale, zero = getattr(self, f"{kind}_scale")[:b], getattr(self, f"{kind}_zero")[:b]
        out = window.new_empty(*window.shape[:2], length, window.shape[-1])
        out[:, :, n:] = 0
        # keys: the boundary is a multiple of G, and a group holds whole code words (G * bits % 32 == 0)
        boundary = quant.key_boundary(n, R, G) if kind == "k" else quant.value_boundary(n, R)
        for s in range(0, boundary, READ_BLOCK):
            e = min(boundary, s + READ_BLOCK)
            if kind == "k":
                out[:, :, s:e] = quant.dequantize_keys(quant.unpack(codes[:, :, s * bits // 32 : e * bits // 32], bits, -2),
                                                       scale[:, :, s // G : e // G], zero[:, :, s // G : e // G], G)
            else:
                out[:, :, s:e] = quant.dequantize_values(quant.unpack(codes[:, :, s:e], bits, -1),
                                                         scale[:, :, s:e], zero[:, :, s:e], G)
        ring = torch.arange(boundary, n, device=window.device) % R
        out[:, :, boundary:n] = window.index_select(2, ring)
        if self.S:
            sinks = min(self.S, n)
            out[:, :, :sinks] = getattr(self, f"{kind}_sink")[:b, :, :sinks]
        return self._rotate(kind, out)

    # ------------------------------------------------------------------ misc Cache API
    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        """``(kv_length, 0)``, what :meth:`update` returns: ``max_cache_len`` for a decode step,
        the positions stored plus the new ones for a prefill (module docstring). The argument is
        the query length (transformers >= 5.2x) or the new tokens' ``cache_position``."""
        new = args[0] if args else next(iter(kwargs.values()))
        new = new.shape[0] if isinstance(new, torch.Tensor) else int(new)
        if new == 1 or torch.compiler.is_exporting():
            return self.max_cache_len, 0
        return int(self.cumulative_length) + new, 0

    def reset(self) -> None:
        if self.is_initialized:
            for tensor in self.storage.values():
                tensor.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for tensor in self.storage.values():
            tensor[: idx.numel()] = tensor.index_select(0, idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("XQuantCache cannot be cropped: quantized groups cannot be un-quantized")


class XQuantCache(Cache):
    """A static, preallocated, quantized KV cache for a transformers decoder.

    Args:
        model_config: the model's ``PretrainedConfig`` (``model.config``).
        xquant_config: an :class:`XQuantConfig`, a preset name (default ``"xquant-1.38"``) or a
            spec (:meth:`XQuantConfig.from_spec`).
        max_batch_size: sequences the cache is allocated for; a smaller batch uses a slice.
        max_cache_len: tokens per sequence (prompt + generated); required.
        device, dtype: allocate now; when either is missing, storage is allocated at the first
            update from the model's own key states.
        tp_size: tensor-parallel ranks the model's KV heads are split over (a model loaded with
            ``tp_plan="auto"``): the cache holds ``num_key_value_heads / tp_size`` heads, this
            rank's share, and its sizes and memory report are per rank. ``ValueError`` (before
            anything is allocated) when it does not divide the head count.
            :func:`xquant_fx.optimize` sets it from the model.

    Use it as ``model.generate(ids, past_key_values=cache)`` (``cache=cache`` on transformers
    versions that renamed the argument), or through :func:`xquant_fx.optimize`.
    """

    def __init__(
        self,
        model_config,
        xquant_config: XQuantConfig | str | None = None,
        max_batch_size: int = 1,
        max_cache_len: int | None = None,
        device=None,
        dtype: torch.dtype | None = None,
        tp_size: int = 1,
    ):
        xquant_config = XQuantConfig.coerce(xquant_config, what="xquant_config")
        if getattr(model_config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(model_config).__name__} is an encoder-decoder config: XQuantCache holds a decoder-only "
                "model's self-attention cache (generate would also append cross-attention keys to it)"
            )
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"XQuantCache needs max_cache_len, a positive int (prompt + new tokens); got {max_cache_len!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        num_layers, heads, k_dim, v_dim = kv_geometry(model_config)
        types = layer_types(model_config)
        text_cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        heads = split_kv_heads(heads, tp_size, type(text_cfg).__name__)
        self.tp_size = tp_size
        # A model that transformers sharded records it on its config; used only to explain a mismatch.
        self._config_tp_size = config_tensor_parallel_size(model_config)
        window = getattr(text_cfg, "sliding_window", None)
        sliding = [t in _SLIDING_TYPES and window is not None and window < max_cache_len for t in types]
        self.xquant_config = xquant_config
        self.plans = xquant_config.resolve(num_layers, sliding)
        if max_cache_len <= xquant_config.residual_length:  # nothing would ever leave the window
            self.plans = [p if p.sliding else dataclasses.replace(p, k_bits=FULL_PRECISION, v_bits=FULL_PRECISION,
                                                                    k_shares=False, v_shares=False)
                          for p in self.plans]
        self._batch_capacity, self._length_capacity = max_batch_size, max_cache_len
        self.geometry = (heads, k_dim, v_dim)
        layers: list = []
        for plan in self.plans:
            if plan.sliding:
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=window))
            else:
                partner = layers[plan.index - 1] if (plan.k_shares or plan.v_shares) else None
                layers.append(XQuantLayer(plan, xquant_config, max_cache_len, max_batch_size, partner))
        super().__init__(layers=layers)
        self.dtype = dtype
        if device is not None and dtype is not None:
            self.early_initialization(max_batch_size, heads, k_dim, dtype, torch.device(device))

    # Properties, not attributes: some transformers versions define them read-only on Cache.
    @property
    def max_batch_size(self) -> int:
        return self._batch_capacity

    @property
    def max_cache_len(self) -> int:
        return self._length_capacity

    def early_initialization(self, batch_size, num_heads, head_dim, dtype, device):
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the cache's max_batch_size={self.max_batch_size}")
        heads, k_dim, v_dim = self.geometry
        for layer in self.layers:
            if layer.is_initialized:
                continue
            if isinstance(layer, XQuantLayer):
                layer.allocate(heads, k_dim, v_dim, dtype, device)
            else:
                fake_k = torch.zeros((self.max_batch_size, heads, 0, k_dim), dtype=dtype, device=device)
                fake_v = torch.zeros((self.max_batch_size, heads, 0, v_dim), dtype=dtype, device=device)
                layer.lazy_initialization(fake_k, fake_v)
        self.dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.layers[layer_idx].is_initialized:
            self._check_heads(key_states.shape[1])
            if self.dtype is None:
                self.dtype = key_states.dtype
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_heads(self, got: int) -> None:
        """Before lazily allocating a layer: on a tensor-parallel model, the heads really received
        must be this rank's share, or the cache would be sized (and reported) wrongly."""
        heads = self.geometry[0]
        if got == heads or (self.tp_size == 1 and self._config_tp_size == 1):
            return
        if self.tp_size == 1:
            raise ValueError(
                f"key_states carry {got} KV heads but the cache was built for all {heads}: the model is "
                f"tensor-parallel (tp_size={self._config_tp_size}), so build the cache with "
                f"XQuantCache(..., tp_size=model.tp_size) (xquant_fx.optimize does this)"
            )
        raise ValueError(
            f"key_states carry {got} KV heads but the cache expects {heads} per rank "
            f"({heads * self.tp_size} KV heads / tp_size={self.tp_size}): the model's tensor-parallel plan does "
            "not shard its KV heads over tp_size ranks"
        )

    # ------------------------------------------------------------------ memory
    def memory_report(self, dtype: torch.dtype | None = None) -> dict:
        """Bytes this cache holds and what they buy.

        ``elements`` counts the K and V values the cache can hold (sliding layers: their window);
        ``code_bits`` is the paper's measure (integer code bits per element, window and scale/zero
        ignored, full-precision tensors at their dtype bits); ``stored_bits`` is every byte held
        (codes, scales, zeros, windows, full-precision layers) per element; ``metadata_bits`` the
        part of it that is scales and zero points (at the metadata dtype's width: 8 bits each
        with ``metadata_dtype="float8_e4m3fn"``); ``bf16_bytes`` what a bf16 cache of the same
        capacity holds. Exact before allocation too (``dtype`` defaults to the cache's, else
        bfloat16). With ``tp_size`` > 1 every count is this rank's (its share of the KV heads).
        """
        dtype = dtype or self.dtype or torch.bfloat16
        heads, k_dim, v_dim = self.geometry
        B, T = self.max_batch_size, self.max_cache_len
        elements = code = stored = metadata = 0
        for plan, layer in zip(self.plans, self.layers):
            if plan.sliding:
                cap = layer.max_cache_len
                n = B * heads * cap * (k_dim + v_dim)
                elements += n
                code += n * dtype.itemsize * 8
                stored += n * dtype.itemsize
                continue
            spec = layer.storage_spec(heads, k_dim, v_dim, dtype)
            stored += sum(math.prod(shape) * dt.itemsize for shape, dt in spec.values())
            metadata += sum(math.prod(shape) * dt.itemsize for name, (shape, dt) in spec.items()
                            if name.endswith(("_scale", "_zero")))
            nk, nv = B * heads * T * k_dim, B * heads * T * v_dim
            elements += nk + nv
            kb = dtype.itemsize * 8 if plan.k_bits == FULL_PRECISION else (0 if plan.k_shares else plan.k_bits)
            vb = dtype.itemsize * 8 if plan.v_bits == FULL_PRECISION else (0 if plan.v_shares else plan.v_bits)
            code += nk * kb + nv * vb
        return {
            "preset": self.xquant_config.name,
            "tp_size": self.tp_size,
            "elements": elements,
            "bytes": stored,
            "bf16_bytes": elements * 2,
            "code_bits": code / elements,
            "stored_bits": stored * 8 / elements,
            "metadata_bits": metadata * 8 / elements,
            "compression": elements * 2 / stored,
        }

    def allocated_bytes(self) -> int:
        """Bytes of the tensors actually allocated (0 before the first update)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, XQuantLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        return total
