"""What the chat and completions handlers share: the serving context, SSE framing, waiting for a result while
watching for a client that goes away, merging several request streams, and OpenAI's logprob shapes."""
from __future__ import annotations

import asyncio
import codecs
import json
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .async_engine import AsyncEngine, EngineError, EngineStopped, RequestStream
from .protocol import APIError, check_truncation, context_length_error, new_id

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf
_PROBE_CHARS_PER_TOKEN = 8  # a long text's first probe: this many characters per token of max_model_len
_TRUNCATE_CHARS_PER_TOKEN = 64  # the longest text a request that truncates its prompt may send, per token


class ServingContext:
    """The engine and what every handler needs to know about the model it serves."""

    def __init__(self, engine: AsyncEngine, model_name: str, trust_request_chat_template: bool = False,
                 exclude_tools_when_tool_choice_none: bool = False):
        self.engine, self.model_name = engine, model_name
        self.trust_request_chat_template = trust_request_chat_template  # a request's chat_template may replace ours
        # tool_choice "none" leaves the tools out of the prompt (by default the model sees them, as in vLLM)
        self.exclude_tools_when_tool_choice_none = exclude_tools_when_tool_choice_none
        self.sampling_defaults = engine.llm.sampling_defaults  # generation_config.json's, for fields a request omits
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.tokens = TokenTexts(engine.tokenizer) if engine.tokenizer is not None else None

    def check_model(self, model: str | None) -> None:
        """A request's model: the served one, or left out (None or empty: the served one, as in vLLM)."""
        if model and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           "model", "model_not_found")

    def check_generation_request(self, req) -> None:
        """What every /v1 generation request is checked for first: the model it names, its truncate_prompt_tokens,
        and vLLM's cache_salt (it keeps tenants' prefix-cache entries apart; ours are shared by all requests, so a
        salted request is refused while the prefix cache is on, and asks for nothing while it is off)."""
        self.check_model(req.model)
        check_truncation(req, self.max_model_len)  # before encoding a long text only to refuse it
        if (req.model_extra or {}).get("cache_salt") and self.engine.core.scheduler.cache is not None:
            raise APIError(400, "'cache_salt' is not supported: this server's prefix cache is shared by all requests; "
                                "to keep tenants apart, serve without --enable-prefix-caching.", "cache_salt")

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.json, so it can only take token-id prompts on "
                                "/v1/completions.")

    def encode(self, text: str, field: str, truncating: bool = False) -> list[int]:
        """A prompt's token ids. The tokenizer holds the GIL and runs on the event loop, so a text that cannot fit
        is refused after encoding prefixes of at most about twice the longest prompt that can (an 18 MB prompt
        took 19 s to encode, stalling every other client): prefixes double from 8 characters per token of
        max_model_len until one has more tokens than fit, with a margin for the word the cut splits, or the
        whole text is read. truncating (the request keeps only the prompt's last tokens): the whole text is
        encoded, up to 64 characters per token of max_model_len."""
        limit = self.max_model_len
        if truncating:
            if len(text) > _TRUNCATE_CHARS_PER_TOKEN * limit:
                raise APIError(400, f"the prompt has {len(text)} characters, more than truncate_prompt_tokens reads "
                                    f"({_TRUNCATE_CHARS_PER_TOKEN} per token of max_model_len {limit}): shorten it.",
                               field)
            return self.tokenizer.encode(text)
        cut = _PROBE_CHARS_PER_TOKEN * limit
        while cut < len(text):
            if len(self.tokenizer.encode(text[:cut])) > limit + 64:
                raise context_length_error(limit, "and the prompt has more: shorten the prompt or raise "
                                                  "max_model_len.", field)
            cut *= 2
        return self.tokenizer.encode(text)

    async def add(self, ids: list[int], params: SamplingParams, request_id: str, prompt: str | None,
                  structured_field: str = "response_format", prompt_field: str = "prompt") -> RequestStream:
        """Queue a request; the engine's refusals become 400s naming the field: structured_field is the one that
        carried a structured-output spec the engine refused, prompt_field the one the prompt came from (a chat's
        messages)."""
        try:
            return await self.engine.add_request(ids, params, request_id, prompt)
        except ValueError as e:
            raise APIError(400, str(e), refused_field(str(e), structured_field, prompt_field)) from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None


