"""Online serving benchmark in the spirit of `vllm bench serve`: N random-token prompts streamed through
/v1/completions at a Poisson request rate, timed on the client.

Starts `deltaserve serve --model DIR` itself (flags after `--` go to it; it is stopped with SIGTERM at the end), or
times any OpenAI-compatible server already running (`--base-url`), so a peer serving the same checkpoint on the same
card is measured by the same client:

    python benchmarks/serve_latency.py --model /ckpt/Qwen3.5-9B --num-prompts 500 --input-len 1024 \
        --output-len 128 --request-rate 8 --json serve.json -- --max-num-seqs 256
    vllm serve /ckpt/Qwen3.5-9B --port 8771 &   # the peer, then the same client against it:
    python benchmarks/serve_latency.py --base-url http://127.0.0.1:8771 --tokenizer /ckpt/Qwen3.5-9B \
        --num-prompts 500 --input-len 1024 --output-len 128 --request-rate 8

Each prompt is `--input-len` token ids drawn uniformly from the tokenizer's base vocabulary (sent as a token-id list,
so lengths are exact), with `ignore_eos` and `max_tokens = --output-len`; the usage chunk must count exactly that
many prompt and output tokens, and a request that falls short is reported. Figures, as vLLM defines them:
TTFT: request sent (once --max-concurrency lets it go) to the first chunk carrying output; E2E: sent to the end
of the stream; TPOT: (E2E - TTFT) / (output tokens - 1) per request; ITL: the gaps between successive chunks
carrying output (a chunk with no token ids, no text and a finish_reason is not output), all requests
pooled. A chunk may carry several tokens (deltaserve and vLLM send one a step, with empty text where a token ends
inside a character; other servers may merge steps), so ITL counts chunks, not tokens: the table shows tokens per
chunk, counted from `return_token_ids` (`--no-token-ids` leaves that vLLM extra out for a
server that refuses it). Exit status 1 when a request failed or fell short (the figures are printed anyway).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Record:
    """One request as the client saw it; times in seconds."""
    index: int
    prompt_len: int  # token ids sent
    send_time: float = 0.0  # when it was sent, from the start of the run
    ttft: float | None = None  # send to the first chunk carrying output
    e2e: float | None = None  # send to the end of the stream
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between chunks carrying output
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)  # token ids per such chunk (return_token_ids)
    prompt_tokens: int | None = None  # usage.prompt_tokens
    output_tokens: int | None = None  # usage.completion_tokens
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.error or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---- a minimal streaming HTTP/1.1 client (the project depends on neither httpx nor aiohttp) ----

async def _body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives: chunked, sized, or up to the end of the connection."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection in the middle of its response")
            if not (size := int(line.split(b";")[0].strip(), 16)):
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def post_sse(url: str, payload: dict, api_key: str | None):
    """POST `payload` as JSON; yield (arrival time, data) for every server-sent event of the 200 response."""
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=u.scheme == "https" or None)
    try:
        body = json.dumps(payload).encode()
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        writer.write(f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n{auth}Connection: close\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()).strip():
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
        if status != 200:
            text = b"".join([d async for d in _body(reader, headers)]).decode(errors="replace")
            raise RuntimeError(f"HTTP {status}: {text.strip()[:300]}")
        pending, data = b"", []
        async for chunk in _body(reader, headers):
            t = time.perf_counter()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if not line and data:  # a blank line ends an event
                    yield t, "\n".join(data)
                    data = []
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip().decode())
    finally:
        writer.close()


def get_json(url: str, api_key: str | None, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


# ---- one request, the arrivals, the figures ----

def _carries_output(choice: dict) -> bool:
    """A chunk carries output when it has token ids, or (a server that sends none) text or no finish_reason yet."""
    if "token_ids" in choice:
        return bool(choice["token_ids"])
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def send_one(rec: Record, url: str, payload: dict, api_key: str | None, t0: float) -> None:
    start = time.perf_counter()
    rec.send_time, last = start - t0, start
    async for t, data in post_sse(url, payload, api_key):
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error'].get('message', event['error'])}")
        if event.get("usage"):
            rec.prompt_tokens = event["usage"].get("prompt_tokens")
            rec.output_tokens = event["usage"].get("completion_tokens")
        choice = (event.get("choices") or [None])[0]
        if choice is None or not _carries_output(choice):
            continue
        if rec.ttft is None:
            rec.ttft = t - start
        else:
            rec.itl.append(t - last)
        last = t
        if "token_ids" in choice:
            rec.chunk_tokens.append(len(choice["token_ids"]))
    rec.e2e = time.perf_counter() - start
    if rec.ttft is None:
        raise RuntimeError("the stream ended without any output")


async def timed_request(rec: Record, url: str, payload: dict, args, t0: float, delay: float,
                        gate: asyncio.Semaphore | None) -> None:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    async with gate or _NoGate():
        try:
            await asyncio.wait_for(send_one(rec, url, payload, args.api_key, t0), args.request_timeout)
        except asyncio.TimeoutError:
            rec.error = f"no complete response within --request-timeout {args.request_timeout:g} s"
        except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as e:
            rec.error = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)


class _NoGate:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def _payload(args, model: str, prompt: list[int]) -> dict:
    p = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "ignore_eos": True,
         "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if not args.no_token_ids:
        p["return_token_ids"] = True
    return p


async def run_benchmark(args, base_url: str, model: str, vocab: int) -> tuple[list[Record], float]:
    """-> (a record per request, seconds from the first send to the last response)."""
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, vocab, size=(args.num_prompts, args.input_len)).tolist()
    gaps = (rng.exponential(1.0 / args.request_rate, size=args.num_prompts) if np.isfinite(args.request_rate)
            else np.zeros(args.num_prompts))
    delays = np.cumsum(gaps) - gaps[0]  # the first request goes at once
    # prompts of their own: a warm-up must not put a timed prompt in a prefix cache
    warmups = rng.integers(0, vocab, size=(args.num_warmups, args.input_len)).tolist()
    url = base_url + "/v1/completions"
    for prompt in warmups:  # untimed; a server that cannot answer stops the run here
        rec = Record(-1, args.input_len)
        await timed_request(rec, url, _payload(args, model, prompt), args, time.perf_counter(), 0, None)
        if rec.error:
            raise SystemExit(f"error: the warm-up request to {url} failed: {rec.error}")
    records = [Record(i, args.input_len) for i in range(args.num_prompts)]
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    t0 = time.perf_counter()
    await asyncio.gather(*(timed_request(r, url, _payload(args, model, p), args, t0, d, gate)
                           for r, p, d in zip(records, prompts, delays)))
    return records, time.perf_counter() - t0


def _stats(name: str, values_s: list[float]) -> dict:
    v = np.asarray(values_s, dtype=np.float64) * 1000.0
    if not v.size:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    return {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
            f"p99_{name}_ms": float(np.percentile(v, 99))}


def summarize(records: list[Record], duration: float, args) -> dict:
    ok = [r for r in records if not r.error]
    short = [r.index for r in ok if r.output_tokens != args.output_len or r.prompt_tokens != args.input_len]
    n_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    n_out = sum(r.output_tokens or 0 for r in ok)
    chunks = sum(len(r.chunk_tokens) for r in ok)
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "wrong_token_counts": short,
        "max_concurrency": args.max_concurrency, "request_rate": args.request_rate, "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        **_stats("ttft", [r.ttft for r in ok]), **_stats("tpot", [r.tpot for r in ok if r.tpot is not None]),
        **_stats("itl", [g for r in ok for g in r.itl]), **_stats("e2el", [r.e2e for r in ok]),
        "tokens_per_chunk": sum(sum(r.chunk_tokens) for r in ok) / chunks if chunks else None,
    }


def print_table(f: dict) -> None:
    def row(label, value, fmt="{:.2f}"):
        print(f"{label:<40}{'n/a' if value is None else fmt.format(value):>10}")
    print("{:=^50}".format(" Serving Benchmark Result "))
    row("Successful requests:", f["completed"], "{}")
    row("Failed requests:", f["failed"], "{}")
    row("Requests with wrong token counts:", len(f["wrong_token_counts"]), "{}")
    row("Maximum request concurrency:", f["max_concurrency"], "{}")
    row("Request rate (req/s):", f["request_rate"], "{}")
    row("Benchmark duration (s):", f["duration_s"])
    row("Total input tokens:", f["total_input_tokens"], "{}")
    row("Total generated tokens:", f["total_output_tokens"], "{}")
    row("Request throughput (req/s):", f["request_throughput"])
    row("Output token throughput (tok/s):", f["output_throughput"])
    row("Total token throughput (tok/s):", f["total_token_throughput"])
    row("Output tokens per streamed chunk:", f["tokens_per_chunk"])
    for key, title, what in [("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st)",
                              "TPOT"), ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL")]:
        print("{:-^50}".format(title))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {what} (ms):", f[f"{stat}_{key}_ms"])
    print("=" * 50)


# ---- the server: started here, or one already running ----

def vocab_size(args) -> int:
    """Prompt token ids are drawn from [0, this): the tokenizer's base vocabulary (no added/special tokens)."""
    if args.vocab_size:
        return args.vocab_size
    tok_dir = Path(args.tokenizer or args.model).expanduser()
    try:
        return len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    except (OSError, KeyError, ValueError):
        pass
    try:
        cfg = json.loads((tok_dir / "config.json").read_text())
        return int(cfg.get("text_config", cfg)["vocab_size"])
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"error: no tokenizer.json or config.json vocab_size in {tok_dir} ({e}); give --vocab-size "
                         f"N (prompt ids are drawn from [0, N)).") from None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: str, n: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start_server(args, serve_args: list[str]) -> tuple[subprocess.Popen, str, str]:
    """Start `deltaserve serve` and wait for /health. -> (process, base url, log path)."""
    port = args.port or _free_port(args.host)
    log = args.serve_log or tempfile.mkstemp(prefix="deltaserve_serve_", suffix=".log")[1]
    cmd = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", args.model, "--host", args.host,
           "--port", str(port), *(["--api-key", args.api_key] if args.api_key else []), *serve_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    print(f"starting: {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "w") as f:  # a new session: the terminal's Ctrl-C reaches this script, which stops the server
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url, deadline = f"http://{args.host}:{port}", time.monotonic() + args.server_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: deltaserve serve exited with status {proc.returncode} before it answered "
                             f"/health; the end of its log ({log}):\n{_log_tail(log)}")
        try:
            get_json(base_url + "/health", None, timeout=2.0)
            return proc, base_url, log
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"error: deltaserve serve did not answer {base_url}/health within --server-timeout "
                             f"{args.server_timeout:g} s; the end of its log ({log}):\n{_log_tail(log)}")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM (the server lets running requests finish, then exits), SIGKILL to its process group after `grace` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def served_model(base_url: str, args) -> str:
    if args.served_model_name:
        return args.served_model_name
    try:
        return get_json(base_url + "/v1/models", args.api_key)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"error: could not read the model name from {base_url}/v1/models ({e}); give "
                         f"--served-model-name.") from None


