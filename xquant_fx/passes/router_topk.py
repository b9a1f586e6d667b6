"""Pass ``router_topk``: each MoE router becomes one op, ``xquant::router`` (a whole softmax router)
or ``xquant::router_topk`` (its final top-k).

Pattern: the router top-k nodes that :func:`xquant_fx.passes.prune_moe_router.find_routers`
finds (one per MoE layer, over the expert scores, largest, last dim); nothing else (group
top-k of DeepSeek routers, top-k elsewhere in the model) is touched.

Rewrites:

* A softmax router -- the top-k reads ``softmax(F.linear(x, w), dim=-1)`` in float32 and nothing
  else reads the softmax (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 greedy; casts of the logits,
  or of ``x`` and ``w`` to float32 as DeepSeek does, looked through; logits narrower than float32
  only from ``x`` and ``w`` of their own dtype, so autocast's linear is left alone) -- becomes
  ``xquant::router(x, w, k, ...)``: linear, softmax and top-k in two launches (a GEMV spread over
  the GPU, then one program per token). The router's own normalization of its values
  (``v /= v.sum(-1, keepdim=True)``, their only other use) and a cast of the values
  (``v.to(dtype)``) go into the same op (``normalize``, ``values_dtype``). Other users of the
  logits read the op's third output; the op's fake implementation gives the new nodes'
  ``example_value``. At batch 1 on the H200 this took the Qwen3-30B-A3B router
  from four Inductor launches (cuBLAS GEMV 4.9 µs, softmax, ``torch.topk`` or our top-k,
  normalization) to two (``benchmarks/results/moe_profile.md``).
* Any other router top-k -> ``xquant::router_topk(scores, k)``: the same experts and values, in
  descending order, one launch (``torch.topk`` took two).

Where ``prune_moe_router`` only keeps a layer's ``keep`` best slots (no dynamic rule, no
renormalization of kept values) the op drops the others itself (``keep, fill, num_experts`` after
``k``) and the prune node goes: pruning then costs no launch of its own. Off CUDA both ops are the
torch code they replace.

Runs after ``prune_moe_router`` (which asks the same node for sorted slots, so the order is what
its rewrite expects), whether or not experts are pruned. Declines on graphs without a router
top-k, and on routers wider than the kernels take (``ops.ROUTER_TOPK_MAX_WIDTH`` experts);
idempotent (``find_routers`` counts both ops as router top-k, so a rewritten router is still the
widest top-k of its layer and is left alone).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F

from ..moe import prune_routes
from .match import find_routers, is_router_topk, is_softmax, meta_value

logger = logging.getLogger(__name__)

#: Rewrite whole softmax routers into ``xquant::router`` (``False``: only their top-k, for A/B runs).
WHOLE_ROUTER = True


def router_topk(gm: torch.fx.GraphModule, ctx=None) -> int:
    from .. import ops  # registers xquant::router_topk and xquant::router

    routers = {layer: r for layer, r in find_routers(gm).items()
               if not is_router_topk(r[0]) and r[1] <= ops.ROUTER_TOPK_MAX_WIDTH}
    if not routers:
        logger.debug("router_topk: declined (no router top-k left to rewrite)")
        return 0
    plan = getattr(ctx, "moe", None)
    for layer, (topk, _, k) in routers.items():
        pruned = _static_prune(topk, plan)
        drop = ()
        if pruned is not None:
            prune, num_experts, keep, logits = pruned
            drop = (keep, float("-inf") if logits else 0.0, num_experts)
        softmax_router = _softmax_router(topk) if WHOLE_ROUTER else None
        if softmax_router is None:
            with gm.graph.inserting_before(topk):
                fast = gm.graph.call_function(torch.ops.xquant.router_topk.default, (topk.args[0], k, *drop))
        else:
            x, weight, linear, logits_dtype = softmax_router
            with gm.graph.inserting_after(linear):
                fast = gm.graph.call_function(torch.ops.xquant.router.default, (x, weight, k, *drop),
                                              {"logits_dtype": logits_dtype})
        fast.meta.update(topk.meta)
        if pruned is not None:  # the op drops the slots itself: the prune node and top-k go
            prune.replace_all_uses_with(fast)
            gm.graph.erase_node(prune)
            for item in list(topk.users):
                gm.graph.erase_node(item)
        else:
            topk.replace_all_uses_with(fast)
        probs = topk.args[0]
        gm.graph.erase_node(topk)
        if softmax_router is not None:
            _take_router(gm, fast, probs, linear)
            if not drop or drop[1] == 0.0:
                _take_normalization(gm, fast)
            _take_values_cast(gm, fast)
            _fake_outputs(fast)
        logger.debug("router_topk: layer %d (k=%d, keep=%s, %s)", layer, k, drop[0] if drop else k,
                     "whole router" if softmax_router else "top-k")
    return len(routers)


def _is_float32_cast(node) -> bool:
    """``t.float()``, ``t.to(torch.float32)`` or ``t.type(torch.float32)``."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_method":
        return False
    if node.target == "float":
        return len(node.args) == 1 and not node.kwargs
    dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    return node.target in ("to", "type") and dtype is torch.float32 and len(node.args) + len(node.kwargs) == 2


