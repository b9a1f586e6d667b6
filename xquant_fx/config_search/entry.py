"""The ``search()`` entry: calibration text, budgets, and the search that ties the simulator,
the allocation and the report together."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import time
from typing import Sequence

import torch

from ..cache import XQuantCache
from ..config import QUANT_BITS, LayerPlan, XQuantConfig
from ..hf import kv_geometry
from .allocation import _MODES, Allocation, allocate, measure_sensitivity, sharing_rates
from .report import Candidate, SearchResult
from .simulator import DecodeSimulator, Score, _num_layers_and_sliding

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
    bits: Sequence[int] = (1, 2),
    sharing: bool = True,
    eta_grid: dict[int, Sequence[float]] | None = None,
    stored_budget_bits: float | None = None,
    stored_len: int = 8192,
    stored_dtype: torch.dtype = torch.bfloat16,
    group_size: int = 32,
    residual_length: int = 128,
    metadata_dtype: str | None = None,
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
        bits: widths a tensor may take (from 1, 2, 4).
        sharing: allow cross-layer code sharing.
        eta_grid: ``{bits: candidate etas}`` (default :data:`DEFAULT_ETA_GRID`); a width without
            a grid is not calibrated.
        stored_budget_bits: optional bound on stored bits per value as the cache holds them at
            ``stored_len`` tokens in ``stored_dtype`` (codes, scales, zero points, window).
        group_size, residual_length: G and R of the configs (not searched).
        metadata_dtype: how the configs store scales and zero points (``XQuantConfig.metadata_dtype``;
            not searched): the simulator quantizes them so, stored bits count them so, and the
            presets of the report are scored with it too.
        prefill: tokens prefilled per window before decoding (default ``residual_length``).
        compare_presets: also score the presets on the calibration text, for the report.

    Raises ``ValueError`` when a budget is below what the search can reach (the message names the
    minimum), and on malformed arguments.
    """
    t0 = time.perf_counter()
    budgets, single = _budgets(budget_bits)
    bits = _check_bits(bits)
    eta_grid = DEFAULT_ETA_GRID if eta_grid is None else {int(b): tuple(g) for b, g in eta_grid.items()}
    XQuantConfig(group_size=group_size, residual_length=residual_length, metadata_dtype=metadata_dtype)  # validates
    num_layers = kv_geometry(model.config)[0]
    low = minimum_code_bits(num_layers, bits, sharing)
    for b in budgets:
        if b < low - 1e-9:
            how = (f"{min(bits)}-bit keys and values" + (", odd layers sharing their partner's codes" if sharing else ""))
            raise ValueError(f"budget_bits={b:g} is below the minimum the search can reach on this {num_layers}-layer "
                             f"model: {low:.4f} code bits ({how})")
    stored_dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(stored_dtype)
    if stored_dtype_name is None:
        raise ValueError(f"stored_dtype={stored_dtype!r}: one of torch.bfloat16, torch.float16, torch.float32")
    if stored_budget_bits is not None:
        floor_cfg = XQuantConfig(k_bits=min(bits), v_bits=min(bits), k_share_from=0 if sharing else None,
                                 v_share_from=0 if sharing else None, group_size=group_size,
                                 residual_length=residual_length, metadata_dtype=metadata_dtype)
        floor_stored = _stored_bits(model, floor_cfg, stored_len, stored_dtype)
        if stored_budget_bits < floor_stored - 1e-9:
            raise ValueError(f"stored_budget_bits={stored_budget_bits:g} is below the minimum the search can reach: "
                             f"{floor_stored:.4f} stored bits ({stored_dtype_name}, {stored_len} tokens)")

    ids, calibration = _calibration_ids(tokenizer, text, input_ids, tokens, segments)
    if ids.shape[1] <= residual_length + 1:
        raise ValueError(f"calibration windows of {ids.shape[1]} tokens: they must be longer than residual_length + 1 "
                         f"= {residual_length + 1} tokens (only tokens older than the window are quantized)")
    if any(_num_layers_and_sliding(model, ids.shape[1])[1]):
        raise ValueError(f"{type(model).__name__} has sliding-window layers: the search allocates bits to "
                         "full-attention layers only and does not support such models yet")
    sim = DecodeSimulator(model, ids.to(model.device), prefill, group_size, residual_length, metadata_dtype)
    calibration += f", {sim.P} prefilled per window, {sim.scored_tokens} tokens scored"

    def stored(config: XQuantConfig) -> float:
        return _stored_bits(model, config, stored_len, stored_dtype)

    # 1. eta per width, each on the cache with every tensor at that width
    eta: dict[int, float] = {}
    for b in bits:
        grid = eta_grid.get(b, ())
        if len(grid) > 1:
            uniform = [LayerPlan(i, b, b) for i in range(num_layers)]
            scores = [(sim.run(uniform, {b: e}).kl, e) for e in grid]
            eta[b] = min(scores)[1]
        elif grid:
            eta[b] = float(grid[0])
    logger.info("eta %s", eta)

    # 2. sensitivities from the all-base cache
    base_bits = 2 if 2 in bits else max(bits)
    sens = measure_sensitivity(sim, bits, eta, base_bits, sharing, progress)
    rates = sharing_rates(sens, num_layers, bits) if sharing else {}

    # 3-5. allocation, verification, eta refinement, per budget from the smallest up
    cache: dict[tuple, Score] = {}

    def verify(config: XQuantConfig) -> Score:
        key = _plan_key(config, num_layers)
        if key not in cache:
            cache[key] = sim.score(config)
        return cache[key]

    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    by_index: dict[int, SearchResult] = {}
    previous: SearchResult | None = None
    for i in order:
        budget = budgets[i]
        name = f"search-{budget:g}" + (f":metadata_dtype={metadata_dtype}" if metadata_dtype else "")
        code_total = int(math.floor(budget * 2 * num_layers + 1e-9))
        candidates: list[Candidate] = []
        modes = _MODES if sharing else ("none",)
        seen: set[tuple] = set()
        for mode in modes:
            alloc = _fit_allocation(sens, num_layers, code_total, bits, mode, eta, group_size, residual_length,
                                    stored, stored_budget_bits, metadata_dtype)
            if alloc is None:
                continue
            config = alloc.config(eta, group_size, residual_length, name, metadata_dtype)
            _check_expressed(config, alloc, num_layers)
            if _plan_key(config, num_layers) in seen:  # the same config as a mode already verified
                continue
            seen.add(_plan_key(config, num_layers))
            candidates.append(Candidate(label=f"best, sharing: {mode}", config=config,
                                        code_bits=config.code_bits(num_layers), stored_bits=stored(config),
                                        score=verify(config), predicted_kl=sens.base.kl + alloc.predicted_increase))
        if not candidates:
            raise ValueError(f"no config fits budget_bits={budget:g}"
                             + (f" and stored_budget_bits={stored_budget_bits:g}" if stored_budget_bits else ""))
        winner = min(candidates, key=lambda c: c.score.kl)
        sharing_text = _sharing_verdict(candidates, winner, rates, num_layers, sharing)
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
        result = SearchResult(
            budget_bits=budget, stored_budget_bits=stored_budget_bits, config=winner.config,
            code_bits=winner.code_bits, stored_bits=winner.stored_bits, score=winner.score,
            predicted_kl=winner.predicted_kl, sharing=sharing_text, candidates=candidates,
            reference=sim.reference, presets=[], calibration=calibration, seconds=0.0, forwards=0,
            stored_len=stored_len, stored_dtype=stored_dtype_name, notes=notes, num_layers=num_layers,
            sensitivity=sens,
        )
        by_index[i] = result
        previous = result

    presets: list[Candidate] = []
    if compare_presets:
        for preset in XQuantConfig.PRESETS:
            config = XQuantConfig.preset(preset).replace(group_size=group_size, residual_length=residual_length,
                                                         metadata_dtype=metadata_dtype)
            presets.append(Candidate(label="preset", config=config, code_bits=config.code_bits(num_layers),
                                     stored_bits=stored(config), score=verify(config)))
    seconds = time.perf_counter() - t0
    results = [by_index[i] for i in range(len(budgets))]
    for r in results:
        r.presets, r.seconds, r.forwards = presets, seconds, sim.forwards
    logger.info("search: %d forwards, %.1f s", sim.forwards, seconds)
    return results[0] if single else results


