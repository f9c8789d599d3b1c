"""Long prompts through cuBLAS: dequantize an int4 weight to x's dtype once per call, then one 16-bit GEMM.

Why: at prefill sizes the int4 GEMMs (triton.py) are compute-bound and reach ~300-350 TFLOP/s on an H200 against
cuBLAS bf16's ~650-750, while the 16-bit copy costs 4 bytes a weight more than the int4 read (written once, read
once by cuBLAS): from ~128 tokens the copy is the cheaper way (int4_gemm.DEQUANT_MIN_T; H200, 27B gate|up at T =
128: 210 µs against the K-packed GEMM's 235, at T = 2048 1 138 against 2 117, benchmarks/kernels/bench_int4_prefill).
The copy lives only during the call; the engine's memory profile (a full step of max_num_batched_tokens) counts
it. W is rounded to x's dtype as the GEMMs' tiles round it ((q - z) · s in fp32, rounded once), so the result
differs from theirs only by cuBLAS's summation order.

One program a [64-row, BN-column] tile of any of the three layouts (the same tile dequantizers the GEMMs use):
AWQ and K-packed weights are written as W [K, N], the fragment layout as W^T [N, K] (its spans hold a column's 64
rows in one run), each layout's tile stored in its natural order."""
import torch
import triton
import triton.language as tl

from .triton import awq_zeros_of_columns, dequant_awq_tile, dequant_kpack_tile

LAYOUT_AWQ, LAYOUT_KPACK, LAYOUT_MMA = 0, 1, 2


@triton.jit
def _store_mma_tile(qweight, p_z, p_s, w, i_n, k0, N, K, stride_wk, stride_wn, BN: tl.constexpr):
    """The fragment layout's (layers/quant.awq_to_mma) span at row k0, columns i_n·BN.. -> w: int32 (4g + t, c) of a
    warp tile's span holds W rows 32h + 8t + 2c + e of columns 8mh + g at bits 4(mh + 2h) + 16e, so the 16 int32
    of one (tile, g) pair are one contiguous run holding its two columns' 64 rows. Each [BN/2, 64] half (mh = 0, 1)
    is built in natural row order (a row's int32 read by its 4 rows from L1) and stored as contiguous 64-row runs."""
    o_j = tl.arange(0, BN // 2)
    col = (i_n * (BN // 16) + o_j // 8) * 16 + o_j % 8  # the (tile, g) pair's mh = 0 column; mh = 1 is col + 8
    m_j = col < N
    o_r = tl.arange(0, 64)  # row 32h + 8t + 2c + e of the span
    run = ((col // 16).to(tl.int64) * (K // 64) * 128 + (k0 // 64) * 128 + (col % 16) * 16)
    b_q = tl.load(qweight + run[:, None] + (4 * (o_r // 8 % 4) + o_r // 2 % 4)[None, :], mask=m_j[:, None], other=0)
    shift = 8 * (o_r // 32) + 16 * (o_r % 2)
    for mh in tl.static_range(2):
        b_z = awq_zeros_of_columns(p_z, col + 8 * mh, m_j)
        b_s = tl.load(p_s + col + 8 * mh, mask=m_j, other=0.0).to(tl.float32)
        b_w = ((((b_q >> (shift + 4 * mh)[None, :]) & 0xF) - b_z[:, None]).to(tl.float32) * b_s[:, None])
        p_out = w + (col + 8 * mh)[:, None].to(tl.int64) * stride_wn + (k0 + o_r)[None, :].to(tl.int64) * stride_wk
        tl.store(p_out, b_w.to(w.dtype.element_ty), mask=m_j[:, None])


@triton.jit
def _dequant_int4_kernel(qweight, qzeros, scales, w, N, K, stride_qk, stride_zk, stride_sk, stride_wk, stride_wn,
                         GROUP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, LAYOUT: tl.constexpr):
    """Program (i_n, i_k): W[i_k·BK : +BK, i_n·BN : +BN] (BK == 64 for the K-packed and fragment layouts) into w at
    strides (stride_wk, stride_wn), in w's dtype."""
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    k0 = i_k * BK
    i_g = k0 // GROUP
    p_z = qzeros + i_g * stride_zk
    p_s = scales + i_g * stride_sk
    if LAYOUT == 2:
        _store_mma_tile(qweight, p_z, p_s, w, i_n, k0, N, K, stride_wk, stride_wn, BN)
    else:
        n0 = i_n * BN
        o_k = k0 + tl.arange(0, BK)
        o_n = n0 + tl.arange(0, BN)
        if LAYOUT == 1:
            b_w = dequant_kpack_tile(qweight, p_z, p_s, k0, n0, N, stride_qk, BN, w.dtype.element_ty)
        else:
            b_w = dequant_awq_tile(qweight, p_z, p_s, o_k, n0, N, stride_qk, BK, BN, w.dtype.element_ty)
        p_w_out = w + o_k[:, None].to(tl.int64) * stride_wk + o_n[None, :].to(tl.int64) * stride_wn
        tl.store(p_w_out, b_w, mask=(o_n < N)[None, :])


def dequant_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 dtype: torch.dtype, layout: int) -> torch.Tensor:
    """An int4 weight of one layout (qweight AWQ [K, N/8], K-packed [K/8, N] or fragment [N/16, K/64, 32, 4];
    qzeros [K/G, N/8]; scales [K/G, N]) -> W [K, N] in dtype (a transposed view of a contiguous [N, K] for the
    fragment layout). The caller has checked the tensors (int4_gemm_dequant)."""
    k, n = qzeros.shape[0] * group_size, scales.shape[-1]
    if layout == LAYOUT_MMA:
        w = torch.empty(n, k, dtype=dtype, device=scales.device)
        stride_wk, stride_wn = 1, k
    else:
        w = torch.empty(k, n, dtype=dtype, device=scales.device)
        stride_wk, stride_wn = n, 1
    bk = 64 if layout != LAYOUT_AWQ else min(group_size, 64)
    bn = 128
    _dequant_int4_kernel[(triton.cdiv(n, bn), k // bk)](
        qweight, qzeros, scales, w, n, k, qweight.stride(0) if layout != LAYOUT_MMA else 0, qzeros.stride(0),
        scales.stride(0), stride_wk, stride_wn, GROUP=group_size, BK=bk, BN=bn, LAYOUT=layout, num_warps=4)
    return w.t() if layout == LAYOUT_MMA else w


def int4_gemm_dequant(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group_size: int, kpack: bool = False, mma: bool = False) -> torch.Tensor:
    """x [T, K] (fp16/bf16; fp32 in the interpreter) times an int4 weight of any layout (int4_gemm's arguments) as
    dequant_int4 then torch.mm -> [T, N] in x's dtype."""
    if mma:
        from .mma import check_mma_tensors
        check_mma_tensors(x, qweight, qzeros, scales, group_size)
        layout = LAYOUT_MMA
    elif kpack:
        from .kpack import check_kpack
        check_kpack(x, qweight, qzeros, scales, group_size)
        if qweight.dim() != 2:
            raise ValueError(f"qweight {tuple(qweight.shape)} must be one [K/8, N] weight, not a stack of experts")
        layout = LAYOUT_KPACK
    else:
        from .triton import _check
        _check(x, qweight, qzeros, scales, group_size)
        layout = LAYOUT_AWQ
    return torch.mm(x, dequant_int4(qweight, qzeros, scales, group_size, x.dtype, layout))
