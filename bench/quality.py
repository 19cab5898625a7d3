"""What the built-in tiny FLUX.1 does, measured against the procedural world's ground truth (weights/quality.py,
quality_methods.py).

    python bench/quality.py                      # the built-in trained model, every row, ~10-20 min on 2 CPU cores
    python bench/quality.py --n 4 --only t2i     # a quick look
    python bench/quality.py --record             # + the table into bench/RESULTS.md
    python bench/quality.py --grids docs         # + one picture grid per method: reference | mask | plain | method,
                                                 #   and the τ sweep: reference | mask | τ = 0 ... 1

Every row is computed from fixed seeds on evaluation scenes drawn from a stream disjoint from the training one.
"""
from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from minidit.pipeline import Pipeline  # noqa: E402
from minidit.weights import quality as Q  # noqa: E402
from minidit.weights import quality_methods as M  # noqa: E402
from minidit.weights import world  # noqa: E402


def t2i_rows(pipe, n, steps):
    r = Q.t2i(pipe, n=n, steps=steps)
    rows = [("text-to-image", "generated: colour / shape / position / background",
             f"{r['colour']:.2f} / {r['shape']:.2f} / {r['position']:.2f} / {r['background']:.2f}"),
            ("text-to-image", "the renderer's own images (detector ceiling)",
             f"{r['colour_renderer']:.2f} / {r['shape_renderer']:.2f} / {r['position_renderer']:.2f} / "
             f"{r['background_renderer']:.2f}"),
            ("text-to-image", "the renders through the model's autoencoder (the model's ceiling)",
             " / ".join(f"{r[k + '_autoencoder']:.2f}" for k in ("colour", "shape", "position", "background"))),
            ("text-to-image", "chance",
             " / ".join(f"{Q.CHANCE[k]:.2f}" for k in ("colour", "shape", "position", "background")))]
    o = Q.one_prompt(pipe)
    rows.append(("text-to-image", f"the README's prompt \"{world.caption(Q.README_SCENE)}\", 16 seeds, the CLI's "
                 "defaults: colour / shape / position / background; all four",
                 f"{o['colour']:.2f} / {o['shape']:.2f} / {o['position']:.2f} / {o['background']:.2f}; {o['all']:.2f}"))
    x = Q.text_locality(pipe)
    rows.append(("text encoder", "one colour word changed (red -> green): relative change of the other tokens' "
                 "T5 features before / after it; cosine after", f"{x['before']:.2f} / {x['after']:.2f}; "
                 f"{x['cosine_after']:.2f}"))
    rows.append(("text encoder", "object and background colours swapped: mean relative change of each token's T5 "
                 "features (0: a bag of words, the swap invisible to the DiT)", f"{Q.text_order(pipe):.2f}"))
    return rows


def ae_rows(pipe, n, steps):
    r = Q.autoencoder(pipe, n=n)
    return [("autoencoder", "round trip of held-out renders: PSNR dB, scenes of the whole world / single-object flat "
             "scenes; the object's colour named right", f"{r['psnr']:.1f} / {r['psnr_single']:.1f}; {r['colour']:.2f}"),
            ("autoencoder", "round trip of flat palette colours, error in levels (worst colour): grid-locked pattern "
             "/ border frame / colour offset", f"{r['grid']:.2f} / {r['frame']:.2f} / {r['offset']:.1f}")]


