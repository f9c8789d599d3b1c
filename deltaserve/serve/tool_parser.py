"""Qwen tool-call parser: `<tool_call>…</tool_call>` blocks in model output -> OpenAI `tool_calls`, streamed.

Two formats, told apart by the first character of the block:
  XML (Qwen3-Coder, Qwen3.5):
      <tool_call> <function=NAME> <parameter=P> VALUE </parameter> ... </function> </tool_call>
  JSON (Qwen2.5, Qwen3):
      <tool_call> {"name": NAME, "arguments": {...}} </tool_call>
(newlines between the parts, one around each VALUE, which is stripped).
Streaming follows OpenAI's delta format: a call's first delta carries its index, id, type and name, later deltas
append to `function.arguments`. XML arguments are released one parameter at a time (values converted with the
tool's JSON schema: a string stays a string, `integer`/`number`/`boolean`/`object`/`array` are parsed); JSON
arguments are released as the model writes them, minus a suffix that could still be the end of the block.
Text outside the blocks is content; whitespace around blocks is dropped.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .reasoning import partial_suffix

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
_XML_FUNC = re.compile(r"\s*<function=([^>\n]+)>")
_XML_PARAM_OPEN = re.compile(r"<parameter=([^>\n]+)>")
_XML_PARAM_END, _XML_FUNC_END = "</parameter>", "</function>"
_XML_AFTER_VALUE = ("<parameter=", _XML_FUNC_END, TOOL_END)  # the tags that may follow a value's </parameter>
_JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
_DECODER = json.JSONDecoder()
# what decoding model-written JSON may raise: bad JSON, or nesting deeper than Python's recursion limit
_BAD_JSON = (ValueError, RecursionError)
_INTEGER = re.compile(r"[+-]?\d+")
logger = logging.getLogger("deltaserve")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # json.loads would take NaN / Infinity, which json.dumps cannot write back


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999 inside an object or array: json.dumps would write it back as Infinity
        raise ValueError(f"{text} is beyond a float")
    return number


@dataclass
class ToolCall:
    name: str
    arguments: str = ""  # JSON text; grows while streaming
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    # XML arguments that repeat a parameter: one key each, at its first place, with its last value (vLLM's
    # Qwen3-Coder parser's non-streamed arguments); the streamed `arguments` could not take the earlier value back.
    # tool_choice "required": a whole call's parameters as json.dumps writes them (vLLM's non-streamed arguments)
    merged: str | None = None

    @property
    def whole_arguments(self) -> str:
        """The arguments a non-streamed response carries."""
        return self.arguments if self.merged is None else self.merged


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set (with name) on a call's first delta only
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, delta: ToolCallDelta) -> None:
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments  # one delta per call per step
        else:
            self.tool_calls.append(delta)


@dataclass
class _OpenCall:
    """Parsing progress of the block being read."""
    call: ToolCall | None = None  # set once the name is known
    args_done: bool = False  # arguments closed (XML </function> seen / JSON value complete)
    cursor: int = 0  # XML: where the next <parameter= is searched; JSON: where the arguments start
    num_params: int = 0
    args_sent: int = 0  # JSON: characters of the raw arguments released
    lead: str = ""  # whitespace dropped before the block (given back if it turns out not to be a call)
    dropped: bool = False  # a call beyond the first under parallel_tool_calls=false: parsed, never reported
    values: dict[str, Any] = field(default_factory=dict)  # XML: the parameters read so far, their last values
    repeated: bool = False  # XML: a parameter came twice


def _xml_param(body: str, cursor: int, complete: bool, given: Collection[str]) -> tuple[str, str, int] | None:
    """The next whole `<parameter=NAME>VALUE` of a function's body from `cursor` -> (NAME, VALUE, where the next
    search starts), None when there is none yet. VALUE ends at `</parameter>`; a model that leaves it out ends it at
    the next `<parameter=` of another parameter that starts a line (not NAME, not one of `given`, those already read:
    a value may quote a tag), or (once the block is complete) at `</function>` or the block's end, as vLLM's
    Qwen3-Coder parser does: its value used to be dropped. A parameter after the function's end is not part of it,
    and a `</function>` inside a closed value does not end the function."""
    m = _XML_PARAM_OPEN.search(body, cursor)
    if m is None or _XML_FUNC_END in body[cursor: m.start()]:
        return None
    start, name = m.end(), m.group(1).strip()
    close = _value_close(body, start, complete)
    if close is None:
        return None  # what follows a </parameter> may still turn out to be a tag
    # only a tag that starts a line (or the value) can end it: one inside a line is the value quoting it
    following = next((f for f in _XML_PARAM_OPEN.finditer(body, start)
                      if f.group(1).strip() != name and f.group(1).strip() not in given
                      and (f.start() == start or body[f.start() - 1] == "\n")), None)
    if close >= 0 and (following is None or close < following.start()):
        return name, body[start:close], close + len(_XML_PARAM_END)
    if following is not None:
        return name, body[start:following.start()], following.start()
    if not complete:
        return None  # its </parameter> may still come
    end = body.find(_XML_FUNC_END, start)
    end = len(body) if end < 0 else end
    return name, body[start:end], end


def _value_close(body: str, start: int, complete: bool) -> int | None:
    """Where the first `</parameter>` after `start` that ends a value is: one followed (past whitespace) by a tag
    that may follow a value, or by nothing once the block is complete; -1 when there is none, None while the text
    after one may still become such a tag. A `</parameter>` followed by other text is the value quoting it (code), as
    vLLM's Qwen3-Coder parser reads it (_find_true_param_end)."""
    close = body.find(_XML_PARAM_END, start)
    while close >= 0:
        after = body[close + len(_XML_PARAM_END):].lstrip()
        if after.startswith(_XML_AFTER_VALUE):
            return close
        if any(tag.startswith(after) for tag in _XML_AFTER_VALUE):  # nothing yet, or part of a tag
            return close if complete else None
        close = body.find(_XML_PARAM_END, close + 1)
    return -1


