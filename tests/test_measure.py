"""seqlab.measure: medians of wall and CPU time, peak memory that sees a block's growth, fresh-process cells."""

from __future__ import annotations

import sys
import time

import pytest

from seqlab import measure


def test_timer_medians_and_percentiles():
    timer = measure.Timer()
    for wait in (0.0, 0.02, 0.01):
        with timer:
            time.sleep(wait)
    assert len(timer) == 3 and timer.wall_percentile(0.0) == min(timer.wall)
    assert timer.median_wall == sorted(timer.wall)[1] and 0.009 < timer.median_wall < 0.05
    assert timer.median_cpu < timer.median_wall  # sleeping costs no CPU time
    calls = []
    wall, cpu = measure.median_time(lambda: calls.append(sum(range(20000))), repeats=3, warmup=2)
    assert len(calls) == 5 and wall > 0 and cpu >= 0


PEAK_PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("measure", sys.argv[1])
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)
with measure.peak_growth() as big:
    block = bytearray(64 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    del block
mem = measure.PeakMemory("cpu")
out = {"big": dict(big), "can_reset": mem.can_reset, "method": mem.method}
if mem.can_reset:
    with measure.peak_growth() as small:
        _ = bytes(1024)
    out["small"] = dict(small)
print(json.dumps(out))
"""


def test_peak_growth_sees_an_allocation_and_not_a_smaller_one_after_it():
    """In a fresh process (measure.py alone): in this one, earlier tests' freed memory would be reused by the
    allocation, which then adds no resident pages and reads as no growth."""
    got = measure.run_fresh(["-c", PEAK_PROBE, measure.__file__], {}, timeout_s=60)
    assert "error" not in got, got
    big = got["big"]
    assert big["growth"] >= 60 * 2**20 and big["peak"] >= big["before"] + big["growth"] - 1
    if not got["can_reset"]:
        pytest.skip("this OS cannot reset the peak RSS")
    assert got["small"]["growth"] < 16 * 2**20  # the reset forgot the 64 MiB peak before it
    assert got["method"] == "peak RSS (VmHWM, reset per phase)"


def test_run_fresh_returns_the_last_json_line_or_an_error():
    echo = ["-c", "import json, sys; print('noise'); s = json.load(sys.stdin); print(json.dumps({'y': s['x'] * 2}))"]
    assert measure.run_fresh(echo, {"x": 21}) == {"y": 42}
    failed = measure.run_fresh(["-c", "import sys; sys.exit('broken input')"], {})
    assert failed == {"error": "exit status 1: broken input"}
    slow = measure.run_fresh(["-c", "import time; time.sleep(30)"], {}, timeout_s=1)
    assert slow == {"error": "timed out after 1 s"}


def test_load_average_is_three_numbers_where_the_os_has_one():
    load = measure.load_average()
    assert load is None if not hasattr(__import__("os"), "getloadavg") else len(load) == 3


def test_measure_imports_no_torch():
    code = "import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', sys.argv[1]); " \
           "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print('torch' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code, measure.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_alternate_interleaves_rounds_and_skips_what_has_no_repeats():
    calls = []
    got = measure.alternate(calls.append, {"fast": 3, "slow": 1, "never": 0}, warmup=("fast",))
    assert calls == ["fast", "fast", "slow", "fast", "fast"]  # the warm-up, then rounds in the dict's order
    assert set(got) == {"fast", "slow"} and all(len(v) == 2 and v[0] >= 0 and v[1] >= 0 for v in got.values())
