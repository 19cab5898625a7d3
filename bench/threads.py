"""CPU threads: where torch's multi-threading pays, for the built-in model and a full-width FLUX.1 with few blocks.

    python bench/threads.py [--threads 1 2] [--repeats 3] [--size 512] [--record]

Cases (each timed in its own process per thread count, torch.set_num_threads(N) before any work, the processes
for the thread counts alternated round-robin so that a change in machine load hits all alike; one warm-up call
per process before the timed ones):
  builtin    Pipeline.load() (the built-in tiny model) then `pipe.generate(PROMPT, seed=1)` with the model's
             defaults: 256 x 256, 28 steps, true CFG 4 (two forwards per step), decode included.
  full-width one transformer forward of FLUX.1's width (3072, 24 heads, 1 double + 2 single blocks, random fp32
             weights) at --size² pixels with 512 text tokens: the per-block work of a real CPU run.
Prints (and with --record writes to bench/RESULTS.md) the min / median seconds per thread count, the ratio of
medians against 1 thread, the machine's load average before and after, and the CPU count.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

PROMPT = "a large red striped circle in the centre, on a blue background"


def child(case: str, threads: int, repeats: int, size: int) -> None:
    import torch
    torch.set_num_threads(threads)
    if case == "builtin":
        from minidit import Pipeline
        pipe = Pipeline.load(device="cpu")
        call = lambda: pipe.generate(PROMPT, seed=1)  # noqa: E731
    else:
        from minidit.transformer import Flux, FluxConfig
        from step import model_calls
        cfg = FluxConfig(depth=1, depth_single_blocks=2)
        with torch.device("meta"):
            model = Flux(cfg)
        model = model.to_empty(device="cpu").eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith(".scale") else p.normal_(0, 0.02, generator=g)
        run, _, _ = model_calls(model, None, cfg, size, 512, "cpu", torch.float32, g)
        call = lambda: run()  # noqa: E731
    times = []
    with torch.no_grad():
        call()  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per (case, threads), alternated")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cases", nargs="+", default=["builtin", "full-width"])
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]), int(a.child[3]))
        return
    load0 = os.getloadavg()
    rows = []
    for case in a.cases:
        times = {n: [] for n in a.threads}
        for _ in range(a.rounds):
            for n in a.threads:
                env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
                out = subprocess.run([sys.executable, __file__, "--child", case, str(n), str(a.repeats), str(a.size)],
                                     capture_output=True, text=True, env=env, check=True).stdout
                times[n] += json.loads(out.strip().splitlines()[-1])
                print(case, n, times[n], file=sys.stderr, flush=True)
        base = statistics.median(times[a.threads[0]])
        for n in a.threads:
            med = statistics.median(times[n])
            rows.append(f"| {case} | {n} | {min(times[n]):.2f} / {med:.2f} | {med / base:.2f}x |")
    load1 = os.getloadavg()
    import torch
    table = "\n".join([
        f"### CPU, {os.cpu_count()} CPUs, torch {torch.__version__}; load average {load0[0]:.1f} before, "
        f"{load1[0]:.1f} after; full-width at {a.size}² + 512 text tokens, fp32",
        "", "| case | threads | s min / med | time vs 1 thread (medians) |", "|---|---|---|---|", *rows])
    print(table)
    if a.record:
        record("CPU threads (bench/threads.py)", table,
               intro="`python bench/threads.py --record`: seconds per call with N torch threads, each thread count "
               "in its own processes, alternated. builtin = `Pipeline.load().generate(prompt, seed=1)` (256², 28 "
               "steps, true CFG 4); full-width = one forward of a FLUX.1-width transformer with 1 double + 2 "
               "single blocks.")


if __name__ == "__main__":
    main()
