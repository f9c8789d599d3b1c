"""benchmarks/profile_decode.py --timeline: one graph replay's kernels in launch order, from the profiler's kernel
events of several back-to-back replays (the pure part, on made-up events; the profiling itself needs a GPU)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_decode.py"
spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
profile_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_decode)


def test_timeline_takes_the_last_replay_in_launch_order_with_gaps_and_overlaps():
    replay = [("norm", 0.0, 2.0), ("gemv", 2.5, 40.0), ("gdn", 5.0, 45.0), ("norm", 45.4, 47.0)]
    events = [(n, s + off, e + off) for off in (0.0, 500.0, 1000.0) for n, s, e in replay]
    rows = profile_decode.replay_timeline(list(reversed(events)))  # any order in
    assert [r[0] for r in rows] == ["norm", "gemv", "gdn", "norm"]
    assert rows[0][1:] == (0.0, 2.0, 0.0)
    assert rows[1][1:] == pytest.approx((2.5, 37.5, 0.5))
    assert rows[2][1:] == pytest.approx((5.0, 40.0, -35.0))  # placed early under PDL: a negative gap
    assert rows[3][3] == pytest.approx(0.4)  # after the latest end so far (gdn's), not the gemv's
    totals = profile_decode.timeline_totals(rows)
    assert totals[0][:2] == ("gdn", 1) and totals[0][2] == pytest.approx(40.0)
    norm = next(t for t in totals if t[0] == "norm")
    assert norm[1:] == pytest.approx((2, 3.6, 0.4))  # negative gaps do not count as idle time


def test_timeline_of_no_events_is_empty():
    assert profile_decode.replay_timeline([]) == []
