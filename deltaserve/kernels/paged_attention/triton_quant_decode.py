"""Split-K decode over a quantized paged KV cache (int8 / int4 / fp8, layout in kv_quant.py); triton.py launches it
in place of its 16-bit partial kernel and merges the partitions with the same reduce kernel.

Why a kernel of its own: the decode is meant to be bound by the bytes it reads, but the generic tile step
(triton_quant.attend_tile_quant) spends more on turning codes into numbers than on reading them:
- int8 -> bf16 is a hardware conversion at 16 a clock per SM against 128 fp32 FMAs (CUDA guide, compute capability
  9.0), and one per element read of K and V. With `f16_dot` the codes become fp16 by bit
  arithmetic instead (exact: an fp16 holds every int8, int4 and e4m3 value): an int8 code c (stored minus 128) as
  the fp16 bits 0x6480 + c is 1152 + c, a nibble n as 0x6400 | n is 1024 + n; one fp16 subtraction leaves c or n.
  e4m3 -> fp16 is a packed hardware conversion (two a instruction); -> bf16 is not. Both matmuls then run in fp16 on
  q cast to fp16 (a decode q is O(1): far from fp16's range limits).
- int4 is not interleaved back to element order (a shuffle through shared memory): the low nibbles are the even
  elements and the high nibbles the odd ones, so q . k = q_even . lo + q_odd . hi, and the output is two
  accumulators [G, D/2] written to the even and odd elements.
The per-key scale s_n and offset z_n are folded as in triton_quant.py: q . k_n = s_n (q . c_n) + z_n sum(q),
sum_n p_n v_n = sum_n (p_n s_n) c_n + sum_n p_n z_n. In fp16, p_n s_n would go subnormal for a head with small
scales (also with an fp16 q and no `f16_dot`), so the V operand is p_n (s_n / max_tile s) and the matmul's result
is multiplied back by max_tile s.
"""
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .kv_quant import QuantizedKV
from .triton_quant import KV_KIND, code_args, codes_to, quant_pointer_args


@dataclass(frozen=True)
class QuantDecodeConfig:
    """Launch parameters of the quantized decode. Defaults are expectations, not yet measured: 16 KiB of codes per
    side and tile (twice the 8 KiB the 32-key int8 tile of the generic step read), pick from
    `bench_attention.py --kv-cache-dtype int8,int4,fp8 --sweep`."""
    block_n: int = 64  # keys a tile
    num_warps: int = 4
    num_stages: int = 3
    partition_size: int | None = None  # keys a program; None: triton._decode_partition_size (grid covers the SMs)
    f16_dot: bool = True  # codes -> fp16 by bit arithmetic, fp16 matmuls (16-bit q only; fp32 q stays fp32)
    reduce_chunk: int = 16  # partitions a step of triton.py's reduce: [16, D] fp32 loads, 32 registers a thread


DEFAULT_QUANT_DECODE = {
    "int8": QuantDecodeConfig(block_n=64, num_warps=4, num_stages=3),
    "int4": QuantDecodeConfig(block_n=128, num_warps=4, num_stages=3),  # 64-byte rows: twice the keys for 16 KiB
    "fp8": QuantDecodeConfig(block_n=64, num_warps=4, num_stages=3),
}


def quant_decode_config(kind: str, base: QuantDecodeConfig | None = None, **overrides) -> QuantDecodeConfig:
    """-> `base` (default: the default config of `kind`) with the non-None overrides (block_n, ...) applied."""
    return replace(base or DEFAULT_QUANT_DECODE[kind], **{k: v for k, v in overrides.items() if v is not None})


@triton.jit
def _offset(zero, b_scale, o_sz, m_n, KV_KIND: tl.constexpr):
    """z_n of x = c * s_n + z_n (b_scale: s_n; int8 codes are stored minus 128); 0 for fp8."""
    if KV_KIND == 3:
        return tl.zeros_like(b_scale)
    b_z = tl.load(zero + o_sz, mask=m_n, other=0.0)
    if KV_KIND == 1:
        b_z = b_z + 128.0 * b_scale
    return b_z


