"""The ``search()`` entry: calibration text, budgets, and the search that ties the simulator,
the allocation and the report together."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import time
from dataclasses import replace
from typing import Sequence

import torch

from ..cache import XQuantCache
from ..config import QUANT_BITS, LayerPlan, XQuantConfig
from ..hf import kv_geometry
from .allocation import _MODES, Allocation, Sensitivity, allocate, measure_sensitivity, sharing_rates
from .options import SEARCH, OptionSpace, ScreenRow, option_space, pick_combos, screen_plan
from .report import Candidate, SearchResult
from .simulator import DecodeSimulator, QualityOptions, Score, _num_layers_and_sliding

logger = logging.getLogger(__name__)


# Calibration text: module docstrings of standard-library modules that the evaluation corpus
# (CPython's LICENSE and the docstrings of evaluate._DOC_MODULES) does not use.
CALIBRATION_MODULES = ("csv", "heapq", "cmd", "pdb", "configparser", "statistics", "wave")

# Calibration grids: the paper's (eta_1 in {0, 1/6, 1/3}, eta_2 in {0, 0.045, 0.09}), plus 1/4 for
# one bit (the midpoint reconstruction of a uniform group's halves).
DEFAULT_ETA_GRID = {1: (0.0, 1 / 6, 1 / 4, 1 / 3), 2: (0.0, 0.045, 0.09)}


def calibration_text() -> str:
    """The default calibration text: the docstrings of :data:`CALIBRATION_MODULES`, in order."""
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in CALIBRATION_MODULES)


def check_disjoint(calibration: str, evaluation: str, min_chars: int = 40, min_words: int = 6) -> None:
    """Raise ``ValueError`` if a line of the calibration text (stripped, of at least ``min_chars``
    characters and ``min_words`` words: rules such as ``-----`` do not count) occurs in the evaluation
    text: a config must not be scored on the text it was chosen on."""
    for line in calibration.splitlines():
        line = line.strip()
        if len(line) >= min_chars and len(line.split()) >= min_words and line in evaluation:
            raise ValueError(f"the calibration text overlaps the evaluation text, e.g. {line[:80]!r}: "
                             "choose a calibration text disjoint from the evaluation corpus")


def minimum_code_bits(num_layers: int, bits: Sequence[int] = (1, 2), sharing: bool = True) -> float:
    """The fewest code bits :func:`search` can reach: every tensor at the lowest width, and with
    ``sharing`` every odd layer reading its partner's codes."""
    low = min(bits)
    start = 0 if sharing else None
    return XQuantConfig(k_bits=low, v_bits=low, k_share_from=start, v_share_from=start).code_bits(num_layers)


def _stored_bits(model, config: XQuantConfig, length: int, dtype: torch.dtype) -> float:
    return XQuantCache(model.config, config, max_cache_len=length).memory_report(dtype)["stored_bits"]


def _check_bits(bits) -> tuple[int, ...]:
    bits = tuple(sorted(set(bits)))
    if not bits or any(b not in QUANT_BITS for b in bits):
        raise ValueError(f"bits={bits!r}: choose widths from {QUANT_BITS}")
    return bits


def _budgets(budget_bits) -> tuple[list[float], bool]:
    single = isinstance(budget_bits, (int, float)) and not isinstance(budget_bits, bool)
    values = [budget_bits] if single else list(budget_bits)
    if not values or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0
                         for b in values):
        raise ValueError(f"budget_bits={budget_bits!r}: a positive number of code bits per value, or a list of them")
    return [float(b) for b in values], single


