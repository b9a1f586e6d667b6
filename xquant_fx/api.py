"""``optimize(model)``: wire a transformers causal LM to the quantized KV cache and compile it.

The returned object is the user's own model: ``model(...)``, ``model.generate(...)`` and
``model.config`` keep their interface. ``generate`` gets an :class:`XQuantCache` unless the caller
passes a cache of their own.

Serving many requests from one model (:class:`CachePool`): every ``generate`` call reuses one
cache, allocated at the first call and grown only when a call does not fit. A dimension given to
``optimize`` (``max_cache_len``, ``max_batch_size``) is fixed, and a call beyond it is refused; a
dimension left out starts at what the first call needs (lengths rounded up to a power of two, at
least :data:`MIN_POOL_LENGTH`) and doubles when needed. The compiled decode step's shapes are the
cache's, so the step compiles once per cache size; its batch dimension is dynamic (one graph for
every batch of two or more sequences, and one for a single sequence, which Dynamo always
specializes): with both dimensions given, any mix of prompt lengths and batch sizes compiles two
graphs, or three where the kernels' launch code specializes the first batch size it sees (Dynamo
then makes the batch dynamic at the next one).

Compilation: transformers' ``generate`` compiles its decode step when the cache is compileable,
through ``model.get_compiled_call``. ``optimize`` gives the model its own version of that method
(:func:`_decode_step`): the ``xquant`` backend (graph passes, then Inductor; ``fullgraph=True``;
CUDA graphs through ``mode="reduce-overhead"`` on GPU) compiles a function whose code object
belongs to this model alone, because Dynamo counts recompiles per code object, and transformers'
own compiled call shares one (its forward decorator's) between every model in the process, so
that eight shapes across all models used to exhaust the limit for all of them. Steps of more than
one token (prompt chunks, assisted decoding) run eagerly, as transformers runs the prompt; should
the compiled step ever hit Dynamo's recompile limit, that step runs eagerly too, with a warning.

Long prompts are prefilled in chunks of ``prefill_chunk_size`` tokens (transformers' generation
option, default :data:`DEFAULT_PREFILL_CHUNK`), so that peak memory follows the chunk: every chunk
after the first attends over the cache as stored, like a decode step.
"""

from __future__ import annotations

import functools
import logging
import types
import warnings

import torch

from ._checks import positive_int
from .cache import XQuantCache
from .config import XQuantConfig
from .hf import cache_argument, check_causal_lm
from .moe import install_experts, plan_for
from .rotation import fold_value_rotation

logger = logging.getLogger(__name__)

_MARK = "_xquant_optimized"
#: torch.compile modes ``optimize(mode=...)`` takes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Shortest cache a pool allocates when ``max_cache_len`` is not given.
MIN_POOL_LENGTH = 256
#: Prompt tokens prefilled per forward call by an optimized model's ``generate``.
DEFAULT_PREFILL_CHUNK = 2048


def _check_supported(model) -> None:
    check_causal_lm(model, "call xquant.optimize on")
    if getattr(model, _MARK, False):
        raise ValueError(f"{type(model).__name__} was already optimized by xquant_fx; optimize the original model once")


