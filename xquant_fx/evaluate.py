"""Quality of each cache config on a real model: decode-condition perplexity, agreement, retrieval.

* **Perplexity under decode conditions.** The corpus is cut into ``segments`` equal windows, run
  as one batch: the first ``prefill`` tokens of each (at most the residual window, so nothing is
  quantized yet and prefill is exact) are prefilled, every later token is fed alone, so each
  prediction sees the cache exactly as generation would leave it: full-precision window, groups
  flushed as they leave it, sharing layers reading their partner's codes.
* **Agreement** with full precision: the fraction of those decode steps whose greedy (top-1)
  prediction equals the full-precision cache's on the same inputs.
* **Retrieval**: a pass key hidden at several depths of a long filler text, asked for after it
  and answered by greedy generation; a hit when the key's digits appear in the answer.

The corpus by default is CPython's own ``LICENSE.txt`` followed by the docstrings of a fixed list
of standard-library modules: it ships with every CPython, so numbers reproduce on any machine with
the same Python minor version.

Configs are presets or specs (:meth:`XQuantConfig.from_spec`, ``"kivi-2:group_size=128"``); a row
is named by its spec. Each row also records the run it comes from (model, scored tokens, run
settings, torch / transformers versions, date), so that rows of several runs can share one table
(``eval --append``, :func:`merge_rows`) only when those runs are comparable: the table's header
line states these once for all rows.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import logging
import math
import os
import re
import sysconfig
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .cache import XQuantCache
from .config import XQuantConfig
from .hf import cache_argument

logger = logging.getLogger(__name__)

_DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "re",
                "subprocess", "typing", "unittest", "asyncio", "dataclasses", "inspect", "threading")


def default_corpus() -> str:
    """CPython's LICENSE.txt, then the docstrings of a fixed list of standard-library modules."""
    parts = []
    license_path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_path.exists():
        parts.append(license_path.read_text())
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", [])):
            doc = inspect.getdoc(getattr(module, attr, None))
            if doc:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


@dataclass
class EvalRow:
    """One config's results; ``model`` .. ``date`` say which run it comes from (:class:`RunInfo`;
    empty: not recorded, for rows read from a table written before they were)."""

    config: str
    code_bits: float
    stored_bits: float
    ppl: float
    delta_ppl_pct: float
    agreement: float
    retrieval: str
    scored_tokens: int
    model: str = ""
    settings: str = ""
    environment: str = ""
    date: str = ""


@dataclass(frozen=True)
class RunInfo:
    """What an eval run's rows share and the table's header states: the model, the number of
    scored tokens, the settings (``segments=8 segment_len=640 prefill=128 depths=0.1/0.5/0.9
    filler=100 corpus=default``), the environment (``torch ..., transformers ..., fp32 CPU``) and
    the date. Rows of runs that differ in anything but the date do not go into one table."""

    model: str
    scored_tokens: int
    settings: str
    environment: str
    date: str


def run_settings(segments: int, segment_len: int, prefill: int, depths, n_filler: int, text: str | None) -> str:
    """The settings string of :class:`RunInfo` (a custom corpus by its SHA-256 prefix)."""
    corpus = "default" if text is None else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    depth_text = "/".join(f"{d:g}" for d in depths) if depths else "none"
    return (f"segments={segments} segment_len={segment_len} prefill={prefill} depths={depth_text} "
            f"filler={n_filler} corpus={corpus}")


def stamp(rows: list[EvalRow], run: RunInfo) -> list[EvalRow]:
    """``rows`` marked as coming from ``run``."""
    return [replace(r, model=run.model, settings=run.settings, environment=run.environment, date=run.date)
            for r in rows]


def _as_config(preset) -> XQuantConfig:
    return XQuantConfig.coerce(preset, default=None, what="preset")


