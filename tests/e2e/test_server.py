"""`deltaserve serve` end to end: a real server subprocess on a free loopback port, driven by the real `openai` client.

The tiny checkpoint's weights are random, so the model is steered with the TEST-ONLY forced-output hook
(deltaserve/serve/testing.py): prompts containing a marker make it "say" a reasoning block or a tool call.
"""
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial

import openai
import pytest

from deltaserve import LLM, SamplingParams
from deltaserve.tiny import make_tiny
from deltaserve.tokenizer import Tokenizer

API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 2048  # room for a prompt the prefix cache pauses for (snapshots of 1024 tokens or more)
THINK = ("<think>\nLet me think about it.\n</think>\n\nThe answer is 4.", "Let me think about it.", "The answer is 4.")
XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>")
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
REPEATED_CALL = XML_CALL.replace("</function>", "<parameter=city>\nLyon\n</parameter>\n</function>")  # city twice
RULES = [  # first match wins: the tool-response rule must precede the tool-call ones its prompt also matches
    {"contains": ["<tool_response>", "sunny"], "output": "It is sunny in Paris."},
    {"contains": ["FORCE_XML_TOOL"], "output": XML_CALL},
    {"contains": ["FORCE_JSON_TOOL"], "output": JSON_CALL},
    {"contains": ["FORCE_THINK"], "output": THINK[0]},
    {"contains": ["FORCE_BOOM"], "raise": "injected test failure"},
    {"contains": ["FORCE_DIE"], "die": "injected engine death"},
    {"contains": ["FORCE_TWO_TOOLS"], "output": "Checking.\n\n" + XML_CALL + "\n" + JSON_CALL},
    {"contains": ["FORCE_REPEATED_PARAM"], "output": REPEATED_CALL},
    {"contains": ["FORCE_ACCENTS"], "output": "Café, 你好 🎉 done."},  # characters of 2, 3 and 4 UTF-8 bytes
    # 150 and 120 tokens: long enough to be still running when another request arrives
    {"contains": ["FORCE_LONG_ALPHA"], "output": " ".join(["alpha"] * 30)},
    {"contains": ["FORCE_LONG_BRAVO"], "output": " ".join(["bravo"] * 30)},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `deltaserve serve` subprocess; its output goes to a log file (a full pipe would block it)."""

    def __init__(self, model_dir, tmp, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        # one torch thread: the tiny model gains nothing from more, and 2 cores shared with the clients thrash
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTASERVE_TEST_FORCED_OUTPUTS": json.dumps(RULES)}
        cmd = [sys.executable, "-m", "deltaserve.cli", "serve", str(model_dir), "--device", "cpu", "--port",
               str(self.port), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN), *extra]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log_path.read_text()}"
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"server did not become healthy:\n{self.log_path.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def http(url, body=None, headers=None, method=None):
    """-> (status, parsed JSON body or text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def metrics(server) -> dict[str, float]:
    _, text = http(server.url + "/metrics")
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(deltaserve_\w+?)(?:\{(.*)\})? ([-+0-9.eE]+|NaN)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            key = m.group(1) + (f"[{labels['finished_reason']}]" if "finished_reason" in labels else "")
            out[key] = float(m.group(3))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log"), "--api-key", API_KEY, "--max-num-seqs", "256",
               "--enable-prefix-caching")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def user(text):
    return [{"role": "user", "content": text}]


NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def stream_chat(client, **kw):
    """-> (content, reasoning, {index: [name, arguments, n_argument_deltas]}, finish_reason, usage, chunks)."""
    content, reasoning, calls, finish, usage, chunks = "", "", {}, None, None, 0
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        chunks += 1
        usage = chunk.usage or usage
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                if tc.id is not None:
                    assert tc.index not in calls and tc.type == "function"
                    calls[tc.index] = [tc.function.name, "", 0]
                if tc.function.arguments:
                    calls[tc.index][1] += tc.function.arguments
                    calls[tc.index][2] += 1
            finish = ch.finish_reason or finish
    return content, reasoning, calls, finish, usage, chunks


def cli(*args):
    return subprocess.run([sys.executable, "-m", "deltaserve.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd, flags", [
    ("serve", ["MODEL", "--host", "--port", "--api-key", "--served-model-name", "--shutdown-timeout", "--device",
               "--dtype", "--max-model-len", "--max-num-seqs", "--tp", "--num-kv-blocks", "--enable-prefix-caching",
               "--chat-template", "--trust-request-chat-template", "--exclude-tools-when-tool-choice-none",
               "--log-stats-interval", "--disable-log-stats"]),
    ("chat", ["MODEL", "--hide-thinking", "--no-thinking", "--system", "--max-tokens", "--temperature", "--device",
              "--chat-template"]),
], ids=["serve", "chat"])
def test_cli_help(cmd, flags):
    res = cli(cmd, "--help")
    assert res.returncode == 0, res.stderr
    for flag in flags:
        assert flag in res.stdout, flag


@pytest.mark.parametrize("args, needle", [
    # a free port: the listen check comes first, and 8000 may be taken on the machine running the tests
    (["serve", "--tp", "4", "--port", str(free_port())],
     "tensor_parallel_size=4 does not divide linear_num_key_heads=2; valid sizes: 1, 2"),
    (["serve", "--port", "0"], "--port"),
    (["chat", "--temperature", "-1"], "temperature"),
], ids=["tp", "port", "chat_temperature"])
def test_cli_rejects_unsupported_flags(args, needle):
    res = cli(*args, "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().startswith("error: ") and needle in res.stderr, res.stderr


def test_models_health_version(server, client, model_dir):
    assert [m.id for m in client.models.list().data] == [MODEL]
    # vLLM's ModelCard: `vllm bench serve` without --model reads data[0]["root"] (the checkpoint, its tokenizer path)
    status, body = http(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    card = body["data"][0]
    assert status == 200 and (card["root"], card["parent"], card["max_model_len"]) == (str(model_dir), None,
                                                                                       MAX_MODEL_LEN), card
    assert http(server.url + "/health")[0] == 200
    assert http(server.url + "/health", method="HEAD")[0] == 200
    status, body = http(server.url + "/version")
    assert status == 200 and body["version"]
    req = urllib.request.Request(server.url + "/v1/completions", method="GET",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405 and e.value.headers["Allow"] == "POST"  # HTTP requires Allow on a 405


def test_a_model_is_retrieved_by_its_id(server, client):
    """GET /v1/models/{id} (OpenAI's retrieve, the openai client's models.retrieve) answers the model's card; it was
    a 404 for the served model too."""
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "deltaserve"), card
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("not-" + MODEL)
    assert e.value.body["code"] == "model_not_found" and "not-" + MODEL in e.value.body["message"], e.value.body
    assert http(server.url + "/v1/models/" + MODEL)[0] == 401  # behind the API key, as the list is


def test_chat_and_completions_same_greedy_text(client, tokenizer):
    msgs = user("Tell me about the quick brown fox.")
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    n_prompt = len(tokenizer.encode(prompt))
    kw = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(model=MODEL, messages=msgs, **{**kw, "extra_body": {**kw["extra_body"],
                                                                                              **NO_THINK}})
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (n_prompt, 12)
    content, _, _, finish, usage, _ = stream_chat(client, messages=msgs, stream_options={"include_usage": True},
                                                  **{**kw, "extra_body": {**kw["extra_body"], **NO_THINK}})
    assert (content, finish) == (text, "length")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    comp = client.completions.create(model=MODEL, prompt=prompt, **kw)
    assert comp.choices[0].text == text
    assert (comp.usage.prompt_tokens, comp.usage.completion_tokens) == (n_prompt, 12)
    streamed, usage = "", None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        streamed += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert streamed == text
    assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, 12)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(client, tokenizer, endpoint):
    """vLLM's stream_options.continuous_usage_stats was refused with a 400. With include_usage, every chunk now has
    its prompt's tokens and its choice's tokens so far (vLLM's counts), and the last chunk the whole usage; without
    include_usage it asks for nothing, as in vLLM."""
    kw = dict(model=MODEL, max_tokens=4, n=2, temperature=1.0, seed=1, stream=True,
              stream_options={"include_usage": True, "continuous_usage_stats": True})
    ids = tokenizer.encode("The quick brown fox")
    if endpoint == "chat":
        n_prompt = len(tokenizer.encode(tokenizer.apply_chat_template(user("hi"), add_generation_prompt=True,
                                                                      enable_thinking=False)))
        create = partial(client.chat.completions.create, messages=user("hi"),
                         extra_body={"ignore_eos": True, **NO_THINK})
    else:
        n_prompt, create = len(ids), partial(client.completions.create, prompt=ids, extra_body={"ignore_eos": True})
    *chunks, last = create(**kw)
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (n_prompt, 8), last
    so_far = {0: [], 1: []}
    for chunk in chunks:
        (choice,) = chunk.choices
        assert chunk.usage.prompt_tokens == n_prompt, chunk
        assert chunk.usage.total_tokens == n_prompt + chunk.usage.completion_tokens, chunk
        so_far[choice.index].append(chunk.usage.completion_tokens)
    assert all(counts == sorted(counts) and counts[-1] == 4 for counts in so_far.values()), so_far
    plain = list(create(**{**kw, "stream_options": {"continuous_usage_stats": True}}))
    assert all(chunk.usage is None for chunk in plain) and all(chunk.choices for chunk in plain)


def test_usage_counts_the_prompt_tokens_the_prefix_cache_gave(client, tokenizer):
    """The server runs with --enable-prefix-caching: a 1100-token prompt seen before starts from its snapshot at 1024
    (the cache snapshots at multiples of 256, pausing a prefill for 1024 tokens or more), says so in usage, and
    answers as the first time."""
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog " * 150)[:1100]
    kw = dict(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens == 1100 and again.usage.prompt_tokens_details.cached_tokens == 1024
    usage = None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    assert usage.prompt_tokens_details.cached_tokens == 1024


def test_metrics_count_the_prefix_caches_blocks_apart(server, client, tokenizer):
    """Blocks only cached prefixes hold are not 'in use': requests get them back when they need them."""
    test_usage_counts_the_prompt_tokens_the_prefix_cache_gave(client, tokenizer)
    m = metrics(server)
    assert m["deltaserve_prefix_cache_kv_blocks"] >= 1024 // 16 and m["deltaserve_kv_blocks_used"] == 0, m
    before = m["deltaserve_prefix_cache_hit_tokens_total"]
    test_usage_counts_the_prompt_tokens_the_prefix_cache_gave(client, tokenizer)
    assert metrics(server)["deltaserve_prefix_cache_hit_tokens_total"] - before == 3 * 1024, "again + streamed + first"


_VLLM_TWINS = (  # (vLLM's series, deltaserve's series): gateways and autoscalers built for vLLM read the first
    ("vllm:num_requests_running", "deltaserve_num_requests_running"),
    ("vllm:num_requests_waiting", "deltaserve_num_requests_waiting"),
    ("vllm:kv_cache_usage_perc", "deltaserve_kv_cache_usage_perc"),
    ("vllm:gpu_cache_usage_perc", "deltaserve_kv_cache_usage_perc"),  # the name vLLM used before 0.9
    ("vllm:prompt_tokens_total", "deltaserve_prompt_tokens_total"),
    ("vllm:generation_tokens_total", "deltaserve_generation_tokens_total"),
    ("vllm:request_success_total", "deltaserve_request_success_total"),
    ("vllm:time_to_first_token_seconds_count", "deltaserve_time_to_first_token_seconds_count"),
    ("vllm:time_to_first_token_seconds_sum", "deltaserve_time_to_first_token_seconds_sum"),
    ("vllm:time_per_output_token_seconds_count", "deltaserve_time_per_output_token_seconds_count"),
    ("vllm:e2e_request_latency_seconds_count", "deltaserve_e2e_request_latency_seconds_count"),
    ("vllm:e2e_request_latency_seconds_sum", "deltaserve_e2e_request_latency_seconds_sum"),
)


def _series(text: str, name: str) -> dict[str, tuple[dict, float]]:
    """Every sample of `name` in a /metrics body, keyed by its finished_reason label ('' without one)."""
    out = {}
    for labels, value in re.findall(rf'^{re.escape(name)}(?:\{{(.*)\}})? ([-+0-9.eE]+|NaN)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[labels.get("finished_reason", "")] = (labels, float(value))
    return out


@pytest.mark.parametrize("vllm_name, ours", _VLLM_TWINS, ids=[v for v, _ in _VLLM_TWINS])
def test_metrics_expose_vllms_names_with_the_same_values(server, client, vllm_name, ours):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3, extra_body={"ignore_eos": True})
    _, text = http(server.url + "/metrics")
    theirs, mine = _series(text, vllm_name), _series(text, ours)
    assert theirs, f"{vllm_name} missing from /metrics"
    assert {k: v for k, (_, v) in theirs.items()} == {k: v for k, (_, v) in mine.items()}
    for labels, _ in theirs.values():
        assert labels["model_name"] == MODEL and labels["engine"] == "0", labels


def test_completions_batch_n_and_logprobs(client, tokenizer):
    prompts = ["The quick brown", "Numbers: 0 1 2"]
    # top_k 1: n > 1 needs a temperature (greedy n > 1 is refused, as in vLLM), and top-k 1 still takes the argmax
    res = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=1.0, logprobs=3,
                                    extra_body={"ignore_eos": True, "top_k": 1})
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert res.choices[0].text == res.choices[1].text  # argmax samples agree
    assert res.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert res.usage.completion_tokens == 4 * 5
    lp = res.choices[2].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        # keyed by token text: byte pieces that all print as U+FFFD collide, so up to 3 entries
        assert 1 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy picks the top token


@pytest.mark.parametrize("k", [0, 1], ids=["logprobs-0", "logprobs-1"])
def test_completions_top_logprobs_hold_the_sampled_token(client, k):
    """OpenAI's legacy completions always report the chosen token's logprob among top_logprobs (up to logprobs + 1
    entries): a sampled token outside the top k was missing, and logprobs=0 gave empty dicts."""
    res = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=1.5,
                                    seed=3, logprobs=k, extra_body={"ignore_eos": True})
    lp = res.choices[0].logprobs
    off_top = 0
    for text, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top.get(text) == pytest.approx(chosen) and 1 <= len(top) <= k + 1, (text, chosen, top)
        off_top += chosen < max(top.values())
    assert off_top or k == 0, "every sampled token was the most likely one: raise the temperature"


def test_logit_bias_forces_and_bans(client, tokenizer):
    """OpenAI's logit_bias (token id strings -> bias) through the real client: +100 forces a token on a sampled
    request, -100 on the greedy tokens bans them."""
    forced = tokenizer.encode("a")
    assert len(forced) == 1
    res = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=5, temperature=0.9, seed=3,
                                    logit_bias={str(forced[0]): 100}, extra_body={"ignore_eos": True})
    assert res.choices[0].text == tokenizer.decode(forced * 5)
    plain = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=3, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})
    first = tokenizer.encode("The quick brown" + plain.choices[0].text)[len(tokenizer.encode("The quick brown")):]
    banned = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=3, temperature=0,
                                       logit_bias={str(t): -100 for t in first}, extra_body={"ignore_eos": True})
    assert banned.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_logit_bias_beyond_100_acts_as_100(client, tokenizer, endpoint):
    """vLLM clamps logit_bias values to [-100, 100] (OpenAI's range) where we refused them with a 400: a client's
    +1000 forces a token as +100 does."""
    forced = tokenizer.encode("a")
    kw = dict(model=MODEL, max_tokens=3, temperature=0.9, seed=3, logit_bias={str(forced[0]): 1000},
              extra_body={"ignore_eos": True, **NO_THINK} if endpoint == "chat" else {"ignore_eos": True})
    if endpoint == "chat":
        text = client.chat.completions.create(messages=user("hi"), **kw).choices[0].message.content
    else:
        text = client.completions.create(prompt="The quick brown", **kw).choices[0].text
    assert text == tokenizer.decode(forced * 3)


