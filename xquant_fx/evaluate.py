"""Quality of each cache config on a real model: decode-condition perplexity, agreement, retrieval.

* **Perplexity under decode conditions.** The corpus is cut into ``segments`` equal windows, run
  as one batch: the first ``prefill`` tokens of each (at most the residual window, so nothing is
  quantized yet and prefill is exact) are prefilled, every later token is fed alone, so each
  prediction sees the cache exactly as generation would leave it: full-precision window, groups
  flushed as they leave it, sharing layers reading their partner's codes.
* **Agreement** with full precision: the fraction of those decode steps whose greedy (top-1)
  prediction equals the full-precision cache's on the same inputs.
* **Retrieval** (``k/N``): N pass-key prompts, a five-digit key said once, at one of several
  depths of a repetitive filler text, at several prompt lengths (:func:`retrieval_cases`;
  by default 8 depths from 0 to 0.875 of the filler at 512, 1024 and 2048 tokens: 24 cases,
  seeded, the same for every config). Each prompt ends by starting the answer (``What is the pass
  key? The pass key is``); it is prefilled into the config's cache but for its last token, and the
  answer is decoded greedily one token at a time (:func:`retrieve`), so every key token is
  predicted from the quantized cache. A hit when the greedy answer is the key's tokens.

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
import itertools
import logging
import math
import os
import random
import re
import sysconfig
import time
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
    scored tokens, the settings (``segments=8 segment_len=640 prefill=128
    depths=0/0.125/.../0.875 lengths=512/1024/2048 seed=0 corpus=default``), the environment
    (``torch ..., transformers ..., fp32 CPU``) and the date. Rows of runs that differ in anything
    but the date do not go into one table."""

    model: str
    scored_tokens: int
    settings: str
    environment: str
    date: str


def run_settings(segments: int, segment_len: int, prefill: int, depths, lengths, text: str | None,
                 retrieval_seed: int = 0) -> str:
    """The settings string of :class:`RunInfo` (a custom corpus by its SHA-256 prefix)."""
    corpus = "default" if text is None else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if depths and lengths:
        retrieval_text = (f"depths={'/'.join(f'{d:g}' for d in depths)} lengths={'/'.join(str(n) for n in lengths)} "
                          f"seed={retrieval_seed}")
    else:
        retrieval_text = "depths=none"
    return f"segments={segments} segment_len={segment_len} prefill={prefill} {retrieval_text} corpus={corpus}"


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


# ---------------------------------------------------------------------------------- pass-key retrieval
# A cue, filler sentences repeated to the prompt length, the needle (one sentence, the key said once) at
# a depth of the filler, and a question whose answer the prompt starts: the model's greedy continuation
# must be the key. SmolLM2-135M answers all 24 default cases with the full-precision cache; a needle that
# repeats the key ("Remember it. {key} is the pass key.") is easier for a quantized cache too, so it tells
# caches apart less (benchmarks/retrieval_formats.py compares the formats).
RETRIEVAL_INTRO = ("There is an important piece of information hidden in a lot of irrelevant text. Find it and "
                   "memorize it. I will quiz you about it.\n\n")
RETRIEVAL_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
RETRIEVAL_NEEDLE = " The pass key is {key}."
RETRIEVAL_QUESTION = "\n\nWhat is the pass key? The pass key is"
RETRIEVAL_LENGTHS = (512, 1024, 2048)
RETRIEVAL_DEPTHS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass(frozen=True)
class RetrievalCase:
    """One pass-key prompt of ``length`` tokens (``prompt``): the cue, ``filler_len`` tokens of
    filler sentences (the first cut to fit) with the needle sentence (``needle_len`` tokens,
    stating ``key``) inserted at token ``needle_start``, after the ``filler_before`` filler tokens
    that make the sentence boundary nearest to ``depth`` of the filler (0: right after the cue, 1:
    right before the question), then the question, ending with the start of the answer.
    A hit when greedy decoding continues it with ``answer`` (the key's tokens)."""

    length: int
    depth: float
    key: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    needle_start: int
    needle_len: int
    filler_len: int
    filler_before: int

    @property
    def filler_depth(self) -> float:
        """The fraction of the filler that precedes the needle (``depth``, to a sentence)."""
        return self.filler_before / self.filler_len if self.filler_len else 0.0