def decode_nll(model, segments: torch.Tensor, xq: XQuantConfig, prefill: int, progress: bool = False):
    """Token NLLs ``[B, L - prefill]`` and greedy predictions of decode-condition scoring of
    ``segments [B, L]`` (see the module docstring)."""
    b, length = segments.shape
    if not 1 <= prefill <= min(xq.residual_length, length - 1):
        raise ValueError(f"prefill={prefill} must be in [1, min(residual_length, segment length - 1)]")
    cache = XQuantCache(model.config, xq, max_batch_size=b, max_cache_len=length)
    arg = cache_argument(model)
    nll, top1 = [], []
    steps = range(prefill, length)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=xq.name, leave=False)
    with torch.no_grad():
        logits = model(segments[:, :prefill], **{arg: cache}).logits[:, -1].float()
        for t in steps:
            nll.append(torch.nn.functional.cross_entropy(logits, segments[:, t], reduction="none"))
            top1.append(logits.argmax(-1))
            if t + 1 < length:
                logits = model(segments[:, t : t + 1], **{arg: cache}).logits[:, -1].float()
    return torch.stack(nll, 1), torch.stack(top1, 1)


PASSKEY = "68413"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, depth: float, n_filler: int, key: str = PASSKEY) -> torch.Tensor:
    parts = [FILLER] * n_filler
    parts.insert(int(round(depth * n_filler)), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = ("There is an important piece of information hidden in a lot of irrelevant text. Find it and "
                "memorize it.\n\n" + "".join(parts) + "\n\nWhat is the pass key?")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def retrieval(model, tokenizer, xq: XQuantConfig, depths, n_filler: int, new_tokens: int = 12) -> list[bool]:
    hits = []
    for depth in depths:
        ids = passkey_prompt(tokenizer, depth, n_filler).to(model.device)
        cache = XQuantCache(model.config, xq, max_cache_len=ids.shape[1] + new_tokens)
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **{cache_argument(model): cache})
        hits.append(PASSKEY in tokenizer.decode(out[0, ids.shape[1]:]))
    return hits


def evaluate(
    model,
    tokenizer,
    presets=XQuantConfig.PRESETS,
    text: str | None = None,
    segments: int = 8,
    segment_len: int = 640,
    prefill: int = 128,
    depths=(0.1, 0.5, 0.9),
    n_filler: int = 100,
    progress: bool = True,
) -> list[EvalRow]:
    """One row per preset (``fp16`` first: the reference for Δppl and agreement)."""
    configs = [_as_config(p) for p in presets]
    for xq in configs:
        if xq.prunes_experts:
            raise ValueError(
                f"config {xq.name!r} sets MoE options (moe_*): this harness measures the KV cache with the "
                "model's own routing; measure expert pruning through optimize() (see README, MoE quality)"
            )
    if configs[0].name != "fp16":
        configs.insert(0, XQuantConfig.preset("fp16"))
    # Checked before the first config runs (each run takes minutes on a CPU), not by decode_nll on
    # the config that cannot take them.
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments={segments!r}: must be a positive int")
    window = min(xq.residual_length for xq in configs)
    if not 1 <= prefill <= min(window, segment_len - 1):
        raise ValueError(f"prefill={prefill}: must be in [1, min(residual_length of every config = {window}, "
                         f"segment_len - 1 = {segment_len - 1})]")
    bad = [d for d in depths or () if not 0.0 <= d <= 1.0]
    if bad or n_filler < 0:
        raise ValueError(f"depths {list(depths or ())} / n_filler {n_filler}: depths in [0, 1], n_filler >= 0")
    ids = tokenizer(text or default_corpus(), return_tensors="pt").input_ids[0]
    need = segments * segment_len
    if ids.numel() < need:
        raise ValueError(f"the corpus has {ids.numel()} tokens; {segments} x {segment_len} = {need} are needed")
    batch = ids[:need].view(segments, segment_len).to(model.device)
    # Sizes first: a config the model cannot hold (a group wider than the head dim...) fails here,
    # not after the runs of the configs before it.
    sizes = []
    for xq in configs:
        try:
            sizes.append((XQuantCache(model.config, xq, max_cache_len=segment_len).memory_report(model.dtype),
                          XQuantCache(model.config, xq, max_cache_len=8192).memory_report(torch.bfloat16)))
        except ValueError as err:
            raise ValueError(f"config {xq.name!r} does not fit this model: {err}") from None
    rows, ref_top1, ref_ppl = [], None, None
    for xq, (report, long_report) in zip(configs, sizes):
        nll, top1 = decode_nll(model, batch, xq, prefill, progress)
        ppl = math.exp(nll.double().mean().item())
        ref_top1 = top1 if ref_top1 is None else ref_top1
        ref_ppl = ppl if ref_ppl is None else ref_ppl
        hits = retrieval(model, tokenizer, xq, depths, n_filler) if depths else []
        rows.append(EvalRow(
            config=xq.name,
            code_bits=round(report["code_bits"], 4),
            stored_bits=round(long_report["stored_bits"], 3),
            ppl=round(ppl, 3),
            delta_ppl_pct=round(100 * (ppl / ref_ppl - 1), 2),
            agreement=round((top1 == ref_top1).double().mean().item(), 4),
            retrieval=f"{sum(hits)}/{len(hits)}",
            scored_tokens=nll.numel(),
        ))
        logger.info("%s", rows[-1])
    return rows


