"""OpenAI request schemas (pydantic), their mapping to SamplingParams, and the OpenAI error shape.

Requests are validated strictly ("5" is not an integer); fields OpenAI clients commonly send but deltaserve does not
use are accepted and ignored, and options it cannot honour are rejected with one sentence rather than ignored.
Responses are plain dicts built by serving_chat.py / serving_completion.py (cheaper than models per SSE chunk).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from ..sampling_params import SamplingParams, StructuredOutputs, truncated_prompt

logger = logging.getLogger("deltaserve.serve")
MAX_LOGPROBS = 20  # top logprobs per token a request may ask for (OpenAI's limit)
Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """An explicit null on a field with a default means that default (OpenAI's spec marks n, stream, logprobs,
        echo... nullable; vLLM declares them Optional); on a required field it stays an error."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None}


class StreamOptions(_Model):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: with include_usage, every chunk has its choice's usage so far


class ContentPart(_Model):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class FunctionSpec(_Model):
    name: StrictStr = Field(min_length=1)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _properties_object(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # the tool-call parser reads each argument's type from here (and the template lists them)
        if v is not None and not isinstance(v.get("properties", {}), dict):
            raise ValueError("'properties' must be a JSON object mapping each parameter to its schema")
        return v


class ToolSpec(_Model):
    type: Literal["function"]
    function: FunctionSpec


class _SamplingRequest(_Model):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI's plus vLLM's common extras)."""
    model: StrictStr | None = None  # required by OpenAI; vLLM serves its model when it is left out (or empty)
    n: StrictInt = 1
    max_tokens: StrictInt | None = None
    min_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True  # vLLM's; no effect with a byte-level tokenizer (sampling_params)
    include_stop_str_in_output: StrictBool = False
    logit_bias: dict[str, Number] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[StrictStr] | None = None
    return_tokens_as_token_ids: StrictBool = False  # logprobs name tokens "token_id:<id>" (vLLM's)
    return_token_ids: StrictBool = False  # vLLM's: the prompt's token ids and each choice's (RL rollout clients)
    truncate_prompt_tokens: StrictInt | None = None  # keep the prompt's last k tokens (-1: as many as fit)
    structured_outputs: dict[str, Any] | None = None  # vLLM's extra: {"json" | "json_object" | "regex" | "choice": ...}
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    best_of: StrictInt | None = None  # vLLM takes it on both endpoints; only best_of == n (sampling_params)
    request_id: StrictStr | None = None  # vLLM's: the response's id after its prefix, unless X-Request-Id is sent

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats: each chunk's usage counts its prompt and its choice's tokens so far (only
        with include_usage, as in vLLM)."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: StrictStr | None = None  # vLLM's: Jinja in place of the model's (--trust-request-chat-template)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False  # vLLM's: the answer continues the last (assistant) message
    documents: list[dict[str, Any]] | None = None  # vLLM's (RAG): the chat template's `documents` variable
    include_reasoning: StrictBool = True  # vLLM's: false leaves reasoning_content out (the reasoning still runs)
    response_format: dict[str, Any] | None = None


class TokenizeRequest(_Model):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered with the chat template as for a chat request.
    model: optional, as in vLLM (when given, it must be the served model)."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None  # "none" leaves the tools out of the prompt, as in chat
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: StrictStr | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    documents: list[dict[str, Any]] | None = None
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False  # vLLM's: also each token's vocabulary piece (HF's convert_ids_to_tokens)


class DetokenizeRequest(_Model):
    """POST /detokenize (vLLM's): token ids -> text, special tokens written out; model optional as for /tokenize."""
    model: StrictStr | None = None
    tokens: list[StrictInt]


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False  # with max_tokens 0: the prompt alone, scored (logprobs), nothing generated
    response_format: dict[str, Any] | None = None  # as for chat (vLLM takes it here too)
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        """One sentence naming every shape taken: the union's own error named its first member only ("input should be
        a valid string" for [["a"]])."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)  # type(): true is not a token id
        if isinstance(v, str) or ids(v) or (isinstance(v, list) and (all(isinstance(x, str) for x in v)
                                                                   or all(ids(x) for x in v))):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of token-id lists")


# Fields of OpenAI's legacy API or of other servers that deltaserve does not honour: ignoring one would silently drop
# what the client asked for (a constraint, a function call), so a request setting one is refused with the alternative.
UNSUPPORTED_FIELDS = {
    "functions": "use tools", "function_call": "use tool_choice",
    "guided_json": "use structured_outputs {\"json\": ...} or response_format",
    "guided_regex": "use structured_outputs {\"regex\": ...}",
    "guided_choice": "use structured_outputs {\"choice\": ...}",
    "guided_grammar": "grammars are not supported; structured_outputs takes json, json_object, regex or choice",
    "guided_decoding_backend": "structured outputs always use xgrammar",
    "guided_whitespace_pattern": "structured outputs use xgrammar's default whitespace",
    "prompt_logprobs": "on /v1/completions, echo with logprobs scores the prompt",
    "use_beam_search": "beam search is not supported", "logits_processors": "logits processors are not supported",
    "length_penalty": "beam search is not supported", "early_stopping": "beam search is not supported",
    "echo": "on /v1/chat/completions the answer does not repeat the prompt",  # a declared field on /v1/completions
    "priority": "requests are scheduled first come, first served",
    "structural_tag": "structured_outputs takes json, json_object, regex or choice",
    "prompt_embeds": "give the prompt as text or token ids",
    # chat's fields (declared there), sent to /v1/completions
    "max_completion_tokens": "on /v1/completions the limit is max_tokens",
    "top_logprobs": "on /v1/completions logprobs is the number of top logprobs per token",
}
# values of those fields that ask for nothing (vLLM's defaults)
_NEUTRAL = {"length_penalty": 1, "priority": 0, "top_logprobs": 0}


# a JSON string escape, a lone surrogate one (group 1) among them: a high one not followed by a low one, or a low one
# not after a high one. Every escape is matched from its backslash on, so JSON's "\\ud800" is a backslash and text.
_ESCAPE = re.compile(rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                     rb"|(u[dD][89a-fA-F][0-9a-fA-F]{2})|[\s\S])")


def _replace_lone_surrogates(body: bytes) -> bytes:
    """The body with each lone UTF-16 surrogate escape ("\\ud83d": JavaScript's JSON.stringify writes half of a cut
    emoji so, and Python's json takes it) written as U+FFFD, as a UTF-8 encoder writes one: a surrogate is not a
    character, and pydantic refuses it ("unexpected end of hex escape") where vLLM's json takes it."""
    return _ESCAPE.sub(lambda m: b"\\ufffd" if m.group(1) else m.group(0), body)


_READ_EXTRAS = {"cache_salt"}  # extra fields the server reads (serving.check_generation_request)


def parse_request(cls: type[_Model], body: bytes) -> Any:
    """Raw body -> a validated request; APIError(400) naming the field for malformed JSON, bad types or a field
    deltaserve cannot honour (UNSUPPORTED_FIELDS, when set to anything but null / false / empty). A lone surrogate
    escape reads as U+FFFD (_replace_lone_surrogates; looked for only in a body that did not parse)."""
    try:
        req = cls.model_validate_json(body)
    except ValidationError as e:
        fixed = _replace_lone_surrogates(body) if e.errors()[0]["type"] == "json_invalid" else body
        if fixed == body:
            raise validation_error(e) from None
        return parse_request(cls, fixed)
    if req.model_extra:
        for name, value in req.model_extra.items():
            # `is`: 0 == False, and prompt_logprobs=0 asks for something
            if name in UNSUPPORTED_FIELDS and not (value is None or value is False or value in ([], {}, "")
                                                   or value == _NEUTRAL.get(name)):
                raise APIError(400, f"'{name}' is not supported: {UNSUPPORTED_FIELDS[name]}.", name)
        ignored = sorted(set(req.model_extra) - _READ_EXTRAS)
        if ignored:  # as vLLM warns: a misspelt field would otherwise change nothing without a word
            logger.warning("The following fields were present in the request but ignored: %s", ignored)
    return req


def validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    err = errors[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])}).")
    loc = _field_path(err)
    if not loc:
        return APIError(400, "The request body must be a JSON object with the request's fields.")
    param = ".".join(loc)
    if err["type"] == "missing":
        return APIError(400, f"The request is missing the required field '{param}'.", param)
    shown = json.dumps(err.get("input"))[:80]
    # a union field (Number, str | list[str]) fails once per member: say what any member would take
    same = [x for x in errors if _field_path(x) == loc]
    if {x["type"] for x in same} == {"int_type", "float_type"}:
        msg = "input should be a number"
    elif err["type"] == "value_error":  # our validators' own sentence, without pydantic's "Value error, "
        msg = str(err["ctx"]["error"])
    else:
        msg = " or ".join(m[0].lower() + m[1:] for m in dict.fromkeys(x["msg"] for x in same))
    return APIError(400, f"Invalid value for '{param}' ({shown}): {msg}.", param)


