"""What each `minidit` subcommand does with its parsed options: check every option and input file before any
model loads, load the pipeline, run the method for every (prompt, seed), and save each image with its record.

Without --weights the built-in tiny checkpoint is used (weights/trained: a tiny FLUX.1 trained on minidit's
procedural world of shapes). Every value an option leaves unset is the model's (`model_defaults`: its
minidit.json, read before it loads), written into the options before anything runs, so the record holds what ran.

Threads (--threads): on the CPU 1 for a narrow transformer (the built-in model: the same pixels on any core count;
2 threads were 26x slower on a shared machine), else torch's choice (FLUX.1's width); bench/threads.py, RESULTS.md.
"""
from __future__ import annotations

import re
import secrets
import warnings

import torch

from .. import attention, family, validate
from ..defaults import FLUX_SIDE, ModelDefaults
from ..freecus import FreeCusSettings, check_vital_layers, default_steps as freecus_steps, freecus
from ..flux_loading import open_transformer
from ..image import open_image, output_paths
from ..loading import CheckpointError
from ..lora import parse_lora_arg
from ..masks import Reference, box_mask, load_reference
from ..personalize import EditSettings, PersonalizeSettings, inpaint, outpaint, personalize
from ..pipeline import Pipeline
from ..presets import PRESET
from ..regions import paste_box
from ..repository import builtin_repo, resolve_weights
from . import record
from .info import inspect

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
MAX_THREADS = 1024
NARROW = 1024  # transformer width below which the CPU default is 1 thread (bench/threads.py)


def execute(args, parser) -> None:
    """Run the parsed command (main() imports this module only after parsing: see cli/__init__.py)."""
    if getattr(args, "from_png", None):
        args = record.from_png(args, parser)
    if args.command != "info":
        set_threads(args)
        if args.seed and -1 in args.seed:  # -1 = random (A1111/ComfyUI): drawn, printed and recorded
            args.seed = None if args.seed == [-1] else [secrets.randbelow(record.SEED_RANGE) if s == -1 else s
                                                        for s in args.seed]
    COMMANDS[args.command](args)


def set_threads(args) -> None:
    """--threads N (checked before anything else); the default is set by `default_threads` once the weights are
    known."""
    if args.threads is not None:
        validate.integer("--threads", args.threads, 1, MAX_THREADS)
        torch.set_num_threads(args.threads)


def default_threads(args) -> None:
    """Without --threads, on the CPU: 1 thread for a transformer narrower than NARROW (read from its header),
    torch's own choice otherwise (see the module docstring)."""
    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if args.threads is None and cpu:
        if open_transformer(record.weight_paths(args)["transformer"])[1].hidden_size < NARROW:
            torch.set_num_threads(1)


def model_defaults(args) -> ModelDefaults:
    """The model's recommended values (defaults.py: its minidit.json), read before it loads: the built-in model's,
    the --weights folder's, FLUX.1's for separate component files."""
    if builtin(args):
        return ModelDefaults.read(builtin_repo())
    if args.weights is not None and args.transformer is None:
        try:
            root = resolve_weights(args.weights)
        except (CheckpointError, OSError):  # named by load_pipeline's weights check, after the options' checks
            return ModelDefaults()
        return ModelDefaults.read(root) if root.is_dir() else ModelDefaults()
    return ModelDefaults()