def personalize_rows(pipe, n, steps):
    rows = []
    for mode in ("in place", "offset", "multi", "scene"):
        r = M.personalize(pipe, n=n, mode=mode, steps=steps)
        rows.append((f"personalize ({mode})", "subject PSNR dB: method / plain same caption",
                     f"{r['psnr']:.1f} / {r['psnr_plain']:.1f}"))
        if mode == "scene":
            rows.append(("personalize (scene)", "scene PSNR outside the subject, dB", f"{r['scene_psnr']:.1f}"))
        else:
            rows.append((f"personalize ({mode})", "background as prompted: method / plain",
                         f"{r['background']:.2f} / {r['background_plain']:.2f}"))
    r = M.personalize(pipe, n=n, steps=steps, preset="official")
    rows.append(("personalize (in place), preset \"official\"", "the released code's settings (τ 0.5 on the shifted "
                 "time, no perturbation, no concatenation): subject PSNR dB, method / plain same caption",
                 f"{r['psnr']:.1f} / {r['psnr_plain']:.1f}"))
    for mode, preset in (("in place", "paper"), ("offset", "paper"), ("in place", "official")):
        r = M.personalize(pipe, n=n, mode=mode, steps=steps, preset=preset, shape_only=True)
        rows.append((f"personalize ({mode}), the prompt names only the subject's shape", f"preset \"{preset}\": "
                     "subject PSNR dB, method / plain same prompt", f"{r['psnr']:.1f} / {r['psnr_plain']:.1f}"))
    sweep = {tau: M.personalize(pipe, n=n, steps=steps, preset="paper", tau=tau, perturb=False) for tau in TAUS}
    rows.append(("personalize (in place), subject reconstruction (the paper's Fig. 2)", "tokens replaced at every "
                 "step (τ = 0, no perturbation): subject PSNR dB against the reference's own autoencoder round trip "
                 "/ against the render", f"{sweep[0.0]['psnr_trip']:.1f} / {sweep[0.0]['psnr']:.1f}"))
    rows.append(("personalize (in place), τ sweep (the paper's Table 3)", "τ = " + " / ".join(f"{t:g}" for t in TAUS)
                 + " (no perturbation; 1: never replaced): subject PSNR dB against the round trip; background as "
                 "prompted", " / ".join(f"{sweep[t]['psnr_trip']:.1f}" for t in TAUS) + "; "
                 + " / ".join(f"{sweep[t]['background']:.2f}" for t in TAUS)))
    return rows


def edit_rows(pipe, n, steps):
    a, b = M.inpaint(pipe, n=n, steps=steps), M.outpaint(pipe, n=n, steps=steps)
    return [("inpaint", "PSNR kept region dB / new object's colour as prompted",
             f"{a['psnr_kept']:.1f} / {a['colour']:.2f}"),
            ("outpaint", "PSNR pasted image dB / new border's colour as prompted",
             f"{b['psnr_kept']:.1f} / {b['background']:.2f}")]


def freecus_rows(pipe, n, steps):
    variants = [("plain generation", dict(plain=True, caption=False)),
                ("plain generation + caption", dict(plain=True)),
                ("FreeCus", {}),
                ("FreeCus, no caption", dict(caption=False)),
                ("FreeCus, no ANS", dict(mu_shift_type="target")),
                ("FreeCus, λ = 1", dict(lambda_ref=1.0, lambda_prompt=1.0))]
    rows = []
    for name, kw in variants:
        r = M.freecus(pipe, n=n, steps=steps, **kw)
        rows.append(("FreeCus", f"{name}: reference colour / aligned PSNR dB / background",
                     f"{r['colour']:.2f} / {r['psnr_aligned']:.1f} / {r['background']:.2f}"))
    return rows


def time_row(pipe, steps):
    kw = Q.cfg_kwargs(pipe, 4.0)
    pipe.generate("a red circle on the left, on a blue background", height=256, width=256, steps=steps, **kw)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        pipe.generate("a red circle on the left, on a blue background", height=256, width=256, steps=steps,
                      seed=i, **kw)
        times.append(time.perf_counter() - t0)
    return [("time", f"one 256x256 image, {steps or 28} steps, true CFG, {torch.get_num_threads()} threads",
             f"{np.median(times):.2f} s (median of 3)")]


TAUS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # the τ sweep: replacement during the first (1 - τ) of the steps
SECTIONS = {"ae": ae_rows, "t2i": t2i_rows, "personalize": personalize_rows, "edit": edit_rows, "freecus": freecus_rows}


