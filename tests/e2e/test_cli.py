"""`deltaserve` CLI end to end, in subprocesses: --help, make-tiny + generate, the default tiny model, user errors."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "deltaserve.cli", *args], capture_output=True, text=True,
                          env=env, timeout=180)


def assert_user_error(res, *needles):
    """Exit 2, stderr one line `error: ...` naming `needles`, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in: {lines[0]}"


@pytest.mark.parametrize(
    "args, flags",
    [
        ([], ["make-tiny", "generate", "quantize"]),
        (["quantize"], ["--method", "--group-size", "--not-convert", "--calib"]),
        (["make-tiny"], ["--moe", "--layers", "--seed", "dir"]),
        (["generate"], ["--model", "--prompt", "--max-tokens", "--temperature", "--top-p", "--chat", "--device",
                        "--dtype", "--ignore-eos", "--num-kv-blocks", "--tp", "--kv-cache-dtype"]),
    ],
    ids=["top", "quantize", "make_tiny", "generate"],
)
def test_help(env, args, flags):
    res = cli(*args, "--help", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: deltaserve")
    for flag in flags:
        assert flag in res.stdout, flag


def test_make_tiny_writes_checkpoint(made):
    res, path = made
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == path
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3_5ForConditionalGeneration"]


def test_generate_from_made_tiny(made, env):
    _, path = made
    # --ignore-eos: random weights may emit EOS early; the count must be exactly max-tokens
    res = cli("generate", "--model", path, "--prompt", "hello", "--max-tokens", "5", "--ignore-eos",
              "--device", "cpu", env=env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "--- prompt: 'hello' | 5 tokens, finish: length" in res.stdout, res.stdout


def test_generate_with_int8_kv_cache(made, env):
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "hello", "--max-tokens", "5", "--ignore-eos",
              "--device", "cpu", "--kv-cache-dtype", "int8", env=env)
    assert res.returncode == 0, res.stderr
    assert "KV cache (int8)" in res.stderr  # the engine's KV-cache log line names the storage
    assert "--- prompt: 'hello' | 5 tokens, finish: length" in res.stdout, res.stdout
    bad = cli("generate", "--model", path, "--prompt", "hello", "--kv-cache-dtype", "int3", env=env)
    assert_user_error(bad, "invalid choice: 'int3'", "deltaserve generate --help")  # one line, not the usage block


@pytest.mark.parametrize("args, needle", [
    (["generate", "--prompt", "hi", "--max-tokens", "abc"], "invalid int value: 'abc'"),
    (["generate", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus (see deltaserve generate --help)"),
    (["serve", "--state-dtype", "float16"], "invalid choice: 'float16'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["bench", "--preset", "qwen3.5-9b", "--model", "x", "--device", "cpu"], "give one of them"),
], ids=["bad_int", "unknown_flag", "bad_choice", "unknown_command", "bench_preset_and_model"])
def test_bad_flags_are_one_line(env, args, needle):
    """argparse printed its whole usage block before the error (25 lines for --max-tokens abc); bench took --preset
    over --model silently."""
    assert_user_error(cli(*args, env=env), needle)


def test_generate_tp2_prints_what_tp1_prints(made, env):
    _, path = made
    args = ("generate", "--model", path, "--prompt", "hello world", "--max-tokens", "6", "--ignore-eos",
            "--device", "cpu")
    one, two = cli(*args, env=env), cli(*args, "--tp", "2", env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert "per rank of 2" in two.stderr  # the KV-cache line of a 2-rank engine
    assert two.stdout == one.stdout


def test_error_tp_does_not_divide_heads(made, env):
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "x", "--device", "cpu", "--tp", "4", env=env)
    assert_user_error(res, "tensor_parallel_size=4 does not divide linear_num_key_heads=2; valid sizes: 1, 2")


def test_generate_default_model_built_under_xdg_cache(env):
    default = os.path.join(env["XDG_CACHE_HOME"], "deltaserve", "tiny-qwen3.5")
    assert not os.path.exists(default)
    res = cli("generate", "--prompt", "hi", "--max-tokens", "3", "--ignore-eos", "--device", "cpu", env=env)
    assert res.returncode == 0, res.stderr
    assert "--- prompt: 'hi' | 3 tokens, finish: length" in res.stdout, res.stdout
    assert os.path.isfile(os.path.join(default, "model.safetensors"))
    assert os.path.isfile(os.path.join(default, "tokenizer.json"))


def test_error_nonexistent_model_dir(env, tmp_path):
    missing = str(tmp_path / "no-such-model")
    res = cli("generate", "--model", missing, "--prompt", "hi", "--device", "cpu", env=env)
    assert_user_error(res, missing, "does not exist")


def test_error_hugging_face_id_says_nothing_is_downloaded(env, tmp_path):
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "generate", "--model", "Qwen/Qwen3.5-9B", "--prompt",
                          "hi", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert_user_error(res, "'Qwen/Qwen3.5-9B' does not exist", "Hugging Face model id", "downloads nothing")


def test_error_chat_with_a_template_that_does_not_compile(made, env, tmp_path):
    """deltaserve chat started, then answered every message with the error (and exited 0); now it stops at start,
    naming the file."""
    _, path = made
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    res = subprocess.run([sys.executable, "-m", "deltaserve.cli", "chat", "--model", str(tmp_path / "m"), "--device",
                          "cpu"], input="hello\n/exit\n", capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr  # after loading: INFO lines first
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: The chat template in ") and "not valid Jinja" in last, res.stderr
    assert str(tmp_path / "m" / "tokenizer_config.json") in last, last
    assert ">>>" not in res.stdout, res.stdout


def test_error_broken_config(env, tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen3_5ForCausalLM"],')
    res = cli("generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu", env=env)
    assert_user_error(res, "config.json", "not valid JSON")


def test_error_checkpoint_without_weights(made, env, tmp_path):
    _, path = made
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(path, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    res = cli("generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu", env=env)
    assert_user_error(res, "model.safetensors")


def test_generate_structured_output(made, env, tmp_path):
    """--choice constrains each answer to one of the choices; --json-schema takes a file (or inline JSON)."""
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "Pick", "--prompt", "Again", "--temperature", "1.0", "--seed",
              "3", "--choice", "left", "--choice", "right", "--max-tokens", "10", "--device", "cpu", env=env)
    assert res.returncode == 0, res.stderr
    answers = [line for line in res.stdout.splitlines() if not line.startswith("--- prompt")]
    assert len(answers) == 2 and set(answers) <= {"left", "right"}, res.stdout
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False}))
    res = cli("generate", "--model", path, "--prompt", "JSON", "--temperature", "0.9", "--seed", "1",
              "--json-schema", str(schema), "--max-tokens", "40", "--device", "cpu", env=env)
    assert res.returncode == 0 and "finish: stop" in res.stdout, res.stdout + res.stderr
    assert set(json.loads(res.stdout.split("\n", 1)[1])) == {"ok"}


@pytest.mark.parametrize("args, needle", [
    (["--json-schema", "{nope"], "--json-schema is neither a file nor valid JSON"),
    (["--regex", "a", "--choice", "b"], "at most one of --json-schema, --regex and --choice"),
    (["--regex", ""], "regex"),  # an empty flag was dropped: the answer ran unconstrained
], ids=["not-json", "two-kinds", "empty-regex"])
def test_error_structured_output(made, env, args, needle):
    _, path = made
    assert_user_error(cli("generate", "--model", path, "--prompt", "hi", *args, "--device", "cpu", env=env), needle)


def test_error_schema_that_does_not_compile(made, env):
    """Compiled against the model's vocabulary, so after loading (stderr has the load's INFO line first)."""
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "hi", "--json-schema", '{"type": "bogus"}', "--device", "cpu",
              env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == ('error: structured output: the JSON schema does not compile: '
                                                   'Unsupported type "bogus"')


def test_error_negative_temperature(made, env):
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "hi", "--temperature", "-1", "--device", "cpu", env=env)
    assert_user_error(res, "temperature")


def test_n_greedy_is_refused_and_n_sampled_from_generation_config_runs(made, env, tmp_path):
    """n > 1 needs a temperature > 0 (as vLLM): greedy is refused in one line; a temperature that only the
    checkpoint's generation_config.json gives is a sampling one, not refused before the model loads."""
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "hi", "--n", "2", "--temperature", "0", env=env)
    assert_user_error(res, "n must be 1 when using greedy sampling", "temperature > 0")
    sampled = str(tmp_path / "sampled")
    shutil.copytree(path, sampled)
    gen_file = os.path.join(sampled, "generation_config.json")
    with open(gen_file) as f:
        gen = {**json.load(f), "do_sample": True, "temperature": 0.7}
    with open(gen_file, "w") as f:
        json.dump(gen, f)
    res = cli("generate", "--model", sampled, "--prompt", "hi", "--n", "2", "--max-tokens", "2", "--ignore-eos",
              "--device", "cpu", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("--- prompt: 'hi' | 2 tokens") == 2, res.stdout


def test_path_flags_expand_a_leading_tilde(env, tmp_path, monkeypatch):
    """A quoted ~ (or --flag=~/x) reaches us unexpanded: it named a directory '~' in the working directory."""
    monkeypatch.chdir(tmp_path)  # where a literal '~' directory would land
    home = env["HOME"]
    res = cli("make-tiny", "~/tilde", env=env)
    assert res.returncode == 0 and os.path.isfile(os.path.join(home, "tilde", "config.json")), res.stderr
    with open(os.path.join(home, "t.jinja"), "w") as f:
        f.write("{{ messages[0]['content'] }} ->")
    with open(os.path.join(home, "schema.json"), "w") as f:
        json.dump({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                   "additionalProperties": False}, f)
    with open(os.path.join(home, "calib.txt"), "w") as f:
        f.write("Calibration text for the activation-aware scales. " * 8)
    res = cli("generate", "--model", "~/tilde", "--tokenizer", "~/tilde", "--prompt", "JSON", "--chat",
              "--chat-template", "~/t.jinja", "--json-schema", "~/schema.json", "--temperature", "0.9", "--seed", "1",
              "--max-tokens", "40", "--device", "cpu", env=env)
    assert res.returncode == 0 and "finish: stop" in res.stdout, res.stdout + res.stderr
    res = cli("quantize", "~/tilde", "~/tilde-awq", "--group-size", "64", "--calib", "~/calib.txt", env=env)
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(os.path.join(home, "tilde-awq", "config.json"))
    assert not os.path.exists(tmp_path / "~")


def test_error_make_tiny_zero_layers(env, tmp_path):
    res = cli("make-tiny", str(tmp_path / "t"), "--layers", "0", env=env)
    assert_user_error(res, "--layers")


def test_quantize_then_generate(made, env, tmp_path):
    _, path = made
    out = str(tmp_path / "awq")
    calib = tmp_path / "calib.txt"
    calib.write_text("A few sentences of calibration text for the activation-aware scales. " * 8)
    res = cli("quantize", path, out, "--method", "awq", "--group-size", "64", "--not-convert", "layers.0.",
              "--calib", str(calib), env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == out
    assert "Quantizing layers" in res.stderr  # the per-layer progress bar
    assert "activation-aware scales for 6 norms" in res.stderr, res.stderr  # layer 0 left 16-bit
    with open(os.path.join(out, "config.json")) as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["group_size"] == 64 and "layers.0." in qcfg["modules_to_not_convert"]
    res = cli("generate", "--model", out, "--prompt", "hello", "--max-tokens", "5", "--ignore-eos", "--device", "cpu",
              env=env)
    assert res.returncode == 0, res.stderr
    assert "--- prompt: 'hello' | 5 tokens, finish: length" in res.stdout, res.stdout


def test_error_quantize_group_size(made, env, tmp_path):
    _, path = made
    res = cli("quantize", path, str(tmp_path / "awq"), "--group-size", "48", env=env)
    assert_user_error(res, "--group-size", "in_proj_qkv.weight", "does not divide")


def test_error_quantize_into_existing_checkpoint(made, env):
    """Into its own source (or any non-empty directory): refused before anything is written."""
    _, path = made
    res = cli("quantize", path, path, env=env)
    assert_user_error(res, path, "not an empty directory")


def test_error_quantize_a_source_that_does_not_load(made, env, tmp_path):
    """Weights that do not fit config.json were quantized (exit 0) into a checkpoint that then failed to load."""
    src, dst = tmp_path / "src", tmp_path / "q"
    shutil.copytree(made[1], src)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (src / "config.json").write_text(json.dumps(config))
    assert_user_error(cli("quantize", str(src), str(dst), env=env), str(src), "does not load", "down_proj.weight")
    assert not dst.exists()


def test_error_generate_quantized_checkpoint_under_a_moe_config(made, env, tmp_path):
    """An AWQ checkpoint of a dense model under an MoE model's config.json was an AttributeError traceback
    ('SparseMoE' has no attribute 'gate_up_proj') from deep in the loader."""
    q, moe = tmp_path / "awq", tmp_path / "moe"
    assert cli("quantize", made[1], str(q), "--group-size", "64", env=env).returncode == 0
    assert cli("make-tiny", str(moe), "--moe", env=env).returncode == 0
    config = json.loads((moe / "config.json").read_text())
    config["quantization_config"] = json.loads((q / "config.json").read_text())["quantization_config"]
    (q / "config.json").write_text(json.dumps(config))
    res = cli("generate", "--model", str(q), "--prompt", "hello", "--max-tokens", "2", "--device", "cpu", env=env)
    assert_user_error(res, "layers.0.mlp.down_proj", "config.json and the weights disagree")


def test_make_tiny_refuses_a_directory_that_is_not_empty(env, tmp_path):
    """It overwrote config.json, the weights and the tokenizer of whatever the directory held (a real checkpoint
    given by mistake); now that takes --force."""
    (tmp_path / "config.json").write_text('{"model_type": "someone else\'s"}')
    assert_user_error(cli("make-tiny", str(tmp_path), env=env), str(tmp_path), "not an empty directory", "--force")
    assert (tmp_path / "config.json").read_text() == '{"model_type": "someone else\'s"}'
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    # an earlier sharded checkpoint and its chat template would outlive the rewrite (the template wins over
    # tokenizer_config.json's): --force removes them
    stale = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "chat_template.jinja"]
    for name in stale:
        (tmp_path / name).write_text("{}")
    res = cli("make-tiny", str(tmp_path), "--force", env=env)
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path), res.stderr
    assert not set(stale) & set(os.listdir(tmp_path))
    # a file, --force or not: it printed "[Errno 17] File exists"
    assert_user_error(cli("make-tiny", str(tmp_path / "config.json"), "--force", env=env), "is a file")
    assert "model.safetensors" in os.listdir(tmp_path)


def test_error_make_tiny_onto_a_file(env, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert_user_error(cli("make-tiny", str(target), env=env), str(target))


def test_error_max_model_len_beyond_the_model(made, env):
    _, path = made
    res = cli("generate", "--model", path, "--prompt", "hi", "--max-model-len", "100000", "--device", "cpu", env=env)
    assert_user_error(res, "max_model_len 100000", "max_position_embeddings 4096")


@pytest.mark.parametrize("args", [["bench", "--steps", "0"], ["bench", "--batch-sizes", "1,0"],
                                  ["generate", "--max-model-len", "0"], ["generate", "--num-kv-blocks", "0"]],
                         ids=["steps", "batch-sizes", "max-model-len", "num-kv-blocks"])
def test_error_zero_for_a_count_flag(env, args):
    """0 is not 'auto': argparse refuses it in one line naming the flag."""
    res = cli(*args, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"argument {args[1]}: must be a positive integer, got 0" in res.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["5", "0", "nan"], ids=["above-one", "zero", "nan"])
def test_error_gpu_memory_utilization_out_of_range_on_cpu_too(made, env, value):
    """Checked on CUDA only: on the CPU a value no GPU could take ran, the flag silently dropped."""
    res = cli("generate", "--model", made[1], "--prompt", "hi", "--gpu-memory-utilization", value, "--device", "cpu",
              env=env)
    assert_user_error(res, "gpu_memory_utilization must be in (0, 1]", f"got {float(value)}")


def test_generate_takes_a_tokenizer_from_elsewhere(made, env, tmp_path):
    """A checkpoint folder without tokenizer.json: the error told CLI users to pass token ids, which generate cannot,
    and generate had no --tokenizer (chat and serve do)."""
    import shutil

    _, path = made
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(path):
        if not name.startswith(("tokenizer", "chat_template", "vocab", "merges", "special_tokens")):
            shutil.copy(os.path.join(path, name), bare / name)
    res = cli("generate", "--model", str(bare), "--prompt", "hello", "--max-tokens", "3", "--device", "cpu", env=env)
    assert res.returncode != 0 and "--tokenizer DIR" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = cli("generate", "--model", str(bare), "--tokenizer", path, "--prompt", "hello", "--max-tokens", "3",
              "--ignore-eos", "--device", "cpu", env=env)
    assert res.returncode == 0 and "3 tokens, finish: length" in res.stdout, res.stderr


def test_error_serve_where_it_cannot_listen(made, env):
    """A port another server holds, or a host that is no address: uvicorn found out after the model had loaded, logged
    the OSError under a 'serving ... on' line and exited with status 3. Now one line, before the model loads."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = cli("serve", made[1], "--port", str(port), env=env)
    assert_user_error(res, f"cannot listen on 127.0.0.1:{port}", "pick another --port")
    assert_user_error(cli("serve", made[1], "--host", "256.1.1.1", env=env), "--host '256.1.1.1' is not an address")


def test_error_serve_shutdown_timeout_nan(made, env):
    """nan passed the `< 0` check (a comparison with nan is false): the server started, and a SIGTERM aborted running
    requests at once (max(0.0, nan) is 0). The bad --host, checked after it, makes a run that gets past it end."""
    res = cli("serve", made[1], "--shutdown-timeout", "nan", "--host", "256.1.1.1", env=env)
    assert_user_error(res, "--shutdown-timeout must be >= 0 seconds, got nan")


def test_error_serve_log_stats_interval(made, env):
    res = cli("serve", made[1], "--log-stats-interval", "-1", "--host", "256.1.1.1", env=env)
    assert_user_error(res, "--log-stats-interval must be >= 0 seconds (0: no stats lines), got -1.0")


def test_serve_listen_check_skips_an_address_family_the_machine_lacks(monkeypatch):
    """'localhost' also resolves to ::1 on a machine without IPv6 (Docker's /etc/hosts): uvicorn (asyncio) skips the
    family it cannot make a socket for and listens on 127.0.0.1, so the check before loading must not refuse it."""
    import errno
    import socket

    from deltaserve.cli import _check_listen

    real_socket, real_gai = socket.socket, socket.getaddrinfo

    class NoV6(real_socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, type, proto, fileno)

    def gai(host, port, family=0, type=0, proto=0, flags=0):
        v4 = real_gai("127.0.0.1", port, socket.AF_INET, type, proto, flags)
        return v4 + [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]

    monkeypatch.setattr(socket, "socket", NoV6)
    monkeypatch.setattr(socket, "getaddrinfo", gai)
    with real_socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _check_listen("localhost", port)


# main() returns 130; CPython 3.11 instead ends the process by SIGINT, silently, when the KeyboardInterrupt went
# through an exec() of source text (dataclasses' generated methods): a shell's $? is 130 either way
EXIT_CTRL_C = (130, -signal.SIGINT)


def _sigint_default() -> None:
    """preexec_fn: SIGINT at its default in the child, as a terminal's foreground job has it. A test runner started in
    the background (`cmd &` in a non-interactive shell, as CI may be) hands its children SIGINT ignored, and Python
    then installs no KeyboardInterrupt handler: the Ctrl-C these tests send would be dropped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c_while_torch_imports(args, env):
    """Run `python -m deltaserve.cli ARGS` and send it SIGINT (Ctrl-C) while `import torch` is still running:
    -X importtime reports each module as its import ends, so a torch submodule's line means torch itself is not
    done yet. -> (exit status, stderr without the import-time lines)."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "deltaserve.cli", *args], text=True, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_sigint_default)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.rsplit("|", 1)[-1].strip().startswith("torch."):
            proc.send_signal(signal.SIGINT)
            break
    else:
        pytest.fail(f"torch was never imported:\n{''.join(lines)}")
    _, rest = proc.communicate(timeout=180)
    err = "".join(line for line in (*lines, *rest.splitlines(keepends=True)) if not line.startswith("import time:"))
    return proc.returncode, err


@pytest.mark.parametrize("command", ["chat", "generate", "quantize"])
def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(made, env, tmp_path, command):
    """Ctrl-C in the first second of any command (torch is imported when the package is) printed a traceback from
    inside torch's __init__ and died of the signal: the package imported torch before main() could catch it."""
    _, path = made
    args = {"chat": ["chat", path, "--device", "cpu"],
            "generate": ["generate", "--model", path, "--prompt", "hi", "--device", "cpu"],
            "quantize": ["quantize", path, str(tmp_path / "q")]}[command]
    code, err = _ctrl_c_while_torch_imports(args, env)
    assert code in EXIT_CTRL_C, (code, err)
    assert "Traceback" not in err and err.strip() == "", err
    assert not (tmp_path / "q").exists()


def test_the_cli_module_imports_without_torch(env):
    """The console script runs `from deltaserve.cli import main` before main() (and its Ctrl-C handler) runs: that
    import must not be the second-long torch import."""
    res = subprocess.run([sys.executable, "-c", "import sys, deltaserve.cli, deltaserve; "
                                                "print(sorted({'torch', 'deltaserve.llm'} & set(sys.modules)))"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr)


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(made, monkeypatch, capsys, command):
    from deltaserve import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("deltaserve.llm.load_weights", interrupted)
    _, path = made
    args = {"chat": ["chat", path, "--device", "cpu"],
            "generate": ["generate", "--model", path, "--prompt", "hi", "--device", "cpu"]}[command]
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err


def test_ctrl_c_while_tp_workers_start_exits_130_without_a_traceback(made, env):
    """Ctrl-C reaches the terminal's whole process group: a --tp worker still importing torch (before it ignores
    SIGINT) printed a traceback of its own. The worker's import is told apart by -X importtime, which the spawned
    workers inherit: a torch.version line after the top-level torch one is a worker's torch import under way."""
    args = ["generate", "--model", made[1], "--prompt", "hi", "--device", "cpu", "--tp", "2"]
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "deltaserve.cli", *args], text=True, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,  # its own process group, as a terminal's foreground job
                            preexec_fn=_sigint_default)
    lines, rank0_has_torch = [], False
    for line in proc.stderr:
        lines.append(line)
        module = line.rsplit("|", 1)[-1].strip()
        if module == "torch":
            rank0_has_torch = True
        elif rank0_has_torch and module == "torch.version":
            os.killpg(proc.pid, signal.SIGINT)
            break
    else:
        pytest.fail(f"no worker imported torch:\n{''.join(lines)}")
    _, rest = proc.communicate(timeout=180)
    err = "".join(line for line in (*lines, *rest.splitlines(keepends=True)) if not line.startswith("import time:"))
    assert proc.returncode in EXIT_CTRL_C, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
