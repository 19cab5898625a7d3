"""The `minidit` command line: every subcommand's options, their help and examples.

Options are parsed here; what they mean is in commands.py, what is recorded in the PNG in record.py. This module
imports no torch (only minidit.defaults and minidit.presets), so `minidit --help` and usage errors are instant;
a value left None is the model's (its minidit.json, minidit/defaults.py), which the help shows for the built-in
model and FLUX.1.
"""
from __future__ import annotations

import argparse
import re

from .. import __version__
from ..defaults import (CONCAT_POSITIONS, DTYPE_NAMES, LAMBDA_PROMPT, LAMBDA_REF, MU_SHIFT_TYPES, TAU, TAU_EDIT,
                        builtin_defaults)
from ..presets import PRESETS

BUILTIN = builtin_defaults()  # None if its minidit.json is unreadable (the command then says why)


def model_default(key: str, flux: str, unit: str = "") -> str:
    """'the model's: 256 for the built-in model, FLUX.1 1024' for the help of an option whose default is the
    model's."""
    mine = f"{getattr(BUILTIN, key)}{unit} for the built-in model, " if BUILTIN is not None else ""
    return f"default: the model's: {mine}FLUX.1 {flux}"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 1 like every other user error; every option's help
    ends with its default (unless the text states it) or "(required)"; the options and subcommands are kept in
    `options` and `subcommands` (argparse keeps them only in private fields)."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        self.options: list[argparse.Action] = []   # before argparse's own __init__ adds --help
        self.subcommands: dict[str, Parser] = {}
        super().__init__(*a, **k)

    def add_argument(self, *names, **kw):
        action = super().add_argument(*names, **kw)
        text = action.help or ""
        low = text.lower()
        if action.option_strings and action.default is not argparse.SUPPRESS and "default" not in low:
            if action.required:
                text = text if "required" in low else f"{text} (required)"  # never "(required) (required)"
            elif action.nargs == 0 and action.const is True:  # store_true
                text = f"{text} (default: off)"
            elif action.default is not None:
                text = f"{text} (default: {action.default})"
            action.help = text
        self.options.append(action)
        return action

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common_args(p: argparse.ArgumentParser, size: bool = True, flux_steps: str = "28 dev, 4 schnell") -> None:
    """Arguments every image command shares (weights, device, sampling, output)."""
    p.add_argument("--prompt", action="append", default=None, help="text prompt (may be empty); repeat for "
                   "several prompts in one run (required unless --prompt-file or --from-png)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="one prompt per line, after the --prompt "
                   "ones; blank lines are skipped (default: none)")
    p.add_argument("--weights", default=None, help="FLUX.1 folder, HF cache folder or repo name (offline); "
                   "default: the built-in tiny checkpoint")
    component_args(p)
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]", help="a FLUX.1 LoRA "
                   "(.safetensors: kohya, diffusers/PEFT, BFL incl. Depth/Canny control LoRAs, XLabs) merged into the "
                   "transformer at SCALE (1 if not given); repeatable, the LoRAs add; recorded by file name, "
                   "header fingerprint and scale (default: none)")
    if size:
        size_args(p)
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps ({model_default('steps', flux_steps)})")
    p.add_argument("--guidance", type=float, default=None, help="the embedded guidance of FLUX.1-dev; schnell "
                   "and the built-in model have none and ignore it (default: the model's: 3.5)")
    p.add_argument("--seed", type=int, nargs="+", default=None, help="one or more seeds; image i of a "
                   "--num-images batch uses SEED + i; -1 = random (default: a random seed, printed and recorded)")
    p.add_argument("--output", default="outputs/", help="a folder (ends in /, or exists): numbered names "
                   "COMMAND-NNNN-sSEED.png, never overwriting; or a .png path, replaced atomically if it exists "
                   "(several images: NAME-0.png, NAME-1.png, ...) (default: outputs/)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 on the CPU for a "
                   "narrow model such as the built-in one, where more were far slower on a shared 2-core machine; "
                   "torch's own choice for full-width FLUX.1 and on a GPU; bench/threads.py)")
    p.add_argument("--from-png", default=None, metavar="PNG", help="re-run the image recorded in a minidit "
                   "PNG's metadata (same command); options given here override the recorded ones (default: none)")
    p.add_argument("--record-paths", action="store_true", help="also record the absolute paths of the weights "
                   "and inputs in the PNG (default: off: file names and fingerprints only)")
    p.add_argument("--quiet", action="store_true", help="print only errors and warnings (default: off)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES), help="default bf16 on GPU, fp32 on CPU")
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


def size_args(p: argparse.ArgumentParser, resized: str = "", flux: str = "1024") -> None:
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, default=None, help=f"pixels, multiple of 16{resized} "
                       f"({model_default(side, flux)})")


