"""XQuantConfig: what the quantized KV cache stores, per layer.

A config is written once, before the model is known (``XQuantConfig.preset("xquant-1.38")``), and
*resolved* against a model's layer count with :meth:`XQuantConfig.resolve`, which returns the
per-layer plan the cache allocates from. Every field is checked at construction; a bad value raises
``ValueError`` naming the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

QUANT_BITS = (1, 2, 4)
FULL_PRECISION = 16
ALLOWED_BITS = QUANT_BITS + (FULL_PRECISION,)
ALLOWED_GROUPS = (32, 64, 128)
#: Storage of the per-group scales and zero points besides the model dtype (``None``).
METADATA_DTYPES = ("float8_e4m3fn",)
#: Largest finite float8_e4m3fn value: metadata is clamped to +-FP8_E4M3_MAX before the cast.
FP8_E4M3_MAX = 448.0
#: Orthogonal rotations applied to quantized keys and values before they are quantized.
ROTATIONS = ("hadamard",)
#: How a group's scale and zero point are chosen (``XQuantConfig.level_fit``).
LEVEL_FITS = ("minmax", "lsq")

# Calibration strength per bit width (XQuant §3.2: z^ = z + eta*s*(2^B-1), s^ = (1-2 eta) s).
# Chosen on SmolLM2-135M-Instruct over the paper's grid by decode-condition perplexity; the sweep
# is recorded in README "Calibration defaults".
DEFAULT_ETA = {1: 1 / 6, 2: 0.09}

BitsSpec = int | Sequence[int]
ShareSpec = int | float | None


def _is_int(x) -> bool:
    """A true int: ``bool`` is an ``int`` subclass, but ``True`` as a bit width or a layer index is
    a mistake, not 1."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check_bits(name: str, value) -> int | tuple[int, ...]:
    """``k_bits``/``v_bits`` as stored: an int, or a tuple with one int per layer."""
    accepted = f"each entry must be an int, one of {ALLOWED_BITS}"
    if _is_int(value):
        if value not in ALLOWED_BITS:
            raise ValueError(f"XQuantConfig.{name}={value!r}: must be one of {ALLOWED_BITS} (or one per layer)")
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        # A float such as 2.0 included: a bit width is a whole number of bits, given as an int.
        raise ValueError(
            f"XQuantConfig.{name}={value!r}: must be an int, one of {ALLOWED_BITS}, or a list with one such int "
            f"per layer (got {type(value).__name__})"
        )
    values = tuple(value)
    if not values:
        raise ValueError(f"XQuantConfig.{name}=[]: a per-layer list needs one entry per layer")
    for i, b in enumerate(values):
        if not _is_int(b) or b not in ALLOWED_BITS:
            raise ValueError(f"XQuantConfig.{name}={value!r}: entry {i} is {b!r}; {accepted}")
    return values


class MoESchedule(NamedTuple):
    """Activated experts by MoE-layer depth (arXiv 2505.03531): ``first`` experts in the first MoE
    layer, ``peak`` at MoE layer ``at``, ``last`` in the last one, linear in between, rounded to
    the nearest integer (halves up). Layers are counted over MoE layers only, from 0: a model whose
    first decoder layer is dense (DeepSeek ``first_k_dense_replace=1``) has MoE layer 0 at decoder
    layer 1."""

    first: int
    peak: int
    last: int
    at: int

    def resolve(self, num_moe_layers: int) -> list[int]:
        if not 0 <= self.at < num_moe_layers:
            raise ValueError(
                f"MoESchedule.at={self.at}: must index one of the model's {num_moe_layers} MoE layers (0..{num_moe_layers - 1})"
            )
        last = num_moe_layers - 1
        ks = []
        for i in range(num_moe_layers):
            if i <= self.at:
                x = self.peak if self.at == 0 else self.first + (self.peak - self.first) * i / self.at
            else:
                x = self.peak + (self.last - self.peak) * (i - self.at) / (last - self.at)
            ks.append(int(x + 0.5))
        return ks


