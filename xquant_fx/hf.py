"""What the package reads from transformers models and configs, in one place.

Every module that needs a model's shape, its layer types, the name of its cache argument, or
whether it is a model the quantized cache can serve asks here, so that a transformers change
(a renamed argument, a new composite config) is handled once. Imports nothing else of the package.
"""

from __future__ import annotations

import inspect

import torch

SLIDING_TYPES = ("sliding_attention", "chunked_attention")
SUPPORTED_TYPES = ("full_attention",) + SLIDING_TYPES


def text_config(model_config):
    """The decoder's config: ``get_text_config(decoder=True)`` of a composite (vision-language)
    config, the config itself otherwise."""
    return model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config


def kv_geometry(model_config) -> tuple[int, int, int, int]:
    """``(num_layers, kv_heads, k_head_dim, v_head_dim)`` of a decoder config.

    Raises ``ValueError`` naming the missing attribute for configs the cache cannot hold.
    """
    cfg = text_config(model_config)
    name = type(cfg).__name__
    for attr in ("num_hidden_layers", "num_attention_heads"):
        if getattr(cfg, attr, None) is None:
            raise ValueError(f"{name} has no `{attr}`: XQuantCache needs a decoder-only attention model")
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if getattr(cfg, "qk_nope_head_dim", None) is not None:  # DeepSeek multi-head latent attention
        k_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        v_dim = cfg.v_head_dim
    else:
        k_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        v_dim = k_dim
    return cfg.num_hidden_layers, heads, k_dim, v_dim


def layer_types(model_config) -> list[str]:
    cfg = text_config(model_config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    unsupported = sorted({t for t in types if t not in SUPPORTED_TYPES})
    if unsupported:
        raise ValueError(
            f"{type(cfg).__name__} has layer types {unsupported}: XQuantCache supports {list(SUPPORTED_TYPES)}"
        )
    return list(types)


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
