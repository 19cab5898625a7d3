"""Train the built-in tiny FLUX.1 on the procedural world (weights/world.py), then write it as a FLUX.1
repository in the official layouts (BFL single files and diffusers folders), read by minidit and diffusers alike.

    python -m minidit.weights.train_tiny --work /tmp/tiny --threads 1 --until ae        # the autoencoder alone
    python -m minidit.weights.train_tiny --work /tmp/tiny --dit-steps 10000 --out /tmp/tiny/final   # all stages
    python -m minidit.weights.train_tiny --work /tmp/tiny --device cuda --batch 128 ...  # a GPU: bf16 autocast
    python -m minidit.weights.train_tiny --work /tmp/smoke --smoke                      # seconds: CI's smoke test

How weights/trained was made (the exact commands, times, losses, and what each choice measurably did) is in
weights/README.md; this docstring says what the code does. This file is the command, the text, init and export
stages; train_ae.py holds the autoencoder and data stages, train_dit.py the DiT and tune stages, train_common.py
what they share (learning-rate schedule, optimiser step with EMA, ticker, checkpoints).

Stages (each skipped when its output exists in --work; the ae, dit and tune stages resume from their last
checkpoint, written every few minutes):
  init   (--init-from REPO) an empty work folder seeded from an exported repository (stage_init): its encoders,
         autoencoder (as the last AE phase), latent scale/shift (kept by the data stage) and DiT (a finished DiT
         stage); the stages below then skip or continue from it. Work folders do not travel; repositories do.
  text   the tokenizers and random tiny T5 / CLIP in their Hugging Face layouts (fp16), frozen for the dit stage
         (FLUX trains its MMDiT against frozen encoders; the tune stage can train them jointly). The T5 tokenizer is
         a SentencePiece model trained on the generic tiny corpus plus world captions, so most of the world's words
         are single pieces; T5 gets 48 tokens (tokenizer_2's model_max_length, which minidit reads).
  ae     the autoencoder in the FLUX layout with AE's widths (16 latent channels, x8), trained in the phases of
         AE_PHASES: crops of whole 256-pixel world renders first (train_ae.crop_batch: 64, then 128 pixels), then
         whole renders (GroupNorm's statistics over a crop are not those of a whole image); L1 + MSE
         reconstruction + 1e-4 KL (per element); the posterior starts narrow (log-variance bias -8) so its noise
         does not hide the latent; EMA weights are kept. weights/README.md has the measurements behind the widths
         and the crops.
  data   N world scenes rendered at 256 and encoded (posterior mean) once; scale/shift factors measured on them
         (shift = mean, scale = 1/std) and stored in vae/config.json and ae.safetensors' metadata.
  dit    the MMDiT (FLUX layout, no guidance embedding: schnell-like, so the sampler uses true CFG) with FLUX's
         rectified-flow objective: x_t = (1-t) x0 + t eps, target v = eps - x0; t logit-normal (SD3) then shifted
         with FLUX.1-dev's mu for 256 tokens (mu = 0.5), the schedule it is sampled with. Captions leave out the
         size, colour, position and background each with p = 0.15 (never the shape or the texture word: a subject
         named without one is plain; world.describe) and are dropped whole with p = 0.1 (the empty prompt), so classifier-free guidance
         works. AdamW, warm-up then cosine, fp32 weights, EMA 0.995 (what is exported).
  tune   (--tune-steps N) the dit stage's EMA model trained on for N steps more, a fresh AdamW (DiT 2e-4), warm-up
         and cosine. Options: --local-t5 gives the frozen T5 a designed local position bias first
         (tiny_text.local_position_bias); --tune-times sampler draws the times as the sampler spaces its steps
         (train_times); --object-weight K weights each image token's loss by 1 + K x its object coverage
         (object_weights, a deviation from FLUX's plain mean); --tune-text-lr > 0 trains both text encoders
         jointly, and export then writes the tuned T5 and CLIP.
  export the repository: flux1-schnell.safetensors + transformer/, ae.safetensors + vae/, text_encoder(_2)/,
         tokenizer(_2)/, scheduler/ (dev-like dynamic shifting), model_index.json, minidit.json (DEFAULTS); all
         weights fp16.

Devices (--device): every stage runs on the one device given; on CUDA the forward passes run under bf16 autocast
(fp32 weights and optimizer), on the CPU in fp32 (--bf16 / --no-bf16 override). Random draws (scenes, captions,
times, noise) come from CPU generators on every device, so a run's data stream does not depend on the device;
--workers N processes render the world's images for the ae and data stages (the bottleneck on a GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minidit.autoencoder import AutoEncoderConfig
from minidit.transformer import Flux

from . import world
from .tiny import MODEL_INDEX, SCHEDULERS
from .tiny_ae import write_tiny_ae
from .tiny_flux import save_bfl, save_diffusers
from .tiny_text import (CORPUS, TINY_T5, local_position_bias, write_clip_tokenizer, write_t5_tokenizer, write_tiny_clip,
                        write_tiny_t5)
from .train_ae import AE_FINAL, AE_PHASES, stage_ae, stage_data
from .train_common import SIZE, log
from .train_dit import DIT, T5_LENGTH, T_DISTS, stage_dit, stage_tune

# minidit.json (minidit/defaults.py): what the exported model is used with when a call does not say
DEFAULTS = {"height": SIZE, "width": SIZE, "steps": 28, "guidance": 3.5, "true_cfg_scale": 4.0, "negative_prompt": "",
            "trained_pixels": [SIZE * SIZE, SIZE * SIZE]}
SCHEDULER = {**SCHEDULERS["dev"]}               # dynamic shifting, as it is trained
STAGES = ("text", "ae", "data", "dit")  # --until: the stages a run can stop after


def fp16_folder(folder: Path) -> None:
    """Cast every safetensors file in `folder` to fp16 in place (text encoders are stored like the rest)."""
    for f in folder.glob("*.safetensors"):
        save_file({k: v.half().contiguous() for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------- stages
def stage_text(repo: Path, seed: int) -> None:
    rng = random.Random(seed)
    captions = [world.caption(world.sample_scene(rng), rng, 0.15) for _ in range(3000)]
    write_clip_tokenizer(repo / "tokenizer")
    write_t5_tokenizer(repo / "tokenizer_2", vocab_size=320, model_max_length=T5_LENGTH, corpus=list(CORPUS) + captions)
    write_tiny_clip(repo / "text_encoder", seed=seed)
    write_tiny_t5(repo / "text_encoder_2", seed=seed)
    fp16_folder(repo / "text_encoder")
    fp16_folder(repo / "text_encoder_2")


T5_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def stage_local_t5(repo: Path) -> None:
    """Give the repository's frozen random T5 the designed local position bias (tiny_text.local_position_bias)
    in place of its random one; every other weight is kept. Idempotent."""
    for f in sorted((repo / "text_encoder_2").glob("*.safetensors")):
        sd = load_file(f)
        if T5_BIAS in sd:
            sd[T5_BIAS] = local_position_bias(TINY_T5).to(sd[T5_BIAS].dtype)
            save_file(sd, str(f), metadata={"format": "pt"})


INIT_FILES = ("flux1-schnell.safetensors", "ae.safetensors", "text_encoder", "text_encoder_2", "tokenizer",
              "tokenizer_2")


def init_problem(work: Path, src: Path) -> str | None:
    """Why `--init-from src` cannot seed `work` (one line), or None."""
    if not src.is_dir():
        return f"--init-from {src}: not a folder"
    missing = [f for f in INIT_FILES if not (src / f).exists()]
    if missing:
        return f"--init-from {src}: not a repository written by this script (no {', '.join(missing)})"
    if work.exists() and any(work.iterdir()):
        return f"--init-from: {work} is not empty; give an empty or new --work"
    from safetensors import safe_open
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Flux(DIT).state_dict().items()}
    with safe_open(str(src / "flux1-schnell.safetensors"), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if have != want:
        return f"--init-from {src}: flux1-schnell.safetensors is not a DiT of this script's shapes (train_dit.DIT)"
    return None


def stage_init(work: Path, src: Path) -> None:
    """Seed a work folder from an exported repository (e.g. weights/trained), so that later stages continue from
    it on a machine that lacks the original work folder: the repository itself as WORK/repo (its text encoders and
    tokenizers), its autoencoder as the last AE phase, its latent scale/shift (WORK/factors.json, kept by the data
    stage so the DiT's latent space does not move) and its DiT as a finished DiT-stage checkpoint (step 0 of 0,
    EMA = model; --tune-steps trains on from it). fp16 weights are upcast to fp32."""
    from safetensors import safe_open
    with safe_open(str(src / "ae.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    dit = {k: v.float() for k, v in load_file(src / "flux1-schnell.safetensors").items()}  # shapes: init_problem
    shutil.copytree(src, work / "repo")
    ae = {k: v.float().contiguous() for k, v in load_file(src / "ae.safetensors").items()}
    save_file(ae, str(work / AE_FINAL), metadata={"init_from": str(src)})
    default = AutoEncoderConfig.tiny()  # FLUX.1's factors, which a file without them has
    factors = {k: float(meta.get(k, getattr(default, k))) for k in ("scale_factor", "shift_factor")}
    (work / "factors.json").write_text(json.dumps(factors))
    tensors = {**{f"model.{k}": v for k, v in dit.items()}, **{f"ema.{k}": v.clone() for k, v in dit.items()}}
    save_file(tensors, str(work / "dit.safetensors"), metadata={"step": "0", "steps": "0", "loss": "nan",
                                                                "init_from": str(src)})


def stage_export(work: Path, repo: Path, out: Path) -> Path:
    """Write the FLUX.1 repository to `out`: every file fp16, both layouts, plus minidit.json (DEFAULTS). Written
    into a new folder beside `out`, then renamed into place (an earlier export at `out` is replaced only then)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write_export(work, repo, tmp)
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old")) if out.exists() else None
        if old is not None:
            out.rename(old / "export")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_export(work: Path, repo: Path, tmp: Path) -> None:
    shutil.copytree(repo, tmp, dirs_exist_ok=True)
    from safetensors import safe_open
    with safe_open(str(work / "latents.safetensors"), "pt") as f:
        meta = f.metadata()
    ae_sd = {k: v.half() for k, v in load_file(work / AE_FINAL).items()}
    ae_cfg = replace(AutoEncoderConfig.from_checkpoint(ae_sd), scale_factor=float(meta["scale_factor"]),
                     shift_factor=float(meta["shift_factor"]))
    write_tiny_ae(tmp / "ae.safetensors", ae_cfg, sd=ae_sd)
    write_tiny_ae(tmp / "vae", ae_cfg, layout="diffusers", sd=ae_sd)
    tuned = work / "tune.safetensors"
    if tuned.exists():  # the tune stage's EMA weights: the DiT and both text encoders
        sd = load_file(tuned)
        part = {m: {k[len(m) + 5:]: v.half().contiguous() for k, v in sd.items() if k.startswith(f"ema.{m}.")}
                for m in ("dit", "t5", "clip")}
        write_tiny_t5(tmp / "text_encoder_2", sd=part["t5"])
        write_tiny_clip(tmp / "text_encoder", sd=part["clip"])
        dit = part["dit"]
    else:
        sd = load_file(work / "dit.safetensors")
        dit = {k[4:]: v.half().contiguous() for k, v in sd.items() if k.startswith("ema.")}
    save_bfl(dit, DIT, tmp / "flux1-schnell.safetensors")
    save_diffusers(dit, DIT, tmp / "transformer")
    (tmp / "scheduler").mkdir(exist_ok=True)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (tmp / "minidit.json").write_text(json.dumps(DEFAULTS, indent=2))