# ---- the command line ----

def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Flags after `--` go to "
                                "`deltaserve serve` (with --model only), e.g. -- --max-num-seqs 256 --enforce-eager")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="checkpoint directory: start `deltaserve serve --model DIR` for the run")
    where.add_argument("--base-url", help="an OpenAI-compatible server already running, e.g. http://127.0.0.1:8771")
    p.add_argument("--host", default="127.0.0.1", help="with --model: the address it binds (default 127.0.0.1)")
    p.add_argument("--port", type=_positive(int), default=None, help="with --model: its port (default: a free one)")
    p.add_argument("--server-timeout", type=_positive(float), default=600.0,
                   help="with --model: seconds to wait for /health (default 600)")
    p.add_argument("--serve-log", help="with --model: the server's log file (default: a temp file)")
    p.add_argument("--served-model-name", help="the request's model field (default: the first of /v1/models)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (or config.json) to draw prompt ids from "
                   "(default: --model)")
    p.add_argument("--vocab-size", type=_positive(int), help="draw prompt ids from [0, N) instead")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (and given to the server it starts)")
    p.add_argument("--num-prompts", type=_positive(int), default=1000, help="requests (default 1000)")
    p.add_argument("--input-len", type=_positive(int), default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--output-len", type=_positive(int), default=128, help="output tokens (default 128)")
    p.add_argument("--request-rate", type=_positive(float), default=float("inf"),
                   help="requests per second, Poisson arrivals; inf (default): all at once")
    p.add_argument("--max-concurrency", type=_positive(int), default=None, help="requests in flight at most")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrival times (default 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first (default 1)")
    p.add_argument("--request-timeout", type=_positive(float), default=600.0,
                   help="seconds a request may take, stream included (default 600)")
    p.add_argument("--no-token-ids", action="store_true",
                   help="leave out return_token_ids (vLLM's extra) for a server that refuses it")
    p.add_argument("--json", metavar="FILE", help="write the figures, the settings and every request's record here")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, serve_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = build_parser()
    args = p.parse_args(own)
    if args.model and not Path(args.model).expanduser().is_dir():
        p.error(f"--model {args.model} is not a directory; give a Hugging Face Qwen3.5 checkpoint directory")
    if args.base_url and (serve_args or args.port or args.serve_log):
        p.error("flags after --, --port and --serve-log apply to a server this script starts (--model); a server "
                "at --base-url runs as it was started")
    if args.base_url and not (args.tokenizer or args.vocab_size):
        p.error("with --base-url give --tokenizer DIR or --vocab-size N, so the prompts' token ids exist in the "
                "served model's vocabulary")
    if args.num_warmups < 0 or args.temperature < 0:
        p.error("--num-warmups and --temperature must be 0 or more")
    if args.base_url:
        args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
        if urllib.parse.urlsplit(args.base_url).scheme not in ("http", "https"):
            p.error(f"--base-url {args.base_url} is not an http:// or https:// address")
    return args, serve_args


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse_args(sys.argv[1:] if argv is None else argv)
    vocab = vocab_size(args)
    proc = None
    try:
        if args.model:
            proc, base_url, _ = start_server(args, serve_args)
        else:
            base_url = args.base_url
        model = served_model(base_url, args)
        records, duration = asyncio.run(run_benchmark(args, base_url, model, vocab))
    except KeyboardInterrupt:
        print("interrupted: no figures", file=sys.stderr)
        return 130
    finally:
        if proc is not None:
            stop_server(proc)
    figures = summarize(records, duration, args)
    print_table(figures)
    for r in records:
        if r.error:
            print(f"request {r.index} failed: {r.error}", file=sys.stderr)
    if figures["wrong_token_counts"]:
        print(f"{len(figures['wrong_token_counts'])} requests did not get {args.input_len} prompt and "
              f"{args.output_len} output tokens by their usage (does the server honour ignore_eos and "
              f"include_usage?): requests {figures['wrong_token_counts'][:20]}", file=sys.stderr)
    if args.json:
        settings = {**vars(args), "serve_args": serve_args, "base_url": base_url, "model_name": model,
                    "prompt_vocab": vocab}
        Path(args.json).write_text(json.dumps({"settings": settings, "figures": figures,
                                               "requests": [dataclasses.asdict(r) for r in records]}, indent=1))
    return 1 if figures["failed"] or figures["wrong_token_counts"] else 0


if __name__ == "__main__":
    sys.exit(main())