@pytest.mark.parametrize("bias, clamped", [(101, 100.0), (-1e9, -100.0), (float("inf"), 100.0), (10 ** 400, 100.0),
                                         (-7.5, -7.5)], ids=["101", "minus_1e9", "infinity", "huge_integer", "inside"])
def test_logit_bias_beyond_100_is_clamped(bias, clamped):
    from deltaserve.serve.protocol import CompletionRequest, parse_request, sampling_params

    body = json.dumps({"prompt": "hi", "logit_bias": {"5": bias}}).encode()  # inf is sent as JSON's Infinity
    assert sampling_params(parse_request(CompletionRequest, body), 4, None).logit_bias == {5: clamped}


REQUEST_ID_CASES = {  # name: (endpoint, stream, X-Request-Id header or None, body's request_id or None, id expected)
    "chat_header": ("chat", False, "trace-1", None, "chatcmpl-trace-1"),
    "chat_streamed_body": ("chat", True, None, "body-2", "chatcmpl-body-2"),
    "completions_body": ("completions", False, None, "body-3", "cmpl-body-3"),
    "completions_streamed_header_beats_body": ("completions", True, "header-4", "body-4", "cmpl-header-4"),
    "chat_none_is_random": ("chat", False, None, None, re.compile(r"chatcmpl-[0-9a-f]{32}")),
    "completions_empty_header_is_none": ("completions", False, "", None, re.compile(r"cmpl-[0-9a-f]{32}")),
}


@pytest.mark.parametrize("case", list(REQUEST_ID_CASES), ids=list(REQUEST_ID_CASES))
def test_the_response_id_is_the_clients_request_id(client, case):
    """vLLM's response id: its prefix and the X-Request-Id header, else the body's request_id, else a random id; both
    were ignored (every response had a random id). A streamed answer carries it in every chunk."""
    endpoint, stream, header, body_id, expected = REQUEST_ID_CASES[case]
    kw = dict(model=MODEL, max_tokens=2, extra_headers={"X-Request-Id": header} if header is not None else None,
              extra_body={"request_id": body_id} if body_id is not None else None)
    create = (partial(client.chat.completions.create, messages=user("hi")) if endpoint == "chat"
              else partial(client.completions.create, prompt="hi"))
    ids = {chunk.id for chunk in create(stream=True, **kw)} if stream else {create(**kw).id}
    assert len(ids) == 1, ids
    (got,) = ids
    assert re.fullmatch(expected, got) if isinstance(expected, re.Pattern) else got == expected, got


def test_requests_in_flight_with_the_same_request_id_run_apart(server):
    """Two clients sending the same X-Request-Id at once both get it back as their id and each gets its own answer:
    the engine keys requests by ids of its own (vLLM, too, makes its internal ids unique), so the second is neither
    refused as a duplicate nor handed the first one's tokens."""
    prompts = {"FORCE_LONG_ALPHA": " ".join(["alpha"] * 30), "FORCE_LONG_BRAVO": " ".join(["bravo"] * 30)}

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        try:
            # both opened (so both queued in the engine) before either is read; each runs for 120 steps or more
            streams = [await aclient.completions.create(model=MODEL, prompt=p, max_tokens=400, stream=True,
                                                        extra_headers={"X-Request-Id": "shared"}) for p in prompts]

            async def read(stream):
                ids, text = set(), ""
                async for chunk in stream:
                    ids.add(chunk.id)
                    text += chunk.choices[0].text if chunk.choices else ""
                return ids, text

            return await asyncio.gather(*(read(s) for s in streams))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert [ids for ids, _ in results] == [{"cmpl-shared"}] * 2, results
    assert [text for _, text in results] == list(prompts.values()), results


def test_allowed_token_ids_and_bad_words_limit_what_is_sampled(client, tokenizer):
    """vLLM's allowed_token_ids: was accepted and ignored; now only those ids come out, greedy or sampled."""
    allowed = tokenizer.encode("a") + tokenizer.encode(" b")
    for temperature in (0, 1.0):
        res = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=temperature,
                                        seed=1, extra_body={"ignore_eos": True, "allowed_token_ids": allowed})
        ids = tokenizer.encode(res.choices[0].text)
        assert res.usage.completion_tokens == 6 and set(ids) <= set(allowed), (res.choices[0].text, ids)
    # vLLM's return_tokens_as_token_ids (was ignored): logprobs name tokens by id, streamed or not, chat too
    body = dict(model=MODEL, prompt="The quick brown", max_tokens=4, temperature=0, logprobs=2, echo=True,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    res = client.completions.create(**body)
    lp, text = res.choices[0].logprobs, res.choices[0].text
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert ids[:len(tokenizer.encode("The quick brown"))] == tokenizer.encode("The quick brown")
    assert len(ids) == len(tokenizer.encode("The quick brown")) + 4 and tokenizer.decode(ids) == text
    assert all(all(k.startswith("token_id:") for k in top) for top in lp.top_logprobs[1:])
    # offsets still index the text: each token's text starts there
    assert all(text.startswith(tokenizer.decode([t]), at) for t, at in zip(ids, lp.text_offset)
               if "\ufffd" not in tokenizer.decode([t]))
    streamed = [(t, at) for c in client.completions.create(**body, stream=True)
                for t, at in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.text_offset)]
    assert streamed == list(zip(lp.tokens, lp.text_offset))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=1,
                                          extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    assert all(e.token.startswith("token_id:") and e.top_logprobs[0].token.startswith("token_id:") for e in content)
    # bytes stay the token's own: together they are the answer's text (then <|im_end|> if it ended)
    joined = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    assert joined.startswith(chat.choices[0].message.content or ""), joined
    # vLLM's bad_words (was refused since this morning, ignored before): the greedy answer's first word is banned
    body = dict(model=MODEL, prompt="The quick brown", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**body, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    banned = client.completions.create(**dict(body, extra_body={"ignore_eos": True, "bad_words": [first]}), logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != first, (first, banned.choices[0].logprobs.tokens)


def test_min_tokens_extra(client):
    """vLLM's min_tokens: a stop token forced by logit_bias ends the answer only once min_tokens tokens are out."""
    body = dict(model=MODEL, prompt="The quick brown", max_tokens=10, temperature=0, logit_bias={"7": 100})
    for min_tokens, want in ((0, 1), (3, 4)):
        res = client.completions.create(**body, extra_body={"stop_token_ids": [7], "min_tokens": min_tokens})
        assert (res.usage.completion_tokens, res.choices[0].finish_reason) == (want, "stop"), min_tokens


def test_response_format_json_schema_and_object(client):
    """response_format constrains the answer: a strict schema's instance, or any JSON object (prefix if cut)."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["a", "n"], "additionalProperties": False}
    res = client.chat.completions.create(
        model=MODEL, messages=user("Give me JSON"), max_tokens=48, temperature=0.9, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "ab", "schema": schema, "strict": True}},
        extra_body=NO_THINK)
    assert res.choices[0].finish_reason == "stop"
    answer = json.loads(res.choices[0].message.content)
    assert set(answer) == {"a", "n"} and isinstance(answer["a"], bool) and type(answer["n"]) is int
    obj = client.chat.completions.create(model=MODEL, messages=user("Give me JSON"), max_tokens=8, temperature=0.9,
                                         seed=2, response_format={"type": "json_object"}, extra_body=NO_THINK)
    assert obj.choices[0].message.content.lstrip().startswith("{")


def test_structured_outputs_extra_on_completions(client):
    """vLLM's structured_outputs extra: a choice and a regex constrain each of several prompts' samples."""
    res = client.completions.create(model=MODEL, prompt=["Pick:", "Or:"], n=2, max_tokens=12, temperature=1.0,
                                    seed=5, extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert [c.text for c in res.choices] and all(c.text in ("left", "right") for c in res.choices)
    code = client.completions.create(model=MODEL, prompt="Code:", max_tokens=12, temperature=1.0, seed=5,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3}"}})
    assert re.fullmatch("[A-Z]{2}[0-9]{3}", code.choices[0].text) and code.choices[0].finish_reason == "stop"


def test_tokenize_and_detokenize(server, client, tokenizer):
    """/tokenize gives the ids a completion's prompt has (usage agrees) and a chat's rendered conversation;
    /detokenize gives the text back."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    got, body = http(server.url + "/tokenize", {"model": MODEL, "prompt": "The quick brown"}, auth)
    assert got == 200 and body["tokens"] == tokenizer.encode("The quick brown")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    res = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=1)
    assert res.usage.prompt_tokens == body["count"]
    msgs = user("Hi there")
    got, chat = http(server.url + "/tokenize", {"model": MODEL, "messages": msgs, **NO_THINK}, auth)
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert got == 200 and chat["tokens"] == tokenizer.encode(rendered)
    got, back = http(server.url + "/detokenize", {"model": MODEL, "tokens": chat["tokens"]}, auth)
    assert got == 200 and back["prompt"] == rendered
    assert http(server.url + "/tokenize", {"model": MODEL, "prompt": "x"}, {})[0] == 401
    # model is optional there, as in vLLM
    assert http(server.url + "/tokenize", {"messages": msgs, **NO_THINK}, auth)[1]["tokens"] == chat["tokens"]
    assert http(server.url + "/detokenize", {"tokens": chat["tokens"]}, auth)[1]["prompt"] == rendered
    assert http(server.url + "/tokenize", {"model": "other", "prompt": "x"}, auth)[0] == 404


def test_return_token_ids(server, client, tokenizer):
    """vLLM's return_token_ids (what RL rollout clients train on) was accepted and ignored: no ids came back. Now the
    prompt's ids and each choice's, streamed (the prompt's with the first chunk, then each chunk's new tokens) or not,
    on both endpoints."""
    kw = dict(model=MODEL, max_tokens=6, extra_body={"return_token_ids": True, "ignore_eos": True})
    res = client.completions.create(prompt="hello", **kw)
    choice = res.choices[0].model_extra
    assert choice["prompt_token_ids"] == tokenizer.encode("hello") and len(choice["token_ids"]) == 6
    assert tokenizer.decode(choice["token_ids"]) == res.choices[0].text
    chunks = [c.choices[0].model_extra for c in client.completions.create(prompt="hello", stream=True, **kw)]
    assert chunks[0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert [t for c in chunks for t in c["token_ids"]] == choice["token_ids"]
    msgs = user("FORCE_THINK what is 2+2?")
    _, rendered = http(server.url + "/tokenize", {"messages": msgs}, {"Authorization": f"Bearer {API_KEY}"})
    kw = dict(model=MODEL, messages=msgs, max_tokens=40, extra_body={"return_token_ids": True})
    res = client.chat.completions.create(**kw)
    ids = res.choices[0].model_extra["token_ids"]
    assert res.model_extra["prompt_token_ids"] == rendered["tokens"] and len(ids) == res.usage.completion_tokens
    assert tokenizer.decode(ids) == THINK[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].model_extra["prompt_token_ids"] == rendered["tokens"]
    assert [t for c in chunks for t in c.choices[0].model_extra.get("token_ids") or []] == ids


def test_completion_stream_sends_a_chunk_per_token(client):
    """A token whose text ends inside a character (byte-level BPE: a random model writes many) has no text of its
    own yet: its chunk was held back and its id sent with the next token's, so a client timing tokens (or reading
    ids) saw two tokens arrive at once. vLLM sends such a chunk with empty text; so does deltaserve now."""
    rng = random.Random(3)
    for _ in range(4):
        prompt = [rng.randrange(10, 500) for _ in range(12)]
        kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
        ids = [c.model_extra["token_ids"] for c in chunks]
        assert [len(i) for i in ids] == [1] * 24, f"token ids per chunk: {[len(i) for i in ids]}"
        whole = client.completions.create(**kw).choices[0]
        assert "".join(c.text for c in chunks) == whole.text and sum(ids, []) == whole.model_extra["token_ids"]


def test_chat_stream_sends_a_chunk_per_token_with_return_token_ids(client):
    """The chat stream held a step back when its text was (a character cut between tokens, a possible stop string,
    a tag the reasoning parser had not read whole) and sent its id with a later chunk. vLLM sends a chunk for every
    step when return_token_ids is on, its delta empty if need be; so does deltaserve now."""
    for text in ("tell me a story", "FORCE_THINK what is 2+2?"):
        kw = dict(model=MODEL, messages=user(text), max_tokens=24, temperature=0,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw)][1:]  # after the role's
        ids = [c.model_extra["token_ids"] for c in chunks]
        whole = client.chat.completions.create(**kw).choices[0]
        assert [len(i) for i in ids] == [1] * len(whole.model_extra["token_ids"]), [len(i) for i in ids]
        assert sum(ids, []) == whole.model_extra["token_ids"]
        assert "".join(c.delta.content or "" for c in chunks) == (whole.message.content or "")


STATS_LINE = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
                        r"Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: [\d.]+%, Prefix cache hit rate: "
                        r"[\d.]+%")


