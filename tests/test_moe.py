"""MoE expert pruning: config, routing rule, experts op and kernel, the graph pass, optimize()."""

from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F
from mini_models import MOE_FAMILIES, mini_model, mini_moe_model

import xquant_fx
from xquant_fx import XQuantConfig, ops  # noqa: F401  (registers xquant::moe_experts)
from xquant_fx.config import MoESchedule
from xquant_fx.moe import (
    drop_experts, expert_usage, experts_reference, find_moe_layers, install_experts, prune_routes,
)
from xquant_fx.passes import PassContext, PassFailed, PassReport, run_passes
from xquant_fx.moe import MoEPlan
from xquant_fx.passes.prune_moe_router import find_routers, is_router_topk, prune_moe_router
from xquant_fx.passes.router_topk import router_topk

torch._dynamo.config.cache_size_limit = 64


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field, value",
    [
        ("moe_top_k", 0), ("moe_top_k", -2), ("moe_top_k", "4"), ("moe_top_k", []), ("moe_top_k", [2, 0]),
        ("moe_top_k", 2.0), ("moe_top_k", MoESchedule(0, 2, 2, 1)), ("moe_top_k", MoESchedule(2, 2, 2, -1)),
        ("moe_renormalize", "yes"), ("moe_min_weight", 1.0), ("moe_min_weight", -0.1),
        ("moe_top_p", 0.0), ("moe_top_p", 1.5), ("moe_top_p", True),
    ],
)
def test_bad_moe_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        XQuantConfig(**{field: value})


def test_schedule_interpolates_over_moe_layers_and_rounds_halves_up():
    assert MoESchedule(2, 6, 3, 2).resolve(6) == [2, 4, 6, 5, 4, 3]
    assert MoESchedule(1, 2, 1, 2).resolve(5) == [1, 2, 2, 2, 1]  # 1.5 -> 2 on both sides
    assert MoESchedule(4, 4, 1, 0).resolve(4) == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="at=6"):
        MoESchedule(2, 6, 3, 6).resolve(6)


def test_resolve_top_k_checks_the_model():
    assert XQuantConfig(moe_top_k=3).resolve_moe_top_k(4, 8) == [3] * 4
    assert XQuantConfig(moe_top_k=[1, 2, 3]).resolve_moe_top_k(3, 4) == [1, 2, 3]
    assert XQuantConfig().resolve_moe_top_k(2, 6) == [6, 6]
    with pytest.raises(ValueError, match="routes each token to 4"):
        XQuantConfig(moe_top_k=5).resolve_moe_top_k(3, 4)
    with pytest.raises(ValueError, match="lists 2 MoE layers but the model has 3"):
        XQuantConfig(moe_top_k=[1, 2]).resolve_moe_top_k(3, 4)


# --------------------------------------------------------------------------- routing rule
def test_prune_routes_keeps_the_largest_values_of_unsorted_slots():
    values = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    indices = torch.tensor([[5, 1, 7, 2]])
    v, i = prune_routes(values, indices, num_experts=8, keep=2)
    assert i.tolist() == [[8, 1, 8, 2]]
    assert v[0].tolist() == pytest.approx([0.0, 0.4, 0.0, 0.3])


def test_prune_routes_dynamic_rules_drop_exactly_their_slots():
    values = torch.tensor([[0.50, 0.05, 0.30, 0.15], [0.25, 0.25, 0.25, 0.25]])
    indices = torch.arange(8).view(2, 4)
    # min_weight: slot kept iff weight >= 0.2 * top weight (0.10 for row 0)
    _, i = prune_routes(values, indices, 8, keep=4, min_weight=0.2)
    assert i.tolist() == [[0, 8, 2, 3], [4, 5, 6, 7]]
    # top_p: keep until the weights ranked above reach 0.75 of the total
    _, i = prune_routes(values, indices, 8, keep=4, top_p=0.75)
    assert i.tolist() == [[0, 8, 2, 8], [4, 5, 6, 8]]
    # the first slot always survives, whatever the thresholds
    _, i = prune_routes(values, indices, 8, keep=1, min_weight=0.99, top_p=0.01)
    assert i.tolist() == [[0, 8, 8, 8], [4, 8, 8, 8]]


@pytest.mark.parametrize("rules", [dict(keep=3), dict(keep=6, min_weight=0.3), dict(keep=5, top_p=0.6),
                                   dict(keep=2, renormalize=True), dict(keep=4, logits=True, top_p=0.8)])