def grids(pipe, folder: Path, steps) -> list[Path]:
    """One image per method: reference | mask | plain generation | method (same prompt and seed); inpainting
    shows the input where the others show plain generation, outpainting the pasted crop and its kept area; the τ
    sweep: reference | mask | Personalize Anything at each of TAUS (preset paper without perturbation)."""
    from PIL import Image

    from minidit.masks import Reference
    folder.mkdir(parents=True, exist_ok=True)
    s = Q.eval_scenes(1, 7, textured=True)[0]
    ref, mask = world.render(s, Q.SIZE), M.subject_mask(s)
    mask_im = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    target = M.new_background(s, random.Random(0))
    prompt = M.shape_prompt(target)  # the subject named by its shape only, as the test's (quality_methods.personalize)
    plain = pipe.generate(prompt, height=256, width=256, steps=steps, seed=0, **Q.cfg_kwargs(pipe, 4.0))[0]
    pa = pipe.personalize(prompt, Reference(ref, M.mask_tensor(mask)), height=256, width=256, steps=steps, seed=0,
                          preset="official")[0]  # the released code's settings: what the test holds the model to
    p = s.objects[0]
    dx, dy = M.offset_for(p)
    moved = M.new_background(M.moved_scene(s, dx, dy), random.Random(1))
    fprompt = M.shape_prompt(moved)
    cap = world.describe(world.Placed(p.subject, "", "", 0, 0)).replace("  ", " ").strip()
    fplain = pipe.generate(fprompt, height=256, width=256, steps=steps, seed=0, **Q.cfg_kwargs(pipe, 4.0))[0]
    fc = pipe.freecus(fprompt, Reference(ref, M.mask_tensor(mask)), caption=cap, height=256, width=256,
                      steps=steps, seed=0)[0]
    full = world.render(s, Q.SIZE)
    box = (48, 48, 160, 160)
    inp_target = world.moved(s, 0, subject=world.Subject(p.subject.shape, "white" if p.subject.colour != "white" else "red"))
    inp = pipe.inpaint(full, box, world.caption(inp_target), steps=steps, seed=0)[0]
    box_im = Image.new("RGB", (256, 256))
    box_im.paste((255, 255, 255), box[:2] + (box[0] + box[2], box[1] + box[3]))
    centred = world.moved(s, 0, cx=0.5, cy=0.5, position="in the centre", size="small")
    crop = world.render(centred, Q.SIZE).crop((64, 64, 192, 192))
    canvas, kept = Image.new("RGB", (256, 256)), Image.new("RGB", (256, 256))
    canvas.paste(crop, (64, 64)), kept.paste((255, 255, 255), (64, 64, 192, 192))
    oplain = pipe.generate(world.caption(centred), height=256, width=256, steps=steps, seed=0,
                           **Q.cfg_kwargs(pipe, 4.0))[0]
    outp = pipe.outpaint(crop, world.caption(centred), (256, 256), steps=steps, seed=0)[0]
    sweep = [pipe.personalize(prompt, Reference(ref, M.mask_tensor(mask)), height=256, width=256, steps=steps,
                              seed=0, preset="paper", tau=tau, perturb=False)[0] for tau in TAUS]
    rows = {"personalize": [ref, mask_im, plain, pa], "freecus": [ref, mask_im, fplain, fc],
            "inpaint": [full, box_im, full, inp], "outpaint": [canvas, kept, oplain, outp],
            "tau_sweep": [ref, mask_im] + sweep}
    out = []
    for name, ims in rows.items():
        g = Image.new("RGB", (256 * len(ims), 256))
        for i, im in enumerate(ims):
            g.paste(im.convert("RGB").resize((256, 256)), (256 * i, 0))
        path = folder / f"{name}.png"
        g.save(path)
        out.append(path)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="default: the built-in trained tiny model")
    ap.add_argument("--n", type=int, default=16, help="evaluation scenes per row")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--grids", default=None, help="folder for the picture grids")
    args = ap.parse_args(argv)
    pipe = Pipeline.load(args.weights, device="cpu")
    rows = []
    for name, fn in SECTIONS.items():
        if args.only is None or name in args.only:
            t0 = time.time()
            rows += fn(pipe, args.n, args.steps)
            print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    rows += time_row(pipe, args.steps)
    head = (f"### {pipe.name}, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, n = {args.n} scenes per row\n\n"
            f"command: `python bench/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            "| task | measure | value |\n|---|---|---|\n")
    table = head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(table)
    if args.grids:
        for p in grids(pipe, Path(args.grids), args.steps):
            print(f"wrote {p}", file=sys.stderr)
    if args.record:
        record("Tiny trained model: quality (bench/quality.py)", table,
               "Attribute accuracy and subject fidelity against the procedural world's ground truth "
               "(weights/world.py detectors), fixed seeds, evaluation scenes disjoint from training.")


if __name__ == "__main__":
    main()
