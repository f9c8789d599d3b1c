"""benchmarks/serve_latency.py end to end: it starts `deltaserve serve` on the tiny checkpoint, streams 6 requests
through it and writes figures that agree with the per-request records; bad flags and a server that cannot start
end in one clear message, not a hang."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).resolve().parents[2] / "benchmarks" / "serve_latency.py")


def bench(*args, env, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_six_streamed_requests_at_concurrency_two(made, env, tmp_path):
    out = tmp_path / "serve.json"
    res = bench("--model", made[1], "--num-prompts", "6", "--input-len", "8", "--output-len", "4",
                "--request-rate", "inf", "--max-concurrency", "2", "--json", str(out), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    for label in ("Request throughput", "Output token throughput", "Total token throughput", "Median TTFT",
                  "P99 TPOT", "Mean ITL", "P99 E2EL"):
        assert label in res.stdout, res.stdout
    data = json.loads(out.read_text())
    figures, records = data["figures"], data["requests"]
    assert (figures["completed"], figures["failed"], figures["wrong_token_counts"]) == (6, 0, []), figures
    assert len(records) == 6 and sorted(r["index"] for r in records) == list(range(6))
    for r in records:
        assert r["error"] is None, r
        assert (r["prompt_tokens"], r["output_tokens"]) == (8, 4), r
        # deltaserve may send several tokens in one chunk (a token whose text is an incomplete UTF-8 character
        # waits for the next): every token is in some chunk, and ITL has one gap per chunk after the first
        assert sum(r["chunk_tokens"]) == 4 and len(r["itl"]) == len(r["chunk_tokens"]) - 1, r
        assert 0 < r["ttft"] <= r["e2e"], r
    assert figures["total_input_tokens"] == 48 and figures["total_output_tokens"] == 24
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "median_ttft_ms",
                "mean_tpot_ms", "p99_e2el_ms"):
        assert figures[key] > 0, (key, figures)
    assert figures["total_token_throughput"] == pytest.approx(3 * figures["output_throughput"])  # 8 in + 4 out


@pytest.mark.parametrize("args, needle", [
    (["--num-prompts", "0"], "--num-prompts: must be above 0"),
    (["--base-url", "http://127.0.0.1:8779", "--vocab-size", "10", "--", "--enforce-eager"], "flags after --"),
    (["--base-url", "http://127.0.0.1:8779"], "--tokenizer DIR or --vocab-size N"),
    (["--model", "/nonexistent/ckpt"], "is not a directory"),
], ids=["zero_prompts", "serve_flags_with_base_url", "base_url_without_vocab", "missing_model_dir"])
def test_bad_flags_are_refused(env, args, needle):
    res = bench(*args, env=env, timeout=30)
    assert res.returncode == 2 and needle in res.stderr.splitlines()[-1], res.stderr


def test_server_that_does_not_start_shows_its_log(made, env):
    res = bench("--model", made[1], "--num-prompts", "2", "--", "--max-num-seqs", "0", env=env, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "exited with status 2 before it answered /health" in res.stderr, res.stderr
    assert "--max-num-seqs" in res.stderr.splitlines()[-1], res.stderr  # the server's own error, from its log
