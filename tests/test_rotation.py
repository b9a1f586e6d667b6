"""Folding the value rotation into ``v_proj`` / ``o_proj`` (``xquant_fx.rotation``)."""

import copy

import pytest
import torch

from mini_models import mini_model
from xquant_fx import XQuantCache, optimize
from xquant_fx.api import cache_argument
from xquant_fx.rotation import FOLDED_ATTR, fold_value_rotation, value_rotation_folded


def logits(model, ids, cache=None):
    kwargs = {} if cache is None else {cache_argument(model): cache}
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])  # qwen2: v_proj has a bias
def test_fold_keeps_the_model_and_marks_its_config(family):
    model = mini_model(family, num_hidden_layers=2)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    assert fold_value_rotation(model) == 2
    assert value_rotation_folded(model.config)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before)  # the weights moved
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-4)  # the model did not
    assert fold_value_rotation(model) == 0  # once only: a second fold would undo the first


def test_fold_declines_a_fused_projection_and_changes_nothing():
    model = mini_model("phi3", num_hidden_layers=2)  # qkv_proj: no v_proj to fold into
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fold_value_rotation(model) == 0
    assert not value_rotation_folded(model.config)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", ["kivi-2:rotation=hadamard", "xquant-1.38+", "fp16"])
def test_a_folded_model_gives_the_same_logits(spec):
    """Folded model + a cache built from its config against the unfolded model + the same cache:
    a rotating cache stores the same rotated values (without a rotation of its own), a
    full-precision one the rotated values that the folded o_proj takes back; the logits agree at
    every step. (A quantizing cache without rotation also stays right over a folded model, but it
    quantizes other numbers, so its logits are not the unfolded model's.)"""
    plain = mini_model("llama", num_hidden_layers=3)
    folded = copy.deepcopy(plain)
    fold_value_rotation(folded)
    ids = torch.randint(1, 128, (2, 170), generator=torch.Generator().manual_seed(1))
    caches = [XQuantCache(m.config, spec, max_cache_len=200, max_batch_size=2) for m in (plain, folded)]
    assert [layer.values_rotated for layer in caches[1].layers if hasattr(layer, "values_rotated")] == \
        [True] * sum(hasattr(layer, "values_rotated") for layer in caches[1].layers)
    for model, cache in zip((plain, folded), caches):
        model.out = [logits(model, ids[:, :160], cache)[:, -1]]
        for t in range(160, 170):
            model.out.append(logits(model, ids[:, t : t + 1], cache)[:, -1])
    for a, b in zip(plain.out, folded.out):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


def test_optimize_folds_only_when_the_config_rotates_and_allowed():
    base = mini_model("llama", num_hidden_layers=2)
    ids = torch.randint(1, 128, (1, 140), generator=torch.Generator().manual_seed(2))
    for spec, fold, folded in (("kivi-2:rotation=hadamard", True, True), ("kivi-2:rotation=hadamard", False, False),
                               ("kivi-2", True, False)):
        model = copy.deepcopy(base)
        optimize(model, spec, compile=False, fold_rotation=fold)
        assert value_rotation_folded(model.config) is folded
        assert torch.equal(model.model.layers[1].self_attn.o_proj.weight,
                           base.model.layers[1].self_attn.o_proj.weight) is not folded
    reference = copy.deepcopy(base)
    model = copy.deepcopy(base)
    optimize(model, "kivi-2:rotation=hadamard", compile=False)
    want = reference.generate(ids, max_new_tokens=12, do_sample=False,
                              past_key_values=XQuantCache(reference.config, "kivi-2:rotation=hadamard",
                                                          max_cache_len=152))
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), want)
    with pytest.raises(ValueError, match="fold_rotation"):
        optimize(copy.deepcopy(base), "kivi-2", fold_rotation="yes")


def test_config_marker_is_the_only_state():
    model = mini_model("llama", num_hidden_layers=2)
    assert getattr(model.config, FOLDED_ATTR, False) is False
    fold_value_rotation(model)
    assert getattr(model.config, FOLDED_ATTR) is True