def search(
    model,
    budget_bits: float | Sequence[float],
    tokenizer=None,
    *,
    text: str | None = None,
    input_ids: torch.Tensor | None = None,
    tokens: int = 384,
    segments: int = 1,
    copy_windows: int = 1,
    bits: Sequence[int] = (1, 2),
    sharing: bool = True,
    eta_grid: dict[int, Sequence[float]] | None = None,
    stored_budget_bits: float | None = None,
    stored_len: int = 8192,
    stored_dtype: torch.dtype = torch.bfloat16,
    group_size: int = 32,
    residual_length: int = 128,
    value_group_size: int | None = None,
    metadata_dtype=SEARCH,
    sink_tokens=SEARCH,
    rotation=SEARCH,
    level_fit=SEARCH,
    options: str = SEARCH,
    option_candidates: int = 2,
    prefill: int | None = None,
    compare_presets: bool = True,
    progress: bool = False,
) -> SearchResult | list[SearchResult]:
    """Find an :class:`XQuantConfig` for ``model`` under a code-bit budget (module docstring: how).

    Args:
        model: a transformers decoder-only causal LM.
        budget_bits: code bits per cached value (``config.code_bits() <= budget``); a list solves
            several budgets in one call, sharing the measurements, and returns a list.
        tokenizer: tokenizes ``text`` (default :func:`calibration_text`); or give ``input_ids``.
        text, input_ids: the calibration text, or its ids ``[tokens]`` / ``[segments, tokens]``.
        tokens, segments: the calibration uses ``segments`` windows of ``tokens`` tokens (more than
            ``residual_length``: only tokens older than the window are ever quantized).
        copy_windows: windows of ``tokens`` tokens added after those, each the next ``tokens / 2``
            tokens of the text twice over: the model predicts the second copy by attending
            ``tokens / 2`` positions back, past the full-precision window, as retrieval does, so
            the layers that long-range copying needs weigh in the KL. ``tokens / 2`` must exceed
            ``residual_length``. Not added to ``input_ids`` given as ``[segments, tokens]``.
        bits: widths a tensor may take (from 1, 2, 4).
        sharing: allow cross-layer code sharing.
        eta_grid: ``{bits: candidate etas}`` (default :data:`DEFAULT_ETA_GRID`); a width without
            a grid is not calibrated. Configs with ``level_fit="lsq"`` have no eta.
        stored_budget_bits: optional bound on stored bits per value as the cache holds them at
            ``stored_len`` tokens in ``stored_dtype`` (codes, scales, zero points, window, sinks).
        group_size, residual_length: G and R of the configs (not searched).
        value_group_size: channels per value group of the configs (not searched; ``None``:
            ``group_size``), :class:`XQuantConfig`.
        sink_tokens, rotation, level_fit, metadata_dtype: the quality options of
            :class:`XQuantConfig`. ``"search"`` (default) searches them: sinks over
            :data:`DEFAULT_SINKS` (those below ``residual_length``), rotation over ``None`` and
            ``"hadamard"`` (``None`` only when the head dims are not powers of two), level fit over
            ``"minmax"`` and ``"lsq"``, metadata over ``None`` and ``"float8_e4m3fn"`` when a stored
            budget is given (without one the model dtype, which costs no quality). A list or tuple
            searches those values; any other value fixes the option.
        options: ``"search"``, or ``"off"``: the options left at ``"search"`` stay off (no sinks,
            no rotation, min-max levels, metadata in the model dtype): the search of per-layer bits,
            sharing and eta alone, as before the options existed.
        option_candidates: how many option combinations of the screen the allocation runs under
            (each costs a sensitivity measurement, about ``2 L (|bits| - 1) + L |bits|`` forwards).
        prefill: tokens prefilled per window before decoding (default ``residual_length``).
        compare_presets: also score the presets on the calibration text, for the report.

    Raises ``ValueError`` when a budget is below what the search can reach (the message names the
    minimum), and on malformed arguments.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    budgets, single = _budgets(budget_bits)
    bits = _check_bits(bits)
    eta_grid = DEFAULT_ETA_GRID if eta_grid is None else {int(b): tuple(g) for b, g in eta_grid.items()}
    XQuantConfig(group_size=group_size, residual_length=residual_length, value_group_size=value_group_size)  # checks
    if isinstance(option_candidates, bool) or not isinstance(option_candidates, int) or option_candidates < 1:
        raise ValueError(f"option_candidates={option_candidates!r}: a positive int")
    num_layers, _, k_dim, v_dim = kv_geometry(model.config)
    head_dims = (k_dim, v_dim)
    space = option_space(sink_tokens, rotation, level_fit, metadata_dtype, options, group_size=group_size,
                         residual_length=residual_length, head_dims=head_dims,
                         rotation_fits=all(d > 0 and d & (d - 1) == 0 for d in head_dims),
                         stored_budget=stored_budget_bits, value_group_size=value_group_size)
    low = minimum_code_bits(num_layers, bits, sharing)
    for b in budgets:
        if b < low - 1e-9:
            how = (f"{min(bits)}-bit keys and values" + (", odd layers sharing their partner's codes" if sharing else ""))
            raise ValueError(f"budget_bits={b:g} is below the minimum the search can reach on this {num_layers}-layer "
                             f"model: {low:.4f} code bits ({how})")
    stored_dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(stored_dtype)
    if stored_dtype_name is None:
        raise ValueError(f"stored_dtype={stored_dtype!r}: one of torch.bfloat16, torch.float16, torch.float32")

    def stored(config: XQuantConfig) -> float:
        return _stored_bits(model, config, stored_len, stored_dtype)

    lines = _StoredLines(stored, num_layers, group_size, residual_length, value_group_size)
    if stored_budget_bits is not None:
        _fit_options_to_stored_budget(space, lines, bits, sharing, stored_budget_bits, stored_dtype_name, stored_len)
    code_totals = {b: int(math.floor(b * 2 * num_layers + 1e-9)) for b in budgets}
    md_for = {b: _metadata_order(space, lines, code_totals[b], stored_budget_bits) for b in budgets}
    primary_md = md_for[max(budgets)][0]
    if len(space.metadata) > 1:
        space.how["metadata_dtype"] += "; code bits the stored budget leaves: " + ", ".join(
            f"{_md_name(m)} {min(lines.units(m, min(space.sinks), stored_budget_bits), code_totals[max(budgets)]) / (2 * num_layers):.4f}"
            for m in space.metadata)

    ids, calibration = _calibration_ids(tokenizer, text, input_ids, tokens, segments, copy_windows, residual_length)
    if ids.shape[1] <= residual_length + 1:
        raise ValueError(f"calibration windows of {ids.shape[1]} tokens: they must be longer than residual_length + 1 "
                         f"= {residual_length + 1} tokens (only tokens older than the window are quantized)")
    if any(_num_layers_and_sliding(model, ids.shape[1])[1]):
        raise ValueError(f"{type(model).__name__} has sliding-window layers: the search allocates bits to "
                         "full-attention layers only and does not support such models yet")
    sim = DecodeSimulator(model, ids.to(model.device), prefill, group_size, residual_length, primary_md)
    calibration += f", {sim.P} prefilled per window, {sim.scored_tokens} tokens scored"

    def calibrate_eta(opts: QualityOptions) -> dict[int, float]:
        """eta per width, each on the cache with every tensor at that width, under ``opts``."""
        eta: dict[int, float] = {}
        if opts.level_fit == "lsq":
            return eta
        for b in bits:
            grid = eta_grid.get(b, ())
            if len(grid) > 1:
                uniform = [LayerPlan(i, b, b) for i in range(num_layers)]
                eta[b] = min((sim.run(uniform, {b: e}, options=opts).kl, e) for e in grid)[1]
            elif grid:
                eta[b] = float(grid[0])
        return eta

    # 1. eta per width with the options off: the screen's eta for min-max levels
    tick = time.perf_counter()
    plain = QualityOptions(metadata_dtype=primary_md, value_group_size=value_group_size)
    etas: dict[QualityOptions, dict[int, float]] = {}
    if space.searched and "minmax" in space.fits:
        etas[plain] = calibrate_eta(plain)
        logger.info("eta, options off: %s", etas[plain])
    base_eta = etas.get(plain, {})
    timings["eta"] = time.perf_counter() - tick

    # 2. the screen: every option combination on one reference plan per budget
    tick = time.perf_counter()
    screens: dict[str, list[ScreenRow]] = {}
    plan_of: dict[float, str] = {}
    combos_for: dict[float, list[QualityOptions]] = {}
    for b in budgets:
        if not space.searched:
            combos_for[b] = space.combos(primary_md)
            continue
        units = min(code_totals[b], lines.units(primary_md, min(space.sinks), stored_budget_bits))
        label, plans = screen_plan(bits, units / (2 * num_layers), num_layers)
        plan_of[b] = label
        if label not in screens:
            rows = []
            for opts in space.combos(primary_md):
                eta = {} if opts.level_fit == "lsq" else base_eta
                rows.append(ScreenRow(opts, label, sim.run(plans, eta, options=opts), dict(eta)))
            screens[label] = rows
        combos_for[b] = pick_combos(screens[label], option_candidates, space.fits)
        logger.info("screen on %s: allocating under %s", label, [c.label for c in combos_for[b]])
    timings["screen"] = time.perf_counter() - tick

    # 3. eta and sensitivities under each combination the allocation runs under
    tick = time.perf_counter()
    base_bits = 2 if 2 in bits else max(bits)
    measured: dict[QualityOptions, Sensitivity] = {}
    for b in sorted(budgets):
        for combo in combos_for[b]:
            if combo in measured:
                continue
            if combo not in etas:
                etas[combo] = calibrate_eta(combo)
            measured[combo] = measure_sensitivity(sim, bits, etas[combo], base_bits, sharing, progress, options=combo)
            logger.info("sensitivities under %s (eta %s): %.1f s so far", combo.label, etas[combo],
                        time.perf_counter() - tick)
    timings["eta + sensitivities"] = time.perf_counter() - tick

    # 4-6. allocation, verification, eta refinement, per budget from the smallest up
    tick = time.perf_counter()
    cache: dict[tuple, Score] = {}

    def verify(config: XQuantConfig) -> Score:
        key = _plan_key(config, num_layers)
        if key not in cache:
            cache[key] = sim.score(config)
        return cache[key]

    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    by_index: dict[int, SearchResult] = {}
    previous: SearchResult | None = None
    modes = _MODES if sharing else ("none",)
    for i in order:
        budget = budgets[i]
        code_total = code_totals[budget]
        candidates: list[Candidate] = []
        sens_of: dict[int, Sensitivity] = {}  # id(candidate) -> the sensitivities it was allocated from
        seen: set[tuple] = set()

        def add(label, config, alloc, sens, predicted=True):
            key = _plan_key(config, num_layers)
            if key in seen:  # the same config as one already verified
                return
            seen.add(key)
            cand = Candidate(label=label, config=config, code_bits=config.code_bits(num_layers),
                             stored_bits=stored(config), score=verify(config),
                             predicted_kl=sens.base.kl + alloc.predicted_increase if predicted else None)
            candidates.append(cand)
            sens_of[id(cand)] = sens

        screen_kl = {r.options: r.score.kl for r in screens.get(plan_of.get(budget), [])}
        for combo in combos_for[budget]:
            sens, eta = measured[combo], etas[combo]
            primary = None  # the combination's own best allocation (as screened, primary metadata)
            for md in md_for[budget]:
                for sinks in [combo.sink_tokens] + sorted((s for s in space.sinks if s < combo.sink_tokens), reverse=True):
                    opts = replace(combo, metadata_dtype=md, sink_tokens=sinks)
                    name = f"search-{budget:g}" + (f":metadata_dtype={md}" if md else "")

                    def make(alloc, opts=opts, name=name):
                        return alloc.config(eta, group_size, residual_length, name, options=opts)

                    allocs = {mode: _fit_allocation(sens, num_layers, code_total, bits, mode, make, stored,
                                                    stored_budget_bits) for mode in modes}
                    allocs = {m: a for m, a in allocs.items() if a is not None}
                    if not allocs:
                        continue
                    best_mode = min(allocs, key=lambda m: allocs[m].predicted_increase)
                    if primary is None:  # the combination as screened: every sharing mode verified
                        primary = allocs[best_mode]
                        for mode, alloc in allocs.items():
                            config = make(alloc)
                            _check_expressed(config, alloc, num_layers)
                            add(f"{opts.label} | sharing: {mode}", config, alloc, sens)
                        continue
                    alloc = allocs[best_mode]
                    if sinks != combo.sink_tokens:
                        # Fewer sinks pay only through the code bits they free: worth a verification
                        # only if the allocation's predicted gain beats what the screen measured
                        # the sinks to be worth on its reference plan.
                        gain = primary.predicted_increase - alloc.predicted_increase
                        cost = screen_kl.get(replace(combo, sink_tokens=sinks), math.inf) - screen_kl.get(combo, 0.0)
                        if alloc.code_total <= primary.code_total or gain <= cost:
                            continue
                    config = make(alloc)
                    _check_expressed(config, alloc, num_layers)
                    # other sinks or metadata than the measurements: no prediction
                    add(f"{opts.label} | sharing: {best_mode} (best predicted)", config, alloc, sens, predicted=False)
        if not candidates:
            raise ValueError(f"no config fits budget_bits={budget:g}"
                             + (f" and stored_budget_bits={stored_budget_bits:g}" if stored_budget_bits else ""))
        winner = min(candidates, key=lambda c: c.score.kl)
        winner_sens = sens_of[id(winner)]
        same_options = [c for c in candidates if QualityOptions.of(c.config) == QualityOptions.of(winner.config)]
        rates = sharing_rates(winner_sens, num_layers, bits) if sharing else {}
        sharing_text = _sharing_verdict(same_options, winner, rates, num_layers, sharing)
        if winner.config.level_fit != "lsq":
            refined = _refine_eta(winner, eta_grid, verify, num_layers)
            if refined is not winner:
                candidates.append(refined)
                winner = refined
        notes = []
        if previous is not None and previous.score.kl < winner.score.kl:
            notes.append(f"the best config found for {budget:g} bits scored worse (KL {winner.score.kl:.4g}) than the "
                         f"one for {previous.budget_bits:g} bits; that one is returned, it fits this budget too")
            winner = Candidate(label=f"from budget {previous.budget_bits:g}", config=previous.config,
                               code_bits=previous.code_bits, stored_bits=previous.stored_bits, score=previous.score,
                               predicted_kl=previous.predicted_kl)
            candidates.append(winner)
            sharing_text = previous.sharing
            winner_sens = previous.sensitivity
        screen = [replace(r, allocated=r.options in combos_for[budget]) for r in screens.get(plan_of.get(budget), [])]
        result = SearchResult(
            budget_bits=budget, stored_budget_bits=stored_budget_bits, config=winner.config,
            code_bits=winner.code_bits, stored_bits=winner.stored_bits, score=winner.score,
            predicted_kl=winner.predicted_kl, sharing=sharing_text, candidates=candidates,
            reference=sim.reference, presets=[], calibration=calibration, seconds=0.0, forwards=0,
            stored_len=stored_len, stored_dtype=stored_dtype_name, notes=notes, num_layers=num_layers,
            sensitivity=winner_sens, options_how=dict(space.how), screen=screen,
        )
        by_index[i] = result
        previous = result
    timings["verification"] = time.perf_counter() - tick

    tick = time.perf_counter()
    presets: list[Candidate] = []
    if compare_presets:
        for preset in XQuantConfig.PRESETS:
            config = XQuantConfig.preset(preset)
            try:  # the search's G, R, value groups and metadata dtype (unless the preset sets one); skip what the model refuses
                config = config.replace(group_size=group_size, residual_length=residual_length,
                                        value_group_size=value_group_size,
                                        metadata_dtype=config.metadata_dtype or primary_md)
                sim.check_options(QualityOptions.of(config), config.eta)
            except ValueError:
                continue
            presets.append(Candidate(label="preset", config=config, code_bits=config.code_bits(num_layers),
                                     stored_bits=stored(config), score=verify(config)))
    timings["presets"] = time.perf_counter() - tick
    seconds = time.perf_counter() - t0
    results = [by_index[i] for i in range(len(budgets))]
    for r in results:
        r.presets, r.seconds, r.forwards, r.timings = presets, seconds, sim.forwards, dict(timings)
    logger.info("search: %d forwards, %.1f s (%s)", sim.forwards, seconds,
                ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return results[0] if single else results


def _md_name(md: str | None) -> str:
    return md or "model dtype"


class _StoredLines:
    """Stored bits as a function of code bits, per (metadata dtype, sinks): affine in the code
    total (every code bit stores the same number of code bytes; scales, zero points, window and
    sinks do not depend on the widths), measured on two plain configs. Used to decide what a stored
    budget leaves for codes; every returned config is checked exactly."""

    def __init__(self, stored, num_layers: int, group_size: int, residual_length: int,
                 value_group_size: int | None = None):
        self._stored, self.L, self.G, self.R = stored, num_layers, group_size, residual_length
        self.VG = value_group_size
        self._lines: dict[tuple, tuple[float, float]] = {}

    def config(self, md, sinks, k_bits=1, v_bits=1, share=False) -> XQuantConfig:
        start = 0 if share else None
        return XQuantConfig(k_bits=k_bits, v_bits=v_bits, k_share_from=start, v_share_from=start,
                            group_size=self.G, residual_length=self.R, value_group_size=self.VG, metadata_dtype=md,
                            sink_tokens=sinks)

    def line(self, md, sinks) -> tuple[float, float]:
        """``(stored bits at 0 code units, stored bits per code unit)``."""
        if (md, sinks) not in self._lines:
            one = self._stored(self.config(md, sinks, 1, 1))
            two = self._stored(self.config(md, sinks, 2, 2))
            slope = (two - one) / (2 * self.L)
            self._lines[(md, sinks)] = (one - slope * 2 * self.L, slope)
        return self._lines[(md, sinks)]

    def units(self, md, sinks, budget: float | None) -> int | float:
        """The most code units (code bits summed over layers and K/V) that fit ``budget``."""
        if budget is None:
            return math.inf
        a, slope = self.line(md, sinks)
        return int(math.floor((budget - a) / slope + 1e-9)) if slope > 0 else math.inf


def _fit_options_to_stored_budget(space: OptionSpace, lines: _StoredLines, bits, sharing: bool, budget: float,
                                  dtype_name: str, length: int) -> None:
    """Drop the sink counts and metadata dtypes with which not even the smallest config fits the
    stored budget (noted in ``space.how``); raise when nothing fits."""
    low, share = min(bits), sharing

    def floor(md, sinks):
        return lines._stored(lines.config(md, sinks, low, low, share))

    floors = {(m, s): floor(m, s) for m in space.metadata for s in space.sinks}
    if min(floors.values()) > budget + 1e-9:
        raise ValueError(f"stored_budget_bits={budget:g} is below the minimum the search can reach: "
                         f"{min(floors.values()):.4f} stored bits ({dtype_name}, {length} tokens)")
    sinks = tuple(s for s in space.sinks if min(floors[(m, s)] for m in space.metadata) <= budget + 1e-9)
    mds = tuple(m for m in space.metadata if min(floors[(m, s)] for s in space.sinks) <= budget + 1e-9)
    if sinks != space.sinks:
        dropped = ", ".join(str(s) for s in space.sinks if s not in sinks)
        space.how["sink_tokens"] += f" ({dropped} dropped: no config with them fits the stored budget)"
    if mds != space.metadata:
        dropped = ", ".join(_md_name(m) for m in space.metadata if m not in mds)
        space.how["metadata_dtype"] += f" ({dropped} dropped: no config with it fits the stored budget)"
    space.sinks, space.metadata = sinks, mds


def _metadata_order(space: OptionSpace, lines: _StoredLines, code_total: int, budget: float | None) -> list:
    """The metadata dtypes the allocation tries for one budget, the one the measurements use first:
    the one leaving the most code bits under the stored budget (ties: the more precise, the model
    dtype); a more precise one that leaves fewer is tried too (verified); a less precise one that
    leaves no more is not."""
    if len(space.metadata) == 1:
        return list(space.metadata)
    sinks = min(space.sinks)
    ranked = sorted(space.metadata, key=lambda m: (-min(lines.units(m, sinks, budget), code_total), m is not None))
    return [ranked[0]] + [m for m in ranked[1:] if m is None and ranked[0] is not None]


def _calibration_ids(tokenizer, text, input_ids, tokens: int, segments: int, copy_windows: int = 0,
                     residual_length: int = 0) -> tuple[torch.Tensor, str]:
    """``[segments + copy_windows, tokens]`` ids of the calibration text: ``segments`` windows, then
    ``copy_windows`` windows of ``tokens / 2`` new tokens repeated (2-D ``input_ids`` are used as
    given)."""
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments={segments!r}: a positive int")
    if not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens={tokens!r}: a window length in tokens")
    if isinstance(copy_windows, bool) or not isinstance(copy_windows, int) or copy_windows < 0:
        raise ValueError(f"copy_windows={copy_windows!r}: an int >= 0")
    half = tokens // 2
    if copy_windows and (tokens % 2 or half <= residual_length):
        raise ValueError(f"copy_windows={copy_windows} needs an even window whose half exceeds residual_length="
                         f"{residual_length} (so that the copied text is quantized when the copy reads it); "
                         f"tokens={tokens}")
    need = tokens * segments + half * copy_windows
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[1] <= 1:
                raise ValueError(f"input_ids of shape {tuple(ids.shape)} are too short")
            return ids, f"given ids, {ids.shape[0]} x {ids.shape[1]} tokens"
        ids = ids.reshape(-1)
        source = "given ids"
    else:
        if tokenizer is None:
            raise ValueError("search needs a tokenizer (to tokenize the calibration text) or input_ids")
        source = "given text" if text is not None else (
            "docstrings of Python's " + ", ".join(CALIBRATION_MODULES) + " modules")
        ids = tokenizer(text if text is not None else calibration_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < need:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {segments} x {tokens} = "
                         f"{tokens * segments}" + (f" and {copy_windows} x {half} for the copy windows" if copy_windows
                                                   else "") + f" = {need} are needed")
    windows = ids[: tokens * segments].view(segments, tokens)
    described = f"{source}, first {segments} x {tokens} tokens"
    if copy_windows:
        copied = ids[tokens * segments : need].view(copy_windows, half)
        windows = torch.cat([windows, torch.cat([copied, copied], 1)])
        described += f", then {copy_windows} copy window(s) of the next {half} tokens twice"
    return windows, described


def _fit_allocation(sens, num_layers, code_total, bits, mode, make_config, stored, stored_budget) -> Allocation | None:
    """The best allocation under ``code_total``, lowered until its config (``make_config(alloc)``)
    also fits the stored budget."""
    total = code_total
    while total >= 0:
        alloc = allocate(sens, num_layers, total, bits, mode)
        if alloc is None:
            return None
        if stored_budget is None or stored(make_config(alloc)) <= stored_budget + 1e-9:
            return alloc
        total = alloc.code_total - 1
    return None


def _check_expressed(config: XQuantConfig, alloc: Allocation, num_layers: int) -> None:
    """The config resolves to the allocation's plan: same bits, and sharing exactly where the
    allocation counted it (its code total)."""
    plans = config.resolve(num_layers)
    same_bits = [p.k_bits for p in plans] == list(alloc.k_bits) and [p.v_bits for p in plans] == list(alloc.v_bits)
    total = config.code_bits(num_layers) * 2 * num_layers
    if not same_bits or abs(total - alloc.code_total) > 1e-6:
        raise AssertionError(f"the config {config} does not express the allocation {alloc}")


def _plan_key(config: XQuantConfig, num_layers: int) -> tuple:
    """What decides a config's cache contents: its resolved plans, eta of the widths used, G, R and
    the quality options."""
    plans = tuple(config.resolve(num_layers))
    used = {p.k_bits for p in plans} | {p.v_bits for p in plans}
    eta = tuple(sorted((b, e) for b, e in config.eta.items() if b in used and e))
    return plans, eta, config.group_size, config.residual_length, QualityOptions.of(config)


def _refine_eta(winner: Candidate, eta_grid, verify, num_layers: int) -> Candidate:
    """Coordinate search of eta over the grid, one width at a time, on the winner's bits."""
    config, best = winner.config, winner.score
    used = {p.k_bits for p in config.resolve(num_layers)} | {p.v_bits for p in config.resolve(num_layers)}
    improved = False
    for b in sorted(used & set(eta_grid)):
        for e in eta_grid[b]:
            if abs(config.eta.get(b, 0.0) - e) < 1e-12:
                continue
            trial = config.replace(eta={**config.eta, b: e})
            s = verify(trial)
            if s.kl < best.kl:
                config, best, improved = trial, s, True
    if not improved:
        return winner
    return Candidate(label="winner, eta refined", config=config, code_bits=winner.code_bits,
                     stored_bits=winner.stored_bits, score=best, predicted_kl=winner.predicted_kl)


