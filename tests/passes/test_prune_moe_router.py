"""Pass ``prune_moe_router``: pruned routers equal hand-written ones; declines and refusals."""

from __future__ import annotations

import pytest
import torch
from mini_models import MOE_FAMILIES, mini_model, mini_moe_model
from moe_routing import compiled_logits, run_with_pass, with_reference_routers

from xquant_fx.moe import MoEPlan, find_moe_layers, install_experts, prune_routes
from xquant_fx.passes import PassContext, PassFailed, run_passes
from xquant_fx.passes.match import find_routers
from xquant_fx.passes.prune_moe_router import prune_moe_router

torch._dynamo.config.cache_size_limit = 64


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_pass_prunes_each_router_like_a_hand_written_router(family):
    model = mini_moe_model(family)
    install_experts(model)
    layers = find_moe_layers(model)
    model_k = layers[0].top_k
    keeps = [max(1, model_k - 1 - (i % 2)) for i in range(len(layers))]  # per-layer k
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    plan = MoEPlan(top_k={m.layer: k for m, k in zip(layers, keeps)},
                   experts={m.layer: (m.num_experts, m.top_k) for m in layers})

    logits, gm, hits = run_with_pass(model, ids, plan)
    assert hits == len(layers)  # once per MoE layer (DeepSeek: the final of its top-k calls)
    assert [n.kwargs["keep"] for n in gm.graph.nodes if n.target is prune_routes] == keeps  # intended k per layer
    # the experts read only the kept slots (the rest are sentinels)
    assert [n.kwargs.get("keep") for n in gm.graph.nodes if "xquant.moe_experts" in str(n.target)] == keeps
    assert prune_moe_router(gm, PassContext(moe=plan)) == 0  # idempotent
    with torch.no_grad():
        expected = with_reference_routers(model, family, keeps)(ids).logits
        full = model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert (full - expected).abs().max() > 1e-3  # pruning changed something

    if family in ("mixtral", "deepseek_v3"):  # the whole xquant backend (Inductor), fed the config field
        torch.testing.assert_close(compiled_logits(model, ids, moe_top_k=list(keeps)), expected, atol=1e-5, rtol=1e-4)


def test_find_routers_picks_the_final_top_k_of_each_router():
    model = mini_moe_model("deepseek_v3")
    install_experts(model)
    _, gm, _ = run_with_pass(model, torch.zeros(1, 3, dtype=torch.long), None)
    topks = [n for n in gm.graph.nodes if "topk" in str(n.target)]
    routers = find_routers(gm)
    assert len(topks) == 3 * len(routers)  # two group-level top-k calls per layer are not routers
    for node, experts, k in routers.values():
        assert (experts, k) == (8, 4) and node.kwargs.get("k", None) == 4


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_model_k_changes_nothing_and_dynamic_pruning_matches_reference(family):
    model = mini_moe_model(family)
    install_experts(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    k = find_moe_layers(model)[0].top_k
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(compiled_logits(model, ids, moe_top_k=k), eager, atol=1e-5, rtol=1e-4)
    keeps = [k] * len(find_moe_layers(model))
    with torch.no_grad():
        expected = with_reference_routers(model, family, keeps, min_weight=0.5)(ids).logits
    assert (expected - eager).abs().max() > 1e-3
    torch.testing.assert_close(compiled_logits(model, ids, moe_min_weight=0.5), expected, atol=1e-5, rtol=1e-4)


def test_pass_declines_on_dense_and_refuses_unsafe_experts():
    dense = mini_model("llama", num_hidden_layers=2)
    graphs = []
    torch._dynamo.reset()
    torch.compile(dense, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(
        torch.zeros(1, 4, dtype=torch.long)
    )
    assert prune_moe_router(graphs[0], PassContext(moe=MoEPlan(spec=2))) == 0
    assert prune_moe_router(graphs[0], PassContext()) == 0

    model = mini_moe_model("qwen3_moe")  # transformers' own experts: sentinel slots would index out of range
    graphs.clear()
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)(
        torch.zeros(1, 4, dtype=torch.long)
    )
    with pytest.raises(PassFailed, match="prune_moe_router.*not `xquant::moe_experts`"):
        run_passes(graphs[0], ctx=PassContext(moe=MoEPlan(spec=2)))
    torch._dynamo.reset()
