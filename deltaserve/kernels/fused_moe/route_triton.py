"""Triton router: softmax over all E experts (fp32), top-k, renormalise, in ONE launch (one program per token).

Same math as reference.route_topk_softmax, which on CUDA costs five launches per MoE layer (softmax, the two kernels
of torch.topk, the sum and the division: ~15 us at batch 1 on an H200, this kernel 2.4 us). The k experts are picked
by k rounds of max over the probabilities, each taking the lowest expert id among equal maxima, so the ids come out
in descending weight order as torch.topk's do (torch leaves the order of equal values open). Padded lanes
(E < BLOCK_E) hold -1 and are never picked. HAS_SHARED: the shared expert joins as pair TOP_K (id E, weight
sigmoid(x . w_gate)), its gate computed in the same program (reference.route_with_shared_expert).

route_hidden_triton also computes the router's logits (x times the router Linear's weight) in the same launch, for
decode-sized batches: program (t, n) writes BLOCK_N of token t's logits (the last one the shared gate) into an fp32
scratch row and counts itself in on a per-token counter; the program that arrives last routes the row and puts the
counter back to 0. At T = 1 on an H200 the router GEMV (cuBLAS, 5.3 us) and this file's router (6.0 us) were the two
longest launches of a 35B-A3B MoE block after the expert GEMVs."""
import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start

MAX_EXPERTS = 4096  # one program holds a token's whole row of router logits


