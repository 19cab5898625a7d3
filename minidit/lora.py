"""FLUX.1 LoRAs, merged into the transformer's weights as they stream in: W[rows] += s·(α/r)·B·A in fp32, then cast.

    loras = read_loras([("style.safetensors", 0.8)], cfg)   # headers + a finiteness pass, before any model is built
    model = load_transformer(path, loras=[("style.safetensors", 0.8)])   # the same, then merged while streaming
    set_loras(model, [("other.safetensors", 1.0)])           # switch: touched tensors re-read from the base file

Layouts read (every key is mapped or the file is refused, naming the keys):
  kohya / sd-scripts  `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
                      (also ComfyUI's `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`)
  diffusers / PEFT / ai-toolkit  `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `.lora_B.weight`,
                      optional `.alpha` keys or a `lora_adapter_metadata` header (PEFT's r, lora_alpha and patterns);
                      q/k/v (and the single blocks' proj_mlp) land in their rows of the fused BFL tensors,
                      diffusers' (scale, shift) `norm_out.linear` rows are swapped into BFL's (shift, scale)
  BFL                 `double_blocks.0.img_attn.qkv.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias` and QK-norm
                      `...query_norm.scale` (FLUX.1-Depth-dev-lora / Canny-dev-lora)
  XLabs               `double_blocks.0.processor.qkv_lora1.down.weight` (img), `..._lora2` (txt), `proj_lora*`;
                      single blocks `processor.qkv_lora` (linear1's q/k/v rows) and `proj_lora` (linear2)

Scale of a module: α/r where the file gives α (kohya `.alpha`, diffusers `.alpha` keys or PEFT metadata), else 1:
kohya's default α is r (sd-scripts `networks/lora_flux.py`), diffusers' no-alpha convention is W + B·A
(`diffusers/utils/peft_utils.py: get_peft_kwargs`), BFL's `LinearLora` has no α (`src/flux/modules/lora.py`), XLabs
loads with `network_alpha=None` (`src/flux/xflux_pipeline.py`). The user's scale multiplies all of it.

BFL control LoRAs follow BFL's `src/flux/modules/lora.py` + `util.py: load_flow_model`: every Linear becomes
`base(x) + scale·lora_B(lora_A(x))` with a biased lora_B (so the bias delta is scaled too), the dev checkpoint's
`img_in.weight` is zero-padded to the LoRA's 128 input columns (`optionally_expand_state_dict`), and the file's
QK-norm scales *replace* the base's (`load_state_dict(assign=True)`; not scaled). Deviation of diffusers 0.42
(`lora_conversion_utils.py: _convert_bfl_flux_control_lora_to_diffusers`): it applies `swap_scale_shift` to lora_A
of `final_layer.adaLN_modulation.1` as well as to lora_B, which permutes the rank rows of A without B's columns, so
its final-layer delta is not BFL's; minidit follows BFL (tests/test_lora.py shows the difference). A LoRA whose
img_in lora_A is narrower than the model (a dev LoRA on a control/Fill model) adds into the first columns, as
diffusers' `_maybe_expand_lora_state_dict` does.

Not read (a named error): text-encoder LoRA keys (`lora_te*`, `text_encoder*`), LyCORIS (LoKr/LoHa), DoRA,
full-weight `diff` / `diff_b` patches, conv LoRAs, fal's Kontext layout (`base_model.model.*`).

Switching LoRAs (`set_loras`) re-reads from the base checkpoint every tensor the old or new LoRAs touch and merges
the new ones: exact (bit-equal to a fresh load), no memory kept for undo, costs reading those tensors again (for a
LoRA on every Linear, most of the file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .files import safetensors_header
from .loading import CheckpointError, Converted, LazyStateDict
from .transformer import Flux, FluxConfig, diffusers_to_bfl_plan

ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_te1_", "lora_te2_")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
PARTS = ((".lora_down.weight", "A"), (".lora_up.weight", "B"), (".lora_A.weight", "A"), (".lora_B.weight", "B"),
         (".lora_B.bias", "bias"), (".alpha", "alpha"), (".down.weight", "A"), (".up.weight", "B"))
MAX_BLOCKS = 256  # block indices read from a LoRA's keys (FLUX.1 has 19 + 38)
XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
         "proj_lora2": "txt_attn.proj"}


@dataclass(frozen=True)
class Target:
    module: str                          # BFL Linear, e.g. "single_blocks.0.linear1"
    parts: tuple[int, int] | None = None  # rows as a range of the fused tensor's parts (q, k, v[, mlp]); None: all
    swap: bool = False                   # diffusers' (scale, shift) rows -> BFL's (shift, scale)


@dataclass(frozen=True)
class Delta:
    """One low-rank update W[rows] += scale·B·A (+ bias[rows] += scale·bias), keys of the LoRA file."""
    target: Target
    down: str
    up: str
    bias: str | None
    alpha_scale: float                   # α / r (1 without α)


@dataclass
class Lora:
    path: Path
    scale: float
    fingerprint: str                     # sha256 of the safetensors header (names, shapes, dtypes, offsets, metadata)
    layout: str                          # "kohya" | "diffusers" | "bfl" | "xlabs"
    deltas: list[Delta]
    replace: dict[str, str]              # BFL parameter -> LoRA key whose value replaces it (QK-norm scales)
    in_channels: int | None              # width of img_in's lora_A, if the file has one
    sd: LazyStateDict = dataclasses.field(repr=False, default=None)
    finite: bool = False                 # every tensor read once and found finite (check_finite)


# ---------------------------------------------------------------------------------------------- key tables

def key_table(depth: int, depth_single: int) -> tuple[dict[str, Target], dict[str, str]]:
    """Every LoRA module name minidit reads -> Target, and every norm-scale name -> BFL parameter."""
    linears, norms = {}, {}
    for bfl, (op, srcs) in diffusers_to_bfl_plan(depth, depth_single, guidance=True).items():
        if bfl.endswith(".scale"):
            norms[bfl] = norms[srcs[0]] = bfl
            continue
        if not bfl.endswith(".weight"):
            continue
        module = bfl[:-len(".weight")]
        linears[module] = linears["lora_unet_" + module.replace(".", "_")] = Target(module)
        for i, src in enumerate(srcs):  # diffusers names: q/k/v (+ proj_mlp) are parts of one fused BFL tensor
            linears[src[:-len(".weight")]] = Target(module, (i, i + 1) if op == "cat" else None, op == "swap")
    for i in range(depth):
        for name, sub in XLABS.items():
            linears[f"double_blocks.{i}.processor.{name}"] = Target(f"double_blocks.{i}.{sub}")
    for i in range(depth_single):
        linears[f"single_blocks.{i}.processor.qkv_lora"] = Target(f"single_blocks.{i}.linear1", (0, 3))
        linears[f"single_blocks.{i}.processor.proj_lora"] = Target(f"single_blocks.{i}.linear2")
    return linears, norms


def split_key(key: str) -> tuple[str, str | None]:
    """`transformer.x.attn.to_q.lora_A.weight` -> ("x.attn.to_q", "A"); a key with no LoRA part -> (key, None)."""
    for p in PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    for suffix, part in PARTS:
        if key.endswith(suffix) and (part != "A" and part != "B" or "lora" in suffix or ".processor." in key):
            return key[:-len(suffix)], part
    return key, None


def part_rows(cfg: FluxConfig, t: Target, out: int) -> tuple[int, int]:
    """Row range of `t` in its BFL tensor of `out` rows."""
    if t.parts is None:
        return 0, out
    h, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    sizes = [h, h, h, mlp][:4 if t.module.endswith("linear1") else 3]
    return sum(sizes[:t.parts[0]]), sum(sizes[:t.parts[1]])


# ---------------------------------------------------------------------------------------------- reading

def parse_lora_arg(text: str) -> tuple[str, float]:
    """CLI `--lora PATH[:SCALE]` -> (path, scale); a suffix that is not a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ValueError(f"--lora {text}: scale {tail} must be a finite number")
        return path, scale
    return text, 1.0


