"""Forced tool choice (tool_choice "required" or a named function): the JSON schema structured outputs constrain the
answer to (`forced_schema`), and the constrained answer read back as OpenAI `tool_calls`, streamed
(`ForcedToolCalls`). The free-form `<tool_call>` blocks are tool_parser.py's."""
from __future__ import annotations

import json

from ..runtime.structured_output import enforceable_schema
from .tool_parser import _BAD_JSON, ParsedDelta, ToolCall, ToolCallDelta


class ForcedToolCalls:
    """tool_choice "required" or a named function: the answer is constrained (structured outputs, see forced_schema)
    to JSON, turned into tool calls as vLLM does. A named function's answer is its one call's arguments, passed on
    as written and streamed as they come, also when max_tokens cuts them short (then they are not whole JSON, as
    vLLM's are not either). "required"'s answer, a list of {"name", "parameters"}, is read as it streams
    (_RequiredCalls): cut short, the calls named so far are kept, the last with its arguments as written."""

    def __init__(self, name: str | None):
        self.name = name  # the named function, or None for "required" (a list of {"name", "parameters"})
        self.calls: list[ToolCall] = []
        self.cut = False  # "required": the text ended inside its list (ChoiceParser.finish_reason says "stop")
        self._required = _RequiredCalls(self.calls) if name is None else None

    def feed(self, text: str) -> ParsedDelta:
        if self._required is not None:
            return self._required.feed(text)
        out = ParsedDelta()
        if not text:
            return out
        if not self.calls:  # the first text opens the call: its delta carries the id and name
            self.calls.append(ToolCall(self.name))
            out.tool_calls.append(ToolCallDelta(0, self.calls[0].id, self.name, text))
        else:
            out.tool_calls.append(ToolCallDelta(0, arguments=text))
        self.calls[0].arguments += text
        return out

    def finish(self) -> ParsedDelta:
        if self._required is None:
            return ParsedDelta()
        self.cut = self._required.state != "end"
        return ParsedDelta(content=self._required.rest())


_JSON_SPACE = " \t\n\r"


class _RequiredCalls:
    """tool_choice "required"'s answer, `[{"name": N, "parameters": {...}}, ...]` (forced_schema's order), read a
    character at a time: a call opens (id and name) once its name is whole; its arguments are its parameters' text,
    streamed as written. A whole call's non-streamed arguments are json.dumps of its parameters (vLLM's); a call cut
    off by max_tokens keeps the text written (not whole JSON, as a named function's). With no call named the whole
    text is content, as is the rest of a text that leaves the shape (only without the grammar); an element cut
    before its name is whole is dropped, as vLLM drops it (no call to give it to)."""

    def __init__(self, calls: list[ToolCall]):
        self.calls = calls  # ForcedToolCalls.calls, appended to here
        self.buf = ""
        self.pos = 0  # the character being read, in buf
        self.state = "start"  # start array key colon value after end bad
        self.token = ""  # a key or name being read, quotes included
        self.escaped = False
        self.key: str | None = None
        self.name: str | None = None  # the element's; its call opens when it is whole
        self.params = ""  # the element's parameters value: "" before it, "open" while read, "done"
        self.args_from: int | None = None  # the parameters' text: buf[args_from:args_to]
        self.args_to = self.sent_to = 0  # sent_to: how much of it the open call has
        self.taken_to = 0  # the end of the open call's text in buf (its name, its parameters)
        self.depth = 0  # open brackets in the parameters value
        self.in_string = False
        self.element_at = 0  # where the element began in buf
        self.rest_from: int | None = None  # set when the text leaves the shape: buf[rest_from:] is content

    def feed(self, text: str) -> ParsedDelta:
        out, base = ParsedDelta(), len(self.buf)
        self.buf += text
        for i, c in enumerate(text):
            if self.state == "bad":
                break
            self.pos = base + i
            self._step(c, out)
        self._flush(out)
        return out

    def rest(self) -> str:
        """At the end: the text no call took."""
        if not self.calls:
            return self.buf
        return self.buf[self.rest_from:] if self.rest_from is not None else ""

    def _bad(self) -> None:
        if self.name is not None:
            self.rest_from = self.taken_to
        elif self.state in ("array", "end"):
            self.rest_from = self.pos
        else:  # an element with no call yet: all of it
            self.rest_from = self.element_at
        self.state = "bad"

    def _string_ends(self, c: str) -> bool:
        """One more character of a JSON string (self.token or a parameters string): -> whether it closed it."""
        if self.escaped:
            self.escaped = False
        elif c == "\\":
            self.escaped = True
        elif c == '"':
            return True
        return False

    def _token(self, c: str) -> str | None:
        """One more character of a key or name: -> its decoded string once whole."""
        self.token += c
        if not self._string_ends(c):
            return None
        try:
            value = json.loads(self.token)
        except _BAD_JSON:
            value = None
        self.token = ""
        return value

    def _step(self, c: str, out: ParsedDelta) -> None:
        state = self.state
        if state in ("start", "end"):
            if c == "[" and state == "start":
                self.state = "array"
            elif c not in _JSON_SPACE:
                self._bad()
        elif state == "array":
            if c == "{":
                self.state, self.element_at, self.params, self.args_from = "key", self.pos, "", None
            elif c == "]":
                self.state = "end"
            elif c != "," and c not in _JSON_SPACE:
                self._bad()
        elif state == "key":
            if self.token:
                key = self._token(c)
                if key is not None:
                    self.key, self.state = key, "colon"
                elif not self.token:
                    self._bad()
            elif c == '"':
                self.token = c
            elif c == "}":
                self._close_element(out)
            elif c != "," and c not in _JSON_SPACE:
                self._bad()
        elif state == "colon":
            if c == ":":
                self.state = "value"
            elif c not in _JSON_SPACE:
                self._bad()
        elif state == "value":
            self._value(c, out)
        elif state == "after":
            if c == ",":
                self.state = "key"
            elif c == "}":
                self._close_element(out)
            elif c not in _JSON_SPACE:
                self._bad()

    def _value(self, c: str, out: ParsedDelta) -> None:
        if self.key == "name" and self.name is None:
            if self.token:
                name = self._token(c)
                if name is not None:
                    self._open_call(name, out)
                elif not self.token:
                    self._bad()
            elif c == '"':
                self.token = c
            elif c not in _JSON_SPACE:
                self._bad()
        elif self.key == "parameters" and not self.params:
            if c in _JSON_SPACE:
                return
            if c not in '{["-0123456789tfn':
                self._bad()
                return
            self.params, self.args_from, self.sent_to, self.depth, self.in_string = "open", self.pos, self.pos, 0, False
            self._parameters(c)
        elif self.key == "parameters" and self.params == "open":
            if not self.in_string and self.depth == 0 and (c in ",}" or c in _JSON_SPACE):  # a scalar ended
                self.params, self.state = "done", "after"
                self._step(c, out)
            else:
                self._parameters(c)
        else:  # another key, or one given twice: not the forced shape
            self._bad()

    def _parameters(self, c: str) -> None:
        self.args_to = self.taken_to = self.pos + 1
        if self.in_string:
            self.in_string = not self._string_ends(c)
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
        if self.depth == 0 and not self.in_string and c in '}]"':  # an object, array or string value closed
            self.params, self.state = "done", "after"

    def _open_call(self, name: str, out: ParsedDelta) -> None:
        self.name, self.state, self.taken_to = name, "after", self.pos + 1
        call = ToolCall(name)
        self.calls.append(call)
        if self.args_from is not None:  # parameters written before the name (only without the grammar)
            self.sent_to = self.args_from
        out.add_call(ToolCallDelta(len(self.calls) - 1, call.id, name))

    def _flush(self, out: ParsedDelta) -> None:
        """The open call's arguments read since the last flush, as one delta."""
        if self.name is None or self.args_from is None or self.args_to <= self.sent_to:
            return
        piece = self.buf[self.sent_to:self.args_to]
        self.calls[-1].arguments += piece
        self.sent_to = self.args_to
        out.add_call(ToolCallDelta(len(self.calls) - 1, arguments=piece))

    def _close_element(self, out: ParsedDelta) -> None:
        if self.name is None or self.params != "done":  # the schema requires both
            self._bad()
            return
        self._flush(out)
        try:
            arguments = json.loads(self.buf[self.args_from:self.args_to])
            self.calls[-1].merged = json.dumps(arguments, ensure_ascii=False)
        except _BAD_JSON:  # (only without the grammar) kept as written
            pass
        self.state, self.name = "array", None


