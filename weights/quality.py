"""What a model does in the procedural world, measured against its ground truth (weights/world.py), never by eye.

Each function generates with a `Pipeline` and returns plain numbers; bench/quality.py prints and records them and
tests/test_trained.py holds the built-in model to them. All evaluation scenes come from seeds disjoint from the
training stream (weights/train_ae.py stage_data draws scenes from `random.Random(seed + 2)`, these from 10_000 + ...).

    autoencoder  the round trip alone: PSNR on held-out renders, the object's colour named right, and on flat
                 palette colours a grid-locked pattern, a border frame and a colour offset (flat_errors)
    t2i          attribute accuracy (colour, shape, position, background) of images generated from captions
    one_prompt   the README's first prompt over 16 seeds; text_locality / text_order: what T5's features carry

Text-to-image is measured with the CLI's default true CFG (4). The methods (Personalize Anything, inpainting,
outpainting, FreeCus) are measured in quality_methods.py with the helpers here.
"""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from minidit.image import pil_to_tensor, tensor_to_pil

from . import world

SIZE = 256
EVAL_SEED = 10_000


def eval_scenes(n: int, seed: int = 0, textured: bool | None = None) -> list[world.Scene]:
    """n single-object scenes on flat backgrounds (what the detectors read reliably), from an evaluation stream."""
    rng = random.Random(EVAL_SEED + seed)
    out = []
    while len(out) < n:
        s = world.sample_scene(rng, n_objects=1)
        sub = s.objects[0].subject
        if textured is not None and (sub.texture != "plain") != textured:
            continue
        out.append(replace(s, background="flat", bg2=""))
    return out


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images over the pixels where `mask` (H, W) is true (all when None)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    d = d[mask] if mask is not None else d.reshape(-1, 3)
    mse = max(d.mean(), 1e-10)
    return float(10 * np.log10(255.0 ** 2 / mse))


def cfg_kwargs(pipe, true_cfg: float) -> dict:
    """True CFG with the empty negative prompt at `true_cfg` > 1 (not for a guidance-distilled model), or true CFG
    off, said explicitly: left unset, the model's own default would apply (the built-in model's minidit.json asks
    for true CFG 4), and the methods' plain baselines would no longer be like against like."""
    if pipe.variant == "dev":
        return {}
    if true_cfg <= 1:
        return {"true_cfg_scale": 1.0}
    return {"negative_prompt": "", "true_cfg_scale": true_cfg}


# ------------------------------------------------------------------------------------------- text to image
def attributes(image, scene: world.Scene) -> dict[str, bool]:
    """Which attributes of `scene` the image shows (colour, shape, position of its one object; background)."""
    want = scene.objects[0]
    got = world.detect_object(as_array(image))
    if got is None:
        return {"colour": False, "shape": False, "position": False, "background": False}
    return {"colour": got["colour"] == want.subject.colour, "shape": got["shape"] == want.subject.shape,
            "position": got["position"] == want.position, "background": got["background"] == scene.bg}


def round_trip(pipe, image) -> Image.Image:
    """`image` through the pipeline's autoencoder (encode, decode): the best any of its generations can look."""
    x = pil_to_tensor(image)
    return pipe.decode(pipe.encode_image(x), x.shape[2], x.shape[3])[0]


def t2i(pipe, n: int = 32, seed: int = 0, steps: int | None = None, true_cfg: float = 4.0,
        batch: int = 16) -> dict[str, float]:
    """Attribute accuracy of generated images for n evaluation captions, of the renderer's own images (the
    detectors' ceiling) and of those renders through the model's autoencoder (the model's own ceiling: what its
    training latents decode to)."""
    scenes = eval_scenes(n, seed)
    gen = {"colour": 0, "shape": 0, "position": 0, "background": 0}
    ref, ae = dict(gen), dict(gen)
    for i in range(0, n, batch):
        chunk = scenes[i:i + batch]
        images = pipe.generate([world.caption(s) for s in chunk], height=SIZE, width=SIZE, steps=steps,
                               seed=[seed * 1000 + i + j for j in range(len(chunk))], **cfg_kwargs(pipe, true_cfg))
        for s, im in zip(chunk, images):
            for k, v in attributes(im, s).items():
                gen[k] += v
            render = world.render(s, SIZE)
            for k, v in attributes(render, s).items():
                ref[k] += v
            for k, v in attributes(round_trip(pipe, render), s).items():
                ae[k] += v
    out = {f"{k}": gen[k] / n for k in gen}
    out.update({f"{k}_renderer": ref[k] / n for k in ref})
    out.update({f"{k}_autoencoder": ae[k] / n for k in ae})
    out["mean"] = float(np.mean([gen[k] / n for k in gen]))
    return out


