"""The value rotation folded into the model's weights, so that it costs nothing at decode.

With ``XQuantConfig(rotation="hadamard")`` the cache stores ``v H`` (``H``: the normalized
Hadamard matrix of the head dim, orthogonal and symmetric, its own inverse) and reads rotate back;
the fuse pass moves the read's rotation onto the attention output, one ``xquant::hadamard`` per
layer and step. Attention is linear in the values, so the same rotation can live in the weights
instead: with ``v_proj``'s rows of each KV head multiplied by ``H`` the model computes ``v' = v H``
itself, attention over ``v'`` gives ``o' = o H`` per query head, and ``o_proj``'s columns of each
query head multiplied by ``H`` take ``o'`` back to the model's output::

    W_v'[h] = H W_v[h]      b_v'[h] = b_v[h] H      (W_v[h]: the D rows of KV head h)
    W_o'[:, h] = W_o[:, h] H                        (W_o[:, h]: the D columns of query head h)

:func:`fold_value_rotation` does this in float32 and marks the model's text config
(``xquant_value_rotation_folded``); every :class:`~xquant_fx.XQuantCache` built from that config
then stores values as they arrive (they are already rotated) and reads them back unrotated, so
no rotation of values runs anywhere. The keys' rotation cannot fold (RoPE sits between
``k_proj`` and the cache), so the query is still rotated once per layer and step.

Any combination stays exact, which is what makes the marker safe: a cache without rotation over a
folded model stores ``v'`` and the folded ``o_proj`` undoes it; a rotating cache that did not know
would store ``v' H = v`` and read back ``v'``: right answers, only the quantization in the
unrotated domain. The fold changes the weights by float rounding only (one bf16 rounding per
weight for a bf16 model).

:func:`~xquant_fx.optimize` folds when the config rotates and every attention layer is the plain
pattern (``v_proj`` and ``o_proj`` linear layers over whole heads, no norm on the values, weights
that are ordinary tensors: not sharded, not on the meta device); otherwise the rotation stays in
the graph. ``optimize(..., fold_rotation=False)`` keeps the weights as they are.
"""

from __future__ import annotations

import torch

from .hf import kv_geometry, text_config
from .quant import hadamard_matrix

#: Attribute of the model's text config that marks folded value rotations.
FOLDED_ATTR = "xquant_value_rotation_folded"


def value_rotation_folded(model_config) -> bool:
    """Whether the model of ``model_config`` computes its values rotated (:func:`fold_value_rotation`)."""
    return bool(getattr(text_config(model_config), FOLDED_ATTR, False))


def _attention_modules(model) -> list[torch.nn.Module] | None:
    """The modules holding each layer's ``v_proj`` / ``o_proj``, one per decoder layer, or None
    when the model is not the plain pattern the fold handles (module docstring)."""
    num_layers, kv_heads, _, v_dim = kv_geometry(model.config)
    cfg = text_config(model.config)
    q_heads = cfg.num_attention_heads
    found = [m for m in model.modules() if isinstance(getattr(m, "v_proj", None), torch.nn.Linear)
             and isinstance(getattr(m, "o_proj", None), torch.nn.Linear)]
    if len(found) != num_layers or v_dim < 1 or v_dim & (v_dim - 1):
        return None
    for m in found:
        if getattr(m, "v_norm", None) is not None:
            return None
        if m.v_proj.out_features != kv_heads * v_dim or m.o_proj.in_features != q_heads * v_dim:
            return None
        for p in (m.v_proj.weight, m.v_proj.bias, m.o_proj.weight):
            if p is not None and (type(p.data) is not torch.Tensor or p.device.type == "meta"):
                return None
    return found


@torch.no_grad()
def fold_value_rotation(model) -> int:
    """Fold the Hadamard rotation of values into ``v_proj`` and ``o_proj`` of every layer (module
    docstring) and mark the config; returns the number of layers folded: all of them, or 0 when
    the model is not the plain pattern or is folded already (nothing is changed then)."""
    if value_rotation_folded(model.config):
        return 0
    modules = _attention_modules(model)
    if modules is None:
        return 0
    _, _, _, d = kv_geometry(model.config)
    for m in modules:
        h = hadamard_matrix(d, m.v_proj.weight.device)
        wv = m.v_proj.weight
        rows = wv.float().reshape(-1, d, wv.shape[1])  # [Hkv, D, in]
        wv.copy_((h @ rows).reshape(wv.shape).to(wv.dtype))
        if m.v_proj.bias is not None:
            bv = m.v_proj.bias
            bv.copy_((bv.float().reshape(-1, d) @ h).reshape(bv.shape).to(bv.dtype))
        wo = m.o_proj.weight
        cols = wo.float().reshape(wo.shape[0], -1, d)  # [out, Hq, D]
        wo.copy_((cols @ h).reshape(wo.shape).to(wo.dtype))
    setattr(text_config(model.config), FOLDED_ATTR, True)
    return len(modules)
