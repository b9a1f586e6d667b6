"""Pass ``prune_moe_router``: fewer activated experts per MoE layer (:mod:`xquant_fx.moe`).

Pattern, per MoE layer of a Dynamo graph: the router's *final* top-k, i.e. of the ``topk`` calls
made inside the layer's router module (``nn_module_stack``), the one over the widest input (the
expert scores, last dim = number of experts): Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE have one,
DeepSeek-V2 group-limited two (groups, then experts), DeepSeek-V3 three (two over groups). The
earlier ones choose groups and are left alone, as are shared experts.

Rewrite: the top-k is asked for sorted slots (``sorted=True``; DeepSeek routers pass ``False``),
and after its ``(values, indices)`` a :func:`xquant_fx.moe.prune_routes` node drops
slots per the plan (static ``k`` per layer, dynamic ``min_weight`` / ``top_p``, optional
renormalization); every user of the indices and values reads the pruned ones. Shapes do not
change: dropped slots hold the sentinel expert ``num_experts`` with value 0 (``-inf`` if the
values feed a softmax), so the router's own normalization and scaling run as traced. A ``gather``
of weights by the indices (DeepSeek-V3) becomes :func:`xquant_fx.moe.prune_gather`. Since the
slots are sorted, every slot from the layer's ``keep`` on is a sentinel: an ``xquant::moe_experts``
node that reads the pruned indices is told so (``keep``), and launches no work for them.

Declines (0 hits) when the backend was given no MoE options, on graphs without a router top-k
(dense models), and on layers whose plan keeps every slot. Refuses (raises) when a pruned layer's
experts are not ``xquant::moe_experts`` (the only experts that skip the sentinel), or when the
router it finds does not match the model the plan was made for. Idempotent: a top-k already
followed by ``prune_routes`` is skipped.
"""

from __future__ import annotations

import logging
import operator

import torch

from ..moe import MoEPlan, layer_of, prune_gather, prune_routes
from .match import find_routers, is_router_topk, is_softmax, k_position, module_path

logger = logging.getLogger(__name__)


def _is_gather(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.gather) or (
        node.op == "call_method" and node.target == "gather"
    )


def _is_experts(node: torch.fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and "xquant.moe_experts" in str(target)


def _sort_topk(node: torch.fx.Node) -> None:
    """Make a top-k node return its slots in descending order (``sorted=True``): the same experts
    and values, ranked by position, so :func:`prune_routes` needs no sort of its own."""
    if is_router_topk(node):
        return  # sorted by definition
    if len(node.args) > 4:
        node.args = (*node.args[:4], True, *node.args[5:])
    elif node.kwargs.get("sorted", True) is not True:
        node.kwargs = {**node.kwargs, "sorted": True}


def _getitem(gm: torch.fx.GraphModule, node: torch.fx.Node, index: int) -> torch.fx.Node:
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == index:
            return user
    with gm.graph.inserting_after(node):
        return gm.graph.call_function(operator.getitem, (node, index))


def _already_pruned(node: torch.fx.Node) -> bool:
    """Followed by ``prune_routes``, or an ``xquant::router_topk`` that drops slots itself."""
    if is_router_topk(node) and len(node.args) > k_position(node) + 1:
        return True
    return any(
        u.target is prune_routes for g in node.users for u in g.users if u.op == "call_function"
    )


def prune_moe_router(gm: torch.fx.GraphModule, ctx=None) -> int:
    plan: MoEPlan | None = getattr(ctx, "moe", None)
    if plan is None:
        logger.debug("prune_moe_router: declined (no MoE options)")
        return 0
    routers = find_routers(gm)
    if not routers:
        logger.debug("prune_moe_router: declined (no router top-k: dense model or no MoE layer in this graph)")
        return 0
    keep = plan.keep_per_layer({layer: (width, k) for layer, (_, width, k) in routers.items()})
    experts_nodes = [n for n in gm.graph.nodes if _is_experts(n)]
    experts_layers = {layer_of(module_path(n)) for n in experts_nodes}
    if None in experts_layers:  # unnumbered blocks: one experts node per router, in order
        experts_layers = set(range(len(experts_nodes)))
    hits = 0
    for layer, (topk, num_experts, k) in routers.items():
        if keep[layer] >= k and not plan.dynamic and not plan.renormalize:
            continue
        if _already_pruned(topk):
            continue
        if layer not in experts_layers:
            raise ValueError(
                f"decoder layer {layer}: the experts are not `xquant::moe_experts`, the only experts that skip the "
                f"sentinel slots pruning leaves (expert id {num_experts}); call xquant_fx.optimize(model, ...) or "
                "xquant_fx.moe.install_experts(model) before torch.compile"
            )
        _sort_topk(topk)
        values = _getitem(gm, topk, 0)
        indices = _getitem(gm, topk, 1)
        logits = any(is_softmax(u) for u in values.users)
        anchor = max(values, indices, key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_after(anchor):
            routed = gm.graph.call_function(
                prune_routes,
                (values, indices),
                dict(num_experts=num_experts, keep=keep[layer], min_weight=plan.min_weight, top_p=plan.top_p,
                     renormalize=plan.renormalize, logits=logits, ranked=True),
            )
        with gm.graph.inserting_after(routed):
            new_values = gm.graph.call_function(operator.getitem, (routed, 0))
        with gm.graph.inserting_after(new_values):
            new_indices = gm.graph.call_function(operator.getitem, (routed, 1))
        for user in list(indices.users):
            if user is routed:
                continue
            if _is_gather(user):
                source = user.args[0]
                dim = user.args[1] if len(user.args) > 1 else user.kwargs["dim"]
                with gm.graph.inserting_before(user):
                    safe = gm.graph.call_function(
                        prune_gather, (source, dim, indices, new_indices, num_experts, plan.renormalize)
                    )
                safe.meta.update(user.meta)
                user.replace_all_uses_with(safe)
                gm.graph.erase_node(user)
            else:
                user.replace_input_with(indices, new_indices)
        for user in list(values.users):
            if user is not routed:
                user.replace_input_with(values, new_values)
        for node in (routed, new_values, new_indices):
            node.meta["nn_module_stack"] = dict(topk.meta.get("nn_module_stack", {}))
        if keep[layer] < k:  # slots from keep on are sentinels: the experts need not launch work for them
            for user in list(new_indices.users):
                ids = user.args[1] if len(user.args) > 1 else user.kwargs.get("ids")
                if _is_experts(user) and ids is new_indices:
                    user.update_kwarg("keep", keep[layer])
        hits += 1
        logger.debug("prune_moe_router: layer %d keeps %d of %d experts", layer, keep[layer], k)
    return hits
