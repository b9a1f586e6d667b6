"""Per-layer sensitivities (:func:`measure_sensitivity`) and the bit allocation under a code-bit
budget they drive (:func:`allocate`, :func:`sharing_rates`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from ..config import LayerPlan, XQuantConfig
from .simulator import DecodeSimulator, QualityOptions, Score

_KINDS = ("k", "v")
_MODES = ("none", "keys", "values", "both")


@dataclass
class Sensitivity:
    """KL increase over the base cache (every tensor at ``base_bits``, no sharing) of one change.

    ``layer[(l, kind, bits)]``: layer ``l``'s keys (``kind="k"``) or values at ``bits``;
    ``shared[(j, kind, bits)]``: pair (2j, 2j+1) at ``bits``, the odd layer reading the even one's codes.
    ``options``: the quality options every pass ran under (``None``: the simulator's defaults).
    """

    base_bits: int
    base: Score
    eta: dict[int, float]
    layer: dict[tuple[int, str, int], float] = field(default_factory=dict)
    shared: dict[tuple[int, str, int], float] = field(default_factory=dict)
    options: QualityOptions | None = None

    def of_layer(self, index: int, kind: str, bits: int) -> float:
        return 0.0 if bits == self.base_bits else self.layer[(index, kind, bits)]


def _plan_with(plans: list[LayerPlan], index: int, **changes) -> list[LayerPlan]:
    out = list(plans)
    out[index] = replace(out[index], **changes)
    return out


def measure_sensitivity(sim: DecodeSimulator, bits: Sequence[int], eta: dict[int, float], base_bits: int,
                        sharing: bool = True, progress: bool = False, options: QualityOptions | None = None
                        ) -> Sensitivity:
    """One-change-at-a-time KL increases from the all-``base_bits`` cache (see :class:`Sensitivity`),
    every pass under ``options`` (sinks and rotation change which layers are sensitive)."""
    L = sim.num_layers
    base_plans = [LayerPlan(i, base_bits, base_bits) for i in range(L)]
    base = sim.run(base_plans, eta, record=True, options=options)
    sens = Sensitivity(base_bits=base_bits, base=base, eta=dict(eta), options=options)
    jobs = []
    for layer in range(L):
        for kind in _KINDS:
            for b in bits:
                if b != base_bits:
                    jobs.append(("layer", layer, kind, b))
    if sharing:
        for pair in range(L // 2):
            for kind in _KINDS:
                for b in bits:
                    jobs.append(("shared", pair, kind, b))
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="sensitivities" + (f" ({options.label})" if options else ""), leave=False)
    for what, index, kind, b in jobs:
        if what == "layer":
            plans = _plan_with(base_plans, index, **{f"{kind}_bits": b})
            sens.layer[(index, kind, b)] = sim.run(plans, eta, start=index, options=options).kl - base.kl
        else:
            even, odd = 2 * index, 2 * index + 1
            plans = _plan_with(base_plans, even, **{f"{kind}_bits": b})
            plans = _plan_with(plans, odd, **{f"{kind}_bits": b, f"{kind}_shares": True})
            start = odd if b == base_bits else even
            sens.shared[(index, kind, b)] = sim.run(plans, eta, start=start, options=options).kl - base.kl
    return sens


# ============================================================================ allocation
@dataclass(frozen=True)
class Allocation:
    """Per-layer bits and sharing starts of one tensor kind, or of a whole config."""

    k_bits: tuple[int, ...]
    v_bits: tuple[int, ...]
    k_share_from: int | None
    v_share_from: int | None
    code_total: int  # code bits summed over layers and K/V (code_bits = code_total / (2 L))
    predicted_increase: float  # sum of the chosen changes' sensitivities

    def config(self, eta: dict[int, float], group_size: int, residual_length: int, name: str,
               metadata_dtype: str | None = None, options: QualityOptions | None = None) -> XQuantConfig:
        """The config of this allocation; ``options`` (when given) set sinks, rotation, level fit
        and metadata dtype (``metadata_dtype`` is then ignored)."""
        config = XQuantConfig(k_bits=self.k_bits, v_bits=self.v_bits, k_share_from=self.k_share_from,
                              v_share_from=self.v_share_from, eta=dict(eta), group_size=group_size,
                              residual_length=residual_length, name=name, metadata_dtype=metadata_dtype)
        return config if options is None else options.apply(config)

    @property
    def shares(self) -> bool:
        return self.k_share_from is not None or self.v_share_from is not None


def _prior(increase: float, bits: int, base_bits: int, shared: bool = False) -> float:
    """A measured increase as the allocation counts it: fewer bits or sharing never predicts a
    lower KL than the base (a negative measurement is calibration noise or an accidental
    cancellation that the evaluation text does not repeat), more bits never a higher one. Without
    this the allocation leaves code bits unspent for a few noisy layers."""
    if shared or bits < base_bits:
        return max(increase, 0.0)
    return min(increase, 0.0)


def _kind_tables(sens: Sensitivity, kind: str, num_layers: int, bits: Sequence[int], starts: Sequence[int | None]):
    """For each sharing start pair (``None``: no sharing), the exact knapsack over layer pairs:
    ``{code bits of this kind: (increase, bits per layer)}``; the best over the starts per total.
    Increases are the measured ones through :func:`_prior`."""
    base = sens.base_bits

    def layer(index: int, b: int) -> float:
        return _prior(sens.of_layer(index, kind, b), b, base)

    pairs = num_layers // 2
    best: dict[int, tuple[float, tuple[int, ...], int | None]] = {}
    for start in starts:
        table: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
        for j in range(pairs):
            even, odd = 2 * j, 2 * j + 1
            options = []
            can_share = start is not None and j >= start
            for be in bits:
                for bo in bits:
                    if can_share and be == bo:  # equal bits in the sharing range: the odd layer shares
                        options.append((be, _prior(sens.shared[(j, kind, be)], be, base, shared=True), (be, bo)))
                    else:
                        options.append((be + bo, layer(even, be) + layer(odd, bo), (be, bo)))
            table = _knapsack_step(table, options)
        if num_layers % 2:
            last = num_layers - 1
            table = _knapsack_step(table, [(b, layer(last, b), (b,)) for b in bits])
        for cost, (inc, layer_bits) in table.items():
            if cost not in best or inc < best[cost][0] - 1e-12:
                best[cost] = (inc, layer_bits, None if start is None else 2 * start)
    return best


def _knapsack_step(table, options):
    out: dict[int, tuple[float, tuple[int, ...]]] = {}
    for cost, (inc, chosen) in sorted(table.items()):
        for c, d, layer_bits in options:
            key, value = cost + c, inc + d
            if key not in out or value < out[key][0] - 1e-12:
                out[key] = (value, chosen + layer_bits)
    return out


def allocate(sens: Sensitivity, num_layers: int, code_total: int, bits: Sequence[int], mode: str = "both"
             ) -> Allocation | None:
    """The allocation with the least predicted KL increase whose code bits sum to at most
    ``code_total`` (over layers and K/V), sharing as ``mode`` allows (``none``, ``keys``,
    ``values``, ``both``); ``None`` if no allocation fits. Of equal predictions, the one with more
    code bits (the measurements cannot tell them apart; more bits do not add error)."""
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: one of {_MODES}")
    all_starts = [None] + list(range(num_layers // 2))
    k_starts = all_starts if mode in ("keys", "both") else [None]
    v_starts = all_starts if mode in ("values", "both") else [None]
    k_table = _kind_tables(sens, "k", num_layers, bits, k_starts)
    v_table = _kind_tables(sens, "v", num_layers, bits, v_starts)
    best = None
    for ck, (ik, kb, ks) in sorted(k_table.items()):
        for cv, (iv, vb, vs) in sorted(v_table.items()):
            if ck + cv > code_total:
                continue
            if best is None or ik + iv < best[0] - 1e-12 or (ik + iv <= best[0] + 1e-12 and ck + cv > best[1]):
                best = (ik + iv, ck + cv, kb, vb, ks, vs)
    if best is None:
        return None
    inc, total, kb, vb, ks, vs = best
    return Allocation(k_bits=kb, v_bits=vb, k_share_from=ks, v_share_from=vs, code_total=total,
                      predicted_increase=inc)


def sharing_rates(sens: Sensitivity, num_layers: int, bits: Sequence[int]) -> dict[str, tuple[float, float]]:
    """Per tensor kind: the median KL increase per saved code bit of sharing a pair at ``base_bits``
    (saves ``base_bits``) and of lowering both layers of a pair to the lowest width instead (saves
    the same when ``base_bits`` is twice the lowest, e.g. 2 -> 1). NaN where not measured."""
    low, b = min(bits), sens.base_bits
    rates = {}
    for kind in _KINDS:
        share, lower = [], []
        for j in range(num_layers // 2):
            if (j, kind, b) in sens.shared:
                share.append(sens.shared[(j, kind, b)] / b)
            if low < b and (2 * j, kind, low) in sens.layer and (2 * j + 1, kind, low) in sens.layer:
                lower.append((sens.layer[(2 * j, kind, low)] + sens.layer[(2 * j + 1, kind, low)]) / (2 * (b - low)))
        rates[kind] = (_median(share), _median(lower))
    return rates


def _median(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])
