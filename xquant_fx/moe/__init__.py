"""MoE expert pruning (docs/moe.md): routing rules, the experts reference, and model plumbing.

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

Modules: :mod:`.reference` (the plain-torch math the graphs run: routing rewrite and experts),
:mod:`.install` (finding MoE blocks, routing their experts through ``xquant::moe_experts``),
:mod:`.plan` (the pruning plan the ``prune_moe_router`` pass reads), :mod:`.drop` (total-expert
pruning by calibrated soft count).
"""

from .drop import DroppedExperts, drop_experts, expert_usage
from .install import MoELayer, find_moe_layers, fused_layout, install_experts, layer_of, xquant_experts_forward
from .plan import MoEPlan, plan_for, plan_from_options
from .reference import experts_reference, prune_gather, prune_routes

__all__ = [
    "DroppedExperts", "MoELayer", "MoEPlan", "drop_experts", "expert_usage", "experts_reference", "find_moe_layers",
    "fused_layout", "install_experts", "layer_of", "plan_for", "plan_from_options", "prune_gather", "prune_routes",
    "xquant_experts_forward",
]
