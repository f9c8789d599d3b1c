"""Causal conv1d dispatch: validates the flat varlen batch, then runs the torch reference.

Dispatch will pick the Triton kernel on CUDA once it exists; the reference stays the CPU path and its oracle."""
import torch

from . import reference

__all__ = ["causal_conv1d_varlen"]


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over a flat varlen batch, continuing from and updating each sequence's conv state.

    x: [T, C] fp32/bf16/fp16; weight: [C, W] model dtype; conv_state: [S, C, W-1] pool in weight's dtype, updated
    IN PLACE (conv_state[slots[i]] ends up holding the last W-1 inputs of sequence i); cu_seqlens: [N+1] int32/int64;
    slots: [N] int64, distinct except -1 (padding row: reads zeros, writes nothing). Returns [T, C] in x.dtype."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [T, C] and weight [C, W]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    T, C = x.shape
    W = weight.shape[1]
    if weight.shape[0] != C or W < 2:
        raise ValueError(f"weight must be [C={C}, W>=2]; got {tuple(weight.shape)}")
    if conv_state.dim() != 3 or tuple(conv_state.shape[1:]) != (C, W - 1):
        raise ValueError(f"conv_state must be [S, C={C}, W-1={W - 1}]; got {tuple(conv_state.shape)}")
    if conv_state.dtype != weight.dtype:
        raise ValueError(f"conv_state dtype {conv_state.dtype} must match the conv weight dtype {weight.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    _check_varlen(T, conv_state.shape[0], cu_seqlens, slots, x.device, (weight, conv_state))
    # dispatch will pick the Triton kernel here on CUDA; the reference serves CPU (and is its test oracle)
    return reference.causal_conv1d_varlen(x, weight, conv_state, cu_seqlens, slots)


def _check_varlen(T: int, num_slots: int, cu_seqlens: torch.Tensor, slots: torch.Tensor, device, others) -> None:
    """cu_seqlens: [N+1] int, 0 first, T last, non-decreasing; slots: [N] int in [-1, num_slots);
    everything on x's device."""
    if any(t.device != device for t in (*others, cu_seqlens, slots)):
        raise ValueError(f"x, weight, conv_state, cu_seqlens and slots must all be on {device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N+1]; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be a 1-D int32/int64 tensor [N]; got {slots.dtype} {tuple(slots.shape)}")
    if cu_seqlens.numel() != slots.numel() + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries but slots has {slots.numel()}: "
                         "cu_seqlens must be [N+1] for N slots")
    # one host read for all the value checks
    bad_slot = (slots < -1) | (slots >= num_slots)
    first, last, decreasing, bad = torch.stack([
        cu_seqlens[0].long(), cu_seqlens[-1].long(), (cu_seqlens.diff() < 0).sum(), bad_slot.sum()]).tolist()
    if first != 0 or last != T or decreasing:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={T}; got first={first}, "
                         f"last={last}, {decreasing} decreasing step(s)")
    if bad:
        raise ValueError(f"{bad} slot(s) outside [-1, {num_slots}): slots index the state pool, -1 marks padding")
