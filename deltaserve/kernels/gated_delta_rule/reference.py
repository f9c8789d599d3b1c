"""Torch reference for the gated delta rule (GDN linear attention) over a flat varlen batch with a state pool.

This is the CPU engine path and the oracle for the Triton kernels. It holds the varlen driver
(`gated_delta_rule_varlen`) and its two building blocks, which a kernel can target one at a time:
`chunk_gated_delta_rule` (one sequence, chunked WY form, as HF's `torch_chunk_gated_delta_rule`) and
`recurrent_gated_delta_rule_step` (one token for each of B sequences, as one step of HF's
`torch_recurrent_gated_delta_rule`). Input validation lives in the package's `__init__.py`.

State layout, everywhere in the engine: [HV, K, V] fp32 (as HF). Per token, with key head kh = hv // (HV // Hk):
    S <- S * exp(g);  v' = beta * (v - S^T k);  S <- S + k v'^T;  o = S^T q
"""
import torch
import torch.nn.functional as F

from ..causal_conv1d.reference import causal_conv1d_varlen

# Most state bytes one batched decode step touches. Measured on a 2-core EPYC VM (32 MiB L3): 32 full-size states
# (2 MiB each) in one step ran ~3x slower than 4 steps of 8, as the working set spilled out of cache; small models
# still take every decoding sequence in a single step.
# Dtypes of the recurrent-state pool: fp32 (the released checkpoints' mamba_ssm_dtype) or bf16 (opt-in, half the
# state traffic of a decode step). Every kernel loads the state into fp32, updates it there, and rounds once on store.
STATE_DTYPES = (torch.float32, torch.bfloat16)
_DECODE_STEP_BYTES = 16 << 20


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: [..., D] -> fp32 x * rsqrt(sum(x^2) + eps) over D (HF's / fla's formula, not x / max(|x|, eps))."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gdn_gating(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b: [T, HV] raw projections; A_log, dt_bias: [HV] -> (g, beta), both [T, HV] fp32.

    g = -exp(A_log) * softplus(a + dt_bias) is the log decay (<= 0); beta = sigmoid(b)."""
    # fp32 before exp: in fp16, exp(A_log) can overflow to inf and turn g into -inf
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(b.float())


def _expand_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """x: [..., Hk, D] -> [..., HV, D]: value head hv reads key head hv // (HV // Hk)."""
    groups = num_v_heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def recurrent_gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B independent sequences.

    q, k: [B, Hk, K] fp32, already l2-normalised (q also scaled by K**-0.5); v: [B, HV, V];
    g, beta: [B, HV] fp32; state: [B, HV, K, V] fp32, not modified.
    Returns (o [B, HV, V] fp32, new_state [B, HV, K, V] fp32)."""
    HV, K, V = state.shape[1:]
    q, k = _expand_heads(q.float(), HV), _expand_heads(k.float(), HV)
    decay = g.float().exp()[..., None]  # [B, HV, 1]
    # Both reads of the old state in one matmul; the output then follows without re-reading the new state:
    # S' = e^g S + k d^T  =>  S'^T q = e^g (S^T q) + (k.q) d. On CPU the state (2 MiB per sequence at full size)
    # does not fit in cache for a batch, so passes over it are the cost: 3 here against 6 in HF's step order.
    state = state.float()
    reads = torch.stack([k, q], dim=-2) @ state  # [B, HV, 2, V]: S^T k, S^T q
    delta = (v.float() - decay * reads[..., 0, :]) * beta.float()[..., None]  # [B, HV, V]
    o = decay * reads[..., 1, :] + (q * k).sum(-1, keepdim=True) * delta
    h = state * decay[..., None]  # new tensor: the caller's state is untouched
    h.view(-1, K, V).baddbmm_(k.reshape(-1, K, 1), delta.reshape(-1, 1, V))  # += k d^T
    return o, h


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence of L tokens, chunked WY algorithm (same steps as HF's `torch_chunk_gated_delta_rule`).

    q, k: [L, Hk, K] fp32, already l2-normalised (q also scaled by K**-0.5); v: [L, HV, V];
    g, beta: [L, HV] fp32; initial_state: [HV, K, V] fp32 or None (zeros), not modified.
    Returns (o [L, HV, V] fp32, final_state [HV, K, V] fp32)."""
    L, HV, V = v.shape
    K, C = k.shape[-1], chunk_size
    # head-major [HV, L, *] so each head's chunks are contiguous batches for the matmuls
    q, k = (_expand_heads(x.float(), HV).transpose(0, 1) for x in (q, k))
    v, g, beta = v.float().transpose(0, 1), g.float().t(), beta.float().t()
    h = torch.zeros(HV, K, V, device=v.device) if initial_state is None else initial_state.float().clone()
    if L == 0:
        return v.new_empty((0, HV, V)), h

    # Zero padding to a multiple of C is inert: k = 0 writes nothing and g = 0 decays nothing.
    pad = (-L) % C
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (L + pad) // C
    q, k, v = (x.reshape(HV, n, C, -1) for x in (q, k, v))
    G = g.reshape(HV, n, C).cumsum(-1)  # in-chunk cumulative log decay
    beta = beta.reshape(HV, n, C, 1)
    k_beta, v_beta = k * beta, v * beta

    # decay[i, j] = exp(G_i - G_j) for j <= i, else 0; masking before exp keeps every exponent <= 0 (no overflow)
    upper = torch.ones(C, C, dtype=torch.bool, device=v.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [HV, n, C, C]
    # (I + strictly_lower(A))^-1 via a unit-triangular solve: A's diagonal is ignored, as in HF
    A = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(A, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(A, k_beta * G.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # causal, diagonal included

    # Fold the decays into q and k once rather than per chunk inside the serial loop
    q_dec = q * G.exp()[..., None]
    k_dec = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]  # [HV, n, 1, 1]

    o = torch.empty(HV, n, C, V, device=v.device)
    for i in range(n):  # serial over chunks: each starts from the state the previous one left
        v_new = u[:, i] - w[:, i] @ h
        o[:, i] = q_dec[:, i] @ h + attn[:, i] @ v_new
        h = h * chunk_decay[:, i] + k_dec[:, i].transpose(-1, -2) @ v_new
    return o.reshape(HV, n * C, V)[:, :L].transpose(0, 1), h


def gated_delta_rule_varlen(
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
    chunk_size: int = 64,
    snapshots: tuple = (),
) -> torch.Tensor:
    """Gated delta rule over a flat varlen batch, continuing from and updating each sequence's pooled state.

    q, k: [T, Hk, K] model dtype, NOT yet l2-normalised; v: [T, HV, V] model dtype; a, b: [T, HV] raw projections;
    A_log, dt_bias: [HV]; state: [S, HV, K, V] fp32 pool, read at slots and written back IN PLACE;
    cu_seqlens: [N+1] int32/int64, cu_seqlens[0] = 0, cu_seqlens[N] = T; slots: [N] int64, distinct except -1;
    slot -1 is a padding row: it reads a zero state and writes nothing. A sequence with 0 tokens keeps its state.
    Length-1 sequences run as batched recurrent steps (all of them in one step unless their states exceed
    _DECODE_STEP_BYTES); longer ones run the chunked algorithm one sequence at a time. snapshots: (sequence, token
    offset, slot) triples, the offset a multiple of chunk_size inside the sequence: the state after that many of its
    tokens is also written to that slot (the prefix cache; the computation goes on unchanged).
    Returns o: [T, HV, V] in v.dtype."""
    T, HV, V = v.shape
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    q = l2norm(q) * q.shape[-1] ** -0.5
    k = l2norm(k)
    v32 = v.float()
    o = torch.empty(T, HV, V, device=v.device)

    bounds = cu_seqlens.tolist()  # one host read: the per-sequence split below is host-side anyway
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    slot_list = slots.tolist()
    single = [i for i, n in enumerate(lengths) if n == 1]
    per_step = max(1, _DECODE_STEP_BYTES // (HV * state.shape[2] * V * state.element_size()))
    for j in range(0, len(single), per_step):
        part = single[j : j + per_step]
        _run_single_tokens(q, k, v32, g, beta, state, [starts[i] for i in part], [slot_list[i] for i in part], o)

    stops: dict[int, list[tuple[int, int]]] = {}
    for i, offset, slot in snapshots:
        if offset % chunk_size or not 0 < offset < lengths[i]:
            raise ValueError(f"snapshot at token {offset} of a {lengths[i]}-token sequence: at a multiple of "
                             f"{chunk_size} inside it")
        stops.setdefault(i, []).append((offset, slot))
    for i, n in enumerate(lengths):
        if n < 2:
            continue
        s, slot = starts[i], slot_list[i]
        state_now = state[slot] if slot >= 0 else None
        # chunk boundaries stay where they are (multiples of chunk_size from s): the pieces compute what one call would
        for piece_end, snap_slot in sorted(stops.get(i, [])) + [(n, -1)]:
            e = starts[i] + piece_end
            o[s:e], state_now = chunk_gated_delta_rule(q[s:e], k[s:e], v32[s:e], g[s:e], beta[s:e], state_now,
                                                       chunk_size)
            if snap_slot >= 0:
                state[snap_slot] = state_now
            s = e
        if slot >= 0:
            state[slot] = state_now
    return o.to(v.dtype)


def _run_single_tokens(q, k, v, g, beta, state, tokens: list[int], slots: list[int], o) -> None:
    """A group of length-1 sequences in one recurrent step: tokens[j] is sequence j's token index, slots[j] its
    pool slot (-1: padding). Writes o[tokens] and state[slots] for the valid slots only."""
    device = state.device
    tok = torch.tensor(tokens, device=device)
    live = [j for j, s in enumerate(slots) if s >= 0]
    init = state.index_select(0, torch.tensor([max(s, 0) for s in slots], device=device))
    if len(live) < len(slots):
        # overwrite, never multiply by 0: the slot a padding row borrowed may hold NaN (a free slot is not zeroed)
        init[[j for j, s in enumerate(slots) if s < 0]] = 0
    o[tok], new_state = recurrent_gated_delta_rule_step(q[tok], k[tok], v[tok], g[tok], beta[tok], init)
    if len(live) < len(slots):
        new_state = new_state[live]
    # dtype given: a batch of only padding rows makes an empty list, which torch.tensor would type as float
    state.index_copy_(0, torch.tensor([slots[j] for j in live], dtype=torch.long, device=device),
                      new_state.to(state.dtype))


def fused_recurrent_decode_reference(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor,
    num_k_heads: int,
    head_k_dim: int,
    head_v_dim: int,
) -> torch.Tensor:
    """One decode step (one token per row): conv-state shift + depthwise conv + SiLU, then the gated delta rule.
    The oracle of the fused Triton decode kernel, built from `causal_conv1d_varlen` and `gated_delta_rule_varlen`.

    mixed_qkv: [B, C] pre-conv in_proj_qkv output laid out [q | k | v], C = 2*Hk*K + HV*V; conv_weight: [C, W];
    conv_state: [S, C, W-1] pool (weight dtype), updated IN PLACE at slots; a, b: [B, HV]; A_log, dt_bias: [HV];
    state: [S, HV, K, V] fp32 pool, updated IN PLACE at slots; slots: [B] int, -1 = padding (writes nothing).
    Returns o: [B, HV, V] in mixed_qkv.dtype."""
    B = mixed_qkv.shape[0]
    Hk, K, V = num_k_heads, head_k_dim, head_v_dim
    cu_seqlens = torch.arange(B + 1, device=mixed_qkv.device)
    y = causal_conv1d_varlen(mixed_qkv, conv_weight, conv_state, cu_seqlens, slots)
    q = y[:, : Hk * K].reshape(B, Hk, K)
    k = y[:, Hk * K : 2 * Hk * K].reshape(B, Hk, K)
    v = y[:, 2 * Hk * K :].reshape(B, -1, V)
    return gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, state, cu_seqlens, slots)