def param_types(tools: list[dict] | None) -> dict[str, dict[str, Any]]:
    """tools (OpenAI schema) -> {function name: {parameter: JSON-schema type}}."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function") or {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name", "")] = {p: _schema_type(s) for p, s in props.items() if isinstance(s, dict)}
    return out


def _schema_type(schema: Any) -> Any:
    """A parameter schema's JSON type: its `type`, or for a union without one (`anyOf` / `oneOf`, e.g. pydantic's
    Optional[int] or Optional[Model]) the list of its branches' types, a `$ref` or `properties` branch counted as an
    object, as vLLM's Qwen3-Coder parser reads a union by its first non-null type; None when it says none."""
    if not isinstance(schema, dict):
        return None
    if "type" in schema:
        return schema["type"]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            types: list = []
            for branch in schema[key]:
                kind = _schema_type(branch)
                if kind is None and isinstance(branch, dict) and ("$ref" in branch or "properties" in branch):
                    kind = "object"
                types += kind if isinstance(kind, list) else [] if kind is None else [kind]
            return types or None
    return None


def convert_value(value: str, schema_type: Any) -> Any:
    """An XML parameter's text -> its JSON value, by the declared type (unknown or string: the text itself)."""
    text = value.strip()
    if isinstance(schema_type, list):
        if "null" in schema_type and text.lower() in ("null", "none"):
            return None  # a nullable string too (Qwen3.5's template writes a None argument as "None")
        schema_type = next((t for t in schema_type if t != "null"), None)
    if schema_type in (None, "string"):
        return value
    if text.lower() in ("null", "none"):
        return None
    try:
        if schema_type in ("integer", "number") and _INTEGER.fullmatch(text):
            return int(text)  # exact, however long
        if schema_type == "integer":
            return value
        if schema_type == "number":
            number = float(text)
            return number if math.isfinite(number) else value  # 1e999: kept as text, JSON has no Infinity
        if schema_type == "boolean":
            return text.lower() == "true" if text.lower() in ("true", "false") else value
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _BAD_JSON:
        return _python_container(text, value) if schema_type in ("object", "array") else value


def _python_container(text: str, value: str) -> Any:
    """An object or array the model wrote as a Python literal ({'a': True}, ['x', None]) -> its JSON value, as vLLM's
    Qwen3-Coder parser reads it (ast.literal_eval, which evaluates literals only); anything else: the text."""
    try:
        parsed = ast.literal_eval(text)
        if isinstance(parsed, (dict, list, tuple)):
            # through JSON: a set, bytes or 1e999 inside has no JSON form; tuples become lists, keys strings
            return json.loads(json.dumps(parsed, allow_nan=False))
    # MemoryError: CPython's parser answers a very deep expression ("-" * 10000 + "1") with it, not SyntaxError
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    return value


