"""``python -m xquant_fx demo``: the real SmolLM2 answers a question about a text, with the bf16/fp32
cache and with a quantized preset; prints both answers, speed and cache memory."""

from __future__ import annotations

import argparse
import ast
import codecs
import importlib.util
import time
from pathlib import Path

import torch
from tabulate import tabulate

from . import smollm2
from .api import cache_argument
from .cache import XQuantCache



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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="xquant-1.38", help="quantized preset to compare (default xquant-1.38)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--context-tokens", type=int, default=8192,
                        help="cache length for the 'memory at N tokens' column (default 8192)")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer = smollm2.load(dtype, device)
    ids = smollm2.chat_ids(tokenizer, args.question).to(device)
    length = ids.shape[1] + args.max_new_tokens
    rows, answers = [], {}
    for preset in ("fp16", args.preset):
        cache = XQuantCache(model.config, preset, max_cache_len=length, device=device, dtype=dtype)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             **{cache_argument(model): cache})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        answers[preset] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        here = cache.memory_report()
        far = XQuantCache(model.config, preset, max_cache_len=args.context_tokens).memory_report(dtype)
        name = "full precision" if preset == "fp16" else preset
        rows.append([name, f"{new / seconds:.1f}", f"{here['bytes'] / 2**20:.2f}",
                     f"{far['bytes'] / 2**20:.1f}", f"{far['code_bits']:.3f}", f"{far['stored_bits']:.2f}"])
    print(f"SmolLM2-135M-Instruct on {device} ({str(dtype).removeprefix('torch.')}), prompt {ids.shape[1]} tokens\n")
    for preset, text in answers.items():
        print(f"--- {'full precision' if preset == 'fp16' else preset} ---\n{text}\n")
    headers = ["cache", "tokens/s", f"MiB ({length} tok)", f"MiB ({args.context_tokens} tok)", "code bits", "stored bits"]
    print(tabulate(rows, headers=headers))
    return 0
