"""Transformer forward on CPU, full width (3072, 24 heads) with few blocks: minidit vs diffusers, same weights.

    python bench/step_cpu.py [--sizes 256 512] [--dtypes float32 bfloat16] [--txt 512] [--double 1] [--single 2]
                             [--repeats 3] [--record]

Per (size, dtype), smallest first, each case complete before the next (with --record, the table is recorded after
every case): time of one forward (min / median of `--repeats` alternated calls after one warm-up each, the warm-up
calls being the ones whose outputs are compared; both models in one process on the same random weights,
diffusers' own BFL->diffusers converter), the max abs output difference (and the max abs output), and the
activation memory of one forward above the weights and inputs, each model in a fresh process:
  live peak   exact: the most bytes held at once by tensors created during the forward (a dispatch mode counts
              every op's new storage and a finalizer subtracts it when it is freed);
  RSS peak    the process's resident high-water mark (VmHWM, reset just before the forward) above its resident
              size before it; glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that freed blocks go back.
Under no_grad; SDPA on both sides. Times on a shared 2-core machine are noisy (ratio of medians).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, record  # noqa: E402
from step import model_calls, random_models  # noqa: E402


class LivePeak(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while the mode is active, until that storage is freed;
    `peak` is the most held at once. Tensors made before the mode (weights, inputs) and views of them do not count."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key, n = s.data_ptr(), s.nbytes()
                if n and key not in self.seen and key not in inputs:  # not a view / in-place result of an input
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, key, n)
        return out


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peaks(fn) -> dict:
    """Activation memory of fn() in this process: the RSS high-water mark of one call above the resident size
    before it, then the exact live-tensor peak (LivePeak) of a second call."""
    with torch.no_grad():
        rss = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        fn()
        hwm = _status("VmHWM")
        with LivePeak() as m:
            fn()
    return {"live": m.peak, "rss": hwm - rss}


def fresh_process(cmd: list[str]) -> dict:
    """Run a `--child` command (which prints `peaks` as JSON) in a fresh process; glibc's mmap threshold fixed so
    that freed blocks go back to the system."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def config(a):
    from minidit.transformer import FluxConfig
    return FluxConfig(depth=a.double, depth_single_blocks=a.single)


def child(a) -> None:
    """One model, one case, in this (fresh) process: print its memory figures as JSON."""
    dtype = getattr(torch, a.dtype)
    ours, theirs = random_models(config(a), "cpu", dtype)
    if a.child == "minidit":
        theirs = None
    else:
        ours = None
    run_ours, run_theirs, _ = model_calls(ours, theirs, config(a), a.size, a.txt, "cpu", dtype,
                                          torch.Generator().manual_seed(1))
    print(json.dumps(peaks(run_ours or run_theirs)))


def memory(a, size: int, dtype: str, model: str) -> dict:
    return fresh_process([sys.executable, __file__, "--child", model, "--size", str(size), "--dtype", dtype,
                          "--txt", str(a.txt), "--double", str(a.double), "--single", str(a.single)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="memory only")
    ap.add_argument("--record", action="store_true", help="record the table in bench/RESULTS.md after every case")
    ap.add_argument("--child", choices=["minidit", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    mib = 2 ** 20
    threads = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # smallest cases first, one complete row (memory, time, difference) per case: a run stopped early still
    # leaves complete rows, recorded as they finish
    cases = sorted(((size, dtype) for size in a.sizes for dtype in a.dtypes), key=lambda c: (c[0], c[1] != "float32"))
    header = (f"{started}, CPU ({threads} threads, machine shared with a training job), torch {torch.__version__}, "
              f"full width 3072 / 24 heads, {a.double} double + {a.single} single blocks, {a.txt} text tokens, "
              f"batch 1, no_grad, {a.repeats} timed calls each")
    rows = []
    print(header)
    print(HEADER, flush=True)
    for size, dtype in cases:
        mem = {m: memory(a, size, dtype, m) for m in ("diffusers", "minidit")}
        row = dict(size=size, dtype=dtype, mem=mem)
        if not a.no_time:
            ours, theirs = random_models(config(a), "cpu", getattr(torch, dtype))
            run_ours, run_theirs, N = model_calls(ours, theirs, config(a), size, a.txt, "cpu",
                                                  getattr(torch, dtype), torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = run_theirs().float()  # these two calls are also the warm-up of each
                row["diff"] = (run_ours().float() - ref).abs().max().item()
                row["scale"] = ref.abs().max().item()
                del ref

                def log(i, t_theirs, t_ours):
                    print(f"  {size}² {dtype} call {i + 1}/{a.repeats}: diffusers {t_theirs:.1f} s, "
                          f"minidit {t_ours:.1f} s", file=sys.stderr, flush=True)
                row["t_theirs"], row["t_ours"] = alternate(run_theirs, run_ours, a.repeats, cuda=False,
                                                           warmup=False, log=log)
            del ours, theirs, run_ours, run_theirs
        rows.append(row)
        print(format_row(row, mib), flush=True)
        if a.record:
            done = "" if len(rows) == len(cases) else f" — {len(rows)} of {len(cases)} cases so far"
            table = "\n".join(format_row(r, mib) for r in rows)
            record("Transformer forward on CPU: time and activation memory (bench/step_cpu.py)",
                   f"### {header}{done}\n\n{HEADER}\n{table}", replace=f"### {started},",
                   intro="`python bench/step_cpu.py --record`: minidit vs diffusers 0.42.1 `FluxTransformer2DModel`, "
                         "same random weights. Memory above the weights and inputs, each model in a fresh process: "
                         "exact live-tensor peak and RSS high-water mark; time min / median of alternated calls.")


HEADER = ("| size | dtype | live peak MiB diffusers / minidit (ratio) | RSS peak MiB diffusers / minidit (ratio) "
          "| ms diffusers min / med | ms minidit min / med | time ratio (medians) | max abs diff (max abs output) |\n"
          "|---|---|---|---|---|---|---|---|")


def format_row(r, mib) -> str:
    d, o = r["mem"]["diffusers"], r["mem"]["minidit"]
    cells = [f"{r['size']}²", r["dtype"], f"{d['live'] / mib:.0f} / {o['live'] / mib:.0f} ({o['live'] / d['live']:.2f}x)",
             f"{d['rss'] / mib:.0f} / {o['rss'] / mib:.0f} ({o['rss'] / max(d['rss'], 1):.2f}x)"]
    if "t_ours" in r:
        mt, mo = statistics.median(r["t_theirs"]), statistics.median(r["t_ours"])
        cells += [f"{min(r['t_theirs']) * 1e3:.0f} / {mt * 1e3:.0f}", f"{min(r['t_ours']) * 1e3:.0f} / {mo * 1e3:.0f}",
                  f"{mo / mt:.3f}x", f"{r['diff']:.2e} ({r['scale']:.3g})"]
    else:
        cells += ["-"] * 4
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