def _token_ids(tokenizer, text: str, special: bool = False) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special).input_ids
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    return ids[0] if ids and isinstance(ids[0], list) else ids


def _split_answer(tokenizer, question: str, key: str) -> tuple[list[int], list[int]]:
    """``(question ids, answer ids)``: the tokens of ``question + " " + key`` cut where the key's own
    tokens start, so the prompt ends as that text's tokenization does (``" "`` is a token of its own
    before digits in some tokenizers, part of the first digit's in others)."""
    full = _token_ids(tokenizer, f"{question} {key}")
    for head in (question + " ", question):
        ids = _token_ids(tokenizer, head)
        if full[: len(ids)] == ids and len(full) > len(ids):
            return ids, full[len(ids):]
    raise ValueError(f"this tokenizer does not split {question!r} + ' {key}' after the question: cannot cut the "
                     "answer off the prompt")


def retrieval_key(seed: int, length: int, depth: float) -> str:
    """The case's five-digit pass key: a function of the seed, the length and the depth only, so a
    case is the same whatever other lengths and depths run with it."""
    return str(random.Random(f"xquant-retrieval:{seed}:{length}:{depth!r}").randrange(10_000, 100_000))


def retrieval_cases(tokenizer, lengths=RETRIEVAL_LENGTHS, depths=RETRIEVAL_DEPTHS,
                    seed: int = 0) -> list[RetrievalCase]:
    """The pass-key cases, ``lengths x depths`` of them (length-major), each exactly ``length``
    tokens long. ``ValueError`` when a length leaves no room for filler."""
    intro = _token_ids(tokenizer, RETRIEVAL_INTRO, special=True)
    sentences = [_token_ids(tokenizer, " " + s) for s in RETRIEVAL_FILLER]
    cases = []
    for length in lengths:
        for depth in depths:
            key = retrieval_key(seed, length, depth)
            needle = _token_ids(tokenizer, RETRIEVAL_NEEDLE.format(key=key))
            question, answer = _split_answer(tokenizer, RETRIEVAL_QUESTION, key)
            n_filler = length - len(intro) - len(needle) - len(question)
            if n_filler < 1:
                raise ValueError(f"retrieval length {length}: too short, the prompt without filler takes "
                                 f"{length - n_filler} tokens")
            # Whole sentences, the first cut to the length: every place the needle can go (0 and
            # each sentence's end) is a sentence boundary.
            filler, ends = [], []
            for i in itertools.count():
                if len(filler) >= n_filler:
                    break
                filler += sentences[i % len(sentences)]
                ends.append(len(filler))
            cut = len(filler) - n_filler
            filler = filler[cut:]
            bounds = [0] + [e - cut for e in ends if e > cut]
            before = min(bounds, key=lambda b: (abs(b - depth * n_filler), b))
            prompt = intro + filler[:before] + needle + filler[before:] + question
            cases.append(RetrievalCase(length=length, depth=depth, key=key, prompt=tuple(prompt), answer=tuple(answer),
                                       needle_start=len(intro) + before, needle_len=len(needle), filler_len=n_filler,
                                       filler_before=before))
    return cases


