"""XQuantConfig: what the quantized KV cache stores, per layer.

A config is written once, before the model is known (``XQuantConfig.preset("xquant-1.38")``), and
*resolved* against a model's layer count with :meth:`XQuantConfig.resolve`, which returns the
per-layer plan the cache allocates from. Every field is checked at construction; a bad value raises
``ValueError`` naming the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

QUANT_BITS = (1, 2, 4)
FULL_PRECISION = 16
ALLOWED_BITS = QUANT_BITS + (FULL_PRECISION,)
ALLOWED_GROUPS = (32, 64, 128)

# Calibration strength per bit width (XQuant §3.2: z^ = z + eta*s*(2^B-1), s^ = (1-2 eta) s).
# Chosen on SmolLM2-135M-Instruct over the paper's grid by decode-condition perplexity; the sweep
# is recorded in README "Calibration defaults".
DEFAULT_ETA = {1: 1 / 6, 2: 0.09}

BitsSpec = int | Sequence[int]
ShareSpec = int | float | None


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


@dataclass(frozen=True)
class XQuantConfig:
    """Settings of the quantized KV cache (DESIGN §2).

    Args:
        k_bits, v_bits: 1, 2, 4 or 16 (full precision); one int for every layer or a list with one
            entry per layer (AsymKV-style bits by depth).
        group_size: G, tokens per key group (per channel) and channels per value group (per token).
        residual_length: R, newest tokens kept in full precision; a multiple of ``group_size``.
        k_share_from, v_share_from: from this layer on, the odd layer of each pair (2j, 2j+1)
            stores no codes and reuses layer 2j's. An int is a layer index, a float in (0, 1] a
            fraction of the layer count (0.5 -> L/2), ``None`` disables sharing.
        eta: calibration strength per bit width, ``{1: 1/6, 2: 0.045}``; a width not listed is
            not calibrated. Each value in [0, 0.5).
        name: preset name, for reports.
    """

    k_bits: BitsSpec = 2
    v_bits: BitsSpec = 2
    group_size: int = 32
    residual_length: int = 128
    k_share_from: ShareSpec = None
    v_share_from: ShareSpec = None
    eta: dict[int, float] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            value = getattr(self, name)
            values = [value] if isinstance(value, int) else list(value)
            if not values or any(not isinstance(b, int) or b not in ALLOWED_BITS for b in values):
                raise ValueError(f"XQuantConfig.{name}={value!r}: each entry must be one of {ALLOWED_BITS}")
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(values))
        if isinstance(self.k_bits, tuple) and isinstance(self.v_bits, tuple) and len(self.k_bits) != len(self.v_bits):
            raise ValueError(
                f"XQuantConfig.k_bits has {len(self.k_bits)} entries and v_bits {len(self.v_bits)}: per-layer lists "
                "must have one entry per layer each"
            )
        if self.group_size not in ALLOWED_GROUPS:
            raise ValueError(f"XQuantConfig.group_size={self.group_size!r}: must be one of {ALLOWED_GROUPS}")
        r = self.residual_length
        if not isinstance(r, int) or r < self.group_size or r % self.group_size:
            raise ValueError(
                f"XQuantConfig.residual_length={r!r}: must be a positive multiple of group_size={self.group_size}"
            )
        for name in ("k_share_from", "v_share_from"):
            value = getattr(self, name)
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
            ok = ok or (isinstance(value, float) and 0.0 < value <= 1.0)
            if not ok:
                raise ValueError(
                    f"XQuantConfig.{name}={value!r}: must be None, a layer index >= 0, or a fraction in (0, 1]"
                )
        if not isinstance(self.eta, dict):
            raise ValueError(f"XQuantConfig.eta={self.eta!r}: must be a dict {{bits: eta}}")
        for bits, eta in self.eta.items():
            if bits not in QUANT_BITS:
                raise ValueError(f"XQuantConfig.eta has key {bits!r}: keys must be bit widths in {QUANT_BITS}")
            if not isinstance(eta, (int, float)) or not 0.0 <= eta < 0.5:
                raise ValueError(f"XQuantConfig.eta[{bits}]={eta!r}: must be a number in [0, 0.5)")

    # ------------------------------------------------------------------ presets
    PRESETS = ("fp16", "kivi-2", "kivi-4", "asymkv-1.5", "xquant-1.38", "xquant-1.15")

    @classmethod
    def preset(cls, name: str) -> "XQuantConfig":
        """The named preset (DESIGN §2 table): ``fp16``, ``kivi-2``, ``kivi-4``, ``asymkv-1.5``,
        ``xquant-1.38``, ``xquant-1.15``."""
        builders = {
            "fp16": dict(k_bits=16, v_bits=16),
            "kivi-2": dict(k_bits=2, v_bits=2),
            "kivi-4": dict(k_bits=4, v_bits=4),
            "asymkv-1.5": dict(k_bits=2, v_bits=1),
            "xquant-1.38": dict(k_bits=2, v_bits=1, v_share_from=0.5, eta=dict(DEFAULT_ETA)),
            # Keys shared over the last quarter, values over the whole depth: 1.125 code bits at L=32.
            "xquant-1.15": dict(k_bits=2, v_bits=1, k_share_from=0.75, v_share_from=0, eta=dict(DEFAULT_ETA)),
        }
        if name not in builders:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(cls.PRESETS)}")
        return cls(name=name, **builders[name])

    def replace(self, **changes) -> "XQuantConfig":
        return dataclasses.replace(self, **changes)

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
        sliding = list(sliding) if sliding is not None else [False] * num_layers
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

    def eta_for(self, bits: int) -> float:
        return float(self.eta.get(bits, 0.0))

    def code_bits(self, num_layers: int) -> float:
        """Code bits per element in the paper's convention (window and scale/zero ignored)."""
        plans = self.resolve(num_layers)
        total = sum((0 if p.k_shares else p.k_bits) + (0 if p.v_shares else p.v_bits) for p in plans)
        return total / (2 * num_layers)