@triton.jit
def _softmax_topk(b_x, o_e, m_e, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """b_x [BLOCK_E] fp32 logits (padded lanes -inf) -> (weights [BLOCK_K] fp32 summing to 1 over the first TOP_K,
    ids [BLOCK_K] int32): softmax, k rounds of max (lowest id among equal maxima), renormalise.
    Each round is one reduction: a live lane's key is its probability's bits (a non-negative float orders as its
    int32 pattern) above BLOCK_E - 1 - id, so the largest key is the largest probability with the lowest id."""
    b_p = tl.exp(b_x - tl.max(b_x, axis=0))
    b_p = b_p / tl.sum(b_p, axis=0)
    b_key = (b_p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - o_e).to(tl.int64)
    b_key = tl.where(m_e, b_key, -1)
    o_k = tl.arange(0, BLOCK_K)
    b_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_id = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        b_max = tl.max(b_key, axis=0)
        b_lane = BLOCK_E - 1 - (b_max & 0xFFFFFFFF).to(tl.int32)
        # a NaN row can rank a padded lane first: clamp so a garbage row still names a real expert (no out-of-range
        # reads later)
        b_w = tl.where(o_k == j, (b_max >> 32).to(tl.int32).to(tl.float32, bitcast=True), b_w)
        b_id = tl.where(o_k == j, tl.minimum(b_lane, E - 1), b_id)
        b_key = tl.where(o_e == b_lane, -1, b_key)
    return b_w / tl.sum(b_w, axis=0), b_id


@triton.jit
def _gate_dot(p_x, w_gate, H, BLOCK_H: tl.constexpr):
    """x . w_gate over H (one token's row p_x, 16-bit) in fp32, rounded to x's dtype as the 16-bit Linear rounds."""
    o_h = tl.arange(0, BLOCK_H)
    b_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h in range(0, H, BLOCK_H):
        m_h = h + o_h < H
        b_acc += (tl.load(p_x + h + o_h, mask=m_h, other=0.0).to(tl.float32)
                  * tl.load(w_gate + h + o_h, mask=m_h, other=0.0).to(tl.float32))
    return tl.sum(b_acc, axis=0).to(p_x.dtype.element_ty).to(tl.float32)


@triton.jit
def _store_route(weights, ids, i_t, b_w, b_id, b_g, E, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_SHARED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """One token's row of weights / ids; HAS_SHARED: pair TOP_K is the shared expert (id E, weight sigmoid(b_g)
    rounded to OUT_DTYPE as torch.sigmoid rounds in x's dtype)."""
    o_k = tl.arange(0, BLOCK_K)
    if HAS_SHARED:
        b_w = tl.where(o_k == TOP_K, (1.0 / (1.0 + tl.exp(-b_g))).to(OUT_DTYPE).to(tl.float32), b_w)
        b_id = tl.where(o_k == TOP_K, E, b_id)
    width: tl.constexpr = TOP_K + HAS_SHARED
    m_k = o_k < width
    tl.store(weights + i_t * width + o_k, b_w, mask=m_k)
    tl.store(ids + i_t * width + o_k, b_id.to(tl.int64), mask=m_k)


@triton.jit
def _route_kernel(logits, weights, ids, x, w_gate, E, H, stride_lt, stride_xt, TOP_K: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr,
                  USE_PDL: tl.constexpr = False):
    """logits [T, E] (any float dtype) -> weights [T, TOP_K] fp32 (summing to 1), ids [T, TOP_K] int64.
    HAS_SHARED: x [T, H], w_gate [H] (16-bit); rows of TOP_K + 1, the last the shared expert's (id E)."""
    pdl_start(USE_PDL)
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_x = tl.load(logits + i_t * stride_lt + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
    b_w, b_id = _softmax_topk(b_x, o_e, m_e, E, TOP_K, BLOCK_E, BLOCK_K)
    b_g = 0.0
    if HAS_SHARED:
        b_g = _gate_dot(x + i_t * stride_xt, w_gate, H, BLOCK_H)
    _store_route(weights, ids, i_t, b_w, b_id, b_g, E, TOP_K, BLOCK_K, HAS_SHARED, x.dtype.element_ty)


@triton.jit
def _router_kernel(x, w_router, w_gate, scratch, counter, weights, ids, E, H, stride_xt, stride_we,
                   TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_SHARED: tl.constexpr, USE_PDL: tl.constexpr = False):
    """x [T, H] 16-bit (fp32 in the interpreter); w_router [E, H] (x's dtype); w_gate [H] -> weights / ids as
    _route_kernel. scratch [T, E + 1] fp32: the logits rounded to x's dtype (slot E: the shared gate's dot);
    counter [>= T] int32, zero on entry and on exit. Program (i_t, i_n): i_n < cdiv(E, BLOCK_N) a block of router
    rows, i_n == cdiv(E, BLOCK_N) the shared gate (HAS_SHARED)."""
    i_t, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_blocks = tl.cdiv(E, BLOCK_N)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < E  # none for the shared gate's program (i_n == n_blocks)
    o_h = tl.arange(0, BLOCK_H)
    # the first BLOCK_H columns of this program's router rows before the PDL wait (weights: no kernel writes them); at
    # decode sizes that is all of them (H <= BLOCK_H), loaded while the kernel before (the norm) still runs
    b_w0 = tl.load(w_router + o_n[:, None].to(tl.int64) * stride_we + o_h[None, :],
                   mask=m_n[:, None] & (o_h < H)[None, :], other=0.0)
    pdl_start(USE_PDL)
    p_x = x + i_t * stride_xt
    p_row = scratch + i_t * (E + 1)
    if i_n < n_blocks:
        b_acc = b_w0.to(tl.float32) * tl.load(p_x + o_h, mask=o_h < H, other=0.0).to(tl.float32)[None, :]
        for h in range(BLOCK_H, H, BLOCK_H):
            m_h = h + o_h < H
            b_x = tl.load(p_x + h + o_h, mask=m_h, other=0.0).to(tl.float32)
            b_w = tl.load(w_router + o_n[:, None].to(tl.int64) * stride_we + h + o_h[None, :],
                          mask=m_n[:, None] & m_h[None, :], other=0.0)
            b_acc += b_w.to(tl.float32) * b_x[None, :]
        b_logit = tl.sum(b_acc, axis=1).to(x.dtype.element_ty).to(tl.float32)  # rounded as the 16-bit Linear's
        tl.store(p_row + o_n, b_logit, mask=m_n)
    else:
        tl.store(p_row + E, _gate_dot(p_x, w_gate, H, BLOCK_H))
    tl.debug_barrier()  # every thread's stores of this program precede its count (release by the atomic below)
    arrived = tl.atomic_add(counter + i_t, 1, sem="acq_rel")
    if arrived == n_blocks + HAS_SHARED - 1:  # the token's last program: every logit is in the scratch row
        o_e = tl.arange(0, BLOCK_E)
        m_e = o_e < E
        # .cg: read at L2, where the other programs' stores are, never a stale L1 line
        b_x = tl.load(p_row + o_e, mask=m_e, other=float("-inf"), cache_modifier=".cg")
        b_w, b_id = _softmax_topk(b_x, o_e, m_e, E, TOP_K, BLOCK_E, BLOCK_K)
        b_g = 0.0
        if HAS_SHARED:
            b_g = tl.load(p_row + E, cache_modifier=".cg")
        _store_route(weights, ids, i_t, b_w, b_id, b_g, E, TOP_K, BLOCK_K, HAS_SHARED, x.dtype.element_ty)
        tl.store(counter + i_t, 0)  # ready for the next launch on this device


def route_topk_softmax_triton(router_logits: torch.Tensor, top_k: int, x: torch.Tensor | None = None,
                              gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int64), as reference.route_topk_softmax.
    With x [T, H] and gate_weight [1, H] (the shared expert's gate): [T, top_k + 1], as
    reference.route_with_shared_expert."""
    t, e = router_logits.shape
    if not 0 < top_k <= e or e > MAX_EXPERTS or router_logits.stride(-1) != 1:
        raise ValueError(f"router logits {tuple(router_logits.shape)} (stride {router_logits.stride()}): the Triton "
                         f"router takes top_k in [1, E], E <= {MAX_EXPERTS} and a contiguous expert axis")
    shared = x is not None
    if shared and (x.shape[0] != t or x.stride(-1) != 1 or gate_weight.shape != (1, x.shape[1])
                   or not gate_weight.is_contiguous()):
        raise ValueError(f"x {tuple(x.shape)} and the shared expert gate {tuple(gate_weight.shape)} must be "
                         f"[T={t}, H] and [1, H], contiguous along H")
    width = top_k + shared
    weights = torch.empty(t, width, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, width, dtype=torch.int64, device=router_logits.device)
    if t:
        block_e = max(16, triton.next_power_of_2(e))
        x_arg, w_arg = (x, gate_weight) if shared else (router_logits, router_logits)  # unused without shared
        _route_kernel[(t,)](router_logits, weights, ids, x_arg, w_arg, e, x_arg.shape[-1], router_logits.stride(0),
                            x_arg.stride(0), TOP_K=top_k, BLOCK_E=block_e,
                            BLOCK_K=max(2, triton.next_power_of_2(width)), HAS_SHARED=shared, BLOCK_H=1024,
                            num_warps=4 if block_e >= 1024 else 1, **pdl_args(router_logits))
    return weights, ids


FUSED_MAX_T = 16  # tokens route_hidden_triton takes: each token's programs read the whole router weight (L2 past one)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device) -> torch.Tensor | None:
    """[FUSED_MAX_T] int32 zeros that _router_kernel's programs count arrivals on, one per device: every launch leaves
    them at zero, and launches on one stream run one after another. None while a CUDA graph is being captured and
    the device has none yet: zeros made then would only be written when the graph replays."""
    counter = _COUNTERS.get(device)
    if counter is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        counter = _COUNTERS[device] = torch.zeros(FUSED_MAX_T, dtype=torch.int32, device=device)
    return counter


def router_plan(t: int, e: int) -> tuple[int, int]:
    """(router rows per program, warps) of _router_kernel for t tokens and e experts: ~128 programs a token up to 4
    tokens, ~64 beyond, 2 warps each. The token's last program runs 11 reductions (softmax, 8 top-k rounds, the
    renormalisation), each a barrier across its warps, on the step's critical path. H200, 35B-A3B shapes (E = 256,
    H = 2048, shared gate), CUDA-graph replays over 64 router copies (2026-12-01), µs, (rows, warps):
    T = 1 8.40 at (4, 4), the former plan -> 5.91 at (2, 2) (6.20 at (4, 2), 5.93 at (2, 1)); T = 4 8.45 -> 6.05;
    T = 16 13.05 -> 7.24 at (4, 2) (9.14 at (2, 2))."""
    return min(16, triton.next_power_of_2(triton.cdiv(e, 128 if t <= 4 else 64))), 2


def route_hidden_triton(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, counter: torch.Tensor,
                        gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T <= FUSED_MAX_T, H]; router_weight [E, H] (the router Linear's weight, x's dtype); counter from
    arrival_counters -> route_topk_softmax_triton(F.linear(x, router_weight), top_k[, x, gate_weight]) in one launch
    (the logits rounded to x's dtype as the Linear rounds them; their dot runs in another order than cuBLAS's)."""
    t, h = x.shape
    e = router_weight.shape[0]
    shared = gate_weight is not None
    if (t > FUSED_MAX_T or not 0 < top_k <= e or e > MAX_EXPERTS or router_weight.shape != (e, h)
            or router_weight.dtype != x.dtype or router_weight.stride(-1) != 1 or x.stride(-1) != 1
            or (shared and (gate_weight.shape != (1, h) or not gate_weight.is_contiguous()))):
        raise ValueError(f"x {tuple(x.shape)}, router {tuple(router_weight.shape)} {router_weight.dtype}: the fused "
                         f"router takes T <= {FUSED_MAX_T} tokens, a [E, H] router of x's dtype, top_k in [1, E], "
                         f"E <= {MAX_EXPERTS}, and contiguous rows")
    width = top_k + shared
    weights = torch.empty(t, width, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, width, dtype=torch.int64, device=x.device)
    if t:
        scratch = torch.empty(t, e + 1, dtype=torch.float32, device=x.device)
        block_n, warps = router_plan(t, e)
        block_h = min(triton.next_power_of_2(h), 4096 // block_n)
        _router_kernel[(t, triton.cdiv(e, block_n) + shared)](
            x, router_weight, gate_weight if shared else router_weight, scratch, counter, weights, ids, e, h,
            x.stride(0), router_weight.stride(0), TOP_K=top_k, BLOCK_N=block_n, BLOCK_H=block_h,
            BLOCK_E=max(16, triton.next_power_of_2(e)), BLOCK_K=max(2, triton.next_power_of_2(width)),
            HAS_SHARED=shared, num_warps=warps, **pdl_args(x))
    return weights, ids
