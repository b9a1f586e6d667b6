"""Tensor parallelism: how many KV heads each rank holds, for a model transformers loaded sharded.

Users whose model does not fit one GPU load it with transformers' own tensor parallelism,
``AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")`` under ``torchrun`` (or
``distributed_config=DistributedConfig(tp_size=N)``). The model's tensor-parallel plan shards the
query, key and value projections column-wise and the output projection row-wise, so attention on
rank ``r`` of ``N`` computes only the heads ``[r*H/N, (r+1)*H/N)`` and its key/value states arrive
at the cache as ``[batch, H/N, tokens, head_dim]``.

Decisions recorded here:

* **Each rank quantizes its own heads, with no communication.** Every quantization group lies
  inside one head (key groups are G tokens of one channel, value groups G channels of one token,
  and ``head_dim`` is a multiple of G), so the cache of rank ``r`` is exactly the head slice
  ``[r*H/N, (r+1)*H/N)`` of the single-device cache: same codes, scales, zero points and window.
  Sharding heads never splits a group, cross-layer code sharing pairs layers (not heads), and the
  attention kernels already work per KV head. Nothing is gathered; ``torch.distributed`` is used
  only by transformers' own layers (the all-reduce after ``o_proj`` and ``down_proj``).
* **Per-rank geometry is explicit in the cache** (``XQuantCache(..., tp_size=N)``): it allocates
  ``H/N`` heads per layer and its ``memory_report()`` is per rank. :func:`xquant_fx.optimize` finds
  ``N`` with :func:`kv_tensor_parallel_size`.
* **Detection reads what transformers records on the model**: ``model._tp_size`` (public as
  ``model.tp_size``), set by ``from_pretrained`` on transformers 5.x when it applies the plan
  (5.17 and 5.24 alike; ``None`` for a model loaded whole), and the resolved plan
  ``model.tp_plan``. KV heads are sharded when the plan shards a key projection (``k_proj``, fused
  ``qkv_proj`` / ``query_key_value``) column-wise without gathering its output, the same rule
  transformers applies to its own ``StaticCache``. A plan that keeps key projections whole (or
  gathers them) leaves every head on every rank: ``tp_size`` 1 for the cache.
* **Heads must divide across ranks, checked before anything is allocated.** transformers (5.17
  and 5.24 alike) loads a model whose heads do not divide across the ranks, splitting the
  projection columns unevenly: a rank gets a fraction of a head and the first forward fails inside
  attention's reshape (``shape '[1, 3, -1, 64]' is invalid``). :func:`split_kv_heads` refuses it up
  front, at ``optimize`` time, with a ``ValueError`` naming the head count and the world size.
* The cache's first update also checks the heads it really receives against this geometry, so a
  model sharded by other means, or a cache built without ``tp_size`` for a sharded model, fails
  with a message rather than reporting the wrong memory.
"""

from __future__ import annotations

from .hf import kv_geometry

# Output projections whose columns are the key heads, fused or not (transformers' names).
_KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")
# Plan styles that leave each rank a column slice of the output (styles ending in "_rep" or
# "_gather_output" gather it back to full width).
_HEAD_SHARDING_STYLES = ("colwise", "packed_colwise")


def split_kv_heads(num_kv_heads: int, tp_size: int, model_name: str = "the model") -> int:
    """KV heads per rank when ``num_kv_heads`` are sharded over ``tp_size`` ranks.

    Raises ``ValueError`` naming the head count, ``tp_size`` and (when ``torch.distributed`` is
    initialized) the world size when ``tp_size`` is not a positive int or does not divide the head
    count: a rank cannot hold part of a head.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int (tensor-parallel ranks), got {tp_size!r}")
    if num_kv_heads % tp_size:
        divisors = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
        raise ValueError(
            f"{model_name} has {num_kv_heads} KV heads, which do not divide across tp_size={tp_size} "
            f"tensor-parallel ranks{_world_size_note()}: each rank must hold a whole number of KV heads for "
            f"its share of the quantized cache. Run with a tensor-parallel size that divides {num_kv_heads} "
            f"(one of {divisors})."
        )
    return num_kv_heads // tp_size


def _world_size_note() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f" (world size {dist.get_world_size()})"
    return ""


def tensor_parallel_degree(model) -> int:
    """The tensor-parallel size transformers sharded ``model`` with (1 when it was loaded whole)."""
    size = getattr(model, "_tp_size", None)
    if size is None:
        size = getattr(model, "tp_size", None)
    return int(size) if size else 1


def shards_kv_heads(plan) -> bool:
    """Whether a resolved tensor-parallel plan (module pattern -> style) splits the key heads."""
    if not plan:
        return False
    return any(
        pattern.rsplit(".", 1)[-1] in _KEY_PROJECTIONS and style in _HEAD_SHARDING_STYLES
        for pattern, style in dict(plan).items()
    )


def kv_tensor_parallel_size(model) -> int:
    """Ranks the KV heads of ``model`` are split over: the ``tp_size`` its :class:`XQuantCache` needs.

    1 for a model loaded whole, or one whose plan keeps the key projections whole. Raises
    ``ValueError`` (naming the head count and the world size) when the model was sharded over a
    number of ranks that does not divide its KV heads.
    """
    tp = tensor_parallel_degree(model)
    if tp == 1:
        return 1
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None)
    if not shards_kv_heads(plan):
        return 1
    heads = kv_geometry(model.config)[1]
    split_kv_heads(heads, tp, type(model).__name__)
    return tp


def config_tensor_parallel_size(model_config) -> int:
    """``tp_size`` of the ``distributed_config`` transformers stores on a sharded model's config (1 if none)."""
    dist = getattr(model_config, "distributed_config", None)
    if dist is None:
        return 1
    size = dist.get("tp_size") if isinstance(dist, dict) else getattr(dist, "tp_size", None)
    return int(size) if size else 1
