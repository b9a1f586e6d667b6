"""``optimize()`` with MoE options: checks, and the pruned decode step."""

from __future__ import annotations

import copy

import pytest
import torch
from mini_models import mini_model, mini_moe_model
from moe_routing import reference_router

import xquant_fx
from xquant_fx import XQuantConfig
from xquant_fx.moe import find_moe_layers, install_experts

torch._dynamo.config.cache_size_limit = 64


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
    hand = [reference_router(r, "qwen3_moe", 2) for r in routers]
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
