"""Triton paged attention for the gated full-attention layers: KV store, varlen causal prefill, split-K decode.

What belongs here: the kernels and their validating wrappers, nothing model-specific. Layout (whole engine):
k_cache, v_cache [NB, BS, Hkv, D]; token j of sequence i lives in block block_tables[i, j // BS] at offset j % BS.
Queries are a flat varlen batch q [T, H, D]; sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1], and they are the
LAST query_len tokens of its context_len cached tokens (the KV of this step is stored before attention runs).

Numerics: scores, softmax statistics and the output accumulator are fp32; the two matmuls take the cache dtype
(bf16 on the GPU: tensor cores). Scores are pre-multiplied by scale * log2(e) so the kernels use exp2.
The optional output gate (Qwen3.5) is applied in the epilogue: o = attn * sigmoid(gate), in fp32.

GQA: one program serves all G = H / Hkv query heads of one kv head, so each K/V tile is read once per group.
Prefill packs rows as (query token, head in group): row r of a tile is token r // G, head r % G.

Quantized caches (QuantizedKV: int8 / int4 / fp8 codes + per-token-per-head scales and zeros, kv_quant.py): the
constexpr KV_KIND picks triton_quant.py's tile step, which multiplies in q's dtype and folds scale and zero into the
scores and probabilities; KV_KIND = 0 compiles exactly the 16-bit kernels.
"""
import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from .kv_quant import QuantizedKV
from .triton_quant import (KV_KIND, attend_tile_quant, check_quant_cache, code_args, quant_pointer_args, quant_query,
                           store_kv_quant)

LOG2E = 1.4426950408889634
Cache = torch.Tensor | QuantizedKV  # one side (K or V) of a layer's paged cache


