"""Split-K decode over an int8 KV cache for a 16-bit q, reading the codes as 16-bit pairs.

Why a kernel of its own: triton.py's decode with triton_quant's tile step moves the [D, BLOCK_N] int8 key tile from
shared memory into the tensor-core operand one byte per instruction (LDS.U8, 256 per thread per 128-key tile on
Triton 3.6), so int8 KV ran no faster than bf16 KV although it reads half the bytes. Here the codes are read as int16
words, each the pair (d = 2j, 2j + 1) of one token, and split into an even tile (low bytes) and an odd tile (high
bytes), [D/2, BLOCK_N] for the keys and [BLOCK_N, D/2] for the values: 16-bit operands, which Triton moves with
ldmatrix. A dot product over D does not care about the order of d, so
    q . c_n = q_even . c_n,even + q_odd . c_n,odd
and the output splits the same way (o_even = sum_n p_n v_n,even, o_odd likewise, stored to the even and odd columns).
Each byte becomes the fp16 value 1024 + level (level = code + 128 in [0, 255], exact) with one bit operation per two
codes (_split_pairs), so the matmuls run in fp16: q is rounded to fp16 (exact for bf16 values in fp16's normal range)
and the probabilities enter as p_n s_n / max s (<= 1, as triton_quant's fp8 path). The 1024 is taken back in fp32:
from the scores through the key offset (_tile_scales), from the output with the same rounded probabilities, so it
cancels exactly. Scales and zeros are prefetched one tile ahead: Triton pipelines only loads that feed a dot.
Partials (part_m, part_l, part_acc) have triton_decode.py's layout, so its reduce kernel merges them.

H200, Triton 3.6, context 32k, H=16, Hkv=4 (bench_attention.py --kv-cache-dtype int8; same process as the bf16 cache):
batch 64: 1834 us against 1949 for triton_quant's int8 step and 1961 for bf16 KV (1.07x); batch 16: 472 against 517
and 515 (1.09x). ncu at batch 64: 52% of DRAM bandwidth, 199 registers (8 warps an SM), issue-bound on dependency
waits; int8 still misses 1.3x over bf16.
"""
import triton
import triton.language as tl

from ..pdl import pdl_start
from .triton_decode import _RUNTIME_INTS, _partition_size


