"""What the CLI records in every PNG so that the image can be made again, how it re-reads it, and the CLI's
image loop that samples, records and saves every image.

    jobs(args)                      # [(prompt, seed), ...]: every --prompt / --prompt-file line x every seed + i
    rec = record(args, pipe, "generate", prompt, seed, image, weights, extra)   # one image's dict
    add_chunks(info, rec)           # -> PNG text chunks: A1111-style "parameters" and the JSON chunk "minidit"
    read_png("out.png")             # -> the JSON record; `minidit generate --from-png out.png` re-runs it

Seeds (README "Seeds"): without --seed a random one is drawn and printed; in the CLI image i of a batch uses
seed + i with its own generator, and each image is sampled alone, so every image is reproducible by itself
from the seed recorded in it (the Python API keeps diffusers' one generator per batch).

The weights are identified by their file names and a fingerprint: a SHA-256 over the safetensors headers
(tensor names, dtypes, shapes, offsets) and the small JSON/tokenizer files, never over the tensor data, so a
23 GB checkpoint is fingerprinted in milliseconds. Input images and masks are hashed whole (they are small).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__, attention
from ..image import output_paths, save_numbered, save_png
from ..repository import WeightPaths, builtin_repo, resolve_weights, shipped

JSON_KEY = "minidit"  # the JSON chunk; "parameters" holds the A1111-style text
SEED_RANGE = 2 ** 32  # random seeds are drawn from [0, 2^32), as A1111 and BFL's CLI do
# --flag per component (Pipeline.load's keyword -> the CLI option's dest)
COMPONENTS = {"transformer": "transformer", "ae": "ae", "text_encoder_2": "t5", "text_encoder": "clip",
              "tokenizer_2": "t5_tokenizer", "tokenizer": "clip_tokenizer"}
INPUTS = ("image", "ref", "mask", "scene", "scene_mask")  # input files: recorded by name and hash
NOT_RERUN = {"func", "outputs", "output", "from_png", "quiet", "prompt_file", "total_images", "t0", "random_seed"}
SMALL_FILES = (".json", ".txt", ".model")  # configs, tokenizer files: fingerprinted whole


# ------------------------------------------------------------------------------------------ prompts, seeds

def prompts(args) -> list[str]:
    """--prompt (repeatable) then every non-blank line of --prompt-file, in order."""
    out = list(args.prompt or [])
    if getattr(args, "prompt_file", None):
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        out += [line.strip() for line in text.splitlines() if line.strip()]
        if not out:
            raise ValueError(f"--prompt-file {args.prompt_file}: no prompt in it (one prompt per line)")
    if not out:
        raise ValueError("--prompt is required (repeat it, or use --prompt-file FILE with one prompt per line)")
    return out


def jobs(args) -> list[tuple[str, int]]:
    """(prompt, seed) of every image: each prompt x each --seed S x S + i for i < --num-images. Draws (and
    records in args.seed) a random seed when none is given."""
    if not args.seed:
        args.seed, args.random_seed = [secrets.randbelow(SEED_RANGE)], True  # printed once the inputs are checked
    return [(p, s + i) for p in prompts(args) for s in args.seed for i in range(args.num_images)]


def say(args, line: str) -> None:
    """One status line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(line, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------- weights

def component_files(args) -> dict[str, str]:
    """Pipeline.load's per-component keywords from --transformer, --ae, --t5, --clip, --*-tokenizer."""
    return {k: str(Path(getattr(args, dest)).expanduser().resolve()) for k, dest in COMPONENTS.items()
            if getattr(args, dest, None)}


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(min(n, 100 << 20))


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 (first 16 hex digits) over the names and safetensors headers of every weight file under `paths`
    (files or folders), plus small config/tokenizer files whole; never the tensor data."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else [Path(root)]
        for f in files:
            if f.suffix == ".safetensors":
                h.update(f.name.encode() + b"\0" + _header(f))
            elif f.suffix in SMALL_FILES and f.stat().st_size <= 64 << 20:
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def weight_paths(args) -> dict[str, Path]:
    """The file or folder every component is read from (as Pipeline.load finds them)."""
    if args.weights is None and not component_files(args):
        root = builtin_repo()
    elif args.weights is None:
        root = Path(component_files(args)["transformer"]).parent
    else:
        root = resolve_weights(args.weights)
    return vars(WeightPaths.find(root, **component_files(args)))


def weights_record(args) -> dict:
    """Names and the header fingerprint of the weights, and their size in GB per component."""
    paths = weight_paths(args)
    sizes = {k: sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*.safetensors"))) / 1e9
             for k, p in paths.items()}
    return {"weights": args.weights or ("built-in" if not component_files(args) else "separate files"),
            "files": {k: str(p.resolve()) for k, p in paths.items()}, "fingerprint": fingerprint(list(paths.values())),
            "gb": {k: v for k, v in sizes.items() if v}}


def loading_line(rec: dict) -> str:
    """'loading transformer 23.80 GB, text_encoder_2 9.52 GB, ... from PATH'"""
    parts = ", ".join(f"{k} {v:.3g} GB" for k, v in rec["gb"].items())
    return f"loading {parts} ({rec['weights']}, fingerprint {rec['fingerprint']})"


# ------------------------------------------------------------------------------------------- the record

def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def inputs(args) -> dict:
    """{flag: [{"file": name, "sha256": ...} or {"box": "x,y,w,h"}, ...]} of every input image and mask."""
    out = {}
    for dest in INPUTS:
        values = getattr(args, dest, None)
        for v in (values if isinstance(values, list) else [values]):
            if v is None or str(v).lower() == "none":
                continue
            entry = {"file": str(v), "sha256": file_hash(v)} if Path(v).is_file() else {"box": str(v)}
            out.setdefault(dest, []).append(entry)
    return out


def rerun_args(args, prompt: str, seed: int) -> dict:
    """The parsed options that made one image, as `--from-png` applies them again (one prompt, one seed)."""
    keep = {k: v for k, v in vars(args).items() if k not in NOT_RERUN and _jsonable(v)}
    return {**keep, "prompt": [prompt], "seed": [seed], "num_images": 1}


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def record(args, pipe, command: str, prompt: str, seed: int, image, weights: dict, extra: dict | None = None) -> dict:
    """Everything that changes the pixels of one image: weights identity, dtype, device type, attention backend,
    seed, steps, guidance, true CFG, size, the resolved method settings (`extra`), inputs with hashes."""
    steps = pipe.default_steps if args.steps is None else args.steps
    rec = {"minidit_version": __version__, "command": command, "prompt": prompt,
           "negative_prompt": getattr(args, "negative_prompt", None), "true_cfg": getattr(args, "true_cfg", 1.0),
           "seed": seed, "steps": steps, "guidance": args.guidance if pipe.variant == "dev" else None,
           "width": image.width, "height": image.height, "variant": pipe.variant,
           "dtype": str(pipe.dtype).removeprefix("torch."), "device": pipe.device.type,
           "attention": attention.backend(), "weights": {k: weights[k] for k in ("weights", "files", "fingerprint")},
           "inputs": inputs(args), "settings": extra or {}, "args": rerun_args(args, prompt, seed)}
    return rec


def parameters_text(rec: dict) -> str:
    """The A1111 'parameters' text: prompt, 'Negative prompt: ...', then 'Key: value, ...' (values holding a
    comma, colon or quote are JSON-quoted, as A1111 writes them)."""
    def q(v):
        s = str(v)
        return json.dumps(s) if any(c in s for c in ',:"\n') else s
    fields = {"Steps": rec["steps"], "Sampler": "Euler (flow matching)", "Seed": rec["seed"],
              "Size": f"{rec['width']}x{rec['height']}", "Model": Path(rec["weights"]["weights"]).name,
              "Model hash": rec["weights"]["fingerprint"]}
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
    lines.append(", ".join(f"{k}: {q(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def add_chunks(info, rec: dict) -> None:
    """Write the record twice into a PngInfo: A1111 text under "parameters", JSON under "minidit"."""
    info.add_text("parameters", parameters_text(rec))
    info.add_text(JSON_KEY, json.dumps(rec))


def read_png(path) -> dict:
    """The JSON record of a minidit PNG; a named error for anything else."""
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}))
    except (OSError, ValueError) as e:
        raise ValueError(f"--from-png {path}: not a readable image ({e})") from None
    if JSON_KEY not in text:
        raise ValueError(f"--from-png {path}: no minidit metadata in it (only PNGs written by minidit can be re-run)")
    try:
        return json.loads(text[JSON_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"--from-png {path}: the minidit metadata is not valid JSON ({e})") from None


def check_inputs_unchanged(rec: dict) -> None:
    """Every input file of the recorded run must still hash the same: else the re-run would differ."""
    for flag, entries in rec.get("inputs", {}).items():
        for e in entries:
            if "file" in e and (not Path(e["file"]).is_file() or file_hash(e["file"]) != e["sha256"]):
                raise ValueError(f"--from-png: input --{flag.replace('_', '-')} {e['file']} is missing or has "
                                 "changed since the image was made (its hash differs)")


# ------------------------------------------------------------------------------------- the CLI's image loop

def plan(args) -> list[tuple[str, int]]:
    """Before loading: the (prompt, seed) of every image; args.total_images sizes the output plan."""
    todo = jobs(args)
    args.total_images = len(todo)
    return todo


def save_images(images, args, pipe, command: str, extra: dict | None = None,
                records: list[dict] | None = None) -> list[Path]:
    """Save PNGs with their generation parameters as text chunks, like other image tools do. Each file is
    written atomically; if one fails, the error says which were written. `records` (minidit.metadata.record,
    one per image) are written as the A1111 "parameters" text and the "minidit" JSON chunk."""
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
            add_chunks(info, rec)
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
        say(args, f"wrote {path}")
    return written


def run(args, pipe, command: str, todo, sample, extra: dict | None = None, t0: float | None = None) -> list:
    """Sample every (prompt, seed) alone (`sample(prompt, seed)` -> [PIL image]), record and save each one,
    then one closing line with the time taken and the files written."""
    weights = weights_record(args)
    if getattr(args, "random_seed", False):
        say(args, f"seed {args.seed[0]} (random; pass --seed {args.seed[0]} to repeat)")
    images, records = [], []
    for k, (prompt, seed) in enumerate(todo):
        if len(todo) > 1:
            say(args, f"image {k + 1}/{len(todo)}: seed {seed}, prompt {prompt[:60]!r}")
        (img,) = sample(prompt, seed)
        images.append(img)
        records.append(record(args, pipe, command, prompt, seed, img, weights, extra))
    written = save_images(images, args, pipe, command, extra, records)
    took = time.perf_counter() - (t0 if t0 is not None else getattr(args, "t0", time.perf_counter()))
    names = ", ".join(map(str, written[:3])) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
    say(args, f"done in {took:.1f} s: {len(written)} image(s): {names}")
    return written


def check_weights(args):
    """What to pass Pipeline.load as its path, after checking that --weights / the separate component files
    make a whole pipeline; one error naming exactly what is missing otherwise."""
    files = component_files(args)
    if args.weights is not None and Path(args.weights).suffix == ".safetensors":
        raise ValueError(f"--weights {args.weights} is a single file: FLUX.1 needs four components. Pass it as "
                         "--transformer FILE with --ae, --t5, --clip and --t5-tokenizer (see `minidit generate "
                         "--help`), or pass the FLUX.1 folder as --weights")
    for k, path in files.items():
        if not Path(path).exists():
            raise ValueError(f"--{COMPONENTS[k].replace('_', '-')} {path}: not found")
    if args.weights is not None or not files:
        return args.weights
    if "tokenizer" not in files:  # CLIP-L's vocabulary ships with minidit
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
    """`minidit COMMAND --from-png PNG [options]`: the recorded options of that image, except those given here
    with a value other than their default; refuses another command's PNG, changed inputs, and overwriting it."""
    rec = read_png(args.from_png)
    if rec.get("command") != args.command:
        raise ValueError(f"--from-png {args.from_png}: made by `minidit {rec.get('command')}`; re-run it with "
                         f"`minidit {rec.get('command')} --from-png {args.from_png}`")
    if Path(args.output).resolve() == Path(args.from_png).resolve():
        raise ValueError(f"--output {args.output}: would overwrite the --from-png image; pass another --output")
    check_inputs_unchanged(rec)
    sub = parser.subcommands[args.command]
    for dest, value in rec["args"].items():
        if dest in vars(args) and getattr(args, dest) == sub.get_default(dest):
            setattr(args, dest, value)
    now = weights_record(args)["fingerprint"]
    if now != rec["weights"]["fingerprint"]:
        print(f"warning: the weights differ from the recorded ones (fingerprint {now}, recorded "
              f"{rec['weights']['fingerprint']}): the image will differ", file=sys.stderr)
    return args
