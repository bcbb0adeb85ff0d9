"""Shared CPU benchmark harness: time and peak extra memory, one subprocess a measurement.

A benchmark script defines ``RUNNERS``: name → ``make(n, params) -> (inputs, run)``,
where ``inputs()`` allocates the problem and ``run(*inputs)`` computes it, then calls
:func:`main`. Each (runner, length) pair runs in a fresh Python subprocess so that
allocator caches and earlier peaks of one measurement cannot hide or inflate another.

Memory: the child runs the op once on a small problem (library and thread-pool
start-up), allocates the inputs, resets the kernel's resident-set high-water mark
(``echo 5 > /proc/self/clear_refs``), reads the resident set size, runs the op once,
and reports ``VmHWM - VmRSS_before`` from ``/proc/self/status``: the peak growth of
resident memory during the call, output included (Linux). Where ``clear_refs``
cannot be written it falls back to ``ru_maxrss`` growth, a lower bound, marked ``*``.

Time: after one warm-up call, the median (``--stat min``: the fastest) of
``--repeats`` calls timed with ``time.perf_counter``, default thread count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

Runner = Callable[[int, dict], tuple[Callable[[], tuple], Callable[..., Any]]]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(runners: dict[str, Runner], name: str, n: int, params: dict, repeats: int, stat: str):
    import torch

    with torch.no_grad():
        small_inputs, small_run = runners[name](min(n, 512), params)
        small_run(*small_inputs())  # one-time initialisation, not measured
        inputs, run = runners[name](n, params)
        args = inputs()
        exact = _reset_peak()
        before_rss = _status_kib("VmRSS")
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = run(*args)
        if exact:
            peak_kib = _status_kib("VmHWM") - before_rss
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(
                before_max, before_rss
            )
        del out
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(*args)
            times.append(time.perf_counter() - t0)
    pick = min if stat == "min" else statistics.median
    return {"ms": pick(times) * 1e3, "peak_mib": max(peak_kib, 0) / 1024, "exact_peak": exact}


def measure(script: str, name: str, n: int, params: dict, repeats: int, stat: str) -> dict:
    """Run one measurement of ``script``'s runner ``name`` at length ``n`` in a subprocess."""
    cmd = [
        sys.executable,
        script,
        "--child",
        name,
        "--n",
        str(n),
        "--params",
        json.dumps(params),
        "--repeats",
        str(repeats),
        "--stat",
        stat,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {name} at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_entry(runners: dict[str, Runner]) -> bool:
    """If this process is a measurement child, run it, print JSON and return True."""
    if "--child" not in sys.argv:
        return False
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--n", type=int)
    parser.add_argument("--params")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--stat")
    a, _ = parser.parse_known_args()
    result = _child(runners, a.child, a.n, json.loads(a.params), a.repeats, a.stat)
    print(json.dumps(result))
    return True


def relative_error(actual, expected) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64."""
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm())


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` = [(key, header)]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def load_script(path: str):
    """Import a benchmark script as a module (for tests that check runners are correct)."""
    spec = importlib.util.spec_from_file_location("bench_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