def _sharing_verdict(candidates: list[Candidate], winner: Candidate, rates, num_layers: int, sharing: bool) -> str:
    """What was decided about sharing at one budget, from the verified candidates (same eta)."""
    if not sharing:
        return "not allowed (sharing=False)"
    rate_text = "; ".join(
        f"{'keys' if k == 'k' else 'values'}: sharing a pair costs {s:.4g} KL per saved bit (median), lowering "
        f"bits {lw:.4g}" for k, (s, lw) in rates.items() if not math.isnan(s) and not math.isnan(lw))
    unshared = [c for c in candidates if not _uses_sharing(c.config, num_layers)]
    shared = [c for c in candidates if _uses_sharing(c.config, num_layers)]
    uses = _uses_sharing(winner.config, num_layers)
    if not shared:
        return f"not used: by the measured sensitivities no pair is worth sharing at this budget ({rate_text})"
    if not unshared:
        return f"used, and required: without it no config reaches this budget ({rate_text})"
    best_plain = min(unshared, key=lambda c: c.score.kl)
    best_shared = min(shared, key=lambda c: c.score.kl)
    if uses:
        return (f"used: the best config with sharing verified at KL {best_shared.score.kl:.4g} against "
                f"{best_plain.score.kl:.4g} for the best without ({rate_text})")
    return (f"not used: it costs more than it saves here; the best config with sharing verified at KL "
            f"{best_shared.score.kl:.4g} against {best_plain.score.kl:.4g} without ({rate_text})")


def _uses_sharing(config: XQuantConfig, num_layers: int) -> bool:
    return any(p.k_shares or p.v_shares for p in config.resolve(num_layers))
