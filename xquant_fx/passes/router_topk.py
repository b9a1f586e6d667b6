"""Pass ``router_topk``: each MoE router's final top-k becomes ``xquant::router_topk``.

Pattern: the router top-k nodes that :func:`xquant_fx.passes.prune_moe_router.find_routers`
finds (one per MoE layer, over the expert scores, largest, last dim); nothing else (group
top-k of DeepSeek routers, top-k elsewhere in the model) is touched.

Rewrite: ``topk(scores, k, ...)`` -> ``xquant::router_topk(scores, k)``: the same experts and
values, in descending order. Where ``prune_moe_router`` only keeps a layer's ``keep`` best slots
(no dynamic rule, no renormalization of kept values) the op drops the others itself
(``router_topk(scores, k, keep, fill, num_experts)``) and the prune node goes: pruning then costs
no launch of its own. At decode a router top-k is a few microseconds of a ~40 µs MoE layer
step on the H200 (``torch.topk`` launched a partial-sort and a bitonic-sort kernel for 128
experts; ``benchmarks/results/moe_profile.md``); the op's kernel is one launch. Off CUDA the op
is ``torch.topk`` itself.

Runs after ``prune_moe_router`` (which asks the same node for sorted slots, so the order is what
its rewrite expects), whether or not experts are pruned. Declines on graphs without a router
top-k, and on routers wider than the kernel takes (``ops.ROUTER_TOPK_MAX_WIDTH`` experts);
idempotent (``find_routers`` counts ``xquant::router_topk`` nodes as router top-k, so a
rewritten router is still the widest top-k of its layer and is left alone).
"""

from __future__ import annotations

import logging
import operator

import torch

from ..moe import prune_routes
from .prune_moe_router import find_routers, is_router_topk

logger = logging.getLogger(__name__)


def router_topk(gm: torch.fx.GraphModule, ctx=None) -> int:
    from .. import ops  # registers xquant::router_topk

    fast_op = torch.ops.xquant.router_topk.default
    routers = {layer: r for layer, r in find_routers(gm).items()
               if not is_router_topk(r[0]) and r[1] <= ops.ROUTER_TOPK_MAX_WIDTH}
    if not routers:
        logger.debug("router_topk: declined (no router top-k left to rewrite)")
        return 0
    plan = getattr(ctx, "moe", None)
    for layer, (topk, _, k) in routers.items():
        pruned = _static_prune(topk, plan)
        args = (topk.args[0], k)
        if pruned is not None:
            prune, num_experts, keep, logits = pruned
            args += (keep, float("-inf") if logits else 0.0, num_experts)
        with gm.graph.inserting_before(topk):
            fast = gm.graph.call_function(fast_op, args)
        fast.meta.update(topk.meta)
        if pruned is not None:  # the op drops the slots itself: the prune node and top-k go
            prune.replace_all_uses_with(fast)
            gm.graph.erase_node(prune)
            for item in list(topk.users):
                gm.graph.erase_node(item)
        else:
            topk.replace_all_uses_with(fast)
        gm.graph.erase_node(topk)
        logger.debug("router_topk: layer %d (k=%d, keep=%s)", layer, k, pruned[2] if pruned else k)
    return len(routers)


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
    if prune.op != "call_function" or prune.target is not prune_routes or len(prune.args) < 8:
        return None
    _, _, num_experts, keep, *_, logits = prune.args[:8]
    if plan.renormalize and not logits:  # prune_routes rescales the kept values: not a plain drop
        return None
    return prune, num_experts, keep, logits
