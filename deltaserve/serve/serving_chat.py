"""/v1/chat/completions: render the conversation with the checkpoint's chat template, generate, and split the output
into `reasoning` (also as `reasoning_content`), `content` and `tool_calls` (streamed as OpenAI chat.completion.chunk
deltas)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..sampling_params import StructuredOutputs
from ..tokenizer import TokenizerError, non_text_part_message
from .forced_tools import ForcedToolCalls, forced_schema
from .protocol import (MAX_LOGPROBS, APIError, ChatCompletionRequest, check_max_tokens, new_id, now, sampling_params,
                       structured_outputs, truncate, usage)
from .reasoning import ReasoningParser, Split, prompt_opens_thinking
from .serving import (SSE_DONE, EngineStreamingResponse, ServingContext, chat_logprobs, collect, engine_api_error,
                      merge, response_id, sse, sse_error)
from .tool_parser import ParsedDelta, ToolCallParser

_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "documents", "continue_final_message",
                             "chat_template"}


class ChoiceParser:
    """One choice's streamed text -> reasoning, content and tool-call deltas."""

    def __init__(self, in_reasoning: bool, thinking: bool, tools: list[dict] | None, forced: Forced | None = None,
                 parallel: bool = True, constrained: bool = False):
        self.reasoning = ReasoningParser(in_reasoning=in_reasoning, enabled=thinking, exact_content=constrained,
                                         tool_calls=forced is None and bool(tools))
        self.thinking = thinking
        # OpenAI's finish_reason after calls: "tool_calls" for tool_choice auto or required, "stop" for a named one
        self.named_call = forced is not None and forced.name is not None
        if forced is not None:  # the answer is JSON naming the calls (tool_choice required / a named function)
            self.tools = ForcedToolCalls(forced.name)
        else:
            self.tools = ToolCallParser(tools, parallel) if tools else None
        self.logprobs_sent = 0
        self.ids_sent = 0  # return_token_ids: the tokens whose ids a chunk carried
        self.done = False

    def feed(self, text: str, final: bool) -> tuple[str, ParsedDelta]:
        split = self.reasoning.feed(text)
        if final:
            tail = self.reasoning.finish()
            split = Split(split.reasoning + tail.reasoning, split.content + tail.content)
        if self.tools is None:
            return split.reasoning, ParsedDelta(content=split.content)
        parsed = self.tools.feed(split.content)
        if final:
            tail = self.tools.finish()
            parsed.content += tail.content
            for d in tail.tool_calls:
                parsed.add_call(d)
        return split.reasoning, parsed

    def finish_reason(self, reason: str | None) -> str | None:
        """The choice's OpenAI finish_reason: "tool_calls" for an answer that ended ("stop") after whole calls, under
        tool_choice auto or required; "stop" under a named function (as OpenAI and vLLM) or when the text ended
        inside the last call's arguments (a stop string, or EOS there: they are not whole)."""
        if reason != "stop" or self.tools is None or not self.tools.calls or self.named_call:
            return reason
        return "stop" if self.tools.cut else "tool_calls"


def _message_dicts(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise APIError(400, non_text_part_message(i, bad[0]), f"messages.{i}.content")
            # joined by the tokenizer, as its chat template takes them; a part without text is skipped, as by vLLM
            content = [{"type": "text", "text": p.text} for p in content if p.text is not None]
        d = {**(m.model_extra or {}), "role": m.role, "content": content}  # developer: the tokenizer's system
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


@dataclass(frozen=True)
class Forced:
    """A tool choice that forces calls: `name` the named function, or None for "required"."""
    name: str | None


def _tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The request's tools (None without any), after checking tool_choice."""
    choice = req.tool_choice
    if not (choice in (None, "auto", "none", "required") or isinstance(choice, dict)):
        raise APIError(400, f"tool_choice must be 'auto', 'none', 'required' or a named function, got {choice!r}.",
                       "tool_choice")
    if not req.tools:
        if choice == "required" or isinstance(choice, dict):
            raise APIError(400, "tool_choice 'required' or a named function needs tools.", "tool_choice")
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def _rendered_tools(ctx: ServingContext, req: ChatCompletionRequest, tools: list[dict] | None) -> list[dict] | None:
    """The tools the chat template shows the model: under tool_choice "none" too (vLLM's default), unless the server
    was started with --exclude-tools-when-tool-choice-none."""
    return None if req.tool_choice == "none" and ctx.exclude_tools_when_tool_choice_none else tools


def _parsed_tools(req: ChatCompletionRequest, tools: list[dict] | None) -> list[dict] | None:
    """The tools whose calls are parsed out of the answer: none under tool_choice "none" (a <tool_call> the model
    writes anyway stays content, as in vLLM)."""
    return None if req.tool_choice == "none" else tools


def _forced(req: ChatCompletionRequest, tools: list[dict] | None) -> Forced | None:
    """tool_choice "required" or {"type": "function", "function": {"name": ...}} -> what it forces, else None."""
    choice = req.tool_choice
    if choice == "required":
        return Forced(None)
    if not isinstance(choice, dict):
        return None
    function = choice.get("function") if choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools or []}:
        raise APIError(400, f"tool_choice names no function of tools: {json.dumps(choice)[:80]}.", "tool_choice")
    return Forced(name)


