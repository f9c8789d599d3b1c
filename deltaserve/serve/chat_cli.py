"""`deltaserve chat`: an interactive terminal chat on an in-process engine.

Streams the answer as it is generated, keeps the conversation (multi-turn) until `/reset`, quits on `/exit` or
Ctrl-D; Ctrl-C stops the current answer (the request is aborted) and returns to the prompt. Reasoning
(`<think>…</think>`) is shown dimmed, or not at all with `hide_thinking`. A message spans several lines between
triple double quotes (as in `ollama run`) or while each line ends in a backslash (as in llama.cpp's CLI).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import TextIO

from ..llm import EngineDeadError
from ..sampling_params import SamplingParams
from .reasoning import ReasoningParser, Split, prompt_opens_thinking

HELP = ("Commands: /reset clears the conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer.\n"
        'Several lines: start a message with """ and end it with """, or end a line with \\ to go on.')
BLOCK = '"""'
DIM, RESET = "\x1b[2m", "\x1b[0m"


class _Printer:
    """Writes reasoning (dimmed on a terminal, bracketed otherwise, or hidden) and content as they stream."""

    def __init__(self, out: TextIO, hide_thinking: bool, color: bool):
        self.out, self.hide, self.color = out, hide_thinking, color
        self.in_thinking = False

    def write(self, split: Split) -> None:
        if split.reasoning and not self.hide:
            if not self.in_thinking:
                self.out.write(DIM if self.color else "[thinking] ")
                self.in_thinking = True
            self.out.write(split.reasoning)
        if split.content:
            self._end_thinking()
            self.out.write(split.content)
        self.out.flush()

    def _end_thinking(self) -> None:
        if self.in_thinking:
            self.out.write(RESET + "\n\n" if self.color else "\n[/thinking]\n\n")
            self.in_thinking = False

    def close(self) -> None:
        self._end_thinking()
        self.out.write("\n")
        self.out.flush()


class TooLong(ValueError):
    """The conversation with the new message does not fit max_model_len; the message is not sent."""