def forced_schema(tools: list[dict], name: str | None, parallel: bool = True) -> dict:
    """The JSON schema a forced tool choice constrains the answer to: the named function's parameters, or for
    "required" a non-empty list (one item unless `parallel`) of {"name": one of the tools, "parameters": that
    tool's parameters}."""
    # keywords the grammar would not enforce are dropped, not refused: a tool's schema describes its arguments, and
    # tool calls (OpenAI's non-strict ones) promise no more than the grammar holds them to
    params = {t["function"]["name"]: enforceable_schema(t["function"].get("parameters") or {"type": "object"})
              for t in tools}
    if name is not None:
        return params[name]
    defs: dict = {}
    calls = [{"type": "object", "properties": {"name": {"const": fn}, "parameters": _hoist_defs(fn, schema, defs)},
              "required": ["name", "parameters"], "additionalProperties": False} for fn, schema in params.items()]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": calls},
            **({"$defs": defs} if defs else {})}


_DEFS_KEYS = ("$defs", "definitions")


def _hoist_defs(fn: str, schema: dict, defs: dict) -> dict:
    """A tool's parameters schema nested inside the "required" array schema: its `$defs` / `definitions` move into
    the root's `defs` as `<fn>.<name>` (tools may share a name), and its `#/$defs/...` refs follow them (a ref
    resolves from the root of the whole schema, where the tool's own definitions no longer are)."""
    escape = lambda name: name.replace("~", "~0").replace("/", "~1")  # noqa: E731  (a JSON pointer segment)
    moved = {f"#/{key}/{escape(name)}": f"#/$defs/{escape(fn)}.{escape(name)}"
             for key in _DEFS_KEYS for name in (schema.get(key) or {})}
    if not moved:
        return schema

    def fix(node):
        if isinstance(node, list):
            return [fix(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                old = next((o for o in moved if v == o or v.startswith(o + "/")), None)
                v = v if old is None else moved[old] + v[len(old):]
            out[k] = fix(v)
        return out

    for key in _DEFS_KEYS:
        for name, sub in (schema.get(key) or {}).items():
            defs[f"{fn}.{name}"] = fix(sub)
    return fix({k: v for k, v in schema.items() if k not in _DEFS_KEYS})