def response_id(prefix: str, req, raw: Request | None) -> str:
    """The id a response reports, as vLLM builds it: prefix-<the X-Request-Id header>, else prefix-<the body's
    request_id>, else a random one (an empty one counts as none). Only the response carries it: the engine keeps
    its own random ids (new_id), since two clients may send the same id, and one shaped like "<id>#1" would name
    another request's second sample there."""
    given = (raw.headers.get("x-request-id") if raw is not None else None) or req.request_id
    return f"{prefix}-{given}" if given else new_id(prefix)


async def add_all(ctx: ServingContext, requests: list[tuple]) -> list[RequestStream]:
    """Queue several requests (ctx.add's arguments each) at once, in order, and wait for the engine to take them all:
    awaited one by one, each waited for the engine's next step before the next was sent, so a batch of 40 prompts
    took 40 steps to queue (seconds behind running decodes) and its prompts were prefilled one a step instead of
    together. If one is refused, or the caller is cancelled, those queued are aborted; the first refusal is raised."""
    tasks = [asyncio.ensure_future(ctx.add(*r)) for r in requests]
    try:
        await asyncio.wait(tasks)
    except BaseException:  # cancelled: abort whatever was queued or is about to be
        for t in tasks:
            t.add_done_callback(_abort_added)
            t.cancel()
        raise
    errors = [t.exception() for t in tasks]  # every one read: asyncio logs an exception nobody retrieved
    if any(e is not None for e in errors):
        for t, e in zip(tasks, errors):
            if e is None:
                t.result().abort()
        raise next(e for e in errors if e is not None)
    return [t.result() for t in tasks]


def _abort_added(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().abort()


def refused_field(message: str, structured_field: str = "response_format", prompt_field: str = "prompt") -> str | None:
    """The request field an engine refusal is about: the one its message names first (a field named later is the
    alternative it offers: "bad_words need the model's tokenizer.json; ban token ids with logit_bias")."""
    fields = (("allowed_token_ids", "allowed_token_ids"), ("bad_words", "bad_words"), ("stop strings", "stop"),
              ("stop_token_ids", "stop_token_ids"),
              ("logit_bias", "logit_bias"), ("structured output", structured_field), ("prompt", prompt_field))
    named = sorted((message.find(f), p) for f, p in fields if f in message)
    return named[0][1] if named else None


class EngineStreamingResponse(StreamingResponse):
    """SSE response that aborts its requests however it ends: finished, client gone, or cancelled before the
    body iterator even started (then the generator's own cleanup never runs)."""

    def __init__(self, content, streams: list[RequestStream]):
        super().__init__(content, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:
                s.abort()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: BaseException) -> str:
    err = e if isinstance(e, APIError) else APIError(500, str(e) or type(e).__name__)
    return sse(err.body())


def engine_api_error(e: BaseException) -> APIError:
    if isinstance(e, EngineStopped):
        return APIError(503, str(e))
    if isinstance(e, EngineError):
        return APIError(500, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(streams: list[RequestStream], receive) -> list[RequestOutput]:
    """Wait for every stream's final output; if the client disconnects first, abort them (frees their blocks and
    slots) and raise APIError(499), a status nobody reads. receive: the request's ASGI receive (body already read)."""

    async def last(stream: RequestStream) -> RequestOutput:
        out = None
        async for out in stream:
            pass
        return out

    work = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
    # a cancelled gather keeps CancelledError as its exception: read it, or asyncio logs a traceback per disconnect
    work.add_done_callback(lambda f: f.cancelled() or f.exception())
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError(499, "the client disconnected before the response was ready")
        return work.result()
    finally:
        watch.cancel()
        work.cancel()
        for s in streams:
            s.abort()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) pairs as they arrive; closing the iterator aborts the streams still running."""
    try:
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for s in streams:
            s.abort()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class TokenTexts:
    """token id -> (text, UTF-8 bytes) for logprobs; a byte-level token that is part of a character decodes
    to U+FFFD in `text` but keeps its real bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if piece and all(c in _UNICODE_TO_BYTE for c in piece):
                raw = bytes(_UNICODE_TO_BYTE[c] for c in piece)
            else:  # added tokens (<think>, <|im_end|>) are stored as their text
                raw = piece.encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit


def _top(d: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:k]


def _top_with(d: dict[int, float], k: int, tok: int) -> list[tuple[int, float]]:
    """The k most likely tokens and `tok` (the sampled or prompt token), most likely first: the legacy completions
    API always reports the chosen token's logprob among top_logprobs, so up to k + 1 entries (OpenAI's and vLLM's)."""
    top = _top(d, k)
    if all(t != tok for t, _ in top):
        top = sorted(top + [(tok, d[tok])], key=lambda kv: -kv[1])
    return top


def _shown(tokens: TokenTexts, tok: int, as_ids: bool) -> str:
    """A logprob entry's token: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids: tokens that are not
    whole characters stay distinguishable)."""
    return f"token_id:{tok}" if as_ids else tokens(tok)[0]


def chat_logprobs(tokens: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float]], k: int,
                  as_ids: bool = False) -> dict:
    """OpenAI chat `logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}; `bytes` are the
    token's own either way."""
    content = []
    for tok, lp in zip(token_ids, logprobs):
        top = [{"token": _shown(tokens, t, as_ids), "logprob": max(v, _LOGPROB_FLOOR), "bytes": tokens(t)[1]}
               for t, v in _top(lp, k)]
        content.append({"token": _shown(tokens, tok, as_ids), "logprob": max(lp[tok], _LOGPROB_FLOOR),
                        "bytes": tokens(tok)[1], "top_logprobs": top})
    return {"content": content}


