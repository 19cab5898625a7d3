"""Everything minidit has not measured on hardware, in one process, < 7 minutes on an H100/H200.

    bash bench/gpu_wheels.sh                        # once, on a machine with network: diffusers' wheels -> bench/.wheels
    python bench/gpu.py [--out DIR] [--record]      # on the GPU (no network needed); --out defaults to $OUT
    python bench/gpu.py --record-from DIR           # later, anywhere: record DIR/results.json of a GPU run
    python bench/gpu.py --smoke                     # CPU: the same code path on tiny shapes (run by the tests)

Through this workplace's device tool: run(command="PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT",
carry=["bench/.wheels"], timeout_s=540), then `python bench/gpu.py --record-from <files_at>` here.

Items, in order, each with its own time budget (a failing or late item is reported and the next one runs):
  kernel   correctness of the fused Triton kernel (minidit.kernels.ref_attention; bf16 and fp16 vs fp32 on a
           FLUX shape, masks 100/30/0 %, λ ≠ 1, both mask modes; a failure skips the speed part), then its speed at
           512², 1024², 2048² against SDPA flash and cuDNN (unmasked), SDPA with a float mask and compiled
           FlexAttention: ms, TFLOP/s and % of the device's bf16 peak;
  step     one full-size FLUX.1-dev step at 1024², random bf16 weights made on the GPU, minidit against diffusers'
           FluxTransformer2DModel holding the same weights (converted by minidit's own key plan), eager and
           torch.compile'd, against the FLOP count's physical limit;
  methods  plain generation, Personalize Anything and FreeCus per image at 1024² (random full-size weights);
  memory   peak GPU memory of a 1024² step with and without offload=True.
Before anything runs, diffusers is installed from bench/.wheels when it is missing (and minidit itself, editable,
when this checkout is not installed): see bench/gpu_env.py. --out gets gpu.log (everything printed),
results.json (what --record-from reads) and tables.md; the tables are printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import gpu_env  # noqa: E402

README = BENCH.parent / "README.md"
BUDGETS = {"kernel": 110, "step": 180, "methods": 50, "memory": 45}  # seconds on a GPU: 385 s in all
SMOKE_BUDGET = 300
# Dense bf16 tensor-core TFLOP/s from the vendors' datasheets (no sparsity), matched in order on the device name;
# None: no published figure (the % of peak column stays empty rather than wrong).
BF16_PEAK = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("GH200", 989), ("H200 NVL", 835), ("H200", 989),
             ("H800", 989), ("H20", 148), ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181),
             ("L4", 121), ("A40", 150), ("A10G", None), ("A10", 125), ("RTX 6000 Ada", 364), ("A6000", 155), ("RTX 4090", 165),
             ("RTX 3090", 71)]
SECTION = "GPU run (bench/gpu.py)"
INTRO = """`bench/gpu.py`: one process measuring what had only been reasoned about: the fused kernel's correctness
and speed, a full-size FLUX.1-dev step against diffusers, the methods' cost per image and the memory of a step
with and without offload. Random full-size weights made on the GPU; each table says how it was measured."""


def bf16_peak(name: str) -> float | None:
    return next((tf for key, tf in BF16_PEAK if key.lower() in name.lower()), None)  # first match decides


class Tee:
    """Everything written to stdout/stderr also goes to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()


class ItemTimeout(Exception):
    pass


def run_item(ctx, name: str, fn, table, budget: float) -> None:
    """fn(ctx, table) under a wall-clock budget (SIGALRM); an exception or the budget ends this item only."""
    start = time.perf_counter()
    ctx.left = lambda: budget - (time.perf_counter() - start)

    def over(signum, frame):
        raise ItemTimeout(f"over its {budget:.0f} s budget")
    old = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, budget)
    print(f"\n=== {name} (budget {budget:.0f} s)", flush=True)
    try:
        fn(ctx, table)
    except BaseException as e:  # noqa: BLE001 - one item's failure must not stop the others (Ctrl-C still does)
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc()
        table.status = f"{'TIMEOUT' if isinstance(e, ItemTimeout) else 'FAILED'}: {type(e).__name__}: " \
                       f"{str(e).splitlines()[0][:120] if str(e) else ''}"
        table.readme.append(f"{name}: not measured ({table.status})")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        import gc

        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"=== {name}: {table.status} in {time.perf_counter() - start:.1f} s", flush=True)


