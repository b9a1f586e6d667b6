"""The plain-torch math that MoE graphs run: the routing rewrite the ``prune_moe_router`` pass puts
after a router's top-k (:func:`prune_routes`, :func:`prune_gather`), and the routed experts
(:func:`experts_reference`, the body of ``xquant::moe_experts`` off CUDA and the kernels' reference).
Imports nothing else of the package, so :mod:`xquant_fx.ops` can use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prune_routes(
    values: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    keep: int,
    min_weight: float = 0.0,
    top_p: float = 1.0,
    renormalize: bool = False,
    logits: bool = False,
    ranked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop routed slots of a router's top-k ``(values, indices)`` (``[..., K]`` each).

    A slot survives when its value ranks among the ``keep`` largest of its token, its weight is at
    least ``min_weight`` times the token's top weight, and the weights of the slots ranked above it
    sum to less than ``top_p`` of the token's total (the first slot always survives). Weights are
    ``values`` themselves, or ``softmax(values)`` when ``logits`` (a router that applies softmax
    after its top-k). Dropped slots get index ``num_experts`` and value 0 (``-inf`` when
    ``logits``, so that the softmax downstream gives them weight 0). With ``renormalize`` (and
    ``not logits``) the kept values are rescaled to the sum of all ``K`` values.

    ``ranked`` says the slots are already in descending order of value (``topk(..., sorted=True)``,
    which the graph pass asks for): a slot's rank is then its position, and no sort runs, so that
    under Inductor the whole rewrite is one fused elementwise kernel.
    """
    k = values.shape[-1]
    weights = values.float().softmax(-1) if logits else values.float()
    if ranked:
        rank = torch.arange(k, device=values.device).expand(values.shape)
        by_rank = weights
    else:
        order = torch.argsort(values, dim=-1, descending=True, stable=True)
        rank = torch.argsort(order, dim=-1, stable=True)  # rank[s]: position of slot s by value
        by_rank = weights.gather(-1, order)
    keep_mask = rank < keep
    if min_weight and min_weight > 0:
        top = weights.amax(-1, keepdim=True)
        keep_mask = keep_mask & (weights >= min_weight * top)
    if top_p is not None and top_p < 1.0:
        before = by_rank.cumsum(-1) - by_rank  # weight of the slots ranked above each
        total = by_rank.sum(-1, keepdim=True)
        keep_ranked = before < top_p * total
        keep_mask = keep_mask & (keep_ranked if ranked else keep_ranked.gather(-1, rank))
    keep_mask = keep_mask | (rank == 0)
    fill = float("-inf") if logits else 0.0
    new_values = values.masked_fill(~keep_mask, fill)
    if renormalize and not logits and k > 1:
        total = values.sum(-1, keepdim=True)
        kept = new_values.sum(-1, keepdim=True)
        new_values = new_values * (total / kept.clamp_min(torch.finfo(kept.dtype).tiny))
    new_indices = indices.masked_fill(~keep_mask, num_experts)
    return new_values, new_indices


def prune_gather(
    source: torch.Tensor, dim: int, indices: torch.Tensor, pruned: torch.Tensor, num_experts: int,
    renormalize: bool = False,
) -> torch.Tensor:
    """``source.gather(dim, indices)`` with the slots that :func:`prune_routes` dropped (``pruned``
    holds ``num_experts`` there) set to 0; with ``renormalize`` the kept entries are rescaled to
    the sum of all gathered entries (DeepSeek-V3 gathers its weights by index)."""
    full = source.gather(dim, indices)
    kept = full.masked_fill(pruned >= num_experts, 0)
    if renormalize:
        scale = full.sum(dim, keepdim=True) / kept.sum(dim, keepdim=True).clamp_min(torch.finfo(full.dtype).tiny)
        kept = kept * scale
    return kept


def experts_reference(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Routed experts of tokens ``x [T, H]`` with slots ``ids``/``weights [T, K]`` over
    ``gate_up [E, 2I, H]`` (gate rows first) and ``down [E, H, I]``: ``[T, H]`` in ``x.dtype``.

    Slots with ``ids >= E`` (the sentinel) contribute nothing. Products accumulate in float32; the
    activation ``silu(gate) * up`` is rounded to ``x.dtype`` before the down projection, as the
    kernel stores it. Static shapes only: for few slots (``T * K <= E``, decode) the selected
    experts' weights are gathered per slot; otherwise every expert runs on every token, masked by
    its routing weight (the reference favours simplicity over speed there).
    """
    t, h = x.shape
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    k = ids.shape[-1]
    valid = ids < e
    w = torch.where(valid, weights.float(), 0.0)  # [T, K]
    ids_c = ids.clamp(max=e - 1)
    xf = x.float()
    if t * k <= e:
        gu = gate_up[ids_c].float()  # [T, K, 2I, H]
        y = torch.einsum("th,tkih->tki", xf, gu)
        act = (F.silu(y[..., :inter]) * y[..., inter:]).to(x.dtype).float()
        out = torch.einsum("tki,tkhi->tkh", act, down[ids_c].float())
        return (out * w.unsqueeze(-1)).sum(1).to(x.dtype)
    # per-expert weight of each token: sum over its slots routed there
    per_expert = torch.zeros(t, e + 1, dtype=torch.float32, device=x.device)
    per_expert.scatter_add_(1, torch.where(valid, ids, e), w)
    y = torch.einsum("th,eih->tei", xf, gate_up.float())
    act = (F.silu(y[..., :inter]) * y[..., inter:]).to(x.dtype).float()
    out = torch.einsum("tei,ehi->teh", act, down.float())
    return (out * per_expert[:, :e].unsqueeze(-1)).sum(1).to(x.dtype)
