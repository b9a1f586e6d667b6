"""Fused routed experts for decode and small batches: :func:`xquant_fx.moe.experts_reference` in
two grouped launches.

The ``S = T * K`` routing slots are sorted by expert; each expert's run of slots is cut into
blocks of ``BM`` rows, and a program handles one block and one tile of output columns, so each
selected expert's weights are read once per ``BM`` slots routed to it (once per step at batch 1):

1. ``up``: ``h[r] = silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)`` for the block's slots ``r`` (token
   ``t = slot // K``), stored in slot-sorted order in ``x.dtype``;
2. ``down``: ``o[slot] = w[slot] * (h[r] @ down[e]^T)`` in float32; the host sums each token's ``K``
   slots (deterministic, no atomics).

The block table is built on the device with sort / scatter_add / cumsum / searchsorted over a
static number of blocks, ``S // BM + min(S, E)`` (an upper bound of ``sum_e ceil(n_e / BM)``):
no host synchronisation, a grid that depends on shapes only, so the step can be captured in a
CUDA graph. Blocks past the last one, and sentinel slots (``id >= E``), do no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import launch


@triton.jit
def _block(BlockExpert, BlockRow, BlockEnd, Order, b, E: tl.constexpr, K_TOP: tl.constexpr, BM: tl.constexpr):
    e = tl.load(BlockExpert + b)
    r0 = tl.load(BlockRow + b)
    r1 = tl.load(BlockEnd + b)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < r1
    slots = tl.load(Order + rows, mask=rmask, other=0)
    return e, rows, rmask, slots


@triton.jit
def _moe_up_kernel(
    X, GateUp, Hbuf, Order, BlockExpert, BlockRow, BlockEnd,
    stride_xt, stride_ge, stride_gn, stride_hr,
    E: tl.constexpr, K_TOP: tl.constexpr, HID: tl.constexpr, INTER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    b = tl.program_id(0)
    nt = tl.program_id(1)
    e, rows, rmask, slots = _block(BlockExpert, BlockRow, BlockEnd, Order, b, E, K_TOP, BM)
    if e >= E:
        return
    tok = (slots // K_TOP).to(tl.int64)
    cols = nt * BN + tl.arange(0, BN)
    cmask = cols < INTER
    w_base = GateUp + e.to(tl.int64) * stride_ge
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, HID, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < HID
        xt = tl.load(X + tok[:, None] * stride_xt + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(w_base + cols[None, :] * stride_gn + ks[:, None], mask=wmask, other=0.0)
        wu = tl.load(w_base + (cols[None, :] + INTER) * stride_gn + ks[:, None], mask=wmask, other=0.0)
        acc_g = tl.dot(xt, wg, acc_g)
        acc_u = tl.dot(xt, wu, acc_u)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(Hbuf + rows[:, None].to(tl.int64) * stride_hr + cols[None, :], h.to(Hbuf.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_down_kernel(
    Hbuf, Down, W, Out, Order, BlockExpert, BlockRow, BlockEnd,
    stride_hr, stride_de, stride_dn, stride_os,
    E: tl.constexpr, K_TOP: tl.constexpr, HID: tl.constexpr, INTER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    b = tl.program_id(0)
    nt = tl.program_id(1)
    e, rows, rmask, slots = _block(BlockExpert, BlockRow, BlockEnd, Order, b, E, K_TOP, BM)
    if e >= E:
        return
    cols = nt * BN + tl.arange(0, BN)
    cmask = cols < HID
    w_base = Down + e.to(tl.int64) * stride_de
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, INTER, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < INTER
        a = tl.load(Hbuf + rows[:, None].to(tl.int64) * stride_hr + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        wd = tl.load(w_base + cols[None, :] * stride_dn + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, wd, acc)
    wt = tl.load(W + slots, mask=rmask, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(Out + slots[:, None].to(tl.int64) * stride_os + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def block_table(ids: torch.Tensor, num_experts: int, bm: int):
    """Slot order and per-block ``(expert, first row, row end)`` for slots ``ids [T, K]``;
    blocks past the last real one get expert ``num_experts``."""
    flat = ids.reshape(-1).clamp(max=num_experts).to(torch.int64)
    s = flat.numel()
    order = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]
    starts = counts.cumsum(0) - counts
    nblk = (counts + bm - 1) // bm
    blk_end = nblk.cumsum(0)
    num_blocks = s // bm + min(s, num_experts)
    b = torch.arange(num_blocks, device=ids.device, dtype=torch.int64)
    expert = torch.searchsorted(blk_end, b, right=True)
    ec = expert.clamp(max=num_experts - 1)
    row0 = starts[ec] + (b - (blk_end[ec] - nblk[ec])) * bm
    row1 = starts[ec] + counts[ec]
    return order, expert.to(torch.int32), row0.to(torch.int32), row1.to(torch.int32), num_blocks


def _tiles(slots: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BM, BN_up, BK_up, BN_down, BK_down): 16-row blocks while experts get few slots each (decode);
    narrow column tiles there so that a batch-1 step still spreads over the GPU."""
    if slots <= 2 * num_experts:
        return 16, 32, 128, 64, 128
    return 64, 64, 64, 64, 64


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """:func:`xquant_fx.moe.experts_reference` with the two kernels above."""
    t, hid = x.shape
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    k = ids.shape[-1]
    s = t * k
    x = x.contiguous()
    gate_up = gate_up.contiguous()
    down = down.contiguous()
    w = weights.reshape(-1).to(torch.float32).contiguous()
    bm, bn_up, bk_up, bn_down, bk_down = _tiles(s, e)
    order, expert, row0, row1, num_blocks = block_table(ids, e, bm)
    hbuf = torch.empty((s, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((s, hid), dtype=torch.float32, device=x.device)
    launch(_moe_up_kernel)[(num_blocks, triton.cdiv(inter, bn_up))](
        x, gate_up, hbuf, order, expert, row0, row1,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), hbuf.stride(0),
        E=e, K_TOP=k, HID=hid, INTER=inter, BM=bm, BN=bn_up, BK=bk_up, num_warps=4, num_stages=3,
    )
    launch(_moe_down_kernel)[(num_blocks, triton.cdiv(hid, bn_down))](
        hbuf, down, w, out, order, expert, row0, row1,
        hbuf.stride(0), down.stride(0), down.stride(1), out.stride(0),
        E=e, K_TOP=k, HID=hid, INTER=inter, BM=bm, BN=bn_down, BK=bk_down, num_warps=4, num_stages=3,
    )
    valid = (ids.reshape(-1) < e).unsqueeze(-1)
    out = torch.where(valid, out, 0.0)
    return out.view(t, k, hid).sum(1).to(x.dtype)
