"""The README's commands as a new user runs them on CPU, on a tiny checkpoint: what they got wrong."""
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_user_error, cli  # (pytest puts this folder on sys.path; fixtures: conftest.py)


def test_bench_sizes_beyond_the_model_name_the_flags(made, env):
    """`deltaserve bench --model DIR` with the default --prompt-lens (up to 8192) on a 4096-token model blamed a
    max_model_len the user never gave ("lower it")."""
    _, path = made
    res = cli("bench", "--model", path, "--device", "cpu", "--batch-sizes", "1", env=env)
    assert_user_error(res, "max_position_embeddings", "4096", "--prompt-lens")


def test_serve_refuses_an_empty_api_key(made, env):
    """`--api-key ''` (an unset shell variable) started a server whose only accepted header was 'Bearer '."""
    res = cli("serve", made[1], "--device", "cpu", "--api-key", "", env=env)
    assert_user_error(res, "--api-key is empty")


def test_serve_the_embedded_model_reports_its_checkpoint_as_root(monkeypatch):
    """/v1/models' `root` is "the checkpoint served" (README): with no MODEL it was the served name, not a path."""
    from deltaserve import cli as cli_mod

    seen = {}
    monkeypatch.setattr(cli_mod, "_build_llm", lambda args: None)
    monkeypatch.setattr(cli_mod, "_check_listen", lambda host, port: None)
    monkeypatch.setattr("deltaserve.serve.api_server.run_server", lambda llm, name, **kw: seen.update(kw, name=name))
    assert cli_mod.main(["serve", "--served-model-name", "tiny"]) == 0
    assert seen["name"] == "tiny" and seen["model_root"] == cli_mod.DEFAULT_TINY_DIR, seen


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_enforce_eager_help_says_what_the_readme_says(env, command):
    """README: --enforce-eager turns off the decode graphs and the short prefills' piecewise ones; help said decode."""
    res = cli(command, "--help", env=env)
    text = " ".join(res.stdout.split())
    assert "--enforce-eager no CUDA graphs: neither for decode steps nor for the pieces of short prefills" in text


def test_serve_help_gives_the_defaults_the_readme_gives(env):
    """README: `[--shutdown-timeout 5] [--log-level info]`, the defaults; --help gave neither."""
    text = " ".join(cli("serve", "--help", env=env).stdout.split())
    assert "before they are aborted (default 5)" in text and "(default info)" in text, text


def test_an_unwritable_destination_is_a_plain_sentence(env, tmp_path):
    """`make-tiny` into a folder under a file read "error: [Errno 20] Not a directory: '...'" (Python's repr)."""
    (tmp_path / "file").write_text("x")
    res = cli("make-tiny", str(tmp_path / "file" / "tiny"), env=env)
    assert_user_error(res, f"cannot use {tmp_path / 'file'}")
    assert "Errno" not in res.stderr, res.stderr


def test_generate_chat_template_without_chat_is_refused(made, env):
    """README: `--chat-template` applies to `chat` and `generate --chat`; without --chat generate ignored it."""
    res = cli("generate", "--model", made[1], "--prompt", "hi", "--chat-template", "{{ 1 }}", env=env)
    assert_user_error(res, "--chat-template", "--chat")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_torch_spec_torch_keeps_the_machines_torch(tmp_path):
    """README: "On a GPU machine whose torch is already installed, pass `TORCH_SPEC=torch` to keep it": the venv was
    isolated, so pip installed another torch into it; it must see the interpreter's packages then, and only then."""
    root = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"

    def venv_line(*extra):
        out = subprocess.run(["make", "-n", "-B", "demo", f"VENV={venv}", *extra], cwd=root, capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return next(line for line in out.splitlines() if " -m venv " in line)

    assert "--system-site-packages" in venv_line("TORCH_SPEC=torch")
    assert "--system-site-packages" not in venv_line()
