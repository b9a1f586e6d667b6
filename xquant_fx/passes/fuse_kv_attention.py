"""Fuse a quantized-cache read and the attention that consumes it into ``xquant::attend``.

Matches, in the Dynamo FX graph (torch-level IR, before AOT autograd)::

    keys   = xquant.read_keys(k_codes, k_scale, k_zero, k_window, n, k_bits, group, T[, k_sink])  # [b, Hkv, T, Dk]
    values = xquant.read_values(v_codes, v_scale, v_zero, v_window, n, v_bits, v_group, T[, v_sink])
    K, V   = repeat_kv(keys), repeat_kv(values)        # x[:, :, None].expand(b, Hkv, r, T, D).reshape(b, Hkv*r, T, D)
                                                       #   or nothing, with enable_gqa=True
    out    = scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=s)     # q: [b, Hq, Lq, Dk]

and replaces ``out`` with ``xquant.attend(q, k_codes, ..., v_window, n, k_bits, v_bits, group, s,
mask[, k_sink, v_sink])`` (``attend`` reads the value group, ``XQuantConfig.value_group_size``,
from the value storage's shape): one pass over the packed codes instead of dequantizing the whole cache to bf16 and
reading it again. The reads are erased when nothing else uses them.

A rotating cache (``XQuantConfig.rotation``) reads ``keys = xquant.hadamard(read_keys(...))``
(likewise values): the cache stores rotated tensors and rotates reads back. The pass then keeps
the stored domain and moves the rotation to the cheap side, as scores and outputs allow because
the matrix is orthogonal and its own inverse: ``q' = hadamard(q)`` when keys are rotated (``q' .
Hk = q . k``) and ``out = hadamard(attend(q', ...))`` when values are rotated (attention over
``Hv`` gives ``H out``). The attend kernel needs no change.

Declines (logged at DEBUG) when: the key/value chain is anything but the GQA repeat above (any
other reshaping could reorder heads), keys and values come from different ``n`` or one has sink
tokens and the other not, the value read's group is not its storage's, dropout is on,
``is_causal`` is set, the query has more than ``MAX_QUERY_LEN`` rows (prefill stays on SDPA),
or the query's heads, length or head_dim are not static (the batch may be dynamic).
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from .match import is_call, node_shape

logger = logging.getLogger(__name__)

MAX_QUERY_LEN = 16
_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _static(*dims) -> bool:
    """Every dim a known number: an int, or a ``SymInt`` whose expression is a constant (what
    ``torch.export`` records for sizes it did not make dynamic)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return all(is_concrete_int(d) for d in dims)


def _strip_contiguous(node):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "contiguous":
        node = node.args[0]
    return node


