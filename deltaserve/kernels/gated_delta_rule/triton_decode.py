"""Triton fused GDN decode: one kernel per step for every decoding row (one token each).

Per row: shift the conv state left appending the new pre-conv input, depthwise conv + SiLU for the channels a program
needs, gating from raw a/b, l2norm of q and k, the recurrence on the fp32 state read and written IN PLACE at the row's
slot, the output. Grid (V-tiles, HV, B); each program owns one [K, BV] tile of one value head's state, so the state
(the bandwidth that matters: 2 MiB per sequence per layer at 9B shapes) is read once and written once, coalesced
along V.

Conv-state ownership: a program's v channels are its own. The q/k channels of a key head are read by all
(HV/Hk) * V-tiles programs of that head, so none of them may shift the state before the others have read it: each
reader bumps a per-(slot, key head) arrival counter after its read (a release atomic: its reads are performed before
its count is), and the last to arrive writes the shifted q/k state and resets the counter to 0 for the next step (so
it stays valid under CUDA-graph replay). The last arriver's writes depend on the count it read, and GPUs do not
speculate stores, so it needs no acquire (acq_rel also invalidated the SM's L1 on every program). The release is a
MEMBAR that waits for the program's outstanding memory operations: counted right after the conv (ARRIVE_LATE=False)
it waits for the state tile's load, which the few-row launches need at once anyway; counted after the state tile
is stored (ARRIVE_LATE=True) it keeps the load and the compute off its path, which pays when many programs share an
SM.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from ..varlen import output_buffer
from .reference import STATE_DTYPES


@dataclass(frozen=True)
class DecodeLaunchConfig:
    """Launch parameters of the decode kernel. Defaults from `bench_gdn.py --sweep` on an H100 (2026-11-28):
    block_v 64 / 4 warps took B=64 0.139 -> 0.129 ms and B=256 0.516 -> 0.474 ms (0.71 -> 0.78 of the state-traffic
    bound) against 32 / 4. Below 32 rows the wrapper uses SMALL_BATCH_CONFIG instead."""
    block_v: int = 64  # V-tile: [K, 64] fp32 = 32 KiB of state per program, 256-byte rows
    num_warps: int = 4
    # count the conv-state arrival after the state store (module docstring); measured with the H200 config below
    # (B=256 410.9 -> 379.2 us), unmeasured with these H100 defaults
    arrive_late: bool = True


# Few rows: more, smaller programs keep the SMs busy (same sweep: B=1 5.0 us with 16 / 1 warp, 5.6 us with 32 / 4)
SMALL_BATCH_CONFIG = DecodeLaunchConfig(block_v=16, num_warps=1, arrive_late=False)
# 8-31 rows: 32-wide tiles. H200, `deltaserve bench`-style decode steps (.peer/gdn_e2e.py: AWQ, context 1024, two
# alternations, ms a step, 16 -> 32 columns; 2026-12-01): 35B-A3B shapes cut to 8 layers batch 8 1.198 / 1.138 ->
# 1.106 / 1.110, batch 16 2.692 / 2.683 -> 2.634 / 2.648; 27B shapes cut to 16 layers batch 8 3.411 / 3.416 ->
# 3.388 / 3.382, batch 16 3.877 / 3.887 -> 3.782 / 3.771. Below 8 rows 16 columns stayed ahead or level (35B-A3B batch
# 1 0.690 / 0.692 against 0.767 / 0.701, batch 4 0.912 / 0.890 against 0.953 / 0.908; 27B batch 1 2.613 against
# 2.629; only 27B batch 4 went the other way, 3.172 against 3.127).
MID_BATCH_CONFIG = DecodeLaunchConfig(block_v=32, num_warps=1, arrive_late=False)
MID_BATCH_ROWS = 8

# Cards whose own sweep picked another config for 32+ rows. H200 (2026-11-28, same sweep): 32 / 1 warp took B=64
# 0.122 -> 0.108 ms and B=256 0.457 -> 0.412 ms (0.57 -> 0.64 of its 4.2 TB/s copy bandwidth) against 64 / 4.
TUNED_CONFIGS = {"NVIDIA H200": DecodeLaunchConfig(block_v=32, num_warps=1)}


def default_config(rows: int, device: torch.device) -> DecodeLaunchConfig:
    """The launch config for `rows` decoding rows on `device`: small-batch tiles below MID_BATCH_ROWS rows, 32-wide
    ones below 32 rows, else the card's own sweep result where one exists, else the H100 defaults."""
    if rows < MID_BATCH_ROWS:
        return SMALL_BATCH_CONFIG
    if rows < 32:
        return MID_BATCH_CONFIG
    return TUNED_CONFIGS.get(_device_name(device), DecodeLaunchConfig())