@pytest.mark.parametrize("flags", [("--log-stats-interval", "0.2"), ("--log-stats-interval", "0.2",
                                                                      "--disable-log-stats")], ids=["on", "off"])
def test_stats_lines_while_requests_run(model_dir, tmp_path, flags):
    """vLLM's server logs throughputs, running / waiting requests and KV cache usage every few seconds while it
    works; operators read them. Ours logged nothing between requests. Now: a line every --log-stats-interval while
    requests run, one more once they stop, none while idle; --disable-log-stats (vLLM's flag) turns them off."""
    srv = Server(model_dir, tmp_path, *flags)
    try:
        time.sleep(0.6)  # idle: no line
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        res = client.completions.create(model=MODEL, prompt="story", max_tokens=120, extra_body={"ignore_eos": True})
        assert res.usage.completion_tokens == 120
        time.sleep(1.0)
        lines = [m.groups() for m in map(STATS_LINE.search, srv.log_path.read_text().splitlines()) if m]
        if "--disable-log-stats" in flags:
            assert not lines
            return
        assert lines and any(float(g) > 0 for _, g, _, _ in lines), lines
        assert lines[-1][1:] == ("0.0", "0", "0"), lines  # the line after the work: nothing generated or running
        time.sleep(0.6)  # idle again: no more lines
        assert len([m for m in map(STATS_LINE.search, srv.log_path.read_text().splitlines()) if m]) == len(lines)
    finally:
        srv.stop()


def test_detokenize_takes_every_id_the_model_has(server, client, tokenizer, model_dir):
    """The model's vocabulary is padded past the tokenizer's (576 ids against 521 here; a real Qwen3.5's too): the
    model can sample a padding id and a prompt may hold one, but /detokenize refused it as outside the vocabulary.
    It writes no text, as transformers' decode and vLLM's /detokenize."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    pad = tokenizer.vocab_size  # the first id the tokenizer lacks
    with open(os.path.join(model_dir, "config.json")) as f:
        assert pad < json.load(f)["text_config"]["vocab_size"]
    assert client.completions.create(model=MODEL, prompt=[5, pad], max_tokens=1).usage.prompt_tokens == 2
    got, back = http(server.url + "/detokenize", {"tokens": [5, pad, 6]}, auth)
    assert got == 200 and back["prompt"] == tokenizer.decode([5, 6], skip_special_tokens=False), back


def test_tokenize_returns_token_strs_when_asked(server, tokenizer):
    """vLLM's return_token_strs (what tools split a rendered chat by) was ignored: no token_strs came back. They are
    the vocabulary's pieces (HF's convert_ids_to_tokens: byte-level, a space is "Ġ"), and left out unless asked."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    msgs = user("Hi there")
    got, body = http(server.url + "/tokenize", {"messages": msgs, "return_token_strs": True, **NO_THINK}, auth)
    assert got == 200 and body["token_strs"] == [tokenizer.id_to_token(t) for t in body["tokens"]], body
    assert "<|im_start|>" in body["token_strs"] and "Ġthe" in body["token_strs"], body["token_strs"]
    assert "token_strs" not in http(server.url + "/tokenize", {"prompt": "Hi there"}, auth)[1]


def test_echo_with_logprobs_scores_the_prompt(client, tokenizer, model_dir):
    """OpenAI's echo + logprobs (how evaluation harnesses score a text): the prompt's tokens come first, the first
    with null logprobs and the others with the engine's prompt logprobs, then the completion's; streamed alike."""
    ids = tokenizer.encode("The quick brown fox jumps over")
    body = dict(model=MODEL, prompt=ids, max_tokens=2, temperature=0, logprobs=1, echo=True,
                extra_body={"ignore_eos": True})
    lp = client.completions.create(**body).choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=64)
    ref = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1,
                                                                   logprobs=1, ignore_eos=True), use_tqdm=False)[0]
    want = [ref.prompt_logprobs[j][ids[j]] for j in range(1, len(ids))]
    want += [d[t] for d, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    streamed = {"tokens": [], "token_logprobs": []}
    for chunk in client.completions.create(**body, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed["tokens"] += chunk.choices[0].logprobs.tokens
            streamed["token_logprobs"] += chunk.choices[0].logprobs.token_logprobs
    assert streamed["tokens"] == lp.tokens and streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_offsets_index_the_text_of_multibyte_characters(client, stream):
    """text_offset is where a token's text starts in the text: a token holding part of a character (each byte of
    "你" is one token here) adds no character until the character is whole. Each token's own text ("\ufffd" for a
    part) was counted: the echoed prompt's offsets ran past its end, the completion's started over at len(prompt),
    and a streamed chunk's offsets did not point at the text it carried."""
    prompt = "FORCE_ACCENTS 你好 wörld"
    body = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, logprobs=0, echo=True)
    if stream:
        text, tokens, offsets = "", [], []
        for chunk in client.completions.create(**body, stream=True):
            lp = chunk.choices[0].logprobs if chunk.choices else None
            if lp is not None and lp.tokens:
                assert lp.text_offset[0] == len(text), "a chunk's first token starts where the text sent so far ends"
                tokens, offsets = tokens + lp.tokens, offsets + lp.text_offset
            text += chunk.choices[0].text if chunk.choices else ""
    else:
        choice = client.completions.create(**body).choices[0]
        text, tokens, offsets = choice.text, choice.logprobs.tokens, choice.logprobs.text_offset
    assert text == prompt + "Café, 你好 🎉 done."
    assert offsets == sorted(offsets) and offsets[-1] <= len(text), offsets
    whole = [(t, o) for t, o in zip(tokens, offsets) if t and "\ufffd" not in t and t != "<|im_end|>"]
    assert len(whole) > 10 and all(text.startswith(t, o) for t, o in whole), whole


def test_chat_logprobs_stop_and_seed(client):
    msgs = user("Count with me")
    res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True, **NO_THINK})
    entries = res.choices[0].logprobs.content
    assert len(entries) == 6
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)
    text = res.choices[0].message.content
    stop = text[len(text) // 2:][:2]
    if stop.strip():
        cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, stop=[stop],
                                             extra_body={"ignore_eos": True, **NO_THINK})
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].model_extra["stop_reason"] == stop
        last = [c for c in client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=6, temperature=0, stop=[stop], stream=True,
            extra_body={"ignore_eos": True, **NO_THINK}) if c.choices and c.choices[0].finish_reason][-1]
        assert last.choices[0].finish_reason == "stop" and last.choices[0].model_extra["stop_reason"] == stop
    extras = client.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=3, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True})
    assert (extras.usage.completion_tokens, extras.choices[0].finish_reason) == (3, "length")
    seeded = [client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, seed=s,
                                             extra_body={"ignore_eos": True}).choices[0].message
              for s in (7, 7, 8)]
    assert (seeded[0].content, seeded[0].reasoning_content) == (seeded[1].content, seeded[1].reasoning_content)


def test_reasoning_split(client):
    _, reasoning, content = THINK
    res = client.chat.completions.create(model=MODEL, messages=user("FORCE_THINK what is 2+2?"), max_tokens=40)
    msg = res.choices[0].message
    assert (msg.reasoning_content, msg.content, res.choices[0].finish_reason) == (reasoning, content, "stop")
    s_content, s_reasoning, _, finish, _, chunks = stream_chat(client, messages=user("FORCE_THINK what is 2+2?"),
                                                               max_tokens=40)
    assert (s_reasoning, s_content, finish) == (reasoning, content, "stop")
    assert chunks > 4  # streamed token by token, not in one piece
    # a long stop string makes the engine hold text back, so deltas no longer end at tag boundaries
    s_content, s_reasoning, _, finish, _, _ = stream_chat(client, messages=user("FORCE_THINK what is 2+2?"),
                                                          max_tokens=40, stop=["@@@@@@@@@"])
    assert (s_reasoning, s_content, finish) == (reasoning, content, "stop")
    off = client.chat.completions.create(model=MODEL, messages=user("FORCE_THINK what is 2+2?"), max_tokens=40,
                                         extra_body=NO_THINK).choices[0].message
    assert off.reasoning_content is None and off.content == THINK[0]  # enable_thinking=False: no reasoning split


def test_reasoning_is_also_under_vllms_name(client):
    """vLLM answers the reasoning as `reasoning` (reasoning_content is its deprecated name): a client written for it
    reads message.reasoning and delta.reasoning, and found nothing here."""
    _, reasoning, content = THINK
    kw = dict(model=MODEL, messages=user("FORCE_THINK what is 2+2?"), max_tokens=40)
    msg = client.chat.completions.create(**kw).choices[0].message
    assert (msg.model_extra.get("reasoning"), msg.reasoning_content, msg.content) == (reasoning, reasoning, content)
    deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(d.model_extra.get("reasoning") or "" for d in deltas) == reasoning
    assert all(d.model_extra.get("reasoning") == d.model_extra.get("reasoning_content") for d in deltas)
    plain = client.chat.completions.create(**{**kw, "extra_body": NO_THINK}).choices[0].message
    assert "reasoning" in plain.model_extra and plain.model_extra["reasoning"] is None  # null, as vLLM's


