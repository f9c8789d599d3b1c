"""`deltaserve chat` driven through a pseudo-terminal: streaming output, multi-turn history, /reset, Ctrl-C, /exit,
and reasoning shown dimmed or hidden. The random tiny model is steered with the TEST-ONLY forced-output hook."""
import json
import os
import pty
import select
import sys
import time

import pytest

from deltaserve.serve.chat_cli import DIM, RESET
from deltaserve.tiny import make_tiny

ANSWER = "Hello there, nice to see you today, what would you like to talk about?"
RULES = [  # first match wins; the whole prompt (history included) is matched
    {"contains": ["LONG"], "output": "word " * 500},
    {"contains": ["Hello there", "again"], "output": "I remember you."},
    {"contains": ["again"], "output": "Nice to meet you."},
    {"contains": ["FIRST"], "output": f"<think>\nhmm, a greeting\n</think>\n\n{ANSWER}"},
]


class Pty:
    """A child process on a pseudo-terminal (so it has a controlling tty: Ctrl-C is SIGINT)."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.execvpe(argv[0], argv, env)
        self.buf = b""

    def read_until(self, needle: str, timeout: float = 60) -> tuple[str, list[bytes]]:
        """Read until `needle` appears in the output -> (text up to and including it, the raw reads)."""
        deadline, reads, want = time.time() + timeout, [], needle.encode()
        while want not in self.buf:
            left = deadline - time.time()
            assert left > 0, f"timed out waiting for {needle!r}; got:\n{self.buf.decode(errors='replace')}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                assert data, f"child exited before {needle!r}; got:\n{self.buf.decode(errors='replace')}"
                reads.append(data)
                self.buf += data
        end = self.buf.index(want) + len(want)
        text, self.buf = self.buf[:end].decode(errors="replace"), self.buf[end:]
        return text, reads

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 20) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.read(self.fd, 4096)  # drain, so the child never blocks on a full terminal
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise TimeoutError("chat did not exit")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def start_chat(model_dir, *flags) -> Pty:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    # one torch thread: the tiny model gains nothing from more, and 2 cores shared with the test runner thrash
    env.update(TERM="dumb", OMP_NUM_THREADS="1", DELTASERVE_TEST_FORCED_OUTPUTS=json.dumps(RULES))
    return Pty([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu",
                "--max-model-len", "1024", "--max-tokens", "600", *flags], env)


def test_chat_multiturn_reset_interrupt_exit(model_dir):
    chat = start_chat(model_dir)
    try:
        banner, _ = chat.read_until(">>> ", timeout=120)
        assert "/reset" in banner and "/exit" in banner
        chat.send("hi FIRST\r")
        out, reads = chat.read_until(">>> ")
        assert f"{DIM}hmm, a greeting{RESET}" in out  # reasoning shown dimmed, then the answer
        assert ANSWER in out and "<think>" not in out
        assert sum(1 for r in reads if b"you" in r or b"talk" in r or b"Hello" in r) >= 2 or len(reads) >= 4, \
            f"answer came in one piece, not streamed: {reads}"
        chat.send("again\r")
        out, _ = chat.read_until(">>> ")
        assert "I remember you." in out  # the first answer is in the history
        chat.send("/reset\r")
        out, _ = chat.read_until(">>> ")
        assert "(conversation cleared)" in out
        chat.send("again\r")
        out, _ = chat.read_until(">>> ")
        assert "Nice to meet you." in out and "I remember" not in out  # history is gone
        chat.send("LONG story\r")
        chat.read_until("word word word")
        chat.send("\x03")  # Ctrl-C stops the answer, not the program
        out, _ = chat.read_until(">>> ")
        # the stop says what became of the exchange: "(stopped)" alone left the user to guess it was dropped
        assert "(stopped: this message and its answer are left out of the conversation)" in out
        assert out.count("word") < 500
        chat.send("/exit\r")
        assert chat.wait() == 0
    finally:
        if chat.pid:
            try:
                os.kill(chat.pid, 9)
            except ProcessLookupError:
                pass


def test_chat_hide_thinking(model_dir):
    chat = start_chat(model_dir, "--hide-thinking")
    try:
        chat.read_until(">>> ", timeout=120)
        chat.send("hi FIRST\r")
        out, _ = chat.read_until(">>> ")
        assert ANSWER in out and "hmm, a greeting" not in out and DIM not in out
        chat.send("\x04")  # Ctrl-D quits too
        assert chat.wait() == 0
    finally:
        try:
            os.kill(chat.pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_survives_a_line_that_is_not_utf8(model_dir, errors):
    """Bytes that are not UTF-8 on stdin: a strict stdin used to end the chat, a lenient one passed lone surrogates
    on to the tokenizer, whose TypeError ended it with a traceback. Now that line gets one error and the next is
    answered (piped stdin, as in a script)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps(RULES),
           "PYTHONIOENCODING": f"utf-8:{errors}"}
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu",
                          "--max-model-len", "1024", "--max-tokens", "20"], input=b"caf\xe9 hi\nagain\n/exit\n",
                         capture_output=True, env=env, timeout=300)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in err, err
    assert "error: the text is not valid Unicode" in err and "error:" not in out, (out, err)  # diagnostics: stderr
    assert "Nice to meet you." in out, out  # the next line was answered


