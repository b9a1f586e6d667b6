"""Fused routed experts for decode and small batches: :func:`xquant_fx.moe.experts_reference` as
two grouped GEMM launches (up, down), plus a block table and a combine where a step has more than
:data:`SLOT_BLOCKS_MAX` slots.

The ``S = T * K`` routing slots are sorted by expert; each expert's run of slots is cut into
blocks of ``BM`` rows, and a program handles one block and one tile of output columns, so each
selected expert's weights are read once per ``BM`` slots routed to it (once per step at batch 1):

1. ``up``: ``h[r] = silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)`` for the block's slots ``r`` (token
   ``t = slot // K``), stored in slot-sorted order in ``x.dtype``;
2. ``down``: ``o[slot] = w[slot] * (h[r] @ down[e]^T)`` in float32; each token's ``K`` slots are
   then added in slot order (deterministic: no float atomics).

The block table is built on the device by one single-program kernel (``_moe_align_kernel``: a
histogram of expert ids, prefix sums, the table over a static number of blocks
``S // BM + min(S, E)`` (an upper bound of ``sum_e ceil(n_e / BM)``), and the slot order by a
counting sort with atomics), and a last kernel sums each token's ``K`` slot outputs in a fixed
order. Four launches in all, no host synchronisation, a grid that depends on shapes only: the
step can be captured in a CUDA graph. Blocks past the last one, and sentinel slots
(``id >= E``), do no work. (The order of slots *within* one expert's run depends on atomics; each
slot's result does not, so the output is deterministic.)

With ``keep`` (:func:`moe_experts`; static expert pruning) only each token's first ``keep`` slots
count: ``K`` is ``keep`` throughout, and the kernels find a slot's expert and weight in the
``[T, K_ROW]`` routing tensors in place (:func:`_slot_at`).

Decode steps of at most :data:`SLOT_BLOCKS_MAX` slots skip the table: every slot is its own block
(``SLOTS``). On the H200 this took the Qwen3-30B-A3B experts at batch 1, k=8 from 32.2 to 28.3 µs
(``benchmarks/NOTES.md``, runs 13-14). These steps also split the up projection's reduction over
the hidden size (:class:`Decode`: at k=4, 4 slots x 24 column tiles are 96 programs on 132 SMs;
split 4 ways, the experts took 14.0 instead of 15.7 µs), and fold the combine into the down
kernel (the last slot program to finish a token's column tile adds the token's rows: 26.1
instead of 27.5 µs at k=8, 13.4 instead of 14.5 at k=4). Two launches.

Also here, the routers: ``_topk_kernel``, a router's top-k in one program per row
(``xquant::router_topk``; with ``SOFTMAX`` / ``NORMALIZE`` the rest of a softmax router,
``xquant::router``), which can drop the slots past a static ``keep`` in the same launch, and
``_router_logits_kernel``, the router GEMV of a decode step over one program per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import launch


@triton.jit
def _slot_at(slot, K_TOP: tl.constexpr, K_ROW: tl.constexpr):
    """Where slot ``slot`` is in the routing tensors (ids, weights ``[T, K_ROW]``), of which each
    token's first ``K_TOP`` slots are read (``xquant::moe_experts``' ``keep``)."""
    if K_TOP == K_ROW:
        return slot
    else:
        return slot // K_TOP * K_ROW + slot % K_TOP


@triton.jit
def _block(BlockExpert, BlockRow, BlockEnd, Order, b, BM: tl.constexpr, SLOTS: tl.constexpr, K_TOP: tl.constexpr,
           K_ROW: tl.constexpr):
    """Block ``b``'s expert, its ``BM`` row indices into the slot order, their mask and their slots.
    With ``SLOTS`` every slot is its own block (``BlockExpert`` is then the slot ids, row = slot)."""
    if SLOTS:
        e = tl.load(BlockExpert + _slot_at(b, K_TOP, K_ROW)).to(tl.int32)
        rows = b + tl.arange(0, BM)
        rmask = tl.arange(0, BM) == 0
        slots = rows
    else:
        e = tl.load(BlockExpert + b).to(tl.int32)
        rows = tl.load(BlockRow + b).to(tl.int32) + tl.arange(0, BM)
        rmask = rows < tl.load(BlockEnd + b)
        slots = tl.load(Order + rows, mask=rmask, other=0).to(tl.int32)
    return e, rows, rmask, slots


@triton.jit
def _moe_up_kernel(
    X, GateUp, Hbuf, Order, BlockExpert, BlockRow, BlockEnd, Arrivals, num_arrivals,
    stride_xt, stride_ge, stride_gn, stride_hs, stride_hr,
    E: tl.constexpr, K_TOP: tl.constexpr, HID: tl.constexpr, INTER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SLOTS: tl.constexpr, SPLIT: tl.constexpr,
    BA: tl.constexpr, K_ROW: tl.constexpr,
):
    """``SPLIT == 1``: ``h = silu(gate) * up`` in ``Hbuf.dtype``. ``SPLIT > 1`` (split-K): program
    ``(b, n, s)`` sums the ``s``-th of ``SPLIT`` slices of the hidden dimension and stores the
    float32 partial pre-activations, gate at columns ``[0, I)`` and up at ``[I, 2I)`` of
    ``Hbuf[s]``; the down kernel adds the slices and applies the activation. With ``BA > 0`` the
    first program zeroes the down kernel's ``num_arrivals`` arrival counters (this launch ends
    before the down kernel starts: no memset launch of its own)."""
    b = tl.program_id(0)
    nt = tl.program_id(1)
    if BA > 0:
        if (b == 0) & (nt == 0) & (tl.program_id(2) == 0):
            tl.store(Arrivals + tl.arange(0, BA), tl.zeros([BA], dtype=tl.int32), mask=tl.arange(0, BA) < num_arrivals)
    e, rows, rmask, slots = _block(BlockExpert, BlockRow, BlockEnd, Order, b, BM, SLOTS, K_TOP, K_ROW)
    if e >= E:
        return
    tok = (slots // K_TOP).to(tl.int64)
    cols = nt * BN + tl.arange(0, BN)
    cmask = cols < INTER
    w_base = GateUp + e.to(tl.int64) * stride_ge
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    sk = tl.program_id(2)
    k_per: tl.constexpr = ((HID + BK - 1) // BK + SPLIT - 1) // SPLIT * BK
    for k0 in range(sk * k_per, tl.minimum(sk * k_per + k_per, HID), BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < HID
        xt = tl.load(X + tok[:, None] * stride_xt + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(w_base + cols[None, :] * stride_gn + ks[:, None], mask=wmask, other=0.0)
        wu = tl.load(w_base + (cols[None, :] + INTER) * stride_gn + ks[:, None], mask=wmask, other=0.0)
        acc_g = tl.dot(xt, wg, acc_g)
        acc_u = tl.dot(xt, wu, acc_u)
    hmask = rmask[:, None] & cmask[None, :]
    h_ptr = Hbuf + sk * stride_hs + rows[:, None].to(tl.int64) * stride_hr + cols[None, :]
    if SPLIT == 1:
        tl.store(h_ptr, (acc_g * tl.sigmoid(acc_g) * acc_u).to(Hbuf.dtype.element_ty), mask=hmask)
    else:
        tl.store(h_ptr, acc_g, mask=hmask)
        tl.store(h_ptr + INTER, acc_u, mask=hmask)


@triton.jit
def _moe_down_kernel(
    X, Hbuf, Down, W, Out, Y, Arrivals, Order, BlockExpert, BlockRow, BlockEnd,
    stride_hs, stride_hr, stride_de, stride_dn, stride_os, stride_yt,
    E: tl.constexpr, K_TOP: tl.constexpr, HID: tl.constexpr, INTER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SLOTS: tl.constexpr, SPLIT_UP: tl.constexpr,
    FOLD: tl.constexpr, K_ROW: tl.constexpr,
):
    """``Out[slot] = w[slot] * (h[r] @ down[e]^T)`` in float32. With ``SPLIT_UP > 1`` ``h`` is made
    here from the up kernel's partial pre-activations, rounded to ``X.dtype`` as the one-pass up
    kernel stores it.

    ``FOLD`` (slot blocks): the combine happens here. Each program, sentinel slots included,
    counts its arrival at its token's column tile (``Arrivals[t, n]``, zeroed by the up kernel);
    the program that arrives ``K``-th adds the token's ``K`` rows in slot order (the same sums as
    :func:`_moe_combine_kernel`, whichever program is last) and stores ``y[t]``."""
    b = tl.program_id(0)
    nt = tl.program_id(1)
    e, rows, rmask, slots = _block(BlockExpert, BlockRow, BlockEnd, Order, b, BM, SLOTS, K_TOP, K_ROW)
    cols = nt * BN + tl.arange(0, BN)
    cmask = cols < HID
    if e < E:
        w_base = Down + e.to(tl.int64) * stride_de
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        h_rows = Hbuf + rows[:, None].to(tl.int64) * stride_hr
        for k0 in range(0, INTER, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < INTER
            if SPLIT_UP == 1:
                a = tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            else:  # slot blocks (the host splits no other step): one row, ``b``; vectors keep shared memory small
                g = tl.zeros((BK,), dtype=tl.float32)
                u = tl.zeros((BK,), dtype=tl.float32)
                h_row = Hbuf + b.to(tl.int64) * stride_hr + ks
                for p in tl.static_range(SPLIT_UP):
                    g += tl.load(h_row + p * stride_hs, mask=kmask, other=0.0)
                    u += tl.load(h_row + p * stride_hs + INTER, mask=kmask, other=0.0)
                act = (g * tl.sigmoid(g) * u).to(X.dtype.element_ty)
                a = tl.where(rmask[:, None], act[None, :], tl.zeros((BM, BK), dtype=X.dtype.element_ty))
            wd = tl.load(w_base + cols[None, :] * stride_dn + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                         other=0.0)
            acc = tl.dot(a, wd, acc)
        wt = tl.load(W + _slot_at(slots, K_TOP, K_ROW), mask=rmask, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
        tl.store(Out + slots[:, None].to(tl.int64) * stride_os + cols[None, :], acc,
                 mask=rmask[:, None] & cmask[None, :])
    if FOLD:
        t = b // K_TOP
        tl.debug_barrier()  # every thread's row stored before the arrival is counted (released)
        arrived = tl.atomic_add(Arrivals + t * tl.num_programs(1) + nt, 1, sem="acq_rel", scope="gpu")
        if arrived == K_TOP - 1:  # the other slots' rows come from other SMs: read them from L2 (.cg)
            _token_sum(Out, BlockExpert, Y, t, cols, cmask, stride_os, stride_yt, E, K_TOP, K_ROW, ".cg")


@triton.jit
def _moe_align_kernel(
    Ids, Order, BlockExpert, BlockRow, BlockEnd, Scratch, S, NUM_BLOCKS,
    E: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BB: tl.constexpr, K_TOP: tl.constexpr,
    K_ROW: tl.constexpr,
):
    """One program: slot order and block table of the ``S`` slot ids (``EP >= E + 1``, a power of 2)."""
    bins = tl.arange(0, EP)
    counts = tl.zeros([EP], dtype=tl.int32)
    for s0 in range(0, S, BS):
        offs = s0 + tl.arange(0, BS)
        ids = tl.minimum(tl.load(Ids + _slot_at(offs, K_TOP, K_ROW), mask=offs < S, other=E), E).to(tl.int32)
        counts += tl.histogram(ids, EP)
    counts = tl.where(bins < E, counts, 0)
    nblk = (counts + BM - 1) // BM
    blk_end = tl.cumsum(nblk, 0)
    starts = tl.cumsum(counts, 0) - counts
    tl.store(Scratch + bins, starts)
    tl.store(Scratch + EP + bins, blk_end - nblk)
    tl.store(Scratch + 2 * EP + bins, counts)
    tl.store(Scratch + 3 * EP + bins, starts)  # cursors of the counting sort
    tl.debug_barrier()
    for b0 in range(0, NUM_BLOCKS, BB):
        b = b0 + tl.arange(0, BB)
        expert = tl.sum((blk_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        ec = tl.minimum(expert, E - 1)
        first = tl.load(Scratch + ec)
        row0 = first + (b - tl.load(Scratch + EP + ec)) * BM
        row1 = first + tl.load(Scratch + 2 * EP + ec)
        bmask = b < NUM_BLOCKS
        tl.store(BlockExpert + b, tl.minimum(expert, E), mask=bmask)
        tl.store(BlockRow + b, row0, mask=bmask)
        tl.store(BlockEnd + b, row1, mask=bmask)
    for s0 in range(0, S, BS):
        offs = s0 + tl.arange(0, BS)
        ids = tl.minimum(tl.load(Ids + _slot_at(offs, K_TOP, K_ROW), mask=offs < S, other=E), E).to(tl.int32)
        valid = (offs < S) & (ids < E)
        pos = tl.atomic_add(Scratch + 3 * EP + ids, 1, mask=valid)
        tl.store(Order + pos, offs, mask=valid)


@triton.jit
def _token_sum(Out, Ids, Y, t, cols, cmask, stride_os, stride_yt, E: tl.constexpr, K_TOP: tl.constexpr,
               K_ROW: tl.constexpr, CACHE: tl.constexpr):
    """``y[t, cols] = sum_k out[t * K + k, cols]`` over the token's non-sentinel slots, in slot order."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for k in range(K_TOP):
        slot = t * K_TOP + k
        valid = tl.load(Ids + _slot_at(slot, K_TOP, K_ROW)) < E  # sentinel rows hold garbage: select, do not multiply
        row = tl.load(Out + slot.to(tl.int64) * stride_os + cols, mask=cmask, other=0.0, cache_modifier=CACHE)
        acc += tl.where(valid, row, 0.0)
    tl.store(Y + t.to(tl.int64) * stride_yt + cols, acc.to(Y.dtype.element_ty), mask=cmask)