def header_fingerprint(path: Path) -> str:
    """sha256 (first 16 hex digits) of the safetensors header: tensor names, shapes, dtypes, offsets, metadata."""
    data = safetensors_header(path, "LoRA", CheckpointError)  # files.py: a regular file, a bounded header
    return hashlib.sha256(len(data).to_bytes(8, "little") + data).hexdigest()[:16]


def peft_alpha(meta: dict[str, str], path: Path) -> tuple[float, float, dict, dict] | None:
    """(r, lora_alpha, rank_pattern, alpha_pattern) from diffusers' `lora_adapter_metadata` header (PEFT's
    LoraConfig as a dict, keys prefixed `transformer.` when written by a pipeline's save_lora_weights), if any."""
    if "lora_adapter_metadata" not in meta:
        return None
    try:
        m = json.loads(meta["lora_adapter_metadata"])
        if any(k.startswith("transformer.") for k in m):  # save_lora_weights prefixes each component's config
            m = {k[len("transformer."):]: v for k, v in m.items() if k.startswith("transformer.")}
        r, alpha = float(m["r"]), float(m.get("lora_alpha", m["r"]))
        ranks, alphas = dict(m.get("rank_pattern") or {}), dict(m.get("alpha_pattern") or {})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"LoRA {path}: unreadable lora_adapter_metadata header") from None
    return r, alpha, ranks, alphas


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha pattern rule (peft/tuners/tuners_utils.py: a key matches a module name that ends in it),
    with the keys taken literally: PEFT reads them as regular expressions, which from an untrusted file could
    take forever (what diffusers writes are plain module names)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + str(key)):
            return float(value)
    return default