@triton.jit
def _store_kv_kernel(k, v, k_cache, v_cache, slot_mapping,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcs, stride_kch, stride_vcs, stride_vch,
                     HKV: tl.constexpr, D: tl.constexpr, BLOCK_HKV: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One program per token: copy its [Hkv, D] key and value rows into the cache slot (slot -1: skip)."""
    pdl_start(USE_PDL)
    i_t = tl.program_id(0)
    slot = tl.load(slot_mapping + i_t).to(tl.int64)
    if slot >= 0:
        o_h = tl.arange(0, BLOCK_HKV)
        o_d = tl.arange(0, D)
        m_h = (o_h < HKV)[:, None]
        b_k = tl.load(k + i_t.to(tl.int64) * stride_kt + o_h[:, None] * stride_kh + o_d[None, :], mask=m_h)
        b_v = tl.load(v + i_t.to(tl.int64) * stride_vt + o_h[:, None] * stride_vh + o_d[None, :], mask=m_h)
        p_kc = k_cache + slot * stride_kcs + o_h[:, None] * stride_kch + o_d[None, :]
        p_vc = v_cache + slot * stride_vcs + o_h[:, None] * stride_vch + o_d[None, :]
        tl.store(p_kc, b_k.to(p_kc.dtype.element_ty), mask=m_h)
        tl.store(p_vc, b_v.to(p_vc.dtype.element_ty), mask=m_h)


@triton.jit
def _attend_tile(b_q, b_m, b_l, b_acc, k_cache, v_cache, p_block_table, o_n, m_n, m_s, i_kvh, scale_log2,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BS: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys o_n [BLOCK_N] (m_n: key exists; m_s [ROWS, BLOCK_N]: row may see key).

    b_q [ROWS, D] cache dtype; b_m, b_l [ROWS] fp32 (running max in log2 units, running sum); b_acc [ROWS, D] fp32."""
    o_d = tl.arange(0, D)
    b_blk = tl.load(p_block_table + o_n // BS, mask=m_n, other=0).to(tl.int64)
    o_k = b_blk * stride_kb + (o_n % BS) * stride_ks + i_kvh * stride_kh
    o_v = b_blk * stride_vb + (o_n % BS) * stride_vs + i_kvh * stride_vh
    b_kt = tl.load(k_cache + o_k[None, :] + o_d[:, None], mask=m_n[None, :], other=0.0)  # [D, BLOCK_N]
    b_v = tl.load(v_cache + o_v[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0)  # [BLOCK_N, D]
    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * scale_log2
    b_s = tl.where(m_s, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # every row sees a key of its first tile (prefill: key 0, decode: the partition start): b_m_new is finite
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def _prefill_kernel(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, gate, o, block_tables, cu_seqlens,
                    context_lens, tile_table, scale_log2,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_gt, stride_gh, stride_ot, stride_oh, stride_bt,
                    HKV: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr,
                    KV_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (num q tiles * Hkv,), the kv heads of a tile adjacent (tiles come heaviest first). A program takes
    BLOCK_Q query tokens of one sequence x the G heads of kv head i_kvh: BLOCK_M >= BLOCK_Q * G rows."""
    i_tile, i_kvh = tl.program_id(0) // HKV, tl.program_id(0) % HKV
    i_seq = tl.load(tile_table + 2 * i_tile)
    i_qtile = tl.load(tile_table + 2 * i_tile + 1)
    bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
    q_len = (tl.load(cu_seqlens + i_seq + 1) - bos).to(tl.int32)
    ctx = tl.load(context_lens + i_seq).to(tl.int32)

    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    o_tok = i_qtile * BLOCK_Q + o_m // G  # query index within the sequence
    o_head = i_kvh * G + o_m % G
    m_row = (o_m < BLOCK_Q * G) & (o_tok < q_len)
    o_row_t = bos + o_tok.to(tl.int64)
    b_q = tl.load(q + o_row_t[:, None] * stride_qt + o_head[:, None] * stride_qh + o_d[None, :],
                  mask=m_row[:, None], other=0.0)
    if KV_KIND == 0:
        b_q = b_q.to(k_cache.dtype.element_ty)
        b_qsum = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
    else:
        b_q, b_qsum = quant_query(b_q, KV_KIND)  # the sum folds the zeros in
    pos = ctx - q_len + o_tok  # absolute position of each row's query token
    kv_end = ctx - q_len + tl.minimum(i_qtile * BLOCK_Q + BLOCK_Q, q_len)  # keys past the tile's last query unseen

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    p_block_table = block_tables + i_seq.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < kv_end
        m_s = (o_n[None, :] <= pos[:, None]) & m_n[None, :]
        if KV_KIND == 0:
            b_m, b_l, b_acc = _attend_tile(b_q, b_m, b_l, b_acc, k_cache, v_cache, p_block_table, o_n, m_n, m_s,
                                           i_kvh, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                           stride_vh, BS, D, DOT_PRECISION)
        else:
            b_m, b_l, b_acc = attend_tile_quant(b_q, b_qsum, b_m, b_l, b_acc, k_cache, v_cache, k_scale, v_scale,
                                                k_zero, v_zero, p_block_table, o_n, m_n, m_s, i_kvh, scale_log2,
                                                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                                BS, HKV, D, KV_KIND, DOT_PRECISION)
    b_o = b_acc / b_l[:, None]
    if HAS_GATE:
        b_g = tl.load(gate + o_row_t[:, None] * stride_gt + o_head[:, None] * stride_gh + o_d[None, :],
                      mask=m_row[:, None], other=0.0).to(tl.float32)
        b_o = b_o * tl.sigmoid(b_g)
    p_o = o + o_row_t[:, None] * stride_ot + o_head[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_row[:, None])


@triton.jit
def _partition_size(ctx, num_partitions, spread, part_lo, part_hi, part_round):
    """Keys a decode partition of a sequence with ctx keys covers: ctx / spread clamped to [part_lo, part_hi], and
    never so few that num_partitions of them miss keys (a guard: the host's sizing already covers max_context_len),
    rounded up to a multiple of part_round (see _decode_partitions)."""
    size = tl.minimum(tl.maximum(tl.cdiv(ctx, spread), part_lo), part_hi)
    size = tl.maximum(size, tl.cdiv(ctx, num_partitions))
    return tl.cdiv(size, part_round) * part_round


@triton.jit
def _decode_partial_kernel(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, gate, o, part_m, part_l, part_acc,
                           block_tables, context_lens, scale_log2, num_partitions, spread, part_lo, part_hi,
                           part_round, stride_qn, stride_qh,
                           stride_kb, stride_ks, stride_kh,
                           stride_vb, stride_vs, stride_vh, stride_gn, stride_gh, stride_on, stride_oh, stride_bt,
                           H: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr,
                           D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_GATE: tl.constexpr,
                           KV_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Grid (N, Hkv, P = num_partitions). Program (i, h, p) attends the G query heads of kv head h of sequence i over
    keys [p * S_i, (p + 1) * S_i) of its context, S_i = _partition_size(context_lens[i], ...): a short sequence splits
    into fewer partitions (the rest exit at once). Not SPLIT (P == 1): writes o directly, gate
    applied. SPLIT: writes the unnormalised part_acc [N, H, P, D] and part_m (log2 units), part_l [N, H, P], fp32."""
    pdl_start(USE_PDL)
    i_seq, i_kvh, i_part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(context_lens + i_seq).to(tl.int32)
    partition_size = _partition_size(ctx, num_partitions, spread, part_lo, part_hi, part_round)
    start = i_part * partition_size
    if start < ctx:
        end = tl.minimum(start + partition_size, ctx)
        o_h = tl.arange(0, BLOCK_H)
        o_d = tl.arange(0, D)
        o_head = i_kvh * G + o_h
        m_h = o_h < G
        i_seq64 = i_seq.to(tl.int64)
        b_q = tl.load(q + i_seq64 * stride_qn + o_head[:, None] * stride_qh + o_d[None, :], mask=m_h[:, None],
                      other=0.0)
        if KV_KIND == 0:
            b_q = b_q.to(k_cache.dtype.element_ty)
            b_qsum = tl.zeros([BLOCK_H], dtype=tl.float32)  # unused
        else:
            b_q, b_qsum = quant_query(b_q, KV_KIND)
        b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_H], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        p_block_table = block_tables + i_seq64 * stride_bt
        for n in range(start, end, BLOCK_N):
            o_n = n + tl.arange(0, BLOCK_N)
            m_n = o_n < end
            if KV_KIND == 0:
                b_m, b_l, b_acc = _attend_tile(b_q, b_m, b_l, b_acc, k_cache, v_cache, p_block_table, o_n, m_n,
                                               m_n[None, :], i_kvh, scale_log2, stride_kb, stride_ks, stride_kh,
                                               stride_vb, stride_vs, stride_vh, BS, D, DOT_PRECISION)
            else:
                b_m, b_l, b_acc = attend_tile_quant(b_q, b_qsum, b_m, b_l, b_acc, k_cache, v_cache, k_scale, v_scale,
                                                    k_zero, v_zero, p_block_table, o_n, m_n, m_n[None, :], i_kvh,
                                                    scale_log2, stride_kb, stride_ks, stride_kh, stride_vb,
                                                    stride_vs, stride_vh, BS, H // G, D, KV_KIND, DOT_PRECISION)
        if not SPLIT:
            b_o = b_acc / b_l[:, None]
            if HAS_GATE:
                b_g = tl.load(gate + i_seq64 * stride_gn + o_head[:, None] * stride_gh + o_d[None, :],
                              mask=m_h[:, None], other=0.0).to(tl.float32)
                b_o = b_o * tl.sigmoid(b_g)
            p_o = o + i_seq64 * stride_on + o_head[:, None] * stride_oh + o_d[None, :]
            tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_h[:, None])
        else:
            o_ml = (i_seq64 * H + o_head) * num_partitions + i_part
            tl.store(part_m + o_ml, b_m, mask=m_h)
            tl.store(part_l + o_ml, b_l, mask=m_h)
            tl.store(part_acc + o_ml[:, None] * D + o_d[None, :], b_acc, mask=m_h[:, None])
    elif not SPLIT:
        # empty context (a padded row): the output is zeros, never left unwritten (SPLIT: the reduce writes them)
        o_h = tl.arange(0, BLOCK_H)
        o_d = tl.arange(0, D)
        p_o = o + i_seq.to(tl.int64) * stride_on + (i_kvh * G + o_h)[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, tl.zeros([BLOCK_H, D], dtype=tl.float32).to(p_o.dtype.element_ty), mask=(o_h < G)[:, None])


@triton.jit
def _decode_reduce_kernel(o, gate, part_m, part_l, part_acc, context_lens, num_partitions, spread, part_lo, part_hi,
                          part_round,
                          stride_on, stride_oh, stride_gn, stride_gh,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, HAS_GATE: tl.constexpr,
                          USE_PDL: tl.constexpr = False):
    """Grid (N, H): merge the partitions of one (sequence, head):
    o = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, then the gate."""
    pdl_start(USE_PDL)
    i_seq, i_h = tl.program_id(0), tl.program_id(1)
    ctx = tl.load(context_lens + i_seq).to(tl.int32)
    num_parts = tl.cdiv(ctx, _partition_size(ctx, num_partitions, spread, part_lo, part_hi, part_round))
    o_ml = (i_seq.to(tl.int64) * H + i_h) * num_partitions
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < num_parts
    b_mp = tl.load(part_m + o_ml + o_p, mask=m_p, other=float("-inf"))
    b_max = tl.maximum(tl.max(b_mp, 0), -1e30)  # finite even for an empty context: no -inf - -inf
    b_lsum = tl.sum(tl.exp2(b_mp - b_max) * tl.load(part_l + o_ml + o_p, mask=m_p, other=0.0), 0)
    o_d = tl.arange(0, D)
    b_acc = tl.zeros([D], dtype=tl.float32)
    for i_p in range(0, num_parts):
        b_wp = tl.exp2(tl.load(part_m + o_ml + i_p) - b_max)
        b_acc += b_wp * tl.load(part_acc + (o_ml + i_p) * D + o_d)
    b_o = b_acc / tl.where(b_lsum > 0, b_lsum, 1.0)  # empty context: zeros
    if HAS_GATE:
        b_g = tl.load(gate + i_seq.to(tl.int64) * stride_gn + i_h * stride_gh + o_d).to(tl.float32)
        b_o = b_o * tl.sigmoid(b_g)
    p_o = o + i_seq.to(tl.int64) * stride_on + i_h * stride_oh + o_d
    tl.store(p_o, b_o.to(p_o.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------------- wrappers
def _check_cache(k_cache: Cache, v_cache: Cache) -> tuple[int, int, int, int]:
    """-> (NB, BS, Hkv, D) after checking the two caches agree and D is contiguous."""
    if isinstance(k_cache, QuantizedKV):
        nb, bs, hkv, d = check_quant_cache(k_cache, v_cache)
    else:
        if isinstance(v_cache, QuantizedKV):
            raise ValueError("k_cache and v_cache must both be tensors or both QuantizedKV")
        if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                             "[num_blocks, block_size, Hkv, D]")
        if k_cache.dtype != v_cache.dtype:
            raise ValueError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache need a contiguous last (head_dim) axis")
        nb, bs, hkv, d = k_cache.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    return nb, bs, hkv, d


def _check_q(name: str, q: torch.Tensor, hkv: int, d: int) -> tuple[int, int]:
    """-> (rows, H) after checking q [rows, H, D] with H a multiple of Hkv."""
    if q.dim() != 3 or q.shape[2] != d or q.stride(-1) != 1:
        raise ValueError(f"{name} {tuple(q.shape)} must be [rows, H, {d}] with a contiguous last axis")
    if q.shape[1] % hkv:
        raise ValueError(f"H={q.shape[1]} query heads not divisible by Hkv={hkv} kv heads")
    return q.shape[0], q.shape[1]


def _check_gate(gate: torch.Tensor | None, q: torch.Tensor) -> None:
    if gate is not None and (gate.shape != q.shape or gate.stride(-1) != 1 or gate.device != q.device):
        raise ValueError(f"gate {tuple(gate.shape)} must match q {tuple(q.shape)} with a contiguous last axis")


def _check_block_n(block_n: int, device: torch.device) -> int:
    if block_n & (block_n - 1) or (device.type == "cuda" and block_n < 16):
        raise ValueError(f"block_n {block_n} must be a power of two, >= 16 on a GPU (tl.dot operand width)")
    return block_n


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1 or out.device != q.device:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match q {tuple(q.shape)} {q.dtype}, last axis "
                         "contiguous")
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 caches: exact products (tests), not TF32


def _cache_args(k_cache: Cache, v_cache: Cache, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], dict]:
    """-> (k data, v data, [k_scale, v_scale, k_zero, v_zero], constexprs KV_KIND and DOT_PRECISION) for the
    attention kernels. The matmuls run in the cache dtype for a 16-bit cache, in q's dtype for a quantized one;
    a 16-bit cache stands in for the four unused scale / zero pointers."""
    if isinstance(k_cache, QuantizedKV):
        return (*code_args(k_cache, v_cache), quant_pointer_args(k_cache, v_cache),
                dict(KV_KIND=KV_KIND[k_cache.kind], DOT_PRECISION=_dot_precision(q.dtype)))
    return k_cache, v_cache, [k_cache] * 4, dict(KV_KIND=0, DOT_PRECISION=_dot_precision(k_cache.dtype))


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: Cache, v_cache: Cache,
                    slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] any float dtype; caches: [NB, BS, Hkv, D]; slot_mapping: [T] int32/int64 flat position
    (block * BS + offset), -1: skip -> in place, cast to the cache dtype (a QuantizedKV: quantized per token and
    kv head, as kv_quant.quantize_kv). One launch for K and V, no host sync."""
    _, bs, hkv, d = _check_cache(k_cache, v_cache)
    t = k.shape[0]
    for name, x in (("k", k), ("v", v)):
        if x.shape != (t, hkv, d) or x.stride(-1) != 1:
            raise ValueError(f"{name} {tuple(x.shape)} must be [T={t}, Hkv={hkv}, D={d}] with a contiguous last axis")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [T={t}]")
    if t == 0:
        return
    if isinstance(k_cache, QuantizedKV):  # contiguous: checked by _check_cache
        store_kv_quant(k, v, k_cache, v_cache, slot_mapping)
        return
    for c in (k_cache, v_cache):
        if c.stride(0) != bs * c.stride(1):
            raise ValueError("caches must be contiguous over (block, offset): a slot indexes [NB * BS] rows")
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
                           HKV=hkv, D=d, BLOCK_HKV=triton.next_power_of_2(hkv), num_warps=4, **pdl_args(k))


def _prefill_tiles(query_lens: list[int], context_lens_cpu: list[int], block_q: int) -> torch.Tensor:
    """-> [num_tiles, 2] int32 (sequence, q-tile index) on the host, the tiles with the most keys first (causal:
    a sequence's last tiles are its longest), so stragglers do not trail the grid."""
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    n_tiles = (q_lens + block_q - 1) // block_q
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), n_tiles)
    first = torch.repeat_interleave(n_tiles.cumsum(0) - n_tiles, n_tiles)
    tile = torch.arange(seq.numel()) - first
    kv_end = torch.tensor(context_lens_cpu, dtype=torch.int64)[seq] - q_lens[seq] \
        + torch.minimum((tile + 1) * block_q, q_lens[seq])
    order = torch.argsort(kv_end, descending=True, stable=True)
    return torch.stack([seq[order], tile[order]], dim=1).to(torch.int32)


def _prefill_config(d: int, g: int) -> tuple[int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, num_warps, num_stages). D=256: a [64, 256] fp32 accumulator over 8 warps (64 regs a
    thread), Q 32 KiB + 2 stages of K and V 64-key tiles 128 KiB of shared memory: fits an H100 SM (228 KiB)."""
    block_m = max(64, triton.next_power_of_2(g))
    if d >= 256:
        return block_m, 64, 8, 2
    return block_m, 64, 4, 2


def paged_attention_prefill(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                            block_tables: torch.Tensor, cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, gate: torch.Tensor | None, query_lens: list[int],
                            context_lens_cpu: list[int], *, block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention over the paged KV cache (chunked prefill, mixed with decode rows).

    q: [T, H, D] (cast to the cache dtype for the matmuls); k_cache, v_cache: [NB, BS, Hkv, D] (or QuantizedKV);
    block_tables: [N, max_blocks] int32/int64; cu_seqlens: [N+1] int32/int64 (device); context_lens: [N] (device);
    gate: [T, H, D] or None; query_lens, context_lens_cpu: the same N lengths as host ints (tile count, checks)
    -> o: [T, H, D] in q's dtype (written into `out` when given), attn * sigmoid(gate) when gate is given.
    No host sync; one H2D copy (the tile table). block_m/block_n/num_warps/num_stages override the tile config."""
    _, bs, hkv, d = _check_cache(k_cache, v_cache)
    t, h = _check_q("q", q, hkv, d)
    _check_gate(gate, q)
    n = len(query_lens)
    if len(context_lens_cpu) != n or cu_seqlens.shape != (n + 1,) or context_lens.shape != (n,) \
            or block_tables.dim() != 2 or block_tables.shape[0] < n:
        raise ValueError(f"{n} query_lens need {n} context_lens_cpu, cu_seqlens [{n + 1}], context_lens [{n}] and "
                         f"block_tables [>={n}, max_blocks]; got {len(context_lens_cpu)}, "
                         f"{tuple(cu_seqlens.shape)}, {tuple(context_lens.shape)}, {tuple(block_tables.shape)}")
    if sum(query_lens) != t:
        raise ValueError(f"query_lens sum to {sum(query_lens)} but q has {t} rows")
    bad = [i for i, (ql, cl) in enumerate(zip(query_lens, context_lens_cpu)) if not 0 <= ql <= cl]
    if bad:
        raise ValueError(f"sequence {bad[0]}: query_len {query_lens[bad[0]]} must be in [0, context_len "
                         f"{context_lens_cpu[bad[0]]}] (store this step's KV before attention)")
    if n and max(context_lens_cpu) > block_tables.shape[1] * bs:
        raise ValueError(f"context {max(context_lens_cpu)} exceeds block_tables capacity {block_tables.shape[1] * bs}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables needs a contiguous last axis")
    o = _check_out(out, q)
    g = h // hkv
    cfg_m, cfg_n, cfg_w, cfg_s = _prefill_config(d, g)
    block_m, block_n = block_m or cfg_m, _check_block_n(block_n or cfg_n, q.device)
    if block_m < g or block_m & (block_m - 1):
        raise ValueError(f"block_m {block_m} must be a power of two >= the GQA group {g}")
    block_q = block_m // g
    tiles = _prefill_tiles(query_lens, context_lens_cpu, block_q)
    if tiles.shape[0] == 0:
        return o
    tiles = tiles.to(q.device, non_blocking=True)
    gate_arg = gate if gate is not None else q
    kc, vc, quant_args, kinds = _cache_args(k_cache, v_cache, q)
    _prefill_kernel[(tiles.shape[0] * hkv,)](
        q, kc, vc, *quant_args, gate_arg, o, block_tables, cu_seqlens, context_lens, tiles, scale * LOG2E,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), gate_arg.stride(0), gate_arg.stride(1),
        o.stride(0), o.stride(1), block_tables.stride(0),
        HKV=hkv, G=g, BS=bs, D=d, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, HAS_GATE=gate is not None,
        **kinds, num_warps=num_warps or cfg_w, num_stages=num_stages or cfg_s)
    return o


_NUM_SMS: dict[torch.device, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: behave as on an H100
    if device not in _NUM_SMS:
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[device]


_PARTITION_LO, _PARTITION_HI = 128, 2048  # keys a decode partition covers under automatic sizing
_PROGRAMS_PER_SM = 8  # automatic sizing aims the live grid at this many programs per SM


def _spread(n: int, hkv: int, device: torch.device) -> int:
    """Partitions a (sequence, kv head) aims at under automatic sizing: 8 programs per SM over the N * Hkv pairs."""
    return max(1, triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), n * hkv))