def _calibration_ids(tokenizer, text, input_ids, tokens: int, segments: int) -> tuple[torch.Tensor, str]:
    """``[segments, tokens]`` ids of the calibration text (2-D ``input_ids`` are used as given)."""
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments={segments!r}: a positive int")
    if not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens={tokens!r}: a window length in tokens")
    need = tokens * segments
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
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {segments} x {tokens} = {need} are needed")
    return ids[:need].view(segments, tokens), f"{source}, first {segments} x {tokens} tokens"


def _fit_allocation(sens, num_layers, code_total, bits, mode, eta, group_size, residual_length, stored,
                    stored_budget, metadata_dtype=None) -> Allocation | None:
    """The best allocation under ``code_total``, lowered until it also fits the stored budget."""
    total = code_total
    while total >= 0:
        alloc = allocate(sens, num_layers, total, bits, mode)
        if alloc is None:
            return None
        if stored_budget is None:
            return alloc
        config = alloc.config(eta, group_size, residual_length, "probe", metadata_dtype)
        if stored(config) <= stored_budget + 1e-9:
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
    """What decides a config's cache contents: its resolved plans, eta of the widths used, G and R."""
    plans = tuple(config.resolve(num_layers))
    used = {p.k_bits for p in plans} | {p.v_bits for p in plans}
    eta = tuple(sorted((b, e) for b, e in config.eta.items() if b in used and e))
    return plans, eta, config.group_size, config.residual_length, config.metadata_dtype


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