def test_include_reasoning_false_leaves_the_reasoning_out(client):
    """vLLM's include_reasoning: false drops reasoning_content, streamed or not (it was accepted and ignored)."""
    kw = dict(model=MODEL, messages=user("FORCE_THINK what is 2+2?"), max_tokens=40,
              extra_body={"include_reasoning": False})
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.content == THINK[2] and getattr(msg, "reasoning_content", None) is None, msg
    assert getattr(msg, "reasoning", None) is None, msg
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert not any(getattr(c.choices[0].delta, name, None) for c in chunks if c.choices
                   for name in ("reasoning_content", "reasoning"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == THINK[2]


def test_an_answer_cut_off_inside_its_reasoning_has_null_content(server, client, tokenizer):
    """max_tokens ending the answer inside its <think> block: all of it is reasoning, and content is null, as vLLM's
    Qwen3 reasoning parser gives it (it was "", which clients took for an empty answer)."""
    res = client.chat.completions.create(model=MODEL, messages=user("FORCE_THINK what is 2+2?"), max_tokens=6)
    msg = res.choices[0].message
    assert res.choices[0].finish_reason == "length" and msg.content is None, msg
    assert msg.reasoning_content and THINK[1].startswith(msg.reasoning_content), msg
    # enable_thinking false: the text is the answer, and an empty one stays "" (vLLM's parser gives it as content)
    got, body = http(server.url + "/v1/chat/completions", chat_body(**NO_THINK, max_tokens=1, logit_bias={
        str(tokenizer.eos_token_id): 100}), {"Authorization": f"Bearer {API_KEY}"})
    assert got == 200 and body["choices"][0]["message"]["content"] == "", body


@pytest.mark.parametrize("marker", ["FORCE_XML_TOOL", "FORCE_JSON_TOOL"], ids=["xml", "json"])
def test_tool_call_round_trip(client, marker):
    msgs = user(f"{marker} What is the weather in Paris?")
    res = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=80)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    content, _, calls, finish, _, _ = stream_chat(client, messages=msgs, tools=TOOLS, max_tokens=80)
    assert (content, finish) == ("", "tool_calls")
    assert [(name, json.loads(args)) for name, args, _ in calls.values()] == [("get_weather",
                                                                                {"city": "Paris", "days": 3})]
    if marker == "FORCE_XML_TOOL":
        assert calls[0][2] >= 2  # arguments streamed incrementally (one delta per parameter, then "}")
    follow = msgs + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 22 C"}]
    res2 = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, max_tokens=40)
    assert (res2.choices[0].message.content, res2.choices[0].finish_reason) == ("It is sunny in Paris.", "stop")


def test_a_repeated_xml_parameter_keeps_its_last_value(client):
    """A call that gives a parameter twice came back with the key twice in its arguments ('{"city": "Paris", "days":
    3, "city": "Lyon"}'), which strict JSON readers refuse. As vLLM's Qwen3-Coder parser: one key, the last value;
    streamed, the earlier value was already sent, and the deltas read as JSON give the same object."""
    msgs = user("FORCE_REPEATED_PARAM What is the weather in Paris?")
    res = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=120)
    (call,) = res.choices[0].message.tool_calls
    assert call.function.arguments == '{"city": "Lyon", "days": 3}'
    _, _, calls, finish, _, _ = stream_chat(client, messages=msgs, tools=TOOLS, max_tokens=120)
    assert finish == "tool_calls" and json.loads(calls[0][1]) == {"city": "Lyon", "days": 3}


def test_a_call_to_a_function_not_in_the_tools_comes_back_as_a_call(client):
    """The model calls get_weather, which this request's tools do not hold: as vLLM, it is returned as a call under
    the model's name (finish_reason "tool_calls"), streamed or not, its values as text (no schema types them)."""
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}}}}]
    msgs = user("FORCE_XML_TOOL What is the weather in Paris?")
    res = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=80)
    (call,) = res.choices[0].message.tool_calls
    assert res.choices[0].finish_reason == "tool_calls" and res.choices[0].message.content is None
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": "3"})
    content, _, calls, finish, _, _ = stream_chat(client, messages=msgs, tools=tools, max_tokens=80)
    assert (content, finish) == ("", "tool_calls")
    assert [(name, json.loads(args)) for name, args, _ in calls.values()] == [("get_weather",
                                                                                {"city": "Paris", "days": "3"})]


def test_a_stop_string_inside_a_call_is_not_finish_reason_tool_calls(client):
    """A stop string that cuts a call short returns what was written of it, but with finish_reason "stop", not
    "tool_calls" (its arguments are not whole: a client trusting "tool_calls" would run a broken call)."""
    msgs = user("FORCE_JSON_TOOL What is the weather in Paris?")
    res = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=80, stop=["Paris"])
    assert (res.choices[0].finish_reason, res.choices[0].model_extra["stop_reason"]) == ("stop", "Paris")
    _, _, calls, finish, _, _ = stream_chat(client, messages=msgs, tools=TOOLS, max_tokens=80, stop=["Paris"])
    assert finish == "stop" and len(calls) == 1


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "one_call"])
def test_parallel_tool_calls_and_logprobs_beside_calls(client, parallel):
    """parallel_tool_calls=false under tool_choice auto reports the first call only (both were returned); logprobs
    come with tool calls, streamed as whole."""
    kw = dict(model=MODEL, messages=user("FORCE_TWO_TOOLS weather?"), tools=TOOLS, max_tokens=600, logprobs=True,
              parallel_tool_calls=parallel)
    res = client.chat.completions.create(**kw)
    choice = res.choices[0]
    names = [c.function.name for c in choice.message.tool_calls]
    assert names == (["get_weather", "get_weather"] if parallel else ["get_weather"])
    assert choice.message.content == "Checking." and choice.finish_reason == "tool_calls"
    assert len(choice.logprobs.content) == res.usage.completion_tokens
    content, _, calls, finish, _, _ = stream_chat(client, **{k: v for k, v in kw.items() if k != "model"})
    assert (content, finish, len(calls)) == ("Checking.", "tool_calls", len(names))


FORCE_TOOLS = [{"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "on": {"type": "boolean"}},
    "required": ["unit", "on"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_named_and_required(client, stream):
    """A named function: one call of it with arguments valid for its schema; "required" (one call, no parallel
    calls): a call of one of the tools. The random model would call nothing on its own."""
    def ask(choice):
        res = client.chat.completions.create(model=MODEL, messages=user("Set the unit"), tools=FORCE_TOOLS,
                                             tool_choice=choice, max_tokens=400, temperature=0.9, seed=4,
                                             stream=stream, parallel_tool_calls=False, extra_body=NO_THINK)
        if not stream:
            return res.choices[0].message.tool_calls, res.choices[0].finish_reason
        calls, finish = {}, None
        for chunk in res:
            for d in chunk.choices[0].delta.tool_calls or []:
                calls.setdefault(d.index, [d.function.name, ""])[1] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        return [type("Call", (), {"function": type("F", (), {"name": n, "arguments": a})})()
                for n, a in calls.values()], finish

    calls, finish = ask({"type": "function", "function": {"name": "set_unit"}})
    # a named function's call ends with "stop" (OpenAI, vLLM); "required" and auto with "tool_calls"
    assert finish == "stop" and len(calls) == 1 and calls[0].function.name == "set_unit"
    args = json.loads(calls[0].function.arguments)
    assert args["unit"] in ("c", "f") and isinstance(args["on"], bool) and set(args) == {"unit", "on"}
    calls, finish = ask("required")  # parallel_tool_calls=False: exactly one call (random JSON whitespace: 400 tokens)
    assert finish == "tool_calls" and len(calls) == 1 and calls[0].function.name in ("set_unit", "ping")
    assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice, max_tokens", [({"type": "function", "function": {"name": "set_unit"}}, 6),
                                                ("required", 60)], ids=["named", "required"])
def test_a_forced_tool_call_cut_off_by_max_tokens_keeps_its_arguments(client, stream, choice, max_tokens):
    """Cut off by max_tokens inside a call's arguments, a forced call keeps them as written (not whole JSON) and
    streams them as they come. A named function's answer is its arguments (vLLM passes them on unparsed): they came
    back as content. "required"'s list came back as content, all at the end, with no call (vLLM streams the call;
    its non-streamed answer has no call and no content)."""
    kw = dict(messages=user("Set the unit"), tools=FORCE_TOOLS, max_tokens=max_tokens, temperature=0,
              tool_choice=choice, parallel_tool_calls=False, extra_body=NO_THINK)
    whole = client.chat.completions.create(model=MODEL, **kw).choices[0]
    assert (whole.finish_reason, whole.message.content) == ("length", None), whole
    (call,) = whole.message.tool_calls
    names = ("set_unit",) if isinstance(choice, dict) else ("set_unit", "ping")
    assert call.function.name in names and call.function.arguments.lstrip().startswith("{"), call
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)
    if stream:
        content, _, calls, finish, _, _ = stream_chat(client, **kw)
        assert (content, finish, list(calls)) == ("", "length", [0]), (content, finish, calls)
        name, arguments, n_deltas = calls[0]
        assert (name, arguments) == (call.function.name, call.function.arguments) and n_deltas > 1, calls


def test_forced_tool_with_keywords_the_grammar_ignores(client):
    """A tool whose parameters use uniqueItems / not (which the grammar cannot enforce) is still callable with a
    forced tool choice, as before those keywords were refused in response_format: they are dropped for tools."""
    tool = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True,
                                                  "maxItems": 2, "not": {"const": []}}},
        "required": ["tags"], "additionalProperties": False}}}
    res = client.chat.completions.create(model=MODEL, messages=user("Tag it"), tools=[tool], max_tokens=200,
                                         tool_choice={"type": "function", "function": {"name": "tag"}},
                                         temperature=0.9, seed=1, extra_body=NO_THINK)
    (call,) = res.choices[0].message.tool_calls
    tags = json.loads(call.function.arguments)["tags"]
    assert res.choices[0].finish_reason == "stop" and len(tags) <= 2 and set(tags) <= {"a", "b"}


def test_required_tool_choice_with_defs_refs(client):
    """tool_choice "required" nests each tool's schema in one array schema: a tool whose parameters use $defs / $ref
    (pydantic's and agent SDKs' schemas) must still compile there (its refs pointed at a root without the $defs)."""
    place = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
             "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
        "additionalProperties": False, "$defs": {"Place": place}}}},
        {"type": "function", "function": {"name": "move", "parameters": {
            "type": "object", "properties": {"to": {"$ref": "#/definitions/Place"}}, "required": ["to"],
            "additionalProperties": False, "definitions": {"Place": {"enum": ["up", "down"]}}}}}]
    res = client.chat.completions.create(model=MODEL, messages=user("Book it"), tools=tools, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=300, temperature=0.9, seed=2,
                                         extra_body=NO_THINK)
    (call,) = res.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert (call.function.name, args) in [("book", {"where": {"city": c}}) for c in ("Paris", "Oslo")] + \
        [("move", {"to": d}) for d in ("up", "down")], (call.function.name, args)


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": user("hi")})], ids=["completions", "chat"])
def test_a_request_without_model_is_served_by_the_served_model(server, path, body):
    """vLLM takes `model` as optional (absent or empty: the served model), as /tokenize here does; a request leaving it
    out was refused with a 400."""
    for model in ({}, {"model": None}, {"model": ""}):
        got, res = http(server.url + path, {**body, **model, "max_tokens": 1}, {"Authorization": f"Bearer {API_KEY}"})
        assert got == 200 and res["model"] == MODEL and res["usage"]["completion_tokens"] == 1, (model, res)


def test_null_means_the_default(server, client):
    """OpenAI's spec marks n, stream, logprobs, echo... nullable: an explicit null is the default, not a 400."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    got, body = http(server.url + "/v1/chat/completions", chat_body(n=None, stream=None, logprobs=None,
                                                                    ignore_eos=None, skip_special_tokens=None), auth)
    assert got == 200 and len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None, body
    got, body = http(server.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "echo": None,
                                                      "n": None, "stream": None}, auth)
    assert got == 200 and len(body["choices"]) == 1, body
    got, err = http(server.url + "/v1/chat/completions", chat_body(messages=None), auth)  # required: still an error
    assert got == 400 and err["error"]["param"] == "messages", err


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"], ids=["chat", "completions"])
def test_empty_stream_options_without_stream_is_accepted(server, path):
    """stream_options {} with stream false (or left out) was a 400; vLLM refuses stream_options without stream only
    when they set something, and so does this server now."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = chat_body() if path.endswith("chat/completions") else {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for stream in ({}, {"stream": False}, {"stream": None}):
        got, res = http(server.url + path, {**body, **stream, "stream_options": {}}, auth)
        assert got == 200 and "usage" in res and len(res["choices"]) == 1, (stream, res)
    got, err = http(server.url + path, {**body, "stream_options": {"include_usage": False}}, auth)
    assert got == 400 and err["error"]["param"] == "stream_options", err


