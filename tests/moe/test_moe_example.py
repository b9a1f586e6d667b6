"""``examples/moe_agreement.py`` measures what pruning changes."""

from __future__ import annotations

import copy

import pytest
import torch
from mini_models import mini_moe_model
from moe_routing import with_reference_routers

from xquant_fx.moe import drop_experts, expert_usage, find_moe_layers


# --------------------------------------------------------------------------- examples/moe_agreement.py
def _agreement_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "moe_agreement.py"
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
        reference = with_reference_routers(model, "qwen3_moe", [1] * len(same))(ids).logits
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
