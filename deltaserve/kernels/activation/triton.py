"""Triton silu_mul: one pass over the gate_up output instead of torch's two (silu, then mul) and their
intermediate. Bandwidth-bound: each program reads a [ROWS, BLOCK] tile of gate and of up and writes one of out.

Numerics match `reference.py`: silu in fp32 rounded to the model dtype, the product in fp32 rounded again (what
torch's bf16 silu and mul do), so a bf16 result differs from torch only where the two exp() differ in the last
fp32 bits and that flips a rounding.
"""
import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from ..rmsnorm.triton import round_to


@triton.jit
def _silu_mul_kernel(x, out, T, INTER, stride_x, stride_o, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    o_t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (o_t < T)[:, None] & (o_i < INTER)[None, :]
    o_t = o_t.to(tl.int64)
    p = x + o_t[:, None] * stride_x + o_i[None, :]
    b_g = tl.load(p, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(p + INTER, mask=m, other=0.0).to(tl.float32)
    b_s = round_to(b_g / (1.0 + tl.exp(-b_g)), out.dtype.element_ty).to(tl.float32)
    tl.store(out + o_t[:, None] * stride_o + o_i[None, :], round_to(b_s * b_u, out.dtype.element_ty), mask=m)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2·I] (rows may be strided, columns dense) -> [T, I] contiguous in x.dtype."""
    if x.stride(1) != 1:
        x = x.contiguous()
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    # small batches (decode): one row per program over wide column tiles; large ones: 4 x 1024 tiles
    rows, block = (1, 2048) if t <= 64 else (4, 1024)
    block = min(block, triton.next_power_of_2(inter))
    _silu_mul_kernel[(triton.cdiv(t, rows), triton.cdiv(inter, block))](
        x, out, t, inter, x.stride(0), out.stride(0), ROWS=rows, BLOCK=block, num_warps=4, **pdl_args(x))
    return out