@pytest.mark.parametrize("logprobs", [False, None], ids=["logprobs-false", "logprobs-left-out"])
def test_top_logprobs_zero_without_logprobs_asks_for_nothing(server, logprobs):
    """top_logprobs 0 (OpenAI's default, which some clients always send) with logprobs off was a 400; vLLM refuses
    only a top_logprobs above 0 (or -1) without logprobs, and answers this without logprobs."""
    body = chat_body(top_logprobs=0, **({} if logprobs is None else {"logprobs": logprobs}))
    got, res = http(server.url + "/v1/chat/completions", body, {"Authorization": f"Bearer {API_KEY}"})
    assert got == 200 and res["choices"][0]["logprobs"] is None, res


def test_tokenize_renders_messages_as_chat_does(server, client):
    """/tokenize with tool_choice "none" (the tools stay in the prompt) or continue_final_message counts the prompt
    chat completions would run: its usage agrees."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    cont = user("Say hi") + [{"role": "assistant", "content": "Hello"}]
    for extra in ({"tools": TOOLS, "tool_choice": "none"},
                  {"messages": cont, "continue_final_message": True, "add_generation_prompt": False}):
        body = {"messages": user("What is the weather?"), **NO_THINK, **extra}
        got, tok = http(server.url + "/tokenize", body, auth)
        got_chat, res = http(server.url + "/v1/chat/completions", {"model": MODEL, "max_tokens": 1, **body}, auth)
        assert got == got_chat == 200 and tok["count"] == res["usage"]["prompt_tokens"], (extra, tok, res)


def test_tool_choice_none_leaves_text(client):
    """tool_choice "none" renders the tools (vLLM's default: the prompt is tool_choice auto's) but parses no call:
    a <tool_call> the model writes stays content, and the answer ends with "stop", streamed or not."""
    ask = {"model": MODEL, "messages": user("FORCE_XML_TOOL weather?"), "tools": TOOLS}
    res = client.chat.completions.create(**ask, tool_choice="none", max_tokens=80)
    auto = client.chat.completions.create(**ask, tool_choice="auto", max_tokens=1)
    bare = client.chat.completions.create(model=MODEL, messages=ask["messages"], max_tokens=1)
    assert res.usage.prompt_tokens == auto.usage.prompt_tokens > bare.usage.prompt_tokens, (res.usage, bare.usage)
    assert res.choices[0].message.tool_calls is None and "<function=get_weather>" in res.choices[0].message.content
    assert res.choices[0].finish_reason == "stop"
    content, _, calls, finish, _, _ = stream_chat(client, **{k: v for k, v in ask.items() if k != "model"},
                                                  tool_choice="none", max_tokens=80)
    assert content == res.choices[0].message.content and calls == {} and finish == "stop"


def test_exclude_tools_when_tool_choice_none_flag(model_dir, tmp_path):
    """`--exclude-tools-when-tool-choice-none` (vLLM's flag): tool_choice "none" leaves the tools out of the prompt,
    in chat and /tokenize; "auto" still renders them."""
    srv = Server(model_dir, tmp_path, "--exclude-tools-when-tool-choice-none")
    try:
        counts = {}
        for name, extra in {"none": {"tools": TOOLS, "tool_choice": "none"}, "bare": {},
                            "auto": {"tools": TOOLS, "tool_choice": "auto"}}.items():
            got, res = http(srv.url + "/v1/chat/completions", chat_body(max_tokens=1, **extra))
            got_tok, tok = http(srv.url + "/tokenize", {"messages": user("hi"), **extra})
            assert got == got_tok == 200 and res["usage"]["prompt_tokens"] == tok["count"], (name, res, tok)
            counts[name] = tok["count"]
        assert counts["none"] == counts["bare"] < counts["auto"], counts
    finally:
        srv.stop()


def chat_body(**kw):
    return {"model": MODEL, "messages": user("hi"), "max_tokens": 2, **kw}


BAD_REQUESTS = {  # name: (path, body, headers, status, param)
    "malformed_json": ("/v1/chat/completions", b'{"model": "tiny", "messages": [', None, 400, None),
    "body_not_object": ("/v1/chat/completions", b"[1, 2]", None, 400, None),
    "missing_messages": ("/v1/chat/completions", {"model": MODEL}, None, 400, "messages"),
    "wrong_type_max_tokens": ("/v1/chat/completions", chat_body(max_tokens="5"), None, 400, "max_tokens"),
    "wrong_type_messages": ("/v1/chat/completions", chat_body(messages="hi"), None, 400, "messages"),
    "negative_max_tokens": ("/v1/chat/completions", chat_body(max_tokens=-3), None, 400, "max_tokens"),
    "oversized_max_tokens": ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, None, 400,
                             "max_tokens"),
    "prompt_too_long": ("/v1/completions", {"model": MODEL, "prompt": [5] * (MAX_MODEL_LEN + 10)}, None, 400,
                        "prompt"),
    "prompt_text_too_long": ("/v1/completions", {"model": MODEL, "prompt": "hello " * 20000}, None, 400, "prompt"),
    "messages_too_long": ("/v1/chat/completions", chat_body(messages=user("hello " * 20000)), None, 400,
                          "messages"),
    "bad_temperature": ("/v1/chat/completions", chat_body(temperature=-1), None, 400, "temperature"),
    "temperature_above_2": ("/v1/chat/completions", chat_body(temperature=2.5), None, 400, "temperature"),
    "bad_top_p": ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, None, 400, "top_p"),
    "bad_n": ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, None, 400, "n"),
    "greedy_n": ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2, "temperature": 0}, None, 400, "n"),
    "too_many_logprobs": ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=50), None, 400,
                          "top_logprobs"),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", chat_body(top_logprobs=2), None, 400, "top_logprobs"),
    "nan_temperature": ("/v1/chat/completions", chat_body(temperature=float("nan")), None, 400, "temperature"),
    "infinite_repetition_penalty": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                        "repetition_penalty": float("inf")}, None, 400,
                                    "repetition_penalty"),
    "seed_overflow": ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2 ** 64}, None, 400, "seed"),
    "min_tokens_beyond_max_model_len": ("/v1/chat/completions", {"model": MODEL, "messages": user("hi"),
                                                                 "min_tokens": 10 ** 6}, None, 400, "min_tokens"),
    "structured_outputs_choice_string": ("/v1/chat/completions", chat_body(structured_outputs={"choice": "yes"}),
                                         None, 400, "structured_outputs"),
    "legacy_functions": ("/v1/chat/completions", chat_body(functions=[{"name": "f", "parameters": {}}]), None, 400,
                         "functions"),
    "guided_json": ("/v1/chat/completions", chat_body(guided_json={"type": "object"}), None, 400, "guided_json"),
    "guided_whitespace_pattern": ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_whitespace_pattern": " "},
                                  None, 400, "guided_whitespace_pattern"),
    "length_penalty": ("/v1/completions", {"model": MODEL, "prompt": "hi", "length_penalty": 2.0}, None, 400,
                       "length_penalty"),
    "continue_final_message_with_generation_prompt": ("/v1/chat/completions", chat_body(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
        continue_final_message=True), None, 400, "messages"),
    "chat_template": ("/v1/chat/completions", chat_body(chat_template="{{ messages }}"), None, 400, "chat_template"),
    "chat_echo": ("/v1/chat/completions", chat_body(echo=True), None, 400, "echo"),
    "schema_not_enforced": ("/v1/chat/completions", chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}),
        None, 400, "response_format"),
    "prompt_logprobs_zero": ("/v1/completions", {"model": MODEL, "prompt": "hi", "prompt_logprobs": 0}, None, 400,
                             "prompt_logprobs"),
    "tool_choice_function_not_object": ("/v1/chat/completions", chat_body(tools=TOOLS, tool_choice={
        "type": "function", "function": "get_weather"}), None, 400, "tool_choice"),
    "tool_call_name_not_string": ("/v1/chat/completions", chat_body(messages=user("hi") + [{
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": 5,
                                                                                        "arguments": "{}"}}]}]),
        None, 400, "messages"),
    "token_out_of_vocab": ("/v1/completions", {"model": MODEL, "prompt": [10 ** 6]}, None, 400, "prompt"),
    "min_tokens_over_max": ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "min_tokens": 3},
                            None, 400, "min_tokens"),
    "min_tokens_over_max_completion_tokens": ("/v1/chat/completions", chat_body(max_completion_tokens=2, min_tokens=3),
                                              None, 400, "min_tokens"),
    "response_format_type": ("/v1/chat/completions", chat_body(response_format={"type": "xml"}), None, 400,
                             "response_format"),
    "response_format_no_schema": ("/v1/chat/completions", chat_body(response_format={"type": "json_schema"}), None,
                                  400, "response_format"),
    "response_format_bad_schema": ("/v1/chat/completions", chat_body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}), None, 400,
        "response_format"),
    "structured_outputs_key": ("/v1/completions", {"model": MODEL, "prompt": "hi", "structured_outputs": {"xml": 1}},
                               None, 400, "structured_outputs"),
    "structured_outputs_bad_regex": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                         "structured_outputs": {"regex": "(ab"}}, None, 400,
                                     "structured_outputs"),
    "structured_outputs_regex_matching_nothing": ("/v1/completions", {
        "model": MODEL, "prompt": "hi", "structured_outputs": {"regex": "[^\\s\\S]"}}, None, 400,
        "structured_outputs"),
    "structured_outputs_and_response_format": ("/v1/chat/completions", chat_body(
        response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), None, 400, "structured_outputs"),
    "tokenize_nothing": ("/tokenize", {"model": MODEL}, None, 400, "prompt"),
    "detokenize_out_of_vocab": ("/detokenize", {"model": MODEL, "tokens": [1, 10 ** 6]}, None, 400, "tokens"),
    "request_id_not_string": ("/v1/chat/completions", chat_body(request_id=5), None, 400, "request_id"),
    "logit_bias_key": ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"a": 1}}, None, 400,
                       "logit_bias"),
    "logit_bias_key_not_integer": ("/v1/chat/completions", chat_body(logit_bias={"5.0": 1}), None, 400,
                                   "logit_bias"),
    "logit_bias_key_negative": ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"-5": 1}}, None,
                                400, "logit_bias"),
    "logit_bias_value_not_number": ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": "x"}},
                                    None, 400, "logit_bias.5"),
    # a bias beyond [-100, 100] is clamped, as vLLM does (test_logit_bias_beyond_100_is_clamped); NaN is neither side
    "logit_bias_nan": ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "logit_bias": {"5": NaN}}', None, 400,
                       "logit_bias"),
    "logit_bias_out_of_vocab": ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"1000000": 1}},
                                None, 400, "logit_bias"),
    "stop_token_ids_out_of_vocab": ("/v1/chat/completions", chat_body(stop_token_ids=[10 ** 6]), None, 400,
                                    "stop_token_ids"),
    "image_content": ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), None, 400, "messages.0.content"),
    "tool_choice_unknown_function": ("/v1/chat/completions", chat_body(tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "nope"}}), None, 400, "tool_choice"),
    "tool_choice_required_without_tools": ("/v1/chat/completions", chat_body(tool_choice="required"), None, 400,
                                           "tool_choice"),
    "unknown_model": ("/v1/chat/completions", chat_body(model="gpt-4"), None, 404, "model"),
    "missing_api_key": ("/v1/chat/completions", chat_body(), {"Authorization": ""}, 401, None),
    "wrong_api_key": ("/v1/models", None, {"Authorization": "Bearer nope"}, 401, None),
    "unknown_route": ("/v1/nothing", chat_body(), None, 404, None),
    # was run: a text/plain POST needs no CORS preflight, so any web page could make a browser generate here (vLLM: 400)
    "text_plain_body": ("/v1/completions", {"model": MODEL, "prompt": "hi"}, {"Content-Type": "text/plain"}, 400,
                        None),
    "form_body": ("/tokenize", {"prompt": "hi"}, {"Content-Type": "application/x-www-form-urlencoded"}, 400, None),
    # field names starting with "str" / "int" were taken for pydantic's type labels: a generic message, no param
    "stream_not_bool": ("/v1/chat/completions", chat_body(stream="true"), None, 400, "stream"),
    "structured_outputs_not_object": ("/v1/completions", {"model": MODEL, "prompt": "hi", "structured_outputs": "j"},
                                      None, 400, "structured_outputs"),
    "include_usage_not_bool": ("/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": "y"}),
                               None, 400, "stream_options.include_usage"),
    "stream_options_without_stream": ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}),
                                      None, 400, "stream_options"),
    "completions_response_format_type": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                             "response_format": {"type": "xml"}}, None, 400,
                                         "response_format"),
    "messages_just_too_long": ("/v1/chat/completions", chat_body(messages=user("a " * (MAX_MODEL_LEN + 8))), None,
                               400, "messages"),  # was refused by the engine, which spoke of the "prompt"
    "echo_scoring_with_min_tokens": ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0,
                                                         "echo": True, "min_tokens": 2}, None, 400, "min_tokens"),
    "max_tokens_zero_without_echo": ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, None,
                                     400, "max_tokens"),
    # a 500 from the tool-call parser (tool_choice auto), and from /tokenize's own chat request
    "tool_properties_not_object": ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 5}}}]), None, 400, "tools.0.function.parameters"),
    "tokenize_no_messages": ("/tokenize", {"messages": []}, None, 400, "messages"),
    # the tokenizer runs on the event loop: an 18 MB text stalled every client for 27 s
    "tokenize_text_too_long": ("/tokenize", {"prompt": "hello " * (11 * MAX_MODEL_LEN)}, None, 400, "prompt"),
    "detokenize_too_many_ids": ("/detokenize", {"tokens": [5] * (65 * MAX_MODEL_LEN)}, None, 400, "tokens"),
    # vLLM options that change the output were accepted and ignored
    "allowed_token_ids_out_of_vocab": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                           "allowed_token_ids": [5, 1000000]}, None, 400,
                                       "allowed_token_ids"),
    "bad_words_blank": ("/v1/completions", {"model": MODEL, "prompt": "hi", "bad_words": [" "]}, None, 400,
                        "bad_words"),
    "allowed_token_ids_empty": ("/v1/chat/completions", chat_body(allowed_token_ids=[]), None, 400,
                                "allowed_token_ids"),
    "allowed_token_ids_with_a_schema": ("/v1/chat/completions", chat_body(allowed_token_ids=[5], response_format={
        "type": "json_object"}), None, 400, "allowed_token_ids"),
    "truncate_prompt_tokens_zero": ("/v1/completions", {"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": 0},
                                    None, 400, "truncate_prompt_tokens"),
    "chat_best_of": ("/v1/chat/completions", chat_body(best_of=3), None, 400, "best_of"),  # was ignored
    "completions_best_of": ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, None, 400, "best_of"),
    "priority": ("/v1/chat/completions", chat_body(priority=10), None, 400, "priority"),  # these three were ignored
    "structural_tag": ("/v1/chat/completions", chat_body(structural_tag='{"structures": [], "triggers": ["<x>"]}'),
                       None, 400, "structural_tag"),
    "prompt_embeds": ("/v1/completions", {"model": MODEL, "prompt": "hi", "prompt_embeds": "AAAA"}, None, 400,
                      "prompt_embeds"),
    "completions_max_completion_tokens": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                              "max_completion_tokens": 1}, None, 400,
                                          "max_completion_tokens"),  # was ignored: 16 tokens came back
    "completions_top_logprobs": ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_logprobs": 5}, None, 400,
                                 "top_logprobs"),  # was ignored: no logprobs came back
    # was ignored: a salted prompt still hit (and reported) another tenant's cached prefix
    "cache_salt": ("/v1/completions", {"model": MODEL, "prompt": "hi", "cache_salt": "tenant-a"}, None, 400,
                   "cache_salt"),
}


def test_a_number_field_given_text_says_it_takes_a_number(server):
    """temperature is int | float: the error named only the union's first member ("a valid integer")."""
    got, err = http(server.url + "/v1/chat/completions", chat_body(temperature="hot"),
                    {"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and err["error"]["param"] == "temperature", err
    assert err["error"]["message"].endswith("input should be a number."), err
    got, err = http(server.url + "/v1/chat/completions", chat_body(n=1.5), {"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and err["error"]["message"].endswith("input should be a valid integer."), err


@pytest.mark.parametrize("prompt", [[["a"]], [1.5, 2], [[1], "a"], [True], 5, None],
                         ids=["nested_text", "float_ids", "mixed", "bools", "number", "null"])
def test_a_malformed_completions_prompt_says_which_shapes_it_takes(server, prompt):
    """A list prompt of the wrong shape was told "input should be a valid string" (the union's first member), as if
    lists were not taken at all."""
    got, err = http(server.url + "/v1/completions", {"model": MODEL, "prompt": prompt},
                    {"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and err["error"]["param"] == "prompt", err
    assert err["error"]["message"].endswith(
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists."), err


def test_response_format_constrains_completions_too(client):
    """/v1/completions took response_format silently and answered unconstrained text (vLLM honours it there)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    res = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=40, temperature=1.0, seed=3, n=2,
                                    extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                        "name": "x", "schema": schema}}})
    for c in res.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.text)["a"], int), c


def test_each_prompt_gets_its_own_default_max_tokens(client):
    """No max_tokens and several prompts: every prompt was cut to what fitted after the longest one, so a short
    prompt's answer depended on the prompts it was sent with."""
    short = [5, 6, 7]
    alone = client.completions.create(model=MODEL, prompt=short, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    both = client.completions.create(model=MODEL, prompt=[short, [5] * (MAX_MODEL_LEN - 3)], temperature=0,
                                     extra_body={"ignore_eos": True}).choices
    assert len(alone.text) > 0 and both[0].text == alone.text and both[0].finish_reason == "length"
    assert client.completions.create(model=MODEL, prompt=short, temperature=0, extra_body={
        "ignore_eos": True}).usage.completion_tokens == 16


def test_streamed_echo_of_a_prompt_prefilled_in_chunks_scores_all_of_it(model_dir, tmp_path, tokenizer):
    """A prompt longer than a step's token budget is prefilled over several steps, and the stream sent the echo
    with the logprobs of the first chunk only (34 of 101), then no more: lm-eval scoring long contexts lost most of
    them. The echo now waits for the whole prompt."""
    s = Server(model_dir, tmp_path, "--max-num-batched-tokens", "16")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
        assert len(ids) > 40
        for max_tokens in (0, 2):
            body = dict(model=MODEL, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0)
            whole = c.completions.create(**body).choices[0].logprobs
            chunks = list(c.completions.create(**body, stream=True))
            parts = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
            tokens = [t for p in parts for t in p.tokens]
            lps = [x for p in parts for x in p.token_logprobs]
            assert len(whole.tokens) == len(ids) + max_tokens and tokens == whole.tokens
            assert lps[0] is None and lps[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-6)
    finally:
        s.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_echo_with_max_tokens_zero_scores_the_prompt_alone(client, tokenizer, stream):
    """OpenAI's legacy way to score a text (lm-eval's loglikelihood requests): echo, logprobs and max_tokens 0 give
    the prompt and its logprobs, nothing generated. It was refused ("max_tokens must be at least 1")."""
    ids = tokenizer.encode("The quick brown fox")
    body = dict(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    scored = client.completions.create(**dict(body, max_tokens=1))  # the same prompt logprobs, then one token
    if stream:
        chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        res = client.completions.create(**body)
        text, tokens, finish, usage = (res.choices[0].text, res.choices[0].logprobs.tokens,
                                       [res.choices[0].finish_reason], res.usage)
        assert res.choices[0].logprobs.token_logprobs == scored.choices[0].logprobs.token_logprobs[:len(ids)]
    assert text == tokenizer.decode(ids) and len(tokens) == len(ids) and finish == ["length"]
    assert usage.completion_tokens == 0 and usage.prompt_tokens == len(ids)


def test_echo_scores_a_prompt_of_exactly_max_model_len(client, tokenizer, model_dir):
    """As vLLM: echo, logprobs and max_tokens 0 score a prompt that fills max_model_len (lm-eval's longest contexts;
    it was a 400 "leaves no room for an answer"), every position's logprob as under a larger max_model_len, streamed
    alike; truncate_prompt_tokens -1 keeps all max_model_len tokens for it. Asking for a token after such a prompt,
    or scoring one token more, is still the context-length 400."""
    ids = (tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * MAX_MODEL_LEN)[:MAX_MODEL_LEN]
    body = dict(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    res = client.completions.create(**body)
    lp, choice = res.choices[0].logprobs, res.choices[0]
    assert len(lp.tokens) == MAX_MODEL_LEN and choice.finish_reason == "length" and choice.text == tokenizer.decode(ids)
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (MAX_MODEL_LEN, 0)
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN + 64)
    ref = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([ref.prompt_logprobs[j][ids[j]] for j in range(1, len(ids))],
                                                  abs=1e-4)
    chunks = list(client.completions.create(**body, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    cut = client.completions.create(**dict(body, prompt=[7] * 5 + ids, extra_body={"truncate_prompt_tokens": -1}))
    assert cut.usage.prompt_tokens == MAX_MODEL_LEN and cut.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:], abs=1e-6)
    for over in (dict(body, max_tokens=1), dict(body, prompt=ids + ids[:1])):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**over)
        assert e.value.code == "context_length_exceeded"


def test_a_lone_surrogate_escape_reads_as_a_replacement_character(server, tokenizer):
    """JavaScript's JSON.stringify writes half of a cut emoji as a lone surrogate escape ("\\ud83d"), which Python's
    json (vLLM) takes; it was a 400 saying "unexpected end of hex escape". It now reads as U+FFFD, as a UTF-8
    encoder writes it, and a request never carries it to the tokenizer."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = b'{"model": "tiny", "prompt": "cut \\ud83d emoji", "max_tokens": 1, "echo": true}'
    got, res = http(server.url + "/v1/completions", body, auth)
    assert got == 200 and res["choices"][0]["text"].startswith("cut \ufffd emoji"), res
    assert res["usage"]["prompt_tokens"] == len(tokenizer.encode("cut \ufffd emoji")), res
    body = b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\udc00b"}]}'
    got, res = http(server.url + "/v1/chat/completions", body, auth)
    assert got == 200 and res["usage"]["completion_tokens"] == 1, res


def test_default_max_tokens_fits_a_long_prompt(client):
    """No max_tokens: OpenAI's default of 16, cut to what still fits after the prompt (not a 400 about a field the
    client never sent)."""
    res = client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN - 3), temperature=0)
    assert res.usage.completion_tokens <= 3 and res.choices[0].finish_reason == "length"


def test_completions_max_tokens_null_is_the_room_left(server):
    """An explicit "max_tokens": null on /v1/completions asks for what the context leaves after the prompt, as vLLM
    reads it (its field defaults to 16, so only a max_tokens left out is OpenAI's 16); null answered 16 tokens."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": [5] * (MAX_MODEL_LEN - 40), "temperature": 0, "ignore_eos": True}
    got, res = http(server.url + "/v1/completions", {**body, "max_tokens": None}, auth)
    assert got == 200 and res["usage"]["completion_tokens"] == 40, res
    got, res = http(server.url + "/v1/completions", body, auth)  # left out: OpenAI's default
    assert got == 200 and res["usage"]["completion_tokens"] == 16, res


def test_min_tokens_error_names_the_field_the_client_sent(server):
    """min_tokens above max_completion_tokens was reported against "max_tokens", a field the client never sent."""
    got, err = http(server.url + "/v1/chat/completions", chat_body(max_completion_tokens=2, min_tokens=3),
                    {"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and "max_completion_tokens (2)" in err["error"]["message"], err


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_then_server_still_answers(server, client, case):
    path, body, headers, status, param = BAD_REQUESTS[case]
    got, err = http(server.url + path, body, {"Authorization": f"Bearer {API_KEY}", **(headers or {})})
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}, err
    msg = err["error"]["message"]
    assert msg and "Traceback" not in msg and "\n" not in msg, msg
    if param is not None:
        assert err["error"]["param"] == param, err
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert ok.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("case", ["prompt_too_long", "prompt_text_too_long", "messages_too_long",
                                  "messages_just_too_long", "oversized_max_tokens"])
def test_a_request_beyond_the_context_is_worded_as_openai_and_vllm_word_it(server, client, case):
    """Agent frameworks (LiteLLM, crewAI, OpenHands) tell a context overflow, after which they trim the history, by
    "maximum context length" in the message (OpenAI's and vLLM's wording) or OpenAI's code context_length_exceeded;
    ours said "max_model_len is 2048" with no code, so they took it for any bad request."""
    path, body, _, _, param = BAD_REQUESTS[case]
    got, err = http(server.url + path, body, {"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and (err["error"]["code"], err["error"]["param"]) == ("context_length_exceeded", param), err
    assert err["error"]["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens, "), err
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * MAX_MODEL_LEN, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and "maximum context length" in e.value.message


def test_chat_template_that_fails_while_rendering_is_a_400(model_dir, tmp_path):
    """A chat template raising a plain Python error (a ZeroDivisionError; here a request's own template, on a server
    that takes them) was a 500 with a traceback in the server's log; now a 400 naming the chat template and the
    error, and the server goes on."""
    srv = Server(model_dir, tmp_path, "--trust-request-chat-template")
    try:
        got, err = http(srv.url + "/v1/chat/completions", chat_body(chat_template="{{ 1 / 0 }}"))
        assert got == 400, err
        assert err["error"]["message"].startswith("The chat template") and \
            "ZeroDivisionError: division by zero" in err["error"]["message"], err
        got, ok = http(srv.url + "/v1/chat/completions", chat_body(chat_template="{{ messages[0].content }}"))
        assert got == 200 and ok["choices"][0]["finish_reason"] in ("length", "stop"), ok
        assert "Traceback" not in srv.log_path.read_text()
    finally:
        srv.stop()


def test_engine_failure_is_500_and_server_recovers(server, client):
    with pytest.raises(openai.InternalServerError, match="injected test failure"):
        client.chat.completions.create(model=MODEL, messages=user("FORCE_BOOM"), max_tokens=4)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    m = metrics(server)
    assert m["deltaserve_kv_blocks_used"] == 0 and m["deltaserve_state_slots_used"] == 0


async def _concurrent(server, n_total, n_disconnect):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(i):
        quit_early = i % (n_total // n_disconnect) == 0
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(f"request {i}"), stream=True, stream_options={"include_usage": True},
            max_tokens=200 if quit_early else 5, temperature=0, extra_body={"ignore_eos": True})
        finish, usage, seen = None, None, 0
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if quit_early and seen == 2:
                await stream.close()  # the client goes away mid-stream, after two pieces of generated text
                return "disconnected", None
            usage = chunk.usage or usage
            finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
        return finish, usage.completion_tokens

    try:
        return await asyncio.gather(*(one(i) for i in range(n_total)))
    finally:
        await client.close()


def test_200_concurrent_streams_with_20_disconnects(server):
    aborted_before = metrics(server).get("deltaserve_request_success_total[abort]", 0)
    results = asyncio.run(_concurrent(server, 200, 20))
    assert results.count(("disconnected", None)) == 20
    assert results.count(("length", 5)) == 180, [r for r in results if r != ("length", 5)][:5]
    deadline, m = time.time() + 30, {}
    while time.time() < deadline:  # the aborts reach the engine thread asynchronously
        m = metrics(server)
        idle = [m[k] for k in ("deltaserve_num_requests_running", "deltaserve_num_requests_waiting",
                               "deltaserve_kv_blocks_used", "deltaserve_state_slots_used")]
        if idle == [0, 0, 0, 0] and m.get("deltaserve_request_success_total[abort]", 0) - aborted_before >= 20:
            break
        time.sleep(0.2)
    assert m["deltaserve_num_requests_running"] == 0 and m["deltaserve_num_requests_waiting"] == 0, m
    assert m["deltaserve_kv_blocks_used"] == 0 and m["deltaserve_state_slots_used"] == 0, m
    assert m["deltaserve_request_success_total[abort]"] - aborted_before == 20, m  # aborted, not run to the end
    assert m["deltaserve_time_to_first_token_seconds_count"] >= 200 and m["deltaserve_generation_tokens_total"] > 0


def test_a_prompt_that_cannot_fit_is_refused_after_encoding_a_bounded_prefix(model_dir):
    """The tokenizer runs on the event loop holding the GIL: an 18 MB prompt took 19 s to encode, every other client
    stalled meanwhile. A text that cannot fit is refused after encoding prefixes of about twice max_model_len's
    worth; a short one is encoded once, whole."""
    from types import SimpleNamespace

    from deltaserve.serve.protocol import APIError
    from deltaserve.serve.serving import ServingContext

    tok, seen = Tokenizer.from_dir(model_dir), []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text, **kw):
            seen.append(len(text))
            return tok.encode(text, **kw)

    ctx = ServingContext(SimpleNamespace(tokenizer=Counting(), max_model_len=256,
                                         llm=SimpleNamespace(sampling_defaults={})), MODEL)
    with pytest.raises(APIError, match="maximum context length is 256 tokens"):
        ctx.encode("hello " * 1_000_000, "prompt")
    assert 0 < sum(seen) <= 4 * 8 * 256, seen
    seen.clear()
    text = "hello " * 50
    assert ctx.encode(text, "prompt") == tok.encode(text) and seen == [len(text)]


def test_non_streaming_disconnect_aborts(server):
    before = metrics(server).get("deltaserve_request_success_total[abort]", 0)
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 900, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + API_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.time() + 30
    while metrics(server)["deltaserve_num_requests_running"] < 1:  # the request is generating
        assert time.time() < deadline
        time.sleep(0.05)
    sock.close()  # the client goes away without reading the answer
    while time.time() < deadline:
        m = metrics(server)
        if m["deltaserve_num_requests_running"] == 0:
            break
        time.sleep(0.05)
    assert m.get("deltaserve_request_success_total[abort]", 0) == before + 1, m  # aborted, not run to the end
    assert m["deltaserve_kv_blocks_used"] == 0 and m["deltaserve_state_slots_used"] == 0, m
    # the gather that waited for the answer was cancelled quietly (asyncio used to log a traceback per disconnect)
    time.sleep(1.0)  # asyncio logs an unretrieved exception when the future is collected, after the response
    http(server.url + "/health")
    assert "never retrieved" not in server.log_path.read_text()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"],
                         ids=["completions", "chat", "tokenize"])
def test_a_client_gone_before_its_body_is_sent_leaves_no_traceback(server, client, path):
    """A client (or a proxy timing out a slow upload) that goes away mid-body: starlette's ClientDisconnect reached
    uvicorn, which logged a full "Exception in ASGI application" traceback per disconnect."""
    before = len(server.log_path.read_text())
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\": \"{MODEL}\", ".encode())
    time.sleep(0.3)
    sock.close()  # 1000 bytes announced, a few sent
    time.sleep(1.0)  # the server reads the disconnect and ends the request
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices[0].finish_reason
    log = server.log_path.read_text()[before:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_aborts_streams_and_exits(model_dir, tmp_path, sig):
    """SIGTERM or Ctrl-C: running streams end with finish_reason abort, the process exits promptly, no traceback
    (SIGINT's KeyboardInterrupt, re-raised by uvicorn after its shutdown, used to print one)."""
    srv = Server(model_dir, tmp_path, "--shutdown-timeout", "0.5", "--max-num-seqs", "6")
    results, started = [], [threading.Event() for _ in range(8)]

    def stream(i):
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        finish = None
        for chunk in client.completions.create(model=MODEL, prompt=f"story {i}", max_tokens=900, stream=True,
                                               extra_body={"ignore_eos": True}):
            started[i].set()
            finish = chunk.choices[0].finish_reason or finish if chunk.choices else finish
        results.append(finish)

    def whole(i):  # a non-streamed request, running or still waiting for a slot (max_num_seqs 6 < 8)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model=MODEL, prompt=f"essay {i}", max_tokens=900, extra_body={"ignore_eos": True})
        results.append(r.choices[0].finish_reason)

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=whole, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not any(e.is_set() for e in started) or metrics(srv)["deltaserve_num_requests_waiting"] < 2:
            assert time.time() < deadline, "the requests never all arrived"  # 6 generating, 2 waiting for a slot
            time.sleep(0.1)
        t0 = time.time()
        srv.proc.send_signal(sig)
        code = srv.proc.wait(timeout=15)
        elapsed = time.time() - t0
        for t in threads:
            t.join(timeout=10)
        log = srv.log_path.read_text()
        assert elapsed < 5, f"took {elapsed:.1f}s to exit"
        # README: SIGTERM exits 0 (uvicorn's re-raised SIGTERM killed the process: -15), Ctrl-C 130
        assert code == (0 if sig == signal.SIGTERM else 130), log
        assert "Traceback" not in log, log
        assert results == ["abort"] * 8  # every stream ended cleanly (finish_reason + [DONE]), none hung
    finally:
        srv.stop()


async def _last_output(stream, timeout: float = 60):
    """A RequestStream's final output (its error raised), or TimeoutError when it never ends."""
    async def drain():
        out = None
        async for out in stream:
            pass
        return out

    return await asyncio.wait_for(drain(), timeout)


def _with_async_engine(llm, body):
    """Run `await body(engine)` on an AsyncEngine over llm, in a fresh event loop; the engine is stopped after."""
    from deltaserve.serve.async_engine import AsyncEngine

    async def main():
        eng = AsyncEngine(llm)
        eng.start()
        try:
            return await body(eng)
        finally:
            eng.stop()

    return asyncio.run(main())


def test_a_failed_engine_step_fails_the_requests_in_flight_and_the_engine_goes_on(model_dir):
    """A step that raises (here an injected launch error) ends every request in flight with EngineError (a 500 /
    an error chunk for their clients), not a hang; the engine thread lives on and the next request runs."""
    from deltaserve.serve.async_engine import EngineError

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256)
    real, launches = llm.runner.launch, []

    def launch(sched):
        launches.append(sched)
        if len(launches) == 3:
            raise RuntimeError("injected launch failure")
        return real(sched)

    llm.runner.launch = launch
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0)

    async def main(eng):
        streams = [await eng.add_request([5, 6, 7 + i], params, f"r{i}") for i in range(2)]
        for s in streams:
            with pytest.raises(EngineError, match="injected launch failure"):
                await _last_output(s)
        return await _last_output(await eng.add_request([5, 6, 7], params, "after")), eng.alive

    out, alive = _with_async_engine(llm, main)
    assert alive and out.finished and len(out.outputs[0].token_ids) == 20
    assert not llm.engine.groups and not llm.engine.has_unfinished()


def test_an_unexpected_error_while_queueing_fails_only_that_request(model_dir):
    """An exception other than ValueError from add_request (a schema the checks did not expect raised a TypeError)
    ended the engine thread: that client hung, then /health said 503 and every later request failed. Now that
    request gets EngineError (a 500) and the engine goes on."""
    from deltaserve.serve.async_engine import EngineError

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256)
    real = llm.engine.add_request

    def add_request(ids, params, prompt=None, request_id=None):
        if request_id == "bad":
            raise TypeError("injected add failure")
        return real(ids, params, prompt=prompt, request_id=request_id)

    llm.engine.add_request = add_request
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)

    async def main(eng):
        with pytest.raises(EngineError, match="TypeError: injected add failure"):  # before: no answer at all
            await asyncio.wait_for(eng.add_request([5, 6, 7], params, "bad"), 60)
        return await _last_output(await eng.add_request([5, 6, 7], params, "after")), eng.alive

    out, alive = _with_async_engine(llm, main)
    assert alive and out.finished and len(out.outputs[0].token_ids) == 4


def test_a_caller_cancelled_as_its_request_is_accepted_drops_it(model_dir):
    """A handler cancelled after the engine accepted its request but before add_request resumed left the request
    running to max_tokens with nobody reading it (the abort was sent only while it was still queued)."""
    from deltaserve.serve.async_engine import _resolve

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256)
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
    real_abort, aborted = llm.engine.abort, []

    def abort(rid):
        aborted.append(rid)
        return real_abort(rid)

    llm.engine.abort = abort

    async def main(eng):
        task = asyncio.ensure_future(eng.add_request([5, 6, 7], params, "gone"))
        real_post = eng._post

        def post(fn, *args):  # the acceptance, then at once the caller's cancellation, both before the task resumes
            real_post(fn, *args)
            if fn is _resolve:
                real_post(task.cancel)

        eng._post = post
        with pytest.raises(asyncio.CancelledError):
            await task
        while llm.engine.groups:
            await asyncio.sleep(0.01)

    _with_async_engine(llm, main)
    assert aborted == ["gone"]  # before: none, the request ran its 200 tokens for nobody


def test_a_request_finished_in_a_step_that_then_fails_gets_its_answer(model_dir):
    """Async scheduling: a step first reads the previous launch (a penalty request's, which finishes there), then its
    own launch raises. The finished request's output was built and then dropped with the exception: its client hung
    (no answer, no error). Now it gets its answer and the other request its EngineError."""
    from deltaserve.serve.async_engine import EngineError

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256, async_scheduling=True)
    real, seen = llm.runner.launch, {}

    def launch(sched):
        seen["a"] = seen.get("a") or "A" in llm.engine.groups
        if seen["a"] and "A" not in llm.engine.groups and not seen.get("failed"):
            seen["failed"] = True
            raise RuntimeError("injected launch failure")
        return real(sched)

    llm.runner.launch = launch

    async def main(eng):
        a = await eng.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0,
                                                            repetition_penalty=1.1), "A")
        b = await eng.add_request([5, 6, 8], SamplingParams(max_tokens=40, ignore_eos=True, temperature=0), "B")
        out = await _last_output(a)
        with pytest.raises(EngineError, match="injected launch failure"):
            await _last_output(b)
        return out

    out = _with_async_engine(llm, main)
    assert seen["failed"] and out.finished and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 3


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, tokenizer):
    """vLLM's truncate_prompt_tokens (was refused this morning, ignored before): only the prompt's last k tokens are
    read, text or ids, chat too; a text too long for the context is truncated instead of refused."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    body = dict(model=MODEL, max_tokens=3, temperature=0, echo=True, extra_body={"truncate_prompt_tokens": 4})
    cut = client.completions.create(prompt="The quick brown fox jumps over the lazy dog", **body)
    assert cut.usage.prompt_tokens == 4 and cut.choices[0].text.startswith(tokenizer.decode(ids[-4:]))
    alone = client.completions.create(model=MODEL, prompt=ids[-4:], max_tokens=3, temperature=0, echo=True)
    assert cut.choices[0].text == alone.choices[0].text
    assert client.completions.create(prompt=ids, **body).choices[0].text == alone.choices[0].text
    long = client.completions.create(model=MODEL, prompt="hello " * 5000, max_tokens=2, temperature=0,
                                     extra_body={"truncate_prompt_tokens": -1})
    assert long.usage.prompt_tokens == MAX_MODEL_LEN - 2  # -1: room for max_tokens
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 50}],
                                          max_tokens=2, extra_body={"truncate_prompt_tokens": 10})
    assert chat.usage.prompt_tokens == 10


def test_truncate_prompt_tokens_minus_one_leaves_room_for_the_default_max_tokens(client):
    """-1 keeps as many tokens as leave room for max_tokens; left out, /v1/completions asks for OpenAI's 16, but the
    cut left room for one token only, so the answer was one token long."""
    res = client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 10), temperature=0,
                                    extra_body={"truncate_prompt_tokens": -1, "ignore_eos": True})
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (MAX_MODEL_LEN - 16, 16), res.usage


TRUNCATE_PATHS = {"completions": ("/v1/completions", {"prompt": "hello " * 40}),
                  "chat": ("/v1/chat/completions", {"messages": user("hello " * 40)})}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", TRUNCATE_PATHS)
@pytest.mark.parametrize("k, message", [
    (MAX_MODEL_LEN + 1, rf"^truncate_prompt_tokens \({MAX_MODEL_LEN + 1}\) is greater than max_model_len "
                        rf"\({MAX_MODEL_LEN}\): select a smaller truncation size"),
    (0, r"^truncate_prompt_tokens must be -1 .* or an integer >= 1, got 0\.$"),
    (-2, r"^truncate_prompt_tokens must be -1 .* or an integer >= 1, got -2\.$"),
], ids=["over_max_model_len", "zero", "below_minus_one"])
def test_truncate_prompt_tokens_vllm_refuses_is_a_400(server, endpoint, stream, k, message):
    """As vLLM (_validate_truncation_size; SamplingParams: 0 and < -1): one sentence naming the field. One longer
    than max_model_len was taken and ignored (the prompt ran uncut)."""
    path, prompt = TRUNCATE_PATHS[endpoint]
    got, err = http(server.url + path, {"model": MODEL, **prompt, "max_tokens": 2, "stream": stream,
                                        "truncate_prompt_tokens": k}, {"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and err["error"]["param"] == "truncate_prompt_tokens", err
    assert re.match(message, err["error"]["message"]), err


@pytest.mark.parametrize("endpoint", TRUNCATE_PATHS)
def test_truncate_prompt_tokens_cuts_the_left_when_streaming(client, tokenizer, endpoint):
    """Streamed as whole: the prompt's last k tokens are read (usage says k; the same answer as the uncut tail)."""
    path, prompt = TRUNCATE_PATHS[endpoint]
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    body = dict(model=MODEL, max_tokens=3, temperature=0, extra_body={"truncate_prompt_tokens": 5}, **prompt)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **body))
    whole = create(**body)
    text = "".join((c.choices[0].text if endpoint == "completions" else c.choices[0].delta.content or "")
                   for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == 5
    assert text == (whole.choices[0].text if endpoint == "completions" else whole.choices[0].message.content)
    if endpoint == "completions":
        tail = tokenizer.encode(prompt["prompt"])[-5:]
        assert text == client.completions.create(model=MODEL, prompt=tail, max_tokens=3, temperature=0).choices[0].text


def test_continue_final_message_goes_on_with_the_last_message(client, tokenizer):
    """vLLM's continue_final_message (was refused): the answer continues a prefilled assistant message, as a
    completion of the prompt cut right after it."""
    msgs = [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": '{"name": '}]
    res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                         extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                     "ignore_eos": True})
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert prompt.endswith('{"name": ') and res.usage.prompt_tokens == len(tokenizer.encode(prompt))
    same = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert res.choices[0].message.content == same.choices[0].text


