"""Measurement, one engine for the profiler, the lab and the benchmarks: timings, peak memory, fresh-process cells.

Timings: `Timer` takes wall-clock and CPU time of the process side by side for each timed run; report medians.
Wall clock is the latency a user sees; CPU time (all threads of the process) is stretched less by other processes
competing for the cores (not immune: shared caches and hyperthreads still slow it), so on a shared machine compare
CPU times, and record `load_average()` beside the numbers.

Peak memory: `PeakMemory(device)` reads the process's resident set on a CPU: the peak (VmHWM), reset to the current
RSS through /proc/self/clear_refs where Linux allows it, else `ru_maxrss` (not resettable); on a GPU the CUDA
allocator's `max_memory_allocated`. Only a fresh process has a peak of its own, hence `run_fresh`: run a function in
a new interpreter, the spec as JSON on stdin, the result as JSON on the last line of stdout (`serve` is that
process's side).

This module imports only the standard library (torch only when a CUDA device is measured), so a benchmark can load
it into a process that must not import torch (bench_edge's onnxruntime cells).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# time


class Timer:
    """Wall and CPU seconds of each timed run:

        timer = Timer()
        for _ in range(repeats):
            with timer:
                run()
        timer.median_wall, timer.median_cpu
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> Timer:
        self._w0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall.append(time.perf_counter() - self._w0)
        self.cpu.append(time.process_time() - self._c0)

    def __len__(self) -> int:
        return len(self.wall)

    @property
    def last_wall(self) -> float:
        return self.wall[-1]

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    def wall_percentile(self, q: float) -> float:
        """The run at fraction q of the sorted wall times (index int(q * (n - 1)), no interpolation)."""
        ordered = sorted(self.wall)
        return ordered[int(q * (len(ordered) - 1))]


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    timer = Timer()
    for _ in range(repeats):
        with timer:
            fn()
    return timer.median_wall, timer.median_cpu


def alternate(run: Callable[[str], Any], repeats: dict[str, int],
              warmup: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
    """Time the variants `run(name)` alternating, so that the machine's drift hits them alike: the names in `warmup`
    run once untimed first, then round i runs every name whose `repeats` exceed i, in the dict's order. Returns
    {name: (median wall s, median CPU s)} for the names timed at least once (0 repeats: skipped)."""
    for name in warmup:
        run(name)
    timers = {name: Timer() for name in repeats}
    for i in range(max(repeats.values(), default=0)):
        for name, n in repeats.items():
            if i < n:
                with timers[name]:
                    run(name)
    return {name: (t.median_wall, t.median_cpu) for name, t in timers.items() if len(t)}


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process and by the child processes it has waited for (e.g. the
    lab's isolated inference cells); `time.process_time` counts this process alone."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages of the machine (None where the OS has none)."""
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# memory


def _status_bytes(key: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def peak_rss() -> int:
    """Peak resident bytes of this process: VmHWM (since the last reset), else ru_maxrss (never reset)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    """Resident bytes of this process now (VmRSS; where there is none, the peak)."""
    rss = _status_bytes("VmRSS")
    return peak_rss() if rss is None else rss


class PeakMemory:
    """Process memory on one device: `reset()` before a phase, `peak()` after it, `now()` for a baseline."""

    def __init__(self, device: Any = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.can_reset = self.cuda or reset_peak_rss()
        self.method = ("cuda max_memory_allocated" if self.cuda else
                       "peak RSS (VmHWM, reset per phase)" if self.can_reset else "peak RSS (ru_maxrss, not reset)")

    def reset(self) -> None:
        if self.cuda:
            cuda = _torch_cuda()
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        elif self.can_reset:
            reset_peak_rss()

    def now(self) -> int:
        return _torch_cuda().memory_allocated() if self.cuda else current_rss()

    def peak(self) -> int:
        if self.cuda:
            cuda = _torch_cuda()
            cuda.synchronize()
            return cuda.max_memory_allocated()
        return peak_rss()


def _torch_cuda() -> Any:
    import torch  # only on a CUDA device: the module stays importable without torch (see the docstring)

    return torch.cuda


# ---------------------------------------------------------------------------------------------------------------
# fresh-process cells


def run_fresh(argv: list[str], spec: Any, timeout_s: float | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python *argv` in a fresh interpreter with `spec` as JSON on stdin; its result is the JSON object on the
    last line of its stdout. A failure comes back as {"error": why} (a timeout, a kill, an exit status with the
    last line of stderr), so a sweep records it and goes on."""
    try:
        r = subprocess.run([sys.executable, *argv], input=json.dumps(spec), capture_output=True, text=True,
                           timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if r.returncode != 0:
        why = "killed (likely out of memory)" if r.returncode in (-9, 137) else f"exit status {r.returncode}"
        last = (r.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"{why}: {last}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def serve(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The fresh process's side of `run_fresh`: spec JSON on stdin -> fn(spec) -> JSON as the last stdout line."""
    spec = json.loads(sys.stdin.read())
    print(json.dumps(fn(spec)))


@contextmanager
def peak_growth(device: Any = "cpu") -> Iterator[dict[str, int]]:
    """Measure how far a block raises the peak over the memory before it: `with peak_growth() as m: run()`, then
    m["before"], m["peak"] and m["growth"] (bytes). Where the peak cannot be reset, "before" is the peak so far,
    so the growth reads 0 unless the block exceeds every earlier peak of the process."""
    mem = PeakMemory(device)
    mem.reset()
    out = {"before": mem.now() if mem.can_reset else mem.peak()}
    yield out
    out["peak"] = mem.peak()
    out["growth"] = max(out["peak"] - out["before"], 0)