def _decode_partitions(n: int, hkv: int, max_context_len: int, block_n: int, device: torch.device,
                       partition_size: int | None) -> tuple[int, tuple[int, int, int, int]]:
    """-> (P, (spread, part_lo, part_hi, part_round)): the grid's partition count and what `_partition_size` sizes
    each sequence's partitions with, on the device, from its own context length (no host sync; a CUDA graph
    captured at a context bound still sizes by the real lengths).

    Automatic: a sequence of c keys splits into ~spread partitions of c / spread keys, clamped to [128 (two key tiles
    at least), 2048] and rounded to the key tile, so a batch fills the GPU whatever its lengths, a long context is cut
    into few long partitions (each program fills its load pipeline once) and a short one into short ones. P covers
    max_context_len at the sizes this allows; programs past a sequence's partitions exit at once. The partials cost
    ~G / partition size of the KV bytes. partition_size given: every sequence uses exactly that.
    Measured on an H200 (bench_attention.py, bf16 cache, against the former fixed 512 keys halved to fill the GPU):
    context 32k at batch 64 / 256 2131 -> 2010 / 8517 -> 7855 us, 8k at batch 256 2131 -> 2022 us, 8k at batch 64
    555 -> 559; 4096-key partitions were slower at batch 16 (629 against 534 us)."""
    if partition_size:
        return max(1, triton.cdiv(max_context_len, partition_size)), (1, partition_size, partition_size, 1)
    lo = max(_PARTITION_LO, 2 * block_n)
    hi = max(_PARTITION_HI, lo)
    spread = _spread(n, hkv, device)
    parts = min(triton.cdiv(max_context_len, lo), max(spread, triton.cdiv(max_context_len, hi)))
    return max(1, parts), (spread, lo, hi, block_n)


