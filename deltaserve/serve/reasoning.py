"""Qwen3 / Qwen3.5 reasoning parser: moves `<think>…</think>` out of the answer into `reasoning_content`.

Works on streamed text: `feed(delta)` returns what can be released now, holding back a suffix that may still turn out
to be (part of) a tag; `finish()` releases the rest. Feeding the whole text at once and calling `finish()` gives the
same split as any sequence of deltas, which is how the non-streaming path uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
TURN_START = "<|im_start|>"
CALL_START, FUNCTION_OPEN = "<tool_call>", "<function="  # an XML tool call: what ends reasoning left open


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the rendered prompt ends inside a `<think>` block (Qwen3.5 templates open it for the model). Only its
    last turn counts (from its last `<|im_start|>`; all of it when it has none): a `<think>` quoted in a message
    earlier opens nothing."""
    turn = prompt[max(prompt.rfind(TURN_START), 0):]
    return turn.rfind(THINK_START) > turn.rfind(THINK_END)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text that may become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """States: "start" (output may open with `<think>`), "reasoning" (inside the block), "content" (after it).

    in_reasoning: the prompt already opened `<think>` (output starts inside thinking).
    enabled: False (e.g. `enable_thinking=False`, whose template closes an empty block) -> everything is content.
    exact_content: keep the whitespace right after `</think>` (a structured-output answer: the grammar constrains the
    text from there on, leading whitespace included, so dropping it could leave the schema or regex unmatched).
    tool_calls: a `<tool_call>` followed by `<function=` ends the reasoning and starts the content (Qwen3.5 may call
    a tool without closing `</think>` first; vLLM's Qwen3 parser reads it so), for a request whose tool calls are
    parsed.
    """

    def __init__(self, in_reasoning: bool = False, enabled: bool = True, exact_content: bool = False,
                 tool_calls: bool = False):
        self.state = "content" if not enabled else "reasoning" if in_reasoning else "start"
        self.exact_content = exact_content
        self.tool_calls = tool_calls
        self._buf = ""  # text not released yet
        self._seen_reasoning = False  # reasoning text released so far (leading whitespace is dropped)
        self._content_started = False  # content released so far (whitespace right after </think> is dropped)
        self._after_end = False
        self._opened = self.state == "reasoning"  # an opening tag seen (or given by the prompt): one more is dropped

    def feed(self, delta: str) -> Split:
        self._buf += delta
        out = Split()
        while self._step(out):
            pass
        return out

    def finish(self) -> Split:
        out = self.feed("")
        rest, self._buf = self._buf, ""
        if self.state == "reasoning":
            self._emit_reasoning(out, rest.rstrip())
        else:
            self._emit_content(out, rest)
        return out

    def _step(self, out: Split) -> bool:
        """Consume what can be decided from the buffer; True if the state changed and another pass may help."""
        buf = self._buf
        if self.state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_START):
                self.state, self._buf = "reasoning", stripped[len(THINK_START):]
                return True  # the tag opened the block: a repeat of it is reasoning text
            if stripped and not THINK_START.startswith(stripped):
                self.state = "content"
                return True
            return False  # only whitespace or a partial "<think>" so far
        if self.state == "reasoning":
            if self._opened and not self._seen_reasoning:  # the model may repeat the tag the prompt gave, once
                head = buf.lstrip()
                if head.startswith(THINK_START):
                    buf = self._buf = head[len(THINK_START):]
                    self._opened = False
                elif head and THINK_START.startswith(head):
                    return False
            end = buf.find(THINK_END)
            call, pending = self._call_start(buf[: len(buf) if end < 0 else end])
            if call >= 0:  # a tool call before any </think>: the reasoning ends there, the call is content
                self._emit_reasoning(out, buf[:call].rstrip())
                self.state, self._buf, self._after_end = "content", buf[call:], True
                return True
            if end >= 0:
                self._emit_reasoning(out, buf[:end].rstrip())
                self.state, self._buf, self._after_end = "content", buf[end + len(THINK_END):], True
                return True
            # hold a partial closing tag and trailing whitespace (it may be the whitespace before </think>), and a
            # <tool_call> that may still turn out to open a call
            keep = max(partial_suffix(buf, THINK_END), len(buf) - pending if pending >= 0 else 0)
            body = buf[: len(buf) - keep]
            release = body.rstrip()
            self._emit_reasoning(out, release)
            self._buf = buf[len(release):]
            return False
        self._emit_content(out, buf)
        self._buf = ""
        return False

    def _call_start(self, text: str) -> tuple[int, int]:
        """(where a `<tool_call>` + whitespace + `<function=` starts in `text`, -1 if none; where one that the text
        after it may still complete starts, -1 if none). Only when tool_calls is set."""
        if not self.tool_calls:
            return -1, -1
        at = text.find(CALL_START)
        while at >= 0:
            after = text[at + len(CALL_START):].lstrip()
            if after.startswith(FUNCTION_OPEN):
                return at, -1
            if FUNCTION_OPEN.startswith(after):  # only whitespace or part of "<function=" so far
                return -1, at
            at = text.find(CALL_START, at + 1)
        k = partial_suffix(text, CALL_START)
        return -1, (len(text) - k if k else -1)

    def _emit_reasoning(self, out: Split, text: str) -> None:
        if not self._seen_reasoning:
            text = text.lstrip()
        if text:
            self._seen_reasoning = True
            out.reasoning += text

    def _emit_content(self, out: Split, text: str) -> None:
        if self._after_end and not self._content_started and not self.exact_content:
            text = text.lstrip()
        if text:
            self._content_started = True
            out.content += text
