"""Triton pieces of the quantized KV cache (layout and formulas: kv_quant.py), used by triton.py's kernels.

- `store_kv_quant_kernel`: quantize each stored token's K and V rows (one scale, and zero, per kv head) on write.
- `dequantized_context`: for prefill chunks of many queries, the contexts' blocks dequantized into a workspace
  (`dequant_blocks_kernel`) with their own block table, so triton.py's 16-bit kernel attends over them
  (DEQUANT_MIN_QUERIES says why and when).
- `attend_tile_quant`: triton.py's online-softmax step over a tile of quantized keys. The codes enter the two
  matmuls cast to q's dtype (int8, int4 and e4m3 values are exact in bf16 / fp16), and the per-key scale s_n and
  offset z_n are folded into the [ROWS, BLOCK_N] scores and probabilities instead of dequantizing [BLOCK_N, D]:
      q . k_n = s_n (q . c_n) + z_n sum_d(q)          sum_n p_n v_n = sum_n (p_n s_n) c_n + sum_n p_n z_n
  (int8 codes are stored minus 128, so z_n = zero_n + 128 s_n; fp8 has no zero).
- fp8 runs its matmuls in fp16 (`quant_query`: bf16 q -> fp16 is exact for |q| in [6e-5, 65504]): e4m3 -> fp16 is
  one packed convert per two codes, e4m3 -> bf16 is not (fp16: 1926 against 2306 us at batch 64, context 32k, on an
  H200). The probabilities then enter as fp16 p_n s_n / max_n s_n (<= 1, 11 bits; a raw p_n s_n can fall below
  fp16's normal range), the tile's largest scale multiplied back onto the fp32 result. The integer kinds keep q's
  dtype: the same fp16 treatment measured slower for them (int8 606 against 547 us at batch 16).
KV_KIND (constexpr): 0 = 16-bit cache (triton.py's own path), 1 = int8, 2 = int4, 3 = fp8.
"""
import functools

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from .kv_quant import FP8_MAX, PREFILL_DEQUANT_BYTES, QuantizedKV

KV_KIND = {"int8": 1, "int4": 2, "fp8": 3}
_FP8_MAX = tl.constexpr(FP8_MAX)  # a jit function reads only constexpr globals