@triton.jit
def _attend_tile(b_qa, b_qb, b_qsum, b_m, b_l, b_acca, b_accb, k_codes, v_codes, k_scale, v_scale, k_zero, v_zero,
                 p_block_table, o_n, m_n, i_kvh, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                 stride_vh, BS: tl.constexpr, HKV: tl.constexpr, W: tl.constexpr, KV_KIND: tl.constexpr,
                 F16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax step over keys o_n [BLOCK_N] (m_n: key in the partition). W code columns a row (D, or D/2 for
    int4). b_qa [BLOCK_H, W] in the matmul dtype (int4: the even elements; b_qb the odd, else unused); b_qsum,
    b_m, b_l [BLOCK_H] fp32; b_acca, b_accb [BLOCK_H, W] fp32 (b_accb: int4's odd elements)."""
    o_w = tl.arange(0, W)
    i_blk = tl.load(p_block_table + o_n // BS, mask=m_n, other=0).to(tl.int64)
    o_sz = (i_blk * BS + o_n % BS) * HKV + i_kvh  # scales / zeros: [NB * BS, Hkv] contiguous
    b_ks = tl.load(k_scale + o_sz, mask=m_n, other=0.0)
    b_vs = tl.load(v_scale + o_sz, mask=m_n, other=0.0)
    o_k = i_blk * stride_kb + (o_n % BS) * stride_ks + i_kvh * stride_kh
    o_v = i_blk * stride_vb + (o_n % BS) * stride_vs + i_kvh * stride_vh
    b_kc = tl.load(k_codes + o_k[None, :] + o_w[:, None], mask=m_n[None, :], other=0)  # [W, BLOCK_N]
    b_vc = tl.load(v_codes + o_v[:, None] + o_w[None, :], mask=m_n[:, None], other=0)  # [BLOCK_N, W]
    if KV_KIND == 2:
        b_s = tl.dot(b_qa, codes_to(b_kc & 15, b_qa, KV_KIND, F16), input_precision=DOT_PRECISION)
        b_s += tl.dot(b_qb, codes_to(b_kc >> 4, b_qa, KV_KIND, F16), input_precision=DOT_PRECISION)
    else:
        b_s = tl.dot(b_qa, codes_to(b_kc, b_qa, KV_KIND, F16), input_precision=DOT_PRECISION)
    b_s = b_s * b_ks[None, :] + b_qsum[:, None] * _offset(k_zero, b_ks, o_sz, m_n, KV_KIND)[None, :]
    b_s = tl.where(m_n[None, :], b_s * scale_log2, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # finite: every partition's first tile holds a key
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_pz = tl.sum(b_p * _offset(v_zero, b_vs, o_sz, m_n, KV_KIND)[None, :], 1)[:, None]
    # p * s in [0, max s] relative to the tile's max scale: fp16 keeps it normal (bf16 would not need it)
    b_vmax = tl.max(b_vs, 0)
    b_vmax = tl.where(b_vmax > 0, b_vmax, 1.0)
    b_pv = (b_p * (b_vs / b_vmax)[None, :]).to(b_qa.dtype)
    if KV_KIND == 2:
        b_acca = b_acca * b_alpha[:, None] + b_pz + b_vmax * tl.dot(
            b_pv, codes_to(b_vc & 15, b_qa, KV_KIND, F16), input_precision=DOT_PRECISION)
        b_accb = b_accb * b_alpha[:, None] + b_pz + b_vmax * tl.dot(
            b_pv, codes_to(b_vc >> 4, b_qa, KV_KIND, F16), input_precision=DOT_PRECISION)
    else:
        b_acca = b_acca * b_alpha[:, None] + b_pz + b_vmax * tl.dot(
            b_pv, codes_to(b_vc, b_qa, KV_KIND, F16), input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acca, b_accb


@triton.jit
def _emit(b_acc, b_l, o_e, o_head, m_h, i_seq64, i_part, gate, o, part_acc, num_partitions, stride_gn, stride_gh,
          stride_on, stride_oh, H: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, HAS_GATE: tl.constexpr):
    """Write the accumulator of elements o_e [W]: SPLIT: unnormalised into part_acc [N, H, P, D] fp32; else the
    output b_acc / b_l, times sigmoid(gate)."""
    if SPLIT:
        o_ml = (i_seq64 * H + o_head) * num_partitions + i_part
        tl.store(part_acc + o_ml[:, None] * D + o_e[None, :], b_acc, mask=m_h[:, None])
    else:
        b_o = b_acc / b_l[:, None]
        if HAS_GATE:
            b_g = tl.load(gate + i_seq64 * stride_gn + o_head[:, None] * stride_gh + o_e[None, :],
                          mask=m_h[:, None], other=0.0).to(tl.float32)
            b_o = b_o * tl.sigmoid(b_g)
        p_o = o + i_seq64 * stride_on + o_head[:, None] * stride_oh + o_e[None, :]
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_h[:, None])


@triton.jit
def decode_partial_quant_kernel(q, k_codes, v_codes, k_scale, v_scale, k_zero, v_zero, gate, o, part_m, part_l,
                                part_acc, block_tables, context_lens, scale_log2, partition_size, num_partitions,
                                stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                stride_vh, stride_gn, stride_gh, stride_on, stride_oh, stride_bt,
                                H: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr,
                                D: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                                HAS_GATE: tl.constexpr, KV_KIND: tl.constexpr, F16: tl.constexpr,
                                DOT_PRECISION: tl.constexpr):
    """triton.py's _decode_partial_kernel over a quantized cache, same grid (N, Hkv, P) and outputs: program
    (i, h, p) attends the G query heads of kv head h of sequence i over keys [p, p + 1) * partition_size.
    W: code columns a row (D; int4: D / 2, and the accumulators hold the even and the odd elements)."""
    i_seq, i_kvh, i_part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_seq64 = i_seq.to(tl.int64)
    ctx = tl.load(context_lens + i_seq).to(tl.int32)
    start = i_part * partition_size
    o_h = tl.arange(0, BLOCK_H)
    o_head = i_kvh * G + o_h
    m_h = o_h < G
    o_w = tl.arange(0, W)
    o_ea = o_w  # the elements of the first accumulator (int4: the even ones; the second has the odd ones)
    if KV_KIND == 2:
        o_ea = 2 * o_w
    if start < ctx:
        end = tl.minimum(start + partition_size, ctx)
        p_q = q + i_seq64 * stride_qn + o_head[:, None] * stride_qh
        b_qa = tl.load(p_q + o_ea[None, :], mask=m_h[:, None], other=0.0)
        if F16:
            b_qa = b_qa.to(tl.float16)
        b_qb = b_qa  # unused unless int4
        b_qsum = tl.sum(b_qa.to(tl.float32), 1)
        if KV_KIND == 2:
            b_qb = tl.load(p_q + o_ea[None, :] + 1, mask=m_h[:, None], other=0.0)
            if F16:
                b_qb = b_qb.to(tl.float16)
            b_qsum += tl.sum(b_qb.to(tl.float32), 1)
        b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_H], dtype=tl.float32)
        b_acca = tl.zeros([BLOCK_H, W], dtype=tl.float32)
        b_accb = tl.zeros([BLOCK_H, W], dtype=tl.float32)
        p_block_table = block_tables + i_seq64 * stride_bt
        for n in range(start, end, BLOCK_N):
            o_n = n + tl.arange(0, BLOCK_N)
            b_m, b_l, b_acca, b_accb = _attend_tile(
                b_qa, b_qb, b_qsum, b_m, b_l, b_acca, b_accb, k_codes, v_codes, k_scale, v_scale, k_zero, v_zero,
                p_block_table, o_n, o_n < end, i_kvh, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb,
                stride_vs, stride_vh, BS, H // G, W, KV_KIND, F16, DOT_PRECISION)
        _emit(b_acca, b_l, o_ea, o_head, m_h, i_seq64, i_part, gate, o, part_acc, num_partitions, stride_gn,
              stride_gh, stride_on, stride_oh, H, D, SPLIT, HAS_GATE)
        if KV_KIND == 2:
            _emit(b_accb, b_l, o_ea + 1, o_head, m_h, i_seq64, i_part, gate, o, part_acc, num_partitions, stride_gn,
                  stride_gh, stride_on, stride_oh, H, D, SPLIT, HAS_GATE)
        if SPLIT:
            o_ml = (i_seq64 * H + o_head) * num_partitions + i_part
            tl.store(part_m + o_ml, b_m, mask=m_h)
            tl.store(part_l + o_ml, b_l, mask=m_h)
    elif not SPLIT:
        # empty context (a padded row): the output is zeros, never left unwritten (SPLIT: the reduce writes them)
        o_d = tl.arange(0, D)
        p_o = o + i_seq64 * stride_on + o_head[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, tl.zeros([BLOCK_H, D], dtype=tl.float32).to(p_o.dtype.element_ty), mask=m_h[:, None])


def launch_decode_partial_quant(q: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV, gate: torch.Tensor,
                                has_gate: bool, o: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor,
                                part_acc: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                                scale_log2: float, partition_size: int, parts: int, cfg: QuantDecodeConfig) -> None:
    """One launch of decode_partial_quant_kernel (inputs checked by triton.paged_attention_decode; gate: a
    stand-in tensor when not has_gate). SPLIT when parts > 1, else it writes o."""
    n, h, d = q.shape
    hkv = k_cache.codes.shape[2]
    if k_cache.kind == "int4" and d < 32 and q.is_cuda:
        raise ValueError(f"kv_cache_dtype='int4' decode needs head_dim >= 32 on a GPU (a 16-wide matmul over each "
                         f"half), got {d}")
    kc, vc = code_args(k_cache, v_cache)
    f16 = cfg.f16_dot and q.dtype in (torch.float16, torch.bfloat16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 q (tests): exact products, not TF32
    decode_partial_quant_kernel[(n, hkv, parts)](
        q, kc, vc, *quant_pointer_args(k_cache, v_cache), gate, o, part_m, part_l, part_acc, block_tables,
        context_lens, scale_log2, partition_size, parts, q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        gate.stride(0), gate.stride(1), o.stride(0), o.stride(1), block_tables.stride(0),
        H=h, G=h // hkv, BLOCK_H=max(16, triton.next_power_of_2(h // hkv)), BS=k_cache.codes.shape[1], D=d,
        W=d // 2 if k_cache.kind == "int4" else d, BLOCK_N=cfg.block_n, SPLIT=parts > 1, HAS_GATE=has_gate,
        KV_KIND=KV_KIND[k_cache.kind], F16=f16, DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