# Decode tile (block_n, num_warps, num_stages) at head_dim 256 per KV_KIND, from H200 sweeps at context 32k
# (benchmarks/kernels/bench_attention.py --kv-cache-dtype int8,int4,fp8 --sweep): int8 with 128-key tiles took batch
# 16 / 64 from 675 / 2566 us to 547 / 2065 us (the bf16 cache: 547 / 2093); fp8 (fp16 matmuls) 512 / 1926 us. int8
# under a 16-bit q runs triton_int8.py's kernel, whose sweep picked 64-key tiles of 3 stages (472 / 1834 us).
# The bf16 cache's short-partition tile runs 2 stages: H200, cold L2, 9B (Hkv 4) and 35B-A3B (Hkv 2) heads, batch
# 1 / 16 / 64 at contexts 1k / 4k / 16k (.peer/attn_small2.py), 3 -> 2 stages took e.g. batch 16 at 4k 83.1 -> 76.4 us,
# 35B-A3B batch 16 at 16k 151.4 -> 140.4, batch 64 at 4k 291.3 -> 274.8, batch 1 at 16k 37.4 -> 33.7; 4 of the 16
# cases were 1-3% slower (35B-A3B batch 1 at 16k 25.3 -> 26.1), batch 1 at 1k unchanged (12.3 us).
_DECODE_TILE_D256 = {0: (32, 4, 2), 1: (64, 4, 3), 2: (32, 4, 3), 3: (128, 4, 2)}
# ... and where the partitions will be long (>= 1024 keys): the bf16 cache in 64-key tiles of 2 stages took batch 16
# / 64 at 32k from 560 / 2060 to 534 / 2005 us (2048-key partitions). Short partitions keep the 32-key tile: nothing
# measured there favours the long one (batch-1 kernel timings are dominated by Triton's launch overhead).
_DECODE_TILE_D256_LONG = {0: (64, 4, 2)}


