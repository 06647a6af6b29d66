"""Smoke runs of the benchmarks this release's figures come from, at their --quick sizes: the scripts still run
against the library as it is and write the JSON fields the README quotes. (The figures themselves come from the
full runs, never from here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bench_extrapolation_quick_and_control_only(tmp_path):
    out = tmp_path / "extrapolation.json"
    run_script("bench_extrapolation.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["lengths"] == [32, 64] and result["grid"][-1] == 32
    assert set(result["summary"]) == {"32", "64"} and set(result["summary"]["64"]) == {str(r) for r in result["grid"]}
    (seed,) = result["seeds"]
    assert seed["control"]["params"] < seed["params"] * 1.05  # the control's budget is the parity model's
    assert seed["control"]["fits_train_len"] == (seed["control"]["seq_accuracy"]["32"] >= 0.95)

    only = tmp_path / "control.json"
    run_script("bench_extrapolation.py", "--quick", "--control-only", "--out", str(only))
    result = json.loads(only.read_text())
    assert result["summary"] == {} and result["seeds"][0]["seq_accuracy"] == {}
    assert set(result["control_summary"]) == {"32", "64"}


def test_bench_threads_quick(tmp_path):
    out = tmp_path / "threads.json"
    run_script("bench_threads.py", "--quick", "--mixers", "attention,gru", "--load", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["conditions"]) == {"as_is", "loaded"}
    assert result["conditions"]["loaded"]["busy_processes"] == 1
    for condition in result["conditions"].values():
        for mixer in ("attention", "gru"):
            for job in ("train", "decode"):
                row = condition[mixer][job]
                assert set(row) == {"1", "2"} and row["1"]["speedup_vs_first"] == 1.0
                assert all(cell["wall_s"] > 0 for cell in row.values())
