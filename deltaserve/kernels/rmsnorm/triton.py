"""Triton RMSNorm kernels: the fused residual-add + zero-centred RMSNorm of the decoder, and the GDN gated norm.

Both are bandwidth-bound row reductions: each program holds ROWS whole rows in registers (one pass over HBM).
Numerics match `reference.py` (fp32 statistics, the same casts to the model dtype at the same points).
Shapes are validated by the package's `__init__.py`; these wrappers only check what the kernels themselves need.
"""
import os

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start

MAX_BLOCK = 65536  # one row must fit in the registers of one program

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """x -> DTYPE rounded to nearest even. The interpreter's own fp32 -> bf16 cast truncates (GPUs round),
        which would put every CPU bf16 test one ulp off, so round by hand there."""
        x = x.to(tl.float32)
        if DTYPE == tl.bfloat16:
            b_bits = x.to(tl.uint32, bitcast=True)
            b_bits = b_bits + 0x7FFF + ((b_bits >> 16) & 1)
            return (b_bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)
else:
    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """x -> DTYPE rounded to nearest even (the hardware cast)."""
        return x.to(DTYPE)


# The kernels here (and in rotary/, causal_conv1d/) use only builtins of triton.language, none of its @jit
# standard library (tl.sum, tl.zeros, tl.cdiv): those are decorated once, when triton is first imported, and a CPU
# test process that imported triton before setting TRITON_INTERPRET=1 (transformers does) could not call them from
# an interpreted kernel. Hence tl.reduce with this combine function for row sums.
@triton.jit
def add_combine(a, b):
    return a + b


@triton.jit
def _rmsnorm_kernel(
    x, residual, weight, y, r_out,
    T, H,
    stride_x, stride_res, stride_y, stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_start(USE_PDL)
    i_r = tl.program_id(0)
    o_t = i_r * ROWS + tl.arange(0, ROWS)
    o_h = tl.arange(0, BLOCK_H)
    m_t = o_t < T
    m_h = o_h < H
    m = m_t[:, None] & m_h[None, :]
    o_t = o_t.to(tl.int64)

    b_x = tl.load(x + o_t[:, None] * stride_x + o_h[None, :], mask=m, other=0.0)
    if HAS_RESIDUAL:
        b_res = tl.load(residual + o_t[:, None] * stride_res + o_h[None, :], mask=m, other=0.0)
        # the model adds in its own dtype: round the sum before normalising it
        b_x = round_to(b_x.to(tl.float32) + b_res.to(tl.float32), r_out.dtype.element_ty)
        tl.store(r_out + o_t[:, None] * stride_r + o_h[None, :], b_x, mask=m)
    b_x = b_x.to(tl.float32)
    b_rstd = tl.rsqrt(tl.reduce(b_x * b_x, 1, add_combine) / H + eps)
    b_w = tl.load(weight + o_h, mask=m_h, other=0.0).to(tl.float32)
    b_y = b_x * b_rstd[:, None] * (1.0 + b_w[None, :])
    tl.store(y + o_t[:, None] * stride_y + o_h[None, :], round_to(b_y, y.dtype.element_ty), mask=m)


@triton.jit
def _gated_rmsnorm_kernel(
    x, z, weight, y,
    R, HV, V,
    stride_xt, stride_xh, stride_zt, stride_zh,
    eps,
    ROUND_PRODUCT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_start(USE_PDL)
    i_r = tl.program_id(0)
    o_r = i_r * ROWS + tl.arange(0, ROWS)  # flat (token, head) row
    o_v = tl.arange(0, BLOCK_V)
    m_r = o_r < R
    m_v = o_v < V
    m = m_r[:, None] & m_v[None, :]
    o_r = o_r.to(tl.int64)
    o_t, o_hv = o_r // HV, o_r % HV

    b_x = tl.load(x + (o_t * stride_xt + o_hv * stride_xh)[:, None] + o_v[None, :], mask=m, other=0.0)
    b_z = tl.load(z + (o_t * stride_zt + o_hv * stride_zh)[:, None] + o_v[None, :], mask=m, other=0.0)
    b_x = b_x.to(tl.float32)
    b_z = b_z.to(tl.float32)
    b_rstd = tl.rsqrt(tl.reduce(b_x * b_x, 1, add_combine) / V + eps)
    # HF rounds x̂ to the model dtype, then multiplies by the weight in the promoted dtype of the two
    b_xn = round_to(b_x * b_rstd[:, None], y.dtype.element_ty).to(tl.float32)
    b_w = tl.load(weight + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_g = b_xn * b_w[None, :]
    if ROUND_PRODUCT:
        b_g = round_to(b_g, y.dtype.element_ty).to(tl.float32)
    b_y = b_g * (b_z / (1.0 + tl.exp(-b_z)))
    tl.store(y + o_r[:, None] * V + o_v[None, :], round_to(b_y, y.dtype.element_ty), mask=m)


def _rows_and_warps(width: int) -> tuple[int, int, int]:
    """-> (BLOCK, ROWS, num_warps): several short rows per program, ~16 elements per thread for long ones."""
    block = triton.next_power_of_2(width)
    if block > MAX_BLOCK:
        raise ValueError(f"rows of {width} elements exceed the {MAX_BLOCK} a single program holds")
    rows = max(1, min(16, 2048 // block))
    num_warps = max(1, min(16, rows * block // 512))
    return block, rows, num_warps


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # the kernels address rows by stride but assume contiguous elements inside a row
    return t if t.stride(-1) == 1 else t.contiguous()


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] (any row stride); weight: [H]; residual: [T, H] in x's dtype or None.
    Returns (y [T, H] contiguous in x.dtype, r): r = x + residual (new contiguous tensor) or x itself."""
    x = _unit_last_stride(x)
    T, H = x.shape
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    r = x
    if residual is not None:
        residual = _unit_last_stride(residual)
        r = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0:
        return y, r
    block, rows, num_warps = _rows_and_warps(H)
    _rmsnorm_kernel[(triton.cdiv(T, rows),)](
        x, residual if residual is not None else x, weight, y, r,
        T, H,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), r.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_H=block, num_warps=num_warps, **pdl_args(x)
    )
    return y, r


def gated_rmsnorm_triton(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, z: [T, HV, V] (any token/head strides); weight: [V]. Returns y [T, HV, V] contiguous in x.dtype."""
    x, z = _unit_last_stride(x), _unit_last_stride(z)
    T, HV, V = x.shape
    y = torch.empty((T, HV, V), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    # torch rounds `weight * x̂` to the promoted dtype: only when that is x's own low-precision dtype
    round_product = torch.promote_types(weight.dtype, x.dtype) == x.dtype and x.dtype != torch.float32
    block, rows, num_warps = _rows_and_warps(V)
    R = T * HV
    _gated_rmsnorm_kernel[(triton.cdiv(R, rows),)](
        x, z, weight, y,
        R, HV, V,
        x.stride(0), x.stride(1), z.stride(0), z.stride(1),
        eps,
        ROUND_PRODUCT=round_product, ROWS=rows, BLOCK_V=block, num_warps=num_warps, **pdl_args(x)
    )
    return y