_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    if device not in _DEVICE_NAMES:
        _DEVICE_NAMES[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return _DEVICE_NAMES[device]


@triton.jit
def _conv_window(conv_w, p_cs, o_c, m_c, m_live, W: tl.constexpr, BW: tl.constexpr):
    """The conv inputs of channels o_c that do not depend on this step's x: the row's state window (columns < W-1 of
    [C, W-1] at p_cs, weight dtype), the same shifted left by one (a second, cached load: registers cannot shift) and
    the conv weights [BC, BW]. m_live: [BC] mask, False for a padding row (reads a zero state)."""
    o_w = tl.arange(0, BW)
    m_s = (m_c & m_live)[:, None]
    p_s = p_cs + o_c[:, None] * (W - 1) + o_w[None, :]
    b_win = tl.load(p_s, mask=m_s & (o_w[None, :] < W - 1), other=0)
    b_next = tl.load(p_s + 1, mask=m_s & (o_w[None, :] < W - 2), other=0)
    b_wt = tl.load(conv_w + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & (o_w[None, :] < W), other=0)
    return b_win, b_next, b_wt


@triton.jit
def _conv_silu(x_row, b_win, b_next, b_wt, o_c, m_c, W: tl.constexpr, BW: tl.constexpr):
    """Depthwise causal conv over [conv state | x] + SiLU for channels o_c of one row, from _conv_window's tiles.

    x_row: the row's [C] pre-conv input. Returns (y [BC] fp32, rounded as HF rounds: conv and SiLU in the weight
    dtype, then the input dtype; new state [BC, BW] in weight dtype, columns < W-1)."""
    WT = b_wt.dtype
    o_w = tl.arange(0, BW)
    b_x = tl.load(x_row + o_c, mask=m_c, other=0)
    b_xw = b_x.to(WT)
    b_win = tl.where(o_w[None, :] == W - 1, b_xw[:, None], b_win)
    b_y = tl.sum(b_win.to(tl.float32) * b_wt.to(tl.float32), 1).to(WT).to(tl.float32)
    b_y = (b_y / (1.0 + tl.exp(-b_y))).to(WT).to(b_x.dtype).to(tl.float32)
    b_new = tl.where(o_w[None, :] == W - 2, b_xw[:, None], b_next)
    return b_y, b_new


@triton.jit
def _arrive_and_shift(counters, slot, slot_c, i_kh, p_cs, b_qs, b_ks, o_k, m_k, HK: tl.constexpr, K: tl.constexpr,
                      W: tl.constexpr, BW: tl.constexpr, READERS: tl.constexpr):
    """Count this program as one of the READERS of key head i_kh's q/k conv state at the row's slot; the last of them
    writes the shifted q/k state (b_qs, b_ks: [BK, BW], columns < W-1) and zeroes the counter. Padding rows skip."""
    if slot >= 0:
        tl.debug_barrier()  # every warp's conv-state reads precede the count (the release below is cumulative)
        # release: this program's conv-state reads are performed before its arrival is counted
        n_before = tl.atomic_add(counters + slot_c * HK + i_kh, 1, sem="release")
        if n_before == READERS - 1:
            o_w = tl.arange(0, BW)
            m_w = m_k[:, None] & (o_w[None, :] < W - 1)
            o_cq = i_kh * K + o_k
            tl.store(p_cs + o_cq[:, None] * (W - 1) + o_w[None, :], b_qs, mask=m_w)
            tl.store(p_cs + (HK * K + o_cq)[:, None] * (W - 1) + o_w[None, :], b_ks, mask=m_w)
            tl.store(counters + slot_c * HK + i_kh, 0)


@triton.jit
def _fused_recurrent_decode_kernel(
    x, conv_w, conv_state, a, b, A_log, dt_bias, state, slots, o, counters,
    s_x, s_cs, s_a, s_b, s_state, scale,
    HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr, NV: tl.constexpr, ARRIVE_LATE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """x: [B, C] pre-conv q|k|v (row stride s_x); conv_w: [C, W]; conv_state: [S, C, W-1] (slot stride s_cs);
    a, b: [B, HV]; state: [S, HV, K, V] fp32 (slot stride s_state); slots: [B]; o: [B, HV, V];
    counters: [S, HK] int32, all 0 between launches."""
    # Before the PDL wait, everything the kernel before (the in-projection) does not write: the slot, the state tile
    # (the one large load) and the conv windows, written only by this kernel in earlier steps, and the parameters.
    # Under PDL this program is placed while the in-projection streams its weights, so these loads hide behind it.
    i_v, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kh = i_h // (HV // HK)
    slot = tl.load(slots + i_b).to(tl.int64)
    slot_c = tl.maximum(slot, 0)  # padding rows (-1) point at slot 0 with every access masked off
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    # slot -1 as vector masks (a scalar bool in a mask trips the interpreter)
    m_live_k = (tl.zeros([BK], dtype=tl.int64) + slot) >= 0
    m_live_v = (tl.zeros([BV], dtype=tl.int64) + slot) >= 0
    m_h = m_k[:, None] & (m_v & m_live_v)[None, :]
    p_h = state + slot_c * s_state + i_h * (K * V) + o_k[:, None] * V + o_v[None, :]
    b_h = tl.load(p_h, mask=m_h, other=0.0).to(tl.float32)  # fp32 or bf16 pool; the update runs in fp32
    p_cs = conv_state + slot_c * s_cs
    o_cq, o_ck, o_cv = i_kh * K + o_k, HK * K + i_kh * K + o_k, 2 * HK * K + i_h * V + o_v
    w_q = _conv_window(conv_w, p_cs, o_cq, m_k, m_live_k, W, BW)
    w_k = _conv_window(conv_w, p_cs, o_ck, m_k, m_live_k, W, BW)
    w_v = _conv_window(conv_w, p_cs, o_cv, m_v, m_live_v, W, BW)
    b_gA = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
    b_dt = tl.load(dt_bias + i_h).to(tl.float32)
    pdl_start(USE_PDL)

    x_row = x + i_b * s_x
    b_q, b_qs = _conv_silu(x_row, w_q[0], w_q[1], w_q[2], o_cq, m_k, W, BW)
    b_k, b_ks = _conv_silu(x_row, w_k[0], w_k[1], w_k[2], o_ck, m_k, W, BW)
    b_v, b_vs = _conv_silu(x_row, w_v[0], w_v[1], w_v[2], o_cv, m_v, W, BW)
    o_w = tl.arange(0, BW)
    m_w = o_w[None, :] < W - 1
    tl.store(p_cs + o_cv[:, None] * (W - 1) + o_w[None, :], b_vs, mask=(m_v & m_live_v)[:, None] & m_w)
    if not ARRIVE_LATE:
        _arrive_and_shift(counters, slot, slot_c, i_kh, p_cs, b_qs, b_ks, o_k, m_k, HK, K, W, BW, (HV // HK) * NV)

    b_a = tl.load(a + i_b * s_a + i_h).to(tl.float32) + b_dt
    b_g = b_gA * tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(tl.minimum(b_a, 20.0))))
    b_beta = 1.0 / (1.0 + tl.exp(-tl.load(b + i_b * s_b + i_h).to(tl.float32)))
    b_q = b_q * (scale / tl.sqrt(tl.sum(b_q * b_q, 0) + 1e-6))
    b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + 1e-6)

    b_h = b_h * tl.exp(b_g)
    b_d = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
    b_h += b_k[:, None] * b_d[None, :]
    b_o = tl.sum(b_h * b_q[:, None], 0)
    tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_h)
    tl.store(o + (i_b * HV + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if ARRIVE_LATE:
        _arrive_and_shift(counters, slot, slot_c, i_kh, p_cs, b_qs, b_ks, o_k, m_k, HK, K, W, BW, (HV // HK) * NV)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _arrival_counters(device: torch.device, num_slots: int, num_k_heads: int) -> torch.Tensor:
    """[S, Hk] int32 zeros, one buffer per (device, pool shape) for the process lifetime: the kernel leaves it
    zeroed, and a CUDA graph that captured its address keeps finding it. Allocate before graph capture."""
    key = (device, num_slots, num_k_heads)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(num_slots, num_k_heads, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def fused_recurrent_decode(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor,
    num_k_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    config: DecodeLaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step (one token per row) of the GDN token mixer after in_proj, fused into a single kernel.

    mixed_qkv: [B, C] pre-conv in_proj_qkv output laid out [q | k | v], C = 2*Hk*K + HV*V (row stride free,
    channels dense); conv_weight: [C, W] (HF's [C, 1, W] squeezed); conv_state: [S, C, W-1] pool in the weight dtype,
    shifted IN PLACE at slots; a, b: [B, HV] raw projections; A_log, dt_bias: [HV]; state: [S, HV, K, V] fp32 pool,
    updated IN PLACE at slots; slots: [B] int32/int64, distinct except -1 (padding row: writes nothing, its output is
    finite garbage); out: a contiguous [B, HV, V] tensor to write o into. Returns o: [B, HV, V] in mixed_qkv.dtype."""
    HK, K, V = num_k_heads, head_k_dim, head_v_dim
    if mixed_qkv.dim() != 2 or mixed_qkv.stride(-1) != 1:
        raise ValueError(f"mixed_qkv must be [B, C] with dense channels; got {tuple(mixed_qkv.shape)} "
                         f"strides {mixed_qkv.stride()}")
    B, C = mixed_qkv.shape
    HV = (C - 2 * HK * K) // V if V > 0 else 0
    if HK < 1 or HV < 1 or C != 2 * HK * K + HV * V or HV % HK:
        raise ValueError(f"mixed_qkv has C={C} channels, not 2*Hk*K + HV*V with Hk={HK}, K={K}, V={V} "
                         "and HV a multiple of Hk")
    if conv_weight.dim() != 2 or conv_weight.shape[0] != C or conv_weight.shape[1] < 2 or \
            not conv_weight.is_contiguous():
        raise ValueError(f"conv_weight must be a contiguous [C={C}, W>=2]; got {tuple(conv_weight.shape)}")
    W = conv_weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[1:] != (C, W - 1) or conv_state.stride()[1:] != (W - 1, 1) or \
            conv_state.dtype != conv_weight.dtype:
        raise ValueError(f"conv_state must be a [S, C={C}, W-1={W - 1}] pool with dense slots in the weight dtype "
                         f"{conv_weight.dtype}; got {conv_state.dtype} {tuple(conv_state.shape)}")
    if state.dtype not in STATE_DTYPES or state.dim() != 4 or state.shape[1:] != (HV, K, V) or \
            state.stride()[1:] != (K * V, V, 1) or state.shape[0] != conv_state.shape[0]:
        raise ValueError(f"state must be an fp32/bf16 pool [S={conv_state.shape[0]}, HV={HV}, K={K}, V={V}] with dense "
                         f"slots; got {state.dtype} {tuple(state.shape)} strides {state.stride()}")
    for name, t in (("a", a), ("b", b)):
        if t.shape != (B, HV) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [B={B}, HV={HV}] with dense rows; got {tuple(t.shape)}")
    if A_log.shape != (HV,) or dt_bias.shape != (HV,) or slots.shape != (B,):
        raise ValueError(f"A_log, dt_bias must be [HV={HV}] and slots [B={B}]; got {tuple(A_log.shape)}, "
                         f"{tuple(dt_bias.shape)}, {tuple(slots.shape)}")
    if max(K, V) > 256:
        raise ValueError(f"head dims K={K}, V={V}: a program holds a [K, V-tile] state tile, K at most 256")
    config = config or default_config(B, mixed_qkv.device)
    o = output_buffer(out, (B, HV, V), mixed_qkv.dtype, mixed_qkv.device)
    if B == 0:
        return o
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), triton.next_power_of_2(config.block_v)))
    NV = triton.cdiv(V, BV)
    counters = _arrival_counters(mixed_qkv.device, state.shape[0], HK)
    _fused_recurrent_decode_kernel[(NV, HV, B)](
        mixed_qkv, conv_weight, conv_state, a, b, A_log.contiguous(), dt_bias.contiguous(), state,
        slots.contiguous(), o, counters,
        mixed_qkv.stride(0), conv_state.stride(0), a.stride(0), b.stride(0), state.stride(0), K ** -0.5,
        HK=HK, HV=HV, K=K, V=V, W=W, BK=BK, BV=BV, BW=triton.next_power_of_2(W), NV=NV, ARRIVE_LATE=config.arrive_late,
        num_warps=config.num_warps, **pdl_args(mixed_qkv))
    return o
