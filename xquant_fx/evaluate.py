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
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .api import cache_argument
from .cache import XQuantCache
from .config import XQuantConfig

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
    config: str
    code_bits: float
    stored_bits: float
    ppl: float
    delta_ppl_pct: float
    agreement: float
    retrieval: str
    scored_tokens: int


def _as_config(preset) -> XQuantConfig:
    return XQuantConfig.preset(preset) if isinstance(preset, str) else preset


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
    if configs[0].name != "fp16":
        configs.insert(0, XQuantConfig.preset("fp16"))
    ids = tokenizer(text or default_corpus(), return_tensors="pt").input_ids[0]
    need = segments * segment_len
    if ids.numel() < need:
        raise ValueError(f"the corpus has {ids.numel()} tokens; {segments} x {segment_len} = {need} are needed")
    batch = ids[:need].view(segments, segment_len).to(model.device)
    rows, ref_top1, ref_ppl = [], None, None
    for xq in configs:
        nll, top1 = decode_nll(model, batch, xq, prefill, progress)
        ppl = math.exp(nll.double().mean().item())
        ref_top1 = top1 if ref_top1 is None else ref_top1
        ref_ppl = ppl if ref_ppl is None else ref_ppl
        hits = retrieval(model, tokenizer, xq, depths, n_filler) if depths else []
        report = XQuantCache(model.config, xq, max_cache_len=segment_len).memory_report(model.dtype)
        long_report = XQuantCache(model.config, xq, max_cache_len=8192).memory_report(torch.bfloat16)
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


def save(rows: list[EvalRow], out_dir: Path, meta: str) -> list[Path]:
    """``eval.csv``, ``eval.md`` and (with matplotlib) ``eval.png``: quality vs stored bits."""
    import csv

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
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r.stored_bits, r.ppl)
        ax.annotate(r.config, (r.stored_bits, r.ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("stored bits per cached value (bf16, 8k tokens)")
    ax.set_ylabel("decode-condition perplexity")
    ax.set_title(meta, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "eval.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