def _requested_length(model, args, kwargs) -> tuple[int, int]:
    """(batch, prompt + new tokens) of a generate call."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs")
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("generate needs input_ids or inputs_embeds to size the quantized cache")
        batch, prompt = embeds.shape[:2]
    else:
        batch, prompt = ids.shape[0], ids.shape[-1]
    gen_cfg = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)
    if new is not None:
        total = prompt + new
    else:
        total = max(kwargs.get("max_length", gen_cfg.max_length or 20), prompt + 1)
    beams = kwargs.get("num_beams", gen_cfg.num_beams or 1)
    ret = kwargs.get("num_return_sequences", gen_cfg.num_return_sequences or 1)
    return batch * max(beams, ret), total


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class CachePool:
    """The one :class:`XQuantCache` an optimized model's ``generate`` calls share (module docstring).

    ``max_batch_size`` / ``max_cache_len``: fixed dimensions (``None``: grown to fit, in powers
    of two). ``make(batch, length)`` builds a cache.
    """

    def __init__(self, make, max_batch_size: int | None, max_cache_len: int | None):
        self.make = make
        self.max_batch_size, self.max_cache_len = max_batch_size, max_cache_len
        self.cache: XQuantCache | None = None
        self.allocations = 0

    def check(self, batch: int, length: int) -> None:
        """Refuse a call beyond a fixed dimension, before anything is stored."""
        if self.max_cache_len is not None and length > self.max_cache_len:
            raise ValueError(
                f"prompt + max_new_tokens = {length} tokens does not fit max_cache_len={self.max_cache_len} "
                "given to xquant.optimize"
            )
        if self.max_batch_size is not None and batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} sequences is larger than max_batch_size={self.max_batch_size}")

    def get(self, batch: int, length: int) -> XQuantCache:
        """A reset cache holding at least ``batch`` sequences of ``length`` tokens."""
        self.check(batch, length)
        cache = self.cache
        if cache is None or batch > cache.max_batch_size or length > cache.max_cache_len:
            have_b, have_t = (cache.max_batch_size, cache.max_cache_len) if cache is not None else (0, 0)
            want_b = self.max_batch_size or _pow2_at_least(max(batch, have_b))
            want_t = self.max_cache_len or max(MIN_POOL_LENGTH, _pow2_at_least(max(length, have_t)))
            self.cache = None  # let the old storage go before the new one is allocated
            cache = self.cache = self.make(want_b, want_t)
            self.allocations += 1
            logger.info("xquant_fx: cache pool allocated %d x %d tokens", want_b, want_t)
        else:
            cache.reset()
        return cache


def _own_function(fn, name: str):
    """``fn`` with a code object of its own (see the module docstring: Dynamo's recompile count is
    per code object)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _recompile_limit_errors() -> tuple[type, ...]:
    exc = torch._dynamo.exc
    return tuple(getattr(exc, n) for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit") if hasattr(exc, n))


def _decode_step(model, compile_config):
    """What the optimized model's ``get_compiled_call`` returns: one-token steps through its own
    compiled function, longer steps eagerly (module docstring)."""

    def step(*args, **kwargs):
        return model(*args, **kwargs)

    compiled = torch.compile(_own_function(step, f"xquant_decode_step_{id(model):x}"), **compile_config.to_dict())
    limit_errors = _recompile_limit_errors()
    warned = []

    def run(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None and ids.shape[1] != 1:
            return model(*args, **kwargs)
        if ids is not None and ids.shape[0] > 1:
            # a batch of one is compiled on its own anyway (Dynamo specializes sizes 0 and 1); any
            # other batch size starts the dynamic graph every later batch size shares
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == ids.shape[0]:
                    torch._dynamo.maybe_mark_dynamic(value, 0)
        try:
            return compiled(*args, **kwargs)
        except limit_errors as err:
            if not warned:
                warnings.warn(f"xquant_fx: the compiled decode step reached Dynamo's recompile limit ({err}); "
                              "steps of new shapes run eagerly. Give xquant.optimize max_cache_len and "
                              "max_batch_size to keep one cache size.", RuntimeWarning, stacklevel=2)
                warned.append(True)
            return model(*args, **kwargs)

    run.compiled = compiled
    return run


def optimize(
    model,
    config: XQuantConfig | str | None = None,
    *,
    max_cache_len: int | None = None,
    max_batch_size: int | None = None,
    compile: bool | None = None,
    mode: str | None = None,
    prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK,
    fold_rotation: bool = True,
    verbose: bool = False,
):
    """Make ``model.generate`` store its KV cache with ``config`` (default ``"xquant-1.38"``) and
    run its decode step compiled with the ``xquant`` backend.

    Args:
        model: a transformers decoder-only causal LM (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
            SmolLM2, MoE models with standard attention...).
        config: an :class:`XQuantConfig`, a preset name or a spec.
        max_cache_len, max_batch_size: fix the shared cache's length / batch (each independently;
            a dimension left out grows to fit the calls). Fixing both gives one cache and one
            compiled step for every call.
        compile: compile the decode step (default: on CUDA yes, on CPU no, where compiling costs
            more than it saves for short generations).
        mode: ``torch.compile`` mode, one of :data:`COMPILE_MODES` (default ``"reduce-overhead"``
            on CUDA, ``"default"`` on CPU).
        prefill_chunk_size: prompt tokens per forward call during ``generate`` (``None``: the
            whole prompt at once); a ``generate(prefill_chunk_size=...)`` argument overrides it.
        fold_rotation: with ``rotation="hadamard"``, fold the value rotation into the model's
            ``v_proj`` / ``o_proj`` weights where the attention allows it
            (:mod:`xquant_fx.rotation`: the weights change by float rounding; decode then rotates
            only the query); ``False`` leaves the weights as they are.
        verbose: print the graph passes' hits for every graph the backend compiles.

    MoE models: their experts run through ``xquant::moe_experts`` (fused Triton kernel on CUDA),
    and the config's ``moe_*`` options prune the routers of the compiled **decode step**, the
    steps that generate one token per sequence. Prompts (prefill) and direct ``model(...)`` calls
    keep the model's own top-k: the pruning is a rewrite of the compiled step's graph, and the
    published measurements of fewer activated experts are of decoding. Pruning needs the compiled
    step, so it turns ``compile`` on, and ``compile=False`` with MoE options is an error.

    Returns the same model object. Raises ``ValueError`` for a model the cache cannot hold (the
    config is checked against the model's head dims here), one already optimized, one already
    wrapped by ``torch.compile``, bad sizes or mode, MoE options on a dense model or a
    ``moe_top_k`` the model cannot take.
    """
    _check_supported(model)
    xq = XQuantConfig.coerce(config)
    max_cache_len = positive_int("max_cache_len", max_cache_len, optional=True)
    max_batch_size = positive_int("max_batch_size", max_batch_size, optional=True)
    prefill_chunk_size = positive_int("prefill_chunk_size", prefill_chunk_size, optional=True)
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {COMPILE_MODES}")
    # A model loaded tensor-parallel (tp_plan="auto"): each rank's cache holds its share of the KV
    # heads, quantized locally. Heads that do not divide across the ranks raise here, before any allocation.
    from .distributed import kv_tensor_parallel_size

    tp_size = kv_tensor_parallel_size(model)

    def new_cache(batch: int, length: int) -> XQuantCache:
        return XQuantCache(model.config, xq, max_batch_size=batch, max_cache_len=length, tp_size=tp_size)

    # The config against the model, now rather than mid-generate: per-layer bits and sharing
    # against the depth, group size against the head dims (a cache long enough to quantize).
    XQuantCache(model.config, xq, max_cache_len=xq.residual_length + xq.group_size, tp_size=tp_size).memory_report()
    if not isinstance(fold_rotation, bool):
        raise ValueError(f"fold_rotation={fold_rotation!r}: True or False")
    moe_plan = plan_for(model, xq)
    if moe_plan is not None and compile is False:
        raise ValueError(
            "the config prunes MoE experts, which the xquant graph pass does in the compiled decode step: "
            "optimize(..., compile=False) would ignore it; leave compile on"
        )

    cache_name = cache_argument(model)
    original_generate = model.generate
    pool = CachePool(new_cache, max_batch_size, max_cache_len)

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if kwargs.get(cache_name) is not None or kwargs.get("past_key_values") is not None:
            return original_generate(*args, **kwargs)
        batch, length = _requested_length(model, args, kwargs)
        kwargs[cache_name] = pool.get(batch, length)
        gen_cfg = kwargs.get("generation_config") or model.generation_config
        if "prefill_chunk_size" not in kwargs and getattr(gen_cfg, "prefill_chunk_size", None) is None:
            kwargs["prefill_chunk_size"] = prefill_chunk_size
        return original_generate(*args, **kwargs)

    if fold_rotation and xq.rotation == "hadamard":
        fold_value_rotation(model)  # after every check above: a refused call changes no weight
    model.generate = generate
    model.xquant_config = xq
    model.xquant_cache_pool = pool
    install_experts(model)
    on_cuda = next(model.parameters()).device.type == "cuda"
    if compile is None:
        compile = on_cuda or moe_plan is not None
    if compile:
        from transformers import CompileConfig

        # torch.compile takes a mode or options, not both: the mode travels in the backend's options.
        options = {"mode": mode or ("reduce-overhead" if on_cuda else "default")}
        if moe_plan is not None:
            options.update(moe_plan.to_options())
        if verbose:
            options["xquant_verbose"] = True
        compile_config = CompileConfig(fullgraph=True, dynamic=None, backend="xquant", mode=None, options=options)
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only, unless set
        model.generation_config.compile_config = compile_config
        model.generation_config.disable_compile = False
        step = _decode_step(model, compile_config)
        model.get_compiled_call = lambda *_args, **_kwargs: step
    else:
        # transformers would otherwise compile the decode step of any compileable cache itself
        model.generation_config.disable_compile = True
    setattr(model, _MARK, True)
    logger.info("xquant_fx: %s optimized with %s", type(model).__name__, xq.name)
    return model