@pytest.mark.parametrize("refused", [False, True], ids=["all-queued", "one-refused"])
def test_a_batch_of_prompts_is_queued_at_once(model_dir, refused):
    """/v1/completions with several prompts awaited each prompt's acceptance before sending the next, and the engine
    takes commands only between steps: behind running decodes a batch of 40 prompts took 40 steps to queue (0.42 s
    against 0.02 s for the same work as n=40 on the CPU) and was prefilled one prompt a step. Now all are sent at
    once (all in flight together); one refused prompt still aborts the others and answers 400."""
    from deltaserve.serve.protocol import APIError, CompletionRequest, parse_request
    from deltaserve.serve.serving import ServingContext
    from deltaserve.serve.serving_completion import create_completion

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256)
    prompts = [[5, 6, 7 + i] for i in range(8)] + ([[5, 10 ** 6]] if refused else [])  # the engine refuses the id
    body = json.dumps({"model": "tiny", "prompt": prompts, "max_tokens": 2, "stream": True}).encode()
    in_flight, most = [0], [0]

    async def main(eng):
        real_add = eng.add_request

        async def add_request(*args, **kwargs):
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            try:
                return await real_add(*args, **kwargs)
            finally:
                in_flight[0] -= 1

        eng.add_request = add_request
        try:
            resp = await create_completion(ServingContext(eng, "tiny"), parse_request(CompletionRequest, body), None)
        except APIError as e:
            return e
        for s in resp.streams:
            s.abort()
        return resp

    resp = _with_async_engine(llm, main)
    assert most[0] == len(prompts)  # before: 1, each prompt sent after the previous one's acceptance
    if refused:
        assert isinstance(resp, APIError) and resp.status == 400 and "outside the vocabulary" in resp.message
    core, s = llm.engine, llm.engine.scheduler
    assert not core.groups and s.blocks.num_free == s.blocks.num_blocks and s.states.num_free == s.states.num_slots