def _decode_tile(kind: int, d: int, n: int, hkv: int, max_context_len: int, device: torch.device
                 ) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) for a decode launch, from the partition length automatic sizing expects."""
    if d < 256:
        return 64, 4, 3
    expected = min(max(triton.cdiv(max_context_len, _spread(n, hkv, device)), _PARTITION_LO), _PARTITION_HI)
    if expected >= 1024 and kind in _DECODE_TILE_D256_LONG:
        return _DECODE_TILE_D256_LONG[kind]
    return _DECODE_TILE_D256[kind]


def paged_attention_decode(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           gate: torch.Tensor | None, max_context_len: int, *, partition_size: int | None = None,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flash-decoding (split-K) attention of one query token per sequence over the paged KV cache.

    q: [N, H, D] (row i is the last token of sequence i); k_cache, v_cache: [NB, BS, Hkv, D] (or QuantizedKV);
    block_tables: [N, max_blocks] int32/int64; context_lens: [N] int32/int64 (device; 0: padded row, output zeros);
    gate: [N, H, D] or None; max_context_len: host int >= every context_lens[i] (sets the partition grid; for CUDA
    graphs pass the capture bound) -> o: [N, H, D] in q's dtype (into `out` when given).
    One launch when a single partition covers max_context_len, else a partial kernel + a reduce (gate in the last
    one). No host sync. partition_size (default: per sequence, _decode_partitions) / block_n / num_warps /
    num_stages tune."""
    _, bs, hkv, d = _check_cache(k_cache, v_cache)
    n, h = _check_q("q", q, hkv, d)
    _check_gate(gate, q)
    if context_lens.shape != (n,) or block_tables.dim() != 2 or block_tables.shape[0] < n \
            or block_tables.stride(1) != 1:
        raise ValueError(f"q has {n} rows: context_lens must be [{n}] and block_tables [>={n}, max_blocks] with a "
                         f"contiguous last axis; got {tuple(context_lens.shape)}, {tuple(block_tables.shape)}")
    if max_context_len > block_tables.shape[1] * bs:
        raise ValueError(f"max_context_len {max_context_len} exceeds block_tables capacity "
                         f"{block_tables.shape[1] * bs}")
    o = _check_out(out, q)
    if n == 0:
        return o
    g = h // hkv
    kc, vc, quant_args, kinds = _cache_args(k_cache, v_cache, q)
    tile_n, tile_w, tile_s = _decode_tile(kinds["KV_KIND"], d, n, hkv, max_context_len, q.device)
    block_n = _check_block_n(block_n or tile_n, q.device)
    parts, sizing = _decode_partitions(n, hkv, max_context_len, block_n, q.device, partition_size)
    split = parts > 1
    gate_arg = gate if gate is not None else q
    if split:
        part_m = torch.empty((n, h, parts), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((n, h, parts, d), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = o  # unused
    kernel, flags = _decode_partial_kernel, kinds
    if kinds["KV_KIND"] == KV_KIND["int8"] and q.dtype != torch.float32:  # codes as int16 pairs (triton_int8.py)
        from .triton_int8 import decode_int8_partial_kernel as kernel

        kc, vc, flags = kc.view(torch.int16), vc.view(torch.int16), dict(USE_ASM=q.is_cuda)
    kernel[(n, hkv, parts)](
        q, kc, vc, *quant_args, gate_arg, o, part_m, part_l, part_acc, block_tables, context_lens, scale * LOG2E,
        parts, *sizing, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), gate_arg.stride(0), gate_arg.stride(1),
        o.stride(0), o.stride(1), block_tables.stride(0),
        H=h, G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), BS=bs, D=d, BLOCK_N=block_n, SPLIT=split,
        HAS_GATE=gate is not None, **flags, num_warps=num_warps or tile_w, num_stages=num_stages or tile_s,
        **pdl_args(q))
    if split:
        _decode_reduce_kernel[(n, h)](
            o, gate_arg, part_m, part_l, part_acc, context_lens, parts, *sizing, o.stride(0), o.stride(1),
            gate_arg.stride(0), gate_arg.stride(1), H=h, D=d, BLOCK_P=triton.next_power_of_2(parts),
            HAS_GATE=gate is not None, num_warps=4 if d >= 256 else 2, **pdl_args(o))
    return o


def paged_attention_varlen_triton(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                                  block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                                  scale: float, gate: torch.Tensor | None = None, *,
                                  cu_seqlens: torch.Tensor | None = None,
                                  context_lens_t: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for reference.paged_attention_varlen: decode kernel when every query_len is 1, else prefill.

    cu_seqlens [N+1], context_lens_t [N]: device copies of the lengths (e.g. ForwardBatch's); built with one
    non-blocking H2D copy each when omitted. Shapes and result as paged_attention_prefill."""
    if context_lens_t is None:
        context_lens_t = torch.tensor(context_lens, dtype=torch.int32).to(q.device, non_blocking=True)
    if query_lens and all(ql == 1 for ql in query_lens):
        return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens_t, scale, gate,
                                      max(context_lens))
    if cu_seqlens is None:
        cu = [0]
        for ql in query_lens:
            cu.append(cu[-1] + ql)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(q.device, non_blocking=True)
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens_t, scale, gate,
                                   query_lens, context_lens)
