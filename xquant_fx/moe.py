"""MoE expert pruning (DESIGN §3): routing rules, the experts reference, and model plumbing.

Three pieces, each small and testable on its own:

* **Routing rewrite** (:func:`prune_routes`, :func:`prune_gather`): what the graph pass
  :mod:`xquant_fx.passes.prune_moe_router` puts after a router's final ``topk``. Shapes never
  change: a dropped slot keeps its place and becomes the *sentinel* expert ``num_experts`` with
  weight 0, so every node downstream of the router (normalization, scaling, the experts) sees the
  tensors it was traced with. Slots are ranked by the router's own top-k values (DeepSeek routers
  call ``topk(..., sorted=False)``, so slot order means nothing).
* **Experts** (:func:`experts_reference` and the op ``xquant::moe_experts`` of
  :mod:`xquant_fx.ops`): ``sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over the
  slots of each token, skipping sentinel slots. The reference is plain torch with static shapes
  (traceable, no host synchronisation); the Triton kernel of :mod:`xquant_fx.kernels.moe` groups
  slots by expert and reads each selected expert's weights once. Where the pass knows that each
  token's slots from ``keep`` on are sentinels (sorted, pruned slots), it passes ``keep`` to the
  op, whose kernels then launch work for the kept slots only.
* **Model plumbing** (:func:`find_moe_layers`, :func:`install_experts`, :class:`MoEPlan`):
  transformers 5 routes every MoE family's experts through one interface
  (``ExpertsInterface``); :func:`install_experts` registers ``"xquant"`` there and selects it, so
  the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 become one
  ``xquant::moe_experts`` node in a traced graph, which is also what makes sentinel slots safe.

Where pruning applies: in graphs compiled by the ``xquant`` backend. Under :func:`xquant_fx.optimize`
that is the decode step (transformers runs the prompt eagerly, with the model's own k); with
``torch.compile(model, backend="xquant", options={"moe_top_k": ...})`` every compiled forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import XQuantConfig

# --------------------------------------------------------------------------- routing rewrite


def prune_routes(
    values: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    keep: int,
    min_weight: float = 0.0,
    top_p: float = 1.0,
    renormalize: bool = False,
    logits: bool = False,
    ranked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop routed slots of a router's top-k ``(values, indices)`` (``[..., K]`` each).

    A slot survives when its value ranks among the ``keep`` largest of its token, its weight is at
    least ``min_weight`` times the token's top weight, and the weights of the slots ranked above it
    sum to less than ``top_p`` of the token's total (the first slot always survives). Weights are
    ``values`` themselves, or ``softmax(values)`` when ``logits`` (a router that applies softmax
    after its top-k). Dropped slots get index ``num_experts`` and value 0 (``-inf`` when
    ``logits``, so that the softmax downstream gives them weight 0). With ``renormalize`` (and
    ``not logits``) the kept values are rescaled to the sum of all ``K`` values.

    ``ranked`` says the slots are already in descending order of value (``topk(..., sorted=True)``,
    which the graph pass asks for): a slot's rank is then its position, and no sort runs, so that
    under Inductor the whole rewrite is one fused elementwise kernel.
    """
    k = values.shape[-1]
    weights = values.float().softmax(-1) if logits else values.float()
    if ranked:
        rank = torch.arange(k, device=values.device).expand(values.shape)
        by_rank = weights
    else:
        order = torch.argsort(values, dim=-1, descending=True, stable=True)
        rank = torch.argsort(order, dim=-1, stable=True)  # rank[s]: position of slot s by value
        by_rank = weights.gather(-1, order)
    keep_mask = rank < keep
    if min_weight and min_weight > 0:
        top = weights.amax(-1, keepdim=True)
        keep_mask = keep_mask & (weights >= min_weight * top)
    if top_p is not None and top_p < 1.0:
        before = by_rank.cumsum(-1) - by_rank  # weight of the slots ranked above each
        total = by_rank.sum(-1, keepdim=True)
        keep_ranked = before < top_p * total
        keep_mask = keep_mask & (keep_ranked if ranked else keep_ranked.gather(-1, rank))
    keep_mask = keep_mask | (rank == 0)
    fill = float("-inf") if logits else 0.0
    new_values = values.masked_fill(~keep_mask, fill)
    if renormalize and not logits and k > 1:
        total = values.sum(-1, keepdim=True)
        kept = new_values.sum(-1, keepdim=True)
        new_values = new_values * (total / kept.clamp_min(torch.finfo(kept.dtype).tiny))
    new_indices = indices.masked_fill(~keep_mask, num_experts)
    return new_values, new_indices


