"""Validation shared by the varlen kernels' dispatchers (causal conv1d, gated delta rule).

Structural checks are free; the value checks read cu_seqlens and slots back to the host once, so dispatchers run
them only on the CPU reference path: on CUDA a host sync per layer would stall the stream and break graph capture.
"""
import torch


def check_varlen(T: int, num_slots: int, cu_seqlens: torch.Tensor, slots: torch.Tensor, device, others,
                 check_values: bool) -> None:
    """cu_seqlens: [N+1] int, 0 first, T last, non-decreasing; slots: [N] int in [-1, num_slots); all on device."""
    if any(t.device != device for t in (*others, cu_seqlens, slots)):
        raise ValueError(f"all inputs, cu_seqlens and slots must be on {device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N+1]; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be a 1-D int32/int64 tensor [N]; got {slots.dtype} {tuple(slots.shape)}")
    if cu_seqlens.numel() != slots.numel() + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries but slots has {slots.numel()}: "
                         "cu_seqlens must be [N+1] for N slots")
    if not check_values:
        return
    bad_slot = (slots < -1) | (slots >= num_slots)
    first, last, decreasing, bad = torch.stack([
        cu_seqlens[0].long(), cu_seqlens[-1].long(), (cu_seqlens.diff() < 0).sum(), bad_slot.sum()]).tolist()
    if first != 0 or last != T or decreasing:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={T}; got first={first}, "
                         f"last={last}, {decreasing} decreasing step(s)")
    if bad:
        raise ValueError(f"{bad} slot(s) outside [-1, {num_slots}): slots index the state pool, -1 marks padding")


def require_query_lens(query_lens, n: int) -> list[int]:
    if query_lens is None or len(query_lens) != n:
        raise ValueError(f"the CUDA kernels need query_lens: {n} host ints, one per sequence")
    return query_lens


def output_buffer(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """`out` after checking it is a contiguous [shape] tensor of dtype on device (a caller's slice of a larger buffer,
    so kernels write their rows in place), or a new one when None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {tuple(shape)} {dtype} tensor on {device}; got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    return out
