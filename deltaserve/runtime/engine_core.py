"""EngineCore: one `step()` = schedule -> model runner forward + sample -> append tokens, detokenize, check stops.

Async scheduling (`async_scheduling=True`): a step is launched on the device and its samples are read in the next
`step()`, after the following step has been launched, so the host's work (reading samples, detokenizing, stop checks,
scheduling, building the next batch) overlaps the device's. The next step feeds each in-flight token by its device
copy (the model runner substitutes it). A request that stops on a token read late has had one more step computed,
whose sample is dropped; its blocks and slot are reused only by work queued after that step, so nothing leaks.
Steps whose requests need the host to know every token (repetition / presence / frequency penalties, structured
outputs, bad words of several tokens) are read before the next one is scheduled.

Requests with n > 1 become n sibling requests ("<id>" holds sample 0, "<id>#1".. the others) that are reported
together under the parent id.
"""
from __future__ import annotations

import itertools
import numbers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..outputs import CompletionOutput, Logprobs, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams, truncated_prompt
from ..tokenizer import IncrementalDetokenizer, Tokenizer, bad_word_ids
from .request import Request, RequestStatus
from .scheduler import Scheduler
from .scheduler_output import SchedulerOutput
from .structured_output import GrammarBackend

if TYPE_CHECKING:
    from ..worker.model_runner import PendingOutput


@dataclass
class _Group:
    """A user request: its prompt and its n samples."""
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Request]
    detoks: list[IncrementalDetokenizer]
    texts: list[str]
    sent_tokens: list[int]  # per sample: tokens already reported in a delta
    sent_chars: list[int]  # per sample: characters of text already reported in a delta
    metrics: RequestMetrics


