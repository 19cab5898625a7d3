"""What a model is used with when a call does not say: its recommended size, steps, guidance and true CFG, read
from `minidit.json` in its folder; and the methods' default values the command line's help shows.

    d = ModelDefaults.read("/models/FLUX.1-dev")     # no minidit.json: FLUX.1's (diffusers' FluxPipeline) defaults
    d = ModelDefaults.read(shipped("trained"))       # the built-in model: 256 x 256, 28 steps, true CFG 4 with ""
    d.size(None, 512)                                # -> (256, 512): a side not given is the model's
    d.size(None, None, own=(None, None))             # a model that states no size: None (an input image's size)
    d.size_warning(2048, 2048)                       # -> "... far from the 256x256 the model was trained at ..."

`minidit.json` (every key optional; a missing key keeps FLUX.1's value):

    {"height": 256, "width": 256, "steps": 28, "guidance": 3.5, "true_cfg_scale": 4.0, "negative_prompt": "",
     "trained_pixels": [65536, 65536]}

(height and width: both or neither). It is read as untrusted input (a model folder can come from anywhere): a regular file of at most 64 KiB, a JSON
object of known keys, each value type- and range-checked; anything else is one error naming the file and key.
Every entry point (Pipeline.generate, __call__, img2img, personalize, inpaint, outpaint, freecus) and the CLI
take their unset values from `Pipeline.defaults`, so the API and the CLI draw the same picture.

This module imports neither torch nor any minidit module but files.py (the standard library only): the CLI's
argument parser needs these values for `--help`, which must not wait for torch (issue 25, bench/cli_start.py).
The methods' constants live here for that reason; personalize.py and freecus.py import them (their comments there name the authors' code).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .files import read_json

FILE = "minidit.json"
MAX_BYTES = 64 << 10
FLUX_SIDE = 1024  # diffusers' FluxPipeline default (default_sample_size 128 x vae_scale_factor 8)
FAR = 2.0  # size_warning: more than 2x fewer or more pixels than the model was trained on

# Personalize Anything (personalize.py) and FreeCus (freecus.py): the defaults the CLI's help shows
TAU = 0.8             # personalization: the first 20 % of the steps replace tokens
TAU_EDIT = 0.1        # inpainting / outpainting: the first 90 % replace
CONCAT_POSITIONS = ("target", "zero")   # RoPE of the later-stage reference keys (refstate.POSITIONS' subset)
LAMBDA_REF = 1.1       # λ_r: reference keys (FreeCus' Handler.register(scale=1.1) in the "save" pass)
LAMBDA_PROMPT = 1.1    # λ_p: the target's text keys on vital layers (FreeCus' infer.py --extend_scale 1.1)
MU_SHIFT_TYPES = ("negative", "half_negative", "twice_negative", "normal", "linear", "target")
DTYPE_NAMES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


@dataclass(frozen=True)
class ModelDefaults:
    """A model's recommended settings. The defaults are FLUX.1's as diffusers' FluxPipeline has them (guidance 3.5,
    no true CFG); steps None = the checkpoint's own rule (28, or 4 for schnell: Pipeline.default_steps). height /
    width None = the model states no size: text-to-image draws diffusers' 1024 x 1024, and a command with an input
    image (img2img, personalize, freecus) keeps that image's size (minidit's choice for FLUX.1, which handles many
    sizes; a model that states its size, as the built-in one, resizes the input to it).
    trained_pixels: the range of height x width the model was trained on; sizes more than FAR times outside it
    get a warning. None (FLUX.1 without a minidit.json): not stated, no warning (minidit does not guess a range
    for a checkpoint it knows nothing of)."""
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float = 3.5
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    trained_pixels: tuple[int, int] | None = None

    def __post_init__(self):
        check(self)

    @classmethod
    def read(cls, root: str | Path | None) -> "ModelDefaults":
        """root/minidit.json, or FLUX.1's defaults without one (root None: FLUX.1's)."""
        if root is None:
            return cls()
        file = Path(root) / FILE
        try:
            os.stat(file)
        except FileNotFoundError:  # no minidit.json: FLUX.1's defaults
            return cls()
        except OSError:
            pass  # the reader below names the problem
        data = read_json(file, "model defaults", MAX_BYTES, ValueError)  # files.py: the one guarded reader
        return cls.from_dict(data, str(file))

    @classmethod
    def from_dict(cls, data, where: str = FILE) -> "ModelDefaults":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k)[:40] for k in data if k not in known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("trained_pixels"), list):
            values["trained_pixels"] = tuple(values["trained_pixels"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def asdict(self) -> dict:
        return asdict(self)

    def size(self, height: int | None, width: int | None, own=(FLUX_SIDE, FLUX_SIDE)) -> tuple:
        """The size to draw at: each side given, else the model's, else `own` (FLUX.1's 1024, or (None, None): an
        input image's size, decided by the caller)."""
        dh, dw = own if self.height is None else (self.height, self.width)
        return (dh if height is None else height), (dw if width is None else width)

    def size_warning(self, height: int, width: int) -> str | None:
        """A one-line warning when height x width is far from the sizes the model was trained on, else None."""
        if self.trained_pixels is None:
            return None
        default = f"{self.width}x{self.height}" if self.height is not None else f"{FLUX_SIDE}x{FLUX_SIDE}"
        lo, hi = self.trained_pixels
        pixels = height * width
        if lo / FAR <= pixels <= hi * FAR:
            return None
        trained = (f"{math.isqrt(lo)}x{math.isqrt(lo)}" if lo == hi else
                   f"{math.isqrt(lo)}x{math.isqrt(lo)} to {math.isqrt(hi)}x{math.isqrt(hi)} in area")
        return (f"{width}x{height} is far from the size this model was trained at ({trained}): expect a poor "
                f"image; its default is {default}")