@triton.jit
def _quantize_rows(x, codes, scale, zero, o_x, o_c, o_s, m_h, D: tl.constexpr, KV_KIND: tl.constexpr):
    """Quantize the rows x[o_x + 0..D) (o_x [BLOCK_HKV] row starts; m_h: live rows): codes at codes[o_c + j],
    scale and zero at o_s. Same operation sequence as kv_quant.quantize_kv (floor(y + 0.5) rounding)."""
    if KV_KIND == 2:  # int4: the even and odd elements as two tiles, packed low / high nibble
        o_j = tl.arange(0, D // 2)
        b_lo = tl.load(x + o_x[:, None] + 2 * o_j[None, :], mask=m_h[:, None], other=0.0).to(tl.float32)
        b_hi = tl.load(x + o_x[:, None] + 2 * o_j[None, :] + 1, mask=m_h[:, None], other=0.0).to(tl.float32)
        b_min = tl.minimum(tl.min(b_lo, 1), tl.min(b_hi, 1))
        b_s = (tl.maximum(tl.max(b_lo, 1), tl.max(b_hi, 1)) - b_min) / 15.0
        b_inv = tl.where(b_s > 0, 1.0 / tl.where(b_s > 0, b_s, 1.0), 0.0)
        b_lo = tl.minimum(tl.maximum(tl.floor((b_lo - b_min[:, None]) * b_inv[:, None] + 0.5), 0.0), 15.0)
        b_hi = tl.minimum(tl.maximum(tl.floor((b_hi - b_min[:, None]) * b_inv[:, None] + 0.5), 0.0), 15.0)
        b_code = b_lo.to(tl.uint8) | (b_hi.to(tl.uint8) << 4)
        tl.store(codes + o_c[:, None] + o_j[None, :], b_code, mask=m_h[:, None])
        tl.store(zero + o_s, b_min, mask=m_h)
    else:
        o_d = tl.arange(0, D)
        b_x = tl.load(x + o_x[:, None] + o_d[None, :], mask=m_h[:, None], other=0.0).to(tl.float32)
        if KV_KIND == 1:
            b_min = tl.min(b_x, 1)
            b_s = (tl.max(b_x, 1) - b_min) / 255.0
            b_inv = tl.where(b_s > 0, 1.0 / tl.where(b_s > 0, b_s, 1.0), 0.0)
            b_q = tl.minimum(tl.maximum(tl.floor((b_x - b_min[:, None]) * b_inv[:, None] + 0.5), 0.0), 255.0)
            tl.store(codes + o_c[:, None] + o_d[None, :], (b_q - 128.0).to(tl.int8), mask=m_h[:, None])
            tl.store(zero + o_s, b_min, mask=m_h)
        else:
            b_s = tl.max(tl.abs(b_x), 1) / _FP8_MAX
            b_inv = tl.where(b_s > 0, 1.0 / tl.where(b_s > 0, b_s, 1.0), 0.0)
            b_q = tl.minimum(tl.maximum(b_x * b_inv[:, None], -_FP8_MAX), _FP8_MAX)
            tl.store(codes + o_c[:, None] + o_d[None, :], b_q.to(tl.float8e4nv), mask=m_h[:, None])
    tl.store(scale + o_s, b_s, mask=m_h)


@triton.jit
def store_kv_quant_kernel(k, v, k_codes, v_codes, k_scale, v_scale, k_zero, v_zero, slot_mapping,
                          stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                          HKV: tl.constexpr, D: tl.constexpr, BLOCK_HKV: tl.constexpr, KV_KIND: tl.constexpr,
                          USE_PDL: tl.constexpr = False):
    """One program per token: quantize its [Hkv, D] key and value rows into the cache slot (slot -1: skip).
    Codes [NB * BS slots, Hkv, Dc] at slot * stride_cs + head * stride_ch; scales / zeros [NB * BS, Hkv]."""
    pdl_start(USE_PDL)
    i_t = tl.program_id(0)
    slot = tl.load(slot_mapping + i_t).to(tl.int64)
    if slot >= 0:
        o_h = tl.arange(0, BLOCK_HKV)
        m_h = o_h < HKV
        o_s = slot * HKV + o_h
        o_c = slot * stride_cs + o_h * stride_ch
        i_t64 = i_t.to(tl.int64)
        _quantize_rows(k, k_codes, k_scale, k_zero, i_t64 * stride_kt + o_h * stride_kh, o_c, o_s, m_h, D, KV_KIND)
        _quantize_rows(v, v_codes, v_scale, v_zero, i_t64 * stride_vt + o_h * stride_vh, o_c, o_s, m_h, D, KV_KIND)


@triton.jit
def _load_codes(codes, o_row, m_n, D: tl.constexpr, KV_KIND: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Codes of keys at row offsets o_row [BLOCK_N] -> [BLOCK_N, D] ([D, BLOCK_N] when TRANSPOSE), still integer /
    fp8 (masked keys: 0). int4 bytes are split into nibbles and interleaved back to element order."""
    if KV_KIND == 2:
        o_j = tl.arange(0, D // 2)
        b_c = tl.load(codes + o_row[:, None] + o_j[None, :], mask=m_n[:, None], other=0)
        b_c = tl.interleave(b_c & 15, b_c >> 4)
        if TRANSPOSE:
            b_c = tl.trans(b_c)
    else:
        o_d = tl.arange(0, D)
        if TRANSPOSE:
            b_c = tl.load(codes + o_row[None, :] + o_d[:, None], mask=m_n[None, :], other=0)
        else:
            b_c = tl.load(codes + o_row[:, None] + o_d[None, :], mask=m_n[:, None], other=0)
        if KV_KIND == 3:  # fp8 codes arrive as their bytes: a masked key reads 0x00 (+0.0), never a NaN pattern
            b_c = b_c.to(tl.float8e4nv, bitcast=True)
    return b_c


@triton.jit
def _load_offset(zero, scale_n, o_sz, m_n, KV_KIND: tl.constexpr):
    """Per-key additive term z_n of x = c * s_n + z_n (int8 codes are stored minus 128)."""
    b_z = tl.load(zero + o_sz, mask=m_n, other=0.0)
    if KV_KIND == 1:
        b_z = b_z + 128.0 * scale_n
    return b_z


@triton.jit
def quant_query(b_q, KV_KIND: tl.constexpr):
    """q rows [ROWS, D] -> (q in the dtype the quantized tiles are multiplied in: fp16 for a 16-bit q over an fp8
    cache, else q's own; sum over D of that q, fp32 [ROWS])."""
    if KV_KIND == 3:
        if b_q.dtype != tl.float32:
            b_q = b_q.to(tl.float16)
    return b_q, tl.sum(b_q.to(tl.float32), 1)


@triton.jit
def attend_tile_quant(b_q, b_qsum, b_m, b_l, b_acc, k_codes, v_codes, k_scale, v_scale, k_zero, v_zero,
                      p_block_table, o_n, m_n, m_s, i_kvh, scale_log2, stride_kb, stride_ks, stride_kh,
                      stride_vb, stride_vs, stride_vh, BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      KV_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """triton.py's _attend_tile over a quantized cache (scale and zero folded in, see the module docstring).

    b_q [ROWS, D] and b_qsum [ROWS] fp32 from quant_query; b_m, b_l [ROWS], b_acc [ROWS, D] fp32."""
    b_blk = tl.load(p_block_table + o_n // BS, mask=m_n, other=0).to(tl.int64)
    o_sz = (b_blk * BS + o_n % BS) * HKV + i_kvh  # scales / zeros: [NB * BS, Hkv] contiguous
    b_ks = tl.load(k_scale + o_sz, mask=m_n, other=0.0)
    b_vs = tl.load(v_scale + o_sz, mask=m_n, other=0.0)
    o_k = b_blk * stride_kb + (o_n % BS) * stride_ks + i_kvh * stride_kh
    o_v = b_blk * stride_vb + (o_n % BS) * stride_vs + i_kvh * stride_vh
    b_kt = _load_codes(k_codes, o_k, m_n, D, KV_KIND, True).to(b_q.dtype)  # [D, BLOCK_N]
    b_v = _load_codes(v_codes, o_v, m_n, D, KV_KIND, False).to(b_q.dtype)  # [BLOCK_N, D]
    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * b_ks[None, :]
    if KV_KIND != 3:
        b_s = b_s + b_qsum[:, None] * _load_offset(k_zero, b_ks, o_sz, m_n, KV_KIND)[None, :]
    b_s = tl.where(m_s, b_s * scale_log2, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if KV_KIND == 3:  # fp16 operands: p_n s_n over the tile's largest scale (module docstring)
        b_vmax = tl.max(b_vs, 0)
        b_pv = (b_p * (b_vs / tl.where(b_vmax > 0, b_vmax, 1.0))[None, :]).to(b_q.dtype)
        b_acc = b_acc * b_alpha[:, None] + b_vmax * tl.dot(b_pv, b_v, input_precision=DOT_PRECISION)
    else:
        b_acc = b_acc * b_alpha[:, None] + tl.dot((b_p * b_vs[None, :]).to(b_q.dtype), b_v,
                                                  input_precision=DOT_PRECISION)
        b_acc = b_acc + tl.sum(b_p * _load_offset(v_zero, b_vs, o_sz, m_n, KV_KIND)[None, :], 1)[:, None]
    return b_m_new, b_l, b_acc


@triton.jit
def _dequant_rows(codes, scale, zero, out, o_c, o_sz, o_o, m_t, D: tl.constexpr, KV_KIND: tl.constexpr):
    """The rows at code offsets o_c (scales / zeros at o_sz; rows m_t) dequantized in fp32 and stored at o_o."""
    b_s = tl.load(scale + o_sz, mask=m_t, other=0.0)
    b_x = _load_codes(codes, o_c, m_t, D, KV_KIND, False).to(tl.float32) * b_s[:, None]
    if KV_KIND != 3:
        b_x = b_x + _load_offset(zero, b_s, o_sz, m_t, KV_KIND)[:, None]
    tl.store(out + o_o, b_x.to(out.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def dequant_blocks_kernel(k_codes, v_codes, k_scale, v_scale, k_zero, v_zero, src_blocks, k_out, v_out,
                          stride_kb, stride_ks, stride_kh, stride_ob, stride_os, stride_oh,
                          BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                          KV_KIND: tl.constexpr):
    """Program (i_b, i_kvh): block src_blocks[i_b]'s [BS, D] keys and values of kv head i_kvh, dequantized as
    kv_quant.dequantize_kv (codes times scale plus offset, in fp32) and rounded once into block i_b of k_out / v_out
    [n, BS, Hkv, D]. Code strides in elements of the code tensor (as _load_codes reads them); BLOCK_T >= BS."""
    i_b, i_kvh = tl.program_id(0), tl.program_id(1)
    b_blk = tl.load(src_blocks + i_b).to(tl.int64)
    o_t = tl.arange(0, BLOCK_T)
    m_t = o_t < BS
    o_sz = (b_blk * BS + o_t) * HKV + i_kvh  # scales / zeros: [NB * BS, Hkv] contiguous
    o_c = b_blk * stride_kb + o_t * stride_ks + i_kvh * stride_kh
    o_o = i_b.to(tl.int64) * stride_ob + o_t[:, None] * stride_os + i_kvh * stride_oh + tl.arange(0, D)[None, :]
    _dequant_rows(k_codes, k_scale, k_zero, k_out, o_c, o_sz, o_o, m_t, D, KV_KIND)
    _dequant_rows(v_codes, v_scale, v_zero, v_out, o_c, o_sz, o_o, m_t, D, KV_KIND)


# ----------------------------------------------------------------------------------------------------------- wrappers
def check_quant_cache(k_cache: QuantizedKV, v_cache: QuantizedKV) -> tuple[int, int, int, int]:
    """-> (NB, BS, Hkv, D) after checking the two sides agree in kind and shape and every tensor is contiguous."""
    if not isinstance(v_cache, QuantizedKV) or k_cache.kind != v_cache.kind:
        raise ValueError("k_cache and v_cache must both be QuantizedKV of the same kind")
    if k_cache.codes.shape != v_cache.codes.shape:
        raise ValueError(f"k_cache codes {tuple(k_cache.codes.shape)} != v_cache codes {tuple(v_cache.codes.shape)}")
    nb, bs, hkv, d = k_cache.shape
    for side in (k_cache, v_cache):
        if side.scale.shape != (nb, bs, hkv) or side.scale.dtype != torch.float32 \
                or (side.zero is None) != (side.kind == "fp8"):
            raise ValueError(f"a {side.kind} cache needs fp32 scales [{nb}, {bs}, {hkv}]"
                             + ("" if side.kind == "fp8" else " and zeros of the same shape"))
        if not all(t.is_contiguous() for t in side.tensors()):
            raise ValueError("a quantized cache's codes, scales and zeros must be contiguous")
    return nb, bs, hkv, d


def code_args(k_cache: QuantizedKV, v_cache: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the K and V codes as the attention kernels read them: fp8 as uint8 bytes (see _load_codes)."""
    if k_cache.kind == "fp8":
        return k_cache.codes.view(torch.uint8), v_cache.codes.view(torch.uint8)
    return k_cache.codes, v_cache.codes


def quant_pointer_args(k_cache: QuantizedKV, v_cache: QuantizedKV) -> list[torch.Tensor]:
    """-> [k_scale, v_scale, k_zero, v_zero] kernel arguments (fp8: the scales stand in for the unused zeros)."""
    return [k_cache.scale, v_cache.scale,
            k_cache.zero if k_cache.zero is not None else k_cache.scale,
            v_cache.zero if v_cache.zero is not None else v_cache.scale]


def store_kv_quant(k: torch.Tensor, v: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV,
                   slot_mapping: torch.Tensor) -> None:
    """store_kv_triton for a quantized cache (inputs already checked): one launch, no host sync."""
    hkv, d = k.shape[1], k.shape[2]
    store_kv_quant_kernel[(k.shape[0],)](
        k, v, k_cache.codes, v_cache.codes, *quant_pointer_args(k_cache, v_cache), slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.codes.stride(1), k_cache.codes.stride(2),
        HKV=hkv, D=d, BLOCK_HKV=triton.next_power_of_2(hkv), KV_KIND=KV_KIND[k_cache.kind], num_warps=4, **pdl_args(k))


def dequantize_blocks(k_cache: QuantizedKV, v_cache: QuantizedKV, src_blocks: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks src_blocks [n] (int32, on the device) of both sides, dequantized into new [n, BS, Hkv, D] tensors
    of `dtype` (inputs already checked): one launch, no host sync."""
    _, bs, hkv, d = k_cache.shape
    k_codes, v_codes = code_args(k_cache, v_cache)
    n = src_blocks.shape[0]
    k_out = torch.empty(n, bs, hkv, d, dtype=dtype, device=k_codes.device)
    v_out = torch.empty_like(k_out)
    if n:
        dequant_blocks_kernel[(n, hkv)](
            k_codes, v_codes, *quant_pointer_args(k_cache, v_cache), src_blocks, k_out, v_out, k_codes.stride(0),
            k_codes.stride(1), k_codes.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2), BS=bs, HKV=hkv,
            D=d, BLOCK_T=triton.next_power_of_2(bs), KV_KIND=KV_KIND[k_cache.kind], num_warps=4)
    return k_out, v_out


# A quantized cache's prefill attends over a dequantized copy of its sequences' contexts (in q's dtype, into a
# workspace of at most kv_quant.PREFILL_DEQUANT_BYTES) when the chunks average at least this many query tokens a
# sequence. Prefill is bound by the matrix units, not by the bytes of K and V, and the quantized step (codes
# converted in the tile loop, scales folded into scores and probabilities) ran 0.26-0.54x the 16-bit kernel; the copy
# costs one pass over the context. H200, Triton 3.6, head_dim 256 (.peer/pf_copy.py, 2026-12-01), us, bf16 cache /
# int8 step / int8 copy: 2048 queries at 32k, Hkv 4: 2954 / 7153 / 2996 (the copy alone 59); 24 q heads: 4179 /
# 13066 / 4188; a fresh 2048-token prompt: 130 / 259 / 156; 512 at 8k: 397 / 771 / 391; int4 and fp8 alike (0.98-1.02x
# bf16 through the copy). One sequence of 16 to 256 queries at 4k and 32k: the copy 0.96-1.04x bf16, the step
# 0.51-0.54x. Many short chunks of short contexts would pay the copy without the single long sequence's
# latency-bound tiles to hide it, hence a floor.
DEQUANT_MIN_QUERIES = 64


@functools.lru_cache(maxsize=16)
def _context_blocks_on(context_lens_cpu: tuple, first_seq: int, bs: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (rows, cols) int64 [n_blocks]: the block-table entries of sequences first_seq.. that hold their contexts,
    and the block table [N, max_blocks] int32 of the copy that puts them one after another; on the device (pinned
    async copies), made once for the shapes of a step."""
    counts = [0] * first_seq + [-(-c // bs) for c in context_lens_cpu[first_seq:]]
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
    first = torch.tensor(counts, dtype=torch.int64).cumsum(0) - torch.tensor(counts, dtype=torch.int64)
    cols = torch.arange(rows.numel()) - first[rows]
    table = torch.zeros(len(counts), max(counts, default=0), dtype=torch.int32)
    table[rows, cols] = torch.arange(rows.numel(), dtype=torch.int32)
    out = (rows, cols, table)
    if device.type == "cuda":
        out = tuple(t.pin_memory() for t in out)
    return tuple(t.to(device, non_blocking=True) for t in out)


def dequantized_context(k_cache: QuantizedKV, v_cache: QuantizedKV, block_tables: torch.Tensor,
                        query_lens: list[int], context_lens_cpu: list[int], first_seq: int, dtype: torch.dtype,
                        dequantize: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """-> (k, v, block_tables) of a dequantized copy of the contexts of sequences first_seq.., or None where the
    quantized step should run instead: dequantize False, or None (automatic) with chunks averaging fewer than
    DEQUANT_MIN_QUERIES tokens or a copy larger than PREFILL_DEQUANT_BYTES."""
    _, bs, hkv, d = k_cache.shape
    seqs = len(query_lens) - first_seq
    blocks = sum(-(-c // bs) for c in context_lens_cpu[first_seq:])
    copy_bytes = 2 * blocks * bs * hkv * d * torch.empty((), dtype=dtype).element_size()
    if dequantize is False or (dequantize is None and (sum(query_lens[first_seq:]) < DEQUANT_MIN_QUERIES * seqs
                                                       or copy_bytes > PREFILL_DEQUANT_BYTES)):
        return None
    rows, cols, table = _context_blocks_on(tuple(context_lens_cpu), first_seq, bs, block_tables.device)
    k, v = dequantize_blocks(k_cache, v_cache, block_tables[rows, cols].to(torch.int32), dtype)
    return k, v, table
