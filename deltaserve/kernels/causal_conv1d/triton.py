"""Triton depthwise causal conv1d + SiLU over a flat varlen batch with a pooled conv state (GDN's qkv conv).

Two launches, because the state is read and written in place:
1. `_conv1d_fwd_kernel`, grid (token tile, channel tile): tap i_w of output t reads input t - (W-1) + i_w; the
   first tile of a sequence also adds the taps that reach negative positions, from the stored state (none for
   slot -1). Tiles map to sequences through a host-built table (one pinned H2D copy, no sync), or directly when
   every sequence fits one tile (decode, short chunks: no table, nothing copied, CUDA-graph safe).
2. `_conv1d_state_kernel`, grid (sequence, channel tile), after every read of the old state: writes the last W-1
   inputs (shifting older state in for sequences shorter than W-1).
Numerics follow `reference.py`: inputs cast to the weight dtype, fp32 sum rounded once to the weight dtype, SiLU in
the weight dtype, result cast to x's dtype. Shapes are validated by the package's `__init__.py`.
"""
import functools

import torch
import triton
import triton.language as tl

from ..rmsnorm.triton import round_to

# Tiles of 16 x 128 keep ~16 elements per thread at 4 warps: ~127 registers for the 4 taps, no spills on sm_90
# (32 x 128 needs 255 registers and halves the occupancy).
TILE_T = 16  # tokens per tile when a sequence spans several tiles (through the host-built tile table)
ELEMS_PER_TILE = 2048  # channels per tile = ELEMS_PER_TILE / tokens per tile, within [128, 1024]


