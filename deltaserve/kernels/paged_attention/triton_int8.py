"""Split-K decode over an int8 KV cache for a 16-bit q: scores on the integer tensor cores, the output in fp16.

Why a kernel of its own: triton.py's decode with triton_quant's tile step moves the [D, BLOCK_N] int8 key tile from
shared memory into the tensor-core operand one byte per instruction (LDS.U8, 256 per thread per 128-key tile on
Triton 3.6), so int8 KV ran no faster than bf16 KV although it reads half the bytes. Here:
- Scores: q is split per row into two int8 parts, q = q_scale (hi + lo / 254) to within max|q| / 64516 an element
  (_split_q_int8: as fine as a bf16 q's own rounding for every element within 1/126 of the row's largest), and both
  parts meet the stored key codes c (level - 128) on the int8 tensor cores, int32 exact: the key tile goes from
  global to shared memory by cp.async and to the MMA by ldmatrix, with no conversion at all. A key value is
  s c + (zero + 128 s), so q . x_n = s_n (q . c_n) + (sum q) (zero_n + 128 s_n) (_tile_scales' offsets).
- Output: the V codes are read as int16 words, each the pair (d = 2j, 2j + 1) of one token, and split into an even
  and an odd tile [BLOCK_N, D/2] of the fp16 values c (_split_pairs: a lop3, and a shift for the high byte, then one
  sub.f16x2, per two codes), 16-bit operands Triton moves with ldmatrix. The order of d does not matter to a sum
  over keys, so o_even and o_odd accumulate apart and are stored to the even and odd columns. The probabilities
  enter as p_n s_n / M (M the largest V scale so far, so <= 1), accumulated in place in units of M; the share of the
  offsets, sum p_n (zero_n + 128 s_n), and the softmax sum sum p_n stay [ROWS, BLOCK_N] running sums, reduced once
  after the loop: a row sum per tile crosses the warps through shared memory and a barrier.
- 32-key tiles fit 128 registers (4 programs an SM; 64-key tiles need 222), and the partitions aim at whole waves
  (triton_decode._spread). Scales and zeros are prefetched one tile ahead: Triton pipelines only loads that feed a
  dot. Partials (part_m, part_l, part_acc) have triton_decode.py's layout, so its reduce kernel merges them.

H200, Triton 3.6, context 32k, H=16, Hkv=4, bench_attention.py --kv-cache-dtype int8 (CUDA-graph replays, the bf16
cache in the same process): batch 1 / 16 / 64: 38.2 / 361.2 / 1440.7 us against 54.1 / 503.2 / 1954.6 for bf16 KV
(1.42x / 1.39x / 1.36x; 0.73 of int8's bytes bound at batch 16 and 64). The kernel before (both operands as fp16
1024 + level pairs, per-tile row sums, 64-key tiles of 3 stages, 199 registers): 1.10x / 1.09x at batch 16 / 64.
Largest error against an fp32 attention over the dequantized cache, two sequences' outputs (mean |o| 3.6e-3): 6e-5,
the kernel before 6-7e-5 (2026-12-01).
"""
import triton
import triton.language as tl

from ..pdl import pdl_start
from .triton_decode import _RUNTIME_INTS, _partition_size

Q_LO = tl.constexpr(254.0)  # q = q_scale (hi + lo / Q_LO): the low part's steps (_split_q_int8)


@triton.jit
def _split_q_int8(p_q, m_h, scale_log2, D: tl.constexpr):
    """q rows [BLOCK_H, D] at p_q (rows m_h) -> (hi, lo int8 [BLOCK_H, D], q scale [BLOCK_H], q sum [BLOCK_H]) with
    q = scale (hi + lo / Q_LO) to within scale / (2 Q_LO) = max|q| / 64516 an element, finer than a bf16 q's own
    rounding for every element within 1/126 of the row's largest; scale and sum come times scale_log2."""
    b_q = tl.load(p_q + tl.arange(0, D)[None, :], mask=m_h[:, None], other=0.0).to(tl.float32)
    b_max = tl.max(tl.abs(b_q), 1)
    b_scale = tl.where(b_max > 0, b_max / 127.0, 1.0)
    b_y = b_q * (1.0 / b_scale)[:, None]
    b_hi = tl.minimum(tl.maximum(tl.floor(b_y + 0.5), -127.0), 127.0)
    b_lo = tl.minimum(tl.maximum(tl.floor((b_y - b_hi) * Q_LO + 0.5), -127.0), 127.0)
    return b_hi.to(tl.int8), b_lo.to(tl.int8), b_scale * scale_log2, tl.sum(b_q, 1) * scale_log2