@dataclass
class _Launched:
    """A step queued on the device whose samples have not been read yet."""
    sched: SchedulerOutput
    pending: "PendingOutput"  # the runner's handle on its samples
    needs_host_tokens: bool  # a sampled request uses penalties or a grammar: read before scheduling the next step


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner, tokenizer: Tokenizer | None, eos_token_ids: set[int],
                 max_model_len: int, vocab_size: int, async_scheduling: bool = False):
        self.scheduler, self.runner, self.tokenizer = scheduler, runner, tokenizer
        self.eos_token_ids, self.max_model_len, self.vocab_size = eos_token_ids, max_model_len, vocab_size
        self.async_scheduling = async_scheduling
        self.groups: dict[str, _Group] = {}
        self._by_id: dict[str, tuple[_Group, int]] = {}
        self._ids = itertools.count()
        self._inflight: _Launched | None = None
        # a step that raised: the outputs it had read before (some final), then every request's abort
        self.read_before_failure: list[RequestOutput] = []
        self.failed_outputs: list[RequestOutput] = []
        self._grammars = GrammarBackend(tokenizer, vocab_size, eos_token_ids) if tokenizer is not None else None
        self._token_texts: dict[int, str] = {}  # token id -> its text, for Logprob.decoded_token
        # the tokenizer's EOS: a request that ends on it has stop_reason None; the other EOS ids (generation_config's,
        # config.json's) are reported by id, as vLLM, which adds them to each request's stop_token_ids
        self._own_eos = tokenizer.eos_token_id if tokenizer is not None else None

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request; raises ValueError (one sentence) for a prompt that cannot run.
        arrival_time: when it arrived, on the time.perf_counter clock of RequestMetrics (None: now)."""
        params.check()
        params = params.with_vocab_size(self.vocab_size)  # vLLM's -1 logprobs, for every caller (LLM, server, own)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.groups:
            raise ValueError(f"request id {rid!r} is already in use")
        if (k := params.truncate_prompt_tokens) is not None and k > self.max_model_len:  # as vLLM: a cut that long
            raise ValueError(f"truncate_prompt_tokens={k} is more than max_model_len ({self.max_model_len}): keep at "
                             f"most {self.max_model_len} tokens, or pass -1 for as many as leave room for max_tokens")
        prompt_token_ids = truncated_prompt(prompt_token_ids, params.truncate_prompt_tokens, self.max_model_len,
                                            params.max_tokens)
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if n_prompt > self.max_model_len:  # as vLLM: one of exactly max_model_len runs, and samples one token
            raise ValueError(f"the prompt has {n_prompt} tokens but max_model_len is {self.max_model_len}: "
                             f"shorten the prompt to at most {self.max_model_len} tokens or raise max_model_len")
        bad = [t for t in prompt_token_ids  # plain ints first (an ABC check per id was 4x slower); numpy's integers
               if not (type(t) is int or (not isinstance(t, bool) and isinstance(t, numbers.Integral)))  # too
               or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary (integers 0.."
                             f"{self.vocab_size - 1})")
        if any(type(t) is not int for t in prompt_token_ids):
            prompt_token_ids = [int(t) for t in prompt_token_ids]
        for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids),
                          ("stop_token_ids", params.stop_token_ids)):  # one outside could never stop the request
            if bad := [t for t in ids or () if t >= self.vocab_size]:
                raise ValueError(f"{name} token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        for name, k in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and k > self.vocab_size:  # checked here, not mid-step, where it would fail the batch
                raise ValueError(f"{name}={k} asks for more top tokens than the vocabulary has ({self.vocab_size})")
        if params.stop and self.tokenizer is None:  # they match text, and without a tokenizer there is none
            raise ValueError("stop strings need the model's tokenizer.json; use stop_token_ids")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words need the model's tokenizer.json; ban token ids with logit_bias")
        bad_ids = bad_word_ids(self.tokenizer, params.bad_words) if params.bad_words else []
        self._check_allowed(params, bad_ids)
        start_after = self._check_structured(prompt_token_ids, params)
        # the last token is only sampled, never fed: a prompt filling max_model_len still gets one (vLLM's scoring
        # of a whole-context prompt, its prompt logprobs, rests on that), and needs no KV block or position beyond it
        room = max(1, self.max_model_len - n_prompt)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        samples, detoks = [], []
        for i in range(params.n):
            req = Request(rid if i == 0 else f"{rid}#{i}", list(prompt_token_ids), params, max_tokens, sample_index=i,
                          bad_word_ids=bad_ids)
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None]
            if params.seed is not None:
                req.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            if params.structured_outputs is not None:
                req.grammar = self._grammars.grammar(params.structured_outputs, start_after)
            samples.append(req)
            detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
                          if self.tokenizer is not None and params.detokenize else None)
        n = params.n
        group = _Group(prompt, list(prompt_token_ids), params, samples, detoks, [""] * n, [0] * n, [0] * n,
                       RequestMetrics(time.perf_counter() if arrival_time is None else arrival_time))
        self.groups[rid] = group
        for i, req in enumerate(samples):
            self._by_id[req.request_id] = (group, i)
        samples[0].fork_children = samples[1:]  # forked off sample 0 once its prompt is prefilled
        self.scheduler.add(samples[0])
        return rid

    def warm_up(self) -> None:
        """Run a few throwaway requests whose steps take the shapes a busy engine meets: one prefilling sequence
        over the whole token budget, a chunked prefill continuing from its cache next to several short prompts,
        decode, and decode mixed with a new prefill, once beside long decode contexts and once beside short ones
        (the attention decode kernel's split and unsplit variants). On CUDA this compiles the Triton kernels'
        specialisations (which depend on sequence counts, token counts and table offsets) before the first user
        request instead of inside it: seconds of compilation that would otherwise land on one unlucky request's
        latency."""
        budget, room = self.scheduler.max_num_batched_tokens, self.max_model_len - 8
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        waves = [([budget + 37, 129, 17, 1], 2), ([300, 2], None), ([3], 1), ([40], None)]  # (prompts, steps)
        for i, (wave, steps) in enumerate(waves):
            for j, n in enumerate(wave):
                n = max(1, min(n, room))
                self.add_request([(7 * k + j) % self.vocab_size for k in range(n)], params,
                                 request_id=f"__warmup_{i}_{j}")
            for _ in range(steps or 10**6):
                if not self.has_unfinished():
                    break
                self.step()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now (any state), freeing its KV blocks and state slot."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for req in group.samples:
            if req.status != RequestStatus.FINISHED:
                self.scheduler.finish(req)  # also retires sample 0's not-yet-forked siblings
            if req.finish_reason is None:
                req.finish_reason = "abort"
            self._by_id.pop(req.request_id, None)
        if group.metrics.finished_time is None:
            group.metrics.finished_time = time.perf_counter()
        out = self._output(request_id, group)
        if not self.groups and self._inflight is not None:
            # the last request is gone: read the step still in flight now (its samples are all dropped), so the
            # engine is idle rather than holding a launch that only the next step() would read
            self._read(self._inflight, finished_only=True)
            self._inflight = None
        return out

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Launch one forward and read one step's samples (this one's, or under async scheduling the previous one's);
        -> an output for every user request that made progress in the step read.
        finished_only: report only requests that finished in it (LLM.generate: at 400 running requests, building
        every in-flight output each step was a millisecond of host time the GPU waited for).
        A step that raises (a device error, Ctrl-C) may have appended some requests' tokens and not others',
        advanced positions whose samples it never read, or left a launch unread: no request's state can be
        trusted, so every request is aborted (the engine is idle and usable after). What the step had read before
        it raised (a request may have finished there) waits in `read_before_failure`, the aborts in
        `failed_outputs`, for whoever delivers them. Left as they were, other callers' requests went on with a
        token twice, or never finished."""
        outputs: list[RequestOutput] = []
        try:
            self._step(finished_only, outputs)
            return outputs
        except BaseException:
            self._inflight = None
            self.read_before_failure += outputs
            self.failed_outputs += [out for rid in list(self.groups) if (out := self.abort(rid)) is not None]
            raise

    def _step(self, finished_only: bool, outputs: list[RequestOutput]) -> None:
        if self._inflight is not None and self._inflight.needs_host_tokens:
            outputs += self._read(self._inflight, finished_only)
            self._inflight = None
        sched = self.scheduler.schedule()
        previous, self._inflight = self._inflight, None
        if sched.seqs:
            self._inflight = self._launch(sched)
        if previous is not None:
            outputs += self._read(previous, finished_only)
        if self._inflight is not None and not self.async_scheduling:
            outputs += self._read(self._inflight, finished_only)
            self._inflight = None

    def _launch(self, sched: SchedulerOutput) -> _Launched:
        pending = self.runner.launch(sched)
        self.scheduler.update_after_step(sched)
        needs_host = False
        for req in pending.requests:
            req.num_inflight += 1
            p = req.params
            needs_host |= p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            needs_host |= req.grammar is not None or any(len(ids) > 1 for ids in req.bad_word_ids)
        return _Launched(sched, pending, needs_host)

    def _read(self, launched: _Launched, finished_only: bool) -> list[RequestOutput]:
        """Read a launched step's samples: append tokens, check stops, build the outputs."""
        result = launched.pending.result()
        for req in launched.pending.requests:
            req.num_inflight -= 1
        touched: dict[str, _Group] = {}
        sched = launched.sched
        for req in [s.request for s in sched.seqs] + [f.child for f in sched.forks]:
            if req.request_id not in self._by_id or req.status == RequestStatus.FINISHED:
                continue  # aborted, or stopped on a token read after this step was launched: its sample is dropped
            group, i = self._by_id[req.request_id]
            touched[group.samples[0].request_id] = group
            if req.request_id in result.prompt_logprobs:
                req.prompt_logprobs += [self._decoded(lps, req.params)
                                        for lps in result.prompt_logprobs[req.request_id]]
            if req.request_id in result.sampled:
                self._append_token(req, group, i, result)
        now = time.perf_counter()
        outputs = []
        for rid, group in touched.items():
            m = group.metrics
            done = all(r.status == RequestStatus.FINISHED for r in group.samples)
            if m.first_token_time is None and group.samples[0].output_token_ids:
                m.first_token_time = now
            if done and m.finished_time is None:
                m.finished_time = now
            if finished_only and not done:
                continue
            outputs.append(self._output(rid, group))
            if outputs[-1].finished:
                del self.groups[rid]
                for req in group.samples:
                    self._by_id.pop(req.request_id, None)
        return outputs

    def _append_token(self, req: Request, group: _Group, i: int, result) -> None:
        tok = result.sampled[req.request_id]
        req.output_token_ids.append(tok)
        if req.request_id in result.logprobs:
            req.logprobs.append(self._decoded(result.logprobs[req.request_id], req.params))
        if req.request_id in result.sampled_logprob:
            req.cumulative_logprob += result.sampled_logprob[req.request_id]
        prev_len = len(group.texts[i])
        complete = req.grammar is not None and req.grammar.accept(tok)
        p = req.params
        # a token that ends the request and whose text is not shown (EOS, a stop token, the EOS a grammar ended on)
        # never reaches the detokenizer: with it, bytes held back before it would come out with its text and be cut
        hidden = not p.include_stop_str_in_output and (complete or len(req.output_token_ids) >= p.min_tokens and (
            tok in p.stop_token_ids or not p.ignore_eos and tok in self.eos_token_ids))
        if group.detoks[i] is not None and not hidden:
            group.texts[i] += group.detoks[i].add([tok])
        reason, stop = self._stop_reason(req, group, i, tok, prev_len)
        if reason is None and complete:  # the grammar took EOS although ignore_eos or min_tokens held it back
            reason = "stop"
        if complete and req.grammar.dead_end:  # no token could continue the grammar: not a complete answer
            reason, stop = "abort", None
        if reason is not None:
            if group.detoks[i] is not None and reason != "abort" and not isinstance(stop, str):
                # bytes held back as an incomplete character are final now (a stop string cut the text instead);
                # a token that held them may also have held the end of a stop string ("P" + a character's first
                # byte): the released text is checked too
                flushed_from = len(group.texts[i])
                group.texts[i] += group.detoks[i].flush()
                if (hit := self._stop_string(req, group, i, flushed_from)) is not None:
                    reason, stop = "stop", hit
            req.finish_reason, req.stop_reason = reason, stop
            self.scheduler.finish(req)

    def _decoded(self, logprobs: Logprobs, params: SamplingParams) -> Logprobs:
        """Each Logprob's decoded_token (vLLM's field): the token's own text, special tokens written out (cached per
        id: prompt logprobs ask for one or more a prompt token); None under detokenize=False, as vLLM, which decodes
        nothing for such a request."""
        if self.tokenizer is not None and params.detokenize:
            for tok, lp in logprobs.items():
                if (text := self._token_texts.get(tok)) is None:
                    text = self._token_texts[tok] = self.tokenizer.decode([tok], skip_special_tokens=False)
                lp.decoded_token = text
        return logprobs

    def _check_allowed(self, params: SamplingParams, bad_ids: list[list[int]]) -> None:
        """allowed_token_ids that the request's other rules leave nothing to sample from: refused now (the sampler
        would take a token outside them)."""
        allowed = set(params.allowed_token_ids or ())
        if not allowed:
            return
        enders = {*params.stop_token_ids, *self.eos_token_ids}  # what min_tokens bans (ignore_eos or not)
        banned = {ids[0] for ids in bad_ids if len(ids) == 1}  # one-token bad words: banned at every step
        if params.min_tokens and allowed <= enders:
            raise ValueError("allowed_token_ids holds only EOS and stop tokens, which min_tokens bans at first")
        if allowed <= banned:
            raise ValueError("allowed_token_ids holds only tokens that bad_words ban")
        if params.min_tokens and allowed <= enders | banned:
            raise ValueError("allowed_token_ids holds only tokens that bad_words ban and EOS and stop tokens, which "
                             "min_tokens bans at first")

    def _check_structured(self, prompt_token_ids: list[int], params: SamplingParams) -> int | None:
        """Compile a structured request's grammar now (ValueError for a bad spec or a model without a tokenizer) ->
        the `</think>` token id when the prompt leaves a thinking block open (its grammar starts after it), else
        None."""
        if params.structured_outputs is None:
            return None
        if self._grammars is None:
            raise ValueError("structured outputs need the model's tokenizer.json")
        self._grammars.compile(params.structured_outputs)  # cached; reports a bad spec before anything is queued
        start, end, turn = (self.tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<|im_start|>"))
        # only the last turn counts (all of the prompt without turns): a <think> quoted in a message earlier would
        # leave the whole answer unconstrained
        last = _last_index(prompt_token_ids, turn)
        tail = prompt_token_ids if last is None else prompt_token_ids[last:]
        if start is None or end is None or (opened := _last_index(tail, start)) is None:
            return None
        return end if end not in tail[opened:] else None

    def _stop_reason(self, req: Request, group: _Group, i: int, tok: int,
                     prev_len: int) -> tuple[str | None, int | str | None]:
        p = req.params
        if len(req.output_token_ids) < p.min_tokens:  # too early to stop on EOS, a stop token or a stop string
            return _length_reason(req, self.max_model_len), None
        eos = not p.ignore_eos and tok in self.eos_token_ids
        if eos or tok in p.stop_token_ids:
            if not p.include_stop_str_in_output:  # as vLLM: the stopping token's own text is not shown
                group.texts[i] = group.texts[i][:prev_len]
            return "stop", (None if eos and tok == self._own_eos else tok)
        if (s := self._stop_string(req, group, i, prev_len)) is not None:
            return "stop", s
        return _length_reason(req, self.max_model_len), None

    def _stop_string(self, req: Request, group: _Group, i: int, prev_len: int) -> str | None:
        """The stop string that text after prev_len completes, the text cut there; None when none does."""
        p = req.params
        if p.stop and len(req.output_token_ids) > p.min_tokens:  # as vLLM: a stop string completed by a token
            # after the first min_tokens (as EOS and stop tokens, banned for those, can come at the earliest)
            text = group.texts[i]
            # only a stop string that ends in this token's text counts (one that ended earlier, while min_tokens
            # held stops back, does not); it may straddle the previous text and this token's
            # the earliest match; at one position the first in the list, as vLLM (["ab", "a"] on "xab": "ab")
            hits = [(at, k, s) for k, s in enumerate(p.stop)
                    if (at := text.find(s, max(0, prev_len - len(s) + 1))) >= 0]
            if hits:
                at, _, s = min(hits)
                group.texts[i] = text[: at + len(s)] if p.include_stop_str_in_output else text[:at]
                return s
        return None

    def _output(self, rid: str, group: _Group) -> RequestOutput:
        outs = []
        p = group.params
        # as vLLM: with the stop string shown in the output nothing is ever cut from the text, so nothing is held back
        hold = max(len(s) for s in p.stop) - 1 if p.stop and not p.include_stop_str_in_output else 0
        for i, r in enumerate(group.samples):
            text = group.texts[i]
            done = r.status == RequestStatus.FINISHED
            upto = len(text) if done else max(group.sent_chars[i], len(text) - hold)
            delta_text, delta_ids = text[group.sent_chars[i]: upto], r.output_token_ids[group.sent_tokens[i]:]
            group.sent_chars[i], group.sent_tokens[i] = upto, len(r.output_token_ids)
            outs.append(CompletionOutput(  # text too holds back what could still start a stop string, as vLLM's
                index=i, text=text[:upto], token_ids=list(r.output_token_ids),
                logprobs=list(r.logprobs) if p.logprobs is not None else None,
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                cumulative_logprob=r.cumulative_logprob if p.logprobs is not None else None,
                delta_text=delta_text, delta_token_ids=list(delta_ids),
            ))
        first = group.samples[0]
        return RequestOutput(
            request_id=rid, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=list(first.prompt_logprobs) if group.params.prompt_logprobs is not None else None,
            outputs=outs, finished=all(r.status == RequestStatus.FINISHED for r in group.samples),
            metrics=group.metrics, num_cached_tokens=first.num_cached_tokens,
        )


def _last_index(ids: list[int], token: int | None) -> int | None:
    if token is None or token not in ids:
        return None
    return len(ids) - 1 - ids[::-1].index(token)


def _length_reason(req: Request, max_model_len: int) -> str | None:
    """The finish reason "length" once a request has max_tokens outputs or fills max_model_len, else None."""
    if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= max_model_len:
        return "length"
    return None