def apply_defaults(args, sized: bool = True) -> ModelDefaults:
    """Every option left unset that the model decides (size unless `sized` is False, steps when the model's file
    states them, guidance, true CFG and its negative prompt) set to the model's value; a size far from the
    model's training is a warning now, before anything loads."""
    d = model_defaults(args)
    args.guidance = d.guidance if args.guidance is None else args.guidance
    args.steps = d.steps if args.steps is None else args.steps
    if sized:  # an input image's command keeps its size on a model that states none (FLUX.1; defaults.py)
        own = (FLUX_SIDE, FLUX_SIDE) if args.command == "generate" else (None, None)
        args.height, args.width = d.size(args.height, args.width, own)
        validate.given_size(args.height, args.width, what="--")
        if args.height and args.width and (far := d.size_warning(args.height, args.width)) is not None:
            warnings.warn(far)
            warnings.filterwarnings("ignore", message=re.escape(far))  # the library would say it again
    if hasattr(args, "true_cfg"):
        args.true_cfg = d.true_cfg_scale if args.true_cfg is None else args.true_cfg
        if args.negative_prompt is None and isinstance(args.true_cfg, (int, float)) and args.true_cfg > 1:
            args.negative_prompt = d.negative_prompt
    return d


def check_cfg(args) -> dict:
    """--negative-prompt and --true-cfg only together (their ranges: check_inputs); -> their record. Unset: the
    model's (apply_defaults)."""
    if args.true_cfg > 1 and args.negative_prompt is None:
        raise SystemExit("error: --true-cfg > 1 needs --negative-prompt (it may be empty: --negative-prompt '')")
    if args.true_cfg == 1 and args.negative_prompt is not None:
        raise SystemExit("error: --negative-prompt has no effect unless --true-cfg > 1 (e.g. --true-cfg 4)")
    return {"negative_prompt": args.negative_prompt or "", "true_cfg": args.true_cfg}


def builtin(args) -> bool:
    """No --weights and no single component files: the built-in trained tiny model."""
    return args.weights is None and not any(getattr(args, k, None) for k in
                                            ("transformer", "ae", "t5", "clip", "t5_tokenizer", "clip_tokenizer"))


def load_pipeline(args, checked: bool = False):
    """The pipeline the options name; first (unless `checked`: `_settings` ran them) the checks of every option,
    input file and the output path, so a bad one costs no model load."""
    if not checked:
        check_inputs(args)
    weights = record.check_weights(args)  # what --weights / --transformer ... name, and what is missing
    default_threads(args)
    if builtin(args):
        record.say(args, "no --weights: using the built-in tiny FLUX.1 trained on minidit's procedural world of "
                           "shapes (weights/trained, 18 MB; it draws coloured shapes, not photos)")
    record.say(args, record.loading_line(record.weights_record(args)))
    pipe = Pipeline.load(weights, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                         offload=args.offload, loras=loras(args), **record.component_files(args))
    if args.steps is None:  # the checkpoint's rule (28 dev, 4 schnell), known once it is loaded: recorded as run
        args.steps = freecus_steps(pipe) if args.command == "freecus" else pipe.default_steps
    return pipe


def loras(args) -> list[tuple[str, float]]:
    """--lora PATH[:SCALE] (repeatable) -> Pipeline.load's loras=[(path, scale), ...]."""
    return [parse_lora_arg(text) for text in getattr(args, "lora", None) or []]