def _source_of_repeat(node, hq: int):
    """If ``node`` is ``src[:, :, None].expand(b, Hkv, r, T, D).reshape(b, Hq, T, D)`` (transformers'
    ``repeat_kv``) return ``src``; else None. The new axis must sit right after the head axis: any
    other placement would give head ``h`` the KV head ``h % Hkv`` instead of ``h // r``."""
    if not (node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    expand = _strip_contiguous(node.args[0])
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    inserted = expand.args[0]
    if not isinstance(inserted, fx.Node):
        return None
    if inserted.op == "call_function" and inserted.target is operator.getitem:
        src, index = inserted.args
        full = slice(None)
        ok = isinstance(index, tuple) and len(index) >= 3 and index[2] is None
        ok = ok and all(i == full for i in index[:2]) and all(i == full or i is Ellipsis for i in index[3:])
    elif inserted.op == "call_method" and inserted.target == "unsqueeze":
        src, dim = inserted.args
        ok = dim == 2
    else:
        return None
    src_shape = node_shape(src)
    if not ok or src_shape is None or len(src_shape) != 4:
        return None
    b, hkv, t, d = src_shape
    if (not _static(hkv, d) or hq % hkv or node_shape(expand) != (b, hkv, hq // hkv, t, d)
            or node_shape(node) != (b, hq, t, d)):
        return None
    return src


def _read_node(node, op, hq: int, gqa: bool):
    """``(read, rotated)``: the ``op`` (read_keys / read_values) node behind attention argument
    ``node`` and whether an ``xquant.hadamard`` sits between them; ``(None, False)`` if none."""
    hadamard = torch.ops.xquant.hadamard.default
    node = _strip_contiguous(node)
    if not isinstance(node, fx.Node):
        return None, False
    if is_call(node, op) or is_call(node, hadamard):
        shape = node_shape(node)
        if shape is None or not (gqa or shape[1] == hq):
            return None, False
    else:
        node = _source_of_repeat(node, hq)
        if node is None:
            return None, False
    rotated = is_call(node, hadamard)
    if rotated:
        node = node.args[0]
    return (node, rotated) if is_call(node, op) else (None, False)


def _read_args(node) -> tuple:
    """``(codes, scale, zero, window, n, bits, group, length, sink)`` of a read op node (``sink``
    None when the layer keeps no sink tokens)."""
    names = ("codes", "scale", "zero", "window", "n", "bits", "group", "length", "sink")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return tuple(args.get(name) for name in names)


def _sdpa_args(node) -> dict:
    args = dict(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def fuse_kv_attention(gm: fx.GraphModule, ctx=None) -> int:
    read_keys = torch.ops.xquant.read_keys.default
    read_values = torch.ops.xquant.read_values.default
    attend = torch.ops.xquant.attend.default
    hits = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        a = _sdpa_args(node)
        q_shape = node_shape(a["query"])
        if q_shape is None or len(q_shape) != 4 or not _static(*q_shape[1:]):
            logger.debug("fuse_kv_attention: %s declined, query heads / length / head_dim not static", node.name)
            continue
        b, hq, lq, dk = q_shape
        if lq > MAX_QUERY_LEN or a.get("dropout_p", 0.0) or a.get("is_causal", False):
            logger.debug("fuse_kv_attention: %s declined (Lq=%d, dropout/is_causal set)", node.name, lq)
            continue
        gqa = bool(a.get("enable_gqa", False))
        k_read, k_rotated = _read_node(a["key"], read_keys, hq, gqa)
        v_read, v_rotated = _read_node(a["value"], read_values, hq, gqa)
        if k_read is None or v_read is None:
            logger.debug("fuse_kv_attention: %s declined, key/value are not a GQA view of xquant reads", node.name)
            continue
        kc, ks, kz, kw, n, kb, group, length, k_sink = _read_args(k_read)
        vc, vs, vz, vw, n_v, vb, group_v, length_v, v_sink = _read_args(v_read)
        if n is not n_v or length != length_v or (k_sink is None) != (v_sink is None):
            logger.debug("fuse_kv_attention: %s declined, keys and values disagree on n/length/sinks", node.name)
            continue
        # attend takes the key group and reads the values' from their storage (quant.value_group); a
        # read whose group disagrees with its storage's shape (where the graph records it) stays
        vs_shape, vw_shape = node_shape(vs), node_shape(vw)
        if vs_shape is not None and vw_shape is not None and _static(vs_shape[-1], vw_shape[-1]) \
                and vw_shape[-1] != vs_shape[-1] * group_v:
            logger.debug("fuse_kv_attention: %s declined, the value read's group %s is not its storage's", node.name,
                         group_v)
            continue
        scale = a.get("scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(dk)
        hadamard = torch.ops.xquant.hadamard.default
        with gm.graph.inserting_before(node):
            query = gm.graph.call_function(hadamard, (a["query"],)) if k_rotated else a["query"]
            if k_rotated:
                query.meta.update(a["query"].meta)
            fused = gm.graph.call_function(
                attend, (query, kc, ks, kz, kw, vc, vs, vz, vw, n, kb, vb, group, scale, a.get("attn_mask"))
                + ((k_sink, v_sink) if k_sink is not None else ())
            )
            fused.meta.update(node.meta)
            out = fused
            if v_rotated:
                out = gm.graph.call_function(hadamard, (fused,))
                out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        _erase_unused_chain(gm, (a["key"], a["value"]))
        hits += 1
    return hits


def _erase_unused_chain(gm: fx.GraphModule, roots) -> None:
    """Erase the now unused repeat chains and reads (pure ops only)."""
    stack = [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        node = stack.pop()
        if node.users or node.op not in ("call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        stack.extend(inputs)
