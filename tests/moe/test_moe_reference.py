"""The plain-torch math of expert pruning: the routing rule and the experts reference."""

from __future__ import annotations

import pytest
import torch
from mini_models import MOE_FAMILIES, mini_moe_model

from xquant_fx.moe import experts_reference, find_moe_layers, prune_routes


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