def prune_gather(
    source: torch.Tensor, dim: int, indices: torch.Tensor, pruned: torch.Tensor, num_experts: int,
    renormalize: bool = False,
) -> torch.Tensor:
    """``source.gather(dim, indices)`` with the slots that :func:`prune_routes` dropped (``pruned``
    holds ``num_experts`` there) set to 0; with ``renormalize`` the kept entries are rescaled to
    the sum of all gathered entries (DeepSeek-V3 gathers its weights by index)."""
    full = source.gather(dim, indices)
    kept = full.masked_fill(pruned >= num_experts, 0)
    if renormalize:
        scale = full.sum(dim, keepdim=True) / kept.sum(dim, keepdim=True).clamp_min(torch.finfo(full.dtype).tiny)
        kept = kept * scale
    return kept


# --------------------------------------------------------------------------- experts


def experts_reference(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Routed experts of tokens ``x [T, H]`` with slots ``ids``/``weights [T, K]`` over
    ``gate_up [E, 2I, H]`` (gate rows first) and ``down [E, H, I]``: ``[T, H]`` in ``x.dtype``.

    Slots with ``ids >= E`` (the sentinel) contribute nothing. Products accumulate in float32; the
    activation ``silu(gate) * up`` is rounded to ``x.dtype`` before the down projection, as the
    kernel stores it. Static shapes only: for few slots (``T * K <= E``, decode) the selected
    experts' weights are gathered per slot; otherwise every expert runs on every token, masked by
    its routing weight (the reference favours simplicity over speed there).
    """
    t, h = x.shape
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    k = ids.shape[-1]
    valid = ids < e
    w = torch.where(valid, weights.float(), 0.0)  # [T, K]
    ids_c = ids.clamp(max=e - 1)
    xf = x.float()
    if t * k <= e:
        gu = gate_up[ids_c].float()  # [T, K, 2I, H]
        y = torch.einsum("th,tkih->tki", xf, gu)
        act = (F.silu(y[..., :inter]) * y[..., inter:]).to(x.dtype).float()
        out = torch.einsum("tki,tkhi->tkh", act, down[ids_c].float())
        return (out * w.unsqueeze(-1)).sum(1).to(x.dtype)
    # per-expert weight of each token: sum over its slots routed there
    per_expert = torch.zeros(t, e + 1, dtype=torch.float32, device=x.device)
    per_expert.scatter_add_(1, torch.where(valid, ids, e), w)
    y = torch.einsum("th,eih->tei", xf, gate_up.float())
    act = (F.silu(y[..., :inter]) * y[..., inter:]).to(x.dtype).float()
    out = torch.einsum("tei,ehi->teh", act, down.float())
    return (out * per_expert[:, :e].unsqueeze(-1)).sum(1).to(x.dtype)


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


# --------------------------------------------------------------------------- model plumbing

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

    from . import ops  # noqa: F401  (registers xquant::moe_experts)

    ALL_EXPERTS_FUNCTIONS.register("xquant", xquant_experts_forward)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("xquant")
    for _, module in model.named_modules():
        if hasattr(module, "num_experts") and hasattr(module, "config") and hasattr(module, "has_gate"):
            module.config._experts_implementation = "xquant"
    return len(layers)


# --------------------------------------------------------------------------- total-expert pruning


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
    count, DESIGN §3): ``keep`` experts per layer (an int), or that fraction of them (a float in
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


@dataclass(frozen=True)
class MoEPlan:
    """What the ``prune_moe_router`` pass does to each router: keep ``top_k[layer]`` slots of the
    router's ``model_k`` (decoder layer index -> k; ``None`` resolves from the graph), plus the
    dynamic rules. Built by :func:`plan_for` (from a model) or :func:`plan_from_options`."""

    top_k: dict[int, int] | None = None
    spec: object = None  # the unresolved XQuantConfig.moe_top_k, when top_k is None
    experts: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (num_experts, model_k)
    renormalize: bool = False
    min_weight: float = 0.0
    top_p: float = 1.0

    @property
    def dynamic(self) -> bool:
        return self.min_weight > 0 or self.top_p < 1.0

    def to_options(self) -> dict:
        """Plain-data form, for ``torch.compile(..., options=...)`` / transformers' CompileConfig."""
        return {
            "moe_plan": {
                "top_k": dict(self.top_k) if self.top_k is not None else None,
                "spec": self.spec,
                "experts": dict(self.experts),
                "renormalize": self.renormalize,
                "min_weight": self.min_weight,
                "top_p": self.top_p,
            }
        }


def _dynamic_fields(config: XQuantConfig) -> dict:
    return dict(
        renormalize=config.moe_renormalize,
        min_weight=float(config.moe_min_weight or 0.0),
        top_p=float(config.moe_top_p if config.moe_top_p is not None else 1.0),
    )


def plan_for(model: torch.nn.Module, config: XQuantConfig) -> MoEPlan | None:
    """The pruning plan of ``config`` on ``model``; ``None`` when the config asks for no pruning.
    Raises ``ValueError`` for MoE options on a dense model, or a k the model cannot take."""
    layers = find_moe_layers(model)
    if not config.prunes_experts:
        return None
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MoE layers, but the config sets MoE options "
            f"(moe_top_k={config.moe_top_k!r}, moe_min_weight={config.moe_min_weight!r}, "
            f"moe_top_p={config.moe_top_p!r}, moe_renormalize={config.moe_renormalize!r})"
        )
    model_ks = {m.top_k for m in layers}
    if len(model_ks) != 1:
        raise ValueError(f"MoE layers of {type(model).__name__} route to different top-k {sorted(model_ks)}")
    ks = config.resolve_moe_top_k(len(layers), model_ks.pop())
    return MoEPlan(
        top_k={m.layer: k for m, k in zip(layers, ks)},
        experts={m.layer: (m.num_experts, m.top_k) for m in layers},
        **_dynamic_fields(config),
    )


def plan_from_options(options: dict | None) -> MoEPlan | None:
    """The plan carried in backend ``options``: ``{"moe_plan": {...}}`` (from :meth:`MoEPlan.to_options`)
    or the config fields themselves, ``{"moe_top_k": 4, "moe_min_weight": 0.1, ...}``. Pops the keys
    it reads, so the rest can go to Inductor."""
    if not options:
        return None
    raw = options.pop("moe_plan", None)
    if raw is not None:
        return MoEPlan(
            top_k=raw["top_k"], spec=raw["spec"], experts=raw["experts"], renormalize=raw["renormalize"],
            min_weight=raw["min_weight"], top_p=raw["top_p"],
        )
    fields = {k: options.pop(k) for k in ("moe_top_k", "moe_renormalize", "moe_min_weight", "moe_top_p") if k in options}
    if not fields:
        return None
    config = XQuantConfig(**fields)  # validates every field, naming it
    if not config.prunes_experts:
        return None
    return MoEPlan(top_k=None, spec=config.moe_top_k, **_dynamic_fields(config))
