"""MoE decode benchmark: activated experts vs time, ours vs transformers' experts.

A script, not a test (random weights: speed only, never quality). Two model shapes from the
bundled configs, ``qwen3-30b-a3b`` (128 experts, top-8) and ``deepseek-v2-lite`` (64 experts,
top-6, 2 shared experts), in bf16 on one GPU.

1. **Check**: our pruned MoE block (the ``xquant`` graph pass + ``xquant::moe_experts``) against
   the model's own block with its router's ``top_k`` set to ``k`` and transformers' eager experts,
   at every batch and ``k``; the largest difference relative to the output's scale is reported
   and the script fails if it exceeds 2e-2.
2. **MoE layer**: one MoE block (router, routed experts, shared experts), decode input
   ``[batch, 1, hidden]``. Every variant is traced by Dynamo (``fullgraph=True``), its FX graph
   run as it is (no Inductor, for anyone; at ``--inductor-batches`` also Inductor-compiled, as
   ``optimize`` runs it) and captured in one CUDA graph: ours at each ``k`` (the
   ``xquant`` passes rewrite the graph), and transformers' ``grouped_mm`` and ``batched_mm``
   experts with the router's ``top_k`` set to ``k`` (transformers' own way to fewer experts). The weight-read floor is the
   bytes of the distinct experts the batch routes to (plus shared experts) over the copy
   bandwidth (4.30 TB/s measured on the H200, benchmarks/NOTES.md).
   Beside each layer row, the **routed experts alone** (part ``experts``): ``xquant::moe_experts``
   and transformers' experts module on the routing the block's router gives at ``k``, no router.
3. **Model decode** (``--model-layers``): one decode step of the whole model (``--model-layers``
   decoder layers of the shape, bf16 ``StaticCache`` of ``--context`` tokens for every variant, so
   only the experts differ), captured in a CUDA graph; tokens/s = batch / step time. As traced
   (no Inductor), or with ``--model-inductor`` compiled as ``optimize`` compiles the decode step
   (minutes per variant: pick ``--model-batches`` and ``--model-ks``).

4. **Kernel breakdown** (``--profile``): at batch 1, k = K and about K/2, the device time of every
   kernel of one Inductor-compiled layer step (ours and transformers' ``grouped_mm``), from
   ``torch.profiler`` over un-graphed calls, beside the CUDA-graph step time: what the step spends
   in kernels, and how much is gaps between them. Written to ``moe_profile.md``.

    python benchmarks/bench_moe.py --out benchmarks/results [--quick] [--profile]

``--ours-only`` leaves transformers' variants out of the layer part, ``--model-impls`` picks
transformers' experts timed in the model part. For A/B runs:
``--slot-blocks-max N`` overrides when the kernel skips its block table (``0``: never),
``--decode-programs N`` how far decode steps split the up projection (``0``: no split-K), and
``--topk-only-router`` keeps the routers' linear and softmax (only their top-k rewritten).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

import xquant_fx  # noqa: E402
from xquant_fx.api import cache_argument  # noqa: E402
from xquant_fx.memory import load_config, with_layers  # noqa: E402
from xquant_fx.moe import MoEPlan, find_moe_layers, install_experts  # noqa: E402
from xquant_fx.passes import PassContext, run_passes  # noqa: E402
from profiling import kernel_times  # noqa: E402

COPY_BW = 4.30e12  # bytes/s, H200 device-to-device copy (benchmarks/NOTES.md)
SHAPES = {"qwen3-30b-a3b": [8, 6, 4, 2, 1], "deepseek-v2-lite": [6, 4, 3, 2, 1]}


def build(name: str, layers: int, device, dtype):
    config = with_layers(load_config(name), layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def graph_time(fn, iters: int) -> float:
    """Seconds per call of ``fn`` captured in one CUDA graph (after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def passes_only(plan: MoEPlan | None):
    """A Dynamo backend that runs our passes and executes the rewritten graph as it is."""

    def backend(gm, inputs):
        run_passes(gm, ctx=PassContext(moe=plan))
        return gm.forward

    return backend


def traced(module, plan: MoEPlan | None = None, inductor: bool = False):
    """``module`` through Dynamo (full graph): transformers' graph as traced, or ours rewritten; with
    ``inductor``, compiled by Inductor (``backend="xquant"`` for ours, with the plan's k)."""
    torch._dynamo.reset()
    if inductor:
        if plan is None:
            return torch.compile(module, backend="inductor", fullgraph=True)
        return torch.compile(module, backend="xquant", fullgraph=True, options={"moe_top_k": plan.spec})
    return torch.compile(module, backend=passes_only(plan) if plan is not None else "eager", fullgraph=True)


def untied(block, x, k: int) -> torch.Tensor:
    """Tokens whose router scores do not tie at the k-th place: where top-k and "top-K then keep k"
    may pick different (equally scored) experts. bf16 router logits (Qwen3-MoE) tie often."""
    with torch.no_grad():
        logits = block.gate(x.view(-1, x.shape[-1]))[0].float()
    top = logits.topk(min(k + 1, logits.shape[-1]), dim=-1).values
    return top[:, k - 1] != top[:, k] if k < logits.shape[-1] else torch.ones_like(top[:, 0], dtype=torch.bool)


def timed(fn, iters: int) -> tuple[float, str]:
    """(seconds per call, how): CUDA-graph replay, or eager calls where capture fails."""
    try:
        return graph_time(fn, iters), "graph"
    except Exception as err:  # noqa: BLE001  (a variant that cannot be captured is timed eagerly)
        torch.cuda.synchronize()
        print(f"  capture failed ({type(err).__name__}: {str(err)[:120]}); timing eagerly", flush=True)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / iters, "eager"


def routers(model):
    return [model.get_submodule(m.name).gate for m in find_moe_layers(model)]


def set_top_k(model, k: int) -> None:
    for r in routers(model):
        r.top_k = k


def expert_bytes(model) -> tuple[int, int]:
    """(bytes of one routed expert, bytes of the shared experts) of the first MoE block."""
    block = model.get_submodule(find_moe_layers(model)[0].name)
    ex = block.experts
    one = (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.gate_up_proj.element_size()
    shared = 0
    for name in ("shared_experts", "shared_expert"):
        if hasattr(block, name):
            shared += sum(p.numel() * p.element_size() for p in getattr(block, name).parameters())
    return one, shared


def experts_only(block, x, k: int, iters: int, impls=("grouped_mm", "batched_mm")) -> dict[str, float]:
    """Seconds per call of the routed experts alone (no router, no shared experts), on the routing
    the block's router gives at ``k``: ours (``xquant::moe_experts``) and transformers' ``impls``."""
    hidden = x.shape[-1]
    flat = x.view(-1, hidden)
    with torch.no_grad():
        _, w, ids = block.gate(flat)
    ex = block.experts
    times = {}
    for impl in impls:
        ex.config._experts_implementation = impl
        with torch.no_grad():
            times[f"transformers {impl}"] = timed(lambda: ex(flat, ids, w), iters)[0]
    with torch.no_grad():
        times["xquant kernel"] = timed(
            lambda: torch.ops.xquant.moe_experts(flat, ids, w, ex.gate_up_proj, ex.down_proj), iters)[0]
    return times


def bench_layer(name, model, batches, ks, iters, rows, check, flush, inductor_batches=(), ours_only=False,
                inductor_only=False):
    block_name = find_moe_layers(model)[0].name
    block = model.get_submodule(block_name)
    model_k = find_moe_layers(model)[0].top_k
    hidden = model.config.hidden_size
    one, shared = expert_bytes(model)
    for batch in batches:
        x = torch.randn(batch, 1, hidden, device="cuda", dtype=torch.bfloat16)
        base = {}
        for k in ks:
            set_top_k(model, k)
            with torch.no_grad():
                _, _, idx = block.gate(x.view(-1, hidden))
            distinct = idx.unique().numel()
            floor = (distinct * one + shared) / COPY_BW
            use_inductor = ((True,) if inductor_only else (False, True)) if batch in inductor_batches else (False,)
            for impl in () if ours_only else ("grouped_mm", "batched_mm"):
                model.set_experts_implementation(impl)
                for ind in use_inductor:
                    fn = traced(block, inductor=ind)
                    with torch.no_grad():
                        t, how = timed(lambda: fn(x), iters)
                    base[(impl, k)] = t
                    rows.append(dict(part="layer", shape=name, batch=batch, k=k,
                                     variant=f"transformers {impl} ({'inductor, ' if ind else ''}{how})",
                                     us=t * 1e6, floor_us=floor * 1e6, tok_s=""))
            # reference for the check: the model's own block at k, eager experts
            model.set_experts_implementation("eager")
            with torch.no_grad():
                want = block(x).float()
            set_top_k(model, model_k)
            install_experts(model)
            keep = untied(block, x, k)
            for ind in use_inductor:
                ours = traced(block, MoEPlan(spec=k), inductor=ind)
                with torch.no_grad():
                    got = ours(x).float()
                    t, how = timed(lambda: ours(x), iters)
                g, r = got.view(-1, hidden)[keep], want.view(-1, hidden)[keep]
                # every token tied at the k-th place (bf16 scores, small batch): nothing to compare (nan)
                err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-6)).item() if keep.any() else float("nan")
                check.append(dict(shape=name, batch=batch, k=k, rel_err=err, tied=int((~keep).sum())))
                rows.append(dict(part="layer", shape=name, batch=batch, k=k,
                                 variant=f"xquant pass + kernel ({'inductor, ' if ind else ''}{how})",
                                 us=t * 1e6, floor_us=floor * 1e6, tok_s=""))
            set_top_k(model, k)
            for variant, te in experts_only(block, x, k, iters, () if ours_only else ("grouped_mm", "batched_mm")).items():
                rows.append(dict(part="experts", shape=name, batch=batch, k=k, variant=f"{variant} (graph)",
                                 us=te * 1e6, floor_us=(distinct * one) / COPY_BW * 1e6, tok_s=""))
            set_top_k(model, model_k)
            install_experts(model)
            theirs = ", ".join(f"{impl} {base[(impl, k)] * 1e6:.1f}" for impl in ("grouped_mm", "batched_mm")
                               if (impl, k) in base)
            print(f"layer {name} b={batch} k={k}: ours {t*1e6:.1f} us, {theirs}, floor {floor*1e6:.1f}, "
                  f"experts alone {te * 1e6:.1f}, err {err:.1e}", flush=True)
        set_top_k(model, model_k)
        flush()


