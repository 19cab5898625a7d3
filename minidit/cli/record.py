"""What the CLI records in every PNG so that the image can be made again, how `--from-png` re-reads it, and the
CLI's image loop that samples, records and saves every image as soon as it is made.

    todo = plan(args)               # the (prompt, seed) of every image, counted and bounded, made as needed
    rec = record(args, pipe, "generate", prompt, seed, image, weights, extra)   # one image's dict
    add_chunks(info, rec)           # -> PNG text chunks: A1111-style "parameters" and the JSON chunk "minidit"
    read_png("out.png")             # -> the JSON record; `minidit generate --from-png out.png` re-runs it

Seeds (README "Seeds"): without --seed a random one is drawn and printed; in the CLI image i of a batch uses
seed + i with its own generator, and each image is sampled alone, so every image is reproducible by itself
from the seed recorded in it (the Python API keeps diffusers' one generator per batch).

Counts: a run makes at most MAX_IMAGES_PER_RUN images (prompts x seeds x --num-images), checked while the prompts
are counted, before anything is planned; the prompts of a --prompt-file are then read again line by line as the
images are made, and each image is written (atomically) as soon as it is decoded, so a run of any length holds
one image at a time and an interrupt keeps every finished one.

Privacy: a record names files, never where they are: the weights by their folder's or file's name and a
fingerprint, each input by the relative path it was given as (or its file name) and a SHA-256. `--record-paths`
adds the absolute paths. The weights fingerprint is a SHA-256 over the safetensors headers (tensor names, dtypes,
shapes, offsets) and the small JSON/tokenizer files of every component, plus the repository's scheduler config and
minidit.json, never the tensor data: a 23 GB checkpoint is fingerprinted in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .. import __version__, attention, files
from ..image import output_paths, save_numbered, save_png
from ..lora import lora_info, parse_lora_arg
from ..repository import WeightPaths, builtin_repo, resolve_weights, shipped
from .rerun import BOX, INPUTS, JSON_KEY, OPTIONS, read_png, recorded_inputs, recorded_options

SEED_RANGE = 2 ** 32  # random seeds are drawn from [0, 2^32), as A1111 and BFL's CLI do
MAX_IMAGES_PER_RUN = 1_000_000  # prompts x seeds x --num-images (README "Safety")
# --flag per component (Pipeline.load's keyword -> the CLI option's dest)
COMPONENTS = {"transformer": "transformer", "ae": "ae", "text_encoder_2": "t5", "text_encoder": "clip",
              "tokenizer_2": "t5_tokenizer", "tokenizer": "clip_tokenizer"}
SMALL_FILES = (".json", ".txt", ".model")  # configs, tokenizer files: fingerprinted whole
ROOT_FILES = ("scheduler/scheduler_config.json", "minidit.json")  # read from the repository root: change pixels


# ------------------------------------------------------------------------------------------ prompts, seeds

def prompts(args):
    """--prompt (repeatable) then every non-blank line of --prompt-file, in order, read as they are needed."""
    yield from args.prompt or []
    if getattr(args, "prompt_file", None):
        for line in files.read_lines(args.prompt_file, "--prompt-file"):
            if line.strip():
                yield line.strip()


class Plan:
    """The (prompt, seed) of every image: each prompt x each --seed S x S + i for i < --num-images, made as they
    are iterated (nothing is held); len() is the total `plan` counted."""

    def __init__(self, args, total: int):
        self.args, self.total = args, total

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        n = 0
        for prompt in prompts(self.args):
            for s in self.args.seed:
                for i in range(self.args.num_images):
                    n += 1
                    if n > self.total:
                        raise ValueError(f"--prompt-file {self.args.prompt_file}: changed while running (more "
                                         "prompts than were counted)")
                    yield prompt, s + i


def plan(args) -> Plan:
    """Before loading: count the images (bounded by MAX_IMAGES_PER_RUN before anything is planned, in time
    proportional to the prompt file), draw a random seed when none is given, and check that no planned output
    file is the --from-png image."""
    if not args.seed:
        args.seed, args.random_seed = [secrets.randbelow(SEED_RANGE)], True  # printed once the inputs are checked
    per = len(args.seed) * max(args.num_images, 0)
    count = 0
    for _ in prompts(args):
        count += 1
        if count * per > MAX_IMAGES_PER_RUN:
            raise ValueError(f"more than {MAX_IMAGES_PER_RUN:,} images in one run (prompts x {len(args.seed)} "
                             f"seed(s) x --num-images {args.num_images}): split the run")
    if not count and getattr(args, "prompt_file", None) and not args.prompt:
        raise ValueError(f"--prompt-file {args.prompt_file}: no prompt in it (one prompt per line)")
    if not count:
        raise ValueError("--prompt is required (repeat it, or use --prompt-file FILE with one prompt per line)")
    args.total_images = count * per
    not_the_source(args, output_paths(args.output, args.total_images))
    return Plan(args, args.total_images)


def not_the_source(args, target, path: Path | None = None) -> None:
    """Refuse an output file that is the --from-png image (compared as files: after ".png" is added, after
    numbering, through any spelling or hard link). Numbered names in a folder never replace a file."""
    src = getattr(args, "from_png", None)
    if not src or isinstance(target, Path) and path is None:
        return
    for p in [path] if path is not None else target.taken():
        if os.path.lexists(p) and os.path.samefile(p, src):
            raise ValueError(f"--output {args.output}: would overwrite the --from-png image {src} (as {p}); "
                             "pass another --output")


def say(args, line: str) -> None:
    """One status line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(line, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------- weights

def component_files(args) -> dict[str, str]:
    """Pipeline.load's per-component keywords from --transformer, --ae, --t5, --clip, --*-tokenizer."""
    return {k: str(Path(getattr(args, dest)).expanduser().resolve()) for k, dest in COMPONENTS.items()
            if getattr(args, dest, None)}


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 (first 16 hex digits) over the names and safetensors headers of every weight file under `paths`
    (files or folders; absent ones are skipped), plus small config/tokenizer files whole; never the tensor data.
    Every read goes through the guarded reader: a FIFO where a weight file belongs is refused, never opened."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        if not os.path.lexists(root):
            continue
        found = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in found:
            name = (f.relative_to(root) if f != root else Path(f.name)).as_posix().encode() + b"\0"
            if f.suffix == ".safetensors":
                h.update(name + files.safetensors_header(f, "weights file"))
            elif f.suffix in SMALL_FILES:
                h.update(name + files.read_bytes(f, "weights file", files.LIMITS["json"]))
    return h.hexdigest()[:16]


def weights_root(args) -> Path:
    if args.weights is None and not component_files(args):
        return builtin_repo()
    if args.weights is None:
        return Path(component_files(args)["transformer"]).parent
    return resolve_weights(args.weights)


def weight_paths(args) -> dict[str, Path]:
    """The file or folder every component is read from (as Pipeline.load finds them)."""
    return vars(WeightPaths.find(weights_root(args), **component_files(args)))


def shown(path, args, root: Path | None = None) -> str:
    """How a record names a local file: its path inside `root`, else its name; the absolute path only with
    --record-paths."""
    p = Path(path)
    if getattr(args, "record_paths", False):
        return str(p.expanduser().resolve())
    if root is not None and p.resolve().is_relative_to(root.resolve()):
        return p.resolve().relative_to(root.resolve()).as_posix()
    return p.name


def weights_record(args) -> dict:
    """Names and the header fingerprint of the weights, and their size in GB per component."""
    root, paths = weights_root(args), weight_paths(args)
    sizes = {k: sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*.safetensors"))) / 1e9
             for k, p in paths.items()}
    if args.weights is None:
        name = "built-in" if not component_files(args) else "separate files"
    else:  # a repo name stays as given; a local folder is named, not located
        name = shown(args.weights, args) if Path(args.weights).expanduser().exists() else str(args.weights)
    loras = [Path(parse_lora_arg(text)[0]) for text in getattr(args, "lora", None) or []]  # headers change pixels
    return {"weights": name, "files": {k: shown(p, args, root) for k, p in paths.items()},
            "fingerprint": fingerprint([*paths.values(), *(root / f for f in ROOT_FILES), *loras]),
            "gb": {k: v for k, v in sizes.items() if v}}


def loading_line(rec: dict) -> str:
    """'loading transformer 23.80 GB, text_encoder_2 9.52 GB, ... (NAME, fingerprint ...)'"""
    parts = ", ".join(f"{k} {v:.3g} GB" for k, v in rec["gb"].items())
    return f"loading {parts} ({rec['weights']}, fingerprint {rec['fingerprint']})"


# ------------------------------------------------------------------------------------------- the record

def input_name(path, args) -> str:
    """An input file as recorded: the relative path it was given as (without '..'), else its file name."""
    p = Path(path)
    return p.as_posix() if not p.is_absolute() and ".." not in p.parts else p.name


def inputs(args) -> dict:
    """{flag: [{"file": name, "sha256": ...} | {"box": "x,y,w,h"} | {"none": true}, ...]} of every input image
    and mask (a repeated option keeps one entry per value, in order)."""
    out = {}
    for dest in INPUTS:
        values = getattr(args, dest, None)
        for v in (values if isinstance(values, list) else [] if values is None else [values]):
            if v is None or str(v).lower() == "none":
                entry = {"none": True}
            elif BOX.fullmatch(str(v)):
                entry = {"box": str(v)}
            else:
                entry = {"file": input_name(v, args), "sha256": files.sha256(v, f"--{dest.replace('_', '-')}")[:16]}
                if getattr(args, "record_paths", False):
                    entry["path"] = str(Path(v).resolve())
            out.setdefault(dest, []).append(entry)
    return out


def private(value, args):
    """`value` with every input path the user gave replaced by its recorded name (e.g. in "refs": "a.png;b.png")."""
    given = [str(v) for d in INPUTS for v in (lambda x: x if isinstance(x, list) else [x])(getattr(args, d, None))
             if v is not None and str(v).lower() != "none" and not BOX.fullmatch(str(v))]
    if isinstance(value, str) and not getattr(args, "record_paths", False):
        for path in sorted(set(given), key=len, reverse=True):
            value = value.replace(path, input_name(path, args))
    return value


def rerun_args(args, prompt: str, seed: int) -> dict:
    """The pixel-changing options that made one image (rerun.OPTIONS), as `--from-png` applies them again."""
    keep = {k: v for k, v in vars(args).items() if k in OPTIONS and jsonable(v)}
    return {**keep, "prompt": [prompt], "seed": [seed], "num_images": 1}


def jsonable(v) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def record(args, pipe, command: str, prompt: str, seed: int, image, weights: dict, extra: dict | None = None) -> dict:
    """Everything that changes the pixels of one image: weights identity, dtype, device type, attention backend,
    seed, steps, guidance, true CFG, size, the resolved method settings (`extra`), inputs with hashes. The steps
    are the ones that ran (the command sets args.steps before sampling); `extra` never restates them."""
    steps = pipe.default_steps if args.steps is None else args.steps
    settings = {k: private(v, args) for k, v in (extra or {}).items() if k != "steps"}
    loras = [{"file": n, "fingerprint": f, "scale": s} for n, f, s in lora_info(getattr(pipe.transformer, "loras", ()))]
    return {"minidit_version": __version__, "command": command, "prompt": prompt,
            "negative_prompt": getattr(args, "negative_prompt", None), "true_cfg": getattr(args, "true_cfg", 1.0),
            "seed": seed, "steps": steps, "guidance": args.guidance if pipe.variant == "dev" else None,
            "width": image.width, "height": image.height, "variant": pipe.variant,
            "dtype": str(pipe.dtype).removeprefix("torch."), "device": pipe.device.type,
            "attention": attention.backend(), "weights": {k: weights[k] for k in ("weights", "files", "fingerprint")}
            | ({"loras": loras} if loras else {}),
            "inputs": inputs(args), "settings": settings, "args": rerun_args(args, prompt, seed)}


def a1111_value(v) -> str:
    """A value as A1111 readers parse it: one line, without a bare comma or colon (simple readers such as
    sd-parsers split the line at every ", " and ":"): lists and boxes space-separated, without brackets
    ("32 0 16 16"); free text
    with commas or colons JSON-quoted as A1111 writes it, those characters escaped (\\u002c, \\u003a), which
    A1111's own reader decodes back."""
    text = " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    text = re.sub(r"(?<=\d)\s*,\s*(?=[-\d])", " ", " ".join(text.split()))
    text = re.sub(r"[(\[](-?\d+(?: -?\d+)*)[)\]]", r"\1", text)  # "(32 0 16 16)" -> "32 0 16 16"
    if any(c in text for c in ',:"'):
        text = json.dumps(text).replace(",", "\\u002c").replace(":", "\\u003a")
    return text


def parameters_text(rec: dict) -> str:
    """The A1111 'parameters' text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    fields = {"Steps": rec["steps"], "Sampler": "Euler (flow matching)", "Seed": rec["seed"],
              "Size": f"{rec['width']}x{rec['height']}", "Model": Path(rec["weights"]["weights"]).name,
              "Model hash": rec["weights"]["fingerprint"]}
    if rec["weights"].get("loras"):  # A1111's "Lora hashes" field, with each LoRA's scale
        fields["Lora hashes"] = ", ".join(f"{x['file']}: {x['fingerprint']} x{x['scale']:g}"
                                          for x in rec["weights"]["loras"])
    if rec["guidance"] is not None:
        fields["Distilled CFG Scale"] = rec["guidance"]  # what Forge calls FLUX.1-dev's embedded guidance
    if rec["true_cfg"] and rec["true_cfg"] > 1:
        fields["CFG scale"] = rec["true_cfg"]
    fields.update({"Command": rec["command"], "Dtype": rec["dtype"], "Device": rec["device"],
                   "Attention": rec["attention"]})
    fields.update({k: v for k, v in rec["settings"].items() if k not in ("negative_prompt", "true_cfg")})
    fields["Version"] = f"minidit {rec['minidit_version']}"
    lines = [rec["prompt"]]
    if rec["negative_prompt"] is not None and rec["true_cfg"] > 1:
        lines.append(f"Negative prompt: {rec['negative_prompt']}")
    lines.append(", ".join(f"{k}: {a1111_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def add_chunks(info, rec: dict) -> None:
    """Write the record twice into a PngInfo: A1111 text under "parameters", JSON under "minidit"."""
    info.add_text("parameters", parameters_text(rec))
    info.add_text(JSON_KEY, json.dumps(rec))


# ------------------------------------------------------------------------------------- the CLI's image loop

def png_info(args, pipe, command: str, index: int, extra: dict | None, rec: dict | None, image) -> PngInfo:
    """The text chunks of one image: the record (A1111 "parameters" + JSON "minidit") and one plain chunk per
    value (seed, steps, the settings, ...). No "prompt" chunk: that key is ComfyUI's workflow JSON."""
    steps = pipe.default_steps if args.steps is None else args.steps
    meta = {"seed": rec["seed"] if rec else args.seed, "steps": steps,
            "guidance": args.guidance if pipe.variant == "dev" else "none (schnell)",
            "size": f"{image.width}x{image.height}", "model": rec["weights"]["weights"] if rec else Path(str(pipe.name)).name, "variant": pipe.variant,
            "command": command, "minidit_version": __version__,
            **{k: private(v, args) for k, v in (extra or {}).items() if k != "steps"}, "image_index": index}
    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    if rec is not None:
        add_chunks(info, rec)
    else:
        info.add_text("parameters", json.dumps(meta))
    return info


def save_image(img, args, command: str, index: int, total: int, target, info, written: list, tag: str = "") -> Path:
    """Write image `index` of `total` now (atomically) to its planned file, or to a numbered name (+ `tag`) in the
    target folder; an error names the file and what was written before (`written`: the first names, the count)."""
    path = target if isinstance(target, Path) else target[index]
    try:
        if isinstance(target, Path):
            path = save_numbered(img, target, command, info, tag=tag)
        else:
            not_the_source(args, target, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(img, path, info)
    except OSError as e:
        done = ", ".join(map(str, written[:3])) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
        raise OSError(f"cannot write image {index + 1} of {total} to {path} ({e.strerror or e}); "
                      f"written before: {done or 'none'}") from None
    written.append(path if len(written) < 3 else None)  # beyond the first three names only the count is kept
    say(args, f"wrote {path}")
    return path


def save_images(images, args, pipe, command: str, extra: dict | None = None,
                records: list[dict] | None = None) -> list[Path]:
    """Save a list of images at once (the API's batch); the CLI saves each as it is made (`run`)."""
    target = getattr(args, "outputs", None)
    if target is None or (not isinstance(target, Path) and len(target) != len(images)):  # planned for another count
        target = output_paths(args.output, len(images))
    written: list = []
    return [save_image(img, args, command, i, len(images), target,
                       png_info(args, pipe, command, i, extra, records[i] if records else None, img), written,
                       tag=f"-s{records[i]['seed']}" if records else "")
            for i, img in enumerate(images)]


def run(args, pipe, command: str, todo, sample, extra: dict | None = None, t0: float | None = None) -> int:
    """Sample every (prompt, seed) alone (`sample(prompt, seed)` -> [PIL image]), record it and save it at once,
    then one closing line with the time taken and the files written. -> the number of images written."""
    weights = weights_record(args)
    if getattr(args, "random_seed", False):
        say(args, f"seed {args.seed[0]} (random; pass --seed {args.seed[0]} to repeat)")
    target = getattr(args, "outputs", None)
    if target is None or (not isinstance(target, Path) and len(target) != len(todo)):
        target = output_paths(args.output, len(todo))
    written: list = []
    for k, (prompt, seed) in enumerate(todo):
        if len(todo) > 1:
            say(args, f"image {k + 1}/{len(todo)}: seed {seed}, prompt {prompt!r}")
        (img,) = sample(prompt, seed)
        rec = record(args, pipe, command, prompt, seed, img, weights, extra)
        save_image(img, args, command, k, len(todo), target, png_info(args, pipe, command, k, extra, rec, img),
                   written, tag=f"-s{seed}")
    took = time.perf_counter() - (t0 if t0 is not None else getattr(args, "t0", time.perf_counter()))
    names = ", ".join(map(str, written[:3])) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
    say(args, f"done in {took:.1f} s: {len(written)} image(s): {names}")
    return len(written)


def check_weights(args):
    """What to pass Pipeline.load as its path, after checking that --weights / the separate component files
    make a whole pipeline; one error naming exactly what is missing otherwise."""
    files_ = component_files(args)
    if args.weights is not None and Path(args.weights).suffix == ".safetensors":
        raise ValueError(f"--weights {args.weights} is a single file: FLUX.1 needs four components. Pass it as "
                         "--transformer FILE with --ae, --t5, --clip and --t5-tokenizer (see `minidit generate "
                         "--help`), or pass the FLUX.1 folder as --weights")
    for k, path in files_.items():
        if not Path(path).exists():
            raise ValueError(f"--{COMPONENTS[k].replace('_', '-')} {path}: not found")
    if args.weights is not None or not files_:
        return args.weights
    if "tokenizer" not in files_:  # CLIP-L's vocabulary ships with minidit
        args.clip_tokenizer = str(shipped("clip_tokenizer"))
    what = {"transformer": "--transformer (models/unet/flux1-dev.safetensors)",
            "ae": "--ae (models/vae/ae.safetensors)", "text_encoder_2": "--t5 (models/clip/t5xxl_fp16.safetensors)",
            "text_encoder": "--clip (models/clip/clip_l.safetensors)",
            "tokenizer_2": "--t5-tokenizer (FLUX.1's tokenizer_2/ folder: spiece.model or tokenizer.json)"}
    missing = [w for k, w in what.items() if k not in component_files(args)]
    if missing:
        raise ValueError(f"without --weights, a pipeline needs every component; still missing: {', '.join(missing)}")
    return str(Path(component_files(args)["transformer"]).parent)


def from_png(args, parser) -> object:
    """`minidit COMMAND --from-png PNG [options]`: the recorded pixel-changing options and inputs of that image
    (rerun.py: untrusted input, allow-listed and parsed as command-line text), except those given here with a
    value other than their default. The output, prompt file and weights are always this command line's."""
    what = f"--from-png {args.from_png}"
    rec = read_png(args.from_png)
    if rec["command"] != args.command:
        raise ValueError(f"{what}: made by `minidit {rec['command'][:40]}`; re-run it with "
                         f"`minidit {rec['command'][:40]} --from-png {args.from_png}`")
    sub = parser.subcommands[args.command]
    given = {a.dest for a in sub.options if a.dest in vars(args) and getattr(args, a.dest) != sub.get_default(a.dest)}
    options = recorded_options(rec, sub, what)
    folders = list(dict.fromkeys([Path(args.from_png).parent, Path.cwd()]))
    for dest, value in {**options, **recorded_inputs(rec, sub, folders, given, what)}.items():
        if dest not in given:
            setattr(args, dest, value)
    now = weights_record(args)["fingerprint"]
    if now != rec["weights"]["fingerprint"]:
        named = rec["weights"].get("weights")
        print(f"warning: the weights differ from the recorded ones (fingerprint {now}, recorded "
              f"{rec['weights']['fingerprint'][:64]}"
              + (f" for {named[:80]!r}" if isinstance(named, str) else "") + "): the image will differ; "
              "weights are never taken from a PNG: pass them with --weights", file=sys.stderr)
    return args