def test_prune_routes_of_sorted_slots_needs_no_sort(rules):
    torch.manual_seed(0)
    scores = torch.randn(32, 16).softmax(-1)
    values, indices = scores.topk(6, dim=-1, sorted=True)
    want = prune_routes(values, indices, 16, **rules)
    got = prune_routes(values, indices, 16, ranked=True, **rules)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (want[1] == 16).any()  # the rules drop something


def test_prune_routes_renormalize_and_logits():
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    v, _ = prune_routes(values, torch.arange(4)[None], 4, keep=2, renormalize=True)
    assert v.sum().item() == pytest.approx(1.0) and v[0, :2].tolist() == pytest.approx([0.4 / 0.7, 0.3 / 0.7])
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    v, i = prune_routes(logits, torch.arange(4)[None], 4, keep=2, logits=True)
    assert i.tolist() == [[0, 1, 4, 4]] and torch.isinf(v[0, 2:]).all()
    assert v.softmax(-1)[0, 2:].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- experts
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_experts_reference_equals_transformers_eager_experts(family):
    model = mini_moe_model(family)
    layer = find_moe_layers(model)[0]
    block = model.get_submodule(layer.name)
    model.set_experts_implementation("eager")
    for tokens in (3, 40):  # per-slot gather path and all-experts path
        x = torch.randn(tokens, model.config.hidden_size)
        _, w, ids = block.gate(x)
        ref = experts_reference(x, ids, w, block.experts.gate_up_proj, block.experts.down_proj)
        torch.testing.assert_close(ref, block.experts(x, ids, w), atol=1e-6, rtol=1e-5)


@pytest.fixture
def force_kernels(monkeypatch):
    monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")


# slot blocks where the op takes them (<= 16 slots), with and without split-K (whose slices do not
# divide the reduction evenly here) and the combine folded into the down kernel; the block table
# at every size
@pytest.mark.parametrize("tokens, k, experts, slot_blocks, split, fold", [
    (1, 8, 16, True, False, True), (3, 4, 8, True, False, True), (1, 4, 16, True, True, True),
    (3, 2, 8, True, True, True), (3, 4, 8, True, True, False),
    (1, 8, 16, False, False, False), (3, 4, 8, False, False, False), (37, 2, 8, False, False, False),
    (64, 8, 16, False, False, False),
])
def test_moe_kernel_matches_reference(tokens, k, experts, slot_blocks, split, fold, force_kernels, monkeypatch):
    from xquant_fx.kernels import moe as moe_kernels
    from xquant_fx.kernels.moe import moe_experts as kernel

    monkeypatch.setattr(moe_kernels, "SLOT_BLOCKS_MAX", 10**9 if slot_blocks else 0)
    monkeypatch.setattr(moe_kernels, "DECODE", moe_kernels.Decode(up_programs=10**6 if split else 0, fold_combine=fold))
    torch.manual_seed(tokens)
    hid, inter = (640, 320) if split else (64, 48)
    if split:  # the up projection's 5 chunks of the hidden size split 4 ways (the last slice empty)
        assert moe_kernels._split(tokens * k * 10, 5, 10**6) == 4
    x = torch.randn(tokens, hid)
    gate_up = torch.randn(experts, 2 * inter, hid) * 0.05
    down = torch.randn(experts, hid, inter) * 0.05
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k)
    ids[:, k // 2:][torch.rand(tokens, k - k // 2) < 0.5] = experts  # sentinel slots
    ref = experts_reference(x, ids, w, gate_up, down)
    torch.testing.assert_close(kernel(x, ids, w, gate_up, down), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.ops.xquant.moe_experts(x, ids, w, gate_up, down), ref, atol=1e-4, rtol=1e-4)


def test_moe_experts_op_checks_shapes_and_has_a_fake():
    x, ids, w = torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)
    gate_up, down = torch.randn(4, 8, 16), torch.randn(4, 16, 4)
    with pytest.raises(ValueError, match="do not match hidden size"):
        torch.ops.xquant.moe_experts(x, ids, w, gate_up, torch.randn(4, 16, 5))
    with pytest.raises(ValueError, match=r"ids/weights \[T, K\]"):
        torch.ops.xquant.moe_experts(x, ids, w[:, :1], gate_up, down)
    for keep in (0, 3, -2):
        with pytest.raises(ValueError, match=f"keep={keep} must be in 1..K=2"):
            torch.ops.xquant.moe_experts(x, ids, w, gate_up, down, keep)
    torch.library.opcheck(torch.ops.xquant.moe_experts.default, (x, ids, w, gate_up, down))
    torch.library.opcheck(torch.ops.xquant.moe_experts.default, (x, ids, w, gate_up, down, 1))
    torch.library.opcheck(torch.ops.xquant.moe_experts.default, (torch.randn(16, 2).t(), ids, w, gate_up, down))