def cfg_args(p: argparse.ArgumentParser) -> None:
    """True classifier-free guidance with a negative prompt (diffusers' negative_prompt / true_cfg_scale)."""
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (may be empty); needs "
                   "--true-cfg > 1 (default: none)")
    p.add_argument("--true-cfg", type=float, default=None, help="true CFG scale: two forwards per step, "
                   "v = v_neg + scale·(v - v_neg); 1 = off (" + model_default("true_cfg_scale", "1.0 (off)") +
                   "; the built-in model's negative prompt is the empty one)")


def add_freecus_parser(sub) -> None:
    p = sub.add_parser("freecus", help="FreeCus: the subject of a reference image in a new scene (training-free)")
    common_args(p, size=False, flux_steps="30 dev as the authors, 4 schnell")
    size_args(p, "; the reference is resized to it", "(no size stated): the reference's")
    p.add_argument("--ref", required=True, help="reference image (resized to the output size if it differs)")
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
                   "= --mu-shift-type target, so not with --mu-shift-type)")
    p.add_argument("--mu-shift-type", default=None, choices=MU_SHIFT_TYPES, help="the reference's noise schedule "
                   "(their --mu_shift_type; default negative = ANS)")
    p.add_argument("--scene", default=None, help="FLUX.1 Fill only: the scene to inpaint the subject into (the "
                   "paper's §4.4; needs --region) (default: none)")
    p.add_argument("--region", default=None, help="FLUX.1 Fill only: where the subject goes in --scene (PNG of "
                   "its size, white = repaint) (default: none)")
    p.add_argument("--control", default=None, help="FLUX.1 Depth/Canny (or a control LoRA) only: the depth or "
                   "edge map of the output, at its size (default: none)")
    preset_args(p, "FreeCusSettings (minidit.freecus)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")


def preset_args(p: argparse.ArgumentParser, what: str) -> None:
    """--preset and --set: the method's settings (README "Presets"); recorded in the PNG metadata."""
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="paper: what the paper describes (default); official: what the authors' released code does")
    p.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                   help=f"override one field of the preset's {what}, e.g. --set vae_sample=false; repeatable (default: none)")


