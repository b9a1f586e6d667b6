"""Pass ``router_topk``: routers become one op and no output changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mini_models import MOE_FAMILIES, mini_moe_model
from moe_routing import run_with, run_with_pass

from xquant_fx import ops  # noqa: F401  (registers the xquant:: ops)
from xquant_fx.moe import MoEPlan, find_moe_layers, install_experts, prune_routes
from xquant_fx.passes import PassContext, PassReport, run_passes
from xquant_fx.passes.match import find_routers, is_router_topk
from xquant_fx.passes.router_topk import router_topk

torch._dynamo.config.cache_size_limit = 64


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_router_topk_pass_takes_each_router_top_k_and_changes_no_output(family, monkeypatch):
    model = mini_moe_model(family)
    install_experts(model)
    layers = find_moe_layers(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    plan = MoEPlan(spec=max(1, layers[0].top_k - 1))
    pruned_only, pruned_graph, _ = run_with_pass(model, ids, plan)
    fills = [float("-inf") if n.kwargs["logits"] else 0.0 for n in pruned_graph.graph.nodes if n.target is prune_routes]
    if family in ("qwen3_moe", "deepseek_v2", "deepseek_v3"):  # and the kernels, under the interpreter
        monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")

    def all_passes(gm):
        report = PassReport()
        run_passes(gm, report, ctx=PassContext(moe=plan))
        return report

    logits, gm, report = run_with(model, ids, all_passes)
    fast = [n for n in gm.graph.nodes if is_router_topk(n)]
    assert report.hits["router_topk"] == len(fast) == len(layers)
    assert [r[0] for r in find_routers(gm).values()] == fast  # group top-k calls (DeepSeek) untouched
    assert run_passes(gm, (again := PassReport()), ctx=PassContext(moe=plan)) and again.hits["router_topk"] == 0
    # softmax routers become one xquant::router (linear, softmax, top-k, and the router's own
    # normalization and cast of the values); DeepSeek's group-limited and sigmoid routers keep
    # their scores and get xquant::router_topk
    whole = family not in ("deepseek_v2_group", "deepseek_v3")
    op = torch.ops.xquant.router.default if whole else torch.ops.xquant.router_topk.default
    assert all(n.target is op for n in fast)
    at = 2 if whole else 1  # position of k
    assert [n.args[at] for n in fast] == [m.top_k for m in layers]  # the model's k
    folded = family != "deepseek_v3"  # V3 gathers weights by the unpruned indices: its prune node stays
    assert [n.args[at + 1:] for n in fast] == ([(plan.spec, fill, 8) for fill in fills] if folded else [()] * len(layers))
    assert sum(n.target is prune_routes for n in gm.graph.nodes) == (0 if folded else len(layers))
    assert [n.kwargs.get("keep") for n in gm.graph.nodes if "xquant.moe_experts" in str(n.target)] == (
        [plan.spec] * len(layers))  # still told after the router op replaced the prune node
    if whole:
        normalized = family in ("mixtral", "qwen3_moe")  # norm_topk_prob (Mixtral: always)
        assert [n.kwargs.get("normalize", False) for n in fast] == [normalized] * len(layers)
        cast = family in ("qwen2_moe", "qwen3_moe", "olmoe")  # routers that end in `values.to(logits.dtype)`
        assert [n.kwargs.get("values_dtype") for n in fast] == [torch.float32 if cast else None] * len(layers)
        in_routers = [n for n in gm.graph.nodes if (list((n.meta.get("nn_module_stack") or {"": ("",)})
                                                          .values())[-1][0]).rsplit(".", 1)[-1] == "gate"]
        assert len(in_routers) >= len(layers)
        assert not any(n.target in (torch._C._nn.linear, F.softmax) or n.target == "softmax" for n in in_routers)
    torch.testing.assert_close(logits, pruned_only, atol=1e-4, rtol=1e-4)


def test_router_topk_pass_takes_a_float32_gate_in_a_bf16_model():
    """DeepSeek-V2 keeps its gate weight in float32 (``F.linear(x.float(), w.float())``) while x is bf16."""
    model = mini_moe_model("deepseek_v2").to(torch.bfloat16)
    layers = find_moe_layers(model)
    for layer in layers:
        gate = model.get_submodule(layer.name).gate
        gate.weight = torch.nn.Parameter(gate.weight.float())
    install_experts(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    logits, gm, hits = run_with(model, ids, router_topk)
    fast = [n for n in gm.graph.nodes if is_router_topk(n)]
    assert hits == len(fast) == len(layers)
    assert all(n.target is torch.ops.xquant.router.default and n.kwargs["logits_dtype"] == torch.float32 for n in fast)
    assert all(n.meta["example_value"][1].dtype == torch.int64 for n in fast)  # fake outputs of the op itself
    torch.testing.assert_close(logits, want)


def test_router_topk_pass_reads_keyword_inputs_and_a_positional_sum_dim():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            probs = F.softmax(input=F.linear(x, self.weight), dim=-1, dtype=torch.float32)
            values, indices = torch.topk(probs, 3, dim=-1)
            return values / values.sum(-1, keepdim=True), indices

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            return self.gate(x)

    block, x = Block(), torch.randn(5, 16)
    with torch.no_grad():
        want = block(x)
    got, gm, hits = run_with(block, x, router_topk)
    (fast,) = [n for n in gm.graph.nodes if is_router_topk(n)]
    assert hits == 1 and fast.target is torch.ops.xquant.router.default and fast.kwargs["normalize"] is True
    torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("plan", [MoEPlan(spec=2, renormalize=True), MoEPlan(spec=4, min_weight=0.3)],
                         ids=["renormalize", "min_weight"])
def test_router_topk_pass_keeps_the_prune_node_of_rules_beyond_a_k(plan):
    model = mini_moe_model("qwen2_moe")  # norm_topk_prob=False: renormalization is the plan's, not the router's
    install_experts(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(9))
    pruned_only, _, _ = run_with_pass(model, ids, plan)
    logits, gm, _ = run_with(model, ids, lambda gm: run_passes(gm, ctx=PassContext(moe=plan)))
    layers = len(find_moe_layers(model))
    assert sum(n.target is prune_routes for n in gm.graph.nodes) == layers
    assert [n.args[3:] for n in gm.graph.nodes if n.target is torch.ops.xquant.router.default] == [()] * layers
    torch.testing.assert_close(logits, pruned_only, atol=1e-5, rtol=1e-4)


def test_router_topk_pass_leaves_routers_wider_than_its_kernel():

    class Router(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(experts, 8))

        def forward(self, x):
            return torch.topk((x @ self.weight.t()).softmax(-1), 2, dim=-1)

    class Block(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.gate = Router(experts)

        def forward(self, x):
            values, indices = self.gate(x)
            return values * indices

    for experts, hits in ((64, 1), (ops.ROUTER_TOPK_MAX_WIDTH + 1, 0)):
        _, gm, found = run_with(Block(experts), torch.randn(3, 8), router_topk)
        assert found == hits
        assert sum(n.target is torch.ops.xquant.router_topk.default for n in gm.graph.nodes) == hits
