"""Total-expert pruning: soft counts and dropping the least-used experts."""

from __future__ import annotations

import copy

import pytest
import torch
from mini_models import mini_model, mini_moe_model
from moe_routing import compiled_logits, with_reference_routers

from xquant_fx.moe import drop_experts, expert_usage, find_moe_layers, install_experts

torch._dynamo.config.cache_size_limit = 64


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
            expected = with_reference_routers(model, family, keeps)(ids).logits
        torch.testing.assert_close(compiled_logits(model, ids, moe_top_k=keeps[0]), expected, atol=1e-5, rtol=1e-4)


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