def _render(ctx: ServingContext, req: ChatCompletionRequest, tools: list[dict] | None) -> str:
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set '{reserved[0]}'; use the request field instead.",
                       "chat_template_kwargs")
    if req.chat_template is not None and not ctx.trust_request_chat_template:
        raise APIError(400, "This server renders chats with its own template; a request's chat_template is taken "
                            "only when the server is started with --trust-request-chat-template.", "chat_template")
    try:
        return ctx.tokenizer.apply_chat_template(_message_dicts(req), add_generation_prompt=req.add_generation_prompt,
                                                 tools=tools, continue_final_message=req.continue_final_message,
                                                 chat_template=req.chat_template, documents=req.documents,
                                                 **kwargs)
    except TokenizerError as e:
        raise APIError(400, str(e), "messages") from None


def chat_prompt(ctx: ServingContext, req: ChatCompletionRequest) -> str:
    """The conversation rendered with the chat template (and its tools), as the engine will see it."""
    return _render(ctx, req, _rendered_tools(ctx, req, _tools(req)))


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.check_generation_request(req)
    ctx.require_tokenizer()
    tools = _tools(req)
    prompt = _render(ctx, req, _rendered_tools(ctx, req, tools))  # chat_prompt's, with the tools dumped once
    tools = _parsed_tools(req, tools)
    ids = ctx.encode(prompt, "messages", req.truncate_prompt_tokens is not None)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if len(cut := truncate(req, ids, ctx.max_model_len, max_tokens)) < len(ids):
        ids, prompt = cut, ctx.tokenizer.decode(cut, skip_special_tokens=False)
    check_max_tokens(max_tokens, len(ids), ctx.max_model_len, field, req.min_tokens, "messages")
    if req.top_logprobs and not req.logprobs:  # 0 asks for nothing: vLLM takes it without logprobs (their default)
        raise APIError(400, "top_logprobs needs logprobs set to true.", "top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}.", "top_logprobs")
    forced, structured = _forced(req, tools), structured_outputs(req.response_format)
    parallel = req.parallel_tool_calls is not False  # false: one call, under every tool_choice
    if forced is not None:
        if structured is not None or req.structured_outputs:
            raise APIError(400, "tool_choice 'required' or a named function constrains the answer itself; drop "
                                "response_format / structured_outputs.", "tool_choice")
        structured = StructuredOutputs(json=forced_schema(tools, forced.name, parallel))
    params = sampling_params(req, max_tokens, k, structured, defaults=ctx.sampling_defaults)
    thinking = (req.chat_template_kwargs or {}).get("enable_thinking", True) is not False
    constrained = params.structured_outputs is not None
    parsers = [ChoiceParser(prompt_opens_thinking(prompt), thinking, tools, forced, parallel, constrained)
               for _ in range(req.n)]
    rid = new_id("chatcmpl")  # the engine's id, never the client's (response_id)
    spec_field = "tool_choice" if forced else "structured_outputs" if req.structured_outputs else "response_format"
    stream = await ctx.add(ids, params, rid, prompt, spec_field, "messages")
    head = {"id": response_id("chatcmpl", req, raw), "created": now(), "model": ctx.model_name}
    if req.stream:
        return EngineStreamingResponse(_stream(ctx, req, stream, parsers, head, k, ids), [stream])
    try:
        (final,) = await collect([stream], raw.receive)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - engine failures become 500/503 with one sentence
        raise engine_api_error(e) from None
    return JSONResponse(_full_response(ctx, req, final, parsers, head, k))