def train_ae_and_data(work: Path, args, device: torch.device, bf16: bool, pool) -> bool:
    """main's ae phases and data stage (each skipped when done); False when --until stops the run here."""
    for i, (steps, size, batch, lr, crop_from) in enumerate(AE_PHASES):
        out = work / f"ae_phase{i}.safetensors"
        if args.smoke:
            steps, size, batch, crop_from = 3, 64, 2, crop_from and 128
        batch = args.ae_batch or batch
        if not out.exists() and not (work / AE_FINAL).exists():
            what = f"whole {size}-pixel renders" if crop_from is None else f"{size}-pixel crops of {crop_from}"
            log(f"stage ae, phase {i}: {steps} steps, {what}, batch {batch}, lr {lr}")
            stage_ae(work, steps, args.seed + i, batch=batch, size=size, lr=lr,
                     init=None if i == 0 else f"ae_phase{i - 1}.safetensors", out=out.name, device=device,
                     bf16=bf16, pool=pool, crop_from=crop_from)
    if args.until == "ae":
        return False
    if not (work / "latents.safetensors").exists():
        log("stage data")
        stage_data(work, args.images, args.seed, device=device, bf16=bf16, pool=pool)
    return args.until != "data"


def out_problem(work: Path, out: Path) -> str | None:
    """Why the export may not go to `out` (one line), or None: never the work folder, a folder holding it, or
    another of its files; an existing `out` only if it is empty or an earlier export (model_index.json and
    flux1-schnell.safetensors)."""
    w, o = work.resolve(), out.resolve()
    if o == w or w.is_relative_to(o):
        return f"--out {out}: is (or holds) the work folder {work}; the export would replace it"
    if o.is_relative_to(w) and o != w / "repo-final":
        return f"--out {out}: inside the work folder {work} (only its default WORK/repo-final is allowed)"
    earlier = (out / "model_index.json").is_file() and (out / "flux1-schnell.safetensors").is_file()
    if out.exists() and not (out.is_dir() and (earlier or not any(out.iterdir()))):
        return f"--out {out}: exists and is not an earlier export of this script (refusing to replace it)"
    return None


