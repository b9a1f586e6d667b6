"""Replace the ``xquant::hadamard`` rotations left in a graph by plain torch that Inductor compiles.

A rotating cache (``XQuantConfig.rotation="hadamard"``) rotates each new key and value before
storing it, and :mod:`~xquant_fx.passes.fuse_kv_attention` leaves one rotation of the query (and,
unless the value rotation was folded into the weights, one of the attention output) around each
fused ``attend``. As a custom op, ``xquant::hadamard`` is opaque to Inductor: every call is an
extern call, a matmul between two casts. This pass, which runs after the fusion (the fusion finds
rotations by this op), rewrites each call::

    y = xquant.hadamard(x)          ->      y = quant.hadamard_butterfly(x)

the fast Walsh-Hadamard transform of ``x`` (``log2 d`` add/subtract steps on views of ``x``): no
matrix to build or hold, only pointwise ops the compiler fuses with the casts and the ops around
them. Under ``torch.export`` (``xquant_fx.export``) the same happens, so a package needs no
``xquant::hadamard`` at run time. Never declines: every remaining call is rewritten (results equal
up to float32 rounding order).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from .. import quant
from .match import is_call

logger = logging.getLogger(__name__)


def inline_rotations(gm: fx.GraphModule, ctx=None) -> int:
    """Rewrite every ``xquant::hadamard`` call of ``gm`` as
    :func:`xquant_fx.quant.hadamard_butterfly`; returns how many."""
    op = getattr(torch.ops.xquant, "hadamard", None)
    if op is None:  # the ops are not registered: nothing of ours in the graph
        return 0
    hits = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, op.default):
            continue
        with gm.graph.inserting_before(node):
            inline = gm.graph.call_function(quant.hadamard_butterfly, (node.args[0],))
        inline.meta.update(node.meta)
        node.replace_all_uses_with(inline)
        gm.graph.erase_node(node)
        hits += 1
    return hits