def versions() -> dict:
    import torch
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    for mod in ("triton", "diffusers"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = "not installed"
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        v["driver"] = "n/a"
    return v


def measure(args, save) -> dict:
    import torch
    from gpu_items import kernel_item, memory_item, methods_item, step_item
    from gpu_models import Ctx, Table
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.cuda.get_device_name() if cuda else "CPU (smoke run: tiny shapes, triton interpreter; times mean nothing)"
    peak = bf16_peak(device) if cuda else None
    ctx = Ctx(args.smoke, peak)
    print(f"device: {device}; dense bf16 peak {peak or 'unknown'} TFLOP/s; {json.dumps(versions())}", flush=True)
    if cuda:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        from triton.testing import do_bench
        ms = do_bench(lambda: a @ a, warmup=25, rep=200)
        print(f"bf16 matmul 8192³ through torch: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s (the reachable ceiling)")
        del a
    S, dtype = ctx.size, str(ctx.dtype)[6:]
    items = {
        "kernel": (kernel_item, Table("Fused attention kernel", ["shape", "mask", "triton ms", "TFLOP/s", "% peak",
                                                                 "flash ms", "cuDNN ms", "sdpa+mask ms", "flex ms"])),
        "step": (step_item, Table(f"FLUX.1-dev transformer step, {S}², {dtype}", [
            "model", "mode", "ms/step", "TFLOP/s", "% peak", "vs diffusers", "first call s", "output check"])),
        "methods": (methods_item, Table(f"Cost per image at {S}², loop and fixed part", [
            "method", "default steps", "s at {}/{} steps".format(*ctx.method_steps), "ms/step", "fixed s", "s/image", "loop s/image",
            "loop vs plain"])),
        "memory": (memory_item, Table(f"Peak GPU memory (GiB), FLUX.1-dev {S}² step", [
            "mode", "resident", "text encode", "1 step", "VAE decode", "peak"])),
    }
    names = [name for name in items if name in (args.only or items)]  # in order: memory moves the models off
    res = {"device": device, "smoke": args.smoke, "peak_tflops": peak, "versions": versions(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "items": {}}
    for name in names:
        fn, table = items[name]
        run_item(ctx, name, fn, table, SMOKE_BUDGET if args.smoke else BUDGETS[name])
        res["items"][name] = vars(table)
        save(res)  # after every item: a run killed later still leaves what it measured
    return res


def heading(res: dict) -> str:
    v = res["versions"]
    return (f"### {res['device']}, torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, driver {v['driver']}, "
            f"diffusers {v['diffusers']}, {res['date']}" + (" (smoke run)" if res["smoke"] else ""))


def tables(res: dict) -> str:
    from gpu_models import Table
    return "\n\n".join([heading(res)] + [Table(**t).markdown() for t in res["items"].values()]) + "\n"


def record(res: dict, results_md: Path, readme: Path) -> list[str]:
    """Append the tables to results_md's GPU section and put the measured figures in place of the README's
    "Not measured yet" texts. Returns what was done, line by line."""
    import common
    done = []
    kept, common.RESULTS = common.RESULTS, Path(results_md)
    try:
        common.record(SECTION, tables(res), intro=INTRO)
    finally:
        common.RESULTS = kept
    done.append(f"tables appended to {results_md} (## {SECTION})")
    lines = [line for t in res["items"].values() for line in t["readme"]]
    text = readme.read_text()
    stamp = f"{res['device']}, {res['date']}, `python bench/gpu.py`"
    mem = [line for line in res["items"].get("memory", {}).get("readme", []) if "GiB" in line]
    new, n = re.subn(r"Not measured yet\s+\(no GPU lent so far\)", f"Measured peak GPU memory ({stamp}): "
                     + "; ".join(m.split(", ")[-1] for m in mem), text) if len(mem) == 2 else (text, 0)
    done.append("README memory sentence replaced" if n else "README memory sentence: not found or no memory figures")
    section = re.search(r"^## Not measured yet\n.*?(?=^## )", new, flags=re.M | re.S)
    if section and lines:
        body = (f"## Measured on a GPU\n\n{stamp} (all tables in `bench/RESULTS.md`):\n"
                + "".join(f"- {line}\n" for line in lines) + "\n")
        new = new[:section.start()] + body + new[section.end():]
        done.append("README 'Not measured yet' section replaced")
    else:
        done.append("README 'Not measured yet' section: not found (or nothing measured)")
    if new != text:
        readme.write_text(new)
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, triton interpreter: the same code path")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu.log, results.json, tables.md")
    ap.add_argument("--only", nargs="+", choices=list(BUDGETS), help="run only these items")
    ap.add_argument("--record", action="store_true", help="record this run into bench/RESULTS.md and README.md")
    ap.add_argument("--record-from", metavar="DIR", help="record DIR/results.json of an earlier run, measure nothing")
    ap.add_argument("--results", default=str(BENCH / "RESULTS.md"), help=argparse.SUPPRESS)  # tests: copies
    ap.add_argument("--readme", default=str(README), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.record_from:
        res = json.loads((Path(args.record_from) / "results.json").read_text())
    else:
        if gpu_env.ensure() and not os.environ.get("MINIDIT_GPU_ENV_REEXEC"):  # minidit was just installed
            os.environ["MINIDIT_GPU_ENV_REEXEC"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.argv])
        if not args.smoke:
            import torch
            if not torch.cuda.is_available():
                sys.exit("bench/gpu.py: no CUDA device (use --smoke for the CPU run of the same code)")
        out = Path(args.out) if args.out else None
        if out:
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "gpu.log", "a" if os.environ.get("MINIDIT_GPU_ENV_REEXEC") else "w")
            sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
        if gpu_env.ensure() and not os.environ.get("MINIDIT_GPU_ENV_REEXEC"):  # minidit was just installed
            os.environ["MINIDIT_GPU_ENV_REEXEC"] = "1"
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, *sys.argv])
        if not args.smoke:
            import torch
            if not torch.cuda.is_available():
                sys.exit("bench/gpu.py: no CUDA device (use --smoke for the CPU run of the same code)")
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

        def save(res):
            if out:
                (out / "results.json").write_text(json.dumps(res, indent=1))
                (out / "tables.md").write_text(tables(res))
        res = measure(args, save)
        print("\n" + tables(res))
    if args.record or args.record_from:
        real = {Path(args.results).resolve(), Path(args.readme).resolve()} & {(BENCH / "RESULTS.md").resolve(),
                                                                                README.resolve()}
        if res["smoke"] and real:
            sys.exit("bench/gpu.py: a smoke run is not recorded into bench/RESULTS.md or README.md")
        for line in record(res, Path(args.results), Path(args.readme)):
            print(line)


if __name__ == "__main__":
    main()