@triton.jit
def _conv1d_fwd_kernel(
    x, weight, conv_state, cu_seqlens, slots, tiles, y,
    C,
    stride_xt, stride_wc, stride_ww, stride_sn, stride_sc, stride_sw, stride_yt,
    W: tl.constexpr,
    ONE_TILE_PER_SEQ: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i_tile, i_c = tl.program_id(0), tl.program_id(1)
    if ONE_TILE_PER_SEQ:
        i_n, t0 = i_tile, 0
    else:
        i_n, t0 = tl.load(tiles + 2 * i_tile), tl.load(tiles + 2 * i_tile + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    i_s = tl.load(slots + i_n).to(tl.int64)

    o_t = t0 + tl.arange(0, BLOCK_T)  # position inside the sequence
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_t = o_t < L
    m_c = o_c < C
    p_x = x + (bos + o_t)[:, None] * stride_xt + o_c[None, :]
    b_acc = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    for i_w in tl.static_range(W):
        # tap i_w of output t reads input t - (W-1) + i_w; negative positions are the state's, added below
        o_src = o_t - (W - 1) + i_w
        m_x = m_t & (o_src >= 0)
        b_x = tl.load(p_x + (i_w - (W - 1)) * stride_xt, mask=m_x[:, None] & m_c[None, :], other=0.0)
        b_w = tl.load(weight + o_c * stride_wc + i_w * stride_ww, mask=m_c, other=0.0).to(tl.float32)
        b_acc += round_to(b_x, weight.dtype.element_ty).to(tl.float32) * b_w[None, :]
    if t0 < W - 1:
        if i_s >= 0:  # slot -1 (padding) has a zero state
            # the first W-1 outputs also read the stored state: input position o_src < 0 is column W-1+o_src
            p_s = conv_state + i_s * stride_sn + o_c[None, :] * stride_sc
            for i_w in tl.static_range(W - 1):
                o_src = o_t - (W - 1) + i_w
                m_s = m_t & (o_src < 0)
                b_s = tl.load(p_s + (W - 1 + o_src)[:, None] * stride_sw, mask=m_s[:, None] & m_c[None, :], other=0.0)
                b_w = tl.load(weight + o_c * stride_wc + i_w * stride_ww, mask=m_c, other=0.0).to(tl.float32)
                b_acc += b_s.to(tl.float32) * b_w[None, :]
    # F.conv1d rounds the sum to the weight dtype, F.silu rounds again
    b_acc = round_to(b_acc, weight.dtype.element_ty).to(tl.float32)
    b_y = round_to(b_acc / (1.0 + tl.exp(-b_acc)), weight.dtype.element_ty)
    p_y = y + (bos + o_t)[:, None] * stride_yt + o_c[None, :]
    tl.store(p_y, round_to(b_y, y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _conv1d_state_kernel(
    x, conv_state, cu_seqlens, slots,
    C,
    stride_xt, stride_sn, stride_sc, stride_sw,
    W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    i_s = tl.load(slots + i_n).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    if (i_s >= 0) & (L > 0):  # padding rows write nothing; an empty sequence keeps its state
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        o_p = tl.arange(0, BLOCK_P)  # new state column
        m_c = o_c < C
        m_p = o_p < W - 1
        o_src = L - (W - 1) + o_p  # input position it holds; negative: old state column W-1+o_src
        m_x = m_p & (o_src >= 0)
        m_s = m_p & (o_src < 0)
        p_base = conv_state + i_s * stride_sn + o_c[:, None] * stride_sc
        b_x = tl.load(x + (bos + o_src)[None, :] * stride_xt + o_c[:, None],
                      mask=m_c[:, None] & m_x[None, :], other=0.0)
        b_x = round_to(b_x, conv_state.dtype.element_ty)
        b_s = tl.load(p_base + (W - 1 + o_src)[None, :] * stride_sw, mask=m_c[:, None] & m_s[None, :], other=0.0)
        b_new = tl.where(m_s[None, :], b_s, b_x)
        # another thread of this program may own the column we just read: every read lands before any write
        tl.debug_barrier()
        tl.store(p_base + o_p[None, :] * stride_sw, b_new, mask=m_c[:, None] & m_p[None, :])


@functools.lru_cache(maxsize=16)
def _tile_table(query_lens: tuple, block_t: int, device: torch.device) -> torch.Tensor:
    """-> [num_tiles, 2] int32 (sequence, first token of the tile inside it) on device; one H2D copy, no sync. Made
    once for the shapes of a step (every GDN layer asks for the same; read only, so later steps reuse it)."""
    flat = []
    for i, n in enumerate(query_lens):
        for t0 in range(0, n, block_t):
            flat += (i, t0)
    table = torch.tensor(flat, dtype=torch.int32)
    if device.type == "cuda":
        table = table.pin_memory()  # a pinned source keeps the async copy from syncing the host
    return table.to(device, non_blocking=True).view(-1, 2)


def causal_conv1d_varlen_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    query_lens: list[int],
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over a flat varlen batch, continuing from and updating each sequence's conv state.

    x: [T, C] fp32/bf16/fp16, any row stride; weight: [C, W]; conv_state: [S, C, W-1] in weight's dtype (any
    strides), updated IN PLACE at slots; cu_seqlens: [N+1] int32/int64; slots: [N] int, distinct except -1
    (padding: reads zeros, writes nothing); query_lens: N host ints equal to cu_seqlens.diff() (never read back from
    the device). Returns silu(conv) [T, C] contiguous in x.dtype."""
    T, C = x.shape
    W = weight.shape[1]
    N = slots.shape[0]
    if len(query_lens) != N or sum(query_lens) != T or min(query_lens, default=0) < 0:
        raise ValueError(f"query_lens must hold N={N} non-negative host ints summing to T={T}; got "
                         f"{len(query_lens)} summing to {sum(query_lens)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((T, C), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    max_len = max(query_lens)
    one_tile = max_len <= TILE_T  # decode and short chunks: tile i is sequence i, no table, no copy
    block_t = triton.next_power_of_2(max_len) if one_tile else TILE_T
    block_c = min(triton.next_power_of_2(C), max(128, ELEMS_PER_TILE // block_t), 1024)
    tiles = cu_seqlens if one_tile else _tile_table(tuple(query_lens), block_t, x.device)  # unused when one_tile
    num_tiles = N if one_tile else tiles.shape[0]
    _conv1d_fwd_kernel[(num_tiles, triton.cdiv(C, block_c))](
        x, weight, conv_state, cu_seqlens, slots, tiles, y,
        C,
        x.stride(0), weight.stride(0), weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), y.stride(0),
        W=W, ONE_TILE_PER_SEQ=one_tile, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=4,
    )
    block_cs = min(triton.next_power_of_2(C), 256)
    _conv1d_state_kernel[(N, triton.cdiv(C, block_cs))](
        x, conv_state, cu_seqlens, slots,
        C,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        W=W, BLOCK_P=triton.next_power_of_2(W - 1), BLOCK_C=block_cs,
        num_warps=4,
    )
    return y