class TextOffsets:
    """OpenAI's text_offset of each token in turn: where its text starts in the text its bytes decode to (an echoed
    prompt's, or a completion's from after the echo). A token that ends inside a multi-byte character adds no
    character until the token that completes it (its text shows up then, in the stream too) or cuts it short (its
    "\ufffd" then comes before that token's text), and a special token the text leaves out (skip:
    skip_special_tokens) adds none: counting each token's own text ("\ufffd" for a part of a character,
    "<|im_end|>") ran the offsets past the end of the text."""

    def __init__(self, tokens: TokenTexts, start: int = 0, skip: frozenset[int] | set[int] = frozenset()):
        self.tokens, self.next, self.skip = tokens, start, skip
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a character's first bytes

    def take(self, token_id: int) -> int:
        """token_id's offset; the next token's starts after the characters it completes."""
        if token_id in self.skip:
            return self.next
        data = bytes(self.tokens(token_id)[1])
        # the "\ufffd" of a character an earlier token began and this one cuts short comes before this token's
        # text: without it the offset pointed at the "\ufffd" ("\ufffdges" gave [0, 0], not [0, 1])
        at = self.next + self._cut_chars(data)
        self.next += len(self._utf8.decode(data))
        return at

    def _cut_chars(self, data: bytes) -> int:
        """How many characters (each "\ufffd") the bytes still held decode to when data's first byte cannot go on
        with them; 0 when nothing is held or data continues the character."""
        held = self._utf8.getstate()[0]
        if not held or not data:
            return 0
        try:
            codecs.getincrementaldecoder("utf-8")().decode(held + data[:1])
        except UnicodeDecodeError:
            return len(held.decode("utf-8", errors="replace"))
        return 0


def completion_logprobs(tokens: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float] | None], k: int,
                        offsets: TextOffsets, as_ids: bool = False) -> dict:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset (taken from `offsets`, which
    carries on across calls: into the text, also when tokens are named by id). A None entry (a prompt's first token,
    which nothing predicts) gives null logprobs, as OpenAI's echo does."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp in zip(token_ids, logprobs):
        out["tokens"].append(_shown(tokens, tok, as_ids))
        out["token_logprobs"].append(None if lp is None else max(lp[tok], _LOGPROB_FLOOR))
        top = None if lp is None else {_shown(tokens, t, as_ids): max(v, _LOGPROB_FLOOR)
                                       for t, v in _top_with(lp, k, tok)}
        out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.take(tok))
    return out


def join_logprobs(first: dict, second: dict) -> dict:
    """Two completion_logprobs dicts -> one, first's tokens before second's (echoed prompt, then the completion)."""
    return {key: first[key] + second[key] for key in first}