# ------------------------------------------------------------------------------------------- autoencoder
GRID = 16      # pixels: one DiT token (2x2 latent pixels); a pattern repeating every 8 or 16 pixels is on this grid
BORDER = 16    # pixels: the band left out when looking for a grid, and compared with the interior for a frame


def held_out_scenes(n: int, seed: int = 0) -> list[world.Scene]:
    """n scenes of the whole world (every background, one or two objects), from an evaluation stream."""
    rng = random.Random(EVAL_SEED + 300 + seed)
    return [world.sample_scene(rng) for _ in range(n)]


def grid_amplitude(e: np.ndarray) -> float:
    """The part of an error image e (H, W, C) that repeats every GRID pixels (periods 16, 8, 4, 2 alike), in its
    units: e less its mean over the GRID x GRID window around each pixel (which keeps such a pattern whole and
    removes what varies slowly), folded onto one GRID x GRID tile (the mean over the tiles), less the tile's
    mean; its largest |value|. A sinusoid of amplitude a and period 16 or 8 gives a; smooth errors give ~0."""
    t = torch.from_numpy(np.ascontiguousarray(e, np.float64)).permute(2, 0, 1)[None]         # (1, C, H, W)
    smooth = torch.nn.functional.avg_pool2d(t, GRID, stride=1)                              # (1, C, H-15, W-15)
    h, w = (smooth.shape[-2] // GRID) * GRID, (smooth.shape[-1] // GRID) * GRID
    r = t[..., GRID // 2:GRID // 2 + h, GRID // 2:GRID // 2 + w] - smooth[..., :h, :w]
    tile = r.reshape(t.shape[1], h // GRID, GRID, w // GRID, GRID).mean((1, 3))              # (C, 16, 16)
    return float((tile - tile.mean((-2, -1), keepdim=True)).abs().max())


def ring(width: int) -> np.ndarray:
    """(SIZE, SIZE) bool: the outermost `width` pixels."""
    m = np.ones((SIZE, SIZE), bool)
    m[width:SIZE - width, width:SIZE - width] = False
    return m


def flat_errors(trip, colours=tuple(world.COLOURS)) -> dict[str, float]:
    """A round trip `trip` (PIL image -> PIL image) of flat images of each palette colour, its per-pixel error
    e = out - in (RGB levels) judged three ways, the worst colour reported:
      grid    `grid_amplitude` of e inside the image less a BORDER band: a pattern on the latent/token grid;
      frame   the mean |e| of the outermost 4 pixels minus that of the band 8 to 16 pixels in: a frame at
              the border (a smooth error, e.g. a gradient, changes little over 8 pixels);
      offset  the largest |mean e| of a channel in the interior: a colour shift."""
    grid = frame = offset = 0.0
    for name in colours:
        image = Image.new("RGB", (SIZE, SIZE), world.COLOURS[name])
        e = as_array(trip(image)).astype(np.float64) - as_array(image).astype(np.float64)   # (H, W, 3)
        inner = e[BORDER:SIZE - BORDER, BORDER:SIZE - BORDER]
        grid = max(grid, grid_amplitude(inner))
        frame = max(frame, float(np.abs(e)[ring(4)].mean() - np.abs(e)[ring(16) & ~ring(8)].mean()))
        offset = max(offset, float(np.abs(inner.mean((0, 1))).max()))
    return {"grid": grid, "frame": frame, "offset": offset}


def ae_trip(ae):
    """The round trip (PIL image -> PIL image) of an `AutoEncoder` alone, e.g. a training checkpoint's
    (`minidit.autoencoder.load_autoencoder`); its scale/shift factors cancel out."""
    @torch.no_grad()
    def trip(image):
        x = pil_to_tensor(image).to(ae.dtype)
        return tensor_to_pil(ae.decode(ae.encode(x)).float())[0]
    return trip


def autoencoder(pipe=None, n: int = 16, seed: int = 0, trip=None) -> dict[str, float]:
    """A pipeline's autoencoder alone (encode, decode: `round_trip`), or any round trip `trip` (`ae_trip`), on
    held-out renders: mean PSNR over n scenes of the whole world (`held_out_scenes`) and over n single-object flat
    scenes (`eval_scenes`, what `t2i` asks for), how often the detectors name the object's colour right on the
    latter, and `flat_errors`."""
    trip = trip or (lambda im: round_trip(pipe, im))
    renders = [world.render(s, SIZE) for s in held_out_scenes(n, seed)]
    world_psnr = [psnr(as_array(trip(r)), as_array(r)) for r in renders]
    flat, colour = [], []
    for s in eval_scenes(n, seed):
        render = world.render(s, SIZE)
        out = trip(render)
        flat.append(psnr(as_array(out), as_array(render)))
        colour.append(attributes(out, s)["colour"])
    return {"psnr": float(np.mean(world_psnr)), "psnr_single": float(np.mean(flat)), "colour": float(np.mean(colour)),
            **flat_errors(trip)}


README_SCENE = world.Scene((world.place(world.Subject("circle", "red", "striped"), "in the centre", "large"),),
                           "flat", "blue")  # its caption is the README's first command's prompt


def one_prompt(pipe, scene: world.Scene = README_SCENE, seeds=range(16), steps: int | None = None,
               true_cfg: float = 4.0) -> dict[str, float]:
    """`world.caption(scene)` drawn once per seed with the CLI's defaults for the built-in model (the checkpoint's
    steps, true CFG 4, empty negative prompt): how often each attribute, and all four at once, are right."""
    seeds = list(seeds)
    images = pipe.generate([world.caption(scene)] * len(seeds), height=SIZE, width=SIZE, steps=steps, seed=seeds,
                           **cfg_kwargs(pipe, true_cfg))  # image i: its own generator, as `--seed s_i` alone
    got = [attributes(im, scene) for im in images]
    out = {k: float(np.mean([g[k] for g in got])) for k in got[0]}
    out["all"] = float(np.mean([all(g.values()) for g in got]))
    return out


def _t5_pair(pipe, a: str, b: str):
    """-> the T5 ids (</s> included) and the T5 features (L, d) of two captions."""
    tok = pipe.text.t5_tokenizer
    return tok.encode(a), tok.encode(b), *(pipe.encode_prompt(c)[0][0].float() for c in (a, b))


def _relative_change(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of |x - y| / |x|."""
    return float(((x - y).norm(dim=-1) / x.norm(dim=-1)).mean())


def text_locality(pipe, a: str = "a large red circle in the centre, on a blue background",
                  b: str = "a large green circle in the centre, on a blue background") -> dict[str, float]:
    """How far one changed word reaches into the T5 features of the other tokens: the mean relative change of the
    tokens before it and of those after it, and the mean cosine of the latter, each token compared with the same
    token of the other caption (the tokens after the change are aligned from the end: "red" is two pieces,
    "green" one). 0 / 0 / 1 would be a bag of words; a random hash would give cosines near 0."""
    ia, ib, ta, tb = _t5_pair(pipe, a, b)
    pre = next(i for i, (x, y) in enumerate(zip(ia, ib)) if x != y)               # common prefix length
    suf = next(i for i, (x, y) in enumerate(zip(ia[::-1], ib[::-1])) if x != y)   # common suffix length
    sa, sb = ta[len(ia) - suf:len(ia)], tb[len(ib) - suf:len(ib)]
    return {"before": _relative_change(ta[:pre], tb[:pre]), "after": _relative_change(sa, sb),
            "cosine_after": float(torch.nn.functional.cosine_similarity(sa, sb, dim=-1).mean())}


def text_order(pipe, a: str = "a large red circle in the centre, on a blue background",
               b: str = "a large blue circle in the centre, on a red background") -> float:
    """How much word order reaches the DiT: the mean relative change of each token's T5 features when the object's
    and the background's colours are swapped, each piece compared with the same piece (same id, same occurrence)
    of the other caption. The DiT gives every text token the same position (txt_ids are zeros), so it sees the
    features as a set: 0 would be a bag of words, in which the swap is invisible."""
    ia, ib, ta, tb = _t5_pair(pipe, a, b)
    if sorted(ia) != sorted(ib):
        raise ValueError("text_order: the two captions must hold the same pieces")
    where: dict[int, list[int]] = {}
    for j, t in enumerate(ib):
        where.setdefault(t, []).append(j)
    match = [where[t].pop(0) for t in ia]
    return _relative_change(ta[:len(ia)], tb[match])


CHANCE = {"colour": 1 / (len(world.COLOURS) - 1), "shape": 1 / len(world.SHAPES),
          "position": 1 / len(world.POSITIONS), "background": 1 / (len(world.COLOURS) - 1)}
