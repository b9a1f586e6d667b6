"""The MoE ops (``xquant::moe_experts``, ``xquant::router_topk``, ``xquant::router``) and their kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xquant_fx
import xquant_fx.ops  # noqa: F401  (registers the xquant:: ops)
from xquant_fx.moe import experts_reference


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
