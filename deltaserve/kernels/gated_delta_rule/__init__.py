"""Gated delta rule dispatch: validates the flat varlen batch, then runs the torch reference.

Dispatch will pick the Triton kernels on CUDA once they exist; the reference stays the CPU path and their oracle."""
import torch

from . import reference
from .reference import chunk_gated_delta_rule, gdn_gating, l2norm, recurrent_gated_delta_rule_step

__all__ = [
    "gated_delta_rule_varlen",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule_step",
    "gdn_gating",
    "l2norm",
]


def gated_delta_rule_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Gated delta rule over a flat varlen batch, continuing from and updating each sequence's pooled state.

    q, k: [T, Hk, K] model dtype (not yet l2-normalised); v: [T, HV, V]; a, b: [T, HV]; A_log, dt_bias: [HV];
    state: [S, HV, K, V] fp32 pool, updated IN PLACE at slots; cu_seqlens: [N+1] int32/int64;
    slots: [N] int64, distinct except -1 (padding row: reads a zero state, writes nothing).
    Returns o: [T, HV, V] in v.dtype."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3:
        raise ValueError(f"q and k must both be [T, Hk, K] and v [T, HV, V]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    T, Hk, K = q.shape
    HV, V = v.shape[1:]
    if v.shape[0] != T:
        raise ValueError(f"v has {v.shape[0]} tokens but q has {T}")
    if HV % Hk:
        raise ValueError(f"HV={HV} value heads are not divisible by Hk={Hk} key heads")
    for name, t in (("a", a), ("b", b)):
        if tuple(t.shape) != (T, HV):
            raise ValueError(f"{name} must be [T={T}, HV={HV}]; got {tuple(t.shape)}")
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if tuple(t.shape) != (HV,):
            raise ValueError(f"{name} must be [HV={HV}]; got {tuple(t.shape)}")
    if state.dim() != 4 or tuple(state.shape[1:]) != (HV, K, V):
        raise ValueError(f"state must be [S, HV={HV}, K={K}, V={V}]; got {tuple(state.shape)}")
    if state.dtype != torch.float32:
        raise ValueError(f"state must be float32 (the recurrence accumulates in it); got {state.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    _check_varlen(T, state.shape[0], cu_seqlens, slots, v.device, (q, k, a, b, A_log, dt_bias, state))
    # dispatch will pick the Triton kernel here on CUDA; the reference serves CPU (and is its test oracle)
    return reference.gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, state, cu_seqlens, slots, chunk_size)


def _check_varlen(T: int, num_slots: int, cu_seqlens: torch.Tensor, slots: torch.Tensor, device, others) -> None:
    """cu_seqlens: [N+1] int, 0 first, T last, non-decreasing; slots: [N] int in [-1, num_slots);
    everything on v's device."""
    if any(t.device != device for t in (*others, cu_seqlens, slots)):
        raise ValueError(f"all inputs (q, k, v, a, b, A_log, dt_bias, state, cu_seqlens, slots) must be on {device}")
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
