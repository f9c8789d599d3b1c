"""/v1/completions: one or several prompts (text or token ids), `n` samples each, streamed or not.

Choice `index` is prompt_index * n + sample_index, as in OpenAI's API.
"""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .protocol import (APIError, CompletionRequest, check_max_tokens, new_id, now, sampling_params,
                       structured_outputs, truncate, usage)
from .serving import (SSE_DONE, EngineStreamingResponse, ServingContext, TextOffsets, add_all, collect,
                      completion_logprobs, engine_api_error, join_logprobs, merge, response_id, sse,
                      sse_error)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _prompts(ctx: ServingContext, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """-> (text or None, token ids) per prompt."""
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else p
        ctx.require_tokenizer()
        return [(t, ctx.encode(t, "prompt", req.truncate_prompt_tokens is not None)) for t in texts]
    if not p:
        raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids.", "prompt")
    batches = [p] if isinstance(p[0], int) else p
    return [(None, list(ids)) for ids in batches]


def _check(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported; remove it from the request.", "suffix")


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.check_generation_request(req)
    _check(req)
    # truncate_prompt_tokens -1 leaves room for what is asked: left out, OpenAI's default 16 (null: one token)
    wanted = req.max_tokens if "max_tokens" in req.model_fields_set else DEFAULT_MAX_TOKENS
    prompts = [(text, ids) if len(cut := truncate(req, ids, ctx.max_model_len, wanted)) == len(ids)
               else (None, cut) for text, ids in _prompts(ctx, req)]  # a cut prompt is echoed from its ids
    limits = [_max_tokens(ctx, req, ids) for _, ids in prompts]
    for (_, ids), limit in zip(prompts, limits):
        check_max_tokens(limit, len(ids), ctx.max_model_len, min_tokens=req.min_tokens, scores_only=_echo_only(req))
    # echo with logprobs scores the prompt too (OpenAI's legacy behaviour, what evaluation harnesses rely on)
    structured = structured_outputs(req.response_format)
    params = {limit: sampling_params(req, limit, req.logprobs, structured, req.logprobs if req.echo else None,
                                     ctx.sampling_defaults) for limit in set(limits)}
    rid = new_id("cmpl")  # the engine's id, never the client's (response_id)
    spec_field = "response_format" if structured is not None else "structured_outputs"
    streams = await add_all(ctx, [(ids, params[limit], rid if len(prompts) == 1 else f"{rid}-{i}", text, spec_field)
                                  for i, ((text, ids), limit) in enumerate(zip(prompts, limits))])
    echoes = [_echo_text(ctx, text, ids) if req.echo else "" for text, ids in prompts]
    head = {"id": response_id("cmpl", req, raw), "created": now(), "model": ctx.model_name}
    if req.stream:
        return EngineStreamingResponse(_stream(ctx, req, streams, echoes, head), streams)
    try:
        finals = await collect(streams, raw.receive)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - engine failures become 500/503 with one sentence
        raise engine_api_error(e) from None
    return JSONResponse(_full_response(ctx, req, finals, echoes, head))


def _max_tokens(ctx: ServingContext, req: CompletionRequest, ids: list[int]) -> int | None:
    """A prompt's token limit: the request's; left out, OpenAI's default 16 cut to what fits after this prompt (which
    may not fit at all); an explicit null, None: what the context leaves (vLLM's field defaults to 16, and only its
    null means no limit of the request's own); for echo with max_tokens 0 (score the prompt only) one token, which
    the response leaves out."""
    if req.max_tokens is None:
        if "max_tokens" in req.model_fields_set:
            return None
        return max(1, min(DEFAULT_MAX_TOKENS, ctx.max_model_len - len(ids)))
    if req.max_tokens == 0 and req.echo:
        if req.min_tokens:
            raise APIError(400, f"min_tokens is {req.min_tokens} but max_tokens 0 with echo generates nothing; drop "
                                f"min_tokens.", "min_tokens")
        return 1
    return req.max_tokens


def _echo_only(req: CompletionRequest) -> bool:
    """echo with max_tokens 0: the response holds the prompt (and its logprobs) and no generated token."""
    return req.echo and req.max_tokens == 0


def _echo_text(ctx: ServingContext, text: str | None, ids: list[int]) -> str:
    if text is not None:
        return text
    ctx.require_tokenizer()
    return ctx.tokenizer.decode(ids, skip_special_tokens=False)


def _prompt_logprobs(ctx: ServingContext, req: CompletionRequest, out, k: int) -> dict:
    """The echoed prompt's logprobs (first token null) from a RequestOutput's prompt_logprobs."""
    return completion_logprobs(ctx.tokens, out.prompt_token_ids, out.prompt_logprobs, k, TextOffsets(ctx.tokens),
                               req.return_tokens_as_token_ids)


def _offsets(ctx: ServingContext, req: CompletionRequest, echo: str) -> TextOffsets:
    """The text offsets of a choice's generated tokens: after the echoed prompt, special tokens counted only when the
    text shows them."""
    skip = ctx.tokenizer.special_token_ids if req.skip_special_tokens else frozenset()
    return TextOffsets(ctx.tokens, len(echo), skip)


def _full_response(ctx: ServingContext, req: CompletionRequest, finals, echoes: list[str], head: dict) -> dict:
    choices, n_prompt, n_out = [], 0, 0
    n_cached = sum(final.num_cached_tokens for final in finals)
    for i, final in enumerate(finals):
        n_prompt += len(final.prompt_token_ids)
        prompt_lp = _prompt_logprobs(ctx, req, final, req.logprobs) if req.echo and req.logprobs is not None else None
        for c in final.outputs:
            if _echo_only(req):
                choices.append({"index": i * req.n + c.index, "text": echoes[i], "logprobs": prompt_lp,
                                "finish_reason": "length", "stop_reason": None})
                continue
            n_out += len(c.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(ctx.tokens, c.token_ids, c.logprobs, req.logprobs,
                                         _offsets(ctx, req, echoes[i]), req.return_tokens_as_token_ids)
                if prompt_lp is not None:
                    lp = join_logprobs(prompt_lp, lp)
            choices.append({"index": i * req.n + c.index, "text": echoes[i] + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        if req.return_token_ids:  # vLLM's: each choice has its prompt's ids and its own
            for choice, c in zip(choices[-len(final.outputs):], final.outputs):
                choice["prompt_token_ids"] = list(final.prompt_token_ids)
                choice["token_ids"] = [] if _echo_only(req) else list(c.token_ids)
    choices.sort(key=lambda c: c["index"])
    return {**head, "object": "text_completion", "choices": choices, "usage": usage(n_prompt, n_out, n_cached)}


async def _stream(ctx: ServingContext, req: CompletionRequest, streams, echoes: list[str],
                  head: dict) -> AsyncIterator[str]:
    head = {**head, "object": "text_completion"}
    extra = {"usage": None} if req.include_usage else {}
    sent_tokens: dict[int, int] = {}  # choice index -> tokens whose logprobs were sent
    sent_ids: dict[int, int] = {}  # choice index -> tokens whose ids were sent (return_token_ids)
    seen: dict[int, int] = {}  # choice index -> its tokens so far
    offsets: dict[int, TextOffsets] = {}  # choice index -> text offsets of its next tokens (echo included)
    done: set[int] = set()
    n_prompt, n_out = sum(s.num_prompt_tokens for s in streams), 0
    cached: dict[int, int] = {}  # prompt index -> its tokens from the prefix cache
    echo_only = _echo_only(req)
    scored = req.echo and req.logprobs is not None
    try:
        async for i, out in merge(streams):
            cached[i] = out.num_cached_tokens
            for c in out.outputs:
                index = i * req.n + c.index
                if index in done:
                    continue
                if scored and len(out.prompt_logprobs or ()) < len(out.prompt_token_ids) and c.finish_reason is None:
                    continue  # a long prompt is prefilled in chunks: send its echo once all its logprobs are in
                text = "" if echo_only else c.delta_text
                lp = None
                if index not in offsets:  # first delta of this choice: echo the prompt in front
                    text, sent_tokens[index] = echoes[i] + text, 0
                    offsets[index] = _offsets(ctx, req, echoes[i]) if req.logprobs is not None else None
                    if req.echo and req.logprobs is not None:
                        lp = _prompt_logprobs(ctx, req, out, req.logprobs)
                if echo_only:  # the one token generated is not part of the answer
                    c = dataclasses.replace(c, token_ids=[], finish_reason="length", stop_reason=None)
                if req.logprobs is not None and len(c.token_ids) > sent_tokens[index]:
                    s = sent_tokens[index]
                    new = completion_logprobs(ctx.tokens, c.token_ids[s:], c.logprobs[s:], req.logprobs,
                                              offsets[index], req.return_tokens_as_token_ids)
                    lp = new if lp is None else join_logprobs(lp, new)
                    sent_tokens[index] = len(c.token_ids)
                final = c.finish_reason is not None
                if final:
                    done.add(index)
                    n_out += len(c.token_ids)
                # a chunk for every step that made tokens, as vLLM sends them: one whose text is held back (a
                # character cut between tokens, a possible stop string) has empty text, so a client's token timing
                # (inter-token latency) and its token ids do not wait for the text
                fresh = len(c.token_ids) > seen.get(index, 0)
                seen[index] = len(c.token_ids)
                if text or lp or final or fresh:
                    # continuous usage: this prompt's tokens and this choice's so far, as vLLM counts them
                    tail = ({"usage": usage(streams[i].num_prompt_tokens, len(c.token_ids))} if req.continuous_usage
                            else extra)
                    choice = {"index": index, "text": text, "logprobs": lp,
                              "finish_reason": c.finish_reason if final else None,
                              "stop_reason": c.stop_reason if final else None}
                    if req.return_token_ids:  # vLLM's: the prompt's ids with a choice's first chunk, then the new ids
                        if index not in sent_ids:
                            choice["prompt_token_ids"] = list(out.prompt_token_ids)
                        choice["token_ids"] = list(c.token_ids[sent_ids.get(index, 0):])
                        sent_ids[index] = len(c.token_ids)
                    yield sse({**head, "choices": [choice], **tail})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(n_prompt, n_out, sum(cached.values()))})
    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream, then end it
        yield sse_error(engine_api_error(e))
    yield SSE_DONE