@triton.jit
def _moe_combine_kernel(Out, Ids, Y, stride_os, stride_yt, E: tl.constexpr, K_TOP: tl.constexpr,
                        HID: tl.constexpr, BH: tl.constexpr, K_ROW: tl.constexpr):
    """``y[t] = sum_k out[t * K + k]`` over the token's non-sentinel slots, in slot order."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    _token_sum(Out, Ids, Y, t, cols, cols < HID, stride_os, stride_yt, E, K_TOP, K_ROW, "")


@triton.jit(do_not_specialize=["fill", "sentinel"])
def _topk_kernel(X, V, I, N, stride_x, fill, sentinel, K: tl.constexpr, KEEP: tl.constexpr, BN: tl.constexpr,
                 KP: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr):
    """Row ``r``'s ``K`` largest entries, largest first; ties go to the lower index, NaN ranks
    above everything (as in ``torch.topk``), and every index is taken at most once. Slots from
    ``KEEP`` on are dropped: value ``fill``, index ``sentinel``. With ``SOFTMAX`` the row is
    replaced by its float32 softmax first (router logits in, probabilities out); with ``NORMALIZE``
    the kept values are divided by their sum."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    inb = cols < N
    x = tl.load(X + row * stride_x + cols, mask=inb, other=0.0).to(tl.float32)
    if SOFTMAX:
        p = tl.exp(x - tl.max(tl.where(inb, x, float("-inf")), axis=0))
        p = tl.where(inb, p, 0.0)
        x = p / tl.sum(p, axis=0)
    key = tl.where(x != x, float("inf"), x)
    taken = ~inb
    slot = tl.arange(0, KP)
    values = tl.full([KP], fill, tl.float32)
    indices = tl.full([KP], sentinel, tl.int64)
    for i in tl.static_range(KEEP):
        best = tl.max(tl.where(taken, float("-inf"), key), axis=0)
        idx = tl.min(tl.where((key == best) & ~taken, cols, BN), axis=0)
        taken = taken | (cols == idx)
        indices = tl.where(slot == i, idx.to(tl.int64), indices)
        if SOFTMAX:  # the float32 probability at idx (NaN stays NaN)
            values = tl.where(slot == i, tl.sum(tl.where(cols == idx, x, 0.0), axis=0), values)
        else:  # the score itself, in its own dtype (float64 exact, -0.0 kept)
            tl.store(V + row * K + i, tl.load(X + row * stride_x + idx))
    if SOFTMAX:
        if NORMALIZE:  # dropped slots hold 0: 0 / sum, as the torch code divides every slot
            values = values / tl.sum(tl.where(slot < KEEP, values, 0.0), axis=0)
        tl.store(V + row * K + slot, values.to(V.dtype.element_ty), mask=slot < K)
    else:
        tl.store(V + row * K + slot, values.to(V.dtype.element_ty), mask=(slot >= KEEP) & (slot < K))
    tl.store(I + row * K + slot, indices, mask=slot < K)