HEADERS = ("config", "code bits", "stored bits (bf16, 8k)", "ppl", "Δppl %", "top-1 agreement", "retrieval")


def format_table(rows: list[EvalRow], fmt: str = "github") -> str:
    from tabulate import tabulate

    table = [[r.config, r.code_bits, r.stored_bits, r.ppl, r.delta_ppl_pct, r.agreement, r.retrieval] for r in rows]
    return tabulate(table, headers=HEADERS, tablefmt=fmt)


# ---------------------------------------------------------------------------------- one table, several runs
_DATE_SEP = " + "
# The header line save() writes: "# Quality, <model>, <N> scored tokens, <date[ + date...]>, <environment>".
_HEADER_RE = re.compile(r"^# Quality, (?P<model>.+), (?P<tokens>\d+) scored tokens, "
                        r"(?P<date>\d{4}-\d{2}-\d{2}(?: \+ \d{4}-\d{2}-\d{2})*), (?P<environment>.+)$")


def meta_line(rows: list[EvalRow]) -> str:
    """The table's header line for ``rows``: ``<model>, <N> scored tokens, <date(s)>,
    <environment>``. Raises ``ValueError`` when the rows do not come from comparable runs (see
    :func:`check_same_run`)."""
    check_same_run(rows)
    first = rows[0]
    model = next((r.model for r in rows if r.model), "")
    environment = next((r.environment for r in rows if r.environment), "")
    dates = sorted({d for r in rows for d in r.date.split(_DATE_SEP) if d})
    return ", ".join(part for part in (model, f"{first.scored_tokens} scored tokens", _DATE_SEP.join(dates),
                                       environment) if part)


def check_same_run(rows: list[EvalRow]) -> None:
    """``ValueError`` unless every row has the same scored-token count and, where recorded, the
    same model, settings and environment (the date may differ)."""
    if not rows:
        raise ValueError("no rows")
    for name in ("scored_tokens", "model", "settings", "environment"):
        values = {}
        for r in rows:
            value = getattr(r, name)
            if value != "":
                values.setdefault(value, r.config)
        if len(values) > 1:
            (a, row_a), (b, row_b) = list(values.items())[:2]
            raise ValueError(
                f"rows {row_a!r} and {row_b!r} come from runs with a different {name} ({a!r} vs {b!r}): they cannot "
                "share one table (run the eval again with the same settings, or write to another --out)"
            )


