"""A minidit PNG's record read back for `--from-png`, as the untrusted input it is: anyone can edit a PNG's text.

    rec = read_png("x.png")                               # its JSON chunk: a dict of the needed shape, or one error
    options = recorded_options(rec, subparser, what)      # {dest: value}: the allow-listed options, parsed as argv
    inputs = recorded_inputs(rec, subparser, [folder, cwd], skip, what)   # {dest: path}: hashed inputs, found again

The trust rule (README "Safety"): a record can only set the options in OPTIONS, which change the pixels; never an
output path, a prompt file, weights or any other path. Each value is turned back into the command-line text it
stands for and parsed by the command's own parser (types, choices), floats must be finite, and the ranges are then
checked by the same pre-load checks as typed options. Input images and masks come only from the record's `inputs`
entries: a relative file name (never absolute, never `..`) looked up in the folder of the --from-png PNG and in
the current folder, which must still hash the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from PIL import Image

from .. import files

JSON_KEY = "minidit"  # the JSON chunk; "parameters" holds the A1111-style text
INPUTS = ("image", "ref", "mask", "scene", "scene_mask", "control", "region")  # input files: recorded by name and hash
# the options a record may set: those that change the pixels (the device, threads and offload do not choose them)
OPTIONS = frozenset({
    "prompt", "seed", "num_images", "steps", "guidance", "height", "width", "negative_prompt", "true_cfg", "dtype",
    "strength", "lambda_ref", "lambda_prompt", "vital_layers", "no_ans", "mu_shift_type", "preset", "set",
    "ref_prompt", "caption", "box", "offset", "scene_prompt", "tau", "no_perturb", "positions", "no_concat",
    "image_prompt", "blend", "canvas", "max_area", "no_auto_resize"})
MAX_RECORD = 1 << 20      # characters of the JSON chunk (PIL's own limit for one text chunk)
MAX_LIST = 64             # values of one repeatable option
MAX_TEXT = 1 << 16        # characters of one value
BOX = re.compile(r"\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*")
DIGEST = re.compile(r"[0-9a-f]{16,64}")


def refuse(what: str, problem: str):
    raise ValueError(f"{what}: {problem} (a --from-png record is untrusted input)")


def parse_record(text, what: str) -> dict:
    """The JSON record: an object with `command`, `args`, `inputs` and `weights.fingerprint` of the right types."""
    if not isinstance(text, str) or len(text) > MAX_RECORD:
        refuse(what, f"the minidit metadata is not text of at most {MAX_RECORD} characters")

    def constant(name):
        raise ValueError(f"{name} is not a number JSON allows")
    try:
        rec = json.loads(text, parse_constant=constant)
    except RecursionError:
        refuse(what, "the minidit metadata is nested too deeply")
    except ValueError as e:  # invalid JSON, NaN/Infinity, an integer of more than 4300 digits
        refuse(what, f"the minidit metadata is not valid JSON ({str(e)[:200]})")
    if not isinstance(rec, dict):
        refuse(what, f"the minidit metadata must be a JSON object, got {type(rec).__name__}")
    for key, kind in (("command", str), ("args", dict), ("inputs", dict), ("weights", dict)):
        if not isinstance(rec.get(key), kind):
            refuse(what, f"key {key!r} must be a {kind.__name__}, got {type(rec.get(key)).__name__}")
    if not isinstance(rec["weights"].get("fingerprint"), str):
        refuse(what, "key 'weights.fingerprint' must be a string")
    return rec


def parse_option(sub: argparse.ArgumentParser, tokens: list[str], dest: str, what: str):
    """`dest` as the subcommand's own parser reads `tokens` (its type and choices), without exiting on an error."""
    keep, sub.exit_on_error = sub.exit_on_error, False
    try:
        ns, rest = sub.parse_known_args(tokens, argparse.Namespace())
    except argparse.ArgumentError as e:
        refuse(what, str(e))
    finally:
        sub.exit_on_error = keep
    if rest:
        refuse(what, f"not an option value: {rest[0][:80]!r}")
    return getattr(ns, dest)


def repeatable(sub, action) -> bool:
    """Whether the option takes several values (nargs="+" or action="append"): asked of the action itself, by
    applying it once to an empty namespace (argparse's public Action call)."""
    if action.nargs in ("+", "*"):
        return True
    ns = argparse.Namespace(**{action.dest: None})
    action(sub, ns, "x", action.option_strings[0])
    return isinstance(getattr(ns, action.dest), list)