MoETopK = int | Sequence[int] | MoESchedule | None


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer's cache is stored.

    ``k_bits``/``v_bits`` of 16 keep that tensor in the model dtype. ``k_shares``/``v_shares`` mean
    the layer stores no codes for that tensor and dequantizes with layer ``index - 1``'s codes.
    ``sliding`` layers keep transformers' own full-precision sliding-window storage.
    """

    index: int
    k_bits: int
    v_bits: int
    k_shares: bool = False
    v_shares: bool = False
    sliding: bool = False

    @property
    def quantized(self) -> bool:
        return not self.sliding and (self.k_bits != FULL_PRECISION or self.v_bits != FULL_PRECISION)


def resolve_moe_top_k(k: MoETopK, num_moe_layers: int, model_k: int) -> list[int]:
    """Activated experts per MoE layer of the setting ``k`` (:attr:`XQuantConfig.moe_top_k`,
    validated): ``model_k`` where ``k`` is ``None``; raises ``ValueError`` for a list of the wrong
    length or a k outside ``1 .. model_k``."""
    if k is None:
        ks = [model_k] * num_moe_layers
    elif isinstance(k, MoESchedule):
        ks = k.resolve(num_moe_layers)
    elif isinstance(k, int):
        ks = [k] * num_moe_layers
    else:
        if len(k) != num_moe_layers:
            raise ValueError(
                f"XQuantConfig.moe_top_k lists {len(k)} MoE layers but the model has {num_moe_layers}"
            )
        ks = list(k)
    bad = [(i, v) for i, v in enumerate(ks) if not 1 <= v <= model_k]
    if bad:
        i, v = bad[0]
        raise ValueError(
            f"XQuantConfig.moe_top_k={k!r} asks for {v} experts in MoE layer {i}: the model routes each token "
            f"to {model_k} (num_experts_per_tok), so each value must be in 1..{model_k}"
        )
    return ks


@dataclass(frozen=True)
class XQuantConfig:
    """Settings of the quantized KV cache (docs/how-it-works.md, "The method").

    Args:
        k_bits, v_bits: 1, 2, 4 or 16 (full precision); one int for every layer or a list with one
            entry per layer (AsymKV-style bits by depth).
        group_size: G, tokens per key group (per channel) and, unless ``value_group_size`` is
            set, channels per value group (per token).
        value_group_size: channels per value group (per token); ``None`` (default): ``group_size``.
            One of 32, 64, 128, dividing the value head dim. Larger groups store fewer value scales
            and zero points (at 64, half of them); with a rotation the channels of a token are
            alike enough that one group per head loses little (docs/quality.md).
        residual_length: R, newest tokens kept in full precision; a multiple of ``group_size``.
        k_share_from, v_share_from: from this layer on, the odd layer of each pair (2j, 2j+1)
            stores no codes and reuses layer 2j's. An int is a layer index, a float in (0, 1] a
            fraction of the layer count (0.5 -> L/2), ``None`` disables sharing.
        eta: calibration strength per bit width, ``{1: 1/6, 2: 0.045}``; a width not listed is
            not calibrated. Each value in [0, 0.5).
        name: preset name, for reports.
        moe_top_k: routed experts activated per token in MoE layers (docs/moe.md): one int for every
            MoE layer, a list with one entry per MoE layer (MoE layers counted from 0, dense layers
            skipped), or a :class:`MoESchedule`. ``None`` keeps the model's ``num_experts_per_tok``.
            Each value in ``1 .. num_experts_per_tok`` (checked against the model).
        moe_renormalize: rescale the kept routing weights of a token so that they sum to what the
            model's full top-k weights summed to. ``False`` (default) keeps each router's own rule:
            routers that normalize their top-k (Mixtral; Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3
            with ``norm_topk_prob=True``) renormalize over the kept experts by themselves; the
            others (``norm_topk_prob=False``, DeepSeek-V2) keep raw probabilities.
        moe_min_weight: per-token dynamic pruning: drop a routed expert whose routing weight is
            below this fraction of the token's top weight. In [0, 1); 0 or ``None`` is off.
        moe_top_p: per-token dynamic pruning: keep the fewest top experts whose weights reach this
            fraction of the token's top-k weight. In (0, 1]; 1 or ``None`` is off.
        metadata_dtype: storage of the per-group scales and zero points. ``None`` (default): the
            model dtype (16 bits each in a bf16/fp16 model: 1 bit per value at G=32, keys and
            values alike). ``"float8_e4m3fn"`` (``torch.float8_e4m3fn`` is accepted too): 8 bits
            each, halving that cost; values are clamped to the format's finite range (+-448)
            before the cast, so none becomes NaN, and are read back into float32 as before. The
            codes and the full-precision window are unchanged. Needs a GPU with fp8 support
            (sm_89 or newer) on CUDA.
        sink_tokens: the first ``sink_tokens`` positions of every sequence (attention sinks) are
            kept in full precision in a buffer of their own and never quantized; reads take them
            as they take the window. ``0 <= sink_tokens < residual_length``; they are counted in
            ``stored_bits``.
        rotation: ``None`` or ``"hadamard"``: quantized keys (after RoPE) and values are stored
            multiplied by the normalized Hadamard matrix of the head dim (orthogonal and its own
            inverse), which spreads outlier channels over all channels before quantization.
            Attention is unchanged: reads rotate back (or the fused path rotates the query and
            the output instead). The head dim must be a power of two.
        level_fit: how each group's scale and zero point are chosen. ``"minmax"`` (default):
            KIVI min-max, then ``eta`` calibration. ``"lsq"``: codes by min-max, then scale and
            zero point refitted by least squares to the group's values, codes reassigned to the
            nearest refitted level and refitted once more (for one bit: the levels are the
            means of the two halves); a layer sharing its partner's codes fits its scale and
            zero point to those codes. Decoding is the same affine ``q * s + z``; ``eta`` must be
            empty (the fit replaces calibration).

    A config can also be written as a spec string, :meth:`from_spec`:
    ``"kivi-2:metadata_dtype=float8_e4m3fn"``, ``"xquant-1.38:group_size=64"``.
    """

    k_bits: BitsSpec = 2
    v_bits: BitsSpec = 2
    group_size: int = 32
    value_group_size: int | None = None
    residual_length: int = 128
    k_share_from: ShareSpec = None
    v_share_from: ShareSpec = None
    eta: dict[int, float] = field(default_factory=dict)
    name: str = "custom"
    moe_top_k: MoETopK = None
    moe_renormalize: bool = False
    moe_min_weight: float | None = None
    moe_top_p: float | None = None
    metadata_dtype: str | None = None
    sink_tokens: int = 0
    rotation: str | None = None
    level_fit: str = "minmax"

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            object.__setattr__(self, name, _check_bits(name, getattr(self, name)))
        if isinstance(self.k_bits, tuple) and isinstance(self.v_bits, tuple) and len(self.k_bits) != len(self.v_bits):
            raise ValueError(
                f"XQuantConfig.k_bits has {len(self.k_bits)} entries and v_bits {len(self.v_bits)}: per-layer lists "
                "must have one entry per layer each"
            )
        # 32.0 == 32 and True == 1 would pass a membership test and then index and size tensors as
        # floats or bools: ints only.
        if not _is_int(self.group_size) or self.group_size not in ALLOWED_GROUPS:
            raise ValueError(f"XQuantConfig.group_size={self.group_size!r}: must be one of {ALLOWED_GROUPS}")
        vg = self.value_group_size
        if vg is not None and (not _is_int(vg) or vg not in ALLOWED_GROUPS):
            raise ValueError(f"XQuantConfig.value_group_size={vg!r}: must be None or one of {ALLOWED_GROUPS}")
        r = self.residual_length
        if not _is_int(r) or r < self.group_size or r % self.group_size:
            raise ValueError(
                f"XQuantConfig.residual_length={r!r}: must be a positive multiple of group_size={self.group_size}"
            )
        for name in ("k_share_from", "v_share_from"):
            value = getattr(self, name)
            ok = value is None or (_is_int(value) and value >= 0)
            ok = ok or (isinstance(value, float) and 0.0 < value <= 1.0)
            if not ok:
                raise ValueError(
                    f"XQuantConfig.{name}={value!r}: must be None, a layer index >= 0, or a fraction in (0, 1]"
                )
        if not isinstance(self.eta, dict):
            raise ValueError(f"XQuantConfig.eta={self.eta!r}: must be a dict {{bits: eta}}")
        for bits, eta in self.eta.items():
            if not _is_int(bits) or bits not in QUANT_BITS:
                raise ValueError(f"XQuantConfig.eta has key {bits!r}: keys must be bit widths (ints) in {QUANT_BITS}")
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < 0.5:
                raise ValueError(f"XQuantConfig.eta[{bits}]={eta!r}: must be a number in [0, 0.5)")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"XQuantConfig.name={self.name!r}: must be a non-empty string")
        self._check_moe()
        self._check_quality_options()
        md = self.metadata_dtype
        if md is not None and not isinstance(md, str) and str(md) == "torch.float8_e4m3fn":
            md = "float8_e4m3fn"  # the torch dtype itself: stored by name (configs serialize to JSON)
            object.__setattr__(self, "metadata_dtype", md)
        if md is not None and md not in METADATA_DTYPES:
            raise ValueError(
                f"XQuantConfig.metadata_dtype={md!r}: must be None (scales and zero points in the model dtype) "
                f"or one of {', '.join(repr(d) for d in METADATA_DTYPES)}"
            )

    def _check_quality_options(self) -> None:
        s = self.sink_tokens
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < self.residual_length:
            raise ValueError(
                f"XQuantConfig.sink_tokens={s!r}: must be an int in [0, residual_length={self.residual_length})"
            )
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise ValueError(f"XQuantConfig.rotation={self.rotation!r}: must be None or one of {ROTATIONS}")
        if self.level_fit not in LEVEL_FITS:
            raise ValueError(f"XQuantConfig.level_fit={self.level_fit!r}: must be one of {LEVEL_FITS}")
        if self.level_fit == "lsq" and any(self.eta.values()):
            raise ValueError(
                f"XQuantConfig.level_fit='lsq' fits scale and zero point by least squares, so eta calibration "
                f"does not apply; got eta={self.eta!r} (set eta={{}}, or eta=none in a spec)"
            )

    def _check_moe(self) -> None:
        def positive_int(x) -> bool:
            return _is_int(x) and x >= 1

        k = self.moe_top_k
        if isinstance(k, MoESchedule):
            if not all(positive_int(v) for v in (k.first, k.peak, k.last)) or not (
                _is_int(k.at) and k.at >= 0
            ):
                raise ValueError(
                    f"XQuantConfig.moe_top_k={k!r}: a schedule needs first/peak/last >= 1 and a MoE layer index at >= 0"
                )
        elif k is not None and not positive_int(k):
            if isinstance(k, (str, bytes)) or not hasattr(k, "__len__") or not k or not all(positive_int(v) for v in k):
                raise ValueError(
                    f"XQuantConfig.moe_top_k={k!r}: must be None, an int >= 1, a non-empty list of ints >= 1 "
                    "(one per MoE layer) or an MoESchedule"
                )
            object.__setattr__(self, "moe_top_k", tuple(k))
        if not isinstance(self.moe_renormalize, bool):
            raise ValueError(f"XQuantConfig.moe_renormalize={self.moe_renormalize!r}: must be True or False")
        w = self.moe_min_weight
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < 1.0):
            raise ValueError(f"XQuantConfig.moe_min_weight={w!r}: must be None or a fraction in [0, 1)")
        p = self.moe_top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"XQuantConfig.moe_top_p={p!r}: must be None or a fraction in (0, 1]")

    @property
    def prunes_experts(self) -> bool:
        """Whether any MoE option changes routing (the ``prune_moe_router`` pass has work)."""
        return (
            self.moe_top_k is not None
            or self.moe_renormalize
            or bool(self.moe_min_weight)
            or (self.moe_top_p is not None and self.moe_top_p < 1.0)
        )

    def resolve_moe_top_k(self, num_moe_layers: int, model_k: int) -> list[int]:
        """Activated experts per MoE layer (``model_k`` where ``moe_top_k`` is ``None``); raises
        ``ValueError`` for a list of the wrong length or a k outside ``1 .. model_k``."""
        return resolve_moe_top_k(self.moe_top_k, num_moe_layers, model_k)

    # ------------------------------------------------------------------ presets
    PRESETS = ("fp16", "kivi-2", "kivi-4", "asymkv-1.5", "xquant-1.38", "xquant-1.15", "kivi-2+", "xquant-1.38+")

    @classmethod
    def preset(cls, name: str) -> "XQuantConfig":
        """The named preset (docs/quality.md, "Presets"): ``fp16``, ``kivi-2``, ``kivi-4``, ``asymkv-1.5``,
        ``xquant-1.38`` (the paper's configuration, reproduced), ``xquant-1.15``; and the two
        recommended ones, the quality options on top of a layout (chosen by the measurements in
        docs/quality.md; they need power-of-two head dims): ``kivi-2+`` (2-bit keys and values, 8
        sink tokens, Hadamard rotation, float8 metadata) and ``xquant-1.38+`` (``xquant-1.38``'s
        layout with 4 sink tokens, Hadamard rotation, least-squares levels, float8 metadata)."""
        builders = {
            "fp16": dict(k_bits=16, v_bits=16),
            "kivi-2": dict(k_bits=2, v_bits=2),
            "kivi-4": dict(k_bits=4, v_bits=4),
            "asymkv-1.5": dict(k_bits=2, v_bits=1),
            "xquant-1.38": dict(k_bits=2, v_bits=1, v_share_from=0.5, eta=dict(DEFAULT_ETA)),
            # Keys shared over the last quarter, values over the whole depth: 1.125 code bits at L=32.
            "xquant-1.15": dict(k_bits=2, v_bits=1, k_share_from=0.75, v_share_from=0, eta=dict(DEFAULT_ETA)),
            "kivi-2+": dict(k_bits=2, v_bits=2, sink_tokens=8, rotation="hadamard", metadata_dtype="float8_e4m3fn"),
            "xquant-1.38+": dict(k_bits=2, v_bits=1, v_share_from=0.5, eta={}, sink_tokens=4, rotation="hadamard",
                                 level_fit="lsq", metadata_dtype="float8_e4m3fn"),
        }
        if name not in builders:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(cls.PRESETS)}")
        return cls(name=name, **builders[name])

    def replace(self, **changes) -> "XQuantConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, value, default: str | None = "xquant-1.38", what: str = "config") -> "XQuantConfig":
        """The config an API argument names: an :class:`XQuantConfig` as is, a preset name or spec
        through :meth:`from_spec`, ``None`` as ``default`` (a spec; ``None``: not allowed).
        Anything else raises ``ValueError`` naming ``what``."""
        if value is None and default is not None:
            value = default
        if isinstance(value, str):
            return cls.from_spec(value)
        if isinstance(value, cls):
            return value
        raise ValueError(f"{what} must be an XQuantConfig, a preset name or a spec, got {type(value).__name__}")

    @classmethod
    def from_spec(cls, spec: str) -> "XQuantConfig":
        """A preset, optionally with some fields changed: ``PRESET`` or
        ``PRESET:field=value[,field=value...]``, e.g. ``"kivi-2:metadata_dtype=float8_e4m3fn"``,
        ``"xquant-1.38:group_size=64,metadata_dtype=float8_e4m3fn"``. The config is named by the
        spec itself (reports, eval rows).

        Values: ints (``group_size=64``); per-layer bits as ``k_bits=2/2/4/4``; ``none`` for an
        optional field (``v_share_from=none``, ``metadata_dtype=none``); share starts as a layer
        index (``16``) or a fraction (``0.5``); ``eta=1:0.1667/2:0.09`` (``eta=none``: no
        calibration); ``moe_top_k`` an int or one per MoE layer (``4/4/2``); ``moe_renormalize``
        ``true``/``false``. ``name`` cannot be set (it is the spec). Raises ``ValueError`` naming
        the spec and what is wrong: an unknown preset or field, a malformed or repeated
        ``field=value``, or a value the field does not accept.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"config spec {spec!r}: expected PRESET or PRESET:field=value[,field=value...]")
        text = spec.strip()
        preset, sep, rest = text.partition(":")
        preset = preset.strip()
        if preset not in cls.PRESETS:
            raise ValueError(f"config spec {text!r}: unknown preset {preset!r}; choose one of {', '.join(cls.PRESETS)}")
        base = cls.preset(preset)
        if not sep:
            return base
        changes: dict = {}
        for item in rest.split(","):
            field_name, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not field_name or not value:
                raise ValueError(f"config spec {text!r}: {item.strip()!r} is not field=value")
            if field_name not in _SPEC_PARSERS:
                known = ", ".join(_SPEC_PARSERS)
                hint = " (a spec's name is the spec itself)" if field_name == "name" else ""
                raise ValueError(f"config spec {text!r}: unknown field {field_name!r}{hint}; fields: {known}")
            if field_name in changes:
                raise ValueError(f"config spec {text!r}: field {field_name!r} is given twice")
            kind, parse = _SPEC_PARSERS[field_name]
            try:
                changes[field_name] = parse(value)
            except ValueError:
                raise ValueError(f"config spec {text!r}: {field_name}={value!r} is not {kind}") from None
        try:
            return base.replace(name=text, **changes)
        except ValueError as err:
            raise ValueError(f"config spec {text!r}: {err}") from None

    # ------------------------------------------------------------------ resolution
    def _bits_for(self, spec: BitsSpec, name: str, num_layers: int) -> list[int]:
        if isinstance(spec, int):
            return [spec] * num_layers
        if len(spec) != num_layers:
            raise ValueError(
                f"XQuantConfig.{name} lists {len(spec)} layers but the model has {num_layers}"
            )
        return list(spec)

    @staticmethod
    def _share_start(spec: ShareSpec, num_layers: int) -> int:
        if spec is None:
            return num_layers + 1
        if isinstance(spec, float):
            return int(round(spec * num_layers))
        return spec

    def resolve(self, num_layers: int, sliding: Sequence[bool] | None = None) -> list[LayerPlan]:
        """Per-layer plan for a model with ``num_layers`` decoder layers.

        ``sliding[i]`` marks layers that keep their full-precision sliding window. A layer shares
        codes only if it is odd, at or after the share start, its partner ``i - 1`` stores codes of
        the same width, and neither is sliding; otherwise it stores its own codes.
        """
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(
                f"XQuantConfig.resolve: the model has num_layers={num_layers!r} decoder layers; a KV cache needs "
                "at least one (check the config's num_hidden_layers)"
            )
        sliding = list(sliding) if sliding is not None else [False] * num_layers
        if len(sliding) != num_layers:
            raise ValueError(f"XQuantConfig.resolve: {len(sliding)} sliding flags for {num_layers} layers")
        for name in ("k_share_from", "v_share_from"):
            start = getattr(self, name)
            # A fraction scales with any depth; a layer index past the last layer would share nothing
            # without a word, so it is refused here, where the depth is known.
            if _is_int(start) and start >= num_layers:
                raise ValueError(
                    f"XQuantConfig.{name}={start}: the model has {num_layers} layers (0..{num_layers - 1}), so no "
                    f"layer is at or after {start} and nothing would be shared; use a layer index below "
                    f"{num_layers}, a fraction of the depth in (0, 1], or None"
                )
        k_bits = self._bits_for(self.k_bits, "k_bits", num_layers)
        v_bits = self._bits_for(self.v_bits, "v_bits", num_layers)
        k_start = self._share_start(self.k_share_from, num_layers)
        v_start = self._share_start(self.v_share_from, num_layers)

        def shares(i: int, bits: list[int], start: int) -> bool:
            return (
                i % 2 == 1
                and i >= start
                and not sliding[i]
                and not sliding[i - 1]
                and bits[i] in QUANT_BITS
                and bits[i] == bits[i - 1]
            )

        return [
            LayerPlan(
                index=i,
                k_bits=FULL_PRECISION if sliding[i] else k_bits[i],
                v_bits=FULL_PRECISION if sliding[i] else v_bits[i],
                k_shares=shares(i, k_bits, k_start),
                v_shares=shares(i, v_bits, v_start),
                sliding=sliding[i],
            )
            for i in range(num_layers)
        ]

    @property
    def value_group(self) -> int:
        """Channels per value group: ``value_group_size``, else ``group_size``."""
        return self.value_group_size if self.value_group_size is not None else self.group_size

    def eta_for(self, bits: int) -> float:
        return float(self.eta.get(bits, 0.0))

    def code_bits(self, num_layers: int) -> float:
        """Code bits per element in the paper's convention (window and scale/zero ignored)."""
        plans = self.resolve(num_layers)
        total = sum((0 if p.k_shares else p.k_bits) + (0 if p.v_shares else p.v_bits) for p in plans)
        return total / (2 * num_layers)