def _full_response(ctx: ServingContext, req: ChatCompletionRequest, final, parsers: list[ChoiceParser], head: dict,
                   k: int | None) -> dict:
    choices = []
    for c in final.outputs:
        p = parsers[c.index]
        reasoning, parsed = p.feed(c.text, final=True)
        calls = p.tools.calls if p.tools is not None else []
        shown = (reasoning or None) if req.include_reasoning else None
        # an empty answer is null beside calls, and under thinking (vLLM's Qwen3 reasoning parser: an answer cut off
        # inside <think> is all reasoning, no content); with thinking off the text is the answer, even an empty one
        empty = None if calls or p.thinking else ""
        # vLLM's field is `reasoning`; `reasoning_content` (its old name, DeepSeek's) for clients that still read it
        message = {"role": "assistant", "content": parsed.content or empty, "reasoning": shown,
                   "reasoning_content": shown}
        if calls:
            message["tool_calls"] = [{"id": t.id, "type": "function",
                                      "function": {"name": t.name, "arguments": t.whole_arguments}} for t in calls]
        choices.append({
            "index": c.index, "message": message,
            "logprobs": (chat_logprobs(ctx.tokens, c.token_ids, c.logprobs, k, req.return_tokens_as_token_ids)
                         if k is not None else None),
            "finish_reason": p.finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
        if req.return_token_ids:  # vLLM's: the choice's ids here, the prompt's on the response
            choices[-1]["token_ids"] = list(c.token_ids)
    n_out = sum(len(c.token_ids) for c in final.outputs)
    ids = {"prompt_token_ids": list(final.prompt_token_ids)} if req.return_token_ids else {}
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(len(final.prompt_token_ids), n_out, final.num_cached_tokens), **ids}


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, stream, parsers: list[ChoiceParser],
                  head: dict, k: int | None, prompt_ids: list[int]) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if req.include_usage else {}

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None, n_tokens=0,
              ids: dict | None = None) -> str:
        """n_tokens: the choice's tokens so far, its usage under continuous_usage_stats. ids: return_token_ids'
        fields, the prompt's on the response (first chunk), the new tokens' on the choice."""
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:  # the last chunk of a choice says what stopped it, as the full response does
            choice["stop_reason"] = stop_reason
        ids = ids or {}
        if "token_ids" in ids:
            choice["token_ids"] = ids["token_ids"]
        top = {"prompt_token_ids": ids["prompt_token_ids"]} if "prompt_token_ids" in ids else {}
        if req.continuous_usage:
            return sse({**head, "choices": [choice], "usage": usage(n_prompt, n_tokens), **top})
        return sse({**head, "choices": [choice], **extra, **top})

    n_prompt, n_out, n_cached = stream.num_prompt_tokens, 0, 0
    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""},
                        ids={"prompt_token_ids": prompt_ids} if req.return_token_ids else None)
        async for _, out in merge([stream]):
            n_cached = out.num_cached_tokens
            for c in out.outputs:
                p = parsers[c.index]
                if p.done:
                    continue
                final = c.finish_reason is not None
                reasoning, parsed = p.feed(c.delta_text, final)
                delta = {}
                if reasoning and req.include_reasoning:
                    delta["reasoning"] = delta["reasoning_content"] = reasoning  # both names, as in the message
                if parsed.content:
                    delta["content"] = parsed.content
                if parsed.tool_calls:
                    delta["tool_calls"] = [t.to_openai() for t in parsed.tool_calls]
                lp = None
                if k is not None and len(c.token_ids) > p.logprobs_sent:
                    lp = chat_logprobs(ctx.tokens, c.token_ids[p.logprobs_sent:], c.logprobs[p.logprobs_sent:], k,
                                       req.return_tokens_as_token_ids)
                    p.logprobs_sent = len(c.token_ids)
                if final:
                    p.done = True
                    n_out += len(c.token_ids)
                # return_token_ids: a chunk for every step that made tokens, as vLLM sends them, its delta empty
                # where their text is held back (a character cut between tokens, a possible stop string, a tag
                # the parsers have not read whole), so the ids never wait for the text
                fresh = req.return_token_ids and len(c.token_ids) > p.ids_sent
                if delta or lp or final or fresh:
                    ids = None
                    if req.return_token_ids:
                        ids, p.ids_sent = {"token_ids": list(c.token_ids[p.ids_sent:])}, len(c.token_ids)
                    yield chunk(c.index, delta, lp, p.finish_reason(c.finish_reason) if final else None,
                                c.stop_reason if final else None, len(c.token_ids), ids)
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(n_prompt, n_out, n_cached)})
    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream, then end it
        yield sse_error(engine_api_error(e))
    yield SSE_DONE