def test_chat_survives_a_failed_engine_step(model_dir):
    """A step that raises (a device error, e.g. out of memory on a long prompt) aborts the request and leaves the
    LLM usable (README); the chat used to end with a traceback and lose the conversation. Now that turn gets one
    error line and the next is answered, with the earlier turns still in the history."""
    import subprocess

    rules = [{"contains": ["BOOM"], "raise": "injected failure"}, *RULES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps(rules)}
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu",
                          "--max-model-len", "1024", "--max-tokens", "600"], input=b"hi FIRST\nBOOM\nagain\n/exit\n",
                         capture_output=True, env=env, timeout=300)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in err, err
    assert "error: this answer failed (RuntimeError: injected failure)" in err and "error:" not in out, (out, err)
    assert "I remember you." in out, out  # the next line was answered, the first answer still in the history


def test_chat_refuses_a_message_beyond_max_model_len_in_one_sentence(model_dir):
    """A message, or a conversation grown over turns, longer than --max-model-len: that message is refused in one
    sentence naming the flag (and /reset only when there are earlier turns to drop), the chat goes on. The engine's
    "the prompt has N tokens ... raise max_model_len (/reset starts over)" offered /reset for a first message."""
    import subprocess

    rules = [{"contains": ["grow"], "output": "word " * 15}, *RULES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps(rules)}
    lines = ["story " * 200, *(f"grow {i}" for i in range(8)), "/reset", "again", "/exit"]
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu",
                          "--max-model-len", "128", "--max-tokens", "40"], input="\n".join(lines).encode() + b"\n",
                         capture_output=True, env=env, timeout=300)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in err, err
    errors = [e for e in err.splitlines() if e.startswith("error:")]
    assert len(errors) >= 2, err
    first, grown = errors[0], errors[-1]
    assert first.startswith("error: this message was not sent: it is ") and "--max-model-len" in first, first
    assert "/reset" not in first, first  # nothing to drop yet: only a shorter message or a larger limit helps
    assert "the conversation is" in grown and "/reset starts over" in grown and "--max-model-len" in grown, grown
    assert out.count("word word") >= 2 and "Nice to meet you." in out, out  # turns that fit, and after /reset


def test_chat_shows_an_answer_the_terminal_cannot_encode(model_dir):
    """An answer with characters the output's encoding lacks (é and an emoji on an ASCII terminal): shown with "?"
    for them. A strict stdout raised UnicodeEncodeError mid-answer, the turn was dropped from the conversation and
    an error line told the user to /reset."""
    import subprocess

    rules = [{"contains": ["FIRST"], "output": "caf\u00e9 \U0001f600 ok"}]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps(rules),
           "PYTHONIOENCODING": "ascii"}
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu",
                          "--max-model-len", "1024", "--max-tokens", "20"], input=b"hi FIRST\n/exit\n",
                         capture_output=True, env=env, timeout=300)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in err and "error:" not in err, err
    assert "caf? ? ok" in out, out


