"""The `minidit` command.

    minidit generate --prompt "a photo of a cat" [--weights PATH] [--height 1024 --width 1024] [--steps N]
                     [--guidance 3.5] [--seed 0] [--num-images 1] [--output out.png] [--device] [--dtype] [--offload]
    minidit info PATH
    minidit personalize | inpaint | outpaint | freecus ...   (see `minidit COMMAND --help`)

Without --weights the built-in tiny checkpoint is used (random weights: the picture is noise, the code path is real).
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import __version__, metadata, validate

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def common_args(p: argparse.ArgumentParser, size: bool = True) -> None:
    """Arguments every image command shares (weights, device, sampling, output)."""
    p.add_argument("--prompt", action="append", default=None, help="text prompt (may be empty); repeat for "
                   "several prompts in one run (required unless --prompt-file or --from-png)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="one prompt per line, after the --prompt "
                   "ones; blank lines are skipped (default: none)")
    p.add_argument("--weights", default=None, help="FLUX.1 folder, HF cache folder or repo name (offline); "
                   "default: the built-in tiny checkpoint")
    component_args(p)
    if size:
        p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default 1024; 256 for the tiny checkpoint)")
        p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default 1024; 256 for the tiny checkpoint)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 28 dev, 4 schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance for FLUX.1-dev (ignored by schnell)")
    p.add_argument("--seed", type=int, nargs="+", default=None, help="one or more seeds; image i of a "
                   "--num-images batch uses SEED + i (default: a random seed, printed and recorded)")
    p.add_argument("--output", default="out.png", help="PNG path; several images get -0, -1, ... suffixes; "
                   "a folder (dir/) gets numbered names (default: out.png)")
    p.add_argument("--from-png", default=None, metavar="PNG", help="re-run the image recorded in a minidit "
                   "PNG's metadata (same command); options given here override the recorded ones (default: none)")
    p.add_argument("--quiet", action="store_true", help="print only errors and warnings (default: off)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload", action="store_true", help="keep one component at a time on the GPU (<= 24 GB for dev)")


def component_args(p: argparse.ArgumentParser) -> None:
    """Single components as ComfyUI keeps them (models/unet, models/vae, models/clip); each replaces that part
    of --weights, or, without --weights, all four (and the T5 tokenizer) assemble a pipeline."""
    for flag, what in (("--transformer", "FLUX.1 transformer: a .safetensors file (BFL, diffusers or ComfyUI "
                        "keys, fp8 too) or a diffusers transformer/ folder"),
                       ("--ae", "autoencoder: ae.safetensors or a diffusers vae/ folder"),
                       ("--t5", "T5-XXL encoder: a text_encoder_2/ folder, or a .safetensors file "
                        "(t5xxl_fp16.safetensors; the T5-v1.1-XXL config is assumed)"),
                       ("--clip", "CLIP-L text encoder: a text_encoder/ folder, or a .safetensors file "
                        "(clip_l.safetensors; the CLIP ViT-L/14 config is assumed)"),
                       ("--t5-tokenizer", "T5 tokenizer folder (spiece.model or tokenizer.json), e.g. FLUX.1's "
                        "tokenizer_2/; needed with a --t5 file"),
                       ("--clip-tokenizer", "CLIP tokenizer folder (vocab.json, merges.txt); default with a --clip "
                        "file: the CLIP-L vocabulary shipped with minidit")):
        p.add_argument(flag, default=None, metavar="PATH", help=f"{what} (default: from --weights)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the text already states it); epilogs keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return text if action.default is None else f"{text} (default: {action.default})"


def cfg_args(p: argparse.ArgumentParser) -> None:
    """True classifier-free guidance with a negative prompt (diffusers' negative_prompt / true_cfg_scale)."""
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (may be empty); needs "
                   "--true-cfg > 1 (default: none)")
    p.add_argument("--true-cfg", type=float, default=None, help="true CFG scale: two forwards per step, "
                   "v = v_neg + scale·(v - v_neg); 1 = off (default: 1.0; 4.0 with the empty negative prompt "
                   "for the built-in tiny model, which has no guidance embedding)")


