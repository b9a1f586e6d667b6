"""FX matching helpers the passes share: example values and shapes of nodes, calls of an op, the
module a node was traced in, and the MoE routers of a graph (:func:`find_routers`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..moe import layer_of


def is_call(node, overload) -> bool:
    """Whether ``node`` calls ``overload`` (Dynamo records custom ops as the overload packet)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    return target is overload


def is_router_topk(node: torch.fx.Node) -> bool:
    """What the ``router_topk`` pass makes of a router's top-k: an ``xquant::router_topk`` node, or
    an ``xquant::router`` node (the whole softmax router)."""
    return node.op == "call_function" and str(node.target).startswith(("xquant.router_topk.", "xquant.router."))


def is_whole_router(node: torch.fx.Node) -> bool:
    """An ``xquant::router`` node: ``(x, weight, k, ...)``, its width the weight's rows."""
    return node.op == "call_function" and str(node.target).startswith("xquant.router.")


def k_position(node: torch.fx.Node) -> int:
    """Index of ``k`` in the arguments of an :func:`is_router_topk` node (``keep`` follows it)."""
    return 2 if is_whole_router(node) else 1


def is_topk(node: torch.fx.Node) -> bool:
    """A top-k node: torch's, or ``xquant::router_topk``."""
    if node.op == "call_function":
        return node.target in (torch.topk, torch.ops.aten.topk.default, torch.ops.aten.topk) or is_router_topk(node)
    return node.op == "call_method" and node.target == "topk"


def is_softmax(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.softmax, F.softmax, torch.ops.aten._softmax.default)
    return node.op == "call_method" and node.target == "softmax"


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def meta_value(node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for ``node``, if it is a node with one."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def node_shape(node) -> tuple | None:
    """The example shape of ``node``: ints, and ``SymInt`` s where Dynamo made a dimension dynamic
    (the batch of a decode step that serves several batch sizes). Never ``int()`` a ``SymInt``
    here: that would specialize the compiled step to the example's size."""
    value = meta_value(node)
    return tuple(value.shape) if value is not None else None


def topk_args(node: torch.fx.Node) -> tuple[int, int] | None:
    """(k, dim) of a top-k node, or ``None`` when not plain integers."""
    if is_router_topk(node):
        return node.args[k_position(node)], -1
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
        if not is_topk(node):
            continue
        path = module_path(node)
        args = topk_args(node)
        shape = node_shape(node.args[0])
        if shape is not None and is_whole_router(node):  # (x, weight, k): [E, H] weight
            weight = node_shape(node.args[1])
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