# pydantic's names for the schema steps in an error's location (not fields): union members and validators
_SCHEMA_STEPS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(err: dict) -> list[str]:
    """An error's location as the request's field path: 'stream_options.include_usage', 'messages.0.content'."""
    return [str(p) for p in err["loc"]
            if not (str(p) in _SCHEMA_STEPS or "[" in str(p) or str(p).startswith(("function-", "constrained-")))]


def sampling_params(req: _SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    structured: StructuredOutputs | None = None, prompt_logprobs: int | None = None,
                    defaults: dict | None = None) -> SamplingParams:
    """The request's sampling options (and its response_format, see structured_outputs; the prompt's logprobs a
    completion with echo reports) -> SamplingParams; APIError(400) naming the field for a bad value. defaults: the
    model's generation_config.json settings, for the fields the request leaves out."""
    # as vLLM: only stream_options that set something are refused (clients send an empty {} with every request)
    if req.stream_options is not None and req.stream_options.model_fields_set and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true.", "stream_options")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}.", "logprobs")
    if not 1 <= req.n <= 128:
        raise APIError(400, f"n must be between 1 and 128, got {req.n}.", "n")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of} is not supported; only best_of == n ({req.n}).", "best_of")
    if structured is not None and req.structured_outputs:
        raise APIError(400, "Give response_format or structured_outputs, not both.", "structured_outputs")
    structured = structured or _structured_extra(req.structured_outputs)
    kw = dict(n=req.n, max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids or [],
              ignore_eos=req.ignore_eos, seed=req.seed, logprobs=logprobs, logit_bias=_token_bias(req.logit_bias),
              skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
              spaces_between_special_tokens=req.spaces_between_special_tokens,
              structured_outputs=structured, prompt_logprobs=prompt_logprobs, allowed_token_ids=req.allowed_token_ids,
              bad_words=req.bad_words)
    optional = dict(min_tokens=req.min_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    min_p=req.min_p,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty)
    defaults = dict(defaults or {})
    if max_tokens is None and "max_tokens" in defaults:  # generation_config.json's max_new_tokens; the engine clips
        kw["max_tokens"] = defaults["max_tokens"]  # it to what max_model_len leaves, as it does an absent one
    kw.update({k: v for k, v in defaults.items() if k in optional and optional[k] is None})
    kw.update({k: v for k, v in optional.items() if v is not None})
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        msg = str(e)
        field = msg.split(" ", 1)[0]
        raise APIError(400, msg, field if field in kw else None) from None