def retrieve(model, cases: list[RetrievalCase], xq: XQuantConfig, max_batch_tokens: int = 16384,
             stop_early: bool = True, progress: bool = False) -> list[list[int]]:
    """Greedy answers (token ids) of ``cases`` under decode conditions: cases of one length are run
    as a batch (at most ``max_batch_tokens`` prompt tokens) through one :class:`XQuantCache`; all
    but the prompt's last token are prefilled, then that token and each answer token so far are fed
    alone, so every answer token, the first included, is predicted by a decode step that reads the
    prompt from the quantized cache. Up to ``len(case.answer)`` tokens per case; with
    ``stop_early`` a batch stops once every case in it has left its answer (fewer tokens then)."""
    arg = cache_argument(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    batches = []
    for length, group in itertools.groupby(range(len(cases)), key=lambda i: cases[i].length):
        group = list(group)
        size = max(1, max_batch_tokens // length)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    answers: list[list[int]] = [[] for _ in cases]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"{xq.name} retrieval", leave=False)
    with torch.no_grad():
        for batch in batches:
            if any(len(cases[i].prompt) != cases[batch[0]].length for i in batch):
                raise ValueError("a retrieval batch must hold prompts of one length")
            prompts = torch.tensor([cases[i].prompt for i in batch], device=model.device)
            steps = max(len(cases[i].answer) for i in batch)
            cache = XQuantCache(model.config, xq, max_batch_size=len(batch),
                                max_cache_len=prompts.shape[1] + steps - 1)
            if prompts.shape[1] > 1:
                model(prompts[:, :-1], **keep, **{arg: cache})
            token = prompts[:, -1:]
            alive = [True] * len(batch)
            for step in range(steps):
                token = model(token, **{arg: cache}).logits[:, -1].argmax(-1, keepdim=True)
                for row, i in enumerate(batch):
                    answers[i].append(int(token[row]))
                    want = cases[i].answer
                    alive[row] = alive[row] and step < len(want) and answers[i][step] == want[step]
                if stop_early and not any(alive):
                    break
    return answers


def retrieval_hits(cases: list[RetrievalCase], answers: list[list[int]]) -> list[bool]:
    """Whether each greedy answer starts with its case's key tokens."""
    return [list(answer[: len(case.answer)]) == list(case.answer) for case, answer in zip(cases, answers)]


def retrieval(model, cases: list[RetrievalCase], xq: XQuantConfig, progress: bool = False) -> list[bool]:
    """Hits of ``cases`` under ``xq`` (:func:`retrieve`)."""
    return retrieval_hits(cases, retrieve(model, cases, xq, progress=progress))


def evaluate(
    model,
    tokenizer,
    presets=XQuantConfig.PRESETS,
    text: str | None = None,
    segments: int = 8,
    segment_len: int = 640,
    prefill: int = 128,
    depths=RETRIEVAL_DEPTHS,
    lengths=RETRIEVAL_LENGTHS,
    progress: bool = True,
    retrieval_seed: int = 0,
) -> list[EvalRow]:
    """One row per preset (``fp16`` first: the reference for Δppl and agreement). Retrieval runs
    the ``lengths x depths`` pass-key cases of :func:`retrieval_cases` (none when either is empty)."""
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
    depths, lengths = tuple(depths or ()), tuple(lengths or ())
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths {list(depths)}: fractions of the filler, in [0, 1]")
    if any(not isinstance(n, int) or n < 2 for n in lengths):
        raise ValueError(f"lengths {list(lengths)}: prompt lengths, ints of at least 2 tokens")
    # Built before any config runs: a length too short, or too long for the model, fails now.
    cases = retrieval_cases(tokenizer, lengths, depths, retrieval_seed) if depths and lengths else []
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if cases and limit and max(c.length + len(c.answer) for c in cases) > limit:
        raise ValueError(f"lengths {list(lengths)}: the model takes at most {limit} positions "
                         "(max_position_embeddings), a prompt and its answer together")
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
        start = time.perf_counter()
        hits = retrieval(model, cases, xq, progress) if cases else []
        logger.info("%s: retrieval %d/%d in %.0f s", xq.name, sum(hits), len(hits), time.perf_counter() - start)
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
