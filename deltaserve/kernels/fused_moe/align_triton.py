"""Triton moe_align for decode-sized batches: the whole sort / pad of align.moe_align (its torch reference, same
output) in ONE launch of one program, where the torch version costs ~15 small kernels per MoE layer.

Pairs are walked in chunks of CHUNK against all experts at once ([CHUNK, E_PAD] one-hot tiles): pass 1 counts each
expert's pairs; the padded run lengths and their cumsum give each expert's first row; pass 2 places pair i at
start[e_i] + (pairs of e_i before i) (a running count plus an in-chunk exclusive cumsum, so the order within an
expert is pair order, exactly the stable torch sort); pass 3 writes the padding marker to the rows no pair takes
and each tile's expert. Rows written by pass 2 and pass 3 are disjoint, so no barrier is needed between them.
Cost grows with T·k·E: the dispatch (triton.py) uses it up to TRITON_ALIGN_MAX_PAIRS pairs."""
import torch
import triton
import triton.language as tl

from .align import MoeAlignment, max_padded_rows


@triton.jit
def _moe_align_kernel(topk_ids, sorted_ids, expert_ids, num_post_pad, M, E, ROWS,
                      BM: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """topk_ids [M] int (-1: another rank's expert, counted nowhere, given no row) -> sorted_ids [ROWS] int32,
    expert_ids [ROWS / BM] int32, num_post_pad [1] int32."""
    o_e = tl.arange(0, E_PAD)
    o_j = tl.arange(0, CHUNK)
    b_cnt = tl.zeros([E_PAD], dtype=tl.int32)
    for i0 in range(0, M, CHUNK):  # pass 1: pairs per expert
        b_id = tl.load(topk_ids + i0 + o_j, mask=i0 + o_j < M, other=-1).to(tl.int32)
        b_cnt += tl.sum((b_id[:, None] == o_e[None, :]).to(tl.int32), axis=0)
    b_pad = (b_cnt + BM - 1) // BM * BM
    b_end = tl.cumsum(b_pad, axis=0)
    b_start = b_end - b_pad
    b_seen = tl.zeros([E_PAD], dtype=tl.int32)
    for i0 in range(0, M, CHUNK):  # pass 2: each pair's row
        o_i = i0 + o_j
        b_id = tl.load(topk_ids + o_i, mask=o_i < M, other=-1).to(tl.int32)
        b_hot = (b_id[:, None] == o_e[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
        b_before = tl.cumsum(b_hot, axis=0) - b_hot + b_seen[None, :]  # same-expert pairs before each pair
        b_row = tl.sum(b_hot * (b_start[None, :] + b_before), axis=1)
        tl.store(sorted_ids + b_row, o_i.to(tl.int32), mask=(o_i < M) & (b_id >= 0))  # -1: another rank's expert
        b_seen += tl.sum(b_hot, axis=0)
    b_used = tl.sum(b_pad, axis=0)
    tl.store(num_post_pad, b_used)
    for r0 in range(0, ROWS, CHUNK):  # pass 3: padding rows and each tile's expert
        o_r = r0 + o_j
        b_in = (b_start[None, :] <= o_r[:, None]) & (o_r[:, None] < b_end[None, :])  # row r in expert e's run
        b_off = tl.sum(tl.where(b_in, o_r[:, None] - b_start[None, :] - b_cnt[None, :], 0), axis=1)
        b_pad_row = (b_off >= 0) | (o_r >= b_used)  # past the expert's pairs, or past every run
        tl.store(sorted_ids + o_r, tl.full([CHUNK], 0, tl.int32) + M, mask=b_pad_row & (o_r < ROWS))
        b_tile_e = tl.sum((b_end[None, :] <= o_r[:, None]).to(tl.int32), axis=1)  # searchsorted(ends, r, right)
        b_tile_e = tl.minimum(b_tile_e, E - 1)
        tl.store(expert_ids + o_r // BM, b_tile_e, mask=(o_r % BM == 0) & (o_r < ROWS))


def moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """topk_ids: [T, k] int -> the same MoeAlignment as align.moe_align (identical tensors), in one launch."""
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    m = flat.numel()
    rows = max_padded_rows(m, num_experts, block_m)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=flat.device)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(1, min(64, 8192 // e_pad))  # [CHUNK, E_PAD] one-hot tiles of <= 8K elements
    _moe_align_kernel[(1,)](flat, sorted_ids, expert_ids, num_post_pad, m, num_experts, rows,
                            BM=block_m, E_PAD=e_pad, CHUNK=chunk, num_warps=4)
    return MoeAlignment(sorted_ids, expert_ids, num_post_pad, m, block_m)
