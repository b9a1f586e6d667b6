"""XQuantCache: a transformers ``Cache`` whose layers keep the KV cache quantized (docs/how-it-works.md, "The method" and "Storage").

Storage of one quantized layer (``B`` = max batch, ``H`` = KV heads, ``T`` = max_cache_len,
``Tq`` = code capacity, ``G`` = group size, ``R`` = residual window)::

    k_codes  int32  [B, H, Tq*kb/32, Dk]   keys, per-channel groups of G tokens, packed over tokens
    k_scale  mdtype [B, H, Tq/G, Dk]       calibrated scale / zero point of each key group
    k_zero   mdtype [B, H, Tq/G, Dk]
    v_codes  int32  [B, H, Tq, Dv*vb/32]   values, per-token groups of VG channels, packed over channels
    v_scale  mdtype [B, H, Tq, Dv/VG]      (VG: value_group_size, else G)
    v_zero   mdtype [B, H, Tq, Dv/VG]
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
dequantize :data:`~xquant_fx.cache_layer.READ_BLOCK` positions at a time into the cache dtype
(:meth:`XQuantLayer.read_stored`), never the whole capacity in float32.

A cache no longer than the residual window (``max_cache_len <= residual_length``) never quantizes
a token, so it keeps its layers in full precision and costs what a 16-bit cache costs.

Quality options (:class:`XQuantConfig`). ``sink_tokens``: positions below S are written to the
sink buffers as they arrive and always read from there; when position S is stored, the ring slots
of positions < S take a copy of it, so that the key group holding the sinks is quantized from
ordinary tokens (:func:`quant.append_sink`). Reads pass the sink buffers to the read ops, and
the fuse pass passes them on to ``xquant::attend``, whose kernels mask positions < S in the codes
and the ring and attend to the sinks as one more partial of the split-K merge. ``rotation="hadamard"``: every quantized tensor, window and sinks included, is
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
from transformers.cache_utils import Cache, StaticSlidingWindowLayer

from .cache_layer import XQuantLayer
from .config import FULL_PRECISION, XQuantConfig
from .distributed import config_tensor_parallel_size, split_kv_heads
from .hf import SLIDING_TYPES, kv_geometry, layer_types, text_config
from .rotation import value_rotation_folded


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
        text_cfg = text_config(model_config)
        heads = split_kv_heads(heads, tp_size, type(text_cfg).__name__)
        self.tp_size = tp_size
        # A model that transformers sharded records it on its config; used only to explain a mismatch.
        self._config_tp_size = config_tensor_parallel_size(model_config)
        window = getattr(text_cfg, "sliding_window", None)
        sliding = [t in SLIDING_TYPES and window is not None and window < max_cache_len for t in types]
        self.xquant_config = xquant_config
        self.plans = xquant_config.resolve(num_layers, sliding)
        if max_cache_len <= xquant_config.residual_length:  # nothing would ever leave the window
            self.plans = [p if p.sliding else dataclasses.replace(p, k_bits=FULL_PRECISION, v_bits=FULL_PRECISION,
                                                                    k_shares=False, v_shares=False)
                          for p in self.plans]
        self._batch_capacity, self._length_capacity = max_batch_size, max_cache_len
        self.geometry = (heads, k_dim, v_dim)
        layers: list = []
        values_rotated = value_rotation_folded(model_config)
        for plan in self.plans:
            if plan.sliding:
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=window))
            else:
                partner = layers[plan.index - 1] if (plan.k_shares or plan.v_shares) else None
                layers.append(XQuantLayer(plan, xquant_config, max_cache_len, max_batch_size, partner,
                                          values_rotated=values_rotated))
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
