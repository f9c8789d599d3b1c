"""Batched token sampler: one row per sequence sampling this step, every parameter per row.

What belongs here: turning final-position logits ``[N, V]`` into sampled token ids and logprobs. The model runner
builds one ``SamplingBatch`` per step (host-side, once) and calls ``Sampler()(logits, batch)``; the sampler never
syncs with the device per request and never loops over rows in Python except to draw noise for seeded rows.

Order of operations (vLLM V1's: min-p is an argmax-invariant logits processor applied after temperature and before
top-k / top-p, so top-p measures its nucleus on the distribution min-p left):
  1. logprobs = log_softmax(raw logits) in fp32 (the documented contract: raw, before anything below)
  1b. logit_bias added to the biased rows' tokens, and -inf to the tokens a row may not sample yet (min_tokens):
      one scatter-add over every (row, token) pair of the batch
  1c. structured outputs and allowed_token_ids: -inf outside each constrained row's mask (a packed bitmask, see
      runtime/structured_output)
  2. repetition penalty on tokens seen in prompt OR output (divide positive logits, multiply negative ones)
  3. frequency / presence penalties on output tokens only (counts via scatter_add)
  4. greedy rows take the argmax of the penalised logits
  5. temperature -> min-p (relative to the max probability) -> top-k -> top-p (keep at least one token)
  6. exponential race: argmax(probs / q), q ~ Exponential(1); seeded rows draw q from their own generator, so a
     seeded request samples the same tokens whatever else is in the batch and whichever row it sits in.

Which work runs is decided on the host from the request parameters (``all_greedy``, ``no_penalties``,
``no_top_k``, ...), never by inspecting device tensors.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deltaserve.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-step sampling parameters of N rows, as device tensors.

    Token-history representation: ``prompt_ids`` / ``output_ids`` are right-padded ``[N, L]`` int64 tensors whose
    pad value is ``vocab_size``; penalties scatter them into ``[N, V + 1]`` buffers and drop the last (throwaway)
    column, so padding needs no mask. Each is ``None`` when no row needs it.
    """

    temperature: Tensor  # [N] fp32; 1.0 on greedy rows so that dividing by it is always safe
    greedy: Tensor  # [N] bool; row takes the argmax of the penalised logits
    top_p: Tensor  # [N] fp32 in (0, 1]; 1.0 = off
    top_k: Tensor  # [N] int64 in [1, vocab_size]; vocab_size = off
    min_p: Tensor  # [N] fp32 in [0, 1]; 0.0 = off
    repetition_penalty: Tensor  # [N] fp32 > 0; 1.0 = off
    presence_penalty: Tensor  # [N] fp32 in [-2, 2]
    frequency_penalty: Tensor  # [N] fp32 in [-2, 2]
    prompt_ids: Tensor | None  # [N, Lp] int64, pad = vocab_size; None when no row has a repetition penalty
    output_ids: Tensor | None  # [N, Lo] int64, pad = vocab_size; None when no_penalties
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded, non-greedy rows only)
    # logit_bias and banned tokens of every row as (rows [M] int64, token ids [M] int64, biases [M] fp32, -inf for a
    # banned token); None when no row has either
    logit_bias: tuple[Tensor, Tensor, Tensor] | None
    # structured outputs and allowed_token_ids: (rows [M] int64, packed bitmask [M, ceil(V / 32)] int32, bit t % 32 of
    # word t // 32 set when token t is allowed) of the M constrained rows; None when no row is constrained
    allowed: tuple[Tensor, Tensor] | None
    vocab_size: int  # V, the width of the logits
    need_logprobs: bool  # some row asked for logprobs (logprobs=0 still returns the sampled token's logprob)
    max_num_logprobs: int  # max top-k logprobs any row asked for (0 = none beyond the sampled token)
    max_top_k: int  # max top_k over sampling rows (vocab_size when some row has top-k off)
    all_greedy: bool  # every row is greedy: skip temperature, filtering and noise
    any_greedy: bool  # some row is greedy: compute the argmax and select it per row
    no_penalties: bool  # no row has repetition/presence/frequency penalties: skip step 2-3
    no_top_k: bool  # no sampling row uses top-k
    no_top_p: bool  # no sampling row uses top-p
    no_min_p: bool  # no sampling row uses min-p

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_requests(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
        banned: list[list[int]] | None = None,
        grammars: list | None = None,
    ) -> SamplingBatch:
        """Build the batch for N rows. prompt_ids / output_ids: per-row token ids so far (only copied to the
        device when some row uses penalties). generators: per-row generator for seeded requests (owned by the
        runner so it advances across steps), None for the others. banned: per-row token ids the row may not sample
        this step (EOS and stop tokens before min_tokens), None for none. grammars: per-row structured-output
        grammar (runtime/structured_output.RequestGrammar) or None, None for none. One host-to-device copy per
        dtype."""
        device = torch.device(device)
        n = len(params)
        if not len(prompt_ids) == len(output_ids) == len(generators) == n or (banned is not None and len(banned) != n):
            raise ValueError(
                f"from_requests needs one entry per row, got {n} params, {len(prompt_ids)} prompt_ids, "
                f"{len(output_ids)} output_ids and {len(generators)} generators."
            )
        _check_requests(params, generators, vocab_size, device)
        pin = device.type == "cuda"
        greedy = [p.greedy for p in params]
        top_k = [vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        floats = torch.tensor(
            [
                [1.0 if g else float(p.temperature) for p, g in zip(params, greedy)],
                [1.0 if g else float(p.top_p) for p, g in zip(params, greedy)],
                [0.0 if g else float(p.min_p) for p, g in zip(params, greedy)],
                [float(p.repetition_penalty) for p in params],
                [float(p.presence_penalty) for p in params],
                [float(p.frequency_penalty) for p in params],
            ],
            dtype=torch.float32,
        ).reshape(6, n)
        floats = floats.pin_memory() if pin else floats
        ints = torch.tensor([top_k, greedy], dtype=torch.int64).reshape(2, n)
        ints = ints.pin_memory() if pin else ints
        temperature, top_p, min_p, rep, presence, frequency = floats.to(device, non_blocking=True).unbind(0)
        top_k_t, greedy_t = ints.to(device, non_blocking=True).unbind(0)

        sampling = [p for p, g in zip(params, greedy) if not g]
        sampling_top_k = [k for k, g in zip(top_k, greedy) if not g]
        no_rep = all(p.repetition_penalty == 1.0 for p in params)
        no_penalties = no_rep and all(p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params)
        return cls(
            temperature=temperature,
            greedy=greedy_t.bool(),
            top_p=top_p,
            top_k=top_k_t,
            min_p=min_p,
            repetition_penalty=rep,
            presence_penalty=presence,
            frequency_penalty=frequency,
            prompt_ids=None if no_rep else _pad_ids(prompt_ids, vocab_size, pin).to(device, non_blocking=True),
            output_ids=None if no_penalties else _pad_ids(output_ids, vocab_size, pin).to(device, non_blocking=True),
            generators={i: g for i, g in enumerate(generators) if g is not None and not greedy[i]},
            logit_bias=_logit_bias(params, banned or [[] for _ in params], pin, device),
            allowed=_allowed(params, grammars or [None] * n, (vocab_size + 31) // 32, pin, device),
            vocab_size=vocab_size,
            need_logprobs=any(p.logprobs is not None for p in params),
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            max_top_k=max(sampling_top_k, default=vocab_size),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            no_penalties=no_penalties,
            no_top_k=all(k == vocab_size for k in sampling_top_k),
            no_top_p=all(p.top_p == 1.0 for p in sampling),
            no_min_p=all(p.min_p == 0.0 for p in sampling),
        )


def _check_requests(
    params: list[SamplingParams], generators: list[torch.Generator | None], vocab_size: int, device: torch.device
) -> None:
    for p in params:
        if p.logprobs is not None and p.logprobs > vocab_size:
            raise ValueError(f"logprobs={p.logprobs} exceeds the vocabulary size; ask for at most {vocab_size}.")
        for name, ids in (("logit_bias", p.logit_bias), ("allowed_token_ids", p.allowed_token_ids)):
            if ids and max(ids) >= vocab_size:
                raise ValueError(f"{name} token id {max(ids)} is outside the vocabulary (0..{vocab_size - 1}).")
    for g in generators:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"A per-request generator lives on {g.device} but the batch is on {device}.")


def _logit_bias(params: list[SamplingParams], banned: list[list[int]], pin: bool,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
    """Every row's logit_bias and banned tokens flattened to (rows, token ids, biases; -inf for a banned token) on
    the device, or None when no row has either."""
    pairs = [(row, tok, bias) for row, p in enumerate(params) for tok, bias in (p.logit_bias or {}).items()]
    pairs += [(row, tok, float("-inf")) for row, toks in enumerate(banned) for tok in toks]
    if not pairs:
        return None
    rows, toks, biases = zip(*pairs)
    ints = torch.tensor([rows, toks], dtype=torch.int64)
    floats = torch.tensor(biases, dtype=torch.float32)
    if pin:
        ints, floats = ints.pin_memory(), floats.pin_memory()
    rows_t, toks_t = ints.to(device, non_blocking=True).unbind(0)
    return rows_t, toks_t, floats.to(device, non_blocking=True)


def _allowed(params: list[SamplingParams], grammars: list, words: int, pin: bool,
             device: torch.device) -> tuple[Tensor, Tensor] | None:
    """Per row its runtime.structured_output.RequestGrammar (None: unconstrained) and allowed_token_ids -> (rows [M]
    int64, packed bitmask [M, words] int32) of the M rows constrained this step, on `device`; None when there are
    none (a request has one or the other: SamplingParams refuses both)."""
    rows = [i for i, (p, g) in enumerate(zip(params, grammars))
            if p.allowed_token_ids or g is not None and g.constrains]
    if not rows:
        return None
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    for j, i in enumerate(rows):
        if params[i].allowed_token_ids:
            bitmask[j] = _token_mask(tuple(params[i].allowed_token_ids), words)
        else:
            grammars[i].fill(bitmask, j)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    if pin:
        bitmask, rows_t = bitmask.pin_memory(), rows_t.pin_memory()
    return rows_t.to(device, non_blocking=True), bitmask.to(device, non_blocking=True)


@functools.lru_cache(maxsize=256)
def _token_mask(ids: tuple[int, ...], words: int) -> Tensor:
    """Token ids -> [words] int32 with bit t % 32 of word t // 32 set for each id (the grammar bitmask's packing);
    cached, since a request's allowed_token_ids never change (a full-vocabulary mask a row a step added up)."""
    bits = np.zeros(words * 32, dtype=np.uint8)
    bits[list(ids)] = 1
    return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").copy())


def _pad_ids(seqs: list[list[int]], pad: int, pin: bool) -> Tensor:
    """seqs: N lists of token ids -> [N, max_len] int64 right-padded with `pad` (built on the host).
    numpy.fromiter over the flattened ids is ~5x faster than torch.tensor(list) for long histories."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lens.max()) if len(seqs) else 0
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    if width:
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
        out[np.arange(width) < lens[:, None]] = flat  # boolean-mask assignment fills row-major = chain order
    ids = torch.from_numpy(out)
    return ids.pin_memory() if pin else ids


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [N] int64 sampled ids
    logprobs: Tensor | None  # [N, 1 + max_num_logprobs] fp32: raw logprob of the sampled token, then the top-k
    logprob_token_ids: Tensor | None  # [N, 1 + max_num_logprobs] int64 ids matching `logprobs`
    logprob_ranks: Tensor | None  # [N] int64 the sampled token's rank over the vocabulary (1 = the most likely)
    # Rows that asked for fewer than max_num_logprobs keep only their first 1 + k columns; None when no row
    # asked for logprobs.


def compute_topk_logprobs(logprobs: Tensor, k: int, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """logprobs: [N, V] fp32 log-softmax; k: host int in [0, V]; token_ids: [N] int64.
    Returns (values [N, 1 + k] fp32, ids [N, 1 + k] int64, ranks [N] int64): the given token's logprob first, then
    the k largest in descending order, and the given token's rank: as vLLM's, the number of tokens at least as likely
    as it (itself and its ties included). Used for generated tokens and, with the next prompt tokens, for prompt
    logprobs."""
    if not 0 <= k <= logprobs.shape[-1]:
        raise ValueError(f"k={k} top logprobs requested, but k must be in [0, {logprobs.shape[-1]}].")
    ids = token_ids.to(torch.int64).unsqueeze(1)
    chosen = logprobs.gather(1, ids)
    ranks = (logprobs >= chosen).sum(dim=1)
    if k == 0:
        return chosen, ids, ranks
    top_values, top_ids = logprobs.topk(k, dim=-1)
    return torch.cat([chosen, top_values], dim=1), torch.cat([ids, top_ids], dim=1), ranks


def apply_penalties(
    logits: Tensor,
    prompt_ids: Tensor | None,
    output_ids: Tensor,
    repetition_penalty: Tensor,
    presence_penalty: Tensor,
    frequency_penalty: Tensor,
) -> Tensor:
    """logits: [N, V] fp32 (not modified); prompt_ids: [N, Lp] int64 or None; output_ids: [N, Lo] int64 (both
    padded with V); penalties: [N] fp32. Returns new penalised logits [N, V] fp32.
    Repetition: tokens seen in prompt or output get logit / r if positive, logit * r otherwise.
    Then logit -= frequency * count_in_output + presence * (count_in_output > 0)."""
    n, v = logits.shape
    counts = torch.zeros(n, v + 1, dtype=logits.dtype, device=logits.device)  # +1: pad ids land in a dead column
    counts.scatter_add_(1, output_ids, torch.ones(output_ids.shape, dtype=logits.dtype, device=logits.device))
    counts = counts[:, :v]
    in_output = counts > 0
    seen = in_output
    if prompt_ids is not None:
        in_prompt = torch.zeros(n, v + 1, dtype=torch.bool, device=logits.device)
        seen = seen | in_prompt.scatter_(1, prompt_ids, True)[:, :v]
    rep = repetition_penalty.unsqueeze(1)
    out = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    out -= frequency_penalty.unsqueeze(1) * counts
    out -= presence_penalty.unsqueeze(1) * in_output
    return out


def apply_allowed(logits: Tensor, rows: Tensor, bitmask: Tensor) -> Tensor:
    """logits [N, V]; rows [M]; bitmask [M, ceil(V / 32)] int32 -> logits with -inf where a constrained row's bit is
    clear (out of place). The words are unpacked byte by byte (little-endian: token 32 w + 8 b + k is bit k of byte
    b of word w), one byte per token for the M rows only."""
    n_vocab = logits.shape[1]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1  # [M, 4 W, 8]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :n_vocab].bool()
    return logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, max_top_k: int) -> Tensor:
    """logits: [N, V] fp32, masked IN PLACE with -inf and returned; top_k: [N] int64 in [1, V] or None;
    top_p: [N] fp32 in (0, 1] or None; max_top_k: host int >= every row's top_k.
    Ties at the k-th value are all kept. Top-p keeps the smallest set whose mass reaches p (at least one)."""
    v = logits.shape[1]
    if top_p is None and top_k is not None and max_top_k < v:
        # Only top-k and every row's k is small: a partial top-k is much cheaper than a full sort.
        kth = logits.topk(max_top_k, dim=-1).values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        return logits.masked_fill_(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (v - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always survives
        sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """logits: [N, V] fp32 (temperature applied; masked IN PLACE with -inf and returned); min_p: [N] fp32. Drops the
    tokens whose probability p < min_p * max(p), as vLLM's MinPLogitsProcessor (before top-k / top-p), compared as
    logit < max logit + log(min_p): the same test without a softmax over the vocabulary (min_p 0: nothing dropped)."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill_(logits < threshold, float("-inf"))


def exponential_race(probs: Tensor, generators: dict[int, torch.Generator]) -> Tensor:
    """probs: [N, V] fp32 (overwritten); generators: row -> generator. Returns [N] int64 ids, each drawn from its
    row's distribution: argmax(p / q) with q ~ Exponential(1) is a sample of p (Gumbel-max in disguise)."""
    q = torch.empty_like(probs).exponential_()
    for row, gen in generators.items():  # only seeded rows: their noise depends on nothing else in the batch
        q[row].exponential_(generator=gen)
    q.clamp_(min=torch.finfo(q.dtype).tiny)  # q == 0 would turn masked (p == 0) tokens into NaN winners
    return probs.div_(q).argmax(dim=-1)


class Sampler:
    """Stateless; one instance per model runner."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [N, V] fp32 (bf16 is upcast; never modified); batch: N rows. Returns sampled ids and logprobs."""
        if logits.dim() != 2 or logits.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match the sampling batch "
                f"[{batch.num_rows}, {batch.vocab_size}]."
            )
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if batch.need_logprobs else None
        if batch.logit_bias is not None:  # out of place: logits may still be the caller's tensor
            rows, toks, biases = batch.logit_bias
            logits = logits.index_put((rows, toks), biases, accumulate=True)
        if batch.allowed is not None:
            logits = apply_allowed(logits, *batch.allowed)
        if not batch.no_penalties:
            logits = apply_penalties(
                logits, batch.prompt_ids, batch.output_ids, batch.repetition_penalty,
                batch.presence_penalty, batch.frequency_penalty,
            )
        token_ids = self._sample(logits, batch)
        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids, logprobs=None, logprob_token_ids=None, logprob_ranks=None)
        values, ids, ranks = compute_topk_logprobs(raw_logprobs, batch.max_num_logprobs, token_ids)
        return SamplerOutput(token_ids=token_ids, logprobs=values, logprob_token_ids=ids, logprob_ranks=ranks)

    @staticmethod
    def _sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """logits: [N, V] fp32 penalised (not modified) -> [N] int64."""
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        greedy_ids = logits.argmax(dim=-1) if batch.any_greedy else None
        x = logits / batch.temperature.unsqueeze(1)  # out of place: the caller's logits stay untouched
        if not batch.no_min_p:
            x = apply_min_p(x, batch.min_p)
        if not (batch.no_top_k and batch.no_top_p):
            x = apply_top_k_top_p(
                x, None if batch.no_top_k else batch.top_k, None if batch.no_top_p else batch.top_p, batch.max_top_k
            )
        probs = x.softmax(dim=-1)
        sampled = exponential_race(probs, batch.generators)
        return sampled if greedy_ids is None else torch.where(batch.greedy, greedy_ids, sampled)
