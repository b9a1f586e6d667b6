"""``python -m xquant_fx demo``: the real SmolLM2-135M-Instruct answers one question about a text
with a full-precision cache, with ``kivi-2`` and with an XQuant preset; prints the answers side by
side, how closely each quantized cache follows the full-precision one, and what each cache costs
per sequence at long context.

Quality is measured on the full-precision answer itself: each quantized cache is fed that answer
token by token (teacher forcing, in the same batch as its own free-running answer, so it costs no
extra decode steps), and the fraction of steps whose greedy next token equals the full-precision
one is its agreement.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import importlib.util
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import smollm2
from ..cache import XQuantCache
from ..config import XQuantConfig
from ..hf import cache_argument, text_config


def zen_of_python() -> str:
    """The Zen of Python from the ROT13 text in Python's own ``this`` module, read without
    importing it (importing prints it)."""
    source = Path(importlib.util.find_spec("this").origin).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s":
            return codecs.decode(node.value.value, "rot13")
    raise RuntimeError("Python's `this` module has no text `s`")


# Long enough (~250 tokens with the chat template) that part of the prompt leaves the
# full-precision window and is read back quantized.
ZEN = zen_of_python()
QUESTION = "Here is a text:\n\n" + ZEN + "\n\nAccording to the text, what is better than complex, and why?"

#: The baselines every demo shows; ``--preset`` adds the one being sold.
REFERENCE, BASELINE = "fp16", "kivi-2"
DEFAULT_PRESET = "xquant-1.38"
DEFAULT_CONTEXTS = (8192, 32768)
#: The bundled config of the model the demo loads: arguments are checked against it before loading.
MODEL_CONFIG = "smollm2-135m"
#: Model size as the real GGUF stores it, for the header line.
MODEL_NAME = "SmolLM2-135M-Instruct"
BAR_WIDTH = 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .memory import spec_arg

    parser.add_argument("--preset", default=DEFAULT_PRESET, type=spec_arg, metavar="SPEC",
                        help=f"quantized preset shown beside {REFERENCE} and {BASELINE} (default {DEFAULT_PRESET}); "
                             "a preset name or PRESET:field=value[,field=value...]")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length in tokens (default 48)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--question", default=QUESTION, help="the user turn (default: a question about the Zen of Python)")
    parser.add_argument("--context-tokens", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), metavar="N",
                        help="sequence lengths of the memory table (default 8192 32768)")


@dataclass(frozen=True)
class Settings:
    """The demo's checked arguments."""

    configs: tuple[XQuantConfig, ...]  # fp16 first
    max_new_tokens: int
    device: torch.device
    question: str
    contexts: tuple[int, ...]