def add_personalize_parsers(sub) -> None:
    tau_help = ("τ; --preset paper: a step fraction, the first (1 - τ) of the steps replace tokens (default {}); "
                "--preset official: the authors' slider 0..100, compared with the shifted time (default 50)")
    p = sub.add_parser("personalize", help="Personalize Anything: the subject of a reference image in a new image")
    common_args(p, size=False)
    size_args(p, "; the references are resized to it", "(no size stated): the first reference's")
    p.add_argument("--ref", action="append", required=True, help="reference image; repeat for multi-subject")
    p.add_argument("--mask", action="append", default=None, help="subject mask of the reference (PNG, white = "
                   "subject, same size as it) or a pixel box x,y,w,h; once per --ref (default: whole image)")
    p.add_argument("--ref-prompt", action="append", default=None, help="prompt of the reference, used to "
                   "invert it (default: empty, as the authors' demo; freecus's default is the full prompt instead)")
    p.add_argument("--box", action="append", default=None, help="target box x,y,w,h inside the output: the "
                   "subject is centred in it; once per --ref (the API's placement=(x, y, w, h)) (default: none)")
    p.add_argument("--offset", action="append", default=None,
                   help="move the subject by dx,dy pixels (multiples of 16) from where it is in its reference; "
                   "once per --ref (the API's placement=(dx, dy)) (default: 0,0, in place)")
    p.add_argument("--scene", default=None, help="scene image to compose the subjects into (one more reference; default: none)")
    p.add_argument("--scene-mask", default=None, help="scene region (PNG or x,y,w,h; default: all but the subjects)")
    p.add_argument("--scene-prompt", default=None, help="prompt of the scene image (default: empty)")
    p.add_argument("--tau", type=float, default=None, help=tau_help.format(TAU))
    p.add_argument("--no-perturb", action="store_true",
                   help="no patch perturbation (3x3 shuffle, 5x5 dilation/erosion); = --set perturb=false")
    p.add_argument("--positions", choices=CONCAT_POSITIONS, default=None, help="RoPE of the later-stage reference "
                   "tokens: target region (authors' code, default) or zero (paper)")
    p.add_argument("--no-concat", action="store_true", help="no reference tokens in the attention after τ")
    preset_args(p, "PersonalizeSettings (minidit.personalize)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")

    for name, helptext in (("inpaint", "repaint the white region of a mask, keep the rest"),
                           ("outpaint", "extend an image to a larger canvas")):
        p = sub.add_parser(name, help=helptext)
        common_args(p, size=False)
        p.add_argument("--image", required=True, help="input image")
        if name == "inpaint":
            p.add_argument("--mask", required=True,
                           help="edit mask at the image's size (white = repaint) or a box x,y,w,h")
        else:
            p.add_argument("--width", type=int, default=None, help="canvas width in pixels, multiple of 16 "
                           "(the API's canvas=(W, H); required, or --canvas)")
            p.add_argument("--height", type=int, default=None, help="canvas height in pixels, multiple of 16 "
                           "(required, or --canvas)")
            p.add_argument("--canvas", default=None, metavar="WxH", help="the canvas as one value, e.g. 1024x768 "
                           "(an alias of --width/--height; default: none)")
            p.add_argument("--offset", default=None, help="place the image's top-left corner at x,y pixels of "
                           "the canvas (the API's offset=(x, y)) (default: centred)")
        p.add_argument("--image-prompt", default="", help="prompt describing the input image (default: empty)")
        p.add_argument("--tau", type=float, default=None, help=tau_help.format(TAU_EDIT))
        p.add_argument("--blend", action=argparse.BooleanOptionalAction, default=None,
                       help="latent blend of the preserved region at the replacement steps (paper preset: on, "
                       "official: off; default: the preset's)")
        preset_args(p, "EditSettings (minidit.personalize)")
        p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")