def check_cfg(args) -> dict:
    """--negative-prompt and --true-cfg only together (their ranges: check_inputs); -> their metadata.
    Unset on the built-in model: its defaults (weights/tiny.py TRAINED_DEFAULTS), since it needs CFG."""
    if args.true_cfg is None:
        from .weights.tiny import TRAINED_DEFAULTS
        args.true_cfg = TRAINED_DEFAULTS["true_cfg_scale"] if builtin(args) else 1.0
        if builtin(args) and args.negative_prompt is None:
            args.negative_prompt = TRAINED_DEFAULTS["negative_prompt"]
    if args.true_cfg > 1 and args.negative_prompt is None:
        raise SystemExit("error: --true-cfg > 1 needs --negative-prompt (it may be empty: --negative-prompt '')")
    if args.true_cfg == 1 and args.negative_prompt is not None:
        raise SystemExit("error: --negative-prompt has no effect unless --true-cfg > 1 (e.g. --true-cfg 4)")
    return {"negative_prompt": args.negative_prompt or "", "true_cfg": args.true_cfg}


def builtin(args) -> bool:
    """No --weights and no single component files: the built-in trained tiny model."""
    return args.weights is None and not any(getattr(args, k, None) for k in
                                            ("transformer", "ae", "t5", "clip", "t5_tokenizer", "clip_tokenizer"))


def default_size(args, pipe) -> tuple[int, int]:
    d = 256 if builtin(args) else 1024
    return args.height or d, args.width or d


def load_pipeline(args, checked: bool = False):
    """The pipeline the options name; first (unless `checked`: `_settings` ran them) the checks of every option,
    input file and the output path, so a bad one costs no model load."""
    if not checked:
        validate.cli_inputs(args)
    from .pipeline import Pipeline
    weights = metadata.check_weights(args)  # what --weights / --transformer ... name, and what is missing
    if builtin(args):
        metadata.say(args, "no --weights: using the built-in tiny FLUX.1 trained on minidit's procedural world of "
                           "shapes (weights/trained, 18 MB; it draws coloured shapes, not photos)")
    metadata.say(args, metadata.loading_line(metadata.weights_record(args)))
    return Pipeline.load(weights, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                         offload=args.offload, **metadata.component_files(args))


def save_images(images, args, pipe, command: str, extra: dict | None = None,
                records: list[dict] | None = None) -> list[Path]:
    """Save PNGs with their generation parameters as text chunks, like other image tools do. Each file is
    written atomically; if one fails, the error says which were written. `records` (minidit.metadata.record,
    one per image) are written as the A1111 "parameters" text and the "minidit" JSON chunk."""
    from . import metadata
    from PIL.PngImagePlugin import PngInfo

    from .image import output_paths, save_numbered, save_png
    plan = getattr(args, "outputs", None)
    if plan is None or (isinstance(plan, list) and len(plan) != len(images)):  # planned for another count
        plan = output_paths(args.output, len(images))
    steps = pipe.default_steps if args.steps is None else args.steps
    meta = {"prompt": args.prompt, "seed": args.seed, "steps": steps,
            "guidance": args.guidance if pipe.variant == "dev" else "none (schnell)",
            "size": f"{images[0].width}x{images[0].height}", "model": pipe.name, "variant": pipe.variant,
            "command": command, "minidit_version": __version__, **(extra or {})}
    written: list[Path] = []
    paths = [plan] * len(images) if isinstance(plan, Path) else plan
    for i, (img, path) in enumerate(zip(images, paths)):
        info = PngInfo()
        rec = records[i] if records else None
        for k, v in {**meta, "image_index": i, **({"prompt": rec["prompt"], "seed": rec["seed"]} if rec else {})}.items():
            info.add_text(k, str(v))
        if rec is not None:
            metadata.add_chunks(info, rec)
        else:
            info.add_text("parameters", json.dumps({**meta, "image_index": i}))
        try:
            if isinstance(plan, Path):
                path = save_numbered(img, plan, command, info)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(img, path, info)
        except OSError as e:
            done = ", ".join(map(str, written)) or "none"
            raise OSError(f"cannot write image {i + 1} of {len(images)} to {path} ({e.strerror or e}); "
                          f"written before: {done}") from None
        written.append(path)
        metadata.say(args, f"wrote {path}")
    return written


