"""Model plumbing: the MoE blocks of a transformers model (:func:`find_moe_layers`) and routing their
experts through ``xquant::moe_experts`` (:func:`install_experts`), sentinel slots included."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


def fused_layout(module: torch.nn.Module) -> bool:
    """Whether a transformers experts module has the layout ``xquant::moe_experts`` computes:
    concatenated ``gate_up_proj [E, 2I, H]`` (gate first), ``down_proj [E, H, I]``, SiLU, no
    biases, no post-expert norm."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")
    return (
        silu
        and getattr(module, "has_gate", False)
        and not getattr(module, "has_bias", True)
        and not getattr(module, "is_transposed", True)
        and getattr(module, "is_concatenated", False)
        and not getattr(module, "has_post_expert_norm", False)
        and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(module, "down_proj", None), torch.Tensor)
    )


def _generic_experts(module, hidden_states, top_k_index, top_k_weights):
    """Any experts module of transformers' interface, sentinel-safe (slow path, every layout)."""
    num_experts = module.num_experts
    k = top_k_index.shape[-1]
    valid = top_k_index < num_experts
    ids = top_k_index.clamp(max=num_experts - 1).reshape(-1)
    weights = torch.where(valid, top_k_weights, 0).reshape(-1)
    selected = hidden_states.repeat_interleave(k, dim=0)
    out = hidden_states.new_zeros((selected.shape[0], hidden_states.shape[-1]), dtype=torch.float32)
    for e in range(num_experts):
        rows = ids == e
        single = _single_expert(module, e, selected)
        out = out + torch.where(rows.unsqueeze(-1), single.float(), 0.0)
    out = out * weights.float().unsqueeze(-1)
    return out.view(-1, k, out.shape[-1]).sum(1).to(hidden_states.dtype)


def _single_expert(module, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up = module.gate_up_proj[e] if module.has_gate else module.up_proj[e]
    if module.is_transposed:
        proj = x @ gate_up
    else:
        proj = x @ gate_up.transpose(0, 1)
    if module.has_bias:
        proj = proj + (module.gate_up_proj_bias[e] if module.has_gate else module.up_proj_bias[e])
    proj = module._apply_gate(proj) if module.has_gate else module.act_fn(proj)
    down = module.down_proj[e]
    out = proj @ down if module.is_transposed else proj @ down.transpose(0, 1)
    if module.has_bias:
        out = out + module.down_proj_bias[e]
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return out


def xquant_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """The ``"xquant"`` entry of transformers' ``ExpertsInterface``."""
    if fused_layout(module):
        return torch.ops.xquant.moe_experts(
            hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj
        )
    return _generic_experts(module, hidden_states, top_k_index, top_k_weights)


_LAYER = re.compile(r"layers[.\[]'?(\d+)")


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a model: its module path, decoder layer, expert count and top-k."""

    name: str
    layer: int
    num_experts: int
    top_k: int


def layer_of(path: str) -> int | None:
    """Decoder layer index in a module path (``model.layers.3.mlp``, ``L['self'].model.layers[3]``)."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def find_moe_layers(model: torch.nn.Module, required: bool = False) -> list[MoELayer]:
    """MoE blocks of a transformers model, in depth order: modules with a ``gate`` router and an
    ``experts`` module of transformers' experts interface (``num_experts`` and 3-D weights). With
    ``required``, a model without any raises ``ValueError``."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        gate = getattr(module, "gate", None)
        if experts is None or gate is None or not hasattr(experts, "num_experts"):
            continue
        top_k = getattr(gate, "top_k", None) or getattr(module, "top_k", None)
        layer = layer_of(name)
        if top_k is None or layer is None:
            continue
        found.append(MoELayer(name=name, layer=layer, num_experts=int(experts.num_experts), top_k=int(top_k)))
    if required and not found:
        raise ValueError(f"{type(model).__name__} has no MoE layers")
    return sorted(found, key=lambda m: m.layer)


def install_experts(model: torch.nn.Module) -> int:
    """Route every experts module of ``model`` through ``xquant::moe_experts`` (transformers'
    ``set_experts_implementation("xquant")``); returns the number of MoE layers. A no-op on dense
    models."""
    layers = find_moe_layers(model)
    if not layers:
        return 0
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from .. import ops  # noqa: F401  (registers xquant::moe_experts)

    ALL_EXPERTS_FUNCTIONS.register("xquant", xquant_experts_forward)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("xquant")
    for _, module in model.named_modules():
        if hasattr(module, "num_experts") and hasattr(module, "config") and hasattr(module, "has_gate"):
            module.config._experts_implementation = "xquant"
    return len(layers)
