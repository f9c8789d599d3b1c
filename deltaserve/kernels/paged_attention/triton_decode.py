"""Triton split-K (flash-decoding) attention of one query token per sequence over the paged KV cache.

What belongs here: the decode partial and reduce kernels, how a batch is cut into partitions (per sequence, on the
device, from its own length), the decode tile per cache kind, paged_attention_decode, and paged_attention_mixed (a
mixed step's decode rows here, its prefilling sequences in triton.py's kernel), and the split-K prefill's partitions
and reduce (prefill_partitions: few q tiles over long contexts). The layout, numerics, GQA
packing and the quantized caches are those of triton.py (its module docstring); triton_int8.py's kernel writes the
same partials, merged by the reduce kernel here.
"""
import functools

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from .triton import LOG2E, Cache, _attend_tile, _cache_args, _check_block_n, _check_cache, _check_gate, _check_out, \
    _check_q
from .triton_quant import KV_KIND, attend_tile_quant, quant_query


# Decode-launch integers that follow the batch (its sequence count sets `spread`, its contexts the partition count):
# not specialised on (== 1, % 16), so a mixed step's decode rows (any count, any length) reuse the kernels compiled
# for the CUDA-graph buckets and the warm-up instead of compiling a variant mid-run.
_RUNTIME_INTS = ("num_partitions", "spread")


@triton.jit
def _partition_size(ctx, num_partitions, spread, part_lo, part_hi, part_round):
    """Keys a decode partition of a sequence with ctx keys covers: ctx / spread clamped to [part_lo, part_hi], and
    never so few that num_partitions of them miss keys (a guard: the host's sizing already covers max_context_len),
    rounded up to a multiple of part_round (see _decode_partitions)."""
    size = tl.minimum(tl.maximum(tl.cdiv(ctx, spread), part_lo), part_hi)
    size = tl.maximum(size, tl.cdiv(ctx, num_partitions))
    return tl.cdiv(size, part_round) * part_round


@triton.jit(do_not_specialize=_RUNTIME_INTS)
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


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _decode_reduce_kernel(o, gate, part_m, part_l, part_acc, context_lens, num_partitions, spread, part_lo, part_hi,
                          part_round,
                          stride_on, stride_oh, stride_gn, stride_gh,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, HAS_GATE: tl.constexpr,
                          BP: tl.constexpr = 16, USE_PDL: tl.constexpr = False):
    """Grid (N, H): merge the partitions of one (sequence, head):
    o = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, then the gate. The partials are read BP partitions at a time
    as one [BP, D] tile: one load latency per partition in a serial loop cost ~4.5 us at batch 1 (~32 partitions)."""
    i_seq, i_h = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, D)
    ctx = tl.load(context_lens + i_seq).to(tl.int32)
    if HAS_GATE:  # before the PDL wait: the q projection wrote the gate launches ago (pdl.py), the partials not
        b_g = tl.load(gate + i_seq.to(tl.int64) * stride_gn + i_h * stride_gh + o_d).to(tl.float32)
    pdl_start(USE_PDL)
    num_parts = tl.cdiv(ctx, _partition_size(ctx, num_partitions, spread, part_lo, part_hi, part_round))
    o_ml = (i_seq.to(tl.int64) * H + i_h) * num_partitions
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < num_parts
    b_mp = tl.load(part_m + o_ml + o_p, mask=m_p, other=float("-inf"))
    b_max = tl.maximum(tl.max(b_mp, 0), -1e30)  # finite even for an empty context: no -inf - -inf
    b_lsum = tl.sum(tl.exp2(b_mp - b_max) * tl.load(part_l + o_ml + o_p, mask=m_p, other=0.0), 0)
    b_acc = tl.zeros([D], dtype=tl.float32)
    for p0 in range(0, num_parts, BP):
        o_pp = p0 + tl.arange(0, BP)
        m_pp = o_pp < num_parts
        b_wp = tl.exp2(tl.load(part_m + o_ml + o_pp, mask=m_pp, other=float("-inf")) - b_max)
        b_ap = tl.load(part_acc + (o_ml + o_pp)[:, None] * D + o_d[None, :], mask=m_pp[:, None], other=0.0)
        b_acc += tl.sum(b_wp[:, None] * b_ap, 0)
    b_o = b_acc / tl.where(b_lsum > 0, b_lsum, 1.0)  # empty context: zeros
    if HAS_GATE:
        b_o = b_o * tl.sigmoid(b_g)
    p_o = o + i_seq.to(tl.int64) * stride_on + i_h * stride_oh + o_d
    tl.store(p_o, b_o.to(p_o.dtype.element_ty))