def cmd_generate(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    cfg = check_cfg(args)
    todo = metadata.plan(args)
    pipe = load_pipeline(args)
    height, width = default_size(args, pipe)
    metadata.run(args, pipe, "generate", todo, lambda prompt, seed: pipe.generate(
        prompt, height=height, width=width, steps=args.steps, guidance=args.guidance, seed=seed,
        progress=not args.quiet, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg), cfg)


def cmd_img2img(args) -> None:
    cfg = check_cfg(args)
    todo = metadata.plan(args)
    pipe = load_pipeline(args)  # checks --strength, --image, the sizes, ... before loading
    metadata.run(args, pipe, "img2img", todo, lambda prompt, seed: pipe.img2img(
        args.image, prompt, strength=args.strength, height=args.height, width=args.width, steps=args.steps,
        guidance=args.guidance, seed=seed, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg,
        progress=not args.quiet), {"image": args.image, "strength": args.strength, **cfg})


def cmd_info(args) -> None:
    from .info import inspect
    report, ok = inspect(args.path)
    print(report)
    if not ok:
        raise SystemExit(1)


def cmd_freecus(args) -> None:
    from .freecus import DEFAULT_STEPS, freecus
    from .masks import Reference
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    vital = None
    if args.vital_layers is not None:
        try:
            vital = [int(i) for i in args.vital_layers.split(",") if i.strip()]
        except ValueError:
            raise SystemExit(f"error: --vital-layers must be comma-separated integers, got {args.vital_layers!r}") from None
        if not vital:  # an empty list would silently be plain generation
            raise SystemExit("error: --vital-layers is empty: FreeCus needs at least one layer (omit it for the default)")
    todo = metadata.plan(args)
    from .freecus import FreeCusSettings
    settings = _settings(FreeCusSettings, args, lambda_ref=args.lambda_ref, lambda_prompt=args.lambda_prompt,
                         vital_layers=None if vital is None else tuple(vital),
                         mu_shift_type="target" if args.no_ans else args.mu_shift_type)
    pipe = load_pipeline(args, checked=True)
    ref = Reference(args.ref, _mask_arg(args.mask), args.ref_prompt)
    metadata.run(args, pipe, "freecus", todo, lambda prompt, seed: freecus(
        pipe, prompt, ref, caption=args.caption, preset=settings, seed=seed, steps=args.steps,
        guidance=args.guidance, height=args.height, width=args.width, progress=not args.quiet), {
        "steps": DEFAULT_STEPS[pipe.variant] if args.steps is None else args.steps, "ref": args.ref, "mask": args.mask or "whole image",
        "ref_prompt": args.ref_prompt or "the prompt", "caption": args.caption or "",
        "preset": args.preset, **settings.asdict()})


def add_freecus_parser(sub) -> None:
    from .freecus import GUIDANCE, LAMBDA_PROMPT, LAMBDA_REF, MU_SHIFT_TYPES
    p = sub.add_parser("freecus", help="FreeCus: the subject of a reference image in a new scene (training-free)")
    common_args(p, size=False)
    p.set_defaults(guidance=GUIDANCE)
    for action in p._actions:
        if action.dest == "steps":
            action.help = "denoising steps (default 30 dev as the authors, 4 schnell)"
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--ref", required=True, help="reference image (resized to the output size if it differs; required)")
    p.add_argument("--mask", default=None, help="subject mask of the reference (PNG of the same size, white = "
                   "subject, or a pixel box x,y,w,h; default: the whole image)")
    p.add_argument("--ref-prompt", default=None, help="prompt of the reference (default: the full prompt, as "
                   "FreeCus' code; personalize's default is empty instead)")
    p.add_argument("--caption", default=None, help="short subject description, appended as 'PROMPT. CAPTION' "
                   "(see minidit.freecus.DESCRIBE_TEMPLATE for how the authors make it; default: none)")
    p.add_argument("--lambda-ref", type=float, default=None, help=f"λ_r, scale of the reference keys (default: the preset's, {LAMBDA_REF})")
    p.add_argument("--lambda-prompt", type=float, default=None,
                   help=f"λ_p, scale of the prompt keys on vital layers (their --extend_scale; default: the preset's, {LAMBDA_PROMPT})")
    p.add_argument("--vital-layers", default=None, help="comma-separated attention layers, double blocks first "
                   "(default: FLUX.1's 0,1,2,17,18,25,28,53,54,56, mapped to smaller models)")
    p.add_argument("--no-ans", action="store_true", help="noise the reference like the target (no reversed shift; "
                   "= --mu-shift-type target)")
    p.add_argument("--mu-shift-type", default=None, choices=MU_SHIFT_TYPES, help="the reference's noise schedule "
                   "(their --mu_shift_type; default negative = ANS)")
    preset_args(p, "FreeCusSettings (minidit.freecus)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p.set_defaults(func=cmd_freecus)


# -- Personalize Anything: personalize / inpaint / outpaint (minidit/personalize.py) ----------------------------

def _int_list(text: str, n: int, what: str, sep: str = ",") -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(sep))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise SystemExit(f"error: {what} must be {n} integers separated by '{sep}', got {text!r}")
    return vals


def _mask_arg(text: str | None):
    """A mask argument: a PNG path, or a pixel box 'x,y,w,h' as shorthand."""
    import re
    if text is None or text.lower() == "none":
        return None
    if re.fullmatch(r"\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*", text):
        return _int_list(text, 4, "a box mask")
    return text


def preset_args(p: argparse.ArgumentParser, what: str) -> None:
    """--preset and --set: the method's settings (README "Presets"); recorded in the PNG metadata."""
    p.add_argument("--preset", choices=("paper", "official"), default="paper",
                   help="paper: what the paper describes (default); official: what the authors' released code does")
    p.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                   help=f"override one field of the preset's {what}, e.g. --set vae_sample=false; repeatable (default: none)")


