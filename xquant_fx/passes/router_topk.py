"""Pass ``router_topk``: each MoE router's final top-k becomes ``xquant::router_topk``.

Pattern: the router top-k nodes that :func:`xquant_fx.passes.prune_moe_router.find_routers`
finds (one per MoE layer, over the expert scores, largest, last dim); nothing else (group
top-k of DeepSeek routers, top-k elsewhere in the model) is touched.

Rewrite: ``topk(scores, k, ...)`` -> ``xquant::router_topk(scores, k)``: the same experts and
values, in descending order. At decode a router top-k is a few microseconds of a ~40 µs MoE layer
step on the H200 (``torch.topk`` launched a partial-sort and a bitonic-sort kernel for 128
experts; ``benchmarks/results/moe_profile.md``); the op's kernel is one launch. Off CUDA the op
is ``torch.topk`` itself.

Runs after ``prune_moe_router`` (which asks the same node for sorted slots, so the order is what
its rewrite expects), whether or not experts are pruned. Declines on graphs without a router
top-k; idempotent (``find_routers`` counts ``xquant::router_topk`` nodes as router top-k, so a
rewritten router is still the widest top-k of its layer and is left alone).
"""

from __future__ import annotations

import logging

import torch

from .prune_moe_router import find_routers

logger = logging.getLogger(__name__)


def router_topk(gm: torch.fx.GraphModule, ctx=None) -> int:
    from .. import ops  # noqa: F401  (registers xquant::router_topk)

    fast_op = torch.ops.xquant.router_topk.default
    routers = {layer: r for layer, r in find_routers(gm).items() if r[0].target is not fast_op}
    if not routers:
        logger.debug("router_topk: declined (no router top-k left to rewrite)")
        return 0
    for layer, (topk, _, k) in routers.items():
        with gm.graph.inserting_before(topk):
            fast = gm.graph.call_function(torch.ops.xquant.router_topk.default, (topk.args[0], k))
        fast.meta.update(topk.meta)
        topk.replace_all_uses_with(fast)
        gm.graph.erase_node(topk)
        logger.debug("router_topk: layer %d (k=%d)", layer, k)
    return len(routers)