def test_cache_salt_asks_for_nothing_without_a_prefix_cache(model_dir):
    """vLLM's cache_salt keeps tenants' prefix-cache entries apart: refused while the (shared) prefix cache is on
    (BAD_REQUESTS), accepted without one, where nothing is shared."""
    from deltaserve.serve.async_engine import AsyncEngine
    from deltaserve.serve.protocol import CompletionRequest, parse_request
    from deltaserve.serve.serving import ServingContext

    body = json.dumps({"model": "tiny", "prompt": "hi", "cache_salt": "tenant-a"}).encode()
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256)
    ServingContext(AsyncEngine(llm), "tiny").check_generation_request(parse_request(CompletionRequest, body))


def test_a_dead_engine_fails_its_requests_and_shuts_the_server_down(model_dir, tmp_path):
    """An engine that cannot run requests any more (here its thread dies; a lost TP worker or a broken CUDA device
    alike) left the server up, /health 503 and every request refused, until someone killed it. As vLLM's, the server
    now answers the requests in flight with errors and exits with status 1 and one error line, so a supervisor
    restarts it."""
    srv = Server(model_dir, tmp_path)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL, prompt="story", max_tokens=900, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # generating
        with pytest.raises(openai.InternalServerError, match="injected engine death"):
            client.chat.completions.create(model=MODEL, messages=user("FORCE_DIE"), max_tokens=4)
        with pytest.raises(openai.APIError, match="injected engine death"):  # an error chunk ends the stream
            for _ in stream:
                pass
        code = srv.proc.wait(timeout=15)
        log = srv.log_path.read_text()
        assert code == 1, log
        assert log.count("the engine cannot run requests any more (the engine thread died: InjectedEngineDeath: "
                         "injected engine death); shutting the server down") == 1, log
    finally:
        srv.stop()


