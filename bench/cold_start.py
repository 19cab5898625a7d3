"""Cold start: the wall time of a whole `minidit generate` process vs an equivalent diffusers script, on CPU.

    python bench/cold_start.py [--repeats 3] [--steps 2] [--size 256] [--record]

Two checkpoints: a tiny random FLUX.1-dev repository (minidit.weights.tiny.write_tiny_repo, both layouts) and the
built-in trained tiny model (minidit.repository.builtin_repo(), a FLUX.1-schnell repository; minidit's CLI uses
it when no --weights is given). Each process, from interpreter start to exit:
  minidit    `python -m minidit generate [--weights REPO] --prompt P --steps S --width W --height W --seed 0
             --output OUT.png --quiet` (for the built-in model without --weights, so the CLI applies its own
             defaults: its minidit.json, true CFG 4 with the empty negative prompt)
  diffusers  FluxPipeline.from_pretrained(REPO, dtype=float32), the same prompt, size, steps, guidance 3.5,
             generator seeded 0, max_sequence_length as minidit uses it (512 for the random dev repository, 48 =
             the trained tokenizer's model_max_length for the built-in one, which also gets negative_prompt "" and
             true_cfg_scale 4), .images[0].save(OUT.png)
Both run through this file as a thin wrapper (`--child`) that imports nothing before calling the CLI's main /
the diffusers code, then, after the PNG is written, reports whether `torch._dynamo` is in sys.modules.
Processes alternate (diffusers, minidit, ...) after one untimed run each (so both read the files from the page
cache); min / median of `--repeats` each. The max abs difference of the two PNGs (0-255) shows the two commands
draw the same picture. Times on a shared 2-core machine are noisy (ratio of medians).
"""
from __future__ import annotations

import sys


def child(kind: str, argv: list[str]) -> None:
    """Run one process's work here, then print whether torch._dynamo was imported (last stdout line)."""
    if kind == "minidit":
        from minidit.cli import main
        main(argv)
    else:
        import json
        kw = json.loads(argv[0])
        import torch
        from diffusers import FluxPipeline
        pipe = FluxPipeline.from_pretrained(kw.pop("repo"), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out = kw.pop("output")
        pipe(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), **kw).images[0].save(out)
    print(f"DYNAMO {'torch._dynamo' in sys.modules}", flush=True)


def main() -> None:
    import argparse
    import datetime
    import json
    import os
    import statistics
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prompt", default="a large red striped circle in the centre, on a blue background")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from minidit.defaults import ModelDefaults
    from minidit.repository import builtin_repo
    from minidit.weights.tiny import write_tiny_repo

    builtin = ModelDefaults.read(builtin_repo())  # its minidit.json: what the CLI uses it with
    tmp = Path(tempfile.mkdtemp(prefix="cold_start-"))
    random_repo = write_tiny_repo(tmp / "FLUX.1-dev", "dev", seed=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    me = str(Path(__file__).resolve())
    base = ["--prompt", a.prompt, "--steps", str(a.steps), "--width", str(a.size), "--height", str(a.size),
            "--seed", "0", "--quiet"]
    common = dict(prompt=a.prompt, height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=3.5,
                  seed=0)
    cases = [
        ("tiny random FLUX.1-dev (write_tiny_repo)", ["--weights", str(random_repo)],
         dict(common, repo=str(random_repo), max_sequence_length=512)),
        ("built-in trained tiny (schnell, no --weights)", [],
         dict(common, repo=str(builtin_repo()), max_sequence_length=48,
              negative_prompt=builtin.negative_prompt, true_cfg_scale=builtin.true_cfg_scale)),
    ]
    n = 0

    def run(kind: str, weights: list[str], kw: dict) -> tuple[float, bool, Path]:
        nonlocal n
        n += 1
        out = tmp / f"{kind}-{n}.png"
        if kind == "minidit":
            cmd = [sys.executable, me, "--child", kind, "generate", *weights, *base, "--output", str(out)]
        else:
            cmd = [sys.executable, me, "--child", kind, json.dumps(dict(kw, output=str(out)))]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if r.returncode or not out.is_file():
            raise SystemExit(f"{kind} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        dyn = r.stdout.strip().splitlines()[-1] == "DYNAMO True"
        print(f"  {kind}: {dt:.2f} s, torch._dynamo imported: {dyn}", file=sys.stderr, flush=True)
        return dt, dyn, out

    rows = []
    for name, weights, kw in cases:
        run("diffusers", weights, kw), run("minidit", weights, kw)  # untimed: page cache, .pyc files
        t = {"diffusers": [], "minidit": []}
        dyn = {"diffusers": set(), "minidit": set()}
        outs = {}
        for _ in range(a.repeats):
            for kind in ("diffusers", "minidit"):
                dt, d, outs[kind] = run(kind, weights, kw)
                t[kind].append(dt)
                dyn[kind].add(d)
        px = np.abs(np.asarray(Image.open(outs["minidit"]), dtype=np.int16)
                    - np.asarray(Image.open(outs["diffusers"]).convert("RGB"), dtype=np.int16)).max()
        rows.append(dict(name=name, t=t, dyn=dyn, px=int(px)))

    def yn(s: set) -> str:
        return "/".join("yes" if d else "no" for d in sorted(s))

    lines = [f"| {r['name']} | {min(r['t']['diffusers']):.2f} / {statistics.median(r['t']['diffusers']):.2f} "
             f"| {min(r['t']['minidit']):.2f} / {statistics.median(r['t']['minidit']):.2f} "
             f"| {statistics.median(r['t']['minidit']) / statistics.median(r['t']['diffusers']):.3f}x "
             f"| {yn(r['dyn']['diffusers'])} | {yn(r['dyn']['minidit'])} | {r['px']} |" for r in rows]
    table = HEADER + "\n" + "\n".join(lines)
    head = (f"{datetime.date.today()}, device CPU ({torch.get_num_threads()} threads, machine shared with a training "
            f"job), torch {torch.__version__}, {a.size}², {a.steps} steps, fp32, {a.repeats} alternated processes "
            f"each after one untimed run each")
    print(head)
    print(table)
    if a.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import record
        record("Cold start (bench/cold_start.py)", f"### {head}\n\n{table}", intro=INTRO)


HEADER = ("| checkpoint | diffusers 0.42.1 s min / med (baseline) | minidit s min / med | ratio (medians) "
          "| torch._dynamo imported: diffusers | torch._dynamo imported: minidit | max abs PNG diff (0-255) |\n"
          "|---|---|---|---|---|---|---|")

INTRO = ("`python bench/cold_start.py --record`: wall time of a whole process, interpreter start to exit, that "
         "writes one PNG: `python -m minidit generate ...` vs a script doing `FluxPipeline.from_pretrained(...)(...)"
         ".images[0].save(...)` with the same prompt, size, steps, guidance, seed and (for the built-in model) true "
         "CFG 4 with the empty negative prompt, max_sequence_length as minidit's. \"torch._dynamo imported\": whether "
         "`torch._dynamo` was in `sys.modules` once the PNG was written.")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.pop(0)  # bench/ (its step.py, common.py, ...) is not on the path of the process measured
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