def check_arguments(args: argparse.Namespace) -> Settings:
    """Every argument checked before the model loads (a minute on a small CPU): ``ValueError``
    naming the argument and what it takes."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not args.question.strip():
        raise ValueError("--question is empty")
    contexts = tuple(dict.fromkeys(args.context_tokens))
    if any(n < 1 for n in contexts):
        raise ValueError(f"--context-tokens {' '.join(map(str, args.context_tokens))}: each must be at least 1")
    device = _device(args.device)
    specs = list(dict.fromkeys([REFERENCE, BASELINE, args.preset]))
    configs = tuple(XQuantConfig.from_spec(spec) for spec in specs)
    for xq in configs:
        if xq.prunes_experts:
            raise ValueError(f"--preset {xq.name!r} sets MoE options (moe_*): {MODEL_NAME} is a dense model")
    # The preset against the real model's shape (depth, head_dim) from the bundled config: a group
    # wider than a head or a share start past the last layer fails here, not after loading.
    from ..memory import load_config

    model_config = load_config(MODEL_CONFIG)
    context = model_config.max_position_embeddings
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: {MODEL_NAME}'s context is {context} tokens, "
                         "prompt included")
    for xq in configs:
        try:
            XQuantCache(model_config, xq, max_cache_len=max(contexts)).memory_report()  # sizes every layer
        except ValueError as err:
            raise ValueError(f"--preset {xq.name!r} does not fit {MODEL_NAME}: {err}") from None
    try:
        smollm2.gguf_path()
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"loading the {MODEL_NAME} GGUF file needs the `gguf` package: pip install 'xquant_fx[demo]'")
    return Settings(configs, args.max_new_tokens, device, args.question, contexts)


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: the demo runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text!r}: this torch has no usable CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------------------------- decoding
@dataclass
class Answer:
    config: XQuantConfig
    tokens: list[int]
    steps: int  # decode steps (batch 2), prefill excluded
    seconds: float
    agreement: tuple[int, int] | None = None  # (equal greedy tokens, steps) teacher-forced on the reference


def _stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def decode(model, ids: torch.Tensor, xq: XQuantConfig, max_new_tokens: int, stop: set[int],
           reference: list[int] | None = None) -> Answer:
    """Greedy answer of ``model`` to the prompt ``ids [1, n]`` with an ``xq`` cache.

    A second row in the same batch is fed ``reference`` (the full-precision answer) instead of its
    own tokens, and its greedy prediction at each step is compared with the reference's next token:
    agreement measured on identical inputs, so one early difference does not make every later token
    "wrong". Without a reference the second row repeats the first, so every cache decodes at batch
    2 and the speeds compare.
    """
    cache = XQuantCache(model.config, xq, max_batch_size=2, max_cache_len=ids.shape[1] + max_new_tokens,
                        device=ids.device, dtype=model.dtype)
    arg = cache_argument(model)
    own: list[int] = []
    finished = False
    agree = 0
    forced = len(reference) if reference is not None else 0
    steps = 0
    with torch.no_grad():
        logits = model(ids.expand(2, -1), **{arg: cache}).logits[:, -1]
        start = time.perf_counter()
        for t in range(max_new_tokens):
            pred = logits.argmax(-1).tolist()
            if not finished:
                own.append(pred[0])
                finished = pred[0] in stop
            if t < forced:
                agree += pred[1] == reference[t]
            if t + 1 == max_new_tokens or (finished and t + 1 >= forced):
                break
            # A finished row keeps being fed its last token: its outputs are no longer read.
            other = own[-1] if reference is None else reference[min(t, forced - 1)]
            logits = model(torch.tensor([[own[-1]], [other]], device=ids.device), **{arg: cache}).logits[:, -1]
            steps += 1
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds = time.perf_counter() - start
    return Answer(xq, own, steps, seconds, None if reference is None else (agree, forced))


def _same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------------------- output
def _label(xq: XQuantConfig) -> str:
    return "full precision" if xq.name == REFERENCE else xq.name


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def memory_rows(model_config, configs, contexts) -> tuple[list[list[str]], list[str]]:
    """Rows ``cache, code bits, (stored bits, MiB) per sequence at each length, bar`` with scales,
    zero points and window counted in bf16 (the README's convention, what a GPU stores). Stored
    bits fall with length: the full-precision window is a fixed cost."""
    reports = [[XQuantCache(model_config, xq, max_cache_len=n).memory_report(torch.bfloat16) for n in contexts]
               for xq in configs]
    longest = max(r[-1]["bytes"] for r in reports)
    rows = []
    for xq, per_length in zip(configs, reports):
        name = f"{REFERENCE} (16-bit cache)" if xq.name == REFERENCE else xq.name
        last = per_length[-1]
        bar = "#" * max(1, round(BAR_WIDTH * last["bytes"] / longest))
        ratio = last["bf16_bytes"] / last["bytes"]
        cells = [cell for r in per_length for cell in (f"{r['stored_bits']:.2f}", _mib(r["bytes"]))]
        rows.append([name, _bits(last["code_bits"]), *cells, f"{bar} {ratio:.1f}x" if ratio > 1.001 else bar])
    headers = ["cache", "code bits",
               *(h for n in contexts for h in (f"stored bits @ {_tokens(n)}", f"MiB @ {_tokens(n)}")),
               f"vs 16-bit @ {_tokens(contexts[-1])}"]
    return rows, headers


def _bits(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")  # 16, 2, 1.367: as many digits as the value has


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def report(settings: Settings, model_config, answers: list[Answer], tokenizer, prompt_tokens: int,
           dtype: torch.dtype) -> str:
    from tabulate import tabulate

    device = settings.device
    ref = answers[0]
    window = sorted({a.config.residual_length for a in answers[1:]})
    lines = _wrap(
        f"{MODEL_NAME}, real weights (4-bit Q4_1 GGUF), run in {str(dtype).removeprefix('torch.')} on {device}. "
        f"Prompt {prompt_tokens} tokens: a quantized cache keeps the newest {'/'.join(map(str, window))} tokens in "
        "full precision and reads older ones back from their 1-4 bit codes. 'full precision' is the "
        f"{REFERENCE} preset: the unquantized cache (16 bits per value in bf16/fp16) over the same 4-bit weights."
    ) + [""]
    for a in answers:
        text = tokenizer.decode(a.tokens, skip_special_tokens=True).strip()
        lines += [f"--- {_label(a.config)} ---", *(wrapped for paragraph in text.splitlines()
                                                  for wrapped in (_wrap(paragraph) or [""])), ""]

    quality = []
    for a in answers:
        speed = f"{a.steps / a.seconds:.1f}" if a.steps and a.seconds > 0 else "-"
        if a.agreement is None:
            quality.append([_label(a.config), "reference", "reference", speed])
            continue
        same, steps = a.agreement
        prefix = _same_prefix(a.tokens, ref.tokens)
        identical = "all" if a.tokens == ref.tokens else f"first {prefix} of {len(ref.tokens)}"
        quality.append([_label(a.config), f"{same}/{steps} ({100 * same / max(steps, 1):.0f}%)", identical, speed])
    lines += _wrap("Quality: next-token agreement with full precision (each cache is fed the full-precision "
                   "answer and predicts its next token), and how much of its own answer is the same, token for "
                   "token. Every cache decodes 2 sequences at once (its own answer and the fed one).")
    lines.append(tabulate(quality, headers=["cache", "agreement", "same answer tokens", f"tokens/s ({_where(device)})"]))
    lines.append("")

    rows, headers = memory_rows(model_config, [a.config for a in answers], settings.contexts)
    decoder = text_config(model_config)
    shape = (f"{decoder.num_hidden_layers} layers, {decoder.num_key_value_heads} KV heads x "
             f"{getattr(decoder, 'head_dim', None) or decoder.hidden_size // decoder.num_attention_heads}")
    context = getattr(decoder, "max_position_embeddings", None)
    beyond = [n for n in settings.contexts if context and n > context]
    note = f"; its context is {context:,} tokens, the longer column shows how the cache scales" if beyond else ""
    lines += _wrap(f"KV cache per sequence ({shape}{note}):")
    lines.append(tabulate(rows, headers=headers, disable_numparse=True,
                          colalign=("left", "right", *("right",) * (2 * len(settings.contexts)), "left")))
    if dtype != torch.bfloat16:
        here = XQuantCache(model_config, answers[-1].config, max_cache_len=settings.contexts[0]).memory_report(dtype)
        lines += _wrap(
            f"Stored bits count scales, zero points and the full-precision window in bf16, as the README and a GPU "
            f"do; this {str(dtype).removeprefix('torch.')} run keeps them in {str(dtype).removeprefix('torch.')}, "
            f"so here {answers[-1].config.name} holds {here['stored_bits']:.2f} bits per value "
            f"@ {_tokens(settings.contexts[0])} (code bits are the same)."
        )
    lines.append("")
    if device.type == "cpu":
        lines += _wrap(
            "Speed: on CPU a quantized cache runs its plain-torch reference ops, eager and uncompiled (each "
            "step dequantizes every layer's past), so the tokens/s above say nothing about a GPU. There, "
            "xquant.optimize(model) compiles the decode step with fused Triton kernels (dequantization inside "
            "attention); README 'Performance (H200)' measures it against transformers' bf16 StaticCache."
        )
    else:
        lines += _wrap(
            "Speed: this demo runs the cache's Triton kernels eagerly, one op at a time; xquant.optimize(model) "
            "compiles the decode step with the fused attention kernel (README 'Performance (H200)')."
        )
    return "\n".join(lines)


def _where(device: torch.device) -> str:
    if device.type != "cpu":
        return str(device)
    threads = torch.get_num_threads()
    return f"cpu, {threads} thread{'s' if threads > 1 else ''}"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, 100)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    settings = check_arguments(args)  # before the model loads
    import transformers

    # transformers' weight-loading bar says nothing here (the GGUF reader's own bar, on stderr, shows
    # the load's progress).
    transformers.utils.logging.disable_progress_bar()
    device = settings.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # A decode step of this model is hundreds of small ops; a second intra-op thread only waits
        # for the first. Measured on the 2-core CI machine with other processes running: 0.10 s per
        # full-precision step (batch 2) with one thread, 3.3 s with two. OMP_NUM_THREADS overrides.
        torch.set_num_threads(1)
    _progress(f"loading {MODEL_NAME} ({smollm2.GGUF_NAME}) on {device} ...")
    start = time.perf_counter()
    model, tokenizer = smollm2.load(dtype, device)
    ids = smollm2.chat_ids(tokenizer, settings.question).to(device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and ids.shape[1] + settings.max_new_tokens > context:
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {settings.max_new_tokens} exceed "
                         f"{MODEL_NAME}'s context of {context} tokens")
    _progress(f"loaded in {time.perf_counter() - start:.0f} s; prompt {ids.shape[1]} tokens")
    stop = _stop_ids(model, tokenizer)
    answers: list[Answer] = []
    for xq in settings.configs:
        _progress(f"answering with the {_label(xq)} cache ...")
        reference = answers[0].tokens if answers else None
        answers.append(decode(model, ids, xq, settings.max_new_tokens, stop, reference))
    print(report(settings, model.config, answers, tokenizer, ids.shape[1], dtype))
    return 0
