"""End-to-end decode benchmark: ``xquant.optimize`` against two bf16 paths, same process.

A script, not a test. For each model shape (random weights: speed only, never quality), batch and
context: prefill a random prompt of ``context`` tokens, then time ``--new`` decode steps of
``generate`` (greedy), after a warm-up call that pays the compilation. Every path compiles the
decode step through generate (``reduce-overhead``, CUDA graphs):

* ``bf16-static``: transformers' default, a bf16 ``StaticCache`` with its sdpa attention (a mask
  over the whole cache and ``repeat_kv`` copies of the GQA heads);
* ``bf16-strong``: the same cache with :mod:`bf16_baseline`'s attention (no GQA copies; the
  strongest exact bf16 path we run), the baseline every speed-up is measured against;
* ``xquant``: ``xquant.optimize(model, preset, max_cache_len=context + new, max_batch_size=batch)``.

Columns: ``compile_s`` (warm-up call minus a timed call of the same size), ``graphs`` (Dynamo
graphs compiled during the warm-up), ``ms_per_step`` and ``tokens_per_s`` of the decode steps,
``floor_ms`` (bytes a step must read, the weights plus the stored cache of ``context`` tokens,
over the copy bandwidth measured at the start of the run) and ``x_floor``, ``peak_gib``
(``torch.cuda.max_memory_allocated`` over the timed call), ``x_strong`` (tokens/s over
``bf16-strong``'s in the same row group).

The prompt: ``optimize``'s ``generate`` prefills it in chunks (``prefill_chunk_size``, 2048 tokens by
default); the bf16 paths in one call unless ``--prefill-chunk N`` (a one-call prefill of 64 x 4k
tokens did not fit an 80 GB card next to Llama-3.1-8B, run 48). The timed decode steps exclude it.

With ``XQUANT_BENCH_COMPILE_TIMES=1`` each warm-up prints Dynamo's compile phases.
``--serve N`` then runs ``N`` more ``generate`` calls on the optimized model with random batch
sizes (1..batch) and prompt lengths (1..context) and reports the graphs they compiled (the
decode step should need at most two for any mix, ``xquant_fx.api``).

    python benchmarks/bench_e2e.py --models llama-3.1-8b --batches 16 64 --contexts 4096 --new 64 [--serve 20]

Capacity mode (``--capacity``)
------------------------------
For each method and context ``C``: the largest batch whose decode step runs at ``C`` without
running out of GPU memory, and its speed there. A real prefill of ``batch x C`` tokens would cost
minutes per probe at 32k, so a probe does not prefill. It builds the method's cache for the batch
with capacity ``C + new`` (``StaticCache``; xquant: what ``optimize``'s pool builds), allocates it
and fills its storage with random but valid data (codes any bits, scales positive, activations
N(0, 1); :func:`fill_cache`), sets every layer's stored length (``cumulative_length``) to ``C``,
and runs decode steps with :func:`decode_from_cache`: ``generate`` of a one-token prompt whose
attention mask covers the ``C`` cached positions, every step (the first too) taking the path of
generate's decode steps (``prepare_inputs_for_generation``, then the compiled call), so each step
writes position ``C + i`` and attends over ``C + i + 1`` positions as after a real prefill
(``tests/test_bench_capacity.py`` checks both against a real prefill on a mini Llama). A probe is
a warm-up call of 4 steps (compile, CUDA graph warm-up and capture), the length set back to ``C``,
then a timed call of ``--new`` steps; running out of memory anywhere in it (allocation or step) is
"does not fit". The search (:class:`BatchSearch`) starts from what the free memory after the
weights holds at the cache's stored bytes per sequence (less 2 GiB of headroom; bf16-static also
counts its ``repeat_kv`` copies of one layer), gallops up or down in steps of ``--granularity``
(default about 1/32 of that guess: 1 for bf16 at 32k, 4 for xquant), then bisects; at most
``--max-probes`` probes. Every probe that fits is timed, so the largest batch's numbers come from
its own probe, with no extra run.

Compilation in capacity mode: the bf16 paths reset Dynamo before each probe, so each probe
compiles the static graph a normal run at that batch compiles, with its own CUDA graph pool
(~30-45 s per probe on the H200); xquant keeps its compiled step across probes: its first probe
compiles, its second recompiles once with the batch dynamic (the cache's ``max_batch_size`` is a
guarded int), later probes only record CUDA graphs (~100 s per compile on the H200). An error
right after a step that ran out of memory recompiles afresh and repeats that batch once.

Columns of a capacity row (``mode`` = ``capacity``): ``batch`` (the largest that fit), ``limit``
(the smallest that did not), ``stored_batch`` (free memory after the weights, ``free_gib``, over
the cache's stored bytes per sequence, ``seq_mib``: what the stored bytes alone allow), ``probes``
(each batch probed and its outcome: ``ok``, ``oom(alloc)``, ``oom(step)``, ``error``), ``search``
(``done``, ``max-probes``, ``time-budget``, or the error that ended it), ``search_s``, ``graphs``
(compiled over all probes), ``compile_s`` (the largest batch's warm-up call minus 4 timed steps:
~0 for xquant after its first two probes), ``ms_per_step``, ``tokens_per_s``, ``floor_ms``,
``x_floor``, ``peak_gib`` (over that batch's whole probe) and ``x_strong`` (tokens/s over the
``bf16-strong`` capacity row of the same model and context: each path at its own largest batch).
The rows go to ``e2e.csv`` / ``e2e.md`` under ``--out``, rewritten after every probe that fits
(a run cut short keeps its best so far); ``--append`` keeps the rows already there, so that
methods run as separate commands share one table (and ``x_strong``). Each probe prints a line
(flushed). ``--time-budget S``: no probe or method starts after ``S`` seconds (a probe that
compiles takes up to ~2 min; leave that much under a command's time limit).

Llama-3.1-8B at 32k on one H200 (about 10 minutes of device time in all: bf16-strong 2-4 probes
and bf16-static 2-4 probes of ~45 s each, ~5 min; xquant two ~100 s compiles and 3-5 probes of
~10 s, ~5 min), as two commands under a 10-minute limit each; ``build/`` is git-ignored, so the
second command finds the first's rows on the same machine (or carry ``build/capacity`` back)::

    python benchmarks/bench_e2e.py --models llama-3.1-8b --capacity --contexts 32768 --new 32 \
        --methods bf16-strong bf16-static --time-budget 420 --out build/capacity
    python benchmarks/bench_e2e.py --models llama-3.1-8b --capacity --contexts 32768 --new 32 \
        --methods xquant --preset xquant-1.38 --time-budget 420 --append --out build/capacity

On a CPU, ``--max-batch``, ``--start-batch`` and ``--oom-above N`` (batches above ``N`` raise an
out-of-memory error in the step) run the search end to end at toy sizes, e.g.
``--models smollm2-135m --layers 2 --capacity --contexts 512 --new 4 --device cpu --start-batch 2
--max-batch 8 --oom-above 5``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

import torch._dynamo.utils as dynamo_utils  # noqa: E402

import xquant_fx  # noqa: E402
from bf16_baseline import use_strong_bf16_attention  # noqa: E402
from xquant_fx.api import cache_argument  # noqa: E402
from xquant_fx.cache_layer import XQuantLayer  # noqa: E402
from xquant_fx.hf import kv_geometry, text_config  # noqa: E402
from xquant_fx.memory import load_config, with_layers  # noqa: E402

METHODS = ("bf16-static", "bf16-strong", "xquant")
#: Decode steps of a capacity probe's warm-up call (the step compiles, then CUDA graph trees warm
#: up and record: the timed call after it only replays).
CAPACITY_WARM_STEPS = 4
#: GPU memory the capacity search's first guess leaves free for the step's own allocations (CUDA
#: graph pool, logits, workspaces): only the starting point, the probes decide.
CAPACITY_HEADROOM = 2 * 2**30


def graphs() -> int:
    return dynamo_utils.counters["stats"]["unique_graphs"]


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / sorted(times[2:])[len(times[2:]) // 2]


def build(name: str, device, dtype, layers: int | None):
    config = with_layers(load_config(name), layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prepare(model, method: str, preset: str, device, length: int, max_batch_size: int | None = None):
    """Set ``model`` up for ``method`` (attention, compilation) and return ``make_cache(batch)``: a
    fresh, unallocated cache of ``length`` positions for ``batch`` sequences, as that method's
    ``generate`` gets it (bf16: a ``StaticCache``; xquant: what ``optimize``'s pool allocates)."""
    if method.startswith("bf16"):
        if method == "bf16-strong":
            use_strong_bf16_attention(model)
        if device.type == "cpu":
            model.generation_config.compile_config = transformers.CompileConfig(mode="default")
            model.generation_config.compile_config._compile_all_devices = True
        return lambda batch: StaticCache(config=model.config, max_cache_len=length)
    xquant_fx.optimize(model, preset, compile=True, mode=None if device.type == "cuda" else "default",
                       max_cache_len=length, max_batch_size=max_batch_size)
    pool = model.xquant_cache_pool
    return lambda batch: pool.make(batch, length)


def timed_generate(model, ids, new: int, **kwargs):
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    sync()
    return out, time.perf_counter() - start


def cache_bytes(model, method, preset, batch, context) -> int:
    """Bytes of K/V cache a decode step must read at ``context`` tokens."""
    from xquant_fx import XQuantCache

    if method == "xquant":
        report = XQuantCache(model.config, preset, max_batch_size=batch, max_cache_len=context).memory_report(model.dtype)
        return report["bytes"]
    layers, heads, k_dim, v_dim = xquant_fx.cache.kv_geometry(model.config)
    return batch * context * layers * heads * (k_dim + v_dim) * model.dtype.itemsize


def step_kernels(model, ids, new: int, cache, top: int = 10) -> str:
    """The kernels of one decode step, longest first, as ``"name µs, .."``: torch.profiler's kernel
    times of a ``generate`` of ``new`` tokens minus those of a one-token ``generate`` (the prefill),
    per step; CUDA-graph replays included."""
    from profiling import kernel_times

    full = {name: us for name, us, _ in kernel_times(lambda: timed_generate(model, ids, new, **cache()), 1, 0)}
    first = {name: us for name, us, _ in kernel_times(lambda: timed_generate(model, ids, 1, **cache()), 1, 0)}
    step = sorted(((name, (us - first.get(name, 0.0)) / (new - 1)) for name, us in full.items()), key=lambda r: -r[1])
    total = sum(us for _, us in step)
    return f"{total:.0f} µs of kernels: " + ", ".join(f"{name[:60]} {us:.1f}" for name, us in step[:top] if us > 0)


def run_one(name, layers, batch, context, new, device, dtype, method, preset, bandwidth, serve=0, breakdown=False,
            prefill_chunk=None):
    model = build(name, device, dtype, layers)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
    make_cache = prepare(model, method, preset, device, context + new, max_batch_size=batch)

    def cache():  # bf16: a fresh StaticCache per call; xquant: optimize's pool (one cache for every call)
        if not method.startswith("bf16"):
            return {}  # optimize() prefills in chunks of its own (xquant_fx.api.DEFAULT_PREFILL_CHUNK)
        chunking = {"prefill_chunk_size": prefill_chunk} if prefill_chunk else {}
        return {cache_argument(model): make_cache(batch), **chunking}
    before = graphs()
    start = time.perf_counter()
    timed_generate(model, ids, new, **cache())  # warm-up: compiles the decode step
    warm = time.perf_counter() - start
    compiled = graphs() - before
    if os.environ.get("XQUANT_BENCH_COMPILE_TIMES"):
        print(f"[{method}] compile phases:\n{dynamo_utils.compile_times(repr='str', aggregate=True)}", flush=True)
    _, prefill_only = timed_generate(model, ids, 1, **cache())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, total = timed_generate(model, ids, new, **cache())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    decode = max(total - prefill_only, 1e-9)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = 1e3 * (weights + cache_bytes(model, method, preset, batch, context)) / bandwidth
    step_ms = 1e3 * decode / (new - 1)
    row = dict(model=name, layers=model.config.num_hidden_layers, method=method if method != "xquant" else preset,
               batch=batch, context=context, new=new, compile_s=round(warm - total, 1), graphs=compiled,
               ms_per_step=round(step_ms, 2), tokens_per_s=round(batch * (new - 1) / decode, 1),
               floor_ms=round(floor_ms, 2), x_floor=round(step_ms / floor_ms, 2), peak_gib=round(peak, 2))
    if breakdown and device.type == "cuda":
        row["step_kernels"] = step_kernels(model, ids, new, cache)
    if serve and method == "xquant":
        row["serve_graphs"] = serve_loop(model, batch, context, serve)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row, out


def serve_loop(model, batch: int, context: int, calls: int) -> int:
    """Graphs compiled by ``calls`` generate calls of random batch (1..batch) and prompt length."""
    gen = torch.Generator().manual_seed(0)
    before = graphs()
    for _ in range(calls):
        b = int(torch.randint(1, batch + 1, (1,), generator=gen))
        p = int(torch.randint(1, context + 1, (1,), generator=gen))
        ids = torch.randint(1, model.config.vocab_size, (b, p), generator=gen).to(model.device)
        model.generate(ids, max_new_tokens=4, do_sample=False)
    return graphs() - before

# ----------------------------------------------------------------------------- capacity mode
# The largest batch whose decode step runs at context C, found by probing batch sizes. A probe
# does not prefill: it allocates the cache for the batch, gives it the state a prefill of C tokens
# leaves (storage filled with random but valid data, length counters at C), and runs decode steps
# through the path generate compiles.


def cache_tensors(layer) -> dict[str, torch.Tensor]:
    """The storage of one allocated cache layer, by name: an ``XQuantLayer``'s ``storage`` (codes,
    scales, zero points, windows, sinks, or whole ``keys``/``values`` of a full-precision tensor),
    a transformers ``StaticLayer``'s ``keys`` and ``values``. The length counter
    (``cumulative_length``) is not storage: :func:`set_length` sets it."""
    if isinstance(layer, XQuantLayer):
        return dict(layer.storage)
    if getattr(layer, "is_sliding", False) or not hasattr(layer, "cumulative_length"):
        # a sliding window layer also tracks a Python int and rolls its buffer once full
        raise NotImplementedError(
            f"the synthetic fill handles full-attention static layers, not {type(layer).__name__}")
    return {"keys": layer.keys, "values": layer.values}


def allocate_cache(cache, model, batch: int) -> None:
    """Allocate every layer of a fresh ``cache`` for ``batch`` sequences now (what the first update
    of a prefill would do), on the model's device and in its dtype."""
    _, heads, k_dim, v_dim = kv_geometry(model.config)
    dtype, device = model.dtype, model.device
    if isinstance(cache, xquant_fx.XQuantCache):
        cache.early_initialization(batch, cache.geometry[0], k_dim, dtype, device)
        return
    for layer in cache.layers:
        if not layer.is_initialized:
            layer.lazy_initialization(torch.zeros(batch, heads, 0, k_dim, dtype=dtype, device=device),
                                      torch.zeros(batch, heads, 0, v_dim, dtype=dtype, device=device))


def set_length(cache, length: int) -> None:
    """Set every layer's stored length (``cumulative_length``, the tensor the decode step reads
    for its position and writes at) to ``length``, in place: the tensors keep their addresses
    (static inputs of the compiled step, CUDA graphs)."""
    for layer in cache.layers:
        cache_tensors(layer)  # refuses the layer kinds this does not cover
        layer.cumulative_length.fill_(length)


def _random_(t: torch.Tensor, name: str, generator) -> None:
    if not t.is_floating_point():  # packed codes: every bit pattern is a valid code word
        t.random_(-2**31, 2**31, generator=generator)
        return
    work = t if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.empty(t.shape, device=t.device)
    if name.endswith("_scale"):
        work.uniform_(0.01, 0.1, generator=generator)
    elif name.endswith("_zero"):
        work.normal_(0.0, 0.1, generator=generator)
    else:  # windows, sinks, whole keys / values: activations
        work.normal_(0.0, 1.0, generator=generator)
    if work is not t:  # float8 metadata
        t.copy_(work)


@torch.no_grad()
def fill_cache(cache, model, batch: int, context: int, source=None, seed: int = 0) -> None:
    """Give a fresh ``cache`` (from ``prepare``'s ``make_cache(batch)``) the state a prefill of
    ``context`` tokens per sequence leaves, without running one: allocate it, fill its storage,
    set its length counters to ``context``. The next decode step then writes position ``context``
    and attends over ``context + 1`` positions, as after a real prefill.

    ``source=None``: random but valid storage (codes any bits, scales positive, activations
    N(0, 1)). ``source``: a cache of the same method and ``max_cache_len`` that holds ``context``
    tokens of ``b <= batch`` sequences; sequence ``i`` gets a copy of its sequence ``i % b`` (the
    tests check, with a real prefill as source, that decode steps then give the source's logits)."""
    allocate_cache(cache, model, batch)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for i, layer in enumerate(cache.layers):
        tensors = cache_tensors(layer)
        if source is None:
            for name, t in tensors.items():
                _random_(t, name, generator)
            continue
        stored = int(source.layers[i].cumulative_length)
        if stored != context:
            raise ValueError(f"the source cache holds {stored} tokens, not context={context}")
        have = cache_tensors(source.layers[i])
        for name, t in tensors.items():
            src = have[name]
            if src.shape[1:] != t.shape[1:]:
                raise ValueError(f"{name}: source {tuple(src.shape)} against {tuple(t.shape)} (same max_cache_len?)")
            reps = -(-t.shape[0] // src.shape[0])
            t.copy_(src.repeat(reps, *([1] * (src.dim() - 1)))[: t.shape[0]])
    set_length(cache, context)


def decode_from_cache(model, cache, context: int, steps: int, ids=None, **kwargs):
    """``model.generate`` of ``steps`` greedy tokens continuing ``cache``, which holds ``context``
    tokens per sequence (:func:`fill_cache`): every step, the first too, is a decode step of one
    token at position ``context + i`` through the path generate's own decode steps take.

    Generate's first step (``_prefill``) runs a prompt eagerly; here the prompt is the one new
    token ``ids [B, 1]`` (random if None) with an attention mask of ``context + 1`` ones (the
    cached tokens and it, as generate continues a cache), and that step is run the way
    ``_sample`` runs every later step: ``prepare_inputs_for_generation(next_sequence_length=1)``,
    then the compiled call (``get_compiled_call``) where generate compiles. Returns generate's
    output (``kwargs`` go to it)."""
    device = model.device
    if ids is None:
        batch = next(iter(cache_tensors(cache.layers[0]).values())).shape[0]
        ids = torch.randint(1, model.config.vocab_size, (batch, 1), device=device)
    mask = torch.ones(ids.shape[0], context + 1, dtype=torch.long, device=device)

    def first_step_as_decode(input_ids, generation_config, model_kwargs, is_first_iteration=True):
        forward = (model.get_compiled_call(generation_config.compile_config)
                   if model._valid_auto_compile_criteria(model_kwargs, generation_config) else model.__call__)
        inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        return forward(**inputs, return_dict=True)

    model._prefill = first_step_as_decode  # this model object only, for this call
    try:
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              **{cache_argument(model): cache}, **kwargs)
    finally:
        del model._prefill


class BatchSearch:
    """The largest batch ``b <= max_batch`` for which ``fits(b)``, assuming every smaller batch fits
    too: probe ``guess`` first, gallop (steps of ``granularity``, doubling) up from a batch that
    fits or down from one that does not until both bounds are known, then bisect. Batches are
    multiples of ``granularity`` (and ``max_batch``); below ``granularity`` the search goes down
    to single sequences. ``next()`` -> the batch to probe (None: done), ``record(batch, fits)``.
    ``best``: the largest batch known to fit (0: none), ``limit``: the smallest known not to
    (``max_batch + 1``: none)."""

    def __init__(self, guess: int, granularity: int = 1, max_batch: int = 4096):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.granularity, self.max_batch = max(1, granularity), max_batch
        self.best, self.limit = 0, max_batch + 1
        self.first = min(max_batch, self._snap(max(1, guess)))
        self.up = self.down = self.granularity
        self.probes: list[tuple[int, bool]] = []

    def _snap(self, batch: int) -> int:
        return batch if batch < self.granularity else batch - batch % self.granularity

    def next(self) -> int | None:
        if not self.probes:
            return self.first
        lo, hi = self.best, self.limit
        if hi - lo <= 1:
            return None
        if lo == 0:  # only failures so far: gallop down
            batch = hi - self.down
            self.down *= 2
            batch = self._snap(batch) if batch >= self.granularity else max(1, min(batch, hi // 2))
        elif hi > self.max_batch:  # only successes so far: gallop up
            batch = min(self.max_batch, self._snap(lo + self.up))
            self.up *= 2
        else:  # bisect (then the last multiple below a limit that is not one, such as max_batch)
            batch = self._snap((lo + hi) // 2)
            if batch <= lo:
                batch = self._snap(hi - 1)
        return batch if lo < batch < hi else None

    def record(self, batch: int, fits: bool) -> None:
        self.probes.append((batch, fits))
        if fits:
            self.best = max(self.best, batch)
        else:
            self.limit = min(self.limit, batch)


def largest_batch(fits, guess: int, granularity: int = 1, max_batch: int = 4096, max_probes: int = 16):
    """Run a :class:`BatchSearch` with the predicate ``fits(batch) -> bool``, at most
    ``max_probes`` probes; returns the search (``best``, ``limit``, ``probes``)."""
    search = BatchSearch(guess, granularity, max_batch)
    while len(search.probes) < max_probes and (batch := search.next()) is not None:
        search.record(batch, fits(batch))
    return search


def auto_granularity(guess: int) -> int:
    """The power of two at or below ``guess / 32`` (1 below 64): the search then ends within ~2-3%
    of the largest batch in a few probes."""
    return 1 << max(0, (max(1, guess) // 32).bit_length() - 1)


def cache_bytes_per_sequence(model, method: str, preset: str, length: int) -> int:
    """Bytes one sequence's cache of ``length`` positions holds (what the method allocates)."""
    if method == "xquant":
        cache = xquant_fx.XQuantCache(model.config, preset, max_batch_size=1, max_cache_len=length)
        return cache.memory_report(model.dtype)["bytes"]
    layers, heads, k_dim, v_dim = kv_geometry(model.config)
    return layers * heads * length * (k_dim + v_dim) * model.dtype.itemsize


def step_bytes_per_sequence(model, method: str, length: int) -> int:
    """An estimate of what a decode step allocates per sequence beyond the cache, for the search's
    first guess only: transformers' compiled sdpa path (``bf16-static``) copies one layer's K and
    V to every query head (``repeat_kv``); the other paths' step allocations are small."""
    if method != "bf16-static":
        return 0
    _, _, k_dim, v_dim = kv_geometry(model.config)
    return text_config(model.config).num_attention_heads * length * (k_dim + v_dim) * model.dtype.itemsize


def is_out_of_memory(err: BaseException | None) -> bool:
    """A CUDA allocation failure: the caching allocator's ``OutOfMemoryError``, or one that
    surfaced as a plain ``RuntimeError`` (a CUDA API call, a library's handle or workspace), or an
    error raised while handling one (a CUDA graph capture ended by it fails in its own words)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.OutOfMemoryError):
            return True
        text = str(err)
        if isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def release(device) -> None:
    """Give freed memory back to the device (CUDA only: a full ``gc.collect`` costs ~0.4 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def free_memory(device) -> float:
    """Bytes the device could still allocate (after ``empty_cache``); NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    release(device)
    return float(torch.cuda.mem_get_info(device)[0])


def run_capacity(name, layers, context, new, device, dtype, method, preset, bandwidth, args, deadline,
                 on_progress=None):
    """Capacity mode for one method: the largest batch whose decode steps run at ``context``
    (probes: module docstring), timed at that batch. Returns the result row; ``on_progress(row)``
    is called with the row so far after every probe that fits (a cut-short run keeps it)."""
    t0 = time.perf_counter()
    model = build(name, device, dtype, layers)
    model.generation_config.pad_token_id = 0
    length = context + new
    make_cache = prepare(model, method, preset, device, length)
    label = method if method != "xquant" else preset
    tag = f"[capacity {label} {context}]"
    seq_bytes = cache_bytes_per_sequence(model, method, preset, length)
    free = free_memory(device)
    stored_batch = int(free // seq_bytes) if math.isfinite(free) else None
    if args.start_batch:
        guess = args.start_batch
    elif stored_batch is not None:
        guess = int((free - CAPACITY_HEADROOM) // (seq_bytes + step_bytes_per_sequence(model, method, length)))
    else:
        guess = args.max_batch
    guess = max(1, min(guess, args.max_batch))
    granularity = args.granularity or auto_granularity(guess)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{tag} cache {seq_bytes / 2**20:.1f} MiB per sequence at {length} positions; free after weights "
          f"{free / 2**30:.2f} GiB -> {stored_batch} sequences by stored bytes; first guess {guess}, "
          f"granularity {granularity}", flush=True)
    row = dict(model=name, layers=model.config.num_hidden_layers, method=label, batch=0, limit="",
               stored_batch=stored_batch if stored_batch is not None else "", context=context, new=new,
               mode="capacity", ms_per_step="", tokens_per_s="", x_strong="", peak_gib="",
               seq_mib=round(seq_bytes / 2**20, 1), free_gib=round(free / 2**30, 2) if math.isfinite(free) else "",
               compile_s="", graphs="", floor_ms="", x_floor="", probes="", search="running", search_s="")
    results: dict[int, dict] = {}
    log: list[str] = []
    compiled_total = 0
    fresh_each_probe = method.startswith("bf16")  # module docstring: "Compilation in capacity mode"

    def probe(batch: int) -> bool:
        nonlocal compiled_total
        if fresh_each_probe:
            torch._dynamo.reset()  # a static graph and its own CUDA graph pool, as a fresh run at this batch
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        phase, failure, cache, result = "alloc", None, None, None
        before = graphs()
        start = time.perf_counter()
        try:
            cache = make_cache(batch)
            fill_cache(cache, model, batch, context, seed=batch)
            phase = "step"
            if args.oom_above and batch > args.oom_above:  # testing the search off a GPU
                raise torch.OutOfMemoryError(f"--oom-above {args.oom_above}: batch {batch} treated as out of memory")
            sync()
            warm_start = time.perf_counter()
            decode_from_cache(model, cache, context, CAPACITY_WARM_STEPS)  # compiles / records
            sync()
            warm = time.perf_counter() - warm_start
            set_length(cache, context)
            ids = torch.randint(1, model.config.vocab_size, (batch, 1), device=device)
            sync()
            timed_start = time.perf_counter()
            decode_from_cache(model, cache, context, new, ids=ids)
            sync()
            timed = time.perf_counter() - timed_start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            result = dict(timed=timed, warm=warm, peak=peak)
        except Exception as err:  # noqa: BLE001 -- out of memory is an answer; anything else is raised below
            if not is_out_of_memory(err):
                raise
            failure = f"oom({phase})"
        finally:
            cache = None
        compiled = graphs() - before
        compiled_total += compiled
        release(device)
        seconds = time.perf_counter() - start
        if result is None:
            log.append(f"{batch}:{failure}")
            print(f"{tag} probe {len(log)}: batch {batch} {failure}, {compiled} graphs, {seconds:.1f} s", flush=True)
            return False
        step_s = result["timed"] / new
        results[batch] = dict(ms_per_step=round(1e3 * step_s, 2), tokens_per_s=round(batch / step_s, 1),
                              peak_gib=round(result["peak"], 2),
                              compile_s=round(result["warm"] - CAPACITY_WARM_STEPS * step_s, 1))
        log.append(f"{batch}:ok")
        print(f"{tag} probe {len(log)}: batch {batch} ok, {results[batch]['ms_per_step']} ms/step, "
              f"{results[batch]['tokens_per_s']} tok/s, peak {results[batch]['peak_gib']} GiB, {compiled} graphs, "
              f"{seconds:.1f} s", flush=True)
        return True

    search = BatchSearch(guess, granularity, args.max_batch)
    stop = "done"
    retry = False  # the next probe repeats a batch after a reset (see below)
    while True:
        batch = search.next() if not retry else batch
        if batch is None:
            break
        if len(search.probes) >= args.max_probes:
            stop = "max-probes"
            break
        if deadline is not None and time.monotonic() > deadline:
            stop = "time-budget"
            break
        try:
            fits = probe(batch)
        except Exception as err:  # noqa: BLE001 -- keep what the earlier probes found
            traceback.print_exc()
            log.append(f"{batch}:error")
            torch._dynamo.reset()
            # The compiled step (xquant: kept across probes) last failed by running out of memory
            # inside it (CUDA graph warm-up or capture): an error now may come from that state, so
            # compile afresh and repeat the batch once. Anything else ends this method's search.
            if not retry and not fresh_each_probe and log[-2:-1] and log[-2].endswith("oom(step)"):
                print(f"{tag} error after an out-of-memory step: compiling afresh, batch {batch} again", flush=True)
                retry = True
                continue
            stop = f"error at {batch}: {first_line(err)}"
            break
        retry = False
        search.record(batch, fits)
        if fits and batch == search.best:
            row.update(batch=batch, **results[batch], probes=" ".join(log))
            fill_row(row, model, method, preset, batch, context, bandwidth, weights)
            if on_progress is not None:
                on_progress(row)
    best = search.best
    row.update(probes=" ".join(log), graphs=compiled_total, search=stop,
               search_s=round(time.perf_counter() - t0, 1),
               limit=search.limit if search.limit <= args.max_batch else f"> {args.max_batch}")
    if best:
        row.update(batch=best, **results[best])
        fill_row(row, model, method, preset, best, context, bandwidth, weights)
    else:
        row.update(tokens_per_s="OOM" if stop == "done" else "")
    del model
    torch._dynamo.reset()
    release(device)
    return row


def fill_row(row, model, method, preset, batch, context, bandwidth, weights) -> None:
    floor_ms = 1e3 * (weights + cache_bytes(model, method, preset, batch, context)) / bandwidth
    row.update(floor_ms=round(floor_ms, 2), x_floor=round(row["ms_per_step"] / floor_ms, 2))


def first_line(err: BaseException) -> str:
    text = str(err).splitlines()
    return f"{type(err).__name__}: {text[0][:120] if text else ''}"


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def add_capacity_x_strong(rows) -> None:
    """``x_strong`` of every capacity row: its tokens/s over the ``bf16-strong`` capacity row's of
    the same model, depth and context (each at its own largest batch)."""
    strong = {(r.get("model"), str(r.get("layers")), str(r.get("context"))): _number(r.get("tokens_per_s"))
              for r in rows if r.get("mode") == "capacity" and r.get("method") == "bf16-strong"}
    for r in rows:
        if r.get("mode") != "capacity":
            continue
        base = strong.get((r.get("model"), str(r.get("layers")), str(r.get("context"))))
        mine = _number(r.get("tokens_per_s"))
        if base and mine is not None:
            r["x_strong"] = round(mine / base, 2)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def capacity_main(args, device, dtype, bandwidth) -> int:
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget else None
    rows = read_rows(args.out / "e2e.csv") if args.append else []
    if args.new < CAPACITY_WARM_STEPS:
        raise SystemExit(f"--capacity needs --new >= {CAPACITY_WARM_STEPS}")
    for name in args.models:
        for context in args.contexts:
            for method in args.methods:
                if deadline is not None and time.monotonic() > deadline:
                    print(f"[capacity] time budget spent: {method} at {context} not run", flush=True)
                    continue
                current = len(rows)
                rows.append(dict(model=name, method=method, context=context, mode="capacity", search="running"))

                def progress(row, at=current):
                    rows[at] = dict(row)
                    add_capacity_x_strong(rows)
                    write(rows, device, args.out, bandwidth)

                try:
                    rows[current] = run_capacity(name, args.layers, context, args.new, device, dtype, method,
                                                 args.preset, bandwidth, args, deadline, on_progress=progress)
                except Exception as err:  # noqa: BLE001 -- the next method may still run
                    traceback.print_exc()
                    rows[current].update(search=f"error: {first_line(err)}")
                    torch._dynamo.reset()
                release(device)  # the method's model and caches, before the next one is built
                add_capacity_x_strong(rows)
                print(rows[current], flush=True)
                write(rows, device, args.out, bandwidth)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--layers", type=int, default=None, help="override the layer count (smaller runs)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--contexts", nargs="+", type=int, default=[4096])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--preset", default="xquant-1.38")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--serve", type=int, default=0, help="generate calls of random shapes after timing (xquant)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="bf16 paths: prefill the prompt in chunks of N tokens (transformers' prefill_chunk_size; "
                        "0: one call, transformers' default), as optimize() does by default; the decode timing "
                        "does not include the prefill, only the peak memory does")
    p.add_argument("--breakdown", action="store_true",
                   help="after timing, the kernels of one decode step with their µs (torch.profiler; CUDA only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    c = p.add_argument_group("capacity mode (module docstring)")
    c.add_argument("--capacity", action="store_true",
                   help="per method and context: the largest batch whose decode step fits, timed there (no prefill)")
    c.add_argument("--max-batch", type=int, default=4096, help="largest batch the search may probe")
    c.add_argument("--start-batch", type=int, default=0,
                   help="first batch probed (default: what the free memory holds by stored bytes, less headroom)")
    c.add_argument("--granularity", type=int, default=0, help="batch step of the search (0: about 1/32 of the guess)")
    c.add_argument("--max-probes", type=int, default=10, help="probes per method")
    c.add_argument("--time-budget", type=float, default=0,
                   help="seconds from the start after which no probe or method starts (0: none)")
    c.add_argument("--append", action="store_true", help="keep the rows already in OUT/e2e.csv")
    c.add_argument("--oom-above", type=int, default=0,
                   help="testing: treat batches above N as out of memory in the decode step (a CPU run of the search)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    if args.capacity:
        return capacity_main(args, device, dtype, bandwidth)
    rows = []
    for name in args.models:
        for batch in args.batches:
            for context in args.contexts:
                outs = {}
                for method in args.methods:
                    try:
                        row, out = run_one(name, args.layers, batch, context, args.new, device, dtype, method,
                                           args.preset, bandwidth, args.serve, args.breakdown, args.prefill_chunk)
                    except torch.OutOfMemoryError:
                        row, out = dict(model=name, method=method, batch=batch, context=context, tokens_per_s="OOM"), None
                        torch.cuda.empty_cache()
                    rows.append(row)
                    outs[method] = out
                    print(row, flush=True)
                    write(rows, device, args.out, bandwidth)  # after every row: a cut-short run keeps it
                strong = next((r for r in rows[-len(args.methods):] if r.get("method") == "bf16-strong"), None)
                for r in rows[-len(args.methods):]:
                    if strong and isinstance(r.get("tokens_per_s"), float) and isinstance(strong.get("tokens_per_s"), float):
                        r["x_strong"] = round(r["tokens_per_s"] / strong["tokens_per_s"], 2)
                write(rows, device, args.out, bandwidth)
    return 0


def write(rows, device, out: Path, bandwidth: float) -> None:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = (f"{gpu}, {datetime.date.today()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"random weights, bf16 on GPU, copy bandwidth {bandwidth / 1e12:.2f} TB/s; `{' '.join(sys.argv)}`")
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# End-to-end decode, {meta}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
