"""``optimize(model)``: wire a transformers causal LM to the quantized KV cache and compile it.

The returned object is the user's own model: ``model(...)``, ``model.generate(...)`` and
``model.config`` keep their interface. ``generate`` gets an :class:`XQuantCache` unless the caller
passes a cache of their own. With ``max_cache_len`` and ``max_batch_size`` given, one cache is
preallocated and reused by every call (static addresses, what compiled decode steps want);
otherwise each call gets a cache sized to its prompt and ``max_new_tokens``.

Compilation uses transformers' own mechanism: ``generate`` compiles its decode step when the cache
is compileable, with ``model.generation_config.compile_config``. ``optimize`` sets that config to
the ``xquant`` backend (graph passes, then Inductor; ``fullgraph=True``; CUDA graphs through
``mode="reduce-overhead"`` on GPU). Prefill stays eager, as transformers runs it.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from .cache import XQuantCache, kv_geometry, layer_types
from .config import XQuantConfig
from .moe import install_experts, plan_for

logger = logging.getLogger(__name__)

_MARK = "_xquant_optimized"


def cache_argument(model) -> str:
    """Name of the forward/generate cache argument: ``cache`` on transformers >= 5.2x,
    ``past_key_values`` before the rename."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_causal_lm(model, action: str) -> None:
    """Raise ``ValueError`` naming the problem unless ``model`` is an uncompiled transformers
    decoder-only causal LM whose layers the quantized cache can hold; ``action`` completes
    "... the original model" in the torch.compile message."""
    name = type(model).__name__
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(f"{name} is already compiled with torch.compile: {action} the original model")
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise ValueError(f"{name} is not a transformers generative model (no `generate`/`config`)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model: xquant_fx supports decoder-only causal LMs")
    try:
        kv_geometry(model.config)
        layer_types(model.config)
    except ValueError as err:
        raise ValueError(f"{name} cannot use the quantized KV cache: {err}") from None


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


def optimize(
    model,
    config: XQuantConfig | str | None = None,
    *,
    max_cache_len: int | None = None,
    max_batch_size: int | None = None,
    compile: bool | None = None,
    mode: str | None = None,
    verbose: bool = False,
):
    """Make ``model.generate`` store its KV cache with ``config`` (default ``"xquant-1.38"``) and
    run its decode step compiled with the ``xquant`` backend.

    Args:
        model: a transformers decoder-only causal LM (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
            SmolLM2, MoE models with standard attention...).
        config: an :class:`XQuantConfig` or a preset name.
        max_cache_len, max_batch_size: preallocate one cache of this size, reused by every call.
        compile: compile the decode step (default: on CUDA yes, on CPU no, where compiling costs
            more than it saves for short generations).
        mode: ``torch.compile`` mode (default ``"reduce-overhead"`` on CUDA, ``"default"`` on CPU).
        verbose: print the graph passes' hits for every graph the backend compiles.

    MoE models: their experts run through ``xquant::moe_experts`` (fused Triton kernel on CUDA),
    and the config's ``moe_*`` options prune the routers of the compiled decode step (the prompt
    is processed eagerly with the model's own top-k, as transformers runs it); pruning needs the
    compiled step, so it turns ``compile`` on, and ``compile=False`` with MoE options is an error.

    Returns the same model object. Raises ``ValueError`` for a model the cache cannot hold, one
    already optimized, one already wrapped by ``torch.compile``, MoE options on a dense model or
    a ``moe_top_k`` the model cannot take.
    """
    _check_supported(model)
    xq = XQuantConfig.coerce(config)
    if (max_cache_len is None) != (max_batch_size is None):
        raise ValueError("give both max_cache_len and max_batch_size to preallocate, or neither")
    # Resolve the plan now so that a config that does not fit the model fails here, not mid-generate.
    num_layers = kv_geometry(model.config)[0]
    xq.resolve(num_layers)
    moe_plan = plan_for(model, xq)
    if moe_plan is not None and compile is False:
        raise ValueError(
            "the config prunes MoE experts, which the xquant graph pass does in the compiled decode step: "
            "optimize(..., compile=False) would ignore it; leave compile on"
        )

    cache_name = cache_argument(model)
    original_generate = model.generate
    shared: dict = {}

    # A model loaded tensor-parallel (tp_plan="auto"): each rank's cache holds its share of the KV
    # heads, quantized locally. Heads that do not divide across the ranks raise here, before any allocation.
    from .distributed import kv_tensor_parallel_size

    tp_size = kv_tensor_parallel_size(model)

    def new_cache(batch: int, length: int) -> XQuantCache:
        return XQuantCache(model.config, xq, max_batch_size=batch, max_cache_len=length, tp_size=tp_size)

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if kwargs.get(cache_name) is not None or kwargs.get("past_key_values") is not None:
            return original_generate(*args, **kwargs)
        batch, length = _requested_length(model, args, kwargs)
        if max_cache_len is not None:
            if length > max_cache_len:
                raise ValueError(
                    f"prompt + max_new_tokens = {length} tokens does not fit max_cache_len={max_cache_len} "
                    "given to xquant.optimize"
                )
            if batch > max_batch_size:
                raise ValueError(f"batch of {batch} sequences is larger than max_batch_size={max_batch_size}")
            if "cache" not in shared:
                shared["cache"] = new_cache(max_batch_size, max_cache_len)
            cache = shared["cache"]
            cache.reset()
        else:
            cache = new_cache(batch, length)
        kwargs[cache_name] = cache
        return original_generate(*args, **kwargs)

    model.generate = generate
    model.xquant_config = xq
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
        compile_config = CompileConfig(fullgraph=True, backend="xquant", mode=None, options=options)
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only, unless set
        model.generation_config.compile_config = compile_config
        model.generation_config.disable_compile = False
    else:
        # transformers would otherwise compile the decode step of any compileable cache itself
        model.generation_config.disable_compile = True
    setattr(model, _MARK, True)
    logger.info("xquant_fx: %s optimized with %s", type(model).__name__, xq.name)
    return model
