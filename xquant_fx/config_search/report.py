"""What a search found, and its readable report (:class:`SearchResult`, :func:`format_results`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..config import LayerPlan, XQuantConfig
from .allocation import Sensitivity
from .simulator import QualityOptions, Score

@dataclass
class Candidate:
    """One verified config: how it was produced (``label``), its bits and its measured score."""

    label: str
    config: XQuantConfig
    code_bits: float
    stored_bits: float
    score: Score
    predicted_kl: float | None = None


@dataclass
class SearchResult:
    """What :func:`search` found for one budget; :meth:`summary` prints it."""

    budget_bits: float
    stored_budget_bits: float | None
    config: XQuantConfig
    code_bits: float
    stored_bits: float
    score: Score  # calibration text, decode conditions, verified
    predicted_kl: float | None
    sharing: str  # what was decided about cross-layer sharing, and why
    candidates: list[Candidate]  # every verified config for this budget
    reference: Score  # full precision on the same text
    presets: list[Candidate]  # the presets on the same text (empty with compare_presets=False)
    calibration: str  # which text, how many tokens
    seconds: float  # the whole search call (all budgets together)
    forwards: int
    stored_len: int = 8192
    stored_dtype: str = "bf16"
    notes: list[str] = field(default_factory=list)
    num_layers: int = 0
    sensitivity: Sensitivity | None = None  # the measurements the winner was allocated from
    options_how: dict[str, str] = field(default_factory=dict)  # how each quality option was decided
    screen: list = field(default_factory=list)  # ScreenRow per option combination (empty: not screened)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the search call

    @property
    def options(self) -> QualityOptions:
        """The quality options of the config found (sinks, rotation, level fit, metadata dtype)."""
        return QualityOptions.of(self.config)

    def layer_table(self) -> str:
        """Per-layer bits; ``s`` marks a tensor that reads the previous layer's codes."""
        return _layer_table(self.config.resolve(self.num_layers))

    def summary(self, presets: bool = True) -> str:
        """The config found, per-layer bits, scores and the sharing decision; with ``presets``, the
        presets' scores on the same text and the search's cost."""
        cfg = self.config
        budget = f"{self.budget_bits:g} code bits"
        if self.stored_budget_bits is not None:
            budget += f", {self.stored_budget_bits:g} stored bits"
        eta = ", ".join(f"eta_{b} = {_fmt_eta(e)}" for b, e in sorted(cfg.eta.items())) or "none"
        shares = []
        if cfg.k_share_from is not None:
            shares.append(f"keys from layer {cfg.k_share_from}")
        if cfg.v_share_from is not None:
            shares.append(f"values from layer {cfg.v_share_from}")
        ref = self.reference
        lines = [
            f"budget {budget} -> {cfg.name}: {self.code_bits:.4f} code bits, {self.stored_bits:.3f} stored bits "
            f"({self.stored_dtype}, {self.stored_len} tokens)",
            f"  calibration: {self.calibration}",
            f"  options: sink_tokens={cfg.sink_tokens}, rotation={cfg.rotation}, level_fit={cfg.level_fit}, "
            f"metadata_dtype={cfg.metadata_dtype}"
            + (f", value_group_size={cfg.value_group_size}" if cfg.value_group_size else ""),
        ]
        lines += [f"    {name}: {how}" for name, how in self.options_how.items()]
        lines += [
            f"  eta: {eta}; sharing starts: {', '.join(shares) or 'none'}",
            _indent(self.layer_table(), "  "),
            f"  score: ppl {self.score.ppl:.3f} (full precision {ref.ppl:.3f}), KL {self.score.kl:.4g} nats/token"
            + (f" (predicted {self.predicted_kl:.4g})" if self.predicted_kl is not None else ""),
            f"  sharing: {self.sharing}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.screen:
            lines.append(f"  option screen (every layer {self.screen[0].plan}, no sharing; KL on the calibration text; "
                         "allocated: the allocation ran under it):")
            lines.append(_indent(_screen_table(self.screen), "    "))
        lines.append("  verified candidates:")
        lines.append(_indent(_candidate_table(self.candidates), "    "))
        if presets:
            lines.append(_indent(self.footer(), "  "))
        return "\n".join(lines)

    def footer(self) -> str:
        """The presets on the calibration text and the cost of the search call."""
        lines = []
        if self.presets:
            lines.append("presets on the same text:")
            lines.append(_indent(_candidate_table(self.presets), "  "))
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
        lines.append(f"search cost: {self.forwards} forwards, {self.seconds:.1f} s (all budgets of the call"
                     + (f"; {stages}" if stages else "") + ")")
        return "\n".join(lines)


def format_results(results: "SearchResult | Sequence[SearchResult]") -> str:
    """Several budgets of one :func:`search` call: each config, then the presets and cost once."""
    results = [results] if isinstance(results, SearchResult) else list(results)
    if not results:
        return ""
    return "\n\n".join([r.summary(presets=False) for r in results] + [results[-1].footer()])


def _fmt_eta(e: float) -> str:
    for num, den in ((1, 6), (1, 4), (1, 3)):
        if abs(e - num / den) < 1e-9:
            return f"{num}/{den}"
    return f"{e:g}"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _layer_table(plans: list[LayerPlan]) -> str:
    def cell(p: LayerPlan, kind: str) -> str:
        bits = p.k_bits if kind == "k" else p.v_bits
        shares = p.k_shares if kind == "k" else p.v_shares
        return f"{bits}{'s' if shares else ''}"

    width = max(3, len(str(len(plans) - 1)) + 1)
    rows = [("layer", [str(p.index) for p in plans]), ("K", [cell(p, "k") for p in plans]),
            ("V", [cell(p, "v") for p in plans])]
    out = [f"{name:<6}" + "".join(f"{c:>{width}}" for c in cells) for name, cells in rows]
    out.append("(bits per layer; s: reads the previous layer's codes with its own scale/zero)")
    return "\n".join(out)


def _candidate_table(cands: list[Candidate]) -> str:
    from tabulate import tabulate

    rows = [[c.label, c.config.name, f"{c.code_bits:.4f}", f"{c.stored_bits:.3f}", f"{c.score.ppl:.3f}",
             f"{c.score.kl:.4g}", "" if c.predicted_kl is None else f"{c.predicted_kl:.4g}"] for c in cands]
    return tabulate(rows, headers=["candidate", "config", "code bits", "stored bits", "ppl", "KL", "predicted KL"])


def _screen_table(rows) -> str:
    from tabulate import tabulate

    table = [[r.options.label, ", ".join(f"eta_{b} = {_fmt_eta(e)}" for b, e in sorted(r.eta.items())) or "none",
              f"{r.score.ppl:.3f}", f"{r.score.kl:.4g}", "yes" if r.allocated else ""]
             for r in sorted(rows, key=lambda r: r.score.kl)]
    return tabulate(table, headers=["options", "eta", "ppl", "KL", "allocated"])
