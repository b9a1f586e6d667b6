"""One decoder layer's quantized KV cache, :class:`XQuantLayer`: storage, writes and reads. The layout
and the rules it follows are in the docstring of :mod:`xquant_fx.cache`, which holds the layers."""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from . import quant
from .config import FULL_PRECISION, LayerPlan, XQuantConfig

#: Positions an eager read dequantizes at once (a multiple of every group size and code word).
READ_BLOCK = 4096


def _ops():
    """``torch.ops.xquant``, registering the ops on first use (``import xquant_fx`` stays free of
    triton)."""
    from . import ops  # noqa: F401

    return torch.ops.xquant


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


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
        values_rotated: bool = False,
    ):
        super().__init__(max_cache_len=max_cache_len)
        if (plan.k_shares or plan.v_shares) and partner is None:
            raise ValueError(f"layer {plan.index} shares codes but has no partner layer")
        self.plan = plan
        self.partner = partner
        self.max_batch_size = max_batch_size
        self.G = config.group_size
        self.VG = config.value_group  # channels per value group
        self.R = config.residual_length
        self.metadata_dtype_name = config.metadata_dtype
        self.S = config.sink_tokens
        self.rotation = config.rotation
        # The model computes its values rotated already (xquant_fx.rotation): store them as they come.
        self.values_rotated = values_rotated
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
            VG = self.VG
            if v_dim % VG:
                name = "value_group_size" if VG != G else "group_size"
                raise ValueError(
                    f"value head_dim {v_dim} is not a multiple of {name} {VG}: values are quantized in groups "
                    f"of {name} channels"
                )
            if (v_dim * vb) % 32:
                raise ValueError(f"value head_dim {v_dim} at {vb} bits does not fill whole 32-bit words")
            if not self.plan.v_shares:
                spec["v_codes"] = ((B, H, Tq, v_dim * vb // 32), torch.int32)
            spec["v_scale"] = ((B, H, Tq, v_dim // VG), mdtype)
            spec["v_zero"] = ((B, H, Tq, v_dim // VG), mdtype)
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
        quantized (the Hadamard matrix is its own inverse, so this also rotates a read back);
        values as they come when the model's weights rotate them (``values_rotated``)."""
        bits = self.plan.k_bits if kind == "k" else self.plan.v_bits
        if self.rotation is None or bits == FULL_PRECISION or (kind == "v" and self.values_rotated):
            return x
        return _ops().hadamard(x)

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
                                   plan.v_bits, self.VG, self.v_eta, self.fit, self._shared_codes("v", b))
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
                codes, scale, zero = quant.quantize_values(seq[:, :, lo - base : hi - base], bits, self.VG, self.v_eta,
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
            n, bits, self.G if kind == "k" else self.VG, self.max_cache_len,
            getattr(self, f"{kind}_sink")[:b] if self.S else None,  # the op merges the sinks in
        )
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
                                                         scale[:, :, s:e], zero[:, :, s:e], self.VG)
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