def read_lora(path, scale: float = 1.0, cfg: FluxConfig | None = None, check_values: bool = True) -> Lora:
    """Parse and validate one LoRA file before any model is built: every key mapped (unknown ones named), ranks
    consistent, shapes those of `cfg` (when given), every tensor finite (`check_values`). One-line errors."""
    path = Path(path)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise CheckpointError(f"LoRA {path}: scale {scale!r} must be a finite number")
    sd = LazyStateDict([path])
    if not len(sd):
        raise CheckpointError(f"LoRA {path}: holds no tensors")
    encoder = sorted(k for k in sd if k.startswith(ENCODER_PREFIXES))
    if encoder:
        raise CheckpointError(f"LoRA {path}: holds {len(encoder)} text-encoder LoRA tensors ({encoder[0]}, ...), "
                              "which minidit does not merge (transformer LoRAs only)")
    counts = [int(m) + 1 for k in sd for m in re.findall(r"blocks[._](\d{1,4})[._]", k)]
    depth = min(max(counts, default=0), MAX_BLOCKS)  # a larger index is an unknown key, not a huge table
    if cfg is not None:
        depth = max(depth, cfg.depth, cfg.depth_single_blocks)
    linears, norms = key_table(depth, depth)
    modules: dict[str, dict[str, str]] = {}
    replace, unknown = {}, []
    for k in sd:
        name, part = split_key(k)
        if part is None and name in norms:
            replace[norms[name]] = k
        elif part is not None and name in linears:
            modules.setdefault(name, {})[part] = k
        else:
            unknown.append(k)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"LoRA {path}: {len(unknown)} keys are not FLUX.1 transformer LoRA weights in a layout "
                              f"minidit reads (kohya, diffusers/PEFT, BFL, XLabs): {shown}")
    if not modules and not replace:
        raise CheckpointError(f"LoRA {path}: holds no LoRA weights")
    keys = " ".join(sd)
    layout = ("xlabs" if ".processor." in keys else "kohya" if ".lora_down." in keys
              else "bfl" if "double_blocks." in keys or "single_blocks." in keys or "img_in." in keys else "diffusers")
    peft = peft_alpha(sd.metadata(), path)
    deltas, targets = [], {}
    for name, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"LoRA {path}: module {name} has {', '.join(parts.values())} but not both factors "
                                  "(lora_down/lora_A and lora_up/lora_B)")
        a, b = sd.shape(parts["A"]), sd.shape(parts["B"])
        if not all(sd.dtype(k).is_floating_point for k in parts.values()):
            raise CheckpointError(f"LoRA {path}: module {name} holds non-float tensors")
        if len(a) != 2 or len(b) != 2:
            raise CheckpointError(f"LoRA {path}: {parts['A']} is {a} and {parts['B']} is {b}: only linear "
                                  "(2-D) LoRA factors are read")
        if a[0] != b[1]:
            raise CheckpointError(f"LoRA {path}: rank mismatch in {name}: {parts['A']} has rank {a[0]}, "
                                  f"{parts['B']} rank {b[1]}")
        rank = a[0]
        if "alpha" in parts:
            if sd.shape(parts["alpha"]) not in ((), (1,)):
                raise CheckpointError(f"LoRA {path}: {parts['alpha']} must be a scalar, got {sd.shape(parts['alpha'])}")
            alpha = sd.read(parts["alpha"]).float().item()
            if not math.isfinite(alpha):
                raise CheckpointError(f"LoRA {path}: {parts['alpha']} = {alpha} is not finite")
            alpha_scale = alpha / rank
        elif peft is not None:
            module = name
            r = pattern_value(peft[2], module, peft[0])
            if r != rank:
                raise CheckpointError(f"LoRA {path}: rank mismatch in {name}: lora_adapter_metadata says r={r:g}, "
                                      f"the tensors have rank {rank}")
            alpha_scale = pattern_value(peft[3], module, peft[1]) / rank
        else:
            alpha_scale = 1.0
        t = linears[name]
        delta = Delta(t, parts["A"], parts["B"], parts.get("bias"), alpha_scale)
        for other in targets.get(t.module, []):
            if other.target.parts is None or t.parts is None or not (
                    t.parts[1] <= other.target.parts[0] or other.target.parts[1] <= t.parts[0]):
                raise CheckpointError(f"LoRA {path}: {delta.down} and {other.down} both change {t.module}")
        targets.setdefault(t.module, []).append(delta)
        deltas.append(delta)
    img_in = [d for d in deltas if d.target.module == "img_in"]
    lora = Lora(path, float(scale), header_fingerprint(path), layout, deltas, replace,
                sd.shape(img_in[0].down)[1] if img_in else None, sd)
    if cfg is not None:
        check_shapes(lora, widened(cfg, [lora]))
    if check_values:
        check_finite(lora)
    return lora