# the kernels read the kept slots in place: slot blocks (1 x 8 kept to 4, the combine folded or not;
# 2 x 8 kept to 6; 3 x 8 kept to 1) and the block table (5 x 8 kept to 4; one token's 20 of 32)
@pytest.mark.parametrize("tokens, k, keep, fold", [(1, 8, 4, True), (1, 8, 4, False), (2, 8, 6, True), (5, 8, 4, True),
                                                   (3, 8, 1, True), (1, 32, 20, True)])
def test_moe_experts_keep_reads_only_the_kept_slots(tokens, k, keep, fold, force_kernels, monkeypatch):
    from xquant_fx.kernels import moe as moe_kernels

    grids = {}
    launch = moe_kernels.launch

    class Recording:  # launches as before, noting each kernel's grid
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids[self.kernel.__name__] = grid
            return launch(self.kernel)[grid]

    monkeypatch.setattr(moe_kernels, "launch", Recording)
    monkeypatch.setattr(moe_kernels, "DECODE", moe_kernels.Decode(fold_combine=fold))
    torch.manual_seed(tokens * k + keep)
    experts, hid, inter = 40, 640, 64
    x = torch.randn(tokens, hid)
    gate_up, down = torch.randn(experts, 2 * inter, hid) * 0.05, torch.randn(experts, hid, inter) * 0.05
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])  # the dropped slots: real experts
    ids[:, 0][torch.rand(tokens) < 0.4] = experts  # and some sentinels among the kept ones
    w = torch.rand(tokens, k)
    # non-contiguous inputs (every other column of a wider tensor)
    ids, w = torch.stack([ids, ids], -1).flatten(1)[:, ::2], torch.stack([w, w], -1).flatten(1)[:, ::2]
    assert not ids.is_contiguous() and not w.is_contiguous()
    want = experts_reference(x, ids[:, :keep], w[:, :keep], gate_up, down)
    assert (want - experts_reference(x, ids, w, gate_up, down)).abs().max() > 1e-3  # the other slots count
    torch.testing.assert_close(torch.ops.xquant.moe_experts(x, ids, w, gate_up, down, keep), want,
                               atol=1e-4, rtol=1e-4)
    if tokens * keep <= moe_kernels.SLOT_BLOCKS_MAX:  # one block per kept slot, none for the others
        assert grids["_moe_up_kernel"][0] == grids["_moe_down_kernel"][0] == tokens * keep
    with torch.device("meta"):  # the fake keeps the shape
        assert torch.ops.xquant.moe_experts(x.to("meta"), ids.to("meta"), w.to("meta"), gate_up.to("meta"),
                                            down.to("meta"), keep).shape == x.shape


# --------------------------------------------------------------------------- router top-k
def _sorted_reference(scores: torch.Tensor, k: int):
    """Largest first, ties to the lower index, NaN first (``torch.sort`` is stable)."""
    values, indices = torch.sort(scores.float(), dim=-1, descending=True, stable=True)
    return scores.gather(-1, indices[..., :k]), indices[..., :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])  # values exact in each
