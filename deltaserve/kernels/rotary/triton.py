"""Triton fused q/k norm + partial RoPE for gated attention: one launch for q and k, one HBM pass each.

Grid (token, head block): blocks [0, ceil(H/BH)) hold q heads, the rest k heads. Each program normalises
BLOCK_HEADS heads (zero-centred RMSNorm over D in fp32, rounded to the model dtype), then rotates the first
ROTARY_DIM dims neox-style with cos/sin of `position * inv_freq` computed in fp32 in the kernel. The rotate-half
partner of each dim is re-read from the same (cached) row rather than shuffled in registers.
Numerics follow `reference.py` cast for cast. Shapes are validated by the package's `__init__.py`.
"""
import os

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from ..rmsnorm.triton import add_combine, round_to
from .reference import inv_freq

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    @triton.jit
    def _cos(x):
        return tl.cos(x)

    @triton.jit
    def _sin(x):
        return tl.sin(x)
else:
    from triton.language.extra import libdevice

    # angles reach 1e5 rad: the approximate PTX sin/cos (what early Triton emitted for tl.sin/tl.cos) would be far
    # off there; naming libdevice pins the accurate __nv_cosf/__nv_sinf (full range reduction) on every release
    @triton.jit
    def _cos(x):
        return libdevice.cos(x)

    @triton.jit
    def _sin(x):
        return libdevice.sin(x)


@triton.jit
def _norm_rope_heads(
    x, weight, y, freqs, b_pos, i_t, i_hb, NH, stride_xt, stride_xh, eps,
    D: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Normalise + rotate heads [i_hb*BH, (i_hb+1)*BH) of token i_t of x [T, NH, D] into y [T, NH, D] contiguous."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    DTYPE: tl.constexpr = y.dtype.element_ty
    o_h = i_hb * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    o_d = tl.arange(0, BLOCK_D)
    m_h = o_h < NH
    m_d = o_d < D
    m_rot = o_d < ROTARY_DIM
    p_row = x + i_t * stride_xt + o_h[:, None] * stride_xh

    b_x = tl.load(p_row + o_d[None, :], mask=m_h[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(tl.reduce(b_x * b_x, 1, add_combine) / D + eps)
    b_w = tl.load(weight + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_xn = round_to(b_x * b_rstd[:, None] * (1.0 + b_w[None, :]), DTYPE).to(tl.float32)

    # rotate_half: dim d < HALF pairs with -x[d + HALF], dim HALF <= d < ROTARY_DIM with +x[d - HALF]
    o_p = tl.where(o_d < HALF, o_d + HALF, o_d - HALF)
    b_xp = tl.load(p_row + o_p[None, :], mask=m_h[:, None] & m_rot[None, :], other=0.0).to(tl.float32)
    b_wp = tl.load(weight + o_p, mask=m_rot, other=0.0).to(tl.float32)
    b_xp = round_to(b_xp * b_rstd[:, None] * (1.0 + b_wp[None, :]), DTYPE).to(tl.float32)
    b_xp = tl.where(o_d[None, :] < HALF, -b_xp, b_xp)

    b_ang = b_pos * tl.load(freqs + o_d % HALF, mask=m_rot, other=0.0)
    b_cos = round_to(_cos(b_ang), DTYPE).to(tl.float32)
    b_sin = round_to(_sin(b_ang), DTYPE).to(tl.float32)
    # torch rounds each product and the sum to the model dtype: so do we
    b_rot = (round_to(b_xn * b_cos[None, :], DTYPE).to(tl.float32)
             + round_to(b_xp * b_sin[None, :], DTYPE).to(tl.float32))
    b_y = tl.where(m_rot[None, :], b_rot, b_xn)
    p_y = y + (i_t * NH + o_h[:, None]) * D + o_d[None, :]
    tl.store(p_y, round_to(b_y, DTYPE), mask=m_h[:, None] & m_d[None, :])


@triton.jit
def _qk_norm_rope_kernel(
    q, k, q_weight, k_weight, positions, freqs, q_out, k_out,
    H, HKV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_pos,
    eps,
    D: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_start(USE_PDL)
    i_t, i_hb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    NQB = (H + BLOCK_HEADS - 1) // BLOCK_HEADS  # q head blocks come first
    b_pos = tl.load(positions + i_t * stride_pos).to(tl.float32)
    if i_hb < NQB:
        _norm_rope_heads(q, q_weight, q_out, freqs, b_pos, i_t, i_hb, H, stride_qt, stride_qh, eps,
                         D, ROTARY_DIM, BLOCK_HEADS, BLOCK_D)
    else:
        _norm_rope_heads(k, k_weight, k_out, freqs, b_pos, i_t, i_hb - NQB, HKV, stride_kt, stride_kh, eps,
                         D, ROTARY_DIM, BLOCK_HEADS, BLOCK_D)


_INV_FREQ: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def _cached_inv_freq(theta: float, rotary_dim: int, device: torch.device) -> torch.Tensor:
    # computed by torch on the same device as the reference does, so both see bit-identical frequencies;
    # cached so that steady-state calls (and CUDA-graph captures after a warm-up) launch one kernel only
    key = (float(theta), rotary_dim, device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = inv_freq(theta, rotary_dim, device)
    return _INV_FREQ[key]


def qk_norm_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    rotary_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D] model dtype, any token/head strides (e.g. q = q_proj(x).view(T, H, 2D)[..., :D]);
    q_weight, k_weight: [D]; positions: [T] int. Returns (q_out [T, H, D], k_out [T, Hkv, D]) contiguous."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    T, H, D = q.shape
    HKV = k.shape[1]
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, HKV, D), dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    block_d = triton.next_power_of_2(D)
    block_heads = min(triton.next_power_of_2(max(H, HKV)), max(1, 1024 // block_d))
    grid = (T, triton.cdiv(H, block_heads) + triton.cdiv(HKV, block_heads))
    _qk_norm_rope_kernel[grid](
        q, k, q_weight, k_weight, positions, _cached_inv_freq(theta, rotary_dim, q.device), q_out, k_out,
        H, HKV,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), positions.stride(0),
        eps,
        D=D, ROTARY_DIM=rotary_dim, BLOCK_HEADS=block_heads, BLOCK_D=block_d,
        num_warps=4 if block_heads * block_d >= 1024 else 2, **pdl_args(q)
    )
    return q_out, k_out