def check_finite(lora: Lora) -> None:
    """Read every tensor once (plain file reads, nothing kept): NaN/Inf is a named error."""
    for k in lora.sd:
        if lora.sd.dtype(k).is_floating_point and not bool(torch.isfinite(lora.sd.read(k).float()).all()):
            raise CheckpointError(f"LoRA {lora.path}: tensor {k!r} holds NaN or Inf")
    lora.finite = True


def model_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Flux(cfg).state_dict().items()}


def check_shapes(lora: Lora, cfg: FluxConfig, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Each factor and replaced scale against the model `cfg` describes: one line naming the first misfit."""
    shapes = shapes or model_shapes(cfg)
    where = f"LoRA {lora.path}"
    for d in lora.deltas:
        w = d.target.module + ".weight"
        if w not in shapes:
            raise CheckpointError(f"{where}: {d.down} is for another model: this FLUX model has no {d.target.module}"
                                  f" ({cfg.depth} double, {cfg.depth_single_blocks} single blocks, "
                                  f"guidance {'yes' if cfg.guidance_embed else 'no'})")
        out, inp = shapes[w]
        lo, hi = part_rows(cfg, d.target, out)
        a, b = lora.sd.shape(d.down), lora.sd.shape(d.up)
        wide_ok = d.target.module == "img_in"  # a control LoRA widens img_in; a dev LoRA on a wider model pads
        if b[0] != hi - lo or a[1] != inp and not wide_ok:
            raise CheckpointError(f"{where}: shapes for another model: {d.up} {b} and {d.down} {a} do not fit "
                                  f"{d.target.module} ({hi - lo} rows of {shapes[w]})")
        if d.bias is not None and lora.sd.shape(d.bias) != (hi - lo,):
            raise CheckpointError(f"{where}: shapes for another model: {d.bias} is {lora.sd.shape(d.bias)}, "
                                  f"{d.target.module} has {hi - lo} rows")
    for p, k in lora.replace.items():
        if p not in shapes or lora.sd.shape(k) != shapes[p]:
            raise CheckpointError(f"{where}: shapes for another model: {k} is {lora.sd.shape(k)}, the model's {p} "
                                  f"is {shapes.get(p, 'absent')}")


def read_loras(loras, cfg: FluxConfig | None = None, check_values: bool = True) -> list[Lora]:
    """[(path, scale), ...] (or Lora objects from an earlier check) -> validated Loras: keys and ranks, shapes
    against `cfg` when given, then values (once per Lora); two files replacing one norm scale is an error."""
    out = [x if isinstance(x, Lora) else read_lora(x[0], x[1], check_values=False) for x in loras]
    if cfg is not None and out:
        wide = widened(cfg, out)
        shapes = model_shapes(wide)
        for lora in out:
            check_shapes(lora, wide, shapes)
    if check_values:
        for lora in out:
            if not lora.finite:
                check_finite(lora)
    seen = {}
    for lora in out:
        for p in lora.replace:
            if p in seen:
                raise CheckpointError(f"LoRA {lora.path}: replaces {p}, which {seen[p]} replaces too")
            seen[p] = lora.path
    return out


def widened(cfg: FluxConfig, loras: list[Lora]) -> FluxConfig:
    """The config after merging: img_in as wide as the widest img_in lora_A (BFL's zero-padded expansion)."""
    width = max([cfg.in_channels] + [x.in_channels for x in loras if x.in_channels])
    return dataclasses.replace(cfg, in_channels=width)


def lora_info(loras) -> list[tuple[str, str, float]]:
    """(file name, header fingerprint, scale) per LoRA, for PNG metadata."""
    return [(x.path.name, x.fingerprint, x.scale) for x in loras]


# ---------------------------------------------------------------------------------------------- merging

def swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def merged(key: str, base: Tensor, loras: list[Lora], cfg: FluxConfig, device) -> Tensor:
    """Base tensor `key` (BFL name, any stored dtype) with every LoRA's update: fp32 on `device`."""
    w = base.to(device=device, dtype=torch.float32)
    if key == "img_in.weight" and w.shape[1] < cfg.in_channels:  # BFL: zero-pad dev's img_in to the LoRA's width
        w = torch.cat([w, w.new_zeros(w.shape[0], cfg.in_channels - w.shape[1])], dim=1)
    for lora in loras:
        if key in lora.replace:
            w = lora.sd.read(lora.replace[key]).to(device=device, dtype=torch.float32)
        for d in lora.deltas:
            if key not in (d.target.module + ".weight", d.target.module + ".bias"):
                continue
            lo, hi = part_rows(cfg, d.target, w.shape[0])
            s = lora.scale * d.alpha_scale
            if key.endswith(".weight"):
                up = lora.sd.read(d.up).to(device=device, dtype=torch.float32)
                down = lora.sd.read(d.down).to(device=device, dtype=torch.float32)
                delta = (swap_halves(up) if d.target.swap else up) @ down
                w[lo:hi, :delta.shape[1]] += s * delta
            elif d.bias is not None:  # BFL's lora_B bias, scaled with the LoRA
                b = lora.sd.read(d.bias).to(device=device, dtype=torch.float32)
                w[lo:hi] += s * (swap_halves(b) if d.target.swap else b)
    return w


def touched(loras: list[Lora]) -> set[str]:
    """BFL parameter names the LoRAs change."""
    keys = {p for x in loras for p in x.replace}
    for x in loras:
        for d in x.deltas:
            keys.add(d.target.module + ".weight")
            if d.bias is not None:
                keys.add(d.target.module + ".bias")
    if any(x.in_channels for x in loras):
        keys.add("img_in.weight")
    return keys


class WithLoras(Converted):
    """A BFL-named checkpoint view whose touched tensors read merged (fp32, on `device`); the rest as stored.
    A Converted view, so load_streaming keeps its plain-file reads of the base underneath."""

    def __init__(self, src: Mapping, loras: list[Lora], cfg: FluxConfig, device):
        # not Converted.__init__: its membership test (`in` on a LazyStateDict) would read every tensor
        self.src, self.plan, self.missing = src, {k: ("copy", (k,)) for k in src}, getattr(src, "missing", [])
        self.loras, self.cfg, self.device, self.keys = loras, cfg, device, touched(loras)

    def __getitem__(self, key):
        t = self.src[key]
        return merged(key, t, self.loras, self.cfg, self.device) if key in self.keys else t

    def read(self, key, out=None):
        if key not in self.keys:
            return self.src.read(key, out)
        return merged(key, self.src.read(key), self.loras, self.cfg, self.device)

    def shape(self, key):
        shape = super().shape(key)
        return (shape[0], self.cfg.in_channels) if key == "img_in.weight" else shape
