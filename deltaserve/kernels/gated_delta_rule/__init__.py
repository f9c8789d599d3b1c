"""Gated delta rule dispatch: validates the flat varlen batch, then runs the Triton kernels on CUDA (chunked WY
prefill; one fused kernel per decode step) and the torch reference elsewhere (also the kernels' test oracle).
Triton modules are imported only on the CUDA branch, so a CPU process never imports triton from here."""
import torch

from ..varlen import check_varlen, output_buffer, require_query_lens
from . import reference
from .reference import STATE_DTYPES, chunk_gated_delta_rule, gdn_gating, l2norm, recurrent_gated_delta_rule_step

__all__ = [
    "gated_delta_rule_varlen",
    "gdn_decode_step",
    "build_step_tables",
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
    query_lens: list[int] | None = None,
    tables=None,
    snapshots: tuple = (),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated delta rule over a flat varlen batch, continuing from and updating each sequence's pooled state.

    q, k: [T, Hk, K] model dtype (not yet l2-normalised); v: [T, HV, V]; a, b: [T, HV]; A_log, dt_bias: [HV];
    state: [S, HV, K, V] fp32 pool, updated IN PLACE at slots; cu_seqlens: [N+1] int32/int64;
    slots: [N] int64, distinct except -1 (padding row: reads a zero state, writes nothing); query_lens: N host
    ints (required on CUDA); tables: `build_step_tables(query_lens, device, snapshots)` built once per step (CUDA,
    optional); snapshots: (sequence, token offset, slot) triples (at most two a sequence, offsets multiples of
    chunk_size inside it): the state after that many of the sequence's tokens is also written to that slot;
    out: a contiguous [T, HV, V] tensor in v.dtype to write o into (e.g. rows of a mixed step's whole output).
    Returns o: [T, HV, V] in v.dtype (out when given)."""
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
    if state.dtype not in STATE_DTYPES:
        raise ValueError(f"state must be float32 or bfloat16 (held in that dtype between steps, updated in fp32); "
                         f"got {state.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    check_varlen(T, state.shape[0], cu_seqlens, slots, v.device, (q, k, a, b, A_log, dt_bias, state),
                 check_values=not v.is_cuda)
    if v.is_cuda:
        from .triton import chunk_gated_delta_rule_varlen

        return chunk_gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, state, cu_seqlens, slots,
                                             require_query_lens(query_lens, slots.numel()), chunk_size,
                                             tables=tables, snapshots=snapshots, out=out)
    o = reference.gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, state, cu_seqlens, slots, chunk_size,
                                          snapshots)
    return o if out is None else output_buffer(out, o.shape, o.dtype, o.device).copy_(o)


def build_step_tables(query_lens: list[int], device: torch.device, snapshots: tuple = ()):
    """The (sequence, chunk) index tables of the Triton prefill for one step, shared by every GDN layer
    (None off CUDA, where the reference needs none)."""
    if device.type != "cuda":
        return None
    from .triton import build_chunk_tables

    return build_chunk_tables(query_lens, device, snapshots)


def gdn_decode_step(mixed_qkv: torch.Tensor, conv_weight: torch.Tensor, conv_state: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
                    slots: torch.Tensor, num_k_heads: int, head_k_dim: int, head_v_dim: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of the GDN mixer after in_proj, one token per row: conv-state shift + conv + SiLU, gating,
    q/k L2 norm, recurrence, output. One Triton kernel on CUDA (graph-capturable, no host sync); on CPU the
    reference built from the conv and delta-rule references. mixed_qkv: [B, C] pre-conv [q | k | v];
    conv_weight: [C, W]; conv_state: [S, C, W-1]; a, b: [B, HV]; state: [S, HV, K, V] fp32; slots: [B] (-1 writes
    nothing); out: a contiguous [B, HV, V] tensor in mixed_qkv's dtype to write o into -> o: [B, HV, V] (out when
    given)."""
    if mixed_qkv.is_cuda:
        from .triton import fused_recurrent_decode

        return fused_recurrent_decode(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, state, slots,
                                      num_k_heads, head_k_dim, head_v_dim, out=out)
    o = reference.fused_recurrent_decode_reference(mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias,
                                                   state, slots, num_k_heads, head_k_dim, head_v_dim)
    return o if out is None else output_buffer(out, o.shape, o.dtype, o.device).copy_(o)