def _settings(cls, args, **flags):
    """The preset with the dedicated flags (None = not given) and every --set FIELD=VALUE applied. The CLI's
    own checks run first (so a bad flag keeps its --flag message); the command's load_pipeline then skips them."""
    from .presets import PRESET
    validate.cli_inputs(args)
    given = {k: (PRESET if v is None else v) for k, v in flags.items()}
    return cls.resolve(args.preset, **{**given, **cls.parse(args.set)})


def _per_ref(values, n: int, flag: str) -> list:
    if not values:
        return [None] * n
    if len(values) != n:
        raise SystemExit(f"error: give {flag} once per --ref ({n} references, {len(values)} {flag})")
    return list(values)


def cmd_personalize(args) -> None:
    from .masks import Reference
    from .personalize import personalize
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    n = len(args.ref)
    masks = [_mask_arg(m) for m in _per_ref(args.mask, n, "--mask")]
    prompts = _per_ref(args.ref_prompt, n, "--ref-prompt")
    if args.box and args.offset:
        raise SystemExit("error: place the subjects with --box or with --offset, not both")
    if args.box:
        placement = [_int_list(b, 4, "--box (x,y,w,h)") for b in _per_ref(args.box, n, "--box")]
    else:
        placement = [None if o is None else _int_list(o, 2, "--offset (dx,dy)")
                     for o in _per_ref(args.offset, n, "--offset")]
    refs = [Reference(r, m, p) for r, m, p in zip(args.ref, masks, prompts)]
    scene = Reference(args.scene, _mask_arg(args.scene_mask), args.scene_prompt) if args.scene else None
    todo = metadata.plan(args)
    from .personalize import PersonalizeSettings
    settings = _settings(PersonalizeSettings, args, tau=args.tau, perturb=False if args.no_perturb else None,
                         positions=args.positions, concat=False if args.no_concat else None)
    pipe = load_pipeline(args, checked=True)
    metadata.run(args, pipe, "personalize", todo, lambda prompt, seed: personalize(
        pipe, prompt, refs, placement=placement, scene=scene, preset=settings, height=args.height,
        width=args.width, steps=args.steps, guidance=args.guidance, seed=seed, progress=not args.quiet), {
        "refs": ";".join(args.ref), "masks": ";".join(str(m or "whole image") for m in masks),
        "placement": ";".join(str(p or "in place") for p in placement), "scene": args.scene or "",
        "preset": args.preset, **settings.asdict()})


def cmd_inpaint(args) -> None:
    from .personalize import inpaint
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    mask = _mask_arg(args.mask)
    if mask is None:
        raise SystemExit("error: --mask is required (white = the region to repaint, or a box x,y,w,h)")
    todo = metadata.plan(args)
    from .personalize import EditSettings
    settings = _settings(EditSettings, args, tau=args.tau, blend=args.blend)
    pipe = load_pipeline(args, checked=True)
    metadata.run(args, pipe, "inpaint", todo, lambda prompt, seed: inpaint(
        pipe, args.image, mask, prompt, preset=settings, steps=args.steps, guidance=args.guidance, seed=seed,
        image_prompt=args.image_prompt, progress=not args.quiet),
        {"image": args.image, "mask": str(mask), "image_prompt": args.image_prompt, "preset": args.preset,
         **settings.asdict()})