def add_family_parsers(sub) -> None:
    """`fill` (FLUX.1 Fill) and `kontext` (FLUX.1 Kontext); Depth/Canny is `generate --control`."""
    p = sub.add_parser("fill", help="FLUX.1 Fill: repaint the white region of a mask, or outpaint (--canvas)")
    common_args(p, size=False, flux_steps="50 (FLUX.1 Fill)")
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--mask", default=None, help="mask at the image's size, white = repaint (or give --canvas) (default: none)")
    p.add_argument("--canvas", default=None, metavar="WxH", help="outpaint: the canvas size; the image is pasted "
                   "at --offset and the new area is repainted (default: none)")
    p.add_argument("--offset", default=None, help="outpaint: the image's top-left corner at x,y of the canvas "
                   "(default: centred)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, default=None, help="pixels, multiple of 16; the image and mask are "
                       "resized to it (default: the image's, floored to a multiple of 16)")
    p.add_argument("--strength", type=float, default=1.0, help="1 = from pure noise (diffusers' strength)")
    guidance_help(p, "30 (FLUX.1 Fill's, BFL and diffusers)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p = sub.add_parser("kontext", help="FLUX.1 Kontext: edit one or several reference images by a prompt")
    common_args(p, size=False, flux_steps="28 (diffusers; BFL's cli_kontext 30)")
    p.add_argument("--image", action="append", required=True, help="reference image; repeat for several "
                   "(ComfyUI's offset placement)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, default=None, help="pixels; with both: their aspect ratio at ~1 MP, "
                       "as diffusers (default: the first reference's preferred resolution, as BFL's cli_kontext)")
    p.add_argument("--max-area", type=int, default=None, help="the pixels a --height/--width request is scaled "
                   "to, at its aspect ratio (default: 1048576 = 1024x1024, diffusers' max_area)")
    p.add_argument("--no-auto-resize", action="store_true", help="keep each reference at its own size (floored to "
                   "16 px) instead of the preferred Kontext resolution of its aspect ratio (diffusers' "
                   "_auto_resize=False)")
    cfg_args(p)
    guidance_help(p, "2.5 (BFL's cli_kontext; diffusers' is 3.5)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")


def guidance_help(p: Parser, default: str) -> None:
    for a in p.options:
        if a.dest == "guidance":
            a.help = f"the embedded guidance (default: {default})"


EXAMPLES = {
    "fill": ['minidit fill --weights ~/models/FLUX.1-Fill-dev --image room.png --mask mask.png --prompt "a red '
             'armchair"', "minidit fill --weights ~/models/FLUX.1-Fill-dev --image room.png --canvas 1024x768 "
             '--prompt "a wide living room"'],
    "kontext": ['minidit kontext --weights ~/models/FLUX.1-Kontext-dev --image cat.png --prompt "the cat wearing '
                'a hat"'],
    "generate": ['minidit generate --prompt "a photo of a cat" --seed 7 --num-images 4 --output cats/',
                 'minidit generate --weights ~/models/FLUX.1-dev --lora flux1-depth-dev-lora.safetensors '
                 '--control depth.png --prompt "a robot in a forest"',
                 'minidit generate --weights ~/models/FLUX.1-dev --lora style.safetensors:0.8 --prompt "a cat"',
                 "minidit generate --weights black-forest-labs/FLUX.1-dev --prompt-file prompts.txt --seed 1 2 3",
                 "minidit generate --from-png cats/generate-0002.png --output again.png   # the same pixels"],
    "img2img": ['minidit img2img --image photo.png --prompt "the same photo as a watercolour" --strength 0.6'],
    "info": ["minidit info ~/models/FLUX.1-dev"],
    "eval": ["minidit eval --world --out runs/world --steps 16 --methods plain,personalize:official,freecus:paper",
             "minidit eval --help   # every option of the harness (the same as python -m minidit.eval --help)"],
    "freecus": ['minidit freecus --ref cat.png --mask cat_mask.png --prompt "a cat wearing a space suit" '
                '--caption "a grey tabby cat"'],
    "personalize": ['minidit personalize --ref cat.png --mask cat_mask.png --prompt "a cat on the beach" '
                    "--offset 128,0",
                    "minidit personalize --ref a.png --mask 0,0,256,512 --ref b.png --mask 256,0,256,512 "
                    '--prompt "two toys on a shelf"'],
    "inpaint": ['minidit inpaint --image photo.png --mask edit_mask.png --prompt "a castle on the hill"'],
    "outpaint": ['minidit outpaint --image photo.png --width 1536 --height 1024 --prompt "a wide mountain valley"'],
}


def build_parser() -> Parser:
    parser = Parser(prog="minidit", description="A minimal FLUX.1 with training-free personalization")
    parser.add_argument("--version", action="version", version=f"minidit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="text to image")
    common_args(p)
    cfg_args(p)
    p.add_argument("--control", default=None, help="FLUX.1 Depth/Canny (or dev + a control LoRA): the depth or "
                   "edge map, at the output's size (default size: its own) (default: none)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p = sub.add_parser("img2img", help="image to image (diffusers' FluxImg2ImgPipeline)")
    common_args(p, size=False)
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--strength", type=float, default=0.6, help="how much to change: 1 = from pure noise, "
                   "small = close to the input; the last strength·steps steps run (default 0.6)")
    size_args(p, "; the image is resized to it", "(no size stated): the image's, rounded down to 16")
    cfg_args(p)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt and seed (default: 1)")
    p = sub.add_parser("info", help="what a weights folder contains")
    p.add_argument("path", help="a FLUX.1 folder, a Hugging Face cache folder or repo name (offline), or a "
                   ".safetensors file: lists its components, variant, dtypes and what is missing")
    add_freecus_parser(sub)
    add_personalize_parsers(sub)
    add_family_parsers(sub)
    # `minidit eval ...` is handed whole to the harness's own parser (minidit/eval/command.py) by main()
    p = sub.add_parser("eval", help="the DreamBench evaluation harness (python -m minidit.eval)", add_help=False)
    p.add_argument("options", nargs=argparse.REMAINDER, help="the harness's options: minidit eval --help")
    parser.subcommands = dict(sub.choices)
    for name, p in parser.subcommands.items():
        p.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
    return parser


NEGATIVE = re.compile(r"-\d[-\d.,x]*")  # -16,0  -16,-32  -1.5: a value, not an option


def negative_values(argv: list[str], parser: Parser) -> list[str]:
    """`--offset -16,0` -> `--offset=-16,0`: argparse would take "-16,0" for an option."""
    takes_value = {o for p in [parser, *parser.subcommands.values()] for a in p.options if a.nargs != 0
                   for o in a.option_strings}
    out: list[str] = []
    for a in argv:
        if "--" not in out and out and out[-1] in takes_value and NEGATIVE.fullmatch(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


