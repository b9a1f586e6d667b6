"""Pass ``prune_moe_router``: fewer activated experts per MoE layer (DESIGN §3).

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
import torch.nn.functional as F

from ..config import XQuantConfig
from ..moe import MoEPlan, layer_of, prune_gather, prune_routes

logger = logging.getLogger(__name__)


def is_router_topk(node: torch.fx.Node) -> bool:
    """What the ``router_topk`` pass makes of a router's top-k: an ``xquant::router_topk`` node, or
    an ``xquant::router`` node (the whole softmax router)."""
    return node.op == "call_function" and str(node.target).startswith(("xquant.router_topk.", "xquant.router."))


def _is_whole_router(node: torch.fx.Node) -> bool:
    """An ``xquant::router`` node: ``(x, weight, k, ...)``, its width the weight's rows."""
    return node.op == "call_function" and str(node.target).startswith("xquant.router.")


def _k_position(node: torch.fx.Node) -> int:
    """Index of ``k`` in the arguments of an :func:`is_router_topk` node (``keep`` follows it)."""
    return 2 if _is_whole_router(node) else 1


def _is_topk(node: torch.fx.Node) -> bool:
    """A top-k node: torch's, or ``xquant::router_topk``."""
    if node.op == "call_function":
        return node.target in (torch.topk, torch.ops.aten.topk.default, torch.ops.aten.topk) or is_router_topk(node)
    return node.op == "call_method" and node.target == "topk"


def _is_softmax(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.softmax, F.softmax, torch.ops.aten._softmax.default)
    return node.op == "call_method" and node.target == "softmax"


def _is_gather(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.gather) or (
        node.op == "call_method" and node.target == "gather"
    )


def _is_experts(node: torch.fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and "xquant.moe_experts" in str(target)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def meta_value(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for ``node``, if it is a node with one."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node) -> tuple[int, ...] | None:
    value = meta_value(node)
    return tuple(value.shape) if value is not None else None


def _topk_args(node: torch.fx.Node) -> tuple[int, int] | None:
    """(k, dim) of a top-k node, or ``None`` when not plain integers."""
    if is_router_topk(node):
        return node.args[_k_position(node)], -1
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    largest = node.args[3] if len(node.args) > 3 else node.kwargs.get("largest", True)
    if not isinstance(k, int) or not isinstance(dim, int) or largest is not True:
        return None
    return k, dim


def find_routers(gm: torch.fx.GraphModule) -> dict[int, tuple[torch.fx.Node, int, int]]:
    """Decoder layer -> (final router top-k node, number of experts, k), in graph order."""
    per_layer: dict[int, list[tuple[torch.fx.Node, int, int]]] = {}
    unnumbered: dict[str, int] = {}  # a graph of MoE blocks outside a decoder stack: number by order
    for node in gm.graph.nodes:
        if not _is_topk(node):
            continue
        path = _module_path(node)
        args = _topk_args(node)
        shape = _shape(node.args[0])
        if shape is not None and _is_whole_router(node):  # (x, weight, k): [E, H] weight
            weight = _shape(node.args[1])
            shape = weight[:1] if weight else None
        if args is None or shape is None or "gate" not in path.rsplit(".", 1)[-1]:
            continue
        layer = layer_of(path)
        if layer is None:
            layer = unnumbered.setdefault(path, len(unnumbered))
        k, dim = args
        if dim not in (-1, len(shape) - 1):
            continue
        per_layer.setdefault(layer, []).append((node, shape[-1], k))
    routers = {}
    for layer, candidates in per_layer.items():
        widest = max(width for _, width, _ in candidates)
        routers[layer] = [c for c in candidates if c[1] == widest][-1]
    return dict(sorted(routers.items()))


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
    if is_router_topk(node) and len(node.args) > _k_position(node) + 1:
        return True
    return any(
        u.target is prune_routes for g in node.users for u in g.users if u.op == "call_function"
    )


def _keep_per_layer(plan: MoEPlan, routers: dict) -> dict[int, int]:
    if plan.top_k is not None:
        missing = sorted(set(routers) - set(plan.top_k))
        if missing:
            raise ValueError(f"graph has MoE routers in decoder layers {missing} that the plan does not know")
        for layer, (_, width, k) in routers.items():
            expected = plan.experts.get(layer)
            if expected is not None and tuple(expected) != (width, k):
                raise ValueError(
                    f"decoder layer {layer}: the router's top-k picks {k} of {width} experts, but the plan was made "
                    f"for {expected[1]} of {expected[0]}"
                )
        return {layer: plan.top_k[layer] for layer in routers}
    model_ks = {k for _, _, k in routers.values()}
    if len(model_ks) != 1:
        raise ValueError(f"routers of this graph pick different top-k {sorted(model_ks)}; give moe_top_k per layer")
    ks = XQuantConfig(moe_top_k=plan.spec).resolve_moe_top_k(len(routers), model_ks.pop())
    return dict(zip(routers, ks))


def prune_moe_router(gm: torch.fx.GraphModule, ctx=None) -> int:
    plan: MoEPlan | None = getattr(ctx, "moe", None)
    if plan is None:
        logger.debug("prune_moe_router: declined (no MoE options)")
        return 0
    routers = find_routers(gm)
    if not routers:
        logger.debug("prune_moe_router: declined (no router top-k: dense model or no MoE layer in this graph)")
        return 0
    keep = _keep_per_layer(plan, routers)
    experts_nodes = [n for n in gm.graph.nodes if _is_experts(n)]
    experts_layers = {layer_of(_module_path(n)) for n in experts_nodes}
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
        logits = any(_is_softmax(u) for u in values.users)
        anchor = max(values, indices, key=lambda n: list(gm.graph.nodes).index(n))
        with gm.graph.inserting_after(anchor):
            routed = gm.graph.call_function(
                prune_routes,
                (values, indices, num_experts, keep[layer], plan.min_weight, plan.top_p, plan.renormalize, logits, True),
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