@pytest.mark.parametrize("flags,note", [
    (["--max-model-len", "1024", "--max-tokens", "8"], "(answer cut at --max-tokens 8)"),
    (["--max-model-len", "40", "--max-tokens", "100"],
     "(answer cut: the conversation reached the context limit, --max-model-len 40; /reset starts over)"),
], ids=["max-tokens", "max-model-len"])
def test_chat_says_when_an_answer_was_cut(model_dir, flags, note):
    """An answer stopped by --max-tokens or by the context limit gets a note; it used to end as if finished (with
    --hide-thinking and the cut inside the reasoning: an empty answer and no word why)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps([{"contains": ["CUT"], "output": "word " * 100}])}
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu", *flags],
                         input=b"CUT\n/exit\n", capture_output=True, env=env, timeout=300)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in err, err
    assert "word word" in out and note in out, out


def test_chat_reads_multiline_messages_from_piped_input(model_dir):
    """A message of several lines: a \"\"\" block (slash lines inside it are text, not commands) or lines ending in a
    backslash, each sent as one message with its newlines; \"\"\"text\"\"\" on one line is a plain message, an empty
    block sends nothing, and end of input inside a block says the message was not sent. Each line used to be a
    message of its own, and a "/reset" line inside pasted text cleared the conversation."""
    import subprocess

    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    # the whole prompt (history included) is matched and the first rule wins: the latest message's rule comes first
    rules = [{"contains": [turn.format("ONE line")], "output": "Got one line."},
             {"contains": [turn.format("first \nsecond")], "output": "Got the continuation."},
             {"contains": [turn.format('def f():\n    return "x"\n/reset\n\nBLOCK end')], "output": "Got the block."}]
    lines = ['"""', "def f():", '    return "x"', "/reset", "", 'BLOCK end"""',  # the block
             "first \\", "second",  # the backslash continues the line
             '"""ONE line"""',
             '"""', "", '"""', '""""""',  # empty blocks: nothing sent
             "/help",  # a command on a message's first line still works
             '"""', "UNSENT text"]  # end of input inside a block
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps(rules)}
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", str(model_dir), "--device", "cpu",
                          "--max-model-len", "1024", "--max-tokens", "20"], input="\n".join(lines).encode() + b"\n",
                         capture_output=True, env=env, timeout=300)
    out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in err and "error:" not in err, err
    # each message answered once: a message sent again (an empty block, the unsent one) would repeat one of them
    for answer in ("Got the block.", "Got the continuation.", "Got one line."):
        assert out.count(answer) == 1, (answer, out)
    assert "(conversation cleared)" not in out and "unknown command" not in out, out
    assert out.count('start a message with """') == 2, out  # the banner's help and /help's
    assert out.endswith("(end of input: the unfinished message was not sent)\n"), out
    assert "... " not in out, out  # no continuation prompt for piped input


def test_chat_multiline_prompt_interrupt_and_eof_on_a_terminal(model_dir):
    """On a terminal a block or a continued line shows the "... " prompt; Ctrl-C inside a block drops it (and the
    chat goes on), Ctrl-D inside one says the message was not sent and quits."""
    chat = start_chat(model_dir)
    try:
        chat.read_until(">>> ", timeout=120)
        chat.send('"""\r')
        chat.read_until("... ")
        chat.send("not sent\r")
        chat.read_until("... ")
        # CPython's readline sees a SIGINT only when it interrupts its wait for a key: one landing between the
        # prompt's write and that wait shows only at the next key (a person is never that quick)
        time.sleep(0.5)
        chat.send("\x03")  # Ctrl-C drops the block, not the program
        out, _ = chat.read_until(">>> ")
        assert "(dropped: the unfinished message was not sent)" in out, out
        chat.send("hi \\\r")
        chat.read_until("... ")
        chat.send("FIRST\r")
        out, _ = chat.read_until(">>> ")
        assert ANSWER in out, out
        chat.send("again\r")  # the continued message and its answer are in the history
        out, _ = chat.read_until(">>> ")
        assert "I remember you." in out, out
        chat.send('"""\r')
        chat.read_until("... ")
        chat.send("\x04")  # Ctrl-D inside a block: the message is not sent, the chat ends as on Ctrl-D
        chat.read_until("(end of input: the unfinished message was not sent)")
        assert chat.wait() == 0
    finally:
        try:
            os.kill(chat.pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("lines,message", [
    (["plain"], "plain"),
    (['"""', "  indented", "", "/exit", 'last"""'], "  indented\n\n/exit\nlast"),
    (['""" opened here', "ends \\", '  """  '], " opened here\nends \\"),  # a backslash in a block is text
    (['"""one line"""'], "one line"),
    (['""""""'], ""),
    (['"""', "", '"""'], ""),
    (["a \\", "b\\", "c"], "a \nb\nc"),
    (["ends in two \\\\"], "ends in two \\\\"),
], ids=["plain", "block", "block-opened-with-text", "one-line-block", "empty", "blank-block", "backslash",
        "double-backslash"])
def test_read_message(monkeypatch, lines, message):
    """How the lines after a message's first are read into it (what the e2e tests above drive through the CLI)."""
    from deltaserve.serve.chat_cli import read_message

    rest = iter(lines[1:])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(rest))
    assert read_message(lines[0], "") == message
    assert next(rest, None) is None  # read to the message's end, and not beyond
