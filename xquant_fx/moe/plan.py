"""The expert-pruning plan: what :mod:`xquant_fx.passes.prune_moe_router` does to each router,
made from a model and a config (:func:`plan_for`) or from backend options (:func:`plan_from_options`),
and carried through ``torch.compile`` options as plain data (:meth:`MoEPlan.to_options`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import XQuantConfig, resolve_moe_top_k
from .install import find_moe_layers


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

    def keep_per_layer(self, routers: dict[int, tuple[int, int]]) -> dict[int, int]:
        """Slots to keep per decoder layer of a graph whose routers (layer -> ``(num_experts, k)``)
        were found by the pass: ``top_k`` where the plan was made for the model (refused if the
        graph's routers differ from that model's), else ``spec`` resolved for these routers."""
        if self.top_k is not None:
            missing = sorted(set(routers) - set(self.top_k))
            if missing:
                raise ValueError(f"graph has MoE routers in decoder layers {missing} that the plan does not know")
            for layer, (width, k) in routers.items():
                expected = self.experts.get(layer)
                if expected is not None and tuple(expected) != (width, k):
                    raise ValueError(
                        f"decoder layer {layer}: the router's top-k picks {k} of {width} experts, but the plan was "
                        f"made for {expected[1]} of {expected[0]}"
                    )
            return {layer: self.top_k[layer] for layer in routers}
        model_ks = {k for _, k in routers.values()}
        if len(model_ks) != 1:
            raise ValueError(f"routers of this graph pick different top-k {sorted(model_ks)}; give moe_top_k per layer")
        return dict(zip(routers, resolve_moe_top_k(self.spec, len(routers), model_ks.pop())))

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
