"""benchmarks/kernels/sass_report.py compiles our kernels for sm_90 on a machine without a GPU (triton's own ptxas
and cuobjdump) and prints one row per kernel. Run in a subprocess: the tests' TRITON_INTERPRET=1 would turn the
kernels into interpreter functions."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "sass_report.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_sass_report_compiles_kernels_for_hopper_without_a_gpu(tmp_path):
    res = run("--kernel", "route", "--kernel", "kpack_gemv", "--dump", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:]}
    assert set(rows) == {"route", "kpack_gemv"}
    for name, row in rows.items():
        regs, stack, instrs = int(row[1]), int(row[2]), int(row[4])
        assert 0 < regs <= 255 and stack >= 0 and instrs > 0
        assert (tmp_path / f"{name}.sass").read_text().count("EXIT") >= 1
    # the GEMV's multiply-adds are fused (one FFMA a weight, 512 a group in a thread's loop) whatever Triton's own
    # default (deltaserve/kernels pins contraction on; Triton 3.9 warns its default changes in 3.10)
    assert (tmp_path / "kpack_gemv.sass").read_text().count("FFMA") >= 512
    assert "FP fusion" not in res.stderr


def test_sass_report_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "unset TRITON_INTERPRET" in res.stderr
