"""Causal conv1d dispatch: validates the flat varlen batch, then runs the Triton kernel on CUDA and the torch
reference elsewhere (the reference is also the kernel's test oracle)."""
import torch

from ..varlen import check_varlen, require_query_lens
from . import reference

__all__ = ["causal_conv1d_varlen"]


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    query_lens: list[int] | None = None,
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over a flat varlen batch, continuing from and updating each sequence's conv state.

    x: [T, C] fp32/bf16/fp16; weight: [C, W] model dtype; conv_state: [S, C, W-1] pool in weight's dtype, updated
    IN PLACE (conv_state[slots[i]] ends up holding the last W-1 inputs of sequence i); cu_seqlens: [N+1] int32/int64;
    slots: [N] int64, distinct except -1 (padding row: reads zeros, writes nothing); query_lens: N host ints
    (required on CUDA, where the kernel builds its tile table from them). Returns [T, C] in x.dtype."""
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
    check_varlen(T, conv_state.shape[0], cu_seqlens, slots, x.device, (weight, conv_state),
                 check_values=not x.is_cuda)
    if x.is_cuda:
        from .triton import causal_conv1d_varlen_triton

        return causal_conv1d_varlen_triton(x, weight, conv_state, cu_seqlens, slots,
                                           require_query_lens(query_lens, slots.numel()))
    return reference.causal_conv1d_varlen(x, weight, conv_state, cu_seqlens, slots)