def cmd_generate(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    if args.control:  # the output has the control map's size unless given (then they must agree: family.py)
        im = open_image(args.control, "--control")
        args.height, args.width = args.height or im.height, args.width or im.width
    apply_defaults(args)
    cfg = check_cfg(args)
    todo = record.plan(args)
    pipe = load_pipeline(args)
    record.run(args, pipe, "generate", todo, lambda prompt, seed: pipe.generate(
        prompt, height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, seed=seed,
        progress=not args.quiet, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg,
        control_image=args.control), {**cfg, **({"control": args.control} if args.control else {})})


def require_member(args, variant: str, message: str) -> None:
    """The FLUX.1 family member of the transformer the options name, from its header (nothing loads; a
    repository root as Pipeline.load reads it, so a diffusers Kontext folder is told by its model_index.json)."""
    src = record.component_files(args).get("transformer") or record.weights_root(args)
    have = open_transformer(src)[1].variant
    if have != variant:
        raise ValueError(f"{message}; the weights are FLUX.1 {have}")


def cmd_fill(args) -> None:
    """FLUX.1 Fill (family.py): --mask inpaints, --canvas outpaints."""
    if (args.mask is None) == (args.canvas is None):
        raise SystemExit("error: fill needs --mask (inpaint) or --canvas WxH (outpaint), one of them")
    canvas = int_list(args.canvas, 2, "--canvas (WxH)", sep="x") if args.canvas else None
    offset = None if args.offset is None else int_list(args.offset, 2, "--offset (x,y)")
    guidance = args.guidance  # FLUX.1 Fill's 30 unless given (not the model folder's generate default)
    apply_defaults(args, sized=False)
    args.guidance = family.FILL_GUIDANCE if guidance is None else guidance
    args.steps = family.FILL_STEPS if args.steps is None else args.steps
    require_member(args, "fill", "minidit fill needs a FLUX.1 Fill model (img_in 384 wide)")
    if canvas is None:
        family.fill_inputs(args.image, args.mask, args.height, args.width)  # sizes checked before loading
    else:
        validate.image_size(canvas[1], canvas[0], what="canvas ")
    todo = record.plan(args)
    pipe = load_pipeline(args)

    def one(prompt, seed):
        kw = dict(steps=args.steps, guidance=args.guidance, seed=seed, progress=not args.quiet)
        if canvas is not None:
            return pipe.fill_outpaint(args.image, prompt, canvas, offset=offset, **kw)
        return pipe.fill(args.image, args.mask, prompt, height=args.height, width=args.width,
                         strength=args.strength, **kw)
    record.run(args, pipe, "fill", todo, one, {"image": args.image, "mask": args.mask or "the new area",
                                               "canvas": args.canvas or "", "strength": args.strength})


def cmd_kontext(args) -> None:
    """FLUX.1 Kontext (family.py): one or several --image references."""
    require_member(args, "kontext", "minidit kontext needs a FLUX.1 Kontext model (flux1-kontext-dev*)")
    guidance = args.guidance  # BFL's 2.5 unless given
    apply_defaults(args, sized=False)
    args.guidance = family.KONTEXT_GUIDANCE if guidance is None else guidance
    args.steps = family.KONTEXT_STEPS if args.steps is None else args.steps
    area = family.KONTEXT_MAX_AREA if args.max_area is None else args.max_area
    sizing = dict(max_area=validate.integer("--max-area", area, 256, 4096 ** 2), auto_resize=not args.no_auto_resize)
    cfg = check_cfg(args)
    todo = record.plan(args)
    pipe = load_pipeline(args)
    record.run(args, pipe, "kontext", todo, lambda prompt, seed: pipe.kontext(
        args.image, prompt, height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
        seed=seed, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg, progress=not args.quiet,
        **sizing), {"images": ";".join(args.image), **sizing, **cfg})


def cmd_img2img(args) -> None:
    apply_defaults(args)  # the model's size; the image is resized to it (as diffusers)
    cfg = check_cfg(args)
    todo = record.plan(args)
    pipe = load_pipeline(args)  # checks --strength, --image, the sizes, ... before loading
    record.run(args, pipe, "img2img", todo, lambda prompt, seed: pipe.img2img(
        args.image, prompt, strength=args.strength, height=args.height, width=args.width, steps=args.steps,
        guidance=args.guidance, seed=seed, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg,
        progress=not args.quiet), {"image": args.image, "strength": args.strength, **cfg})


def cmd_info(args) -> None:
    report, ok = inspect(args.path)
    print(report)
    if not ok:
        raise SystemExit(1)


def cmd_freecus(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    if args.no_ans and args.mu_shift_type is not None:
        raise SystemExit("error: --no-ans means --mu-shift-type target: give one of them, not both")
    if args.scene and args.guidance is None:  # FreeCus on FLUX.1 Fill: Fill's guidance 30
        args.guidance = family.FILL_GUIDANCE
    apply_defaults(args)
    vital = None
    if args.vital_layers is not None:
        try:
            vital = [int(i) for i in args.vital_layers.split(",") if i.strip()]
        except ValueError:
            raise SystemExit(f"error: --vital-layers must be comma-separated integers, got {args.vital_layers!r}") from None
        if not vital:  # an empty list would silently be plain generation
            raise SystemExit("error: --vital-layers is empty: FreeCus needs at least one layer (omit it for the default)")
        try:  # against the transformer's layers, from its file header (nothing loads)
            check_vital_layers(vital, open_transformer(record.weight_paths(args)["transformer"])[1].n_layers)
        except ValueError as e:
            raise ValueError(f"--vital-layers: {e}") from None
    todo = record.plan(args)
    settings = method_settings(FreeCusSettings, args, lambda_ref=args.lambda_ref, lambda_prompt=args.lambda_prompt,
                         vital_layers=None if vital is None else tuple(vital),
                         mu_shift_type="target" if args.no_ans else args.mu_shift_type)
    pipe = load_pipeline(args, checked=True)
    ref = Reference(args.ref, mask_arg(args.mask), args.ref_prompt)
    record.run(args, pipe, "freecus", todo, lambda prompt, seed: freecus(
        pipe, prompt, ref, caption=args.caption, preset=settings, seed=seed, steps=args.steps,
        guidance=args.guidance, height=args.height, width=args.width, progress=not args.quiet,
        image=args.scene, mask=args.region, control_image=args.control), {
        **{k: v for k in ("scene", "region", "control") if (v := getattr(args, k))},
        "steps": args.steps, "ref": args.ref, "mask": args.mask or "whole image",
        "ref_prompt": args.ref_prompt or "the prompt", "caption": args.caption or "",
        "preset": args.preset, **settings.asdict()})


# -- Personalize Anything: personalize / inpaint / outpaint (minidit/personalize.py) ----------------------------

def int_list(text: str, n: int, what: str, sep: str = ",") -> tuple[int, ...]:
    """n integers, each within ±validate.MAX_SIDE (a pixel offset, box or size: a huge one is a named error)."""
    try:
        vals = tuple(int(v) for v in text.split(sep))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise SystemExit(f"error: {what} must be {n} integers separated by '{sep}', got {text!r}")
    for v in vals:
        validate.integer(what, v, -validate.MAX_SIDE, validate.MAX_SIDE)
    return vals


def mask_arg(text: str | None):
    """A mask argument: a PNG path, or a pixel box 'x,y,w,h' as shorthand."""
    if text is None or text.lower() == "none":
        return None
    if re.fullmatch(r"\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*", text):
        return int_list(text, 4, "a box mask")
    return text


FLAGS = {"perturb": "--no-perturb", "concat": "--no-concat", "mu_shift_type": "--mu-shift-type/--no-ans"}


def method_settings(cls, args, **flags):
    """The preset with the dedicated flags (None = not given) and every --set FIELD=VALUE applied; a field given
    both ways is an error, as the API treats it. The CLI's own checks run first (so a bad flag keeps its --flag
    message); the command's load_pipeline then skips them."""
    check_inputs(args)
    given = {k: (PRESET if v is None else v) for k, v in flags.items()}
    sets = cls.parse(args.set)
    for k in sets:
        if flags.get(k) is not None:
            flag = FLAGS.get(k, f"--{k.replace('_', '-')}")
            raise ValueError(f"{flag} and --set {k}=... both set {k}: give one of them")
    return cls.resolve(args.preset, **{**given, **sets})


def per_ref(values, n: int, flag: str) -> list:
    if not values:
        return [None] * n
    if len(values) != n:
        raise SystemExit(f"error: give {flag} once per --ref ({n} references, {len(values)} {flag})")
    return list(values)


def cmd_personalize(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    n = len(args.ref)
    masks = [mask_arg(m) for m in per_ref(args.mask, n, "--mask")]
    prompts = per_ref(args.ref_prompt, n, "--ref-prompt")
    if args.box and args.offset:
        raise SystemExit("error: place the subjects with --box or with --offset, not both")
    apply_defaults(args)  # the model's size; the references are resized to it
    if args.box:
        placement = [int_list(b, 4, "--box (x,y,w,h)") for b in per_ref(args.box, n, "--box")]
    else:
        placement = [None if o is None else int_list(o, 2, "--offset (dx,dy)")
                     for o in per_ref(args.offset, n, "--offset")]
    refs = [Reference(r, m, p) for r, m, p in zip(args.ref, masks, prompts)]
    scene = Reference(args.scene, mask_arg(args.scene_mask), args.scene_prompt) if args.scene else None
    if args.box:  # a target box lies inside the output (a model that states no size: the first reference's)
        first = open_image(args.ref[0], "--ref") if args.height is None or args.width is None else None
        out_h, out_w = args.height or first.height, args.width or first.width
    for b in placement if args.box else []:
        try:
            box_mask(b, out_h, out_w)
        except ValueError as e:
            raise ValueError(f"--box: {e}") from None
    todo = record.plan(args)
    settings = method_settings(PersonalizeSettings, args, tau=args.tau, perturb=False if args.no_perturb else None,
                         positions=args.positions, concat=False if args.no_concat else None)
    pipe = load_pipeline(args, checked=True)
    record.run(args, pipe, "personalize", todo, lambda prompt, seed: personalize(
        pipe, prompt, refs, placement=placement, scene=scene, preset=settings, height=args.height,
        width=args.width, steps=args.steps, guidance=args.guidance, seed=seed, progress=not args.quiet), {
        "refs": ";".join(args.ref), "masks": ";".join(str(m or "whole image") for m in masks),
        "placement": ";".join(str(p or "in place") for p in placement), "scene": args.scene or "",
        "preset": args.preset, **settings.asdict()})


def cmd_inpaint(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    mask = mask_arg(args.mask)
    if mask is None:
        raise SystemExit("error: --mask is required (white = the region to repaint, or a box x,y,w,h)")
    apply_defaults(args, sized=False)  # the output has the image's size
    todo = record.plan(args)
    settings = method_settings(EditSettings, args, tau=args.tau, blend=args.blend)
    pipe = load_pipeline(args, checked=True)
    record.run(args, pipe, "inpaint", todo, lambda prompt, seed: inpaint(
        pipe, args.image, mask, prompt, preset=settings, steps=args.steps, guidance=args.guidance, seed=seed,
        image_prompt=args.image_prompt, progress=not args.quiet),
        {"image": args.image, "mask": str(mask), "image_prompt": args.image_prompt, "preset": args.preset,
         **settings.asdict()})


def cmd_outpaint(args) -> None:
    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    if args.canvas is not None and (args.width or args.height):
        raise SystemExit("error: give the canvas as --width/--height or as --canvas WxH, not both")
    if args.canvas is None and not (args.width and args.height):
        raise SystemExit("error: outpaint needs the canvas: --width W --height H (or --canvas WxH)")
    canvas = int_list(args.canvas, 2, "--canvas (WxH)", sep="x") if args.canvas else (args.width, args.height)
    offset = None if args.offset is None else int_list(args.offset, 2, "--offset (x,y)")
    apply_defaults(args, sized=False)  # the canvas is the output's size
    validate.image_size(canvas[1], canvas[0], what="canvas ")
    todo = record.plan(args)
    settings = method_settings(EditSettings, args, tau=args.tau, blend=args.blend)
    im = open_image(args.image, "--image")  # any size; it must meet the canvas as the settings paste it
    try:
        paste_box(im.height, im.width, canvas, offset, settings.paste)
    except ValueError as e:
        raise ValueError(f"--offset/--canvas: {e}") from None
    pipe = load_pipeline(args, checked=True)
    record.run(args, pipe, "outpaint", todo, lambda prompt, seed: outpaint(
        pipe, args.image, prompt, canvas, offset=offset, preset=settings, steps=args.steps, guidance=args.guidance,
        seed=seed, image_prompt=args.image_prompt, progress=not args.quiet), {"image": args.image, "canvas": "{}x{}".format(*canvas),
                                                 "offset": args.offset or "centred", "preset": args.preset,
                                                 **settings.asdict()})


def check_inputs(args) -> None:
    """Options, input images/masks and the output path checked before any model loads: one named error each."""
    for dest in ("prompt", "ref_prompt", "scene_prompt", "image_prompt", "negative_prompt", "caption"):
        for text in (lambda v: v if isinstance(v, list) else [v])(getattr(args, dest, None)):
            if text is not None and not utf8(text):
                raise ValueError(f"--{dest.replace('_', '-')} is not valid UTF-8 text")
    n = validate.integer("--num-images", getattr(args, "num_images", 1), 1, validate.MAX_IMAGES)
    validate.given_size(getattr(args, "height", None), getattr(args, "width", None), n, what="--")
    if args.steps is not None:
        validate.integer("--steps", args.steps, 1, validate.MAX_STEPS)
    validate.number("--guidance", args.guidance, 0.0, validate.MAX_GUIDANCE)
    for s in (args.seed if isinstance(args.seed, list) else [args.seed]):  # the CLI's --seed takes several
        if isinstance(s, int) and s < 0:  # -1 was replaced by a random seed before this check
            raise ValueError(f"--seed must be >= 0 (or -1 for a random seed), got {s}")
        validate.integer("--seed", s, 0, validate.SEED_END - n)  # image i of a batch uses seed + i
    ranges = {"lambda_ref": (0, validate.MAX_LAMBDA, True), "lambda_prompt": (0, validate.MAX_LAMBDA, True),
              "tau": (0, 100, False), "strength": (0, 1, True), "true_cfg": (1, validate.MAX_GUIDANCE, False)}
    for dest, (lo, hi, lo_open) in ranges.items():
        if isinstance(getattr(args, dest, None), (int, float)):  # None / a preset's sentinel: not given
            validate.number(f"--{dest.replace('_', '-')}", getattr(args, dest), lo, hi, lo_open)
    if args.device is not None:
        validate.device(args.device)
    attention.check_backend()  # MINIDIT_ATTENTION
    pairs = []  # (image, mask) read now, so a bad file costs nothing
    if getattr(args, "ref", None) is not None:
        refs = args.ref if isinstance(args.ref, list) else [args.ref]
        masks = args.mask if isinstance(args.mask, list) else [args.mask] * len(refs)
        pairs += [(r, m, "--ref") for r, m in zip(refs, masks if len(masks) == len(refs) else [None] * len(refs))]
    if getattr(args, "scene", None) and args.command == "personalize":  # freecus' Fill scene is resized
        pairs.append((args.scene, args.scene_mask, "--scene"))
    if getattr(args, "image", None) and args.command == "inpaint":  # the output has its size: multiples of 16
        pairs.append((args.image, args.mask, "--image"))
    elif getattr(args, "image", None):  # img2img resizes it, outpaint and fill paste it: any size; kontext: several
        for image in args.image if isinstance(args.image, list) else [args.image]:
            open_image(image, "--image")
    for flag in ("control", "region", "scene"):
        if getattr(args, flag, None):
            open_image(getattr(args, flag), f"--{flag}")
    for image, mask, flag in pairs:  # (x, y, w, h) box masks are checked against their image here too
        load_reference(Reference(image, mask_arg(mask)), what=f"{flag} {image}")
    args.outputs = output_paths(args.output, getattr(args, "total_images", n))  # prompts x seeds x n (cli)


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # undecodable bytes from the command line arrive as lone surrogates
        return True
    except UnicodeEncodeError:
        return False


COMMANDS = {"generate": cmd_generate, "img2img": cmd_img2img, "info": cmd_info, "freecus": cmd_freecus,
            "personalize": cmd_personalize, "inpaint": cmd_inpaint, "outpaint": cmd_outpaint, "fill": cmd_fill,
            "kontext": cmd_kontext}