_NUM_SMS: dict[torch.device, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: behave as on an H100
    if device not in _NUM_SMS:
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[device]


_PARTITION_LO, _PARTITION_HI = 128, 2048  # keys a decode partition covers under automatic sizing
_FEW_PAIRS = 16  # up to this many (sequence, kv head) pairs a partition may be as short as one key tile
_PROGRAMS_PER_SM = 8  # automatic sizing aims the live grid at this many programs per SM
_MAX_SPREAD = 64  # ... with at most this many partitions a (sequence, kv head): the reduce reads them all


def _spread(n: int, hkv: int, device: torch.device, whole_waves: bool = False) -> int:
    """Partitions a (sequence, kv head) aims at under automatic sizing: 8 programs per SM over the N * Hkv pairs, at
    most _MAX_SPREAD. whole_waves rounds down, so the grid stays within 8 programs per SM: the int8 kernel
    (triton_int8.py, 4 programs resident an SM) at 64 pairs ran 17 x 1952-key partitions in three waves, 2.06 waves
    of work. H200, 32k, 2048-key partitions given: batch 16 (Hkv 4) 414 -> 381 us, batch 32 (Hkv 2) 417 -> 392; the
    bf16 kernel lost with them (513 -> 520). With this rule, in the next call: batch 16 (Hkv 4) 361 us."""
    programs = _PROGRAMS_PER_SM * _num_sms(device)
    return max(1, min(_MAX_SPREAD, programs // (n * hkv) if whole_waves else triton.cdiv(programs, n * hkv)))


def _partition_lo(n: int, hkv: int, block_n: int) -> int:
    """The shortest automatic partition: one key tile for a grid of few (sequence, kv head) pairs, else
    _PARTITION_LO and two key tiles at least (see _decode_partitions)."""
    return block_n if n * hkv <= _FEW_PAIRS else max(_PARTITION_LO, 2 * block_n)


def _decode_partitions(n: int, hkv: int, max_context_len: int, block_n: int, device: torch.device,
                       partition_size: int | None, whole_waves: bool = False) -> tuple[int, tuple[int, int, int, int]]:
    """-> (P, (spread, part_lo, part_hi, part_round)): the grid's partition count and what `_partition_size` sizes
    each sequence's partitions with, on the device, from its own context length (no host sync; a CUDA graph
    captured at a context bound still sizes by the real lengths).

    Automatic: a sequence of c keys splits into ~spread partitions of c / spread keys (spread <= 64), clamped to
    [lo, 2048] and rounded to the key tile, so a batch fills the GPU whatever its lengths, a long context is cut
    into few long partitions (each program fills its load pipeline once) and a short one into short ones. lo is 128
    keys (two key tiles at least), or one key tile when the grid has at most 16 (sequence, kv head) pairs. P covers
    max_context_len at the sizes this allows; programs past a sequence's partitions exit at once. The partials cost
    ~G / partition size of the KV bytes. partition_size given: every sequence uses exactly that.
    Measured on an H200 (bench_attention.py, bf16 cache, against the former fixed 512 keys halved to fill the GPU):
    context 32k at batch 64 / 256 2131 -> 2010 / 8517 -> 7855 us, 8k at batch 256 2131 -> 2022 us, 8k at batch 64
    555 -> 559; 4096-key partitions were slower at batch 16 (629 against 534 us).
    One-tile partitions for few pairs and the 64 cap (H200, 2026-12-01, .peer/probe4.py: CUDA-graph replays over
    cache copies, 16 q heads, µs before -> after): Hkv 2 batch 1 at 1k 11.2 -> 7.6, at 4k 14.1 -> 13.6, batch 4 at 1k
    12.7 -> 10.7; Hkv 4 batch 1 at 1k 12.1 -> 8.9, at 32k 69 -> 55; batch 16 and 64 at 1k unchanged; Hkv 2 batch 1
    at 32k 42 -> 45 (the cap's 512-key partitions), the one case that lost. One-tile partitions for every batch had
    cost batch 16 at 1k 20.0 -> 22.8 (Hkv 2) and 28.6 -> 31.0 (Hkv 4), hence the pairs bound."""
    if partition_size:
        return max(1, triton.cdiv(max_context_len, partition_size)), (1, partition_size, partition_size, 1)
    lo = _partition_lo(n, hkv, block_n)
    hi = max(_PARTITION_HI, lo)
    spread = _spread(n, hkv, device, whole_waves)
    parts = min(triton.cdiv(max_context_len, lo), max(spread, triton.cdiv(max_context_len, hi)))
    return max(1, parts), (spread, lo, hi, block_n)


# Split-K prefill: a grid of at most half an SM's worth of (q tile, kv head) programs (a short chunk after a long
# cached prefix: 100 queries at 32k keys are 16 programs of 128 rows, each walking all 32k keys) also cuts the keys
# into partitions, aiming at _SPLIT_PROGRAMS_PER_SM programs an SM, each partition _SPLIT_MIN_KEYS keys at least,
# while the fp32 partials stay under _SPLIT_MAX_BYTES; _decode_reduce_kernel merges them per (q row, head).
# H200, bf16 cache, head_dim 256, one sequence (.peer/pf_split.py, 2026-12-01), us one pass -> split: 16 q / 4 kv
# heads at 32k, 16 / 100 / 256 / 512 queries 1556 -> 111 / 1524 -> 229 / 1505 -> 506 / 1513 -> 872; at 4k 213 -> 113
# / 210 -> 93 / 207 -> 159 / 208 -> 139; 24 / 4 heads, 100 queries at 32k 1382 -> 333; 16 / 2, 100 at 32k 1320 ->
# 278. Grids of 100-128 programs lost (24 / 4 heads, 512 queries at 4k 193 -> 247; 1024 queries 211 -> 226).
_SPLIT_PROGRAMS_PER_SM, _SPLIT_MIN_KEYS, _SPLIT_MAX_BYTES = 2, 1024, 64 << 20


def prefill_partitions(programs: int, max_keys: int, block_n: int, t: int, h: int, d: int, device: torch.device,
                       partitions: int | None) -> tuple[int, int]:
    """-> (P, keys a partition covers, a multiple of block_n) for `programs` (q tile, kv head) pairs over at most
    max_keys keys each; P = 1: no split. partitions given: that many (at most one per key tile)."""
    if partitions is None:
        sms = _num_sms(device)
        partitions = 1 if 2 * programs > sms else min(triton.cdiv(_SPLIT_PROGRAMS_PER_SM * sms, programs),
                                                       max_keys // _SPLIT_MIN_KEYS)
        if t * h * partitions * (d + 2) * 4 > _SPLIT_MAX_BYTES:
            partitions = 1
    if partitions <= 1:
        return 1, max_keys
    size = triton.cdiv(triton.cdiv(max_keys, partitions), block_n) * block_n
    return triton.cdiv(max_keys, size), size


@functools.lru_cache(maxsize=16)
def row_contexts_on(query_lens: tuple, context_lens_cpu: tuple, first_seq: int, device: torch.device
                    ) -> torch.Tensor:
    """-> [rows of sequences first_seq..] int32: the keys each q row sees (its position + 1), on the device."""
    rows = [c - n + j + 1 for n, c in zip(query_lens[first_seq:], context_lens_cpu[first_seq:]) for j in range(n)]
    rows = torch.tensor(rows, dtype=torch.int32)
    return (rows.pin_memory() if device.type == "cuda" else rows).to(device, non_blocking=True)


def reduce_prefill_partitions(o: torch.Tensor, gate: torch.Tensor | None, parts: tuple, row_contexts: torch.Tensor,
                              size: int) -> None:
    """Merge the split prefill's partials (part_m, part_l, part_acc) of the last len(row_contexts) q rows into o."""
    part_m, part_l, part_acc = parts
    t, h, p = part_m.shape
    first = t - row_contexts.shape[0]
    gate_arg = (gate if gate is not None else o)[first:]
    _decode_reduce_kernel[(t - first, h)](
        o[first:], gate_arg, part_m[first:], part_l[first:], part_acc[first:], row_contexts, p, 1, size, size, 1,
        o.stride(0), o.stride(1), gate_arg.stride(0), gate_arg.stride(1), H=h, D=o.shape[2],
        BLOCK_P=triton.next_power_of_2(p), HAS_GATE=gate is not None, num_warps=4 if o.shape[2] >= 256 else 2)


# Decode tile (block_n, num_warps, num_stages) at head_dim 256 per KV_KIND, from H200 sweeps at context 32k
# (benchmarks/kernels/bench_attention.py --kv-cache-dtype int8,int4,fp8 --sweep): fp8 (fp16 matmuls) in 128-key tiles
# 512 / 1926 us at batch 16 / 64 (the bf16 cache: 547 / 2093).
# The bf16 cache's short-partition tile runs 2 stages: H200, cold L2, 9B (Hkv 4) and 35B-A3B (Hkv 2) heads, batch
# 1 / 16 / 64 at contexts 1k / 4k / 16k (.peer/attn_small2.py), 3 -> 2 stages took e.g. batch 16 at 4k 83.1 -> 76.4 us,
# 35B-A3B batch 16 at 16k 151.4 -> 140.4, batch 64 at 4k 291.3 -> 274.8, batch 1 at 16k 37.4 -> 33.7; 4 of the 16
# cases were 1-3% slower (35B-A3B batch 1 at 16k 25.3 -> 26.1), batch 1 at 1k unchanged (12.3 us).
# int8 under a 16-bit q runs triton_int8.py's kernel: 32-key tiles of 4 warps and 2 stages fit 128 registers (4
# programs an SM; 64-key tiles need 222-233). H200, 16 q heads, us against 64-key tiles of 3 stages: Hkv 4 at 32k
# batch 4 / 8 / 64: 106 / 193 / 1521 against 127 / 219 / 1646; at 4k batch 4 / 16 / 64: 26 / 60 / 205 against
# 37 / 74 / 222; at 1k batch 16 / 64: 20 / 62 against 26 / 74; Hkv 2 likewise. The 64-key tile was ahead at batch
# 16 at 32k with Hkv 4 (406 against 416) and where few pairs have long partitions (below).
_DECODE_TILE_D256 = {0: (32, 4, 2), 1: (32, 4, 2), 2: (32, 4, 3), 3: (128, 4, 2)}
# ... and where the partitions will be long (>= 1024 keys): the bf16 cache in 64-key tiles of 2 stages took batch 16
# / 64 at 32k from 560 / 2060 to 534 / 2005 us (2048-key partitions). Short partitions keep the 32-key tile: nothing
# measured there favours the long one (batch-1 kernel timings are dominated by Triton's launch overhead).
# int4 (triton_quant's step) in 128-key tiles of 2 stages: batch 16 / 64 at 32k 615.7 / 2407.6 against 711.7 / 2498.2
# in 32-key tiles of 3 stages (bf16 KV 502.4 / 1953.3: int4 decodes slower than bf16 KV; H200, 2026-12-01).
_DECODE_TILE_D256_LONG = {0: (64, 4, 2), 2: (128, 4, 2)}
# ... and for at most 4 (sequence, kv head) pairs in partitions of >= 512 keys (one sequence at 32k: 512-key
# partitions), where the grid is small and each program's latency is the time: int8 batch 1 at 32k 38.4 us (Hkv 4)
# and 30.5 (Hkv 2) against 44.9 and 32.5 in 32-key tiles; at 4k (64-key partitions) the 32-key tile stays ahead.
_DECODE_TILE_D256_FEW_LONG = {1: (64, 4, 3)}


def _decode_tile(kind: int, d: int, n: int, hkv: int, max_context_len: int, device: torch.device,
                 whole_waves: bool = False) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) for a decode launch, from the partition length automatic sizing expects."""
    if d < 256:
        return 64, 4, 3
    expected = min(max(triton.cdiv(max_context_len, _spread(n, hkv, device, whole_waves)), _partition_lo(n, hkv, 32)),
                   _PARTITION_HI)
    if expected >= 1024 and kind in _DECODE_TILE_D256_LONG:
        return _DECODE_TILE_D256_LONG[kind]
    if n * hkv <= 4 and expected >= 512 and kind in _DECODE_TILE_D256_FEW_LONG:
        return _DECODE_TILE_D256_FEW_LONG[kind]
    return _DECODE_TILE_D256[kind]


def paged_attention_decode(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           gate: torch.Tensor | None, max_context_len: int, *, partition_size: int | None = None,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, out: torch.Tensor | None = None,
                           short_tiles: bool = False) -> torch.Tensor:
    """Flash-decoding (split-K) attention of one query token per sequence over the paged KV cache.

    q: [N, H, D] (row i is the last token of sequence i); k_cache, v_cache: [NB, BS, Hkv, D] (or QuantizedKV);
    block_tables: [N, max_blocks] int32/int64; context_lens: [N] int32/int64 (device; 0: padded row, output zeros);
    gate: [N, H, D] or None; max_context_len: host int >= every context_lens[i] (sets the partition grid; for CUDA
    graphs pass the capture bound) -> o: [N, H, D] in q's dtype (into `out` when given).
    One launch when a single partition covers max_context_len, else a partial kernel + a reduce (gate in the last
    one). No host sync. partition_size (default: per sequence, _decode_partitions) / block_n / num_warps /
    num_stages tune; short_tiles: the short-partition tile whatever the partitions (paged_attention_mixed)."""
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
    int8_kernel = kinds["KV_KIND"] == KV_KIND["int8"] and q.dtype != torch.float32  # triton_int8.py
    tile_n, tile_w, tile_s = _decode_tile(kinds["KV_KIND"], d, n, hkv, 0 if short_tiles else max_context_len,
                                          q.device, int8_kernel)
    block_n = _check_block_n(block_n or tile_n, q.device)
    parts, sizing = _decode_partitions(n, hkv, max_context_len, block_n, q.device, partition_size, int8_kernel)
    split = parts > 1
    gate_arg = gate if gate is not None else q
    if split:
        part_m = torch.empty((n, h, parts), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((n, h, parts, d), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = o  # unused
    kernel, flags = _decode_partial_kernel, kinds
    if int8_kernel:
        from .triton_int8 import decode_int8_partial_kernel as kernel

        vc, flags = vc.view(torch.int16), dict(USE_ASM=q.is_cuda)
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


def paged_attention_mixed(q: torch.Tensor, k_cache: Cache, v_cache: Cache, block_tables: torch.Tensor,
                          cu_seqlens: torch.Tensor, context_lens: torch.Tensor, scale: float,
                          gate: torch.Tensor | None, query_lens: list[int], context_lens_cpu: list[int],
                          decode_rows: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """A mixed step: its leading `decode_rows` sequences feed one query each and take the split-K decode kernels, the
    others the varlen prefill kernel, each writing its rows of one output.

    Why: the prefill kernel gives a one-token sequence a whole BLOCK_M-row tile (32 tokens x G heads) with G live rows
    and scans its whole context with it. H200, 9B heads, bf16 cache (.peer/mixed_ab.py, 64-row prefill tiles then):
    368 decode rows at 1.1k keys beside 16 x 1024 prefilling tokens 1805 -> 1469 us, 64 rows at 8k beside a
    2048-token chunk 1139 -> 775, 16 rows at 32k beside 512 tokens 1758 -> 731.
    Both launches see the whole batch's tensors from row 0 (the decode rows are a prefix, the prefill kernel skips
    them by its tile table), so no argument is a slice at an odd offset, which Triton would specialise (16-byte
    alignment) and compile anew in the middle of a run; the decode rows take the short-partition tile whatever their
    count, one variant the engine's warm-up compiles.
    q, gate: [T, H, D]; block_tables [N, max_blocks], cu_seqlens [N+1], context_lens [N] (device); query_lens,
    context_lens_cpu: N host ints, the first decode_rows of query_lens 1 -> o [T, H, D] in q's dtype (into `out`)."""
    from .triton import paged_attention_prefill

    d = decode_rows
    n = len(query_lens)
    if not 0 <= d <= n or any(ql != 1 for ql in query_lens[:d]):
        raise ValueError(f"decode_rows {d} must count leading one-token sequences of the {n} (query_lens "
                         f"{query_lens[:d + 1]}...)")
    o = _check_out(out, q)
    if d:
        paged_attention_decode(q[:d], k_cache, v_cache, block_tables[:d], context_lens[:d], scale,
                               None if gate is None else gate[:d], max(context_lens_cpu[:d]), out=o[:d],
                               short_tiles=True)
    if d < n:
        paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, gate, query_lens,
                                context_lens_cpu, first_seq=d, out=o)
    return o