def check(d: ModelDefaults) -> None:
    """Types and ranges of every field (the file is untrusted): one ValueError/TypeError naming the key."""
    def integer(key, x, lo, hi):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{key} must be an integer, got {type(x).__name__}")
        if not lo <= x <= hi:
            raise ValueError(f"{key} must lie in [{lo}, {hi}], got {x}")

    def number(key, x, lo, hi):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise TypeError(f"{key} must be a finite number, got {type(x).__name__}")
        if not lo <= x <= hi:
            raise ValueError(f"{key} must lie in [{lo}, {hi}], got {x}")

    if (d.height is None) != (d.width is None):
        raise ValueError("height and width: give both or neither")
    for key in ("height", "width"):
        if getattr(d, key) is not None:
            integer(key, getattr(d, key), 16, 16384)
            if getattr(d, key) % 16:
                raise ValueError(f"{key} must be a multiple of 16, got {getattr(d, key)}")
    if d.steps is not None:
        integer("steps", d.steps, 1, 1000)
    number("guidance", d.guidance, 0.0, 100.0)
    number("true_cfg_scale", d.true_cfg_scale, 1.0, 100.0)
    if d.negative_prompt is not None and (not isinstance(d.negative_prompt, str) or len(d.negative_prompt) > 10000):
        raise TypeError("negative_prompt must be a string (at most 10000 characters) or null")
    if d.true_cfg_scale > 1 and d.negative_prompt is None:
        raise ValueError("true_cfg_scale > 1 needs a negative_prompt (it may be empty: \"\")")
    p = d.trained_pixels
    if p is None:
        return
    if not (isinstance(p, tuple) and len(p) == 2):
        raise TypeError("trained_pixels must be a list [min, max] of pixel counts")
    for x in p:
        integer("trained_pixels", x, 16 * 16, 16384 * 16384)
    if p[0] > p[1]:
        raise ValueError(f"trained_pixels must be [min, max] with min <= max, got {list(p)}")


def shipped(name: str) -> Path:
    """A folder minidit ships in `weights/`: installed beside the package code, or in a source checkout beside
    the package folder."""
    here = Path(__file__).resolve().parent
    for base in (here / "weights", here.parent / "weights"):
        if (base / name).is_dir():
            return base / name
    return here / "weights" / name


def builtin_defaults() -> ModelDefaults | None:
    """The built-in model's defaults for the CLI's help; None if its file is missing or unreadable (the help then
    says "the model's" without numbers; the command itself reports the problem)."""
    try:
        return ModelDefaults.read(shipped("trained"))
    except (ValueError, TypeError):
        return None