@triton.jit
def _router_logits_kernel(X, Wt, L, T, stride_xt, stride_we, stride_lt,
                          HID: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """``L[t, e] = x[t] . w[e]`` (float32 sums, stored in ``L``'s dtype) for expert ``e`` = the
    program and the step's ``T <= BT`` tokens: a router's GEMV spread over one program per expert."""
    e = tl.program_id(0).to(tl.int64)
    ts = tl.arange(0, BT)
    tmask = ts < T
    acc = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, HID, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < HID
        xt = tl.load(X + ts[:, None].to(tl.int64) * stride_xt + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        w = tl.load(Wt + e * stride_we + ks, mask=kmask, other=0.0).to(tl.float32)
        acc += tl.sum(xt * w[None, :], axis=1)
    tl.store(L + ts.to(tl.int64) * stride_lt + e, acc.to(L.dtype.element_ty), mask=tmask)


def topk(scores: torch.Tensor, k: int, keep: int | None = None, fill: float = 0.0, sentinel: int = 0,
         softmax: bool = False, normalize: bool = False, values_dtype: torch.dtype | None = None):
    """``torch.topk(scores, k, dim=-1, sorted=True)`` for router-sized rows, in one launch; with
    ``keep < k`` the slots from ``keep`` on hold ``fill`` and index ``sentinel``. ``softmax``: of
    ``scores.float().softmax(-1)`` instead; ``normalize``: kept values divided by their sum;
    values in ``values_dtype`` (default: the scores' dtype, float32 with ``softmax``)."""
    n = scores.shape[-1]
    keep = k if keep is None else keep
    x = scores.contiguous().view(-1, n)
    if values_dtype is None:
        values_dtype = torch.float32 if softmax else scores.dtype
    values = torch.empty((x.shape[0], k), dtype=values_dtype, device=scores.device)
    indices = torch.empty((x.shape[0], k), dtype=torch.int64, device=scores.device)
    if x.shape[0]:
        launch(_topk_kernel)[(x.shape[0],)](
            x, values, indices, n, x.stride(0), float(fill), int(sentinel),
            K=k, KEEP=keep, BN=triton.next_power_of_2(n), KP=triton.next_power_of_2(k), SOFTMAX=softmax,
            NORMALIZE=normalize, num_warps=1 if n <= 256 else 4,
        )
    shape = (*scores.shape[:-1], k)
    return values.view(shape), indices.view(shape)


#: Routers of steps with at most this many tokens compute their logits in
#: :func:`_router_logits_kernel` (one program per expert); larger steps use
#: ``torch.matmul`` (cuBLAS). At batch 1 cuBLAS ran a 2048 x 128 bf16 GEMV on a couple of SMs in
#: ~5 µs (``benchmarks/results/moe_profile.md``).
ROUTER_GEMV_MAX_TOKENS = 16


def router(x: torch.Tensor, weight: torch.Tensor, k: int, keep: int | None = None, fill: float = 0.0,
           sentinel: int = 0, normalize: bool = False, logits_dtype: torch.dtype | None = None,
           values_dtype: torch.dtype | None = None):
    """A softmax router: ``logits = x @ weight^T`` (float32 sums, rounded to ``logits_dtype``,
    default ``x.dtype``), then :func:`topk` of their softmax. Two launches; returns
    ``(values, indices, logits)``."""
    t, hid = x.shape
    e = weight.shape[0]
    logits_dtype = logits_dtype or x.dtype
    x = x.contiguous()
    weight = weight.contiguous()
    if t <= ROUTER_GEMV_MAX_TOKENS:
        logits = torch.empty((t, e), dtype=logits_dtype, device=x.device)
        bt = triton.next_power_of_2(max(t, 1))
        bk = max(32, min(triton.next_power_of_2(hid), 2048 // bt))
        if t:
            launch(_router_logits_kernel)[(e,)](
                x, weight, logits, t, x.stride(0), weight.stride(0), logits.stride(0), HID=hid, BT=bt, BK=bk,
                num_warps=4,
            )
    else:
        logits = torch.matmul(x.to(logits_dtype), weight.to(logits_dtype).t())
    values, indices = topk(logits, k, keep, fill, sentinel, softmax=True, normalize=normalize,
                           values_dtype=values_dtype)
    return values, indices, logits


def block_table(ids: torch.Tensor, num_experts: int, bm: int, k_top: int):
    """Slot order and per-block ``(expert, first row, row end)`` for the first ``k_top`` slots of
    each token of contiguous ``ids [T, K]`` (one launch); blocks past the last real one get expert
    ``num_experts``."""
    flat = ids.reshape(-1)
    k_row = ids.shape[-1]
    s = ids.shape[0] * k_top
    num_blocks = s // bm + min(s, num_experts)
    ep = triton.next_power_of_2(num_experts + 1)
    dev = ids.device
    order = torch.empty(s, dtype=torch.int32, device=dev)
    expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    row0 = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    row1 = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    scratch = torch.empty(4 * ep, dtype=torch.int32, device=dev)
    launch(_moe_align_kernel)[(1,)](
        flat, order, expert, row0, row1, scratch, s, num_blocks,
        E=num_experts, EP=ep, BM=bm, BS=min(1024, triton.next_power_of_2(s)), BB=32, K_TOP=k_top, K_ROW=k_row,
        num_warps=4,
    )
    return order, expert, row0, row1, num_blocks


def _tiles(slots: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BM, BN_up, BK_up, BN_down, BK_down): 16-row blocks while experts get few slots each (decode),
    with narrow column tiles so that a batch-1 step still spreads over the GPU. Narrower still (16
    columns, to give 4 experts 2 programs per SM) was slower on the H200: the up kernel took 15.7
    instead of 10.3 µs at batch 1, k=4 (benchmarks/NOTES.md, run 15)."""
    if slots <= 2 * num_experts:
        return 16, 32, 128, 64, 128
    return 64, 64, 64, 64, 64


#: Steps of at most this many routing slots (tokens x k) skip the block table: each slot is its own
#: block (``SLOTS`` in the kernels), one launch fewer and no single-program sort on the critical
#: path. An expert chosen by several of these slots is read once per slot, mostly from L2.
SLOT_BLOCKS_MAX = 16

@dataclass(frozen=True)
class Decode:
    """How a slot-block step (at most :data:`SLOT_BLOCKS_MAX` slots) spreads over the GPU. At batch 1
    and small k, ``k`` slots x column tiles alone leave most of the H200's 132 SMs idle, or give
    each a long serial reduction: the up projection's reduction is split (split-K, powers of two,
    at most :data:`MAX_SPLIT`) until its launch has about ``up_programs`` programs (0: no split);
    the down kernel adds the slices' float32 partial sums (deterministic: no float atomics).
    ``bk_up`` / ``bk_down`` / ``stages``: reduction tiles and pipeline depth; ``fold_combine``: the
    down kernel adds each token's slots itself (arrival counters), no combine launch. The defaults
    were within 0.7 µs of the best setting tried at k = 8, 4, 2 on the H200
    (``benchmarks/results/moe_decode_sweep.md``); splitting the down projection too, or narrowing
    its column tiles to 32, was slower (``moe_decode_sweep_down.md``)."""

    up_programs: int = 384
    bk_up: int = 128
    bk_down: int = 128
    stages: int = 3
    fold_combine: bool = True


DECODE = Decode()

#: Largest split of one reduction (the partial sums are re-read by the next kernel).
MAX_SPLIT = 8


def _split(programs: int, chunks: int, target: int) -> int:
    """Power-of-two split of a reduction of ``chunks`` ``BK``-chunks over a launch of ``programs``
    programs: doubled while the launch stays within ``target`` programs."""
    split = 1
    while programs * split * 2 <= target and split * 2 <= min(chunks, MAX_SPLIT):
        split *= 2
    return split


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, keep: int = -1) -> torch.Tensor:
    """:func:`xquant_fx.moe.experts_reference` with the kernels above, over each token's first
    ``keep`` slots (``-1``: all)."""
    t, hid = x.shape
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    k_row = ids.shape[-1]
    k = keep if 0 < keep < k_row else k_row  # slots read per token: the first k of the k_row in ids / weights
    s = t * k
    x = x.contiguous()
    ids = ids.contiguous()
    weights = weights.contiguous()
    gate_up = gate_up.contiguous()
    down = down.contiguous()
    w = weights.reshape(-1)
    bm, bn_up, bk_up, bn_down, bk_down = _tiles(s, e)
    slot_blocks = s <= SLOT_BLOCKS_MAX
    stages = 3
    if slot_blocks:  # each slot is a block: the slot ids are the block experts; no table (None: unused)
        order, expert, row0, row1, num_blocks = None, ids.reshape(-1), None, None, s
        bk_up, bk_down, stages = DECODE.bk_up, DECODE.bk_down, DECODE.stages
    else:
        order, expert, row0, row1, num_blocks = block_table(ids, e, bm, k)
    up_tiles = triton.cdiv(inter, bn_up)
    split = _split(num_blocks * up_tiles, triton.cdiv(hid, bk_up), DECODE.up_programs) if slot_blocks else 1
    if split == 1:
        hbuf = torch.empty((1, s, inter), dtype=x.dtype, device=x.device)
    else:  # float32 partial pre-activations, gate then up; the down kernel reads them for slot blocks only
        hbuf = torch.empty((split, s, 2 * inter), dtype=torch.float32, device=x.device)
    out = torch.empty((s, hid), dtype=torch.float32, device=x.device)
    y = torch.empty_like(x)
    down_tiles = triton.cdiv(hid, bn_down)
    fold = slot_blocks and DECODE.fold_combine
    arrivals = torch.empty(t * down_tiles, dtype=torch.int32, device=x.device) if fold else None
    launch(_moe_up_kernel)[(num_blocks, up_tiles, split)](
        x, gate_up, hbuf, order, expert, row0, row1, arrivals, t * down_tiles,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), hbuf.stride(0), hbuf.stride(1),
        E=e, K_TOP=k, HID=hid, INTER=inter, BM=bm, BN=bn_up, BK=bk_up, SLOTS=slot_blocks, SPLIT=split,
        BA=triton.next_power_of_2(t * down_tiles) if fold else 0, K_ROW=k_row, num_warps=4, num_stages=stages,
    )
    launch(_moe_down_kernel)[(num_blocks, down_tiles)](
        x, hbuf, down, w, out, y, arrivals, order, expert, row0, row1,
        hbuf.stride(0), hbuf.stride(1), down.stride(0), down.stride(1), out.stride(0), y.stride(0),
        E=e, K_TOP=k, HID=hid, INTER=inter, BM=bm, BN=bn_down, BK=bk_down, SLOTS=slot_blocks, SPLIT_UP=split,
        FOLD=fold, K_ROW=k_row, num_warps=4, num_stages=stages,
    )
    if not fold:
        bh = min(1024, triton.next_power_of_2(hid))
        launch(_moe_combine_kernel)[(t, triton.cdiv(hid, bh))](
            out, ids.reshape(-1), y, out.stride(0), y.stride(0), E=e, K_TOP=k, HID=hid, BH=bh, K_ROW=k_row,
            num_warps=4,
        )
    return y
