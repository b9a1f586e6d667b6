"""The search over the cache's global quality options: which values are candidates
(:func:`option_space`), the screen of their combinations on one reference plan
(:func:`screen_plan`, :class:`ScreenRow`) and the combinations the allocation then runs under
(:func:`pick_combos`). How they fit into the search: :mod:`xquant_fx.config_search`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

from ..config import LEVEL_FITS, METADATA_DTYPES, ROTATIONS, LayerPlan, XQuantConfig
from .simulator import QualityOptions, Score

#: The value of an option argument of :func:`search` that searches it.
SEARCH = "search"
#: Sink-token counts searched by default (those below ``residual_length``).
DEFAULT_SINKS = (0, 4, 8)
_NAMES = ("sink_tokens", "rotation", "level_fit", "metadata_dtype")
_OFF = {"sink_tokens": 0, "rotation": None, "level_fit": "minmax", "metadata_dtype": None}


@dataclass
class OptionSpace:
    """Candidate values of each quality option, and how each set was decided (``how[name]``)."""

    sinks: tuple[int, ...]
    rotations: tuple[str | None, ...]
    fits: tuple[str, ...]
    metadata: tuple[str | None, ...]
    how: dict[str, str] = field(default_factory=dict)
    value_group_size: int | None = None  # fixed by the caller, not searched

    def combos(self, metadata_dtype: str | None) -> list[QualityOptions]:
        """Every combination of sinks, rotation and level fit, with ``metadata_dtype``."""
        return [QualityOptions(s, r, f, metadata_dtype, self.value_group_size)
                for s, r, f in itertools.product(self.sinks, self.rotations, self.fits)]

    @property
    def searched(self) -> bool:
        return len(self.sinks) * len(self.rotations) * len(self.fits) > 1


@dataclass
class ScreenRow:
    """One option combination scored on the screen's reference plan."""

    options: QualityOptions
    plan: str
    score: Score
    eta: dict[int, float]
    allocated: bool = False  # the allocation ran under these options (for some budget)


def _candidates(name: str, value, default: tuple, options: str) -> tuple[tuple, str]:
    if isinstance(value, str) and value == SEARCH:
        if options == "off":
            return (_OFF[name],), "off (options='off')"
        return default, "searched"
    if isinstance(value, (list, tuple)):
        values = tuple(dict.fromkeys(value))
        if not values:
            raise ValueError(f"{name}={value!r}: give at least one candidate")
        return values, "searched over the given candidates" if len(values) > 1 else "fixed by the caller"
    return (value,), "fixed by the caller"


def option_space(sink_tokens, rotation, level_fit, metadata_dtype, options: str, *, group_size: int,
                 residual_length: int, rotation_fits: bool, head_dims: Sequence[int],
                 stored_budget: float | None, value_group_size: int | None = None) -> OptionSpace:
    """The candidates of each option from :func:`search`'s arguments: ``"search"`` searches the
    defaults (``options="off"``: the option stays off), a list or tuple searches those values, any
    other value fixes the option. Values the model or the window cannot take are dropped from the
    defaults (and refused when the caller asks for them)."""
    if options not in (SEARCH, "off"):
        raise ValueError(f"options={options!r}: 'search' (choose sinks, rotation, level fit and metadata dtype) "
                         "or 'off' (leave the options that are not given off, as before)")
    sinks, how_s = _candidates("sink_tokens", sink_tokens, DEFAULT_SINKS, options)
    rots, how_r = _candidates("rotation", rotation, (None,) + ROTATIONS, options)
    fits, how_f = _candidates("level_fit", level_fit, LEVEL_FITS, options)
    mds, how_m = _candidates("metadata_dtype", metadata_dtype, (None,) + METADATA_DTYPES, options)
    searched = {"sink_tokens": how_s == "searched", "rotation": how_r == "searched",
                "metadata_dtype": how_m == "searched"}
    if searched["sink_tokens"]:
        dropped = [s for s in sinks if s >= residual_length]
        sinks = tuple(s for s in sinks if s < residual_length)
        if dropped:
            how_s += f" ({', '.join(map(str, dropped))} dropped: not below residual_length={residual_length})"
    if not rotation_fits and any(r is not None for r in rots):
        if not searched["rotation"]:
            raise ValueError(f"rotation='hadamard' needs power-of-two head dims; this model's key/value head dims are "
                             f"{tuple(head_dims)}")
        rots = tuple(r for r in rots if r is None)
        how_r += f" (hadamard skipped: head dims {tuple(head_dims)} are not powers of two)"
    if searched["metadata_dtype"] and stored_budget is None:
        mds = (None,)
        how_m = "the model dtype: no stored budget to save for (give stored_budget_bits to search float8)"
    for s, r, f, m in itertools.product(sinks, rots, fits, mds):  # validates each value as the config does
        try:
            XQuantConfig(group_size=group_size, residual_length=residual_length, sink_tokens=s, rotation=r,
                         level_fit=f, metadata_dtype=m)
        except ValueError as err:
            raise ValueError(f"search options: {err}") from None
    mds = tuple(dict.fromkeys(QualityOptions(metadata_dtype=m).metadata_dtype for m in mds))
    return OptionSpace(sinks=sinks, rotations=rots, fits=fits, metadata=mds, value_group_size=value_group_size,
                       how={"sink_tokens": how_s, "rotation": how_r, "level_fit": how_f, "metadata_dtype": how_m})


def screen_plan(bits: Sequence[int], effective_bits: float, num_layers: int) -> tuple[str, list[LayerPlan]]:
    """The screen's reference plan for a budget: every layer with the same key and value widths
    (keys at least as wide as values), whose code bits are nearest ``effective_bits`` (ties: fewer)."""
    pairs = [(kb, vb) for kb in bits for vb in bits if kb >= vb]
    kb, vb = min(pairs, key=lambda p: (abs((p[0] + p[1]) / 2 - effective_bits), p[0] + p[1]))
    return f"K{kb}/V{vb}", [LayerPlan(i, kb, vb) for i in range(num_layers)]


def pick_combos(rows: list[ScreenRow], count: int, fits: Sequence[str]) -> list[QualityOptions]:
    """The combinations the allocation runs under: the best of the screen (least KL), then, with
    ``count >= 2`` and both level fits searched, the best with the other level fit (whether
    least-squares levels pay depends on the final mix of widths and on eta, which the screen's
    uniform plan does not settle), then the next best."""
    ranked = [r.options for r in sorted(rows, key=lambda r: r.score.kl)]
    chosen = ranked[:1]
    if count >= 2 and len(fits) > 1:
        other = [o for o in ranked if o.level_fit != chosen[0].level_fit]
        chosen += other[:1]
    for o in ranked:
        if len(chosen) >= count:
            break
        if o not in chosen:
            chosen.append(o)
    return chosen[:max(count, 1)]
