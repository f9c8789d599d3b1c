"""Triton paged attention for the gated full-attention layers: KV store, varlen causal prefill (split-K decode:
triton_decode.py).

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
scores and probabilities; KV_KIND = 0 compiles exactly the 16-bit kernels. Prefill chunks of many queries attend over
a dequantized 16-bit copy of their contexts instead (triton_quant.dequantized_context: the 16-bit tiles are ~2.4x
faster, and the copy is one pass over the context).
"""
import functools

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from .kv_quant import QuantizedKV
from .triton_quant import (KV_KIND, attend_tile_quant, check_quant_cache, code_args, dequantized_context,
                           quant_pointer_args, quant_query, store_kv_quant)

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
                 BS: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
    """One online-softmax step over keys o_n [BLOCK_N] (m_n: key exists; m_s [ROWS, BLOCK_N]: row may see key).
    MASKED False: every key exists and every row sees it (m_n, m_s unused; unpredicated loads, no select).

    b_q [ROWS, D] cache dtype; b_m, b_l [ROWS] fp32 (running max in log2 units, running sum); b_acc [ROWS, D] fp32."""
    o_d = tl.arange(0, D)
    if MASKED:
        b_blk = tl.load(p_block_table + o_n // BS, mask=m_n, other=0).to(tl.int64)
    else:
        b_blk = tl.load(p_block_table + o_n // BS).to(tl.int64)
    o_k = b_blk * stride_kb + (o_n % BS) * stride_ks + i_kvh * stride_kh
    o_v = b_blk * stride_vb + (o_n % BS) * stride_vs + i_kvh * stride_vh
    if MASKED:
        b_kt = tl.load(k_cache + o_k[None, :] + o_d[:, None], mask=m_n[None, :], other=0.0)  # [D, BLOCK_N]
        b_v = tl.load(v_cache + o_v[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0)  # [BLOCK_N, D]
    else:
        b_kt = tl.load(k_cache + o_k[None, :] + o_d[:, None])
        b_v = tl.load(v_cache + o_v[:, None] + o_d[None, :])
    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        b_s = tl.where(m_s, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # every row sees a key of its first tile (prefill: key 0, decode: the partition start): b_m_new is finite
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def _prefill_kernel(q, k_cache, v_cache, k_scale, v_scale, k_zero, v_zero, gate, o, part_m, part_l, part_acc,
                    block_tables, cu_seqlens, context_lens, tile_table, scale_log2, part_size, num_partitions,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_gt, stride_gh, stride_ot, stride_oh, stride_bt,
                    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GATE: tl.constexpr,
                    SPLIT: tl.constexpr, KV_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (num q tiles * Hkv, partitions), the kv heads of a tile adjacent (tiles come heaviest first). A program
    takes BLOCK_Q query tokens of one sequence x the G heads of kv head i_kvh: BLOCK_M >= BLOCK_Q * G rows.
    SPLIT: partition i_part attends over keys [i_part * part_size, + part_size) only and writes triton_decode's
    partials by q row (part_m, part_l [T, H, P], part_acc [T, H, P, D]), which its reduce kernel merges and gates;
    a row whose position is before the partition sees none of its keys, and the reduce never reads that partial."""
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
    k_lo = 0
    if SPLIT:
        k_lo = tl.program_id(1) * part_size
        kv_end = tl.minimum(kv_end, k_lo + part_size)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    p_block_table = block_tables + i_seq.to(tl.int64) * stride_bt
    # whole key tiles at or before the tile's first query, which every row sees: no masks (the 16-bit cache)
    full_end = k_lo
    if KV_KIND == 0:
        full_end = tl.maximum(tl.minimum(ctx - q_len + i_qtile * BLOCK_Q + 1, kv_end) // BLOCK_N * BLOCK_N, k_lo)
        for start in range(k_lo, full_end, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            b_m, b_l, b_acc = _attend_tile(b_q, b_m, b_l, b_acc, k_cache, v_cache, p_block_table, o_n, o_n, o_n,
                                           i_kvh, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                           stride_vh, BS, D, DOT_PRECISION, MASKED=False)
    # the rest (the causal diagonal, the context's end; all of a quantized cache's keys). Not pipelined for the 16-bit
    # cache: a second set of stage buffers would not fit in shared memory beside the first loop's
    for start in tl.range(full_end, kv_end, BLOCK_N, num_stages=1 if KV_KIND == 0 else None):
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
    if SPLIT:  # k_lo >= kv_end (no key of the tile's in this partition) stores partials nobody reads
        o_ml = (o_row_t * H + o_head) * num_partitions + tl.program_id(1)
        tl.store(part_m + o_ml, b_m, mask=m_row)
        tl.store(part_l + o_ml, b_l, mask=m_row)
        tl.store(part_acc + o_ml[:, None] * D + o_d[None, :], b_acc, mask=m_row[:, None])
    else:
        b_o = b_acc / b_l[:, None]
        if HAS_GATE:
            b_g = tl.load(gate + o_row_t[:, None] * stride_gt + o_head[:, None] * stride_gh + o_d[None, :],
                          mask=m_row[:, None], other=0.0).to(tl.float32)
            b_o = b_o * tl.sigmoid(b_g)
        p_o = o + o_row_t[:, None] * stride_ot + o_head[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_row[:, None])


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


def _cache_args(k_cache: Cache, v_cache: Cache, q: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], dict]:
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


def _prefill_tiles(query_lens: list[int], context_lens_cpu: list[int], block_q: int, first_seq: int = 0
                   ) -> torch.Tensor:
    """-> [num_tiles, 2] int32 (sequence, q-tile index) on the host for sequences first_seq.., the tiles with the most
    keys first (causal: a sequence's last tiles are its longest), so stragglers do not trail the grid."""
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    n_tiles = (q_lens + block_q - 1) // block_q
    n_tiles[:first_seq] = 0
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), n_tiles)
    first = torch.repeat_interleave(n_tiles.cumsum(0) - n_tiles, n_tiles)
    tile = torch.arange(seq.numel()) - first
    kv_end = torch.tensor(context_lens_cpu, dtype=torch.int64)[seq] - q_lens[seq] \
        + torch.minimum((tile + 1) * block_q, q_lens[seq])
    order = torch.argsort(kv_end, descending=True, stable=True)
    return torch.stack([seq[order], tile[order]], dim=1).to(torch.int32)


@functools.lru_cache(maxsize=16)
def _prefill_tiles_on(query_lens: tuple, context_lens_cpu: tuple, block_q: int, first_seq: int, device: torch.device
                      ) -> torch.Tensor:
    """_prefill_tiles on the device (a pinned async copy), made once for the shapes of a step: every attention layer
    of the step asks for the same table (read only, so a later step of the same shapes reuses it)."""
    tiles = _prefill_tiles(list(query_lens), list(context_lens_cpu), block_q, first_seq)
    if device.type == "cuda":
        tiles = tiles.pin_memory()
    return tiles.to(device, non_blocking=True)


def _prefill_config(d: int, g: int, kv_kind: int) -> tuple[int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, num_warps, num_stages). D=256, 16-bit cache: 128 rows over 8 warps, so each warpgroup's
    wgmma owns 64 whole rows (at 64 rows the two split every row's keys and head_dim, and the softmax statistics
    and P cross between them); Q 64 KiB + 2 stages of 64-key K and V tiles 128 KiB of shared memory. H200, Triton
    3.6 (benchmarks/kernels/bench_attention.py shapes, 9B heads, with the unmasked key tiles): 16x1024 / 1x8192 /
    1x16384 tokens 1098 / 3060 / 12325 us at (64, 64, 8, 2) -> 643 / 1485 / 5789 at (128, 64, 8, 2), 214 / 370 /
    380 TFLOP/s against torch SDPA flash's 268 / 292 / 308 in the same run; (64, 32, 4, 3) came next (667 / 1837 /
    6999), 4 warps at 128 rows spilled (2526 / 4420 / 16446). 27B (G 6) and 35B-A3B (G 8) heads gained as much (16x1024
    / 1x8192: 1772 / 4952 -> 982 / 2211 us and 1049 / 2892 -> 578 / 1304). Quantized caches, 2048 queries over a
    32k context, (64, 64, 8, 2) -> the best of three tiles: int8 12645 -> 7125 us and int4 13057 -> 7372 at
    (64, 32, 4, 3), fp8 12540 -> 7063 at (128, 64, 8, 2)."""
    block_m = max(64, triton.next_power_of_2(g))
    if d < 256:
        return block_m, 64, 4, 2
    if kv_kind in (1, 2):  # int8, int4
        return block_m, 32, 4, 3
    return max(128, block_m), 64, 8, 2


def _check_prefill_batch(t: int, bs: int, block_tables: torch.Tensor, cu_seqlens: torch.Tensor,
                         context_lens: torch.Tensor, query_lens: list[int], context_lens_cpu: list[int]) -> int:
    """-> N after checking the batch's lengths and tables against each other and q's T rows."""
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
    return n


def paged_attention_prefill(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                            block_tables: torch.Tensor, cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, gate: torch.Tensor | None, query_lens: list[int],
                            context_lens_cpu: list[int], *, first_seq: int = 0, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            dequantize: bool | None = None, partitions: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention over the paged KV cache (chunked prefill, mixed with decode rows).

    q: [T, H, D] (cast to the cache dtype for the matmuls); k_cache, v_cache: [NB, BS, Hkv, D] (or QuantizedKV);
    block_tables: [N, max_blocks] int32/int64; cu_seqlens: [N+1] int32/int64 (device); context_lens: [N] (device);
    gate: [T, H, D] or None; query_lens, context_lens_cpu: the same N lengths as host ints (tile count, checks)
    -> o: [T, H, D] in q's dtype (written into `out` when given), attn * sigmoid(gate) when gate is given.
    first_seq: only sequences first_seq.. are attended (the rows of the others are left as they are in `out`).
    No host sync; H2D copies of the tile table (and of the copy's block indices). block_m/block_n/num_warps/num_stages
    override the tile config. dequantize (a quantized cache): True attends over a dequantized copy of the contexts,
    False runs the quantized tile step, None picks (triton_quant.DEQUANT_MIN_QUERIES). partitions: split-K over the
    keys in that many partitions (None: triton_decode.prefill_partitions picks)."""
    _, bs, hkv, d = _check_cache(k_cache, v_cache)
    t, h = _check_q("q", q, hkv, d)
    _check_gate(gate, q)
    n = _check_prefill_batch(t, bs, block_tables, cu_seqlens, context_lens, query_lens, context_lens_cpu)
    o = _check_out(out, q)
    g = h // hkv
    if isinstance(k_cache, QuantizedKV) and first_seq < n:
        copy = dequantized_context(k_cache, v_cache, block_tables, query_lens, context_lens_cpu, first_seq,
                                   q.dtype, dequantize)
        if copy is not None:
            k_cache, v_cache, block_tables = copy
    kc, vc, quant_args, kinds = _cache_args(k_cache, v_cache, q)
    cfg_m, cfg_n, cfg_w, cfg_s = _prefill_config(d, g, kinds["KV_KIND"])
    block_m, block_n = block_m or cfg_m, _check_block_n(block_n or cfg_n, q.device)
    if block_m < g or block_m & (block_m - 1):
        raise ValueError(f"block_m {block_m} must be a power of two >= the GQA group {g}")
    block_q = block_m // g
    if not 0 <= first_seq <= n:
        raise ValueError(f"first_seq {first_seq} must be in [0, {n}]")
    tiles = _prefill_tiles_on(tuple(query_lens), tuple(context_lens_cpu), block_q, first_seq, q.device)
    if tiles.shape[0] == 0:
        return o
    gate_arg = gate if gate is not None else q
    from .triton_decode import prefill_partitions, reduce_prefill_partitions, row_contexts_on  # imports this module

    p, size = prefill_partitions(tiles.shape[0] * hkv, max(context_lens_cpu[first_seq:]), block_n, t, h, d,
                                 q.device, partitions)
    parts = (o, o, o)  # unused without a split
    if p > 1:  # m, l [T, H, P] and acc [T, H, P, D] of every q row (those before first_seq stay unwritten)
        parts = tuple(torch.empty(t, h, p, *extra, dtype=torch.float32, device=q.device) for extra in ((), (), (d,)))
    _prefill_kernel[(tiles.shape[0] * hkv, p)](
        q, kc, vc, *quant_args, gate_arg, o, *parts, block_tables, cu_seqlens, context_lens, tiles, scale * LOG2E,
        size, p, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), gate_arg.stride(0), gate_arg.stride(1),
        o.stride(0), o.stride(1), block_tables.stride(0), H=h, HKV=hkv, G=g, BS=bs, D=d, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_N=block_n, HAS_GATE=gate is not None, SPLIT=p > 1, **kinds,
        num_warps=num_warps or cfg_w, num_stages=num_stages or cfg_s)
    if p > 1:
        reduce_prefill_partitions(o, gate, parts, row_contexts_on(tuple(query_lens), tuple(context_lens_cpu),
                                                                  first_seq, q.device), size)
    return o


def paged_attention_varlen_triton(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                                  block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                                  scale: float, gate: torch.Tensor | None = None, *,
                                  cu_seqlens: torch.Tensor | None = None,
                                  context_lens_t: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for reference.paged_attention_varlen, dispatching as the engine does: the decode kernel when every
    query_len is 1, paged_attention_mixed when some leading ones are, else the prefill kernel.

    cu_seqlens [N+1], context_lens_t [N]: device copies of the lengths (e.g. ForwardBatch's); built with one
    non-blocking H2D copy each when omitted. Shapes and result as paged_attention_prefill."""
    if context_lens_t is None:
        context_lens_t = torch.tensor(context_lens, dtype=torch.int32).to(q.device, non_blocking=True)
    decode_rows = next((i for i, ql in enumerate(query_lens) if ql != 1), len(query_lens))
    if query_lens and decode_rows == len(query_lens):
        from .triton_decode import paged_attention_decode  # imports this module: loaded late

        return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens_t, scale, gate,
                                      max(context_lens))
    if cu_seqlens is None:
        cu = [0]
        for ql in query_lens:
            cu.append(cu[-1] + ql)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(q.device, non_blocking=True)
    if decode_rows:
        from .triton_decode import paged_attention_mixed

        return paged_attention_mixed(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens_t, scale, gate,
                                     query_lens, context_lens, decode_rows)
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens_t, scale, gate,
                                   query_lens, context_lens)
