"""The strong bf16 baseline: decode attention over a ``StaticCache`` without expanding GQA heads.

Every speed-up of ``xquant_fx`` is reported twice (``DESIGN.md`` §7): against transformers' own
path and against the best bf16 path we can run. This module is that second path, for any
transformers causal LM whose attention layers dispatch through ``AttentionInterface``::

    from bf16_baseline import use_strong_bf16_attention     # benchmarks/ on sys.path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    use_strong_bf16_attention(model)                        # returns "xquant_bf16_gqa"
    cache = StaticCache(config=model.config, max_cache_len=4096)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)  # or generate's auto-compile

What it changes
---------------
``use_strong_bf16_attention(model)`` registers one attention function (``ATTN_NAME``) with
``AttentionInterface`` and transformers' sdpa mask builder under the same name with
``AttentionMaskInterface``, then switches ``model`` to it (``model.set_attn_implementation``). The
weights, the cache and everything else stay as they were; ``restore_attention(model, previous)``
switches back.

* Decode (one query token per sequence) with ``num_key_value_groups = g > 1``: the query
  ``[B, Hq, 1, D]`` is regrouped as ``[B, Hkv, g, D]`` (query head ``h`` reads KV head ``h // g``,
  the order of transformers' ``repeat_kv``), so each KV head's ``g`` query heads become ``g`` query
  rows of one SDPA problem over that KV head. The static cache's boolean mask ``[B, 1, 1, T]``
  broadcasts over heads and rows. ``F.scaled_dot_product_attention`` then reads every cached key
  and value once, with no ``repeat_kv`` copy. Without a mask (a dynamic cache, where every stored
  slot is valid) it is the mask-free ``enable_gqa=True`` call.
* Anything else (prefill, ``g = 1``, a per-head mask) goes to transformers' own sdpa function.

Why this design (and not the two others)
----------------------------------------
A static cache of capacity ``T`` holds ``n <= T`` written slots; the others are zeros. Three ways to
attend over it:

1. mask-free SDPA over all ``T`` slots (``enable_gqa=True``, flash backend): fast, but **wrong**.
   An unwritten slot scores ``q . 0 = 0`` and takes ``exp(0 - max)`` of the softmax mass, so every
   output changes as soon as ``n < T``.
2. mask-free SDPA over the valid prefix ``key[:, :, :n]`` with ``n = cache_position[-1] + 1``:
   exact, and reads only the ``n`` written slots, but ``n`` is data (a tensor), so the sliced shape is
   data dependent: under ``torch.compile`` it is an unbacked size (a graph break or
   ``capture_scalar_outputs``), and under ``mode="reduce-overhead"`` Inductor either skips CUDA
   graphs for such a graph or records one graph per length (one per decode step). With 32 layers,
   launch overhead without graphs costs more than the slots saved at 4k context.
3. keep the mask, drop the GQA expansion (this module): exact, every shape static, so the whole
   decode step is one CUDA graph under ``reduce-overhead``. It reads all ``T`` slots (as the
   static cache's masked path always does) but each only once: transformers' compiled sdpa path
   with a mask copies K and V ``g`` times per layer per step (``repeat_kv``; its eager path packs the
   query like this, but not while compiling). With a mask, SDPA on CUDA takes a backend that
   accepts one (memory-efficient or cuDNN attention) instead of flash.

So (3) is exact and is the fastest of the exact ones under CUDA graphs. Its cost over the minimal
read is the ``T - n`` unwritten slots: size ``max_cache_len`` to the run (prompt + new tokens)
to keep that small, as for the xquant cache.

Exactness: the decode step computes the same masked softmax as transformers' sdpa path, only
without the copies; ``tests/test_bf16_baseline.py`` checks that greedy tokens equal the default
sdpa path's on a mini Llama with a static cache, on transformers 5.17 and 5.25 alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ATTN_NAME", "restore_attention", "strong_bf16_attention", "use_strong_bf16_attention"]

#: The name under which the attention function and its mask builder are registered.
ATTN_NAME = "xquant_bf16_gqa"


def strong_bf16_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An ``AttentionInterface`` function: ``query [B, Hq, q, D]``, ``key``/``value [B, Hkv, T, D]``
    -> ``([B, q, Hq, D], None)``. One-token decode steps run GQA without expanding K/V (module
    docstring); everything else is transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    mask = attention_mask
    decode = (
        q_len == 1
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and kwargs.get("position_bias") is None
        and kv_heads * groups == q_heads
        and key.shape[-1] == value.shape[-1] == head_dim
        and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1))
    )
    if not decode:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    dropout_p = dropout if module.training else 0.0
    if mask is None:  # every stored slot is valid (no static padding): mask-free GQA
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=scaling,
                                             enable_gqa=groups > 1)
        return out.transpose(1, 2).contiguous(), None
    # [B, Hq, 1, D] -> [B, Hkv, g, D]: the g query heads of one KV head become g query rows; the
    # mask [B, 1, 1, T] broadcasts over KV heads and rows.
    grouped = query.reshape(batch, kv_heads, groups, head_dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scaling)
    return out.reshape(batch, 1, q_heads, head_dim), None


def use_strong_bf16_attention(model) -> str:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to :func:`strong_bf16_attention` and
    return its implementation name (``ATTN_NAME``, also what ``model.config._attn_implementation``
    now says). Registers the function and transformers' sdpa mask builder under that name (idempotent).

    Exact: greedy tokens equal transformers' default sdpa path on the same cache. Use it with a
    ``StaticCache`` (or ``generation_config.cache_implementation = "static"``) and
    ``torch.compile(..., mode="reduce-overhead")``: every shape is static, so the decode step is
    captured as one CUDA graph. Raises ``ValueError`` for an object that cannot switch attention
    implementations (not a transformers model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not callable(getattr(model, "set_attn_implementation", None)) or not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} is not a transformers model (no set_attn_implementation): "
                         "use_strong_bf16_attention needs a PreTrainedModel whose attention uses AttentionInterface")
    AttentionInterface.register(ATTN_NAME, strong_bf16_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"{type(model).__name__} did not take the attention implementation {ATTN_NAME!r} "
                         f"(it reports {model.config._attn_implementation!r})")
    return ATTN_NAME


def restore_attention(model, previous: str = "sdpa") -> None:
    """Switch ``model`` back to ``previous`` (transformers' default ``"sdpa"`` unless given)."""
    model.set_attn_implementation(previous)
