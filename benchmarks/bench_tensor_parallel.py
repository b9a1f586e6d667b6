"""Tensor-parallel generation with the quantized KV cache: parity, per-rank memory, decode speed.

    torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py --out benchmarks/results

A model too large for one GPU is loaded with transformers' own tensor parallelism
(``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))``, the same as
``tp_plan="auto"``) and given to ``xquant_fx.optimize`` unchanged: each rank's cache holds its share
of the KV heads, quantized locally, with no communication of its own (only the model's all-reduces).
``examples/tensor_parallel.py`` shows that use alone; this script is the measurement.

The script checks that claim and measures it, on random weights created here (nothing is
downloaded; rank 0 initialises each model on its device, saves it to a temporary directory, and
every rank loads it back tensor-parallel), in this order:

1. **Heads that do not divide**: a SmolLM2-135M-shaped model (3 KV heads) loaded over 2 ranks must
   make ``optimize`` raise ``ValueError`` naming the head count and world size, with nothing
   allocated; the message is recorded. (Skipped when the world size divides 3.)
2. **Parity** (float32, a small Llama whose logits are far from ties: a large
   ``initializer_range``): greedy tokens of the tensor-parallel optimized model equal those of the
   same model optimized on one device (rank 0). The single-device run's smallest top-1/top-2 logit
   gap and the largest logit difference between the two runs are reported, so a mismatch can be
   told from a near-tie.
3. **Memory**: each rank's cache (``cache.allocated_bytes()``, the tensors really allocated) is
   exactly 1/N of the single-device cache of the same size, for the parity and the speed model.
4. **Speed** (bfloat16, Llama-3.1-8B layer shapes with ``--bench-layers`` of its 32 layers, so
   that creating, saving and compiling stay within a few minutes): decode tokens/s of the
   tensor-parallel and the single-device optimized model, both with preallocated caches, measured
   as in ``benchmarks/bench_e2e.py`` (a ``--new``-token generate minus a 1-token generate).

The decode step is compiled as ``optimize`` does by default (the ``xquant`` backend, CUDA graphs on
GPU). If compiling fails, the error is recorded and that model runs eager; every row states the
mode it ran in (``--compile off`` or ``--mode default`` choose otherwise). Results (GPU, date,
versions) go to ``OUT/tensor_parallel.md``, ``.csv`` and ``.json``; the exit status is 0 only when
parity, memory and the heads check hold. transformers' tensor parallelism needs ``accelerate``.

On CPU (gloo) the same code runs, small: ``torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py
--device cpu --bench-config parity --batch 2 --context 64 --new 8 --out /tmp/tp`` (speed numbers
there mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import xquant_fx  # noqa: E402
from xquant_fx.memory import load_config, with_layers  # noqa: E402

STEM = "tensor_parallel"


# ---------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks" / "results")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--preset", default="xquant-1.38")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the decode step: auto = optimize's default (on for CUDA, off for CPU)")
    p.add_argument("--mode", default=None,
                   help="torch.compile mode given to optimize (default: its own, reduce-overhead on CUDA)")
    p.add_argument("--parity-batch", type=int, default=2)
    p.add_argument("--parity-prompt", type=int, default=200, help="prompt tokens (past the 128-token window)")
    p.add_argument("--parity-new", type=int, default=100)
    p.add_argument("--bench-config", default="llama-3.1-8b",
                   help="bundled config name or config.json for the speed run; 'parity' = the parity model's shape")
    p.add_argument("--bench-layers", type=int, default=8, help="layers of --bench-config to keep (0 = all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the fastest counts")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a fresh temp dir)")
    return p.parse_args(argv)


class Run:
    """Process-group facts and small collective helpers (all of it plain torch.distributed)."""

    def __init__(self, device_arg: str):
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            sys.exit("launch with torchrun on at least 2 processes: "
                     "torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py")
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
        if use_cuda:
            if torch.cuda.device_count() < self.world:
                sys.exit(f"{self.world} processes need {self.world} GPUs, found {torch.cuda.device_count()}")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        # The process group is ours to create (transformers reuses an initialized one); a long timeout
        # because rank 0 alone runs the single-device model while the others wait.
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=self.device if use_cuda else None,
        )

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_rank0(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, *msg) -> None:
        if self.rank == 0:
            print("[tensor_parallel]", *msg, flush=True)


# ---------------------------------------------------------------------------------------- models
def parity_config() -> LlamaConfig:
    """A small Llama with decisive logits, created on CPU with seed 0 (the same weights everywhere).

    Random models make near-ties: at initializer_range 0.1 the smallest top-1/top-2 gap over the
    200 greedy decisions was 5e-5, within 3x of the 1.9e-5 logit difference between a
    tensor-parallel and a single-device run (CPU). At 0.3 (logits of standard deviation ~7) it is
    0.0175 against 1.1e-4. Both numbers are measured and reported on every run."""
    return LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def bench_config(name: str, layers: int):
    if name == "parity":
        return parity_config()
    config = with_layers(load_config(name), layers)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    return config


def heads_config() -> LlamaConfig:
    """SmolLM2-135M's attention shape (9 query / 3 KV heads, head_dim 64), two small layers."""
    return LlamaConfig(
        vocab_size=256, hidden_size=576, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def save_random_model(config, path: Path, dtype, device, seed: int) -> None:
    """Initialise on ``device`` (a GPU initialises billions of parameters in moments) and save."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_tensor_parallel(path: Path, dtype):
    """transformers' own tensor parallelism over the whole world, with the model's predefined plan."""
    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers before DistributedConfig: the standalone argument
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, tp_plan="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto")
        )
    return model.eval()


def load_single(path: Path, dtype, device):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


# ---------------------------------------------------------------------------------------- generation
def optimized(model, args, **kwargs):
    """``xquant_fx.optimize`` with this run's options, after clearing what an earlier model compiled.

    Each model compiles alone: Dynamo keys its caches on the code object, so without the reset the
    second model (other cache shapes: half the heads) would recompile with those sizes marked
    dynamic, which is not what a user of either model gets.
    """
    torch._dynamo.reset()
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    model = xquant_fx.optimize(model, args.preset, compile=compile, mode=args.mode, **kwargs)
    if compile is False:
        # optimize(compile=False) leaves generate's compile config alone, and on CUDA transformers
        # auto-compiles any compileable cache with its default config: turn that off as well.
        model.generation_config.disable_compile = True
    return model


def release(run: "Run") -> None:
    gc.collect()  # optimize's generate closes over its model: free the cycle now
    if run.cuda:
        torch.cuda.empty_cache()


def mode_name(model, label: str = "", notes: dict | None = None) -> str:
    cfg = model.generation_config
    if cfg.disable_compile:
        return "eager (compiling failed)" if label in (notes or {}).get("compile_errors", {}) else "eager"
    cc = cfg.compile_config
    if cc is None:  # what generate does without a compile config: compile on CUDA only
        return "compiled (transformers' default)" if model.device.type == "cuda" else "eager"
    mode = cc.mode or (getattr(cc, "options", None) or {}).get("mode") or "default"
    return f"compiled ({cc.backend}, {mode})"


def cache_of(output):
    cache = getattr(output, "past_key_values", None)
    return cache if cache is not None else getattr(output, "cache", None)


def generate(run: Run, model, ids, new: int, **kwargs):
    run.sync()
    start = time.perf_counter()
    out = model.generate(
        ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True, **kwargs
    )
    run.sync()
    return out, time.perf_counter() - start


def first_generate(run: Run, model, label: str, ids, new: int, notes: dict, **kwargs):
    """The first call compiles the decode step; if that fails, record why and run eager."""
    try:
        return generate(run, model, ids, new, **kwargs)
    except Exception as err:  # noqa: BLE001 - any compile failure is reported, not hidden
        if mode_name(model).startswith("eager"):
            raise
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        notes.setdefault("compile_errors", {})[label] = text[:2000]
        run.log(f"{label}: compiling the decode step failed, running eager: {text.splitlines()[0][:300]}")
        model.generation_config.disable_compile = True
        return generate(run, model, ids, new, **kwargs)


def fused_attention_hits() -> int:
    """Attention sites the xquant backend fused so far (``counters["xquant"]``, per pass)."""
    return int(torch._dynamo.utils.counters["xquant"].get("fuse_kv_attention", 0))


def cudagraph_skips() -> int:
    """Graphs Inductor compiled but left out of CUDA graphs (``TORCH_LOGS=cudagraphs`` says why)."""
    return int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0))


def compare_logits(single: torch.Tensor, tp: torch.Tensor, prompt: int, single_tokens, tp_tokens) -> dict:
    """Greedy agreement of two runs, given their logits ``[steps, batch, vocab]`` and sequences.

    ``margin``: the single-device run's smallest top-1/top-2 gap; ``max_diff``: the largest logit
    difference between the runs over the steps whose prefixes still agree (their noise floor);
    ``first_mismatch``: the first generated step where some sequence differs (None if none), with
    the single-device gap there. A mismatch whose gap is below ``max_diff`` is a near-tie.
    """
    top = single.float().topk(2, dim=-1).values
    gaps = top[..., 0] - top[..., 1]  # [steps, batch]
    a, b = torch.tensor(single_tokens)[:, prompt:], torch.tensor(tp_tokens)[:, prompt:]
    differs = (a != b).any(dim=0).nonzero()
    first = int(differs[0]) if len(differs) else None
    upto = a.shape[1] if first is None else first + 1
    return dict(
        margin=gaps.min().item(),
        max_diff=(single[:upto].float() - tp[:upto].float()).abs().max().item(),
        first_mismatch=first,
        margin_at_mismatch=None if first is None else gaps[first].min().item(),
    )


def compile_facts(mode: str, hits: int, skips: int) -> dict:
    """What the compile did since ``hits``/``skips`` were read ('' for an eager model)."""
    if not mode.startswith("compiled"):
        return dict(fused=None, cudagraph_skips=None)
    return dict(fused=fused_attention_hits() - hits, cudagraph_skips=cudagraph_skips() - skips)


# ---------------------------------------------------------------------------------------- phases
def phase_parity(run: Run, args, path: Path, notes: dict) -> dict:
    cfg = parity_config()
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (args.parity_batch, args.parity_prompt), generator=g).to(run.device)
    model = optimized(load_tensor_parallel(path, torch.float32), args)
    hits, skips = fused_attention_hits(), cudagraph_skips()
    out, _ = first_generate(run, model, "parity, tensor-parallel", ids, args.parity_new, notes, output_logits=True)
    tp_logits = torch.stack(out.logits).cpu()  # the full vocabulary on every rank (lm_head gathers it)
    cache = cache_of(out)
    mode = mode_name(model, "parity, tensor-parallel", notes)
    tp = dict(tokens=out.sequences.cpu(), bytes=cache.allocated_bytes(), report=cache.memory_report(),
              tp_size=cache.tp_size, mode=mode, **compile_facts(mode, hits, skips))
    ranks = run.gather({k: v for k, v in tp.items() if k != "tokens"} | {"tokens": tp["tokens"].tolist()})
    del model, cache, out
    release(run)
    single = None
    if run.rank == 0:
        model = optimized(load_single(path, torch.float32, run.device), args)
        hits, skips = fused_attention_hits(), cudagraph_skips()
        out, _ = first_generate(run, model, "parity, single device", ids, args.parity_new, notes, output_logits=True)
        cache = cache_of(out)
        mode = mode_name(model, "parity, single device", notes)
        single = dict(tokens=out.sequences.cpu().tolist(), bytes=cache.allocated_bytes(), report=cache.memory_report(),
                      mode=mode, **compile_facts(mode, hits, skips))
        single["logits"] = compare_logits(torch.stack(out.logits).cpu(), tp_logits, args.parity_prompt,
                                          single["tokens"], ranks[0]["tokens"])
        del model, cache, out
        release(run)
    run.barrier()
    return dict(ranks=ranks, single=single)


def phase_bench(run: Run, args, path: Path, config, dtype, notes: dict) -> dict:
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=g).to(run.device)
    length = args.context + args.new

    def measure(model, label):
        model = optimized(model, args, max_cache_len=length, max_batch_size=args.batch)
        hits, skips = fused_attention_hits(), cudagraph_skips()
        start = time.perf_counter()
        first_generate(run, model, label, ids, args.new, notes)  # compiles and records CUDA graphs
        warm = time.perf_counter() - start
        totals, prefills = [], []
        for _ in range(args.repeats):
            _, t1 = generate(run, model, ids, 1)
            if run.cuda:
                torch.cuda.reset_peak_memory_stats()
            out, tn = generate(run, model, ids, args.new)
            prefills.append(t1)
            totals.append(tn)
        decode = max(min(totals) - min(prefills), 1e-9)
        cache = cache_of(out)
        mode = mode_name(model, label, notes)
        row = dict(
            mode=mode, dtype=str(dtype), warmup_s=round(warm, 1), **compile_facts(mode, hits, skips),
            bytes=cache.allocated_bytes(), report=cache.memory_report(),
            ms_per_step=1e3 * decode / (args.new - 1), tokens_per_s=args.batch * (args.new - 1) / decode,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if run.cuda else float("nan"),
        )
        del cache, out, model
        release(run)
        return row

    tp = measure(load_tensor_parallel(path, dtype), "speed, tensor-parallel")
    ranks = run.gather(tp)
    single = measure(load_single(path, dtype, run.device), "speed, single device") if run.rank == 0 else None
    run.barrier()
    return dict(ranks=ranks, single=single)


def phase_heads(run: Run, args, path: Path) -> dict:
    """``raised``: True / False for optimize, None when transformers itself refused to load the model."""
    try:
        model = load_tensor_parallel(path, torch.float32)
    except Exception as err:  # noqa: BLE001 - recorded: then there is nothing for optimize to refuse
        return dict(raised=None, allocated_during=0,
                    message=f"transformers refused to load it first: {type(err).__name__}: {err}")
    allocated = torch.cuda.memory_allocated() if run.cuda else 0
    try:
        optimized(model, args)
    except ValueError as err:
        result = dict(raised=True, message=str(err))
    else:
        result = dict(raised=False, message="optimize accepted a model whose KV heads do not divide across the ranks")
    result["allocated_during"] = (torch.cuda.memory_allocated() - allocated) if run.cuda else 0
    del model
    release(run)
    return result


# ---------------------------------------------------------------------------------------- report
def write_results(run: Run, args, results: dict, checks: dict, notes: dict, started: float) -> None:
    gpu = torch.cuda.get_device_name(run.device) if run.cuda else "CPU (gloo)"
    triton = importlib.util.find_spec("triton") and __import__("triton").__version__
    meta = dict(
        device=f"{run.world} x {gpu}", date=str(datetime.date.today()), torch=torch.__version__,
        transformers=transformers.__version__, triton=triton or "none", preset=args.preset,
        wall_s=round(time.perf_counter() - started, 1),
    )
    rows = []
    for phase, key in (("parity", "parity"), ("speed", "bench")):
        res = results.get(key)
        if not res:
            continue
        s = res["single"]
        for name, r in [("single device", s)] + [(f"TP rank {i}/{run.world}", r) for i, r in enumerate(res["ranks"])]:
            speed = phase == "speed"
            rows.append(dict(
                phase=phase, setup=name, dtype="float32" if not speed else str(r["dtype"]).removeprefix("torch."),
                mode=r["mode"],
                batch=args.batch if speed else args.parity_batch,
                context=args.context if speed else args.parity_prompt,
                new=args.new if speed else args.parity_new,
                greedy_equal="" if speed or r is s else r["tokens"] == s["tokens"],
                cache_bytes=r["bytes"], vs_single=round(r["bytes"] / s["bytes"], 4),
                bf16_cache_bytes=r["report"]["bf16_bytes"],
                tokens_per_s=round(r["tokens_per_s"], 1) if speed else "",
                ms_per_step=round(r["ms_per_step"], 2) if speed else "",
                warmup_s=r["warmup_s"] if speed else "",
                peak_gib=round(r["peak_gib"], 2) if speed and run.cuda else "",
                fused_attention="" if r["fused"] is None else r["fused"],
                cudagraph_skips="" if r["cudagraph_skips"] is None else r["cudagraph_skips"],
            ))
    par, ben = results.get("parity"), results.get("bench")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{STEM}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["phase"])
        writer.writeheader()
        writer.writerows(rows)
    (args.out / f"{STEM}.json").write_text(json.dumps(dict(meta=meta, checks=checks, notes=notes, results=results,
                                                           args={k: str(v) for k, v in vars(args).items()}), indent=1))
    md = [
        f"# Tensor-parallel generation with `{args.preset}`: {meta['device']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}; random weights; "
        f"`torchrun --nproc-per-node {run.world} benchmarks/bench_tensor_parallel.py {' '.join(sys.argv[1:])}` "
        f"({meta['wall_s']} s in all, model creation and compilation included).",
        "",
        "Checks: " + ", ".join(f"{k} **{'pass' if v else 'FAIL'}**" for k, v in checks.items()),
        "",
    ]
    if par:
        lg = par["single"]["logits"]
        md += [
            f"Parity model: Llama, {parity_config().num_hidden_layers} layers, 8 query / 4 KV heads, head_dim 64, "
            f"vocabulary {parity_config().vocab_size}, initializer_range {parity_config().initializer_range}, float32. "
            f"Smallest top-1/top-2 logit gap of the single-device run: {lg['margin']:.3g}; largest logit difference "
            f"between the tensor-parallel and single-device runs while their tokens agree: {lg['max_diff']:.3g}"
            + ("." if lg["first_mismatch"] is None else
               f"; first differing step {lg['first_mismatch']}, where the single-device gap is "
               f"{lg['margin_at_mismatch']:.3g}"
               + (" (a near-tie)." if lg["margin_at_mismatch"] <= lg["max_diff"] else ".")),
        ]
    if ben:
        cfg = bench_config(args.bench_config, args.bench_layers)
        md += [
            f"Speed model: `{args.bench_config}` shapes, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, "
            f"{ben['single']['dtype'].removeprefix('torch.')}; decode tokens/s = "
            f"batch x (new - 1) / (time of a {args.new}-token generate - time of a 1-token generate), fastest of "
            f"{args.repeats}.",
        ]
    md += [
        "",
        "`cache_bytes`: `cache.allocated_bytes()` of that rank's `XQuantCache` (the tensors really allocated); "
        "`bf16_cache_bytes`: a bf16 cache of the same capacity on that rank; `warmup_s`: the first generate "
        "(compilation, CUDA graph recording); `fused_attention`: attention sites the `xquant` backend fused "
        "(one per layer and compiled graph); `cudagraph_skips`: compiled graphs left out of CUDA graphs "
        "(`TORCH_LOGS=cudagraphs` says why).",
    ]
    md += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] if rows else []
    md += ["| " + " | ".join(str(r[k]) for k in rows[0]) + " |" for r in rows]
    heads = results.get("heads")
    if heads:
        md += ["", "KV heads that do not divide (SmolLM2-135M shape, 3 KV heads, over "
               f"{run.world} ranks): "
               + {True: "`optimize` raised", False: "`optimize` did NOT raise", None: "not tested"}[heads["raised"]]
               + ":", "",
               f"> {heads['message']}"]
    for label, text in notes.get("compile_errors", {}).items():
        md += ["", f"Compiling the decode step failed for **{label}** (that model ran eager):", "", "```", text, "```"]
    (args.out / f"{STEM}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def evaluate(results: dict) -> dict:
    checks = {}
    par = results.get("parity")
    if par:
        s = par["single"]
        checks["greedy tokens equal"] = all(r["tokens"] == s["tokens"] for r in par["ranks"])
        checks["parity cache = 1/N per rank"] = all(r["bytes"] * len(par["ranks"]) == s["bytes"] for r in par["ranks"])
    ben = results.get("bench")
    if ben:
        s = ben["single"]
        checks["speed cache = 1/N per rank"] = all(r["bytes"] * len(ben["ranks"]) == s["bytes"] for r in ben["ranks"])
    heads = results.get("heads")
    if heads and heads["raised"] is not None:
        checks["uneven heads refused"] = all(h["raised"] and h["allocated_during"] == 0 for h in heads["ranks"])
    return checks


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if importlib.util.find_spec("accelerate") is None:
        sys.exit("transformers' tensor parallelism (from_pretrained with tp_plan) needs the `accelerate` package: "
                 "pip install accelerate")
    run = Run(args.device)
    dtype = torch.bfloat16 if run.cuda else torch.float32
    workdir = None
    if run.rank == 0:
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xquant_tp_"))
    workdir = Path(run.from_rank0(str(workdir)))
    notes: dict = {}
    results: dict = {}
    try:
        ok = run_phases(run, args, workdir, dtype, notes, results, started)
    except BaseException:
        # No collective here: torchrun stops the other ranks when this one exits with an error.
        if run.rank == 0 and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    run.barrier()
    if run.rank == 0 and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if run.cuda:
        # NCCL communicators used inside captured CUDA graphs can block destroy_process_group at exit
        # (seen on 2 x H200, torch 2.11): every result is written and every rank passed the barrier.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)
    dist.destroy_process_group()
    return 0 if ok else 1


def run_phases(run: Run, args, workdir: Path, dtype, notes: dict, results: dict, started: float) -> bool:
    """The phases of the module docstring; True on every rank when all checks hold."""
    paths = dict(parity=workdir / "parity", heads=workdir / "heads", bench=workdir / "bench")
    if run.rank == 0:
        run.log(f"world {run.world}, {run.device.type}; creating random checkpoints in {workdir}")
        cpu = torch.device("cpu")  # small: the same weights on every machine
        save_random_model(parity_config(), paths["parity"], torch.float32, cpu, seed=0)
        save_random_model(heads_config(), paths["heads"], torch.float32, cpu, seed=0)
        if not args.skip_bench:
            bench = bench_config(args.bench_config, args.bench_layers)
            save_random_model(bench, paths["bench"], dtype, run.device, seed=0)
    run.barrier()

    if heads_config().num_key_value_heads % run.world:
        run.log("heads check: 3 KV heads over", run.world, "ranks")
        heads = phase_heads(run, args, paths["heads"])
        results["heads"] = dict(ranks=run.gather(heads), raised=heads["raised"], message=heads["message"])

    run.log("parity (float32)")
    results["parity"] = phase_parity(run, args, paths["parity"], notes)

    if not args.skip_bench:
        run.log(f"speed ({dtype}, {args.bench_config}, batch {args.batch}, context {args.context}, new {args.new})")
        results["bench"] = phase_bench(run, args, paths["bench"],
                                       bench_config(args.bench_config, args.bench_layers), dtype, notes)
    checks = evaluate(results) if run.rank == 0 else {}
    notes_all = run.gather(notes)
    if run.rank == 0:
        for other in notes_all[1:]:
            for label, text in other.get("compile_errors", {}).items():
                notes.setdefault("compile_errors", {}).setdefault(label, text)
        write_results(run, args, results, checks, notes, started)
    return run.from_rank0(all(checks.values()) if run.rank == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