@triton.jit
def _split_pairs(b_w, USE_ASM: tl.constexpr):
    """int16 words (two codes stored minus 128) -> (low, high byte) as fp16 1024 + level, level = code + 128 in
    [0, 255]: exact in fp16. (w & 0xFF) ^ 0x6480 flips bit 7 (adds 128) and sets 1024's exponent. USE_ASM: the
    same on two words at once, one lop3 (low) and a shift plus a lop3 (high) per 32-bit register; written as int16
    operations, ptxas spends a LOP3 and a PRMT per element."""
    if USE_ASM:
        b_lo = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00ff00ff, 0x64806480, 0x6a;", "=r,r", [b_w],
                                         dtype=tl.float16, is_pure=True, pack=2)
        b_hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x00ff00ff, 0x64806480, 0x6a; }", "=r,r", [b_w],
            dtype=tl.float16, is_pure=True, pack=2)
    else:
        b_lo = ((b_w & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True)
        b_hi = (((b_w >> 8) & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True)
    return b_lo, b_hi


@triton.jit
def _tile_blocks(p_block_table, o_n, end, BS: tl.constexpr):
    """Block ids [BLOCK_N] int64 of keys o_n (0 past end)."""
    return tl.load(p_block_table + o_n // BS, mask=o_n < end, other=0).to(tl.int64)


@triton.jit
def _tile_scales(k_scale, v_scale, k_zero, v_zero, b_blk, o_n, end, i_kvh, BS: tl.constexpr, HKV: tl.constexpr):
    """(k scale, k offset, v scale, v zero) [BLOCK_N] fp32 of keys o_n in blocks b_blk (0 past end); the k offset
    takes back the 1024 every fp16 code carries (see _split_pairs): q . x_n = s_n (q . code16_n) + qsum kz_n."""
    m_n = o_n < end
    o_sz = (b_blk * BS + o_n % BS) * HKV + i_kvh  # scales / zeros: [NB * BS, Hkv] contiguous
    b_ks = tl.load(k_scale + o_sz, mask=m_n, other=0.0)
    b_kz = tl.load(k_zero + o_sz, mask=m_n, other=0.0) - 1024.0 * b_ks
    return b_ks, b_kz, tl.load(v_scale + o_sz, mask=m_n, other=0.0), tl.load(v_zero + o_sz, mask=m_n, other=0.0)


@triton.jit
def _attend_tile_int8_pairs(b_qe, b_qo, b_qsum, b_m, b_l, b_acc_e, b_acc_o, k_words, v_words, b_ks, b_kz, b_vs, b_vz,
                            p_block_table, o_n, end, i_kvh, scale_log2,
                            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                            BS: tl.constexpr, D: tl.constexpr, USE_ASM: tl.constexpr):
    """One online-softmax step over keys o_n [BLOCK_N] (those < end exist) with their scales from _tile_scales.
    b_qe / b_qo [ROWS, D/2]: q's even / odd columns in fp16; b_qsum [ROWS] fp32 sum of them; b_acc_e / b_acc_o
    [ROWS, D/2] fp32. Word strides in int16."""
    m_n = o_n < end
    b_blk = _tile_blocks(p_block_table, o_n, end, BS)
    o_j = tl.arange(0, D // 2)
    o_k = b_blk * stride_kb + (o_n % BS) * stride_ks + i_kvh * stride_kh
    o_v = b_blk * stride_vb + (o_n % BS) * stride_vs + i_kvh * stride_vh
    b_kw = tl.load(k_words + o_k[None, :] + o_j[:, None], mask=m_n[None, :], other=0)  # [D/2, BLOCK_N]
    b_ke, b_ko = _split_pairs(b_kw, USE_ASM)
    b_s = tl.dot(b_qo, b_ko, acc=tl.dot(b_qe, b_ke))
    b_s = b_s * b_ks[None, :] + b_qsum[:, None] * b_kz[None, :]
    b_s = tl.where(m_n[None, :], b_s * scale_log2, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_vw = tl.load(v_words + o_v[:, None] + o_j[None, :], mask=m_n[:, None], other=0)  # [BLOCK_N, D/2]
    b_ve, b_vo = _split_pairs(b_vw, USE_ASM)
    # fp16 probabilities p_n s_n / max s (<= 1) as in triton_quant's fp8 path; the 1024 they pick up from every code
    # is taken back with the same rounded values, so it cancels exactly
    b_vmax = tl.max(b_vs, 0)
    b_vmax = tl.where(b_vmax > 0, b_vmax, 1.0)
    b_pv = (b_p * (b_vs / b_vmax)[None, :]).to(tl.float16)
    b_off = tl.sum(b_p * b_vz[None, :], 1) - (1024.0 * b_vmax) * tl.sum(b_pv.to(tl.float32), 1)
    b_acc_e = b_acc_e * b_alpha[:, None] + b_vmax * tl.dot(b_pv, b_ve) + b_off[:, None]
    b_acc_o = b_acc_o * b_alpha[:, None] + b_vmax * tl.dot(b_pv, b_vo) + b_off[:, None]
    return b_m_new, b_l, b_acc_e, b_acc_o


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def decode_int8_partial_kernel(q, k_words, v_words, k_scale, v_scale, k_zero, v_zero, gate, o, part_m, part_l,
                               part_acc, block_tables, context_lens, scale_log2, num_partitions, spread, part_lo,
                               part_hi, part_round, stride_qn, stride_qh, stride_kb, stride_ks, stride_kh,
                               stride_vb, stride_vs, stride_vh, stride_gn, stride_gh, stride_on, stride_oh, stride_bt,
                               H: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr,
                               D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_GATE: tl.constexpr,
                               USE_ASM: tl.constexpr, USE_PDL: tl.constexpr = False):
    """triton_decode._decode_partial_kernel over an int8 cache read as int16 words (k_words, v_words [NB, BS, Hkv, D/2],
    strides in words): same grid, partition sizing, outputs and partial layout."""
    pdl_start(USE_PDL)
    i_seq, i_kvh, i_part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(context_lens + i_seq).to(tl.int32)
    size = _partition_size(ctx, num_partitions, spread, part_lo, part_hi, part_round)
    start = i_part * size
    o_h = tl.arange(0, BLOCK_H)
    o_j = tl.arange(0, D // 2)
    o_head = i_kvh * G + o_h
    m_h = o_h < G
    i_seq64 = i_seq.to(tl.int64)
    if start < ctx:
        end = tl.minimum(start + size, ctx)
        p_q = q + i_seq64 * stride_qn + o_head[:, None] * stride_qh + 2 * o_j[None, :]
        b_qe = tl.load(p_q, mask=m_h[:, None], other=0.0).to(tl.float16)
        b_qo = tl.load(p_q + 1, mask=m_h[:, None], other=0.0).to(tl.float16)
        b_qsum = tl.sum(b_qe.to(tl.float32), 1) + tl.sum(b_qo.to(tl.float32), 1)
        b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_H], dtype=tl.float32)
        b_acc_e = tl.zeros([BLOCK_H, D // 2], dtype=tl.float32)
        b_acc_o = tl.zeros([BLOCK_H, D // 2], dtype=tl.float32)
        p_block_table = block_tables + i_seq64 * stride_bt
        # scales and zeros are prefetched a tile ahead (their block ids two ahead): Triton pipelines only the loads
        # that feed a dot, and these, loaded in the tile step, stalled every tile on their latency
        o_t = tl.arange(0, BLOCK_N)
        b_blk = _tile_blocks(p_block_table, start + o_t, end, BS)
        b_ks, b_kz, b_vs, b_vz = _tile_scales(k_scale, v_scale, k_zero, v_zero, b_blk, start + o_t, end, i_kvh, BS,
                                              H // G)
        b_blk = _tile_blocks(p_block_table, start + BLOCK_N + o_t, end, BS)
        for n in range(start, end, BLOCK_N):
            o_n = n + o_t
            b_next = _tile_scales(k_scale, v_scale, k_zero, v_zero, b_blk, o_n + BLOCK_N, end, i_kvh, BS, H // G)
            b_blk = _tile_blocks(p_block_table, o_n + 2 * BLOCK_N, end, BS)
            b_m, b_l, b_acc_e, b_acc_o = _attend_tile_int8_pairs(
                b_qe, b_qo, b_qsum, b_m, b_l, b_acc_e, b_acc_o, k_words, v_words, b_ks, b_kz, b_vs, b_vz,
                p_block_table, o_n, end, i_kvh, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb,
                stride_vs, stride_vh, BS, D, USE_ASM)
            b_ks, b_kz, b_vs, b_vz = b_next
        if not SPLIT:
            b_oe = b_acc_e / b_l[:, None]
            b_oo = b_acc_o / b_l[:, None]
            if HAS_GATE:
                p_g = gate + i_seq64 * stride_gn + o_head[:, None] * stride_gh + 2 * o_j[None, :]
                b_oe = b_oe * tl.sigmoid(tl.load(p_g, mask=m_h[:, None], other=0.0).to(tl.float32))
                b_oo = b_oo * tl.sigmoid(tl.load(p_g + 1, mask=m_h[:, None], other=0.0).to(tl.float32))
            p_o = o + i_seq64 * stride_on + o_head[:, None] * stride_oh + 2 * o_j[None, :]
            tl.store(p_o, b_oe.to(p_o.dtype.element_ty), mask=m_h[:, None])
            tl.store(p_o + 1, b_oo.to(p_o.dtype.element_ty), mask=m_h[:, None])
        else:
            o_ml = (i_seq64 * H + o_head) * num_partitions + i_part
            tl.store(part_m + o_ml, b_m, mask=m_h)
            tl.store(part_l + o_ml, b_l, mask=m_h)
            p_acc = part_acc + o_ml[:, None] * D + 2 * o_j[None, :]
            tl.store(p_acc, b_acc_e, mask=m_h[:, None])
            tl.store(p_acc + 1, b_acc_o, mask=m_h[:, None])
    elif not SPLIT:  # empty context (a padded row): zeros, never left unwritten (SPLIT: the reduce writes them)
        p_o = o + i_seq64 * stride_on + o_head[:, None] * stride_oh + 2 * o_j[None, :]
        b_zero = tl.zeros([BLOCK_H, D // 2], dtype=tl.float32).to(p_o.dtype.element_ty)
        tl.store(p_o, b_zero, mask=m_h[:, None])
        tl.store(p_o + 1, b_zero, mask=m_h[:, None])