def scalar(value, what: str) -> str:
    """One recorded value as the text a user would type: a string or a finite number, of bounded length."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        refuse(what, f"expected a single string or number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        refuse(what, f"{value} is not a finite number")
    text = str(value)
    if len(text) > MAX_TEXT:
        refuse(what, f"longer than {MAX_TEXT} characters")
    return text


def as_option(sub, action, value, what: str):
    """A recorded value parsed exactly as the command line would parse the same option."""
    flags = action.option_strings
    if action.nargs == 0:  # a switch: --no-perturb, --blend / --no-blend
        if value is None:
            return action.default
        if not isinstance(value, bool):
            refuse(what, f"expected true or false, got {type(value).__name__}")
        tokens = [flags[0]] if value else flags[1:2]
        return parse_option(sub, tokens, action.dest, what)
    if value is None:
        return action.default
    many = repeatable(sub, action)
    if isinstance(value, list):
        if not many:
            refuse(what, "a list where a single value belongs")
        if not 1 <= len(value) <= MAX_LIST:
            refuse(what, f"expected 1 to {MAX_LIST} values, got {len(value)}")
        texts = [scalar(v, what) for v in value]
    else:
        texts = [scalar(value, what)]
    if action.nargs in ("+", "*"):
        tokens = [flags[0], *texts]
    else:
        tokens = [f"{flags[0]}={t}" for t in texts]
    parsed = parse_option(sub, tokens, action.dest, what)
    for v in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(v, float) and not math.isfinite(v):
            refuse(what, f"{v} is not a finite number")
    return parsed


def recorded_options(rec: dict, sub, what: str) -> dict:
    """{dest: value} of the allow-listed options in the record, each parsed as command-line input; anything else
    in the record (an output path, a prompt file, weights, an unknown key) is ignored."""
    actions = {a.dest: a for a in sub.options if a.option_strings}
    return {dest: as_option(sub, actions[dest], value, f"{what}: recorded {actions[dest].option_strings[0]}")
            for dest, value in rec["args"].items() if dest in OPTIONS and dest in actions}


def find_input(name, digest, folders: list[Path], flag: str, what: str) -> Path:
    """The file `name` (relative, inside one of `folders`) whose hash is `digest`."""
    if not isinstance(name, str) or not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        refuse(what, f"input {flag}: needs a file name and its sha256")
    rel = Path(name)
    if not name or len(name) > 4096 or rel.is_absolute() or ".." in rel.parts or "\\" in name or "\0" in name:
        refuse(what, f"input {flag} {name[:200]!r}: not a relative file name (absolute paths and '..' are refused)")
    for folder in folders:
        path = folder / rel
        if not os.path.lexists(path):
            continue
        if not path.resolve().is_relative_to(folder.resolve()):
            refuse(what, f"input {flag} {name!r}: links out of {folder}")
        if files.sha256(path, f"input {flag}")[:len(digest)] == digest:
            return path
    where = " or ".join(str(f) for f in folders)
    raise ValueError(f"{what}: input {flag} {name} is missing (looked in {where}) or has changed since the image "
                     "was made (its hash differs); give it as an option to use another file")


def recorded_inputs(rec: dict, sub, folders: list[Path], skip: set[str], what: str) -> dict:
    """{dest: path, box or list of them} for every recorded input the user did not give anew (`skip`)."""
    actions = {a.dest: a for a in sub.options if a.option_strings}
    out = {}
    for dest, entries in rec["inputs"].items():
        if dest not in INPUTS or dest not in actions:
            refuse(what, f"inputs has an unknown entry {str(dest)[:40]!r}")
        if dest in skip:
            continue
        flag = actions[dest].option_strings[0]
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_LIST:
            refuse(what, f"inputs.{dest} must be a list of 1 to {MAX_LIST} entries")
        values = []
        for e in entries:
            if not isinstance(e, dict):
                refuse(what, f"inputs.{dest}: each entry must be an object")
            if "file" in e:
                values.append(str(find_input(e["file"], e.get("sha256"), folders, flag, what)))
            elif isinstance(e.get("box"), str) and BOX.fullmatch(e["box"]):
                values.append(e["box"])
            elif e.get("none") is True:
                values.append("none")
            else:
                refuse(what, f"inputs.{dest}: an entry is neither a file, a box x,y,w,h nor none")
        if repeatable(sub, actions[dest]):
            out[dest] = values
        elif len(values) == 1:
            out[dest] = values[0]
        else:
            refuse(what, f"inputs.{dest}: {flag} takes one value, the record lists {len(values)}")
    return out


def read_png(path) -> dict:
    """The JSON record of a minidit PNG (structure checked: rerun.parse_record); a named error for anything else.
    Only the text chunks before the pixels are read (minidit writes its there): nothing is decoded."""
    what = f"--from-png {path}"
    with files.open_regular(path, "--from-png", files.LIMITS["png"]) as f:
        try:
            with Image.open(f) as im:
                kind, text = im.format, im.info.get(JSON_KEY)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{what}: not a readable image ({e})") from None
    if kind != "PNG" or text is None:
        raise ValueError(f"{what}: no minidit metadata in it (only PNGs written by minidit can be re-run)")
    return parse_record(text, what)