def profile_layer(name, model, ks, iters, out: Path, lines: list[str]) -> None:
    """Kernel breakdown of one layer step at batch 1 (module docstring, part 4)."""
    block = model.get_submodule(find_moe_layers(model)[0].name)
    model_k = find_moe_layers(model)[0].top_k
    x = torch.randn(1, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    def transformers_block(k):
        set_top_k(model, k)
        model.set_experts_implementation("grouped_mm")
        return traced(block, inductor=True)

    def ours(k):
        set_top_k(model, model_k)
        install_experts(model)
        return traced(block, MoEPlan(spec=k), inductor=True)

    for k in (ks[0], ks[len(ks) // 2]):
        for variant, build_fn in (("transformers grouped_mm", transformers_block), ("xquant pass + kernel", ours)):
            fn = build_fn(k)  # compiled on its first call, below: before the next variant changes the model
            with torch.no_grad():
                step, _ = timed(lambda: fn(x), iters)
            kernels = kernel_times(lambda: fn(x))
            busy = sum(us for _, us, _ in kernels)
            lines += ["", f"### {name}, batch 1, k={k}: {variant} (Inductor)", "",
                      f"CUDA-graph step {step * 1e6:.1f} µs; kernels {busy:.1f} µs in "
                      f"{sum(n for _, _, n in kernels):.0f} launches; the rest ({step * 1e6 - busy:.1f} µs) is gaps.",
                      "", "| kernel | µs / step | launches / step |", "|---|---|---|"]
            lines += [f"| `{kname[:90]}` | {us:.2f} | {n:g} |" for kname, us, n in kernels]
            (out / "moe_profile.md").write_text("\n".join(lines) + "\n")
            print(f"profile {name} k={k} {variant}: step {step * 1e6:.1f} us, kernels {busy:.1f} us", flush=True)
    set_top_k(model, model_k)


def bench_model(name, model, batches, ks, context, iters, rows, flush, inductor=False,
                impls=("grouped_mm", "batched_mm")):
    model_k = find_moe_layers(model)[0].top_k
    arg = cache_argument(model)
    for batch in batches:
        # room for every timed call: transformers 5.17's StaticCache advances its own position counter
        # on each update, also inside replayed CUDA graphs
        cache = StaticCache(config=model.config, max_cache_len=context + 16 * iters + 256)
        ids = torch.randint(1, model.config.vocab_size, (batch, context), device="cuda")
        set_top_k(model, model_k)
        model.set_experts_implementation("grouped_mm")
        with torch.no_grad():
            model(ids, **{arg: cache})
        token = ids[:, -1:]
        pos = torch.full((1,), context, device="cuda", dtype=torch.long)

        def step(fn):
            return lambda: fn(token, cache_position=pos, **{arg: cache})

        variants = [(f"transformers {impl}", impl, k) for k in ks for impl in impls]
        for label, impl, k in variants:
            set_top_k(model, k)
            model.set_experts_implementation(impl)
            with torch.no_grad():
                t, how = timed(step(traced(model, inductor=inductor)), iters)
            how = f"inductor, {how}" if inductor else how
            rows.append(dict(part="model", shape=name, batch=batch, k=k, variant=f"{label} ({how})", us=t * 1e6,
                             floor_us="", tok_s=batch / t))
            print(f"model {name} b={batch} k={k} {label}: {t*1e3:.3f} ms/step, {batch/t:.0f} tok/s", flush=True)
        set_top_k(model, model_k)
        install_experts(model)
        for k in ks:
            with torch.no_grad():
                t, how = timed(step(traced(model, MoEPlan(spec=k), inductor=inductor)), iters)
            how = f"inductor, {how}" if inductor else how
            rows.append(dict(part="model", shape=name, batch=batch, k=k, variant=f"xquant pass + kernel ({how})",
                             us=t * 1e6, floor_us="", tok_s=batch / t))
            print(f"model {name} b={batch} k={k} ours: {t*1e3:.3f} ms/step, {batch/t:.0f} tok/s", flush=True)
        del cache
        torch.cuda.empty_cache()
        flush()


def write(rows, check, out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "moe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [header, "", "| part | shape | batch | k | variant | µs | weight-read floor µs | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{r['floor_us']:.1f}" if r["floor_us"] != "" else ""
        tok = f"{r['tok_s']:.0f}" if r["tok_s"] != "" else ""
        lines.append(f"| {r['part']} | {r['shape']} | {r['batch']} | {r['k']} | {r['variant']} | {r['us']:.1f} | {floor} | {tok} |")
    lines += ["", "Check (ours vs the model's block with top_k = k, eager experts; max |diff| / max |ref| over the "
              "tokens whose router scores do not tie at the k-th place; `tied`: tokens left out):", "",
              "| shape | batch | k | rel. error | tied |", "|---|---|---|---|---|"]
    lines += [f"| {c['shape']} | {c['batch']} | {c['k']} | {c['rel_err']:.1e} | {c['tied']} |" for c in check]
    (out / "moe.md").write_text("\n".join(lines) + "\n")


def header(args, command: str, started: float) -> str:
    return (f"# MoE decode: activated experts vs time\n\n{torch.cuda.get_device_name()}, {datetime.date.today()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, xquant_fx {xquant_fx.__version__}; "
            f"bf16, random weights, CUDA graphs; model part: {args.model_layers} decoder layers, bf16 StaticCache of "
            f"{args.context} tokens. `{command}` "
            f"({time.time() - started:.0f} s).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--batches", nargs="*", type=int, default=[1, 8, 64, 256], help="layer part (none: skip it)")
    p.add_argument("--model-batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--inductor-batches", nargs="*", type=int, default=[1, 8],
                   help="layer batches also timed Inductor-compiled (every k)")
    p.add_argument("--model-layers", type=int, default=8, help="decoder layers in the model-decode part (0: skip)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="fewer k and batches")
    p.add_argument("--model-inductor", action="store_true", help="compile the model part with Inductor, as optimize does")
    p.add_argument("--model-ks", nargs="+", type=int, help="k of the model part (default: K, about K/2, 2)")
    p.add_argument("--ours-only", action="store_true", help="layer part: leave out transformers' experts")
    p.add_argument("--model-impls", nargs="*", default=["grouped_mm", "batched_mm"],
                   help="transformers' experts timed in the model part (none: ours only)")
    p.add_argument("--inductor-only", action="store_true", help="layer part: at --inductor-batches, Inductor only")
    p.add_argument("--slot-blocks-max", type=int,
                   help="override xquant_fx.kernels.moe.SLOT_BLOCKS_MAX (0: always the block table)")
    p.add_argument("--ks", nargs="+", type=int, help="k of the layer part and profile (default: the shape's list)")
    p.add_argument("--decode-programs", type=int,
                   help="override xquant_fx.kernels.moe.DECODE.up_programs (0: no split-K at decode)")
    p.add_argument("--topk-only-router", action="store_true",
                   help="rewrite only each router's top-k, not the whole softmax router (A/B runs)")
    p.add_argument("--profile", action="store_true", help="also a kernel breakdown at batch 1 (moe_profile.md)")
    p.add_argument("--profile-only", action="store_true", help="only the kernel breakdown")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "bench_moe.py times CUDA graphs: run it on a GPU"
    torch._dynamo.config.cache_size_limit = 256
    if args.slot_blocks_max is not None:
        from xquant_fx.kernels import moe as moe_kernels

        moe_kernels.SLOT_BLOCKS_MAX = args.slot_blocks_max
    if args.decode_programs is not None:
        from xquant_fx.kernels import moe as moe_kernels

        moe_kernels.DECODE = dataclasses.replace(moe_kernels.DECODE, up_programs=args.decode_programs)
    if args.topk_only_router:
        import importlib

        importlib.import_module("xquant_fx.passes.router_topk").WHOLE_ROUTER = False  # the module, not the pass
    rows, check, failures = [], [], []
    started = time.time()
    command = "python benchmarks/bench_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    profile_lines = [f"# MoE layer step: kernel breakdown\n\n{torch.cuda.get_device_name()}, {datetime.date.today()}, "
                     f"torch {torch.__version__}, transformers {transformers.__version__}, xquant_fx "
                     f"{xquant_fx.__version__}; bf16, random weights, Inductor-compiled layer at batch 1. `{command}`."]
    for name in args.shapes:
        ks = args.ks or (SHAPES[name][::2] if args.quick else SHAPES[name])
        batches = args.batches[:2] if args.quick else args.batches
        model = build(name, 2, "cuda", torch.bfloat16)  # DeepSeek's layer 0 is dense: layer 1 is MoE
        def flush():  # after each batch: a cut-short run keeps what it measured
            write(rows, check, args.out, header(args, command, started))

        if args.profile or args.profile_only:
            args.out.mkdir(parents=True, exist_ok=True)
            profile_layer(name, model, ks, args.iters, args.out, profile_lines)
        if args.profile_only:
            continue
        if args.batches:
            bench_layer(name, model, batches, ks, args.iters, rows, check, flush, args.inductor_batches, args.ours_only,
                        args.inductor_only)
        del model
        torch.cuda.empty_cache()
        if args.model_layers:
            model = build(name, args.model_layers, "cuda", torch.bfloat16)
            try:
                model_ks = args.model_ks or [ks[0], ks[len(ks) // 2], ks[-2]]
                bench_model(name, model, args.model_batches, model_ks, args.context, args.iters // 4, rows, flush,
                            args.model_inductor, args.model_impls)
            except Exception as err:  # noqa: BLE001  (the layer rows above stay valid)
                print(f"model part of {name} failed: {type(err).__name__}: {err}", flush=True)
                failures.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
            del model
            torch.cuda.empty_cache()
    if not check:
        return 0
    worst = max((c["rel_err"] for c in check if c["rel_err"] == c["rel_err"]), default=0.0)
    print(f"worst relative error {worst:.2e}; model-part failures: {failures or 'none'}")
    return 0 if worst < 2e-2 and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