def test_a_step_that_breaks_the_cuda_device_marks_the_engine_dead(model_dir, monkeypatch):
    """A failed step after which the device runs nothing (a sticky CUDA error) was treated as one that left it usable:
    /health stayed 200 and every later request failed with a 500. Now the engine is dead and says so once."""
    from deltaserve.serve import async_engine
    from deltaserve.serve.async_engine import EngineError, EngineStopped

    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=256)

    def launch(sched):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    llm.runner.launch = launch
    monkeypatch.setattr(async_engine, "_device_failure", lambda device: "the CUDA device failed (injected)")
    deaths = []

    async def main(eng):
        eng.on_dead = deaths.append
        stream = await eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "r")
        with pytest.raises(EngineError, match="illegal memory access"):
            await _last_output(stream)
        while not deaths:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineStopped):
            await eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "after")
        return eng.alive

    assert _with_async_engine(llm, main) is False
    assert deaths == ["the CUDA device failed (injected)"]
    assert not llm.engine.groups  # its blocks and slot were freed all the same


def test_concurrent_requests_beyond_max_num_seqs_match_solo_and_leave_the_engine_idle(model_dir, tmp_path):
    """32 greedy requests at once through 4 state slots, with requests refused (a bad field, a prompt too long) among
    them: each answer equals the same request run alone (token ids, logprobs), nothing is lost or run twice, and the
    engine ends idle with /metrics agreeing."""
    srv = Server(model_dir, tmp_path, "--max-num-seqs", "4")
    try:
        async def run(concurrently: bool):
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

            async def one(i):
                r = await client.completions.create(
                    model=MODEL, prompt=f"request {i} " * (1 + i % 5), max_tokens=3 + i % 7, temperature=0,
                    logprobs=1, extra_body={"ignore_eos": True, "return_token_ids": True})
                ch = r.choices[0]
                return ch.model_extra["token_ids"], ch.logprobs.token_logprobs, r.usage.completion_tokens

            async def refused(body):
                try:
                    await client.completions.create(model=MODEL, max_tokens=4, **body)
                except openai.BadRequestError as e:
                    return 400, e.message
                return 200, None

            bad = [{"prompt": "x", "temperature": -1}, {"prompt": "hello " * (2 * MAX_MODEL_LEN)},
                   {"prompt": [5] * (MAX_MODEL_LEN + 1)}]
            try:
                if concurrently:
                    return await asyncio.gather(*(one(i) for i in range(32)), *(refused(b) for b in bad))
                return [await one(i) for i in range(32)]
            finally:
                await client.close()

        together, alone = asyncio.run(run(True)), asyncio.run(run(False))
        assert [r[0] for r in together[32:]] == [400] * 3, together[32:]
        assert "maximum context length" in together[33][1] and "maximum context length" in together[34][1]
        for i, ((ids, lps, n), (ids1, lps1, n1)) in enumerate(zip(together, alone)):
            assert ids == ids1 and n == n1 == len(ids) == 3 + i % 7, i
            assert max(abs(a - b) for a, b in zip(lps, lps1)) < 1e-4, (i, lps, lps1)
        m = metrics(srv)
        assert m["deltaserve_request_success_total[length]"] == 64, m  # each request run once, none lost
        assert m["deltaserve_generation_tokens_total"] == 2 * sum(3 + i % 7 for i in range(32)), m
        assert [m[k] for k in ("deltaserve_num_requests_running", "deltaserve_num_requests_waiting",
                               "deltaserve_kv_blocks_used", "deltaserve_state_slots_used")] == [0, 0, 0, 0], m
        assert "Traceback" not in srv.log_path.read_text()
    finally:
        srv.stop()
