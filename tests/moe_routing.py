"""Hand-written reference routers and compiled runs of MoE mini models, shared by the MoE and pass tests."""

from __future__ import annotations

import copy

import torch

from xquant_fx.moe import find_moe_layers
from xquant_fx.passes import PassContext
from xquant_fx.passes.prune_moe_router import prune_moe_router

torch._dynamo.config.cache_size_limit = 64


# --------------------------------------------------------------------------- hand-written routers
def reference_router(router, family: str, keep: int, min_weight: float = 0.0):
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


def with_reference_routers(model, family, keeps, min_weight=0.0):
    ref = copy.deepcopy(model)
    for layer, keep in zip(find_moe_layers(ref), keeps):
        router = ref.get_submodule(layer.name).gate
        router.forward = reference_router(router, family, keep, min_weight)
    return ref


def compiled_logits(model, ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="xquant", fullgraph=True, options=options)
    with torch.no_grad():
        out = compiled(ids).logits
    torch._dynamo.reset()
    return out


def run_with_pass(model, ids, plan):
    """``model(ids)`` compiled by a backend that runs ``prune_moe_router`` alone: (logits, graph, hits)."""
    return run_with(model, ids, lambda gm: prune_moe_router(gm, PassContext(moe=plan)))


def run_with(model, ids, rewrite):
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