@pytest.mark.parametrize("shape, k", [((5, 128), 8), ((2, 3, 64), 6), ((4, 60), 60), ((3, 8), 1)])
def test_router_topk_kernel_matches_torch(shape, k, dtype, force_kernels):
    torch.manual_seed(k)
    scores = torch.randn(shape).to(dtype)
    scores.view(-1, shape[-1])[0, : shape[-1] // 2] = 0.25  # ties: the lower index first
    if shape[0] > 2:
        scores.view(-1, shape[-1])[1, 3] = float("nan")  # NaN ranks first, as in torch.topk
        scores.view(-1, shape[-1])[2, :] = float("-inf")  # every index still taken once
        scores.view(-1, shape[-1])[2, 5] = 1.0
    scores.view(-1, shape[-1])[-1, -1] = 1e6 + 1e-3  # between two float32 values: exact only when kept float64
    values, indices = torch.ops.xquant.router_topk(scores, k)
    want_values, want_indices = _sorted_reference(scores, k)
    assert values.dtype == dtype and indices.dtype == torch.int64 and values.shape == (*shape[:-1], k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, equal_nan=True, atol=0, rtol=0)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # no index twice
    keep = max(1, k // 2)  # static pruning in the same launch
    values, indices = torch.ops.xquant.router_topk(scores, k, keep, float("-inf"), shape[-1])
    assert torch.equal(indices[..., :keep], want_indices[..., :keep]) and (indices[..., keep:] == shape[-1]).all()
    torch.testing.assert_close(values[..., :keep], want_values[..., :keep], equal_nan=True, atol=0, rtol=0)
    assert (values[..., keep:] == float("-inf")).all()


def test_router_topk_op_checks_arguments_and_has_a_fake():
    for k, scores in ((0, torch.randn(2, 8)), (9, torch.randn(2, 8)), (2, torch.zeros(2, 8, dtype=torch.long))):
        with pytest.raises(ValueError, match="router_topk"):
            torch.ops.xquant.router_topk(scores, k)
    for keep in (0, 5, -2):
        with pytest.raises(ValueError, match="keep"):
            torch.ops.xquant.router_topk(torch.randn(2, 8), 4, keep)
    scores = torch.randn(3, 16)
    values, indices = torch.ops.xquant.router_topk(scores, 4)
    assert torch.equal(values, scores.topk(4).values) and torch.equal(indices, scores.topk(4).indices)
    values, indices = torch.ops.xquant.router_topk(scores, 4, 1, 0.0, 16)
    assert torch.equal(values[:, 0], scores.max(-1).values) and (values[:, 1:] == 0).all() and (indices[:, 1:] == 16).all()
    torch.library.opcheck(torch.ops.xquant.router_topk.default, (scores, 4))
    torch.library.opcheck(torch.ops.xquant.router_topk.default, (scores, 4, 2, float("-inf"), 16))


@pytest.mark.parametrize("dtype, logits_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("tokens", [1, 5, 20])  # 20: past ROUTER_GEMV_MAX_TOKENS, the logits from matmul
def test_router_kernel_matches_softmax_top_k_of_its_logits(tokens, dtype, logits_dtype, force_kernels):
    torch.manual_seed(tokens)
    e, k, hid = 64, 6, 96
    x, weight = torch.randn(tokens, hid).to(dtype), torch.randn(e, hid).to(dtype)
    want_logits = F.linear(x.double(), weight.double()).to(logits_dtype or dtype)
    for keep, normalize, values_dtype in ((k, False, None), (k, True, dtype), (2, True, None), (3, False, dtype)):
        values, indices, logits = torch.ops.xquant.router(x, weight, k, keep, 0.0, e, normalize, logits_dtype,
                                                          values_dtype)
        assert logits.dtype == (logits_dtype or dtype) and values.dtype == (values_dtype or torch.float32)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-5 if logits.dtype == torch.float32 else 8e-3)
        # the rest exactly as torch does it from these logits
        probs = logits.float().softmax(-1)
        want_values, want_indices = _sorted_reference(probs, k)
        want_values[:, keep:], want_indices[:, keep:] = 0.0, e
        if normalize:
            want_values = want_values / want_values.sum(-1, keepdim=True)
        assert torch.equal(indices, want_indices)
        exact = values.dtype == torch.float32  # else one rounding to bf16 (either neighbour of a tie)
        torch.testing.assert_close(values, want_values.to(values.dtype), atol=1e-6, rtol=1e-5 if exact else 8e-3)


def test_router_op_checks_arguments_and_has_a_fake():
    x, weight = torch.randn(3, 16), torch.randn(8, 16)
    for args, match in (((x, weight[:, :4], 2), r"x must be \[T, H\]"), ((x, weight, 9), "1 <= k <= N"),
                        ((x, weight, 4, 5), "keep=5"), ((x, weight, 4, 2, float("-inf"), 8, True), "normalize"),
                        ((x.long(), weight, 2), "floating point"),
                        ((x, weight, 2, -1, 0.0, 0, False, torch.bfloat16), "need x and weight in torch.bfloat16")):
        with pytest.raises(ValueError, match=match):
            torch.ops.xquant.router(*args)
    values, indices, logits = torch.ops.xquant.router(x, weight, 4, 2, 0.0, 8, True)
    probs = F.linear(x, weight).softmax(-1)
    assert torch.equal(indices[:, :2], probs.topk(2).indices) and (indices[:, 2:] == 8).all()
    torch.testing.assert_close(values[:, :2].sum(-1), torch.ones(3)) and torch.equal(logits, F.linear(x, weight))
    torch.library.opcheck(torch.ops.xquant.router.default, (x, weight, 4))
    torch.library.opcheck(torch.ops.xquant.router.default, (x.bfloat16(), weight.bfloat16(), 4, 2, 0.0, 8, True,
                                                            torch.float32, torch.bfloat16))


# --------------------------------------------------------------------------- hand-written routers
def _reference_router(router, family: str, keep: int, min_weight: float = 0.0):
    """The routing of ``router`` (same weights) written out by hand, activating ``keep`` experts."""
    cfg_norm = getattr(router, "norm_topk_prob", family == "mixtral")

    def forward(hidden):
        hidden = hidden.reshape(-1, router.weight.shape[1])
        logits = hidden.float() @ router.weight.float().t()
        n_exp = logits.shape[-1]
        if family.startswith("deepseek_v3"):
            scores = logits.sigmoid()
            choice = scores + router.e_score_correction_bias
            groups = choice.view(-1, router.num_group, n_exp // router.num_group)
            group_score = groups.topk(2, dim=-1).values.sum(-1)
            chosen = group_score.topk(router.topk_group, dim=-1).indices
            allowed = torch.zeros_like(group_score).scatter(1, chosen, 1.0).bool()
            choice = choice.masked_fill(~allowed.repeat_interleave(n_exp // router.num_group, dim=1), float("-inf"))
            ids = choice.topk(keep, dim=-1).indices
            w = scores.gather(1, ids)
            if router.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return logits, w * router.routed_scaling_factor, ids
        probs = logits.softmax(-1)
        if family == "deepseek_v2_group":
            group_score = probs.view(-1, router.num_group, n_exp // router.num_group).max(-1).values
            chosen = group_score.topk(router.topk_group, dim=-1).indices
            allowed = torch.zeros_like(group_score).scatter(1, chosen, 1.0).bool()
            probs = probs.masked_fill(~allowed.repeat_interleave(n_exp // router.num_group, dim=1), 0.0)
        w, ids = probs.topk(keep, dim=-1)
        if min_weight:
            drop = w < min_weight * w[:, :1]
            w = w.masked_fill(drop, 0.0)
            ids = ids.masked_fill(drop, n_exp)
        if family.startswith("deepseek_v2"):
            return logits, w * router.routed_scaling_factor, ids
        if cfg_norm:
            w = w / w.sum(-1, keepdim=True)
        return logits, w.to(hidden.dtype), ids

    return forward


def _with_reference_routers(model, family, keeps, min_weight=0.0):
    ref = copy.deepcopy(model)
    for layer, keep in zip(find_moe_layers(ref), keeps):
        router = ref.get_submodule(layer.name).gate
        router.forward = _reference_router(router, family, keep, min_weight)
    return ref


def _compiled_logits(model, ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="xquant", fullgraph=True, options=options)
    with torch.no_grad():
        out = compiled(ids).logits
    torch._dynamo.reset()
    return out


def _run_with_pass(model, ids, plan):
    """``model(ids)`` compiled by a backend that runs ``prune_moe_router`` alone: (logits, graph, hits)."""
    return _run_with(model, ids, lambda gm: prune_moe_router(gm, PassContext(moe=plan)))


def _run_with(model, ids, rewrite):
    """``model(ids)`` compiled by a backend that calls ``rewrite(graph)``: (logits or output, graph, its result)."""
    seen = []

    def backend(gm, inputs):
        seen.append((gm, rewrite(gm)))
        gm.recompile()
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(ids)
    torch._dynamo.reset()
    (gm, result), = seen
    logits = getattr(out, "logits", out)
    return logits, gm, result


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

    logits, gm, hits = _run_with_pass(model, ids, plan)
    assert hits == len(layers)  # once per MoE layer (DeepSeek: the final of its top-k calls)
    assert [n.args[3] for n in gm.graph.nodes if n.target is prune_routes] == keeps  # intended k per layer
    # the experts read only the kept slots (the rest are sentinels)
    assert [n.kwargs.get("keep") for n in gm.graph.nodes if "xquant.moe_experts" in str(n.target)] == keeps
    assert prune_moe_router(gm, PassContext(moe=plan)) == 0  # idempotent
    with torch.no_grad():
        expected = _with_reference_routers(model, family, keeps)(ids).logits
        full = model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert (full - expected).abs().max() > 1e-3  # pruning changed something

    if family in ("mixtral", "deepseek_v3"):  # the whole xquant backend (Inductor), fed the config field
        torch.testing.assert_close(_compiled_logits(model, ids, moe_top_k=list(keeps)), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_router_topk_pass_takes_each_router_top_k_and_changes_no_output(family, monkeypatch):
    model = mini_moe_model(family)
    install_experts(model)
    layers = find_moe_layers(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    plan = MoEPlan(spec=max(1, layers[0].top_k - 1))
    pruned_only, pruned_graph, _ = _run_with_pass(model, ids, plan)
    fills = [float("-inf") if n.args[7] else 0.0 for n in pruned_graph.graph.nodes if n.target is prune_routes]
    if family in ("qwen3_moe", "deepseek_v2", "deepseek_v3"):  # and the kernels, under the interpreter
        monkeypatch.setenv("XQUANT_FORCE_KERNELS", "1")

    def all_passes(gm):
        report = PassReport()
        run_passes(gm, report, ctx=PassContext(moe=plan))
        return report

    logits, gm, report = _run_with(model, ids, all_passes)
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
    logits, gm, hits = _run_with(model, ids, router_topk)
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
    got, gm, hits = _run_with(block, x, router_topk)
    (fast,) = [n for n in gm.graph.nodes if is_router_topk(n)]
    assert hits == 1 and fast.target is torch.ops.xquant.router.default and fast.kwargs["normalize"] is True
    torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("plan", [MoEPlan(spec=2, renormalize=True), MoEPlan(spec=4, min_weight=0.3)],
                         ids=["renormalize", "min_weight"])
def test_router_topk_pass_keeps_the_prune_node_of_rules_beyond_a_k(plan):
    model = mini_moe_model("qwen2_moe")  # norm_topk_prob=False: renormalization is the plan's, not the router's
    install_experts(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(9))
    pruned_only, _, _ = _run_with_pass(model, ids, plan)
    logits, gm, _ = _run_with(model, ids, lambda gm: run_passes(gm, ctx=PassContext(moe=plan)))
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
        _, gm, found = _run_with(Block(experts), torch.randn(3, 8), router_topk)
        assert found == hits
        assert sum(n.target is torch.ops.xquant.router_topk.default for n in gm.graph.nodes) == hits


def test_find_routers_picks_the_final_top_k_of_each_router():
    model = mini_moe_model("deepseek_v3")
    install_experts(model)
    _, gm, _ = _run_with_pass(model, torch.zeros(1, 3, dtype=torch.long), None)
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
    torch.testing.assert_close(_compiled_logits(model, ids, moe_top_k=k), eager, atol=1e-5, rtol=1e-4)
    keeps = [k] * len(find_moe_layers(model))
    with torch.no_grad():
        expected = _with_reference_routers(model, family, keeps, min_weight=0.5)(ids).logits
    assert (expected - eager).abs().max() > 1e-3
    torch.testing.assert_close(_compiled_logits(model, ids, moe_min_weight=0.5), expected, atol=1e-5, rtol=1e-4)


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


def test_optimize_checks_moe_options():
    with pytest.raises(ValueError, match="no MoE layers"):
        xquant_fx.optimize(mini_model("llama", num_hidden_layers=2), XQuantConfig(moe_top_k=2))
    with pytest.raises(ValueError, match="routes each token to 4"):
        xquant_fx.optimize(mini_moe_model("qwen3_moe"), XQuantConfig(moe_top_k=6))
    with pytest.raises(ValueError, match="compile=False"):
        xquant_fx.optimize(mini_moe_model("qwen3_moe"), XQuantConfig(moe_top_k=2), compile=False)


def test_optimize_prunes_the_decode_step():
    """optimize(): the prompt runs with the model's k, each decode step with moe_top_k."""
    model = mini_moe_model("qwen3_moe")
    reference = copy.deepcopy(model)
    install_experts(reference)
    routers = [reference.get_submodule(m.name).gate for m in find_moe_layers(reference)]
    hand = [_reference_router(r, "qwen3_moe", 2) for r in routers]
    full = [r.forward for r in routers]

    def switch(module, args, kwargs):  # prompt: full routers; one token: hand-written k=2
        ids = kwargs.get("input_ids", args[0] if args else None)
        for router, f, h in zip(routers, full, hand):
            router.forward = h if ids.shape[-1] == 1 else f

    reference.register_forward_pre_hook(switch, with_kwargs=True)
    cfg = XQuantConfig.preset("kivi-4").replace(residual_length=32, moe_top_k=2)
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = xquant_fx.XQuantCache(reference.config, cfg, max_cache_len=48)
    expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, past_key_values=cache)

    torch._dynamo.reset()
    xquant_fx.optimize(model, cfg)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.tolist() == expected.tolist()
    torch._dynamo.reset()


# --------------------------------------------------------------------------- examples/moe_agreement.py
def _agreement_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "moe_agreement.py"
    spec = importlib.util.spec_from_file_location("moe_agreement", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_agreement_example_measures_what_pruning_changes():
    example = _agreement_example()
    model = mini_moe_model("qwen3_moe")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    same = example.layer_agreement(model, ids, 4)  # the model's own k: nothing changes
    assert [r["k"] for r in same] == [4] * len(find_moe_layers(model))
    assert all(r["rel_error"] < 1e-5 and r["cosine"] > 0.99999 for r in same)
    one, two = example.layer_agreement(model, ids, 1), example.layer_agreement(model, ids, [2] * len(same))
    assert [r["k"] for r in one] == [1] * len(same) and all(r["rel_error"] > 1e-2 for r in one)
    assert all(a["rel_error"] > b["rel_error"] for a, b in zip(one, two))  # fewer experts, further off
    whole = example.model_agreement(model, ids, 1)
    with torch.no_grad():
        reference = _with_reference_routers(model, "qwen3_moe", [1] * len(same))(ids).logits
        full = model(ids).logits
    assert whole["ppl_model_k"] == pytest.approx(example._perplexity(full, ids), rel=1e-5)
    assert whole["ppl_pruned"] == pytest.approx(example._perplexity(reference, ids), rel=1e-4)
    assert whole["agreement"] == pytest.approx((full.argmax(-1) == reference.argmax(-1)).float().mean().item())
    assert example.parse_top_k("6,4,2") == [6, 4, 2] and example.parse_top_k("3") == 3
    assert example.parse_keep("48") == 48 and example.parse_keep("0.75") == 0.75
    with pytest.raises(Exception, match="--top-k"):
        example.parse_top_k("four")


def test_moe_agreement_example_measures_dropped_experts():
    example = _agreement_example()
    model = mini_moe_model("mixtral")
    original = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(6))
    rows, whole = example.drop_agreement(model, ids[:, :20], ids[:, 20:], 4)
    usage = expert_usage(original, [ids[:, :20]])
    assert [r["kept"] for r in rows] == [4] * len(rows) and all(0 < r["usage_kept"] < 1 for r in rows)
    assert all(r["rel_error"] > 0 for r in rows) and whole["expert_bytes"][1] * 2 == whole["expert_bytes"][0]
    reference = copy.deepcopy(original)
    drop_experts(reference, 4, usage)
    with torch.no_grad():
        want, full = reference(ids[:, 20:]).logits, original(ids[:, 20:]).logits
    assert whole["ppl_pruned"] == pytest.approx(example._perplexity(want, ids[:, 20:]), rel=1e-5)
    assert whole["ppl_model_k"] == pytest.approx(example._perplexity(full, ids[:, 20:]), rel=1e-5)


# --------------------------------------------------------------------------- total-expert pruning
def _calibration(n=3):
    return [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def test_expert_usage_is_the_routed_weight_per_expert():
    model = mini_moe_model("qwen3_moe")
    seen = []
    hooks = [model.get_submodule(m.name).gate.register_forward_hook(lambda mod, a, out: seen.append(out[1:]))
             for m in find_moe_layers(model)]
    usage = expert_usage(model, _calibration(2))  # the test's hooks see the same calls
    for h in hooks:
        h.remove()
    layers = [m.layer for m in find_moe_layers(model)]
    assert sorted(usage) == layers and all(u.shape == (8,) for u in usage.values())
    for i, layer in enumerate(layers):  # hooks fire layer by layer, batch after batch
        want = torch.zeros(8)
        for weights, indices in seen[i::len(layers)]:
            want.index_add_(0, indices.reshape(-1), weights.reshape(-1).float())
        torch.testing.assert_close(usage[layer], want)


def _logits_with_masked_routers(model, ids, masks, monkeypatch):
    """``model(ids).logits`` with the router logits of ``masks`` (router weight's data_ptr -> bool
    mask over experts) at ``-inf``: the original routers, dropped experts out of reach."""
    linear = torch.nn.functional.linear

    def masked_linear(x, weight, bias=None):
        out = linear(x, weight, bias)
        mask = masks.get(weight.data_ptr())
        return out if mask is None else out.masked_fill(mask, float("-inf"))

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.nn.functional, "linear", masked_linear)
        return model(ids).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"])
def test_drop_experts_equals_masking_their_router_logits(family, monkeypatch):
    model = mini_moe_model(family)
    layers = find_moe_layers(model)
    usage = expert_usage(model, _calibration())
    original = copy.deepcopy(model)
    keep = max(5, layers[0].top_k)
    report = drop_experts(model, keep, usage)
    masks = {}
    for m in layers:
        kept = report.kept[m.layer]
        assert kept == sorted(usage[m.layer].topk(keep).indices.tolist())
        block, was = model.get_submodule(m.name), original.get_submodule(m.name)
        assert block.experts.gate_up_proj.shape[0] == block.gate.weight.shape[0] == block.experts.num_experts == keep
        assert torch.equal(block.experts.down_proj, was.experts.down_proj[kept])
        mask = torch.ones(8, dtype=torch.bool)
        mask[kept] = False
        masks[was.gate.weight.data_ptr()] = mask
    assert report.bytes_after < report.bytes_before and find_moe_layers(model)[0].num_experts == keep

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    want = _logits_with_masked_routers(original, ids, masks, monkeypatch)
    with torch.no_grad():
        got = model(ids).logits
        full = original(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - full).abs().max() > 1e-3  # dropping changed something
    if family in ("qwen3_moe", "deepseek_v2"):  # then fewer activated experts, compiled: the sentinel is now `keep`
        install_experts(model)
        keeps = [layers[0].top_k - 1] * len(layers)
        with torch.no_grad():
            expected = _with_reference_routers(model, family, keeps)(ids).logits
        torch.testing.assert_close(_compiled_logits(model, ids, moe_top_k=keeps[0]), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["deepseek_v2_group", "deepseek_v3"])
def test_drop_experts_keeps_the_groups_of_group_limited_routers_equal(family, monkeypatch):
    model = mini_moe_model(family, n_routed_experts=16)  # 4 groups of 4, 2 chosen per token, top-4
    layers = find_moe_layers(model)
    usage = expert_usage(model, _calibration())
    original = copy.deepcopy(model)
    report = drop_experts(model, 12, usage)
    reference = copy.deepcopy(original)
    masks = {}
    for m in layers:
        kept = report.kept[m.layer]
        for g in range(4):  # three from each group: that group's most used
            assert [e for e in kept if e // 4 == g] == sorted((usage[m.layer][4 * g:4 * g + 4].topk(3).indices + 4 * g).tolist())
        assert model.get_submodule(m.name).gate.weight.shape[0] == 12
        dropped = torch.ones(16, dtype=torch.bool)
        dropped[kept] = False
        gate = reference.get_submodule(m.name).gate
        if family == "deepseek_v3":  # choice = sigmoid score + bias: the bias puts dropped experts out of reach
            gate.e_score_correction_bias.masked_fill_(dropped, float("-inf"))
        else:
            masks[gate.weight.data_ptr()] = dropped
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(8))
    want = _logits_with_masked_routers(reference, ids, masks, monkeypatch)
    with torch.no_grad():
        got, full = model(ids).logits, original(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - full).abs().max() > 1e-3


def test_drop_experts_refuses_what_it_cannot_do_and_changes_nothing():
    model = mini_moe_model("qwen3_moe")
    usage = expert_usage(model, _calibration(1))
    before = {n: p.shape for n, p in model.named_parameters()}
    for keep, match in ((3, "top-k"), (9, "expert count"), (0.0, r"\(0, 1\]"), (True, "int or a fraction")):
        with pytest.raises(ValueError, match=match):
            drop_experts(model, keep, usage)
    with pytest.raises(ValueError, match="no \\[8\\] soft count for decoder layer"):
        drop_experts(model, 6, {k: v for k, v in list(usage.items())[:1]})
    assert {n: p.shape for n, p in model.named_parameters()} == before
    assert drop_experts(model, 0.75, usage).kept and find_moe_layers(model)[0].num_experts == 6
    for family, keep in (("deepseek_v2_group", 4), ("deepseek_v3", 4), ("deepseek_v3", 6)):
        grouped = mini_moe_model(family)  # 4 groups of 2, 2 chosen per token, top-4
        with pytest.raises(ValueError, match="group-limited.*split into the groups evenly"):
            drop_experts(grouped, keep, expert_usage(grouped, _calibration(1)))
    with pytest.raises(ValueError, match="no MoE layers"):
        drop_experts(mini_model("llama", num_hidden_layers=2), 4, {})
    odd = mini_moe_model("qwen3_moe")
    for m in find_moe_layers(odd):
        gate = odd.get_submodule(m.name).gate
        gate.forward = lambda x, gate=gate: x.reshape(-1, x.shape[-1]) @ gate.weight.t()  # logits only
    with pytest.raises(ValueError, match="does not return \\(logits, weights, indices\\)"):
        expert_usage(odd, _calibration(1))