def structured_outputs(response_format: dict[str, Any] | None) -> StructuredOutputs | None:
    """OpenAI's response_format -> the constraint on the answer: {"type": "json_object"} any JSON object,
    {"type": "json_schema", "json_schema": {"schema": {...}}} that schema, "text" (or none) nothing."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format of type 'json_schema' needs json_schema.schema, a JSON schema "
                                "object.", "response_format")
        return StructuredOutputs(json=spec["schema"])
    raise APIError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                   "response_format")


def _structured_extra(spec: dict[str, Any] | None) -> StructuredOutputs | None:
    """vLLM's structured_outputs extra ({"json": schema} | {"json_object": true} | {"regex": ...} | {"choice": [...]})
    -> StructuredOutputs; APIError(400) for an unknown key or a bad value."""
    if not spec:
        return None
    unknown = sorted(set(spec) - {"json", "json_object", "regex", "choice"})
    if unknown:
        raise APIError(400, f"structured_outputs takes json, json_object, regex or choice, got {unknown[0]!r}.",
                       "structured_outputs")
    try:
        return StructuredOutputs(**spec)
    except ValueError as e:
        raise APIError(400, str(e), "structured_outputs") from None


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON object keys) -> {token id: bias}, each bias clamped to [-100, 100] as
    vLLM's server does (SamplingParams.from_optional; its SamplingParams and ours take no other range)."""
    if not bias:
        return None
    bad = next((key for key in bias if not (key.isascii() and key.isdigit())), None)
    if bad is not None:
        raise APIError(400, f"logit_bias keys must be token ids (non-negative integers), got {bad!r}.", "logit_bias")
    nan = next((key for key, value in bias.items() if value != value), None)
    if nan is not None:  # clamping would make it -100 (max(-100, nan) is -100), a ban nobody asked for
        raise APIError(400, f"logit_bias for token {nan} is NaN: give a number (clamped to [-100, 100]).", "logit_bias")
    # clamped before float(): a JSON integer beyond a float's range overflows it
    return {int(key): float(min(100, max(-100, value))) for key, value in bias.items()}