@triton.jit
def _split_pairs(b_w, USE_ASM: tl.constexpr):
    """int16 words (two codes c = level - 128) -> (low, high byte) as the fp16 value c, exact. (w & 0xFF) ^ 0x6480
    flips bit 7 (the level) and sets 1024's exponent: 1024 + level; minus 1152 leaves c. USE_ASM: two words at once,
    per 32-bit register one lop3 (low) or a shift and a lop3 (high), then one sub.f16x2; written as int16
    operations, ptxas spends a LOP3 and a PRMT per element."""
    if USE_ASM:
        b_lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; mov.b32 c, 0x64806480; lop3.b32 t, $1, 0x00ff00ff, c, 0x6a; sub.f16x2 $0, t, c; }",
            "=r,r", [b_w], dtype=tl.float16, is_pure=True, pack=2)
        b_hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; mov.b32 c, 0x64806480; shr.b32 t, $1, 8; lop3.b32 t, t, 0x00ff00ff, c, 0x6a;"
            " sub.f16x2 $0, t, c; }", "=r,r", [b_w], dtype=tl.float16, is_pure=True, pack=2)
    else:
        b_lo = ((b_w & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
        b_hi = (((b_w >> 8) & 0xFF) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
    return b_lo, b_hi


@triton.jit
def _tile_blocks(p_block_table, o_n, end, BS: tl.constexpr):
    """Block ids [BLOCK_N] int64 of keys o_n (0 past end)."""
    return tl.load(p_block_table + o_n // BS, mask=o_n < end, other=0).to(tl.int64)


@triton.jit
def _tile_scales(k_scale, v_scale, k_zero, v_zero, b_blk, o_n, end, i_kvh, BS: tl.constexpr, HKV: tl.constexpr):
    """(k scale, k offset, v scale, v offset) [BLOCK_N] fp32 of keys o_n in blocks b_blk (0 past end). A value is
    (c + 128) s + zero = s c + (zero + 128 s) for its stored code c: the offsets are zero + 128 s."""
    m_n = o_n < end
    o_sz = (b_blk * BS + o_n % BS) * HKV + i_kvh  # scales / zeros: [NB * BS, Hkv] contiguous
    b_ks = tl.load(k_scale + o_sz, mask=m_n, other=0.0)
    b_vs = tl.load(v_scale + o_sz, mask=m_n, other=0.0)
    b_kz = tl.load(k_zero + o_sz, mask=m_n, other=0.0) + 128.0 * b_ks
    b_vz = tl.load(v_zero + o_sz, mask=m_n, other=0.0) + 128.0 * b_vs
    return b_ks, b_kz, b_vs, b_vz


@triton.jit
def _attend_tile_int8(b_qhi, b_qlo, b_qs, b_qsum, b_m, b_l, b_off, b_vm, b_acc_e, b_acc_o, k_codes, v_words, b_ks,
                      b_kz, b_vs, b_vz, p_block_table, o_n, end, i_kvh, stride_kb, stride_ks, stride_kh, stride_vb,
                      stride_vs, stride_vh, BS: tl.constexpr, D: tl.constexpr, USE_ASM: tl.constexpr):
    """One online-softmax step over keys o_n [BLOCK_N] (those < end exist), scales from _tile_scales.
    Scores: q's int8 parts times the key codes on the integer tensor cores, s = q_scale s_k (hi + lo / Q_LO) . c
    + q_sum k_offset (scale_log2 inside q_scale and q_sum). Output, in fp16: p_n s_n / b_vm (b_vm: the largest V
    scale so far, so <= 1) times the V codes, accumulated in units of b_vm; the offsets' share p_n v_offset_n and
    the softmax sum stay [ROWS, BLOCK_N] running sums, reduced once after the loop (a row sum per tile crosses the
    warps through shared memory). Strides: K in bytes, V in int16 words."""
    m_n = o_n < end
    b_blk = _tile_blocks(p_block_table, o_n, end, BS)
    o_k = b_blk * stride_kb + (o_n % BS) * stride_ks + i_kvh * stride_kh
    b_kc = tl.load(k_codes + o_k[None, :] + tl.arange(0, D)[:, None], mask=m_n[None, :], other=0)  # [D, BLOCK_N]
    b_s = tl.dot(b_qhi, b_kc).to(tl.float32) + tl.dot(b_qlo, b_kc).to(tl.float32) * (1.0 / Q_LO)
    b_s = b_s * b_qs[:, None] * b_ks[None, :] + b_qsum[:, None] * b_kz[None, :]
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    o_v = b_blk * stride_vb + (o_n % BS) * stride_vs + i_kvh * stride_vh
    b_vw = tl.load(v_words + o_v[:, None] + tl.arange(0, D // 2)[None, :], mask=m_n[:, None], other=0)
    b_ve, b_vo = _split_pairs(b_vw, USE_ASM)  # [BLOCK_N, D/2] each
    b_l = b_l * b_alpha[:, None] + b_p
    b_off = b_off * b_alpha[:, None] + b_p * b_vz[None, :]
    b_vm_new = tl.maximum(b_vm, tl.max(b_vs, 0))
    b_pv = (b_p * (b_vs / b_vm_new)[None, :]).to(tl.float16)
    b_r = (b_alpha * (b_vm / b_vm_new))[:, None]
    b_acc_e = tl.dot(b_pv, b_ve, acc=b_acc_e * b_r)
    b_acc_o = tl.dot(b_pv, b_vo, acc=b_acc_o * b_r)
    return b_m_new, b_l, b_off, b_vm_new, b_acc_e, b_acc_o


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def decode_int8_partial_kernel(q, k_codes, v_words, k_scale, v_scale, k_zero, v_zero, gate, o, part_m, part_l,
                               part_acc, block_tables, context_lens, scale_log2, num_partitions, spread, part_lo,
                               part_hi, part_round, stride_qn, stride_qh, stride_kb, stride_ks, stride_kh,
                               stride_vb, stride_vs, stride_vh, stride_gn, stride_gh, stride_on, stride_oh, stride_bt,
                               H: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr,
                               D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_GATE: tl.constexpr,
                               USE_ASM: tl.constexpr, USE_PDL: tl.constexpr = False):
    """triton_decode._decode_partial_kernel over an int8 cache: k_codes int8 [NB, BS, Hkv, D] (strides in bytes),
    v_words the V codes read as int16 [NB, BS, Hkv, D/2] (strides in words); same grid, partition sizing, outputs and
    partial layout."""
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
        b_qhi, b_qlo, b_qs, b_qsum = _split_q_int8(q + i_seq64 * stride_qn + o_head[:, None] * stride_qh, m_h,
                                                   scale_log2, D)
        b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        b_off = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        b_vm = tl.full([], 1e-30, dtype=tl.float32)
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
            b_m, b_l, b_off, b_vm, b_acc_e, b_acc_o = _attend_tile_int8(
                b_qhi, b_qlo, b_qs, b_qsum, b_m, b_l, b_off, b_vm, b_acc_e, b_acc_o, k_codes, v_words, b_ks, b_kz,
                b_vs, b_vz, p_block_table, o_n, end, i_kvh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                stride_vh, BS, D, USE_ASM)
            b_ks, b_kz, b_vs, b_vz = b_next
        b_l = tl.sum(b_l, 1)
        b_off = tl.sum(b_off, 1)[:, None]
        b_acc_e = b_acc_e * b_vm + b_off
        b_acc_o = b_acc_o * b_vm + b_off
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