def _input(node: torch.fx.Node):
    """The tensor a softmax or cast node reads (positional, or ``input=``)."""
    return node.args[0] if node.args else node.kwargs.get("input")


def _softmax_router(topk: torch.fx.Node):
    """``(x, weight, linear node, logits dtype)`` when the top-k reads ``softmax(F.linear(x, weight),
    dim=-1)`` in float32 (the softmax's only use; casts of the logits, ``x`` or ``weight`` to
    float32 looked through) with ``x [T, H]``, ``weight [E, H]``; else ``None``."""
    probs = topk.args[0]
    out = meta_value(probs)
    if not is_softmax(probs) or len(probs.users) != 1 or out is None or out.dtype != torch.float32:
        return None
    dim = probs.kwargs.get("dim", probs.args[1] if len(probs.args) > 1 else None)
    if dim not in (-1, out.dim() - 1):
        return None
    logits = _input(probs)
    if _is_float32_cast(logits) and len(logits.users) == 1:
        logits = logits.args[0]
    if not (isinstance(logits, torch.fx.Node) and logits.op == "call_function"
            and logits.target in (torch._C._nn.linear, F.linear)):
        return None
    args = list(logits.args) + [logits.kwargs.get(name) for name in ("input", "weight", "bias")][len(logits.args):]
    if len(args) > 2 and args[2] is not None:
        return None
    x, weight = args[:2]
    if _is_float32_cast(x) and _is_float32_cast(weight):  # DeepSeek: F.linear(x.float(), w.float())
        x, weight = x.args[0], weight.args[0]
    metas = [meta_value(n) for n in (x, weight, logits)]
    if any(v is None for v in metas) or metas[0].dim() != 2 or metas[1].dim() != 2:
        return None
    if metas[0].shape[1] != metas[1].shape[1]:
        return None
    # float32 logits from any inputs (DeepSeek-V2 keeps its gate weight in float32 in a bf16 model);
    # narrower logits only from inputs of that dtype (not autocast's bf16 linear of float32 inputs)
    if metas[2].dtype != torch.float32 and not metas[0].dtype == metas[1].dtype == metas[2].dtype:
        return None
    return x, weight, logits, metas[2].dtype


def _take_router(gm: torch.fx.GraphModule, fast: torch.fx.Node, probs: torch.fx.Node, linear: torch.fx.Node) -> None:
    """Erase the router's softmax, casts and linear now that ``fast`` computes them; other users
    of the logits read ``fast``'s third output."""
    chain = [probs]
    while chain[-1] is not linear:
        chain.append(_input(chain[-1]))
    for node in chain[:-1]:
        if not node.users:
            gm.graph.erase_node(node)
    if linear.users:
        with gm.graph.inserting_after(fast):
            logits = gm.graph.call_function(operator.getitem, (fast, 2))
        linear.replace_all_uses_with(logits)
    inputs = [a for a in linear.args if isinstance(a, torch.fx.Node)]
    gm.graph.erase_node(linear)
    for cast in inputs:
        if _is_float32_cast(cast) and not cast.users:
            gm.graph.erase_node(cast)


