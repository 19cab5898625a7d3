"""Range and finiteness checks of user options: pure functions, each raising one ValueError naming the option.

    validate.generate_args(height, width, steps, guidance, seed, num_images)   # Pipeline.generate and the CLI
    validate.number("lambda_ref", x, lo=0, lo_open=True, hi=100)                 # one option
    validate.finite_tensor("latents", z)                                         # NaN/Inf is an error
    validate.pixels("image", x)                       # an image tensor in [-1, 1] (uint8 or 0..255: an error)
    validate.prompts("prompt", p)                     # a str or a list of str -> list

The CLI runs the same checks before any model loads (cli/commands.py `check_inputs`), so a bad value costs
nothing.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch
from torch import Tensor

MAX_SIDE = 16384        # pixels per side (FLUX.1 is trained up to ~2 MP; 16384² is 1M tokens)
MAX_STEPS = 1000
MAX_IMAGES = 256
MAX_GUIDANCE = 100.0
MAX_LAMBDA = 100.0
SEED_END = 2 ** 64      # seeds lie in [0, 2^64): torch.Generator.manual_seed's range


def integer(name: str, x, lo: int | None = None, hi: int | None = None) -> int:
    """x as an int in [lo, hi] (bools and floats are refused: `steps=2.5` is a mistake, not 2)."""
    if isinstance(x, bool) or not isinstance(x, Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    x = int(x)
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    if hi is not None and x > hi:
        raise ValueError(f"{name} must be <= {hi}, got {x}")
    return x


def number(name: str, x, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """x as a finite float in [lo, hi] ((lo, hi] with lo_open); a 1-element tensor counts as a number."""
    if isinstance(x, Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} is {x}")
    if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and x > hi):
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}], got {x:g}")
    return x


def seed(x) -> None:
    """An int or a list of ints in [0, 2^64) (torch.Generators, diffusers' `generator=`, pass as they are)."""
    for s in (x if isinstance(x, (list, tuple)) else [x]):
        if not isinstance(s, torch.Generator):
            integer("seed", s, 0, SEED_END - 1)


def finite_tensor(name: str, t) -> Tensor:
    """A tensor with data (not on the meta device) without NaN/Inf ("latents holds NaN or Inf")."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{name} is a meta-device tensor (a shape without data)")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    return t


def pixels(name: str, t) -> Tensor:
    """An image tensor as minidit takes it: floating point, finite, every value in [-1, 1]. The rule is to refuse,
    never to guess: a uint8 / integer tensor or one in 0..255 is an error (convert with `x / 127.5 - 1`), and so is
    a decoded image slightly outside [-1, 1] (`x.clamp(-1, 1)`), since a 0..1 image cannot be told from it."""
    finite_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} is a {str(t.dtype).removeprefix('torch.')} tensor: minidit takes float images in "
                        "[-1, 1] (convert with x.float() / 127.5 - 1)")
    if t.numel() and (float(t.min()) < -1 or float(t.max()) > 1):
        raise ValueError(f"{name} has values in [{float(t.min()):g}, {float(t.max()):g}]: minidit takes images in "
                         "[-1, 1] (0..255: x / 127.5 - 1; 0..1: 2 * x - 1; slightly outside: x.clamp(-1, 1))")
    return t


def prompts(name: str, p) -> list[str]:
    """A prompt or a list of prompts -> a non-empty list of str (None or another type: a TypeError naming it)."""
    items = [p] if isinstance(p, str) else p
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(p).__name__}")
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise TypeError(f"{name}{'' if isinstance(p, str) else f' {i}'} must be a string, got {type(x).__name__}")
    return list(items)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def image_side(name: str, x) -> int:
    """One side of an image in pixels: a multiple of 16 (one token) in [16, MAX_SIDE]."""
    x = integer(name, x, 16, MAX_SIDE)
    if x % 16:
        raise ValueError(f"{name} {x}: FLUX needs sizes that are multiples of 16")
    return x


def image_size(height, width, batch: int = 1, what: str = "") -> tuple[int, int]:
    """Two `image_side`s whose batch of decoded fp32 images fits in host memory."""
    h, w = image_side(f"{what}height", height), image_side(f"{what}width", width)
    need = batch * 3 * h * w * 4  # the decoded fp32 images alone; latents and activations come on top
    if need > _memory_bytes():
        raise ValueError(f"{batch} image(s) of {h}x{w} need {need / 2**30:.1f} GiB for the decoded pixels alone, "
                         f"more than this machine's memory ({_memory_bytes() / 2**30:.1f} GiB): lower the size "
                         "or --num-images")
    return h, w


def given_size(height, width, batch: int = 1, what: str = "") -> None:
    """`image_size` when both sides are given, `image_side` when one is (the other comes from an image)."""
    if height is not None and width is not None:
        image_size(height, width, batch, what)
    elif height is not None or width is not None:
        image_side(f"{what}height" if width is None else f"{what}width", height if width is None else width)


def generate_args(height, width, steps, guidance, seed_, num_images, batch: int = 1,
                  true_cfg_scale=None) -> None:
    """The options every sampling entry point shares (generate, img2img, personalize, inpaint, outpaint,
    freecus): None = not given. `batch` = prompts per call (the images are batch x num)."""
    integer("num_images", num_images, 1, MAX_IMAGES)
    given_size(height, width, batch * num_images)
    if steps is not None:
        integer("steps", steps, 1, MAX_STEPS)
    if guidance is not None:
        number("guidance", guidance, 0.0, MAX_GUIDANCE)
    if true_cfg_scale is not None:
        number("true_cfg_scale", true_cfg_scale, 0.0, MAX_GUIDANCE)
    seed(seed_)


def device(name) -> torch.device:
    """A torch device that exists here: 'cpu', 'cuda', 'cuda:1', 'mps' (one line naming what is wrong)."""
    try:
        d = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (use --device cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: minidit runs on cpu, cuda or mps")
    return d
