"""Peak host memory of loading a transformer checkpoint (streamed from the memory-mapped file).

    python bench/load_memory.py [--hidden 1536] [--depth 8] [--single 16] [--dtype bf16] [--layout diffusers] [--record]
    python bench/load_memory.py --mmap [--record]   # copy-on-load (default) vs MINIDIT_MMAP=1, side by side

Writes a random checkpoint of the given size (BFL single file, or the diffusers `transformer/` folder, whose
q/k/v and MLP-in tensors are fused into BFL's on load), then loads it in a fresh process and reports the
process's peak resident memory (VmHWM) and its anonymous part, next to the file size. Loading must not need
a second full copy: peak anonymous memory ≈ one model (the loaded weights) + one tensor. File pages read
through the memory map show up as file-backed RSS (page cache, reclaimable), so they are reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from minidit.flux_loading import load_transformer
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) * 1024
    return d
before = status()
t0 = time.perf_counter()
m = load_transformer(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
after = status()
load_s = time.perf_counter() - t0
with torch.no_grad():
    for p in m.parameters():
        p.float().sum()  # touch every weight page once
touched = status()
n = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"before": before, "after": after, "touched": touched, "model_bytes": n, "load_s": load_s}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--single", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="stored dtype")
    ap.add_argument("--compute", default=None, choices=["bfloat16", "float32", "float16"], help="load into (default: stored)")
    ap.add_argument("--mmap", action="store_true", help="compare the default copy-on-load with MINIDIT_MMAP=1 "
                    "(weights kept as views of the mapped file), same checkpoint, one run")
    ap.add_argument("--layout", default="bfl", choices=["bfl", "diffusers"])
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    a = ap.parse_args()

    import torch
    from minidit.transformer import FluxConfig
    from minidit.weights.tiny_flux import write_tiny_flux
    hd = a.hidden // a.heads
    axes = (hd // 8, (hd - hd // 8) // 2, hd - hd // 8 - (hd - hd // 8) // 2)
    cfg = FluxConfig(hidden_size=a.hidden, num_heads=a.heads, depth=a.depth, depth_single_blocks=a.single,
                     axes_dim=axes)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("flux1-bench.safetensors" if a.layout == "bfl" else "transformer")
        write_tiny_flux(path, cfg, dtype=getattr(torch, a.dtype), layout=a.layout)
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.glob("*.safetensors")))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if a.mmap:
            return compare_mmap(a, path, size, env)
        r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path), a.compute or a.dtype], capture_output=True,
                                      text=True, check=True, env=env).stdout)
    gib = lambda b: b / 2**30  # noqa: E731
    base = r["before"]["VmHWM"]
    rows = [
        ("checkpoint file", gib(size)),
        ("loaded model (parameters)", gib(r["model_bytes"])),
        ("peak RSS during load, above interpreter start", gib(r["after"]["VmHWM"] - base)),
        ("anonymous RSS after load, above start", gib(r["after"]["RssAnon"] - r["before"]["RssAnon"])),
        ("peak RSS after touching every weight, above start", gib(r["touched"]["VmHWM"] - base)),
        ("  of which anonymous (private copies)", gib(r["touched"]["RssAnon"] - r["before"]["RssAnon"])),
        ("  of which file-backed (mmap page cache)", gib(r["touched"]["RssFile"] - r["before"]["RssFile"])),
    ]
    print(f"device: CPU (host memory), {a.layout} layout, stored {a.dtype} -> compute {a.compute or a.dtype}, {cfg.hidden_size} wide, {cfg.depth}+{cfg.depth_single_blocks} blocks")
    for name, v in rows:
        print(f"  {name:<48} {v:7.2f} GiB")
    ratio = (r["touched"]["VmHWM"] - base) / r["model_bytes"]
    print(f"  peak RSS / loaded model size: {ratio:.2f}x (a naive load_file + load_state_dict holds two copies: >= 2x)")
    if a.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import record
        table = "\n".join(f"| {name} | {v:.2f} |" for name, v in rows)
        record("Loading memory (bench/load_memory.py)",
               f"### Transformer loading, host memory ({a.layout} layout, stored {a.dtype} -> {a.compute or a.dtype}, "
               f"{size / 2**30:.2f} GiB file)\n\n| quantity | GiB |\n|---|---|\n{table}\n"
               f"| peak RSS / loaded model size | {ratio:.2f}x |")


def compare_mmap(a, path: Path, size: int, env: dict) -> None:
    """The memory price of owning the weights (safe if the file changes later) vs keeping the mapping."""
    runs = {}
    for name, keep in (("mapped (MINIDIT_MMAP=1)", "1"), ("copied (default)", "0")):
        runs[name] = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path), a.compute or a.dtype],
                                               capture_output=True, text=True, check=True,
                                               env=dict(env, MINIDIT_MMAP=keep)).stdout)
    gib = lambda b: b / 2**30  # noqa: E731
    q = {
        "load time (s)": lambda r: r["load_s"],
        "peak RSS after touching every weight, above start (GiB)": lambda r: gib(r["touched"]["VmHWM"] - r["before"]["VmHWM"]),
        "anonymous RSS (private copies, GiB)": lambda r: gib(r["touched"]["RssAnon"] - r["before"]["RssAnon"]),
        "file-backed RSS (page cache, GiB)": lambda r: gib(r["touched"]["RssFile"] - r["before"]["RssFile"]),
    }
    (base_name, base), (our_name, ours) = runs.items()
    head = f"| quantity | {base_name} | {our_name} | ratio |\n|---|---|---|---|"
    rows = "\n".join(f"| {k} | {f(base):.2f} | {f(ours):.2f} | {f(ours) / max(f(base), 1e-9):.2f}x |" for k, f in q.items())
    title = (f"### Copy on load vs keeping the mapping (CPU, stored {a.dtype} -> {a.compute or a.dtype}, "
             f"{size / 2**30:.2f} GiB file)")
    print(title + "\n\n" + head + "\n" + rows)
    if a.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import record
        record("Loading memory (bench/load_memory.py)", title + "\n\n" + head + "\n" + rows + "\n\nCopied weights "
               "are private memory the kernel cannot drop; mapped ones are page cache, but change (or SIGBUS) if the "
               "file is rewritten or truncated after loading, so the copy is the default.")


if __name__ == "__main__":
    main()
