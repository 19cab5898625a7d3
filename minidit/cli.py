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
from pathlib import Path

import torch

from . import __version__

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def common_args(p: argparse.ArgumentParser, size: bool = True) -> None:
    """Arguments every image command shares (weights, device, sampling, output)."""
    p.add_argument("--prompt", required=True, help="text prompt (may be empty)")
    p.add_argument("--weights", default=None, help="FLUX.1 folder, HF cache folder or repo name (offline); "
                   "default: the built-in tiny checkpoint")
    if size:
        p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default 1024; 256 for the tiny checkpoint)")
        p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default 1024; 256 for the tiny checkpoint)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 28 dev, 4 schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance for FLUX.1-dev (ignored by schnell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out.png", help="PNG path; several images get -0, -1, ... suffixes")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload", action="store_true", help="keep one component at a time on the GPU (<= 24 GB for dev)")


def cfg_args(p: argparse.ArgumentParser) -> None:
    """True classifier-free guidance with a negative prompt (diffusers' negative_prompt / true_cfg_scale)."""
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (may be empty); needs "
                   "--true-cfg > 1 (default: none)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale: two forwards per step, "
                   "v = v_neg + scale·(v - v_neg); 1 = off (default 1.0)")


def check_cfg(args) -> dict:
    """Validate --negative-prompt/--true-cfg before the model loads; -> their metadata."""
    if args.true_cfg < 1:
        raise SystemExit(f"error: --true-cfg must be >= 1 (1 = off), got {args.true_cfg}")
    if args.true_cfg > 1 and args.negative_prompt is None:
        raise SystemExit("error: --true-cfg > 1 needs --negative-prompt (it may be empty: --negative-prompt '')")
    if args.true_cfg == 1 and args.negative_prompt is not None:
        raise SystemExit("error: --negative-prompt has no effect unless --true-cfg > 1 (e.g. --true-cfg 4)")
    return {"negative_prompt": args.negative_prompt or "", "true_cfg": args.true_cfg}


def default_size(args, pipe) -> tuple[int, int]:
    d = 256 if args.weights is None else 1024
    return args.height or d, args.width or d


def load_pipeline(args):
    check_inputs(args)  # every option, input file and the output path, before any model loads
    from .pipeline import Pipeline
    return Pipeline.load(args.weights, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                         offload=args.offload)


def check_inputs(args) -> None:
    """Options, input images/masks and the output path checked before any model loads: one named error each."""
    from . import validate
    from .image import output_paths
    from .masks import Reference, load_reference
    for dest in ("prompt", "ref_prompt", "scene_prompt", "image_prompt", "negative_prompt", "caption"):
        for text in (lambda v: v if isinstance(v, list) else [v])(getattr(args, dest, None)):
            if text is not None and not _utf8(text):
                raise ValueError(f"--{dest.replace('_', '-')} is not valid UTF-8 text")
    n = validate.integer("--num-images", getattr(args, "num_images", 1), 1, validate.MAX_IMAGES)
    for dest in ("height", "width"):
        v = getattr(args, dest, None)
        if v is not None and (validate.integer(f"--{dest}", v, 16, validate.MAX_SIDE) % 16):
            raise ValueError(f"--{dest} {v}: FLUX needs sizes that are multiples of 16")
    if getattr(args, "height", None) and getattr(args, "width", None):
        validate.image_size(args.height, args.width, n, what="--")
    if args.steps is not None:
        validate.integer("--steps", args.steps, 1, validate.MAX_STEPS)
    validate.number("--guidance", args.guidance, 0.0, validate.MAX_GUIDANCE)
    validate.integer("--seed", args.seed, 0, validate.SEED_END - 1)
    ranges = {"lambda_ref": (0, validate.MAX_LAMBDA, True), "lambda_prompt": (0, validate.MAX_LAMBDA, True),
              "tau": (0, 1, False), "strength": (0, 1, True), "true_cfg": (1, validate.MAX_GUIDANCE, False)}
    for dest, (lo, hi, lo_open) in ranges.items():
        if isinstance(getattr(args, dest, None), (int, float)):  # None / a preset's sentinel: not given
            validate.number(f"--{dest.replace('_', '-')}", getattr(args, dest), lo, hi, lo_open)
    if args.device is not None:
        validate.device(args.device)
    pairs = []  # (image, mask) read now, so a bad file costs nothing
    if getattr(args, "ref", None) is not None:
        refs = args.ref if isinstance(args.ref, list) else [args.ref]
        masks = args.mask if isinstance(args.mask, list) else [args.mask] * len(refs)
        pairs += [(r, m, "--ref") for r, m in zip(refs, masks if len(masks) == len(refs) else [None] * len(refs))]
    if getattr(args, "scene", None):
        pairs.append((args.scene, args.scene_mask, "--scene"))
    if getattr(args, "image", None):
        pairs.append((args.image, getattr(args, "mask", None) if getattr(args, "ref", None) is None else None, "--image"))
    for image, mask, flag in pairs:
        load_reference(Reference(image, _mask_arg(mask)), what=f"{flag} {image}")
    args.outputs = output_paths(args.output, n)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # undecodable bytes from the command line arrive as lone surrogates
        return True
    except UnicodeEncodeError:
        return False