class ToolCallParser:
    """parallel=False (the request's parallel_tool_calls): only the first call is reported, later blocks are
    dropped, as vLLM and OpenAI do."""

    def __init__(self, tools: list[dict] | None, parallel: bool = True):
        self.types, self.parallel = param_types(tools), parallel
        self.calls: list[ToolCall] = []
        self._in_call = False
        self._buf = ""  # content: held-back tail; in a call: the block's text so far
        self._open = _OpenCall()
        self._after_call = False  # no content released since the last block ended
        self._content_sent = False
        self._gap = ""  # the first whitespace around the blocks since content: what joins the content either side
        self.cut = False  # the text ended inside a reported call's arguments (max_tokens, a stop string)
        self._final = False  # finish() is reading the last of the text: nothing more will come

    def feed(self, delta: str) -> ParsedDelta:
        self._buf += delta
        out = ParsedDelta()
        while self._step(out):
            pass
        return out

    def finish(self) -> ParsedDelta:
        self._final = True
        out = self.feed("")
        if self._in_call:  # cut off inside a block (e.g. by max_tokens): close what can be closed
            # cut short only if the call's arguments are not whole: a text that ends after </function> or after
            # complete JSON arguments (a stop string "</tool_call>", EOS in its place) holds a whole call
            op = self._open
            self.cut = op.call is not None and not op.dropped and not self._args_whole(self._buf)
            self._end_call(out, self._buf, closed=False)
            self._buf = ""
        rest, self._buf = self._buf, ""
        self._emit_content(out, rest.rstrip() if self.calls else rest)
        return out

    def _step(self, out: ParsedDelta) -> bool:
        """Consume what can be decided now; True when another pass may consume more."""
        buf = self._buf
        if not self._in_call:
            start = buf.find(TOOL_START)
            if start >= 0:
                before = buf[:start].rstrip()
                self._emit_content(out, before)
                self._buf, self._in_call = buf[start + len(TOOL_START):], True
                self._open = _OpenCall(lead=buf[len(before):start])
                return True
            # hold a partial "<tool_call>" and trailing whitespace (which may precede a block)
            release = buf[: len(buf) - partial_suffix(buf, TOOL_START)].rstrip()
            self._emit_content(out, release)
            self._buf = buf[len(release):]
            return False
        op = self._open  # an XML call: a </tool_call> in a parameter value already read is text
        end = buf.find(TOOL_END, op.cursor if op.call is not None and buf.lstrip().startswith("<") else 0)
        while end >= 0 and self._in_open_value(out, buf, end):
            # a </tool_call> inside an XML parameter value (code that quotes the tag) is text when the value's
            # </parameter> comes after it, before any other <tool_call> (which tells a value whose </parameter> and
            # </function> the model left out, followed by another call)
            after = buf[end + len(TOOL_END):]
            close, block = after.find(_XML_PARAM_END), after.find(TOOL_START)
            if block >= 0 and (close < 0 or block < close) or close < 0 and self._final:
                break
            if close >= 0:
                end = buf.find(TOOL_END, end + 1)
                continue
            return False  # undecided until more text comes (or the text ends: then it ends the block)
        if end < 0:
            self._progress(out, buf[: len(buf) - partial_suffix(buf, TOOL_END)], complete=False)
            return False
        self._buf = buf[end + len(TOOL_END):]
        self._end_call(out, buf[:end], closed=True)
        return True

    def _in_open_value(self, out: ParsedDelta, buf: str, end: int) -> bool:
        """Whether the block up to the `</tool_call>` at `end` ends inside the value of an XML parameter: one opened,
        not closed, in a function not ended. Reads what that settles first."""
        body = buf[:end]
        if body.lstrip().startswith("<"):  # XML: a </parameter> right before the </tool_call> ends its value
            self._progress_xml(out, buf[:end + len(TOOL_END)], complete=False)
        else:
            self._progress(out, body, complete=False)
        op = self._open
        return (op.call is not None and not op.args_done and body.lstrip().startswith("<")
                and _XML_PARAM_OPEN.search(body, op.cursor) is not None)

    def _emit_content(self, out: ParsedDelta, text: str) -> None:
        if self._after_call:  # whitespace between or after blocks is not content, but it separates content
            stripped = text.lstrip()
            self._gap = self._gap or text[:len(text) - len(stripped)]
            text = self._gap + stripped if stripped and self._content_sent else stripped
        if text:
            self._after_call, self._content_sent, self._gap = False, True, ""
            out.content += text

    def _end_call(self, out: ParsedDelta, body: str, closed: bool) -> None:
        self._progress(out, body, complete=True)
        if self._open.call is None:
            if not self._fallback_json(out, body):  # not a tool call after all: give the text back as content
                self._in_call = False
                self._emit_content(out, self._open.lead + TOOL_START + body + (TOOL_END if closed else ""))
                return
        elif not self._open.args_done:
            self._send(out, self._close_args(body))
        self._in_call, self._after_call, self._gap = False, True, self._gap or self._open.lead

    def _progress(self, out: ParsedDelta, body: str, complete: bool) -> None:
        head = body.lstrip()
        if head.startswith("<"):
            self._progress_xml(out, body, complete)
        elif head.startswith("{"):
            self._progress_json(out, body, complete)

    # ---- XML ----
    def _progress_xml(self, out: ParsedDelta, body: str, complete: bool) -> None:
        op = self._open
        if op.call is None:
            m = _XML_FUNC.match(body)
            if m is None:
                return
            self._start_call(out, m.group(1).strip())
            op.cursor = m.end()
        if op.args_done:
            return
        types = self.types.get(op.call.name, {})
        while (param := _xml_param(body, op.cursor, complete, op.values.keys())) is not None:
            name, value, op.cursor = param
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            converted = convert_value(value, types.get(name))
            if name in op.values:  # a JSON object holds one value per key: the last one, as in vLLM
                logger.warning("tool call %s gives parameter %r twice: its arguments keep the last value",
                               op.call.name, name)
                op.repeated = True
            op.values[name] = converted
            piece = json.dumps(name, ensure_ascii=False) + ": " + json.dumps(converted, ensure_ascii=False)
            self._send(out, ("{" if op.num_params == 0 else ", ") + piece)
            op.num_params += 1
        rest = body[op.cursor:]
        end = rest.find(_XML_FUNC_END)
        if complete or end >= 0 and "<parameter=" not in rest[:end]:  # not one inside a parameter still open
            self._send(out, self._close_args(body))

    # ---- JSON ----
    def _progress_json(self, out: ParsedDelta, body: str, complete: bool) -> None:
        op = self._open
        if op.call is None:
            m = _JSON_HEAD.match(body)
            if m is None:
                return
            try:
                name = json.loads(m.group(1))
            except _BAD_JSON:
                return  # a name with a bad escape: not followed; the block ends as text (see _fallback_json)
            self._start_call(out, name)
            op.cursor = m.end()
        raw = body[op.cursor:]
        if op.args_done or not raw.startswith("{"):
            return  # a string-encoded or odd "arguments": released whole when the block ends
        try:
            _, end = _DECODER.raw_decode(raw)
            stable, op.args_done = end, True
        except _BAD_JSON:
            stable = len(raw.rstrip(" \t\r\n}"))  # a trailing "}" may close the outer object instead
        if stable > op.args_sent:
            self._emit_args(out, raw[op.args_sent:stable])
            op.args_sent = stable

    def _fallback_json(self, out: ParsedDelta, body: str) -> bool:
        """A complete JSON block the streaming path could not follow (other key order, string arguments)."""
        try:
            obj = json.loads(body)
        except _BAD_JSON:
            return False
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return False
        args = obj.get("arguments", obj.get("parameters", {}))
        self._start_call(out, obj["name"])
        self._send(out, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
        return True

    def _args_whole(self, body: str) -> bool:
        """Whether the open call's arguments are complete: XML after </function>, JSON once their value (an object,
        or a string holding one) has ended."""
        op = self._open
        if op.args_done or not body.lstrip().startswith("{"):
            return op.args_done
        try:  # "arguments": "<json text>", which _progress_json leaves to the block's end
            _DECODER.raw_decode(body[op.cursor:])
        except _BAD_JSON:
            return False
        return True

    def _close_args(self, body: str) -> str:
        """The text that closes the open call's arguments ("}" after XML parameters, the rest of JSON ones)."""
        op = self._open
        op.args_done = True
        if not body.lstrip().startswith("{"):
            if op.repeated:
                op.call.merged = json.dumps(op.values, ensure_ascii=False)
            return "}" if op.num_params else "{}"
        raw = body[op.cursor:].rstrip()
        if raw.startswith("{"):
            return raw[op.args_sent:].removesuffix("}") if op.args_sent else raw.removesuffix("}")
        try:  # "arguments": "<json text>"
            value = _DECODER.raw_decode(raw)[0]
        except _BAD_JSON:
            return ""
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    # ---- emitting ----
    def _start_call(self, out: ParsedDelta, name: str) -> None:
        call = ToolCall(name)
        self._open.call = call
        if not self.parallel and self.calls:
            self._open.dropped = True
            return
        self.calls.append(call)
        out.add_call(ToolCallDelta(index=len(self.calls) - 1, id=call.id, name=name))

    def _send(self, out: ParsedDelta, text: str) -> None:
        if text:
            self._emit_args(out, text)

    def _emit_args(self, out: ParsedDelta, text: str) -> None:
        self._open.call.arguments += text
        if not self._open.dropped:
            out.add_call(ToolCallDelta(index=len(self.calls) - 1, arguments=text))