def check_truncation(req: _SamplingRequest, max_model_len: int) -> None:
    """A truncate_prompt_tokens vLLM refuses, refused before the prompt is encoded: 0, below -1 (its
    SamplingParams), or more than max_model_len (its _validate_truncation_size; it cannot cut a prompt that fits)."""
    k = req.truncate_prompt_tokens
    if k is not None and k < 1 and k != -1:
        raise APIError(400, f"truncate_prompt_tokens must be -1 (as many as leave room for max_tokens) or an integer "
                            f">= 1, got {k}.", "truncate_prompt_tokens")
    if k is not None and k > max_model_len:
        raise APIError(400, f"truncate_prompt_tokens ({k}) is greater than max_model_len ({max_model_len}): select "
                            f"a smaller truncation size, or -1 for as many as leave room for max_tokens.",
                       "truncate_prompt_tokens")


def truncate(req: _SamplingRequest, ids: list[int], max_model_len: int, max_tokens: int | None) -> list[int]:
    """The prompt's ids as the request's truncate_prompt_tokens leaves them (vLLM's left truncation; -1: as many as
    leave room for max_tokens, the request's own). The value was checked first (check_generation_request)."""
    return truncated_prompt(ids, req.truncate_prompt_tokens, max_model_len, max_tokens)


def context_length_error(max_model_len: int, detail: str, param: str) -> APIError:
    """A request that does not fit the context, as OpenAI and vLLM word it: agent frameworks (LiteLLM, crewAI,
    OpenHands) recognize it by "maximum context length" or the code context_length_exceeded, and trim the history."""
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens, {detail}", param,
                    "context_length_exceeded")


def check_max_tokens(max_tokens: int | None, num_prompt: int, max_model_len: int, field: str = "max_tokens",
                     min_tokens: int | None = None, prompt_field: str = "prompt", scores_only: bool = False) -> None:
    """A negative, zero or oversized max_tokens (or a min_tokens that cannot fit) is the client's error: say how many
    tokens fit. prompt_field: the field the prompt came from (a chat's messages), named when the prompt alone is too
    long. scores_only: echo with max_tokens 0, which answers nothing: as vLLM, its prompt may fill max_model_len (the
    engine samples one token after it, never fed, that the response leaves out)."""
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{field} must be at least 1, got {max_tokens}.", field)
    room = max_model_len - num_prompt
    if room < 0 or (room == 0 and not scores_only):  # else at least one token must follow the prompt, as vLLM's
        # token_num + max_tokens > max_model_len (and token_num >= max_model_len without max_tokens)
        raise context_length_error(max_model_len, f"and the prompt has {num_prompt}, which leaves no room for an "
                                                  f"answer: shorten the prompt or raise max_model_len.", prompt_field)
    if scores_only:
        return
    if min_tokens is not None and min_tokens > room:
        raise APIError(400, f"min_tokens is {min_tokens} but the prompt has {num_prompt} tokens and max_model_len is "
                            f"{max_model_len}: at most {room} tokens can follow it.", "min_tokens")
    if max_tokens is None:
        return
    if min_tokens is not None and min_tokens > max_tokens:  # named here: SamplingParams would say "max_tokens"
        raise APIError(400, f"min_tokens ({min_tokens}) must be at most {field} ({max_tokens}).", "min_tokens")
    if max_tokens > room:
        raise context_length_error(max_model_len, f"but the prompt has {num_prompt} and {field} is {max_tokens}: ask "
                                                  f"for at most {room} tokens or shorten the prompt.", field)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens when the prefix cache supplied part of a prompt."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
