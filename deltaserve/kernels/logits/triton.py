"""Triton logits GEMV for decode: M <= MAX_ROWS rows of hidden times V vocab rows, fp32 out.

Program i_v owns BV vocab rows and walks H in BK steps: a [BV, BK] tile of the weight (the only large read, 16-byte
loads, pipelined by num_stages) meets the [16, BK] hidden tile (rows past M masked to 0) on the tensor cores, fp32
accumulators; the [16, BV] result keeps its first M rows. The padding to 16 rows is free: the kernel is bound by the
weight stream, not by the matrix units. Tiles from an H200 sweep (bench_logits.py --sweep): 64 rows x 256 of H, 3
stages, best or within 1% of the best at M = 1..16 and H = 2048..5120."""
import torch
import triton
import triton.language as tl

from ..int4_gemm.triton import dot_precision
from ..pdl import pdl_args, pdl_start

MAX_ROWS = 16  # decode batches up to this take the GEMV; larger ones go to cuBLAS (reference.py)


@triton.jit
def _logits_kernel(x, w, out, M, V, H, stride_xm, stride_wv, stride_om, BV: tl.constexpr, BK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    i_v = tl.program_id(0)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_m = tl.arange(0, 16)
    m_m = o_m < M
    o_k = tl.arange(0, BK)
    p_w = w + o_v[:, None].to(tl.int64) * stride_wv + o_k[None, :]
    p_x = x + o_m[:, None] * stride_xm + o_k[None, :]
    b_acc = tl.zeros([16, BV], dtype=tl.float32)
    for k0 in range(0, H, BK):
        m_k = k0 + o_k < H
        b_w = tl.load(p_w + k0, mask=m_v[:, None] & m_k[None, :], other=0.0)
        b_x = tl.load(p_x + k0, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.dot(b_x, tl.trans(b_w), input_precision=DOT_PRECISION)
    tl.store(out + o_m[:, None].to(tl.int64) * stride_om + o_v[None, :], b_acc, mask=m_m[:, None] & m_v[None, :])


def logits_triton(hidden: torch.Tensor, weight: torch.Tensor, block_v: int = 64, block_k: int = 256,
                  num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """hidden [M <= MAX_ROWS, H]; weight [V, H] (contiguous rows) -> [M, V] fp32."""
    m, h = hidden.shape
    v = weight.shape[0]
    if m > MAX_ROWS or weight.shape[1] != h or weight.stride(1) != 1:
        raise ValueError(f"the logits GEMV takes up to {MAX_ROWS} rows and a [V, {h}] weight with contiguous rows; "
                         f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} strides {weight.stride()}")
    hidden = hidden.contiguous()
    out = torch.empty(m, v, dtype=torch.float32, device=hidden.device)
    if m and v:
        _logits_kernel[(triton.cdiv(v, block_v),)](
            hidden, weight, out, m, v, h, hidden.stride(0), weight.stride(0), out.stride(0), BV=block_v, BK=block_k,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=num_warps,
            num_stages=num_stages, **pdl_args(hidden))
    return out
