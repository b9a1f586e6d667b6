"""Total-expert pruning: the soft count of every routed expert over calibration data
(:func:`expert_usage`) and removing each layer's least-used experts (:func:`drop_experts`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .install import find_moe_layers


def expert_usage(model: torch.nn.Module, batches) -> dict[int, torch.Tensor]:
    """Soft count of every routed expert: per MoE layer (decoder layer index -> ``[E]`` float32),
    the routing weight each expert received, summed over the tokens of ``batches`` (input id
    tensors, or dicts of model inputs) run through ``model`` with its own routing, eagerly."""
    layers = find_moe_layers(model, required=True)
    usage = {m.layer: None for m in layers}

    def record(layer: int, num_experts: int):
        def hook(module, args, out):
            if not (isinstance(out, tuple) and len(out) == 3):
                raise ValueError(
                    f"expert_usage: router {type(module).__name__} of decoder layer {layer} does not return "
                    "(logits, weights, indices) as transformers' top-k routers do"
                )
            _, weights, indices = out
            counts = torch.zeros(num_experts + 1, dtype=torch.float32, device=weights.device)
            counts.scatter_add_(0, indices.reshape(-1).clamp(max=num_experts), weights.reshape(-1).float())
            usage[layer] = counts[:num_experts] if usage[layer] is None else usage[layer] + counts[:num_experts]
        return hook

    hooks = [model.get_submodule(m.name).gate.register_forward_hook(record(m.layer, m.num_experts)) for m in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    if any(u is None for u in usage.values()):
        raise ValueError("expert_usage: no batch reached the MoE layers (empty calibration data?)")
    return {layer: u.cpu() for layer, u in usage.items()}


@dataclass(frozen=True)
class DroppedExperts:
    """What :func:`drop_experts` did: per MoE layer the original ids of the experts kept (in their
    new order) and the fraction of the calibration soft count they carried; bytes of the routed
    experts and router rows before and after."""

    kept: dict[int, list[int]]
    usage_kept: dict[int, float]
    bytes_before: int
    bytes_after: int


def _slice_experts_dim(module: torch.nn.Module, num_experts: int, index: torch.Tensor) -> tuple[int, int]:
    """Keep rows ``index`` of every direct parameter / buffer of ``module`` whose first dimension
    is the expert count; returns (bytes before, bytes after)."""
    before = after = 0
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor.dim() == 0 or tensor.shape[0] != num_experts:
            continue
        kept = tensor.detach().index_select(0, index.to(tensor.device)).clone()
        before += tensor.numel() * tensor.element_size()
        after += kept.numel() * kept.element_size()
        if isinstance(tensor, torch.nn.Parameter):
            setattr(module, name, torch.nn.Parameter(kept, requires_grad=tensor.requires_grad))
        else:
            module._buffers[name] = kept
    return before, after


def _groups(gate: torch.nn.Module) -> int:
    """Expert groups of a group-limited router (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3), else 1."""
    groups = getattr(gate, "num_group", None) or 1
    return 1 if getattr(gate, "topk_method", "group_limited_greedy") == "greedy" else groups


def drop_experts(model: torch.nn.Module, keep: int | float, usage: dict[int, torch.Tensor]) -> DroppedExperts:
    """Remove each MoE layer's least-used routed experts, in place (total-expert pruning by soft
    count, docs/moe.md, "Dropping experts"): ``keep`` experts per layer (an int), or that fraction of them (a float in
    ``(0, 1]``, rounded to nearest), chosen by :func:`expert_usage`. The routers then score only
    the kept experts: the same routing as masking the dropped experts' router logits to ``-inf``.

    Group-limited routers (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3) keep their groups
    equal: ``keep / n_group`` experts from each group, the most-used of that group. The routing is
    then that of the original router with the dropped experts out of reach (logits at ``-inf``;
    for DeepSeek-V3, whose choice adds a bias to sigmoid scores, that bias at ``-inf``).

    Shared experts are untouched. Refused (``ValueError``, nothing changed): a ``keep`` below the
    model's top-k or above its expert count, ``usage`` that does not cover every MoE layer, and for
    group-limited routers a ``keep`` that does not split evenly into the groups, leaves a group
    fewer experts than its group score reads (2 for DeepSeek-V3), or leaves the chosen groups fewer
    than top-k experts. Call it before :func:`xquant_fx.optimize`.
    """
    layers = find_moe_layers(model, required=True)
    total = {m.num_experts for m in layers}
    if len(total) != 1:
        raise ValueError(f"MoE layers of {type(model).__name__} have different expert counts {sorted(total)}")
    num_experts = total.pop()
    top_k = max(m.top_k for m in layers)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"drop_experts: keep must be an int or a fraction, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"drop_experts: keep={keep} as a fraction must be in (0, 1]")
        keep = int(keep * num_experts + 0.5)
    if not top_k <= keep <= num_experts:
        raise ValueError(
            f"drop_experts: keep={keep} experts per layer must be between the router's top-k ({top_k}) and the "
            f"expert count ({num_experts})"
        )
    for m in layers:
        gate = model.get_submodule(m.name).gate
        groups = _groups(gate)
        if groups > 1:
            per, least = keep // groups, 2 if hasattr(gate, "e_score_correction_bias") else 1
            chosen = getattr(gate, "topk_group", groups)
            if keep % groups or per < least or chosen * per < m.top_k:
                raise ValueError(
                    f"drop_experts: decoder layer {m.layer} routes group-limited ({groups} groups, {chosen} chosen per "
                    f"token, top-{m.top_k}): keep={keep} must split into the groups evenly, leave each group at least "
                    f"{least} experts and the {chosen} chosen groups at least {m.top_k}"
                )
        u = usage.get(m.layer)
        if u is None or tuple(u.shape) != (num_experts,):
            raise ValueError(f"drop_experts: usage has no [{num_experts}] soft count for decoder layer {m.layer}")
    kept, usage_kept, before, after = {}, {}, 0, 0
    for m in layers:
        block = model.get_submodule(m.name)
        u = usage[m.layer].float()
        groups = _groups(block.gate)
        size = num_experts // groups
        index = torch.cat([  # the kept experts, in their original order; the same number from each group
            g * size + torch.topk(u[g * size:(g + 1) * size], keep // groups).indices.sort().values
            for g in range(groups)
        ])
        kept[m.layer] = index.tolist()
        usage_kept[m.layer] = (u[index].sum() / u.sum().clamp_min(torch.finfo(torch.float32).tiny)).item()
        for module in (block.experts, block.gate):
            b, a = _slice_experts_dim(module, num_experts, index)
            before, after = before + b, after + a
        for module in (block, block.experts, block.gate):
            if getattr(module, "num_experts", None) == num_experts:
                module.num_experts = keep
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and getattr(owner, "num_experts", None) == num_experts:
            owner.num_experts = keep  # e.g. the aux-loss count of Qwen2-MoE / Mixtral models
    config = model.config
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, name, None) == num_experts:
            setattr(config, name, keep)
    return DroppedExperts(kept=kept, usage_kept=usage_kept, bytes_before=before, bytes_after=after)
