"""Torch reference for the GDN depthwise causal conv1d + SiLU over a flat varlen batch (CPU path and kernel oracle).

Only the conv and its state bookkeeping belong here; input validation lives in the package's `__init__.py`.
Numerics follow HF `qwen3_5`: the window `[state | new inputs]` is convolved by `F.conv1d` in the weight dtype,
SiLU in the weight dtype, then cast to the input dtype.
"""
import torch
import torch.nn.functional as F


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over a flat varlen batch, continuing from and updating each sequence's conv state.

    x: [T, C] fp32/bf16/fp16; weight: [C, W] model dtype; conv_state: [S, C, W-1] pool, weight's dtype, updated
    IN PLACE: afterwards conv_state[slots[i]] holds the last W-1 inputs of sequence i (older stored inputs shift in
    when a sequence has fewer than W-1 new tokens; a sequence with 0 tokens keeps its state).
    cu_seqlens: [N+1] int32/int64, cu_seqlens[0] = 0, cu_seqlens[N] = T; slots: [N] int64, distinct except -1;
    slot -1 is a padding row: it reads a zero state and writes nothing.
    Returns silu(conv) [T, C] in x.dtype.
    """
    T, C = x.shape
    P = weight.shape[1] - 1  # state columns per sequence
    N = slots.shape[0]
    if T == 0:
        return x.new_empty((0, C))
    device, dtype = x.device, weight.dtype
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    slots = slots.to(device=device, dtype=torch.int64)
    seq_ids = torch.arange(N, device=device)

    # One conv over all sequences at once: lay them out as [state_0 | x_0 | state_1 | x_1 | ...] so every token's
    # W-wide window lies inside its own segment; the outputs for windows straddling two segments are never read.
    seq_of_token = torch.repeat_interleave(seq_ids, cu[1:] - cu[:-1], output_size=T)
    token_col = torch.arange(T, device=device) + (seq_of_token + 1) * P  # [T]
    state_col = (cu[:-1] + seq_ids * P)[:, None] + torch.arange(P, device=device)  # [N, P]

    valid = slots >= 0
    # where(), not a multiply: a padding row must read exact zeros even if the slot it clamps to holds NaN
    old_state = torch.where(valid[:, None, None], conv_state[slots.clamp(min=0)], 0)  # [N, C, P]
    ext = torch.empty((C, T + N * P), device=device, dtype=dtype)
    ext[:, token_col] = x.t().to(dtype)
    ext[:, state_col.reshape(-1)] = old_state.permute(1, 0, 2).reshape(C, N * P)

    # Output column j is the window ext[:, j : j + W], which ends at token column j + P.
    y = F.conv1d(ext[None], weight[:, None, :], groups=C)[0]  # [C, T + (N-1) * P]
    out = F.silu(y[:, token_col - P]).t().to(x.dtype).contiguous()

    # The new state is the last P columns of each segment; with < P new tokens these reach back into the old state.
    new_col = (cu[1:] + (seq_ids + 1) * P)[:, None] - P + torch.arange(P, device=device)  # [N, P]
    new_state = ext[:, new_col].permute(1, 0, 2)  # [N, C, P]
    conv_state[slots[valid]] = new_state[valid]
    return out
