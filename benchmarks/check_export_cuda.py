"""AOTInductor export on a CUDA machine: packages against ``optimize()`` and the strong bf16 baseline.

A script, not a test. For each model shape (random weights, the same seed in every process):

1. export a package (``xquant_fx.export``, decode + prefill programs) in a background process per
   shape, started first, so that the exports compile while this process compiles the others;
2. here: ``optimize()`` the model (``xquant`` backend, ``reduce-overhead``) and the strong bf16
   baseline (a second copy of the weights, ``benchmarks/bf16_baseline.py``: bf16 ``StaticCache``,
   GQA without expansion, generate's auto-compile with ``reduce-overhead``); greedy tokens of
   both and of the eager ``XQuantCache`` on one prompt;
3. once the exports are done (nothing else compiling or timing on the GPU): decode tokens/s and
   peak memory of ``optimize()`` and the baseline (``generate`` of N tokens minus ``generate`` of
   one, the prefill; peak = ``torch.cuda.max_memory_allocated`` over the timed call, weights
   included);
4. each package in a fresh process (``--package-worker``): load time (``xquant_fx.load``:
   checksums, C++ runtime pre-check, torch's loader), greedy tokens (must equal ``optimize()``'s
   on the same weights and prompt), decode tokens/s, peak memory; a crash there is re-run under
   ``cuda-gdb`` for a backtrace;
5. (CUDA) the C++ runtime clash of issue 20, in child processes *without* ``LD_PRELOAD``: what
   ``xquant_fx.aoti.check_cxx_runtime`` sees and says, and whether an unchecked load crashes.

Start it with the C++ runtime preloaded where torch's package loader needs it (issue 20)::

    LD_PRELOAD=$(readlink -f $(g++ -print-file-name=libstdc++.so.6)) PYTHONUNBUFFERED=1 \\
        python benchmarks/check_export_cuda.py --out DIR [--shapes smollm2-135m llama-3.1-8b] [--layers 8]

Results: ``DIR/export_cuda.md`` and ``export_cuda.json``, rewritten after every phase (a run cut
short keeps what it measured). ``--device cpu --shapes mini`` is a dry run of every path on CPU
(no compile, float32). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

_START = time.perf_counter()


def phase(text: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {text}", flush=True)


# ---------------------------------------------------------------------------- models
def build(shape: str, layers: int | None, device: str, dtype):
    """The shape's model with random weights, seed 0 (the same weights in every process)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from xquant_fx.memory import load_config, with_layers

    if shape == "mini":
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers or 2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)
    else:
        config = with_layers(load_config(shape), layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def weights_digest(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))


