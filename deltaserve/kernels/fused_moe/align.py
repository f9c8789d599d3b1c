"""Sort the (token, expert) pairs of a routed batch by expert and pad each expert's run to the GEMM row tile, on the
device with fixed-size torch ops (no host sync: CUDA graphs capture it; no bincount, whose CUDA version reads the max
back to the host)."""
from dataclasses import dataclass

import torch


@dataclass
class MoeAlignment:
    sorted_ids: torch.Tensor  # [num_tiles * block_m] int32: pair index t * k + j per row, num_pairs on padding rows
    expert_ids: torch.Tensor  # [num_tiles] int32: the expert of each row tile (tiles past the used ones: clamped)
    num_tokens_post_pad: torch.Tensor  # [1] int32: rows in use (a multiple of block_m); later tiles do nothing
    num_pairs: int  # T * k
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """A bound on the padded rows: every non-empty expert (at most min(E, pairs)) wastes < block_m rows."""
    used = min(num_experts, num_pairs)
    return -(-(num_pairs + used * (block_m - 1)) // block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """topk_ids: [T, k] int (expert of each pair; -1: held by another rank, given no row) -> the sorted, padded row
    order the fused MoE kernels walk.

    Expert e's pairs fill rows starts[e] .. starts[e] + count[e] in pair order (stable), its run padded to a multiple
    of block_m; tile i (rows i·block_m ..) belongs to one expert."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    m, dev = flat.numel(), flat.device
    key = torch.where(flat < 0, num_experts, flat)  # -1 -> bucket E: sorted last, its pairs written to a spare row
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(key, stable=True)
    e_sorted = key[order]
    rank = torch.arange(m, device=dev) - (counts.cumsum(0) - counts)[e_sorted]  # position within its expert
    rows = max_padded_rows(m, num_experts, block_m)
    sorted_ids = torch.full((rows + 1,), m, dtype=torch.int32, device=dev)
    starts = torch.cat([ends - padded, ends.new_full((1,), rows)])  # bucket E starts at the spare row
    sorted_ids.scatter_(0, (starts[e_sorted] + rank).clamp_(max=rows), order.to(torch.int32))
    sorted_ids = sorted_ids[:rows]
    tile_start = torch.arange(0, rows, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, tile_start, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return MoeAlignment(sorted_ids, expert_ids, ends[-1:].to(torch.int32), m, block_m)