def cmd_outpaint(args) -> None:
    from .personalize import outpaint
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    if args.canvas is not None and (args.width or args.height):
        raise SystemExit("error: give the canvas as --width/--height or as --canvas WxH, not both")
    if args.canvas is None and not (args.width and args.height):
        raise SystemExit("error: outpaint needs the canvas: --width W --height H (or --canvas WxH)")
    canvas = _int_list(args.canvas, 2, "--canvas (WxH)", sep="x") if args.canvas else (args.width, args.height)
    offset = None if args.offset is None else _int_list(args.offset, 2, "--offset (dx,dy)")
    todo = metadata.plan(args)
    from .personalize import EditSettings
    settings = _settings(EditSettings, args, tau=args.tau, blend=args.blend)
    pipe = load_pipeline(args, checked=True)
    metadata.run(args, pipe, "outpaint", todo, lambda prompt, seed: outpaint(
        pipe, args.image, prompt, canvas, offset=offset, preset=settings, steps=args.steps, guidance=args.guidance,
        seed=seed, image_prompt=args.image_prompt, progress=not args.quiet), {"image": args.image, "canvas": "{}x{}".format(*canvas),
                                                 "offset": args.offset or "centred", "preset": args.preset,
                                                 **settings.asdict()})


def add_personalize_parsers(sub) -> None:
    from .personalize import POSITIONS, TAU, TAU_EDIT
    tau_help = ("τ; --preset paper: a step fraction, the first (1 - τ) of the steps replace tokens (default {}); "
                "--preset official: the authors' slider 0..100, compared with the shifted time (default 50)")
    p = sub.add_parser("personalize", help="Personalize Anything: the subject of a reference image in a new image")
    common_args(p, size=False)
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--ref", action="append", required=True, help="reference image; repeat for multi-subject (required)")
    p.add_argument("--mask", action="append", default=None, help="subject mask of the reference (PNG, white = "
                   "subject, same size as it) or a pixel box x,y,w,h; once per --ref (default: whole image)")
    p.add_argument("--ref-prompt", action="append", default=None, help="prompt of the reference, used to "
                   "invert it (default: empty, as the authors' demo; freecus's default is the full prompt instead)")
    p.add_argument("--box", action="append", default=None,
                   help="target box x,y,w,h: the subject is centred in it; once per --ref (default: none)")
    p.add_argument("--offset", action="append", default=None,
                   help="move the subject by dx,dy pixels (multiples of 16) from where it is in its reference; "
                   "once per --ref (default: 0,0, in place)")
    p.add_argument("--scene", default=None, help="scene image to compose the subjects into (one more reference; default: none)")
    p.add_argument("--scene-mask", default=None, help="scene region (PNG or x,y,w,h; default: all but the subjects)")
    p.add_argument("--scene-prompt", default=None, help="prompt of the scene image (default: empty)")
    p.add_argument("--tau", type=float, default=None, help=tau_help.format(TAU))
    p.add_argument("--no-perturb", action="store_true",
                   help="no patch perturbation (3x3 shuffle, 5x5 dilation/erosion)")
    p.add_argument("--positions", choices=POSITIONS, default=None, help="RoPE of the later-stage reference "
                   "tokens: target region (authors' code, default) or zero (paper)")
    p.add_argument("--no-concat", action="store_true", help="no reference tokens in the attention after τ")
    preset_args(p, "PersonalizeSettings (minidit.personalize)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p.set_defaults(func=cmd_personalize)

    for name, helptext in (("inpaint", "repaint the white region of a mask, keep the rest"),
                           ("outpaint", "extend an image to a larger canvas")):
        p = sub.add_parser(name, help=helptext)
        common_args(p, size=False)
        p.add_argument("--image", required=True, help="input image")
        if name == "inpaint":
            p.add_argument("--mask", required=True,
                           help="edit mask at the image's size (white = repaint) or a box x,y,w,h (required)")
            p.set_defaults(func=cmd_inpaint)
        else:
            p.add_argument("--width", type=int, default=None, help="canvas width in pixels, multiple of 16 "
                           "(required, or --canvas)")
            p.add_argument("--height", type=int, default=None, help="canvas height in pixels, multiple of 16 "
                           "(required, or --canvas)")
            p.add_argument("--canvas", default=None, metavar="WxH", help="the canvas as one value, e.g. 1024x768 "
                           "(an alias of --width/--height; default: none)")
            p.add_argument("--offset", default=None, help="move the image by dx,dy pixels from the canvas's "
                           "top-left corner (default: centred)")
            p.set_defaults(func=cmd_outpaint)
        p.add_argument("--image-prompt", default="", help="prompt describing the input image (default: empty)")
        p.add_argument("--tau", type=float, default=None, help=tau_help.format(TAU_EDIT))
        p.add_argument("--blend", action=argparse.BooleanOptionalAction, default=None,
                       help="latent blend of the preserved region at the replacement steps (paper preset: on, "
                       "official: off; default: the preset's)")
        preset_args(p, "EditSettings (minidit.personalize)")
        p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")


EXAMPLES = {
    "generate": ['minidit generate --prompt "a photo of a cat" --seed 7 --num-images 4 --output cats/',
                 "minidit generate --weights black-forest-labs/FLUX.1-dev --prompt-file prompts.txt --seed 1 2 3",
                 "minidit generate --from-png cats/generate-0002.png --output again.png   # the same pixels"],
    "img2img": ['minidit img2img --image photo.png --prompt "the same photo as a watercolour" --strength 0.6'],
    "info": ["minidit info ~/models/FLUX.1-dev"],
    "freecus": ['minidit freecus --ref cat.png --mask cat_mask.png --prompt "a cat wearing a space suit" '
                '--caption "a grey tabby cat"'],
    "personalize": ['minidit personalize --ref cat.png --mask cat_mask.png --prompt "a cat on the beach" '
                    "--offset 128,0",
                    "minidit personalize --ref a.png --mask 0,0,256,512 --ref b.png --mask 256,0,256,512 "
                    '--prompt "two toys on a shelf"'],
    "inpaint": ['minidit inpaint --image photo.png --mask edit_mask.png --prompt "a castle on the hill"'],
    "outpaint": ['minidit outpaint --image photo.png --width 1536 --height 1024 --prompt "a wide mountain valley"'],
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 1 like every other user error; helps show
    every default (HelpFormatter)."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **k)

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minidit", description="A minimal FLUX.1 with training-free personalization")
    parser.add_argument("--version", action="version", version=f"minidit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="text to image")
    common_args(p)
    cfg_args(p)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("img2img", help="image to image (diffusers' FluxImg2ImgPipeline)")
    common_args(p, size=False)
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--strength", type=float, default=0.6, help="how much to change: 1 = from pure noise, "
                   "small = close to the input; the last strength·steps steps run (default 0.6)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the image's, "
                   "rounded down to multiples of 16; the image is resized)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the image's)")
    cfg_args(p)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p.set_defaults(func=cmd_img2img)
    p = sub.add_parser("info", help="what a weights folder contains")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)
    add_freecus_parser(sub)
    add_personalize_parsers(sub)
    for name, p in sub.choices.items():
        p.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
    return parser


# A user mistake is one line naming the option/file, exit code 1; --debug shows the traceback instead.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError, torch.OutOfMemoryError)  # CheckpointError, PIL, JSON...
NEGATIVE = re.compile(r"-\d[-\d.,x]*")  # -16,0  -16,-32  -1.5: a value, not an option


def _negative_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--offset -16,0` -> `--offset=-16,0`: argparse would take "-16,0" for an option."""
    takes_value, stack = set(), [parser]
    while stack:
        for a in stack.pop()._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack += list(a.choices.values())
            elif a.nargs != 0:
                takes_value.update(a.option_strings)
    out: list[str] = []
    for a in argv:
        if "--" not in out and out and out[-1] in takes_value and NEGATIVE.fullmatch(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files are removed, no output is half-written


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    if "--from-png" in argv or any(a.startswith("--from-png=") for a in argv):  # --image, --ref, ...: recorded
        for p in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.values():
            for a in p._actions:
                a.required = False
    args = parser.parse_args(_negative_values([a for a in argv if a != "--debug"], parser))
    old = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        args.t0 = time.perf_counter()
        if getattr(args, "from_png", None):
            args = metadata.from_png(args, parser)
        with warnings.catch_warnings():  # a library warning is one clean line, not a source listing
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, *a, **k: print(f"warning: {message}", file=sys.stderr)
            args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if debug:
            raise
        raise SystemExit("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    main()