def argument_problem(args) -> str | None:
    """The first out-of-range argument (one line), or None: checked before anything is written."""
    for flag, value, lo in (("--seed", args.seed, 0), ("--images", args.images, 1), ("--dit-steps", args.dit_steps, 1),
                            ("--batch", args.batch, 1), ("--stop-at", args.stop_at, 1), ("--threads", args.threads, 0)):
        if value is not None and value < lo:
            return f"{flag} must be >= {lo}, got {value}"
    if args.dit_minutes is not None and not (math.isfinite(args.dit_minutes) and args.dit_minutes > 0):
        return f"--dit-minutes must be a finite number > 0, got {args.dit_minutes}"
    if not math.isfinite(args.tune_text_lr):
        return f"--tune-text-lr must be finite, got {args.tune_text_lr}"
    return out_problem(Path(args.work), Path(args.out) if args.out else Path(args.work) / "repo-final")


def one_line_errors(fn):
    """A failure of the training tool is one `error:` line (the traceback with MINIDIT_DEBUG=1)."""
    def run(*a, **k):
        try:
            return fn(*a, **k)
        except (ValueError, TypeError, OSError, RuntimeError, KeyError) as e:
            if os.environ.get("MINIDIT_DEBUG"):
                raise
            raise SystemExit(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return run


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="working folder (stages resume from it)")
    ap.add_argument("--out", default=None, help="where to write the finished repository (default: WORK/repo-final)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=4000, help="world images encoded for the DiT")
    ap.add_argument("--dit-steps", type=int, default=2500)
    ap.add_argument("--extend", action="store_true", help="resume a finished DiT run and continue it to --dit-steps "
                    "(the cosine schedule is stretched to the new total)")
    ap.add_argument("--dit-minutes", type=float, default=None, help="fit the step count to this budget instead")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stop-at", type=int, default=None, help="end the DiT stage after this many steps of its "
                    "schedule (then export); a step already reached exports that checkpoint")
    ap.add_argument("--tune-steps", type=int, default=0, help="then train the DiT this many steps more (stage "
                    "tune; 0: no tune stage)")
    ap.add_argument("--tune-text-lr", type=float, default=1e-3, help="the text encoders' learning rate in the "
                    "tune stage (0: they stay frozen)")
    ap.add_argument("--local-t5", action="store_true", help="before the tune stage, give the frozen T5 the designed "
                    "local position bias (each head attends to one neighbour; tiny_text.local_position_bias)")
    ap.add_argument("--tune-times", choices=T_DISTS, default="logit-normal", help="how the tune stage draws its "
                    "training times (train_times)")
    ap.add_argument("--object-weight", type=float, default=0.0, help="the tune stage's loss weight on object "
                    "tokens: 1 + K x their object coverage (object_weights; 0: the plain mean)")
    ap.add_argument("--init-from", default=None, help="seed an empty --work from an exported repository (e.g. "
                    "weights/trained): its encoders, autoencoder, latent factors and DiT (stage_init)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT's forward (faster after ~90 s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="where every stage runs: cpu, cuda, cuda:1, ...")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast of the "
                    "forward passes (default: on for CUDA, off for the CPU)")
    ap.add_argument("--ae-batch", type=int, default=None, help="the autoencoder phases' batch (default: AE_PHASES'; "
                    "larger on a GPU)")
    ap.add_argument("--workers", type=int, default=0, help="processes that render the world's images for the ae "
                    "and data stages (0: the training process; on a GPU the renders are the bottleneck)")
    ap.add_argument("--until", choices=STAGES, default=None, help="stop after this stage (no export)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    args = ap.parse_args(argv)
    if why := argument_problem(args):
        ap.error(why)
    if args.tune_steps < 0:
        ap.error(f"--tune-steps must be >= 0, got {args.tune_steps}")
    if args.tune_text_lr < 0:
        ap.error(f"--tune-text-lr must be >= 0, got {args.tune_text_lr}")
    if args.local_t5 and not args.tune_steps:
        ap.error("--local-t5 needs --tune-steps (the DiT is tuned to the changed T5 features)")
    if not math.isfinite(args.object_weight) or args.object_weight < 0:
        ap.error(f"--object-weight must be a finite number >= 0, got {args.object_weight}")
    if args.object_weight and not args.tune_steps:
        ap.error("--object-weight needs --tune-steps (it weights the tune stage's loss)")
    if args.init_from and (why := init_problem(Path(args.work), Path(args.init_from))):
        ap.error(why)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: not cpu or a CUDA device (cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if args.ae_batch is not None and args.ae_batch < 1:
        ap.error(f"--ae-batch must be >= 1, got {args.ae_batch}")
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    if args.smoke:
        args.images, args.dit_steps, args.batch = 16, 6, 4
        args.tune_steps = args.tune_steps and 4
    work = Path(args.work)
    repo = work / "repo"
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init_from:
        log(f"stage init from {args.init_from}")
        try:
            stage_init(work, Path(args.init_from))
        except BaseException:  # init_problem made sure the work folder was new or empty: leave it so
            for p in work.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            raise
    if not (repo / "text_encoder_2").exists():
        log("stage text")
        stage_text(repo, args.seed)
    if args.until == "text":
        return
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers else None
    try:
        done = train_ae_and_data(work, args, device, bf16, pool)
    finally:
        if pool is not None:
            pool.close()
    if not done:
        return
    log("stage dit")
    stage_dit(work, repo, args.dit_steps, args.seed, batch=args.batch, minutes=args.dit_minutes,
              extend=args.extend, compile=args.compile, stop_at=args.stop_at, device=device, bf16=bf16)
    if args.until == "dit":
        return
    if args.tune_steps:
        if args.local_t5:
            log("stage local t5")
            stage_local_t5(repo)
        log("stage tune")
        stage_tune(work, repo, args.tune_steps, args.seed, batch=args.batch, text_lr=args.tune_text_lr,
                   compile=args.compile, t_dist=args.tune_times, object_weight=args.object_weight, device=device,
                   bf16=bf16)
    out = stage_export(work, repo, Path(args.out) if args.out else work / "repo-final")
    log(f"exported {out}")


if __name__ == "__main__":
    main()