def _values(fast: torch.fx.Node):
    items = [u for u in fast.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    return items[0] if len(items) == 1 else None


def _take_normalization(gm: torch.fx.GraphModule, fast: torch.fx.Node) -> None:
    """``v /= v.sum(-1, keepdim=True)`` on the router's values becomes ``normalize=True``."""
    values = _values(fast)
    if values is None or len(values.users) != 2:
        return
    total = next((u for u in values.users if u.op == "call_method" and u.target == "sum"), None)
    div = next((u for u in values.users if u.op == "call_function"
                and u.target in (operator.itruediv, operator.truediv, torch.div)), None)
    if total is None or div is None or div.args[:2] != (values, total) or len(div.args) != 2 or div.kwargs:
        return
    reduced = {"dim": total.args[1], **total.kwargs} if len(total.args) == 2 else total.kwargs
    if list(total.users) != [div] or total.args[0] is not values or len(total.args) > 2 or reduced not in (
            {"dim": -1, "keepdim": True}, {"dim": (-1,), "keepdim": True}):
        return
    div.replace_all_uses_with(values)
    gm.graph.erase_node(div)
    gm.graph.erase_node(total)
    fast.update_kwarg("normalize", True)


def _fake_outputs(fast: torch.fx.Node) -> None:
    """``example_value`` of ``fast`` and its items, from the op's fake implementation (the top-k's
    had two outputs; the op has three, and its values may now be cast); dropped where the inputs
    carry no fake tensors."""
    def fake(a):
        return meta_value(a) if isinstance(a, torch.fx.Node) else a

    args, kwargs = [fake(a) for a in fast.args], {k: fake(v) for k, v in fast.kwargs.items()}
    mode = getattr(args[0], "fake_mode", None)
    items = [u for u in fast.users if u.op == "call_function" and u.target is operator.getitem]
    for node in (fast, *items):
        node.meta.pop("val", None)
        node.meta.pop("example_value", None)
    if mode is None or any(a is None for a in args[:2]):
        return
    with mode:
        outputs = fast.target(*args, **kwargs)
    fast.meta["example_value"] = outputs
    for item in items:
        item.meta["example_value"] = outputs[item.args[1]]


def _take_values_cast(gm: torch.fx.GraphModule, fast: torch.fx.Node) -> None:
    """``values.to(dtype)`` (the values' only use) becomes ``values_dtype=dtype``."""
    values = _values(fast)
    if values is None or len(values.users) != 1:
        return
    (cast,) = values.users
    dtype = cast.args[1] if len(cast.args) == 2 else cast.kwargs.get("dtype")
    if cast.op != "call_method" or cast.target not in ("to", "type") or not isinstance(dtype, torch.dtype):
        return
    if len(cast.args) + len(cast.kwargs) != 2 or not dtype.is_floating_point:
        return
    cast.replace_all_uses_with(values)
    gm.graph.erase_node(cast)
    fast.update_kwarg("values_dtype", dtype)


def _static_prune(topk: torch.fx.Node, plan):
    """``(prune node, num_experts, keep, logits)`` when the top-k's only consumer is the
    :func:`~xquant_fx.moe.prune_routes` node of a plan that just keeps the ``keep`` best slots
    (no per-token rule, no renormalization of kept values); else ``None``. DeepSeek-V3 also
    gathers by the unpruned indices, so its prune node stays."""
    if plan is None or plan.dynamic:
        return None
    if not all(u.op == "call_function" and u.target is operator.getitem for u in topk.users):
        return None
    consumers = {c for item in topk.users for c in item.users}
    if len(consumers) != 1:
        return None
    (prune,) = consumers
    if prune.op != "call_function" or prune.target is not prune_routes:
        return None
    num_experts, keep, logits = (prune.kwargs[name] for name in ("num_experts", "keep", "logits"))
    if plan.renormalize and not logits:  # prune_routes rescales the kept values: not a plain drop
        return None
    return prune, num_experts, keep, logits