# ---------------------------------------------------------------------- spec values (from_spec)
def _spec_none(parse):
    return lambda text: None if text.lower() == "none" else parse(text)


def _spec_int(text: str) -> int:
    return int(text, 10)


def _spec_bits(text: str) -> BitsSpec:
    parts = text.split("/")
    return _spec_int(text) if len(parts) == 1 else tuple(_spec_int(p) for p in parts)


def _spec_share(text: str) -> ShareSpec:
    return float(text) if any(c in text for c in ".eE") else _spec_int(text)


def _spec_eta(text: str) -> dict[int, float]:
    if text.lower() == "none":
        return {}
    eta = {}
    for part in text.split("/"):
        bits, colon, value = part.partition(":")
        if not colon:
            raise ValueError(part)
        eta[_spec_int(bits.strip())] = float(value)
    return eta


def _spec_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _spec_str(text: str) -> str:
    return text


# field -> (what it accepts, parser); a parser raises ValueError on text it cannot read.
_SPEC_PARSERS = {
    "k_bits": ("an int or per-layer ints joined by '/' (2/2/4)", _spec_bits),
    "v_bits": ("an int or per-layer ints joined by '/' (2/2/4)", _spec_bits),
    "group_size": ("an int", _spec_int),
    "value_group_size": ("none or an int", _spec_none(_spec_int)),
    "residual_length": ("an int", _spec_int),
    "k_share_from": ("none, a layer index or a fraction", _spec_none(_spec_share)),
    "v_share_from": ("none, a layer index or a fraction", _spec_none(_spec_share)),
    "eta": ("none or bits:eta pairs joined by '/' (1:0.1667/2:0.09)", _spec_eta),
    "metadata_dtype": (f"none or one of {', '.join(METADATA_DTYPES)}", _spec_none(_spec_str)),
    "moe_top_k": ("none, an int or one int per MoE layer joined by '/'", _spec_none(_spec_bits)),
    "moe_renormalize": ("true or false", _spec_bool),
    "moe_min_weight": ("none or a number", _spec_none(float)),
    "moe_top_p": ("none or a number", _spec_none(float)),
    "sink_tokens": ("an int", _spec_int),
    "rotation": (f"none or one of {', '.join(ROTATIONS)}", _spec_none(_spec_str)),
    "level_fit": (f"one of {', '.join(LEVEL_FITS)}", _spec_str),
}