def save_images(images, args, pipe, command: str, extra: dict | None = None) -> list[Path]:
    """Save PNGs with their generation parameters as text chunks, like other image tools do. Each file is
    written atomically; if one fails, the error says which were written."""
    from PIL.PngImagePlugin import PngInfo

    from .image import output_paths, save_numbered, save_png
    plan = getattr(args, "outputs", None) or output_paths(args.output, len(images))
    steps = pipe.default_steps if args.steps is None else args.steps
    meta = {"prompt": args.prompt, "seed": args.seed, "steps": steps,
            "guidance": args.guidance if pipe.variant == "dev" else "none (schnell)",
            "size": f"{images[0].width}x{images[0].height}", "model": pipe.name, "variant": pipe.variant,
            "command": command, "minidit_version": __version__, **(extra or {})}
    written: list[Path] = []
    paths = [plan] * len(images) if isinstance(plan, Path) else plan
    for i, (img, path) in enumerate(zip(images, paths)):
        info = PngInfo()
        for k, v in {**meta, "image_index": i}.items():
            info.add_text(k, str(v))
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
        print(f"wrote {path}", file=sys.stderr)
    return written


def cmd_generate(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    cfg = check_cfg(args)
    pipe = load_pipeline(args)
    height, width = default_size(args, pipe)
    images = pipe.generate(args.prompt, height=height, width=width, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, num_images=args.num_images, progress=True,
                           negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg)
    save_images(images, args, pipe, "generate", cfg)


def cmd_img2img(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    if not 0 < args.strength <= 1:
        raise SystemExit(f"error: --strength must be in (0, 1], got {args.strength}")
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (v <= 0 or v % 16):
            raise SystemExit(f"error: {flag} must be a positive multiple of 16, got {v}")
    if not Path(args.image).is_file():
        raise SystemExit(f"error: --image not found: {args.image}")
    cfg = check_cfg(args)
    pipe = load_pipeline(args)
    images = pipe.img2img(args.image, args.prompt, strength=args.strength, height=args.height, width=args.width,
                          steps=args.steps, guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                          negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg, progress=True)
    save_images(images, args, pipe, "img2img", {"image": args.image, "strength": args.strength, **cfg})


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
    pipe = load_pipeline(args)
    ref = Reference(args.ref, _mask_arg(args.mask), args.ref_prompt)
    images = freecus(pipe, args.prompt, ref, caption=args.caption, lambda_ref=args.lambda_ref,
                     lambda_prompt=args.lambda_prompt, vital_layers=vital, ans=not args.no_ans, seed=args.seed,
                     steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                     num_images=args.num_images, progress=True)
    save_images(images, args, pipe, "freecus", {
        "steps": DEFAULT_STEPS[pipe.variant] if args.steps is None else args.steps, "ref": args.ref, "mask": args.mask or "whole image",
        "ref_prompt": args.ref_prompt or "the prompt", "caption": args.caption or "",
        "lambda_ref": args.lambda_ref, "lambda_prompt": args.lambda_prompt,
        "vital_layers": "default" if vital is None else ",".join(map(str, vital)), "ans": not args.no_ans})


def add_freecus_parser(sub) -> None:
    from .freecus import GUIDANCE, LAMBDA_PROMPT, LAMBDA_REF
    p = sub.add_parser("freecus", help="FreeCus: the subject of a reference image in a new scene (training-free)")
    common_args(p, size=False)
    p.set_defaults(guidance=GUIDANCE)
    for action in p._actions:
        if action.dest == "steps":
            action.help = "denoising steps (default 30 dev as the authors, 4 schnell)"
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--ref", required=True, help="reference image (resized to the output size if it differs)")
    p.add_argument("--mask", default=None, help="subject mask of the reference (PNG of the same size, white = "
                   "subject, or a pixel box x,y,w,h; default: the whole image)")
    p.add_argument("--ref-prompt", default=None, help="prompt of the reference (default: the full prompt)")
    p.add_argument("--caption", default=None, help="short subject description, appended as 'PROMPT. CAPTION' "
                   "(see minidit.freecus.DESCRIBE_TEMPLATE for how the authors make it)")
    p.add_argument("--lambda-ref", type=float, default=LAMBDA_REF, help="λ_r, scale of the reference keys")
    p.add_argument("--lambda-prompt", type=float, default=LAMBDA_PROMPT, help="λ_p, scale of the prompt keys on vital layers")
    p.add_argument("--vital-layers", default=None, help="comma-separated attention layers, double blocks first "
                   "(default: FLUX.1's 0,1,2,17,18,25,28,53,54,56, mapped to smaller models)")
    p.add_argument("--no-ans", action="store_true", help="noise the reference like the target (no reversed shift)")
    p.add_argument("--num-images", type=int, default=1)
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
    pipe = load_pipeline(args)
    images = personalize(pipe, args.prompt, refs, placement=placement, scene=scene, tau=args.tau,
                         perturb=not args.no_perturb, positions=args.positions, concat=not args.no_concat,
                         height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
                         seed=args.seed, num_images=args.num_images, progress=True)
    save_images(images, args, pipe, "personalize", {
        "refs": ";".join(args.ref), "masks": ";".join(str(m or "whole image") for m in masks),
        "placement": ";".join(str(p or "in place") for p in placement), "scene": args.scene or "",
        "tau": args.tau, "perturb": not args.no_perturb, "positions": args.positions, "concat": not args.no_concat})


def cmd_inpaint(args) -> None:
    from .personalize import inpaint
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    mask = _mask_arg(args.mask)
    if mask is None:
        raise SystemExit("error: --mask is required (white = the region to repaint, or a box x,y,w,h)")
    pipe = load_pipeline(args)
    images = inpaint(pipe, args.image, mask, args.prompt, tau=args.tau, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, num_images=args.num_images, image_prompt=args.image_prompt, progress=True)
    save_images(images, args, pipe, "inpaint", {"image": args.image, "mask": str(mask), "tau": args.tau})


def cmd_outpaint(args) -> None:
    from .personalize import outpaint
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    canvas = _int_list(args.canvas, 2, "--canvas (WxH)", sep="x")
    offset = None if args.offset is None else _int_list(args.offset, 2, "--offset (x,y)")
    pipe = load_pipeline(args)
    images = outpaint(pipe, args.image, args.prompt, canvas, offset=offset, tau=args.tau, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                      image_prompt=args.image_prompt, progress=True)
    save_images(images, args, pipe, "outpaint", {"image": args.image, "canvas": args.canvas,
                                                 "offset": args.offset or "centred", "tau": args.tau})


def add_personalize_parsers(sub) -> None:
    from .personalize import POSITIONS, TAU, TAU_EDIT
    tau_help = ("τ in the sampler's normalised time: the first (1 - τ) of the steps replace tokens "
                "(%(default)s)")
    p = sub.add_parser("personalize", help="Personalize Anything: the subject of a reference image in a new image")
    common_args(p, size=False)
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--ref", action="append", required=True, help="reference image; repeat for multi-subject")
    p.add_argument("--mask", action="append", default=None, help="subject mask of the reference (PNG, white = "
                   "subject, same size as it) or a pixel box x,y,w,h; once per --ref (default: whole image)")
    p.add_argument("--ref-prompt", action="append", default=None, help="prompt of the reference (default: empty)")
    p.add_argument("--box", action="append", default=None,
                   help="target box x,y,w,h: the subject is centred in it; once per --ref")
    p.add_argument("--offset", action="append", default=None,
                   help="move the subject by dx,dy pixels (multiples of 16); once per --ref")
    p.add_argument("--scene", default=None, help="scene image to compose the subjects into (one more reference)")
    p.add_argument("--scene-mask", default=None, help="scene region (PNG or x,y,w,h; default: all but the subjects)")
    p.add_argument("--scene-prompt", default=None, help="prompt of the scene image (default: empty)")
    p.add_argument("--tau", type=float, default=TAU, help=tau_help)
    p.add_argument("--no-perturb", action="store_true",
                   help="no patch perturbation (3x3 shuffle, 5x5 dilation/erosion)")
    p.add_argument("--positions", choices=POSITIONS, default="target", help="RoPE of the later-stage reference "
                   "tokens: target region (authors' code, default) or zero (paper)")
    p.add_argument("--no-concat", action="store_true", help="no reference tokens in the attention after τ")
    p.add_argument("--num-images", type=int, default=1)
    p.set_defaults(func=cmd_personalize)

    for name, helptext in (("inpaint", "repaint the white region of a mask, keep the rest"),
                           ("outpaint", "extend an image to a larger canvas")):
        p = sub.add_parser(name, help=helptext)
        common_args(p, size=False)
        p.add_argument("--image", required=True)
        if name == "inpaint":
            p.add_argument("--mask", required=True,
                           help="edit mask at the image's size (white = repaint) or a box x,y,w,h")
            p.set_defaults(func=cmd_inpaint)
        else:
            p.add_argument("--canvas", required=True, help="canvas WxH in pixels (multiples of 16), e.g. 1024x768")
            p.add_argument("--offset", default=None, help="x,y of the image's top-left on the canvas (default: centre)")
            p.set_defaults(func=cmd_outpaint)
        p.add_argument("--image-prompt", default="", help="prompt describing the input image (default: empty)")
        p.add_argument("--tau", type=float, default=TAU_EDIT, help=tau_help)
        p.add_argument("--num-images", type=int, default=1)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 1 like every other user error."""

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
    p.add_argument("--num-images", type=int, default=1)
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
    p.add_argument("--num-images", type=int, default=1)
    p.set_defaults(func=cmd_img2img)
    p = sub.add_parser("info", help="what a weights folder contains")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)
    add_freecus_parser(sub)
    add_personalize_parsers(sub)
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
    args = parser.parse_args(_negative_values([a for a in argv if a != "--debug"], parser))
    old = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
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
