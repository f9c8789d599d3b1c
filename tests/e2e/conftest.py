"""Fixtures of the CLI tests (test_cli.py, test_readme_walkthrough.py): the CLI runs in subprocesses."""
import os

import pytest

from test_cli import cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """XDG_CACHE_HOME (and HOME, so nothing can fall back to ~/.cache) point into a temp dir.

    One OpenMP thread: the tiny model gains nothing from more, and spin-waiting threads on a busy CPU slow it ~20x."""
    home = tmp_path_factory.mktemp("home")
    return {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "HOME": str(home), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def made(tmp_path_factory, env):
    """(result of `deltaserve make-tiny DIR`, DIR), once a test module."""
    path = str(tmp_path_factory.mktemp("cli") / "tiny")
    return cli("make-tiny", path, env=env), path