def load_rows(out_dir: Path) -> list[EvalRow]:
    """The rows of ``out_dir/eval.csv``. A table written before rows recorded their run takes
    model, date and environment from its ``eval.md`` header line (settings stay unknown)."""
    out_dir = Path(out_dir)
    path = out_dir / "eval.csv"
    types = {f.name: f.type for f in fields(EvalRow)}
    convert = {"float": float, "int": int, "str": str}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [name for name in ("config", "code_bits", "stored_bits", "ppl", "delta_ppl_pct", "agreement",
                                     "retrieval", "scored_tokens") if name not in header]
        if missing:
            raise ValueError(f"{path} is not an eval table: no column(s) {', '.join(missing)}")
        unknown = [name for name in header if name not in types]
        if unknown:
            raise ValueError(f"{path} has column(s) {', '.join(unknown)} that this version does not write")
        try:
            rows = [EvalRow(**{k: convert[types[k]](v) for k, v in record.items()}) for record in reader]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable row ({exc})") from None
    if not rows:
        raise ValueError(f"{path} has no rows")
    if "model" not in header:
        md = out_dir / "eval.md"
        first = md.read_text().splitlines()[0] if md.exists() else ""
        match = _HEADER_RE.match(first)
        if not match:
            raise ValueError(f"{path} records no run per row, and the header line of {md} cannot be read: cannot "
                             "tell whether new rows are comparable")
        if int(match["tokens"]) != rows[0].scored_tokens:
            raise ValueError(f"{md} says {match['tokens']} scored tokens but {path} {rows[0].scored_tokens}")
        rows = [replace(r, model=match["model"], environment=match["environment"], date=match["date"]) for r in rows]
    return rows


def merge_rows(old: list[EvalRow], new: list[EvalRow], rel_tol: float = 5e-4) -> list[EvalRow]:
    """``old`` with ``new`` merged in: a new row replaces the old row of the same name in its
    place, others are appended in order. Refuses (``ValueError``) rows of runs that are not
    comparable (:func:`check_same_run`) or, since every row's Δppl and agreement are relative to
    its run's first (full-precision) row, whose reference rows differ: same name and perplexity
    within ``rel_tol`` required."""
    if not old:
        return list(new)
    check_same_run(old + new)
    ref_old, ref_new = old[0], new[0]
    if ref_old.config != ref_new.config or not math.isclose(ref_old.ppl, ref_new.ppl, rel_tol=rel_tol):
        raise ValueError(
            f"the runs' reference rows differ ({ref_old.config} ppl {ref_old.ppl} in the table, {ref_new.config} ppl "
            f"{ref_new.ppl} now): their Δppl and agreement are not comparable, so they cannot share one table"
        )
    merged = list(old)
    index = {r.config: i for i, r in enumerate(merged)}
    for r in new:
        if r.config in index:
            merged[index[r.config]] = r
        else:
            index[r.config] = len(merged)
            merged.append(r)
    return merged


def save(rows: list[EvalRow], out_dir: Path, meta: str) -> list[Path]:
    """``eval.csv``, ``eval.md`` and (with matplotlib) ``eval.png``: quality vs stored bits."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "eval.csv", out_dir / "eval.md"]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    paths[1].write_text(f"# Quality, {meta}\n\n{format_table(rows)}\n")
    try:
        os.environ.setdefault("MPLBACKEND", "Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'xquant_fx[eval]')")
        return paths
    import textwrap

    # Points named in a legend, not next to them: rows sit close together (and spec names are long).
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap, markers = plt.get_cmap("tab10"), "os^Dv<>p"
    for i, r in enumerate(rows):
        ax.scatter(r.stored_bits, r.ppl, color=cmap(i % 10), marker=markers[i // 10 % len(markers)], label=r.config)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("stored bits per cached value (bf16, 8k tokens)")
    ax.set_ylabel("decode-condition perplexity")
    ax.set_title("\n".join(textwrap.wrap(meta, 100)), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "eval.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