def prompt(model, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, model.config.vocab_size, (1, length), generator=g).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def top2_margin(logits: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """The gap between a step's two largest logits and the spacing of ``dtype`` (the model's: the
    logits were rounded to it, whatever ``generate`` upcast them to) at the largest: a gap of a few
    spacings is a near-tie that any rounding difference can flip."""
    top = logits.float().topk(2).values
    exponent = math.frexp(abs(top[0].item()))[1]  # |x| in [2^(e-1), 2^e)
    spacing = torch.finfo(dtype).eps * 2.0 ** (exponent - 1)  # eps: the spacing at 1
    return (top[0] - top[1]).item(), spacing


def _parting(a: list, b: list) -> int:
    """The first step where token lists ``a`` and ``b`` differ (the shorter length if one is a
    prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def first_difference(a: list, b: list, margins: list | None = None) -> str:
    """Where two greedy token lists part, and (``margins``: the eager reference's
    :func:`top2_margin` per step) how close the reference's own choice was there."""
    i = _parting(a, b)
    text = f"first difference at new token {i}: {a[i:i + 4]} vs {b[i:i + 4]}"
    if margins and i < len(margins):
        gap, spacing = margins[i]
        text += (f" (the eager reference's top-2 logit gap at that step: {gap:.4g}, "
                 f"{gap / spacing:.1f} x the logits' dtype spacing there)")
    return text


#: A first difference counts as a tie (not a failure) where the eager reference's top-2 logit gap
#: at that step is at most this many spacings of the model dtype: two paths that round
#: differently (fused kernels, Inductor) can flip such a choice.
TIE_SPACINGS = 1.0


def tokens_agree(a: list, b: list, reference: list, margins: list) -> tuple[bool, str]:
    """Whether greedy token lists ``a`` and ``b`` agree: equal, or equal up to a step where the
    eager ``reference`` (same prefix up to there) had a tie (:data:`TIE_SPACINGS`), after which
    the continuations legitimately part. Returns ``(agree, detail)``."""
    if a == b:
        return True, "equal"
    i = _parting(a, b)
    detail = first_difference(a, b, margins)
    if i < len(margins) and reference[:i] == a[:i] and i < min(len(a), len(b)):
        gap, spacing = margins[i]
        if gap <= TIE_SPACINGS * spacing:
            return True, f"equal up to a tie: {detail}"
    return False, detail


# ---------------------------------------------------------------------------- workers
def export_worker(args) -> int:
    """``--export-worker SHAPE PATH``: export one package, print a JSON line."""
    from xquant_fx.aoti import export, inspect_package

    shape, path = args.export_worker
    dtype = getattr(torch, args.dtype)
    model = build(shape, args.layers, args.device, dtype)
    ids = prompt(model, args.prompt, args.device)
    start = time.perf_counter()
    options = {"cpp.simdlen": 0} if args.device == "cpu" else None
    export(model, ids, path, args.preset, max_cache_len=args.max_cache_len, inductor_configs=options)
    took = time.perf_counter() - start
    info = inspect_package(path)
    meta = info["metadata"]
    print("RESULT " + json.dumps({
        "export_s": round(took, 1), "phases_s": meta["export_timings_s"], "mib": round(os.path.getsize(path) / 2**20),
        "fused": meta["fused_attention"], "quantized_layers": meta["quantized_layers"],
        "decode_kernels": info["models"]["decode"]["xquant_kernels"],
        "kernel_binaries": info["models"]["decode"]["kernel_binaries"], "runtime_ops": meta["runtime_ops"],
        "cxx_runtime": meta.get("cxx_runtime"), "weights_digest": weights_digest(model),
    }), flush=True)
    return 0


def package_worker(args) -> int:
    """``--package-worker PATH``: load the package in this fresh process, generate, time; JSON line."""
    import xquant_fx.aoti as aoti

    path = args.package_worker
    device = args.device
    out: dict = {}
    start = time.perf_counter()
    aoti.verify_package(path)
    out["verify_s"] = round(time.perf_counter() - start, 2)
    if device == "cuda":
        start = time.perf_counter()
        try:
            checked = aoti.check_cxx_runtime(path)
            out["runtime_check"] = checked["verdict"] + (f" ({checked['inconclusive']})"
                                                         if checked.get("inconclusive") else "")
        except aoti.PackageError as err:
            out["runtime_check"] = f"refused: {err}"
        out["runtime_check_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()  # again: a passed trial load is remembered
        try:
            aoti.check_cxx_runtime(path)
        except aoti.PackageError:
            pass
        out["runtime_check_again_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    try:
        lm = aoti.load(path)
    except aoti.PackageError as err:  # the pre-check refused: measure anyway, say so
        out["load_refused"] = str(err)
        lm = aoti.load(path, runtime_check=False)
    sync(device)
    out["load_s"] = round(time.perf_counter() - start, 2)
    ids = torch.tensor(json.loads(args.ids), device=device)
    if device == "cuda":
        out["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    tokens = lm.generate(ids, args.new, eos_token_id=None)
    out["tokens"] = tokens[0, ids.shape[1]:].tolist()
    lm.generate(ids, args.timing_new, eos_token_id=None)  # warm
    times = []
    for _ in range(3):
        lm.generate(ids, args.timing_new, eos_token_id=None)
        t = lm.last_timing
        times.append(t["decode_s"] / t["decode_steps"])
    times.sort()
    out["ms_per_step"] = round(times[1] * 1e3, 3)
    out["tokens_per_s"] = round(ids.shape[0] / times[1], 1)
    out["prefill_ms"] = round(lm.last_timing["prefill_s"] * 1e3, 2)
    if device == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


_RUNTIME_PROBE = r"""
import json, sys, torch
import xquant_fx.aoti as a
path = sys.argv[1]
meta = a.read_metadata(path)
out = {"mapped": a._mapped_cxx_runtimes(), "compiler": a._compiler_cxx_runtime(),
       "recorded": meta.get("cxx_runtime")}
import zipfile
syms = set()
with zipfile.ZipFile(path) as z:
    for n in z.namelist():
        if "/aotinductor/" in n and n.endswith(".so"):
            s, need = a._elf_cxx_imports(z.read(n)); syms |= set(s); out["needed"] = a._dotted(need)
prov = a._symbol_providers(sorted(syms)) or {}
out["symbols"] = len(syms)
out["providers"] = {}
for s, lib in prov.items():
    out["providers"].setdefault(lib, []).append(s)
out["providers"] = {lib: [len(v)] + v[:3] for lib, v in out["providers"].items()}
out["glibcxx"] = {lib: a._dotted(a._glibcxx_of(lib)) for lib in set(out["mapped"] or []) | set(prov.values())}
try:
    checked = a.check_cxx_runtime(path, meta)
    out["verdict"], out["inconclusive"] = checked["verdict"], checked.get("inconclusive")
except a.PackageError as err:
    out["verdict"] = "refused: " + str(err)
print("RESULT " + json.dumps(out), flush=True)
"""

_UNCHECKED_LOAD = r"""
import sys, torch
import xquant_fx.aoti as a
lm = a.load(sys.argv[1], runtime_check=False)
print("RESULT {\"loaded\": true}", flush=True)
"""


def run_child(cmd, env=None, timeout=600) -> tuple[int, dict | None, str]:
    try:
        child = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired as err:
        return -999, None, f"timeout after {timeout} s: {(err.stderr or b'')[-1500:]!r}"
    result = None
    for line in child.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    return child.returncode, result, (child.stderr or "")[-3000:]


def backtrace(cmd, report, name: str) -> None:
    """A crashed child again under cuda-gdb (the image has no gdb), its backtrace into the report."""
    gdb = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt"] + ["--args"] + cmd
    try:
        child = subprocess.run(gdb, capture_output=True, text=True, timeout=240, cwd=str(ROOT))
        text = child.stdout + child.stderr
        frames = [line for line in text.splitlines() if line.startswith("#")]
        report.notes.append(f"{name}: cuda-gdb backtrace (top 12 frames): " + " | ".join(frames[:12]))
    except (OSError, subprocess.TimeoutExpired) as err:
        report.notes.append(f"{name}: no backtrace ({err})")


# ---------------------------------------------------------------------------- in-process paths
def generate_timed(model, ids, new: int, device: str, **kwargs):
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def decode_rate(model, ids, args, cache_kwargs) -> dict:
    """Median of 3 (generate N) - (generate 1) decode times; peak over one timed call."""
    device = args.device
    times = []
    for _ in range(3):
        _, one = generate_timed(model, ids, 1, device, **cache_kwargs())
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, total = generate_timed(model, ids, args.timing_new, device, **cache_kwargs())
        times.append((total - one) / (args.timing_new - 1))
    times.sort()
    row = {"ms_per_step": round(times[1] * 1e3, 3), "tokens_per_s": round(ids.shape[0] / times[1], 1),
           "prefill_ms": round(one * 1e3, 2)}
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


class Shape:
    """One model shape's two in-process paths."""

    def __init__(self, name: str, args):
        import transformers
        from transformers import StaticCache

        import xquant_fx
        from bf16_baseline import use_strong_bf16_attention
        from xquant_fx import XQuantCache
        from xquant_fx.api import cache_argument

        self.name, self.args = name, args
        device, dtype = args.device, getattr(torch, args.dtype)
        compiled = device == "cuda"
        self.rows: dict = {}
        # eager XQuantCache reference (no compile)
        model = build(name, args.layers, device, dtype)
        self.layers = model.config.num_hidden_layers
        self.digest = weights_digest(model)
        self.ids = prompt(model, args.prompt, device)
        cache = XQuantCache(model.config, args.preset, max_batch_size=1, max_cache_len=args.max_cache_len)
        with torch.no_grad():
            ref = model.generate(self.ids, max_new_tokens=args.new, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, **{cache_argument(model): cache})
        self.eager_tokens = ref.sequences[0, args.prompt:].tolist()
        self.eager_margins = [top2_margin(step[0], dtype) for step in ref.scores]
        del cache
        # optimize()
        start = time.perf_counter()
        xquant_fx.optimize(model, args.preset, max_cache_len=args.max_cache_len, max_batch_size=1, compile=compiled)
        out, _ = generate_timed(model, self.ids, args.new, device)
        self.optimize_tokens = out[0, args.prompt:].tolist()
        self.rows["optimize()"] = {"warm-up s (compile)": round(time.perf_counter() - start, 1)}
        self.optimized = model
        # strong bf16 baseline: StaticCache, GQA without expansion, reduce-overhead
        base = build(name, args.layers, device, dtype)
        use_strong_bf16_attention(base)
        arg = cache_argument(base)
        if compiled:
            base.generation_config.compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
        static = StaticCache(config=base.config, max_cache_len=args.max_cache_len)

        def base_cache():  # one cache for every call (as optimize()'s pool): static addresses, one CUDA graph
            static.reset()
            return {arg: static}

        self.base_cache = base_cache
        start = time.perf_counter()
        out, _ = generate_timed(base, self.ids, args.new, device, **self.base_cache())
        self.base_tokens = out[0, args.prompt:].tolist()
        self.rows["strong bf16 baseline"] = {"warm-up s (compile)": round(time.perf_counter() - start, 1)}
        self.base = base

    def time_paths(self) -> None:
        self.rows["optimize()"].update(decode_rate(self.optimized, self.ids, self.args, dict))
        self.rows["strong bf16 baseline"].update(decode_rate(self.base, self.ids, self.args, self.base_cache))

    def release(self) -> None:
        del self.optimized, self.base
        if self.args.device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- report
class Report:
    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        self.env: dict = {}
        self.checks: list[tuple[str, bool, str]] = []
        self.tables: dict[str, list[dict]] = {}
        self.notes: list[str] = []
        self.tokens: dict[str, dict] = {}  # shape -> path -> greedy tokens (JSON only), and the margins
        self.error: str | None = None

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append((name, bool(ok), detail))
        phase(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        self.write()
        return ok

    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"env": self.env, "args": vars(self.args), "checks": self.checks, "tables": self.tables,
                "notes": self.notes, "tokens": self.tokens, "error": self.error, "passed": self.ok()}
        (self.out / "export_cuda.json").write_text(json.dumps(data, indent=1, default=str))
        lines = [f"# AOTInductor export vs optimize() vs strong bf16 ({self.env.get('gpu', '')}, "
                 f"{self.env.get('date', '')})", ""]
        lines += [f"- {k}: {v}" for k, v in self.env.items()]
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in self.checks]
        for title, rows in self.tables.items():
            if not rows:
                continue
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        if self.error:
            lines += ["", "## Error", "", "```", self.error, "```"]
        lines += ["", f"**{'all checks passed' if self.ok() else 'NOT PASSED'}**", ""]
        (self.out / "export_cuda.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------- main
def run(args, report: Report) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--device", args.device, "--dtype", args.dtype, "--preset", args.preset, "--prompt", str(args.prompt),
              "--max-cache-len", str(args.max_cache_len), "--new", str(args.new), "--timing-new", str(args.timing_new),
              "--out", args.out, "--work", args.work] + (["--layers", str(args.layers)] if args.layers else [])
    packages = {} if args.tokens_only else {s: work / f"{s}-{args.preset}-{args.dtype}.pt2" for s in args.shapes}
    phase(f"starting {len(packages)} export processes")
    exports = {s: subprocess.Popen(me + common + ["--export-worker", s, str(p)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
               for s, p in packages.items()}
    shapes = {}
    for s in args.shapes:
        phase(f"{s}: eager reference, optimize() and the strong bf16 baseline (compiling)")
        shapes[s] = Shape(s, args)
        sh = shapes[s]
        report.tokens[s] = {"eager XQuantCache": sh.eager_tokens, "optimize()": sh.optimize_tokens,
                            "strong bf16 baseline": sh.base_tokens, "eager top-2 margins": sh.eager_margins}
        agree, detail = tokens_agree(sh.optimize_tokens, sh.eager_tokens, sh.eager_tokens, sh.eager_margins)
        report.check(f"{s}: optimize() greedy tokens equal the eager XQuantCache's (or part where its top-2 "
                     f"logits tie)", agree, f"reference ops, not the fused kernels: {detail}")
        report.notes.append(f"{s}: strong bf16 baseline vs eager XQuantCache: "
                            + tokens_agree(sh.base_tokens, sh.eager_tokens, sh.eager_tokens, sh.eager_margins)[1])
        report.write()
    export_rows = []
    for s, proc in exports.items():
        phase(f"{s}: waiting for the export")
        try:
            stdout, stderr = proc.communicate(timeout=args.export_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            report.check(f"{s}: export", False, f"exit status {proc.returncode}: {stderr[-1500:]}")
            continue
        sh = shapes[s]
        report.check(f"{s}: the export process built the same weights", abs(result["weights_digest"] - sh.digest)
                     <= 1e-9 * abs(sh.digest), f"digest {result['weights_digest']:.6g} vs {sh.digest:.6g}")
        report.check(f"{s}: fused attention in every quantized layer", result["fused"] == result["quantized_layers"],
                     f"{result['fused']} of {result['quantized_layers']}")
        if args.device == "cuda":
            report.check(f"{s}: the decode program launches the xquant Triton kernels", bool(result["decode_kernels"]),
                         f"{result['decode_kernels']}, {result['kernel_binaries']} kernel binaries")
        export_rows.append({"model": s, "layers": sh.layers, "export s": result["export_s"],
                            "phases s": result["phases_s"], "package MiB": result["mib"],
                            "C++ runtime recorded": (result.get("cxx_runtime") or {}).get("library")})
        report.tables["export"] = export_rows
        report.write()
    if args.tokens_only:
        phase("done (--tokens-only)")
        return
    phase("timing optimize() and the baseline (exports done: nothing else on the GPU)")
    speed = []
    for s, sh in shapes.items():
        sh.time_paths()
        for path, row in sh.rows.items():
            speed.append({"model": s, "layers": sh.layers, "path": path, **row})
        report.tables["decode"] = speed
        report.write()
        sh.release()
    env = dict(os.environ)
    for s, path in packages.items():
        if not path.exists():
            continue
        sh = shapes[s]
        phase(f"{s}: the package in a fresh process")
        cmd = me + common + ["--package-worker", str(path), "--ids", json.dumps(sh.ids.tolist())]
        rc, result, err = run_child(cmd, env)
        if result is None:
            report.check(f"{s}: the package loads and generates in a fresh process", False,
                         f"exit status {rc}: {err[-800:]}")
            if rc < 0 and args.device == "cuda":
                backtrace(cmd, report, f"{s} package worker")
            continue
        same, detail = tokens_agree(result["tokens"], sh.optimize_tokens, sh.eager_tokens, sh.eager_margins)
        report.tokens.setdefault(s, {})["AOTI package"] = result["tokens"]
        report.check(f"{s}: package greedy tokens equal optimize()'s (same weights and prompt; a first "
                     f"difference where the eager reference's top-2 logits tie is reported, not failed)", same,
                     f"{len(sh.optimize_tokens)} new tokens: {detail}; package vs eager XQuantCache: "
                     + tokens_agree(result["tokens"], sh.eager_tokens, sh.eager_tokens, sh.eager_margins)[1])
        if "load_refused" in result:
            report.notes.append(f"{s}: load() refused under this process's environment (measured with "
                                f"runtime_check=False): {result['load_refused']}")
        row = {k: result[k] for k in ("ms_per_step", "tokens_per_s", "prefill_ms", "peak_gib") if k in result}
        row["load() s (after the checks below)"] = result["load_s"]
        row["checksums s"] = result["verify_s"]
        if "runtime_check_s" in result:
            row["C++ runtime check s (first, again)"] = (result["runtime_check_s"], result["runtime_check_again_s"])
            report.notes.append(f"{s}: C++ runtime pre-check in the package process: {result['runtime_check']}")
        speed.append({"model": s, "layers": sh.layers, "path": "AOTI package (fresh process)", **row})
        report.tables["decode"] = speed
        report.write()
    if args.device == "cuda" and packages:
        s, path = next((s, p) for s, p in packages.items() if p.exists())
        plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        phase(f"issue 20: {s} package without LD_PRELOAD (pre-check, then an unchecked load)")
        rc, probe, err = run_child([sys.executable, "-c", _RUNTIME_PROBE, str(path)], plain, timeout=300)
        report.tables["C++ runtime, no LD_PRELOAD"] = [probe or {"error": f"exit status {rc}: {err[-500:]}"}]
        rc2, probe2, err2 = run_child([sys.executable, "-c", _RUNTIME_PROBE, str(path)], env, timeout=300)
        report.tables["C++ runtime, with LD_PRELOAD"] = [probe2 or {"error": f"exit status {rc2}: {err2[-500:]}"}]
        rc3, loaded, err3 = run_child([sys.executable, "-X", "faulthandler", "-c", _UNCHECKED_LOAD, str(path)], plain,
                                      timeout=300)
        crashed = rc3 < 0
        verdict = (probe or {}).get("verdict", "")
        report.notes.append(f"without LD_PRELOAD an unchecked load exits with status {rc3}"
                            + (" (crash)" if crashed else "") + f"; the pre-check said: {verdict[:300]}")
        report.check("issue 20: the pre-check refuses exactly where the unchecked load crashes",
                     crashed == verdict.startswith("refused") and (probe2 or {}).get("verdict") in ("ok", "trial-ok"),
                     f"no LD_PRELOAD: load status {rc3}, pre-check {verdict[:60]!r}; with LD_PRELOAD: pre-check "
                     f"{(probe2 or {}).get('verdict', '')[:60]!r}")
        report.write()
    phase("done")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for export_cuda.md / .json")
    p.add_argument("--work", default="/tmp/xq-export-cuda", help="directory for the packages (large)")
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.1-8b"],
                   help="bundled configs (xquant_fx/configs), or 'mini' for a dry run")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of each shape (0: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--preset", default="xquant-1.38")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (<= the prefill program's 128)")
    p.add_argument("--new", type=int, default=16, help="new tokens compared between the paths")
    p.add_argument("--timing-new", type=int, default=128, help="new tokens per timed generate")
    p.add_argument("--max-cache-len", type=int, default=256)
    p.add_argument("--export-timeout", type=float, default=420)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tokens-only", action="store_true",
                   help="no export, package or timing: the in-process paths' greedy tokens and the eager "
                        "reference's top-2 margins only")
    p.add_argument("--export-worker", nargs=2, metavar=("SHAPE", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--package-worker", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prompt + args.timing_new > args.max_cache_len:
        p.error("--prompt + --timing-new must fit --max-cache-len")
    if args.export_worker:
        return export_worker(args)
    if args.package_worker:
        return package_worker(args)
    report = Report(Path(args.out), args)
    import transformers
    import triton

    report.env = {
        "date": datetime.date.today().isoformat(), "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
        "dtype": args.dtype, "preset": args.preset, "batch": 1, "prompt tokens": args.prompt,
        "max_cache_len": args.max_cache_len, "timed new tokens": args.timing_new,
        "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        report.error = "no CUDA device (--device cpu for a dry run)"
        report.write()
        print(report.error)
        return 2
    try:
        run(args, report)
    except Exception:
        report.error = traceback.format_exc()
        print(report.error, file=sys.stderr)
    report.write()
    print(f"\n{'all checks passed' if report.ok() else 'NOT PASSED'}; report in {report.out / 'export_cuda.md'}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