class ChatSession:
    """llm: a built LLM with a chat template; params: sampling for every answer (n must be 1)."""

    def __init__(self, llm, params: SamplingParams, system: str | None = None, enable_thinking: bool = True,
                 hide_thinking: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise ValueError("deltaserve chat needs a model with tokenizer.json and a chat template")
        if params.n != 1:
            raise ValueError(f"deltaserve chat shows one answer per turn; use --n 1 (got {params.n})")
        self.llm, self.params, self.system, self.enable_thinking = llm, params, system, enable_thinking
        self.out, self.err = out, err  # answers on out; a turn's error on err, as the CLI's other errors
        color = out.isatty() and not os.environ.get("NO_COLOR")
        self.printer_args = (hide_thinking, color)
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> str | None:
        """Stream one answer to `text`; -> the answer's content (kept in the history), None if interrupted."""
        self.history.append({"role": "user", "content": text})
        printer = _Printer(self.out, *self.printer_args)
        content: list[str] = []
        try:
            cut = self._stream(printer, content)
        except KeyboardInterrupt:
            printer.close()
            self.out.write("(stopped: this message and its answer are left out of the conversation)\n")
            self.history.pop()
            return None
        except TooLong as e:  # refused before anything ran: nothing was printed for this turn
            self.history.pop()
            self._error(str(e))
            return None
        except ValueError as e:  # e.g. text that is not valid Unicode
            printer.close()
            self.history.pop()
            self._error(str(e))
            return None
        except EngineDeadError:  # nothing can run any more: the command ends with this error
            printer.close()
            raise
        except Exception as e:  # noqa: BLE001 - a failed step (e.g. a device error): its request was aborted and the
            printer.close()  # LLM stays usable, so the conversation goes on without this turn
            self.history.pop()
            self._error(f"this answer failed ({type(e).__name__}: {e}); the conversation goes on")
            return None
        printer.close()
        if cut:  # else an answer cut short (or, hidden thinking cut, no answer at all) looks like a finished one
            self.out.write(f"{cut}\n")
        answer = "".join(content)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def _too_long(self, n: int) -> str:
        limit = f"the context limit (--max-model-len) is {self.llm.max_model_len} tokens"
        if len(self.history) > 1 + bool(self.system):  # earlier turns: starting over makes room
            return (f"this message was not sent: with it the conversation is {n} tokens and {limit}; /reset starts "
                    "over, or restart the chat with a larger --max-model-len")
        return (f"this message was not sent: it is {n} tokens with the chat template and {limit}; shorten it, or "
                "restart the chat with a larger --max-model-len")

    def _error(self, message: str) -> None:
        self.err.write(f"error: {message}\n")
        self.err.flush()

    def _stream(self, printer: _Printer, content: list[str]) -> str | None:
        """-> a note to show when the answer was cut by a length limit, else None."""
        kwargs = {} if self.enable_thinking else {"enable_thinking": False}
        prompt = self.llm.tokenizer.apply_chat_template(self.history, add_generation_prompt=True, **kwargs)
        ids = self.llm.tokenizer.encode(prompt)
        # >=, not the engine's >: a conversation filling max_model_len would get a one-token answer, useless in a
        # chat (the engine takes such a prompt for scoring it, as vLLM); and its refusal speaks of a prompt, not of
        # this conversation
        if len(ids) >= self.llm.max_model_len:
            raise TooLong(self._too_long(len(ids)))
        parser = ReasoningParser(prompt_opens_thinking(prompt), enabled=self.enable_thinking)
        stream = self.llm.generate_stream({"prompt_token_ids": ids, "prompt": prompt}, self.params)
        c = None
        try:
            for out in stream:
                c = out.outputs[0]
                split = parser.feed(c.delta_text)
                if c.finish_reason is not None:
                    tail = parser.finish()
                    split = Split(split.reasoning + tail.reasoning, split.content + tail.content)
                printer.write(split)
                content.append(split.content)
        finally:
            stream.close()  # on Ctrl-C: aborts the request, freeing its KV blocks and state slot
        if c is None or c.finish_reason != "length":
            return None
        if len(ids) + len(c.token_ids) >= self.llm.max_model_len:
            return (f"(answer cut: the conversation reached the context limit, --max-model-len "
                    f"{self.llm.max_model_len}; /reset starts over)")
        return f"(answer cut at --max-tokens {len(c.token_ids)})"


def read_message(first: str, prompt: str) -> str:
    """The message whose first line is `first`: that line; or a block opened by \"\"\" and read with input(prompt) up
    to the line that ends with \"\"\" (the quotes dropped); or, while a line ends in one backslash, it and the next
    (the backslash dropped). Newlines are kept; inside a block a backslash is text. EOFError / KeyboardInterrupt
    from input() inside an unfinished message propagate: the caller drops it."""
    head = first.lstrip()
    if head.startswith(BLOCK):
        return _read_block(head[len(BLOCK):], prompt)
    lines = []
    while _continues(first):
        lines.append(first.rstrip()[:-1])
        first = input(prompt)
    return "\n".join([*lines, first])


def _continues(line: str) -> bool:
    """Ends in one backslash, trailing spaces aside (a line ending in two is sent as typed)."""
    end = line.rstrip()
    return end.endswith("\\") and not end.endswith("\\\\")


def _read_block(rest: str, prompt: str) -> str:
    """`rest`: the opening line after its quotes; a block opened and closed on one line is a plain message."""
    lines = [rest]
    while not lines[-1].rstrip().endswith(BLOCK):
        lines.append(input(prompt))
    lines[-1] = lines[-1].rstrip()[:-len(BLOCK)]
    # a bare closing or opening line holds no text of the message (blank lines between them are kept)
    if not lines[-1].strip():
        lines.pop()
    if lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def run(session: ChatSession, banner: str, stdin: TextIO = sys.stdin) -> int:
    """The read-eval loop; returns the exit status."""
    out = session.out
    if stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        # Ctrl-C must stop an answer even when the chat was started from a context that ignores SIGINT (a
        # background job of a non-interactive shell inherits SIG_IGN, and Python then installs no handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # bytes that are not UTF-8 become lone surrogates, which the tokenizer refuses for that line only; a strict stdin
    # raised out of input() and lost the rest of its buffer with the failing chunk
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    # a character the terminal's encoding lacks (an emoji on a latin-1 terminal) is shown as "?"; strict, it raised
    # mid-answer and the whole turn was dropped
    for stream in (out, session.err):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    out.write(f"{banner}\n{HELP}\n")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(/exit quits)\n")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
        elif cmd in ("/help", "/?"):
            out.write(HELP + "\n")
        elif cmd.startswith("/"):
            out.write(f"unknown command {cmd}. {HELP}\n")
        else:
            try:  # a continuation prompt on a terminal only: piped, each line of a block would print one
                text = read_message(line, "... " if stdin.isatty() else "")
            except EOFError:
                out.write("\n(end of input: the unfinished message was not sent)\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n(dropped: the unfinished message was not sent)\n")
                continue
            if text.strip():  # an empty block, as an empty line, sends nothing
                session.ask(text)
