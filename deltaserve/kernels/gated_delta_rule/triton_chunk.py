"""Triton chunked (WY) gated delta rule over a flat varlen batch with a state pool: the prefill / mixed-batch path.

Four kernels, one launch each, no host sync (the (sequence, chunk) tables come from the host list `query_lens`):
  0. `_chunk_diag_kernel`   grid (chunks, HV, 4): one 16-token sub-block each: gating g/beta from raw a/b (beta and
     the in-chunk cumsum G written out), l2norm of k (written out once per key head as kn, for the later kernels), the
     diagonal block A_jj = strictly_lower(beta k k^T exp(G_i - G_j)) and its inverse (I + A_jj)^-1, to T_diag: forward
     substitution in its two 8x8 diagonal blocks side by side, then one merge.
  1. `_chunk_solve_kernel`  grid (chunks, HV): the off-diagonal 16x16 blocks of A, merged with the diagonal inverses
     into T = (I + A)^-1 (16 -> 64), written as T_inv.
  2. `_chunk_scores_kernel` grid (chunks, HK): qn = scale q / |q| and the causal intra-chunk scores
     A_qk = causal(qn kn^T exp(G_i - G_j)) of each value head (one qn kn^T product per key head).
  3. `_chunk_state_output_kernel` grid (V-tiles, HV, sequences): serial over a sequence's chunks with the state h in
     fp32 registers: v_new = T (beta (v - exp(G) kn h)) (the WY form's u - w h, with w = T (beta exp(G) kn) and
     u = T (beta v) never formed), o = (qn h) exp(G) + A_qk v_new, h <- h exp(G_last) + (kn exp(G_last - G))^T
     v_new; gathers the initial state from the pool at its slot and scatters the final one back (slot -1: zero
     initial state, no write). The chunk-start states never go to memory: fla saves them ([chunks, HV, K, V], twice
     the bytes of v) and reads them back in an output kernel, as this file did until 2026-11-30 (ChunkLaunchConfig's
     docstring has the A/B timings).
Intermediates (kn, qn, T_inv, A_qk; h, beta (v - exp(G) kn h) and v_new as dot operands) are rounded to the input
dtype and feed bf16 tensor-core dots, as fla does; every accumulation, the state and the triangular solve (fp32 FMAs
in the diagonal blocks, "tf32x3" dots merging them) are fp32, and beta scales k k^T after the product. Against the
fp32 reference that costs ~4e-3 relative RMS on o and ~3e-3 on states at K=V=128 (tf32 operands for the state
update and output would give ~3e-3 / ~2.4e-3: not worth the slower dots). The chunk is fixed at 64 tokens (four
16-token sub-blocks unrolled in kernel 1). Exponentials use natural base throughout. Offsets are int32 except pool
slots: T * HV * max(K, V, 64) must stay below 2**31 (the wrapper checks).
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..varlen import output_buffer
from .reference import STATE_DTYPES

BT = 64  # tokens per chunk
BC = 16  # sub-block of the triangular solve
MAX_SNAPSHOTS = 2  # states a sequence's state pass may also write to other slots (the prefix cache's stops)
SEQ_COLUMNS = 2 + 2 * MAX_SNAPSHOTS  # of the seq table: first token, end token, (snapshot chunk, slot) pairs
_SEQ_COLUMNS_K = tl.constexpr(SEQ_COLUMNS)


@dataclass(frozen=True)
class ChunkLaunchConfig:
    """Launch parameters of the prefill kernels. Defaults: the best value of each kernel's own parameter in
    `bench_gdn.py --sweep` (H100 2026-11-28, then H200 2026-11-29; one parameter at a time: the kernels run one
    after the other, so their choices do not interact). H100, 1x16k / 16x1k ms: solve (then prep) warps 4->2
    2.11/1.90 -> 1.98/1.79; the old output kernel's V-tile 64->128 2.10/1.91 -> 2.01/1.82. H200, the solve kernel at
    4 warps: 1.16 / 1.04 / 1.06 -> 1.50 / 1.37 / 1.39 ms at 1x16k / 4x4k / 16x1k.
    Tried and dropped (H200, 2026-11-28): inverting the diagonal blocks by repeated squaring, (I + X)(I + X^2)
    (I + X^4)(I + X^8) with X = -A, six dots instead of fifteen dependent ones, took 1.77/1.43 -> 1.40/1.07 ms, but
    with correlated keys and beta near 1 the powers of X reach ~3e3 and w's error grows to 3e-4..1e-3 (substitution:
    ~1e-6), and the bf16 prompt-logprob parity test's max went 0.0945 -> 0.0990 (over its 0.0950 bar). (H200,
    2026-11-29): the four diagonal substitutions in one loop, to interleave their chains: no faster (1.161 / 1.044 /
    1.055 ms against 1.160 / 1.044 / 1.055) with more spills. The solve kernel inverting only the diagonal blocks
    D (102 registers, no spills) and the w/u kernel merging them as T = (I - N + N^2 - N^3) D, N = D L (four 64x64
    "tf32x3" products, o within 3e-5): 1.235 / 1.119 / 1.141 ms at 4 warps (1.61 / 1.50 / 1.52 at 8) against
    1.156 / 1.042 / 1.058. (H200, 2026-11-30) The substitutions moved to a kernel of their own, one 16-token block a
    program (78 registers at 1 warp, so ~32 programs an SM hide each block's 14-step chain of dependent loads and
    reductions; the single solve kernel held 255 registers, 4 programs an SM), the merges staying in the solve kernel
    (222 registers at 1 warp): T_inv, o and states bit for bit the same, device time 1.100 / 0.988 / 1.010 ->
    0.928 / 0.818 / 0.838 ms (diag 120 us + solve 85 us, against 414 us for the single kernel). Probed then in the
    diag kernel and not kept: the carried cumsum from one [64] gating of the chunk instead of one per earlier block
    (120.9 -> 117.7 us, no longer bit for bit), the substitution's rows picked out of registers instead of re-read
    from T_diag (120.0), 2 warps (138). (H200, 2026-11-30, later) The state pass computing the output as well, from
    the chunk-start state in its registers, where the state kernel saved it ([chunks, HV, K, V] bf16: 268 MB at 16k
    tokens, written then read) and v_new for a separate output kernel: o, states bit for bit the same, device time
    0.904 / 0.792 / 0.808 -> 0.833 / 0.725 / 0.749 ms (state 328 + output 219 us -> scores 121 + state-and-output
    355 at 1x16k; 213 + 221 -> 122 + 245 at 4x4k); fla 1.119 / 1.133 / 1.176 in the same run. Computing qn and the
    scores inside the serial loop instead of in a kernel of their own: 1.32 / 1.08 / 1.10 ms; in the w/u kernel:
    that kernel 151 -> 282 us. (H200, 2026-11-30, two probes, not kept; o and states were bit for bit the same in
    both.) The solve and w/u kernels as one, T kept in registers as its ten 16x16 blocks and w, u summed a 16-row block
    at a time (T_inv never written): 940 / 294 / 368 / 613 us at 1 / 2 / 4 / 8 warps against 85 + 152 for the two.
    The state pass of each segment of the batch on a side stream while the main one prepares the next segment (a
    sequence cut between segments carrying its fp32 state): under CUDA graphs, 1x16k 0.833 ms in one pass against
    0.988 / 0.867 / 0.819 with segments of 1024 / 2048 / 4096 tokens, 1x32k 1.694 against 2.063 / 1.773 / 1.643, 4x4k
    0.719 against 0.914 / 0.851 / 0.816 (eager launches: 3.19 / 1.69 / 0.90 ms at 1x16k, host-bound); the
    preparation kernels' thousands of programs leave the serial pass no room to run beside them, and the scalar
    branch choosing carry or pool slowed the serial pass by 5% (354 -> 371 us) where unused. (H200, 2026-11-30,
    later) The w/u kernel dropped: the serial pass takes v_new = T (beta (v - exp(G) kn h)), one more (64 x 64) dot on
    its chain (kn h, T r, kn^T v_new instead of w h, kn^T v_new), reading T_inv, v and beta (8 + 4 KB a step at 32
    columns) where it read w and u (16 + 4 KB), and w, u (2 x 134 MB bf16 at 16k tokens) are no longer written or
    read. Device time, the w/u kernel's tree against this one in one call: 1x16k 0.791 -> 0.700 ms, 2x8k 0.675 ->
    0.552, 4x4k 0.680 -> 0.556, 16x1k 0.709 -> 0.585, 64x256 0.802 -> 0.677 (serial pass 352 -> 412 us at 1x16k,
    269 -> 296 at 16x1k; w/u 151 us gone); fla 1.123 / 1.131 / 1.176 ms at 1x16k / 4x4k / 16x1k in that call. Against
    the fp32 reference (bf16 inputs, 2 781 tokens) o / states 4.18e-3 / 3.17e-3 -> 4.07e-3 / 2.87e-3 relative RMS
    (1.45e-2 / 1.41e-2 -> 1.33e-2 / 1.21e-2 with correlated keys, beta ~ 1 and weak decay). The state tile's defaults
    stayed best (1x16k: 32 columns at 3 or 4 stages 0.700 / 0.699 ms, 64 at 3 0.810; 4x4k and 16x1k: 64 at 3 stages
    0.556 / 0.585, 32 at 2 0.643 / 0.649)."""
    # the diag kernel's substitution runs in diagonal blocks of diag_sub rows side by side (16, 8 or 4), merged up to
    # 16 (_invert_unit_lower). H200, 2026-11-30, the diag kernel at 1 warp / the whole prefill at 1x16k / 4x4k /
    # 16x1k: 16 (14 dependent steps) 120 us / 0.820 / 0.708 / 0.734 ms; 8 (6 steps, one merge) 93 us / 0.794 / 0.682
    # / 0.707; 4 (2 steps, two merges) 94 us / 0.794 / 0.682 / 0.707; at 2 warps 137-154 us. Against the fp32
    # reference (bf16 inputs, 2 781 tokens) o and states kept their relative errors (4.23e-3 / 3.24e-3; 1.41e-2 /
    # 1.37e-2 with correlated keys, beta ~ 1 and weak decay, where o moved by at most 9.8e-4 from the 16-row solve)
    diag_sub: int = 8
    diag_warps: int = 1       # the run below: 2 warps 0.946 / 0.836 / 0.854 ms, 4: 1.051 / 0.943 / 0.960
    solve_warps: int = 1      # H200, 1x16k / 4x4k / 16x1k: 2 warps 0.990 / 0.878 / 0.897 ms, 1: 0.928 / 0.818 / 0.838
    scores_warps: int = 8     # H200, 1x16k / 4x4k / 16x1k: 2 warps 0.834 / 0.712 / 0.738 ms, 4: 0.833 / 0.725 / 0.749,
    # 8: 0.821 / 0.712 / 0.738
    # V-tile and pipeline stages of the serial state-and-output pass; None: 64 and 3, or 32 and 3 where 64 would leave
    # SMs idle (few long sequences). H200, 2026-11-30, ms at 1x16k / 4x4k / 16x1k (whole prefill, 4 warps): 64, 3
    # stages 0.949 / 0.724 / 0.749; 64, 2 1.136 / 0.851 / 0.847; 32, 3 0.832 / 0.844 / 0.874; 8 warps at 64, 3:
    # 1.167 / 0.834 / 0.859. (Before the output moved in: 64, 2 stages was best where SMs were full.) A later sweep at
    # 1x16k over V-tile 16 / 32 / 64 x warps 1 / 2 / 4 / 8 x stages 2 / 3 / 4 (same card and day): 32, 4 warps, 3 stages
    # stays best (0.820 ms); the best 16-wide tile 1.110 (4 warps, 3 stages); 4 stages at 4 or 8 warps exceed shared
    # memory; 1 or 2 warps 1.46 ms and slower.
    state_block_v: int | None = None
    state_warps: int = 4
    state_stages: int | None = None
    # fp32 products merging the solve's diagonal blocks, "ieee" or "tf32x3" (three tf32 products, ~fp32 accurate):
    # H200, 1x16k / 16x1k 1.43 / 1.17 -> 1.39 / 1.12 ms, o unchanged at the printed digits (1.46e-3 from the
    # previous kernels either way)
    merge_precision: str = "tf32x3"


@triton.jit
def _gate(a, b, A_log, dt_bias, o_t, m_t, s_a, s_b, i_h):
    """g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b) for tokens o_t of value head i_h: both [BC] fp32,
    zero on masked tokens (zero g decays nothing, zero beta writes nothing)."""
    b_x = tl.load(a + o_t * s_a + i_h, mask=m_t, other=0).to(tl.float32) + tl.load(dt_bias + i_h).to(tl.float32)
    # torch's softplus threshold: linear above 20 (and exp() of a large x never reaches the result)
    b_sp = tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
    b_g = tl.where(m_t, -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_sp, 0.0)
    b_b = tl.load(b + o_t * s_b + i_h, mask=m_t, other=0).to(tl.float32)
    b_beta = tl.where(m_t, 1.0 / (1.0 + tl.exp(-b_b)), 0.0)
    return b_g, b_beta


@triton.jit
def _load_rows_l2norm(p, o_t, m_t, s_t, o_d, m_d):
    """Rows o_t of a [T, D] view (token stride s_t, dense D) -> fp32 [rows, BD], each row x * rsqrt(sum x^2 + 1e-6)."""
    b_x = tl.load(p + o_t[:, None] * s_t + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0).to(tl.float32)
    return b_x * (1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) + 1e-6))[:, None]


@triton.jit
def _kkt_block(b_k_i, b_k_j, b_beta_i, b_G_i, b_G_j, BC: tl.constexpr, DIAG: tl.constexpr):
    """A_ij = beta_i (k_i k_j^T) exp(G_i - G_j) for one [BC, BC] block of model-dtype rows: beta scales the fp32
    product, not a rounded beta k operand. DIAG keeps only the strictly lower part."""
    b_A = tl.dot(b_k_i, tl.trans(b_k_j)) * b_beta_i[:, None]
    b_d = b_G_i[:, None] - b_G_j[None, :]
    if DIAG:
        o_i = tl.arange(0, BC)
        m_low = o_i[:, None] > o_i[None, :]
        # mask the exponent first: above the diagonal G_i - G_j > 0 and exp() could overflow
        b_A = tl.where(m_low, b_A * tl.exp(tl.where(m_low, b_d, 0.0)), 0.0)
    else:
        b_A = b_A * tl.exp(b_d)
    return b_A


@triton.jit
def _invert_unit_lower(b_A, p_rows, n_rows, s_row, BC: tl.constexpr, SUB: tl.constexpr, MERGE: tl.constexpr):
    """b_A: [BC, BC] fp32 strictly lower, its first n_rows rows also stored at p_rows (row stride s_row; the rest
    read as 0) -> (I + b_A)^-1. The SUB x SUB diagonal blocks are inverted side by side by forward substitution in
    fp32 FMAs, one row of each block per step, then merged pairwise up to BC (_merge_inverses). With X the strictly
    lower part of a block's inverse, X_i = -A_i + sum_{j<i} (-A_ij) X_j, as fla's solve does: row i is read back from
    memory (one load, where picking it out of the register tile takes a cross-thread reduction), multiplied into the
    finished rows above (one reduction) and written into X. Rows 0 and 1 of a block need no step (X_0 = 0,
    X_1 = -A_1). As X is block-diagonal, one load and one reduction serve every block: column c belongs to block
    c // SUB and carries that block's row (SUB - 2 steps instead of BC - 2)."""
    o_i = tl.arange(0, BC)
    b_X = tl.where((o_i[:, None] // SUB) == (o_i[None, :] // SUB), -b_A, 0.0)
    for i in range(2, SUB):
        o_row = i + (o_i // SUB) * SUB  # the row each column's block computes at this step
        b_a = -tl.load(p_rows + o_row * s_row + o_i, mask=(o_i % SUB < i) & (o_row < n_rows), other=0.0)
        b_a += tl.sum(b_a[:, None] * b_X, 0)
        b_X = tl.where(o_i[:, None] == o_row[None, :], b_a[None, :], b_X)
    b_T = b_X + tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    if SUB < BC // 2:
        b_T = _merge_inverses(b_T, b_A, SUB, BC, MERGE)
    if SUB < BC:
        b_T = _merge_inverses(b_T, b_A, BC // 2, BC, MERGE)
    return b_T


@triton.jit
def _merge_inverses(b_D, b_A, SIZE: tl.constexpr, BC: tl.constexpr, MERGE: tl.constexpr):
    """b_D: [BC, BC] block-diagonal, the inverses of (I + A)'s SIZE x SIZE diagonal blocks -> the inverses of its
    2 SIZE x 2 SIZE ones, D - D L D with L A's lower SIZE-block inside each of them ([[T0, 0], [-T1 A10 T0, T1]]), in
    fp32 products near full precision (MERGE "ieee" or "tf32x3")."""
    o_i = tl.arange(0, BC)
    m_L = ((o_i[:, None] // (2 * SIZE)) == (o_i[None, :] // (2 * SIZE))) & \
        ((o_i[:, None] // SIZE) != (o_i[None, :] // SIZE))
    b_LD = tl.dot(tl.where(m_L, b_A, 0.0), b_D, input_precision=MERGE)
    return b_D - tl.dot(b_D, b_LD, input_precision=MERGE)


@triton.jit
def _invert_diag_block(b_A, p_rows, r0, t1, s_row, BC: tl.constexpr, SUB: tl.constexpr, MERGE: tl.constexpr):
    """(I + A)^-1 of the diagonal block b_A [BC, BC] whose rows are tokens r0.. of a chunk ending at t1: A goes through
    the scratch rows p_rows (token stride s_row) so the substitution can read it back one row at a time; the barrier
    makes each thread's stores visible to the others (each block has rows of its own, so none is needed after)."""
    o_i = tl.arange(0, BC)
    tl.store(p_rows + (r0 + o_i)[:, None] * s_row + o_i[None, :], b_A, mask=(r0 + o_i < t1)[:, None])
    tl.debug_barrier()
    return _invert_unit_lower(b_A, p_rows + r0 * s_row, t1 - r0, s_row, BC, SUB, MERGE)


@triton.jit
def _chunk_bounds(chunk_table, i_c):
    """Token range [t0, t1) of chunk i_c (chunk_table: [chunks, 2] int32)."""
    return tl.load(chunk_table + 2 * i_c), tl.load(chunk_table + 2 * i_c + 1)


@triton.jit
def _chunk_diag_kernel(
    k, a, b, A_log, dt_bias, chunk_table, g_cum, beta, kn, T_diag,
    s_k, s_a, s_b,
    HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SUB: tl.constexpr,
    MERGE: tl.constexpr,
):
    """One 16-token sub-block i_j of chunk i_c, value head i_h. k: [T, HK, K] (token stride s_k); a, b: [T, HV];
    chunk_table: [chunks, 2] int32 token range [t0, t1) of each chunk. Writes the sub-block's rows of g_cum: [T, HV]
    fp32 (the in-chunk cumsum of g), of beta: [T, HV] fp32, of kn: [T, HK, K] (the l2-normalised k in the model
    dtype; the first value head of each key head writes it) and of T_diag: [T, HV, BC] fp32, the inverse (I + A_jj)^-1
    of its diagonal block (first written with A_jj, which the substitution reads back a row at a time)."""
    i_c, i_h, i_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kh = i_h // (HV // HK)
    t0, t1 = _chunk_bounds(chunk_table, i_c)
    o_c, o_k = tl.arange(0, BC), tl.arange(0, BK)
    m_k = o_k < K
    DT = kn.dtype.element_ty

    # the chunk's cumsum carried into this sub-block: one sum per earlier sub-block, added in order
    b_s = tl.zeros([BC], dtype=tl.float32)
    for jj in range(0, i_j):
        o_tp = t0 + jj * BC + o_c
        b_gp, _ = _gate(a, b, A_log, dt_bias, o_tp, o_tp < t1, s_a, s_b, i_h)
        b_s += tl.sum(b_gp, 0)
    r0 = t0 + i_j * BC
    o_t = r0 + o_c
    m_t = o_t < t1
    b_g, b_beta = _gate(a, b, A_log, dt_bias, o_t, m_t, s_a, s_b, i_h)
    b_G = tl.cumsum(b_g, 0) + b_s
    tl.store(g_cum + o_t * HV + i_h, b_G, mask=m_t)
    tl.store(beta + o_t * HV + i_h, b_beta, mask=m_t)

    m_first = (tl.zeros([BC], dtype=tl.int32) + i_h % (HV // HK)) == 0
    b_kd = _load_rows_l2norm(k + i_kh * K, o_t, m_t, s_k, o_k, m_k).to(DT)
    tl.store(kn + i_kh * K + o_t[:, None] * (HK * K) + o_k[None, :], b_kd, mask=(m_t & m_first)[:, None] & m_k[None, :])

    p_T = T_diag + i_h * BC
    b_T = _invert_diag_block(_kkt_block(b_kd, b_kd, b_beta, b_G, b_G, BC, True), p_T, r0, t1, HV * BC, BC, SUB,
                             MERGE)
    tl.debug_barrier()  # every row of A is read before the inverse overwrites it
    tl.store(p_T + o_t[:, None] * (HV * BC) + o_c[None, :], b_T, mask=m_t[:, None])


@triton.jit
def _load_diag_inverse(T_diag, o_t, m_t, i_h, HV: tl.constexpr, BC: tl.constexpr):
    """A sub-block's [BC, BC] fp32 diagonal inverse from T_diag: [T, HV, BC] (rows past the chunk read as 0)."""
    return tl.load(T_diag + (o_t[:, None] * HV + i_h) * BC + tl.arange(0, BC)[None, :], mask=m_t[:, None], other=0.0)


@triton.jit
def _chunk_solve_kernel(
    kn, a, b, A_log, dt_bias, chunk_table, g_cum, T_diag, T_inv,
    s_a, s_b,
    HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, MERGE: tl.constexpr,
):
    """T = (I + A)^-1 of chunk i_c, value head i_h, from its diagonal inverses (T_diag, _chunk_diag_kernel's) and the
    off-diagonal blocks of A = strictly_lower(beta kn kn^T exp(G_i - G_j)). kn: [T, HK, K] normalised k (dense);
    g_cum: [T, HV] fp32. Writes T_inv: [T, HV, BT], token t's row of its chunk's T in the model dtype (the blocks
    above the diagonal are not written)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_kh = i_h // (HV // HK)
    t0, t1 = _chunk_bounds(chunk_table, i_c)
    o_c, o_k = tl.arange(0, BC), tl.arange(0, BK)
    m_k = o_k < K
    DT = kn.dtype.element_ty

    o_t0, o_t1, o_t2, o_t3 = t0 + o_c, t0 + BC + o_c, t0 + 2 * BC + o_c, t0 + 3 * BC + o_c
    m_t0, m_t1, m_t2, m_t3 = o_t0 < t1, o_t1 < t1, o_t2 < t1, o_t3 < t1
    _, b_beta1 = _gate(a, b, A_log, dt_bias, o_t1, m_t1, s_a, s_b, i_h)
    _, b_beta2 = _gate(a, b, A_log, dt_bias, o_t2, m_t2, s_a, s_b, i_h)
    _, b_beta3 = _gate(a, b, A_log, dt_bias, o_t3, m_t3, s_a, s_b, i_h)
    # rows past the chunk's end take its last token's G (as its cumsum carries it): exp(G_i - G_j) <= 1 there, where
    # a 0 would overflow and turn the merges' exact zeros into NaN
    b_G0 = tl.load(g_cum + tl.minimum(o_t0, t1 - 1) * HV + i_h)
    b_G1 = tl.load(g_cum + tl.minimum(o_t1, t1 - 1) * HV + i_h)
    b_G2 = tl.load(g_cum + tl.minimum(o_t2, t1 - 1) * HV + i_h)
    b_G3 = tl.load(g_cum + tl.minimum(o_t3, t1 - 1) * HV + i_h)
    p_kn = kn + i_kh * K + o_k[None, :]
    b_kd0 = tl.load(p_kn + o_t0[:, None] * (HK * K), mask=m_t0[:, None] & m_k[None, :], other=0)
    b_kd1 = tl.load(p_kn + o_t1[:, None] * (HK * K), mask=m_t1[:, None] & m_k[None, :], other=0)
    b_kd2 = tl.load(p_kn + o_t2[:, None] * (HK * K), mask=m_t2[:, None] & m_k[None, :], other=0)
    b_kd3 = tl.load(p_kn + o_t3[:, None] * (HK * K), mask=m_t3[:, None] & m_k[None, :], other=0)
    b_A10 = _kkt_block(b_kd1, b_kd0, b_beta1, b_G1, b_G0, BC, False)
    b_A20 = _kkt_block(b_kd2, b_kd0, b_beta2, b_G2, b_G0, BC, False)
    b_A21 = _kkt_block(b_kd2, b_kd1, b_beta2, b_G2, b_G1, BC, False)
    b_A30 = _kkt_block(b_kd3, b_kd0, b_beta3, b_G3, b_G0, BC, False)
    b_A31 = _kkt_block(b_kd3, b_kd1, b_beta3, b_G3, b_G1, BC, False)
    b_A32 = _kkt_block(b_kd3, b_kd2, b_beta3, b_G3, b_G2, BC, False)
    b_T00 = _load_diag_inverse(T_diag, o_t0, m_t0, i_h, HV, BC)
    b_T11 = _load_diag_inverse(T_diag, o_t1, m_t1, i_h, HV, BC)
    b_T22 = _load_diag_inverse(T_diag, o_t2, m_t2, i_h, HV, BC)
    b_T33 = _load_diag_inverse(T_diag, o_t3, m_t3, i_h, HV, BC)
    # T_ij = -T_ii sum_{j<=m<i} A_im T_mj, in fp32 products near full precision (MERGE "ieee" or "tf32x3", never
    # plain tf32): the solve amplifies rounding
    b_T10 = -tl.dot(b_T11, tl.dot(b_A10, b_T00, input_precision=MERGE), input_precision=MERGE)
    b_T21 = -tl.dot(b_T22, tl.dot(b_A21, b_T11, input_precision=MERGE), input_precision=MERGE)
    b_T32 = -tl.dot(b_T33, tl.dot(b_A32, b_T22, input_precision=MERGE), input_precision=MERGE)
    b_S = tl.dot(b_A20, b_T00, input_precision=MERGE)
    b_T20 = -tl.dot(b_T22, tl.dot(b_A21, b_T10, b_S, input_precision=MERGE), input_precision=MERGE)
    b_S = tl.dot(b_A31, b_T11, input_precision=MERGE)
    b_T31 = -tl.dot(b_T33, tl.dot(b_A32, b_T21, b_S, input_precision=MERGE), input_precision=MERGE)
    b_S = tl.dot(b_A31, b_T10, tl.dot(b_A30, b_T00, input_precision=MERGE), input_precision=MERGE)
    b_T30 = -tl.dot(b_T33, tl.dot(b_A32, b_T20, b_S, input_precision=MERGE), input_precision=MERGE)

    p_T = T_inv + i_h * BT + o_c[None, :]
    tl.store(p_T + o_t0[:, None] * (HV * BT), b_T00.to(DT), mask=m_t0[:, None])
    tl.store(p_T + o_t1[:, None] * (HV * BT), b_T10.to(DT), mask=m_t1[:, None])
    tl.store(p_T + o_t1[:, None] * (HV * BT) + BC, b_T11.to(DT), mask=m_t1[:, None])
    tl.store(p_T + o_t2[:, None] * (HV * BT), b_T20.to(DT), mask=m_t2[:, None])
    tl.store(p_T + o_t2[:, None] * (HV * BT) + BC, b_T21.to(DT), mask=m_t2[:, None])
    tl.store(p_T + o_t2[:, None] * (HV * BT) + 2 * BC, b_T22.to(DT), mask=m_t2[:, None])
    tl.store(p_T + o_t3[:, None] * (HV * BT), b_T30.to(DT), mask=m_t3[:, None])
    tl.store(p_T + o_t3[:, None] * (HV * BT) + BC, b_T31.to(DT), mask=m_t3[:, None])
    tl.store(p_T + o_t3[:, None] * (HV * BT) + 2 * BC, b_T32.to(DT), mask=m_t3[:, None])
    tl.store(p_T + o_t3[:, None] * (HV * BT) + 3 * BC, b_T33.to(DT), mask=m_t3[:, None])


@triton.jit
def _chunk_tokens(chunk_table, i_c, BT: tl.constexpr):
    """Chunk i_c's positions o_i [BT], token offsets o_t = t0 + o_i and their mask o_t < t1 (chunk_table: [chunks, 2]
    int32 token ranges [t0, t1))."""
    t0, t1 = _chunk_bounds(chunk_table, i_c)
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    return o_i, o_t, o_t < t1


@triton.jit
def _chunk_scores_kernel(
    q, kn, g_cum, chunk_table, qn, A_qk,
    s_q, scale,
    HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    """The output's inputs that do not depend on the state, for chunk i_c and key head i_kh: qn = scale q / |q| and,
    for each of the key head's value heads, the causal intra-chunk scores A_qk = causal(qn kn^T exp(G_i - G_j)) (one
    qn kn^T product for all of them). q: [T, HK, K] raw (token stride s_q); kn: [T, HK, K] normalised k (dense).
    Writes qn: [T, HK, K]; A_qk: [T, HV, BT]."""
    i_c, i_kh = tl.program_id(0), tl.program_id(1)
    o_i, o_t, m_t = _chunk_tokens(chunk_table, i_c, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    DT = qn.dtype.element_ty

    b_q = (_load_rows_l2norm(q + i_kh * K, o_t, m_t, s_q, o_k, m_k) * scale).to(DT)
    tl.store(qn + (o_t[:, None] * HK + i_kh) * K + o_k[None, :], b_q, mask=m_t[:, None] & m_k[None, :])
    b_kt = tl.load(kn + (o_t[None, :] * HK + i_kh) * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0)
    b_S = tl.dot(b_q, b_kt)
    m_causal = o_i[:, None] >= o_i[None, :]
    for i_r in range(0, HV // HK):
        i_h = i_kh * (HV // HK) + i_r
        b_G = tl.load(g_cum + o_t * HV + i_h, mask=m_t, other=0)
        b_A = tl.where(m_causal, b_S * tl.exp(tl.where(m_causal, b_G[:, None] - b_G[None, :], 0.0)), 0.0)
        tl.store(A_qk + (o_t[:, None] * HV + i_h) * BT + o_i[None, :], b_A.to(DT), mask=m_t[:, None])


@triton.jit
def _chunk_state_output_kernel(
    qn, kn, v, beta, T_inv, A_qk, g_cum, state, slots, seq_table, o,
    s_v, s_state,
    HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SNAPSHOTS: tl.constexpr = False,
):
    """Serial pass over one sequence's chunks for one value head and V-tile, with the state h in fp32 registers:
    per chunk v_new = T (beta (v - exp(G) kn h)), the output o = (qn h) exp(G) + A_qk v_new, then h <- h exp(G_last)
    + (kn exp(G_last - G))^T v_new. qn, kn: [T, HK, K] normalised q (scaled) and k (dense); v: [T, HV, V] (token
    stride s_v); beta: [T, HV] fp32; T_inv: [T, HV, BT] each token's row of its chunk's T = (I + A)^-1 (the blocks
    above the diagonal unwritten, masked here); A_qk: [T, HV, BT] the causal intra-chunk scores; seq_table: [N, 6]
    int32 (first token, end token, then two (snapshot chunk, slot) pairs); state: [S, HV, K, V] fp32 pool (slot stride
    s_state), read and written at slots[i_n] unless -1, and at each snapshot slot given the (fp32, unrounded) state at
    the start of its chunk (prefix cache; chunk -1: none), when SNAPSHOTS (a step without snapshots compiles without the
    two stores: they cost the serial pass ~5% at 1x16k). Writes o: [T, HV, V]. Of each step's five dots (kn h and qn h,
    T r, then A_qk v_new and kn^T v_new) kn h, T r and kn^T v_new are on the chain from one chunk's h to the next. v_new
    is the WY form's u - w h with T applied last: w = T (beta exp(G) kn) and u = T (beta v) are never formed."""
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_kh = i_h // (HV // HK)
    bos = tl.load(seq_table + _SEQ_COLUMNS_K * i_n)
    eos = tl.load(seq_table + _SEQ_COLUMNS_K * i_n + 1)
    if SNAPSHOTS:
        snap_c0 = tl.load(seq_table + _SEQ_COLUMNS_K * i_n + 2)
        snap_slot0 = tl.maximum(tl.load(seq_table + _SEQ_COLUMNS_K * i_n + 3), 0).to(tl.int64)
        snap_c1 = tl.load(seq_table + _SEQ_COLUMNS_K * i_n + 4)
        snap_slot1 = tl.maximum(tl.load(seq_table + _SEQ_COLUMNS_K * i_n + 5), 0).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # slot -1 as a vector mask (a scalar bool in a mask trips the interpreter)
    m_live = m_kv & ((tl.zeros([BV], dtype=tl.int64) + slot) >= 0)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    DT = kn.dtype.element_ty

    # masked load, never a multiply by 0: a padding row's slot -1 (clamped to 0) may hold NaN
    p_state = state + tl.maximum(slot, 0) * s_state + i_h * (K * V) + o_kv
    b_h = tl.load(p_state, mask=m_live, other=0.0).to(tl.float32)  # fp32 or bf16 pool; fp32 in registers
    o_i = tl.arange(0, BT)
    if SNAPSHOTS:
        p_snap0 = state + snap_slot0 * s_state + i_h * (K * V) + o_kv
        p_snap1 = state + snap_slot1 * s_state + i_h * (K * V) + o_kv
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        o_t = t0 + o_i
        m_t = o_t < eos
        m_tv = m_t[:, None] & m_v[None, :]
        if SNAPSHOTS:  # vector masks (a scalar bool in a mask trips the interpreter), each true once at most
            b_i = tl.zeros([BV], dtype=tl.int32) + i_t
            tl.store(p_snap0, b_h.to(p_snap0.dtype.element_ty), mask=m_kv & (b_i == snap_c0)[None, :])
            tl.store(p_snap1, b_h.to(p_snap1.dtype.element_ty), mask=m_kv & (b_i == snap_c1)[None, :])
        m_tk = m_t[:, None] & m_k[None, :]
        b_T = tl.load(T_inv + (o_t[:, None] * HV + i_h) * BT + o_i[None, :],
                      mask=m_t[:, None] & (o_i[None, :] // BC <= o_i[:, None] // BC), other=0)
        b_vin = tl.load(v + o_t[:, None] * s_v + i_h * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)
        b_beta = tl.load(beta + o_t * HV + i_h, mask=m_t, other=0)
        b_q = tl.load(qn + (o_t[:, None] * HK + i_kh) * K + o_k[None, :], mask=m_tk, other=0)
        b_A = tl.load(A_qk + (o_t[:, None] * HV + i_h) * BT + o_i[None, :], mask=m_t[:, None], other=0)
        b_G = tl.load(g_cum + o_t * HV + i_h, mask=m_t, other=0)
        b_G_last = tl.load(g_cum + (tl.minimum(t0 + BT, eos) - 1) * HV + i_h)
        # k^T as loaded: a load that feeds a dot is one Triton's pipeliner prefetches
        b_kt = tl.load(kn + (o_t[None, :] * HK + i_kh) * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0)
        b_hd = b_h.to(DT)
        b_r = b_beta[:, None] * (b_vin - tl.exp(b_G)[:, None] * tl.dot(tl.trans(b_kt), b_hd))
        b_v = tl.dot(b_T, b_r.to(DT))
        b_vd = b_v.to(DT)
        b_o = tl.dot(b_q, b_hd) * tl.exp(b_G)[:, None] + tl.dot(b_A, b_vd)
        tl.store(o + (o_t[:, None] * HV + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)
        # masked tokens: b_v is 0 there (beta = 0, T's rows 0), so exp(G_last - 0) scales nothing
        b_v = b_v * tl.exp(b_G_last - b_G)[:, None]
        b_h = b_h * tl.exp(b_G_last) + tl.dot(b_kt, b_v.to(DT))
    tl.store(p_state, b_h.to(p_state.dtype.element_ty), mask=m_live)


@dataclass(frozen=True)
class ChunkTables:
    """Where each sequence and each 64-token chunk of a flat varlen batch lies; the same for every GDN layer of a
    forward step, so build it once per step (`build_chunk_tables`) and pass it to every layer."""
    seq_table: torch.Tensor    # [N, SEQ_COLUMNS] int32 on the device: first token, end token, then MAX_SNAPSHOTS
    # (chunk, slot) pairs (chunk -1: none)
    chunk_table: torch.Tensor  # [chunks, 2] int32 on the device: token range [t0, t1) of each chunk
    num_chunks: int            # host int: the grid size of the per-chunk kernels
    query_lens: tuple          # host copy of the lengths it was built from (checked against each call)
    snapshots: tuple = ()      # host copy of the snapshots it was built with


def build_chunk_tables(query_lens: list[int], device, snapshots: tuple = ()) -> ChunkTables:
    """Host-side (sequence, chunk) index tables from the host list of lengths: numpy, then one pinned async H2D copy;
    no device sync. ~30-50 us of CPU for tens to hundreds of sequences. snapshots: (sequence, token offset, slot)
    triples, the offset a multiple of the chunk inside the sequence's tokens: the state there goes to that slot."""
    lens = np.asarray(query_lens, dtype=np.int64).reshape(-1)
    ends = np.cumsum(lens)
    starts = ends - lens
    n_chunks = (lens + BT - 1) // BT
    first_chunk = np.cumsum(n_chunks) - n_chunks
    num_chunks = int(n_chunks.sum())
    seq_of_chunk = np.repeat(np.arange(lens.size), n_chunks)
    t0 = starts[seq_of_chunk] + (np.arange(num_chunks) - first_chunk[seq_of_chunk]) * BT
    t1 = np.minimum(t0 + BT, ends[seq_of_chunk])
    # the chunk table starts on a 16-byte boundary whatever N is: Triton specialises kernels on pointer alignment,
    # and an N-dependent one recompiled the prefill kernels (seconds) on a server's first multi-request step
    snaps = np.full((lens.size, MAX_SNAPSHOTS, 2), -1, dtype=np.int64)  # (chunk, slot) pairs
    taken = np.zeros(lens.size, dtype=np.int64)
    for i, offset, slot in snapshots:
        if offset % BT or not 0 < offset < lens[i] or taken[i] == MAX_SNAPSHOTS:
            raise ValueError(f"snapshot at token {offset} of a {lens[i]}-token sequence: at most {MAX_SNAPSHOTS} a "
                             f"sequence, at multiples of {BT} inside it")
        snaps[i, taken[i]] = offset // BT, slot
        taken[i] += 1
    seq_part = 4 * -(-SEQ_COLUMNS * lens.size // 4)
    packed = np.zeros(seq_part + 2 * num_chunks, dtype=np.int32)
    packed[: SEQ_COLUMNS * lens.size] = np.concatenate([np.stack([starts, ends], 1),
                                                        snaps.reshape(lens.size, -1)], 1).ravel()
    packed[seq_part:] = np.stack([t0, t1], 1).ravel()
    host = torch.from_numpy(packed)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()  # pageable memory would make the "async" copy wait for the host staging
    packed = host.to(device, non_blocking=True)
    return ChunkTables(packed[: SEQ_COLUMNS * lens.size].view(-1, SEQ_COLUMNS), packed[seq_part:].view(-1, 2),
                       num_chunks, tuple(int(n) for n in lens), tuple(snapshots))


def _pow2_block(n: int, cap: int | None = None) -> int:
    """Power-of-two block >= 16 (tl.dot's minimum) covering n, or cap if smaller."""
    block = max(16, triton.next_power_of_2(n))
    return block if cap is None else max(16, min(block, triton.next_power_of_2(cap)))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _state_tile(V: int, HV: int, N: int, device: torch.device) -> tuple[int, int]:
    """The state pass's default (V-tile, stages): (64, 3), or (32, 3) when the (V-tiles x HV x N) programs at 64
    would leave many SMs idle: each program's chain over the chunks is then the whole time, and a narrower tile with a
    deeper prefetch shortens it. H200 (132 SMs), 9B shapes, whole prefill, 2026-11-30: 1x16k (64 programs at 64) 0.936
    ms at 64 against 0.820 at 32; 2x8k (128 programs) 0.709 against 0.825, where the rule was >= the SM count."""
    return (64, 3) if triton.cdiv(V, 64) * HV * N >= 0.9 * _sm_count(device) else (32, 3)


def _check_rows(name: str, t: torch.Tensor, dims: int) -> None:
    """t: [T, H, D] (dims=3) or [T, H] (dims=2) whose rows may be strided but each row must be dense."""
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims; got {tuple(t.shape)}")
    dense = t.stride(-1) == 1 and (dims == 2 or t.stride(1) == t.shape[2])
    if not dense:
        raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()}: each token's row must be dense "
                         "(heads x dim contiguous); call .contiguous() first")


def chunk_gated_delta_rule_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slots: torch.Tensor,
    query_lens: list[int],
    chunk_size: int = 64,
    config: ChunkLaunchConfig | None = None,
    tables: ChunkTables | None = None,
    snapshots: tuple = (),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked gated delta rule over a flat varlen batch, continuing from and updating each sequence's pooled state.

    Same semantics as `reference.gated_delta_rule_varlen`. q, k: [T, Hk, K] model dtype, NOT l2-normalised;
    v: [T, HV, V] same dtype (the token stride of q/k/v may be anything, e.g. views into the conv output, but each
    token's [H, D] row must be dense); a, b: [T, HV] raw projections (rows dense); A_log, dt_bias: [HV];
    state: [S, HV, K, V] fp32 pool, read at slots and written back IN PLACE; cu_seqlens: [N+1] (accepted for
    signature parity: query_lens is what the kernels use, and must agree with it); slots: [N] int32/int64,
    distinct except -1 (padding row: zero initial state, writes nothing); query_lens: host list of the N lengths;
    tables: `build_chunk_tables(query_lens, device, snapshots)` made once per forward step (built here when None);
    snapshots: (sequence, token offset, slot) triples: the state after that many of the sequence's tokens is also
    written to that slot of the pool (prefix cache), the offset a multiple of 64 inside the sequence; out: a
    contiguous [T, HV, V] tensor to write o into. Returns o: [T, HV, V] in v.dtype."""
    if chunk_size != BT:
        raise ValueError(f"chunk_size={chunk_size}: the Triton kernels are written for chunks of {BT} tokens")
    for name, t, dims in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("a", a, 2), ("b", b, 2)):
        _check_rows(name, t, dims)
    T, HK, K = q.shape
    HV, V = v.shape[1:]
    if k.shape != q.shape or v.shape[0] != T or HV % HK:
        raise ValueError(f"need q, k [T, Hk, K] and v [T, HV, V] with HV a multiple of Hk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if a.shape != (T, HV) or b.shape != (T, HV) or A_log.shape != (HV,) or dt_bias.shape != (HV,):
        raise ValueError(f"a, b must be [T={T}, HV={HV}] and A_log, dt_bias [HV]; got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, A_log {tuple(A_log.shape)}, dt_bias {tuple(dt_bias.shape)}")
    if state.dtype not in STATE_DTYPES or state.dim() != 4 or state.shape[1:] != (HV, K, V) or \
            state.stride()[1:] != (K * V, V, 1):
        raise ValueError(f"state must be an fp32/bf16 pool [S, HV={HV}, K={K}, V={V}] with dense [HV, K, V] slots; "
                         f"got {state.dtype} {tuple(state.shape)} strides {state.stride()}")
    if max(K, V) > 256:
        raise ValueError(f"head dims K={K}, V={V}: the kernels hold a whole K row in registers, at most 256")
    if len(query_lens) != slots.numel() or sum(query_lens) != T:
        raise ValueError(f"query_lens has {len(query_lens)} entries summing to {sum(query_lens)}; need one per slot "
                         f"({slots.numel()}) summing to T={T}")
    if T * HV * max(K, V, BT) >= 2**31:  # BT: T_inv's rows
        raise ValueError(f"T={T} tokens x HV={HV} x {max(K, V, BT)} overflows the kernels' int32 offsets; split the "
                         "batch")
    config = config or ChunkLaunchConfig()
    if config.merge_precision not in ("ieee", "tf32x3"):
        raise ValueError(f"merge_precision={config.merge_precision!r}: use 'ieee' or 'tf32x3' (plain tf32 is too "
                         "coarse for the triangular solve)")
    if config.diag_sub not in (4, 8, 16):
        raise ValueError(f"diag_sub={config.diag_sub}: use 4, 8 or 16")
    o = output_buffer(out, (T, HV, V), v.dtype, v.device)
    if T == 0:
        return o
    if tables is None:
        tables = build_chunk_tables(query_lens, v.device, snapshots)
    elif tables.query_lens != tuple(query_lens) or tables.seq_table.device != v.device or \
            tables.snapshots != tuple(snapshots):
        raise ValueError("tables were built for other query_lens, snapshots or device than this call's")
    seq_table, chunk_table, num_chunks = tables.seq_table, tables.chunk_table, tables.num_chunks
    BK = _pow2_block(K)
    A_log, dt_bias, slots = A_log.contiguous(), dt_bias.contiguous(), slots.contiguous()

    g_cum = torch.empty(T, HV, dtype=torch.float32, device=v.device)
    beta = torch.empty(T, HV, dtype=torch.float32, device=v.device)
    kn = torch.empty(T, HK, K, dtype=q.dtype, device=v.device)
    qn = torch.empty(T, HK, K, dtype=q.dtype, device=v.device)
    T_inv = torch.empty(T, HV, BT, dtype=q.dtype, device=v.device)
    A_qk = torch.empty(T, HV, BT, dtype=q.dtype, device=v.device)
    T_diag = torch.empty(T, HV, BC, dtype=torch.float32, device=v.device)
    _chunk_diag_kernel[(num_chunks, HV, BT // BC)](
        k, a, b, A_log, dt_bias, chunk_table, g_cum, beta, kn, T_diag,
        k.stride(0), a.stride(0), b.stride(0),
        HK=HK, HV=HV, K=K, BC=BC, BK=BK, SUB=config.diag_sub, MERGE=config.merge_precision,
        num_warps=config.diag_warps)
    _chunk_solve_kernel[(num_chunks, HV)](
        kn, a, b, A_log, dt_bias, chunk_table, g_cum, T_diag, T_inv,
        a.stride(0), b.stride(0),
        HK=HK, HV=HV, K=K, BT=BT, BC=BC, BK=BK, MERGE=config.merge_precision, num_warps=config.solve_warps)
    _chunk_scores_kernel[(num_chunks, HK)](
        q, kn, g_cum, chunk_table, qn, A_qk,
        q.stride(0), K ** -0.5,
        HK=HK, HV=HV, K=K, BT=BT, BK=BK, num_warps=config.scores_warps)
    block_v, stages = _state_tile(V, HV, len(query_lens), v.device)
    BV_state = _pow2_block(V, config.state_block_v or block_v)
    _chunk_state_output_kernel[(triton.cdiv(V, BV_state), HV, len(query_lens))](
        qn, kn, v, beta, T_inv, A_qk, g_cum, state, slots, seq_table, o,
        v.stride(0), state.stride(0),
        HK=HK, HV=HV, K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BV_state, SNAPSHOTS=bool(tables.snapshots),
        num_warps=config.state_warps, num_stages=config.state_stages or stages)
    return o
