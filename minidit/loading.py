"""Reading official checkpoints: safetensors only, streamed tensor by tensor onto a meta-built module.

Every component (transformer, text encoders, autoencoder) loads the same way:

    sd = open_checkpoint(path)                        # lazy: reads headers only
    with torch.device("meta"): model = Model(cfg)     # no memory allocated
    load_streaming(model, sd, device, dtype)          # one tensor at a time, then load_state_dict(assign=True)

so a 23.8 GB bf16 file never needs a second full copy in host RAM: each tensor is read from the memory-mapped
file, cast/moved to its final device and dtype, and the host copy is dropped before the next one is read.
Pickled checkpoints (.ckpt/.pt/.pth/.bin) are refused and never unpickled.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint is missing, not safetensors, corrupt, or does not match the model."""


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: pickled checkpoints are refused (they can run arbitrary code when loaded); "
            "minidit reads .safetensors only — convert it with safetensors.torch.save_file first")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file")


class LazyStateDict(Mapping):
    """Read-only `{name: tensor}` over one or more .safetensors files; a tensor is read only when indexed."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, int] = {}  # key -> index into self._handles
        self._handles = []
        for i, f in enumerate(self.files):
            _check_file(f)
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except SafetensorError as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
            except OSError as e:
                raise CheckpointError(f"{f}: cannot read ({e})") from None
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise CheckpointError(f"tensor {k!r} appears in both {self.files[self._where[k]].name} and {f.name}")
                self._where[k] = i

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{self.files[self._where[key]]}: cannot read tensor {key!r} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def _slice(self, key: str):
        return self._handles[self._where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._slice(key).get_dtype()]

    def metadata(self) -> dict[str, str]:
        return self._handles[0].metadata() or {} if self._handles else {}


class Converted(Mapping):
    """Lazy key conversion between layouts (e.g. diffusers -> BFL): `plan[new_key] = (op, source_keys)`.

    ops: "copy" (one source), "cat" (concatenate sources along dim 0, e.g. to_q/to_k/to_v -> qkv),
    "swap" (swap the two halves along dim 0: diffusers' final norm stores (scale, shift), BFL (shift, scale)),
    "conv1x1" (a Linear weight (O, I) as a 1x1 conv (O, I, 1, 1)). Sources the plan does not use are kept
    under their own names, so the strict key check reports them as unexpected.
    """

    def __init__(self, src: Mapping, plan: dict[str, tuple[str, tuple[str, ...]]]):
        self.src, self.plan = src, dict(plan)
        used = {s for _, srcs in plan.values() for s in srcs}
        missing = sorted({s for _, srcs in plan.values() for s in srcs if s not in src})
        # a plan entry with absent sources is dropped, and its source names are reported as missing keys
        self.missing = missing
        self.plan = {k: v for k, v in self.plan.items() if all(s in src for s in v[1])}
        for k in src:
            if k not in used:
                self.plan.setdefault(k, ("copy", (k,)))

    def __getitem__(self, key):
        op, srcs = self.plan[key]
        ts = [self.src[s] for s in srcs]
        if op == "cat":
            return torch.cat(ts, dim=0)
        if op == "swap":
            a, b = ts[0].chunk(2, dim=0)
            return torch.cat([b, a], dim=0)
        if op == "conv1x1":
            return ts[0].reshape(*ts[0].shape, 1, 1)
        return ts[0]

    def shape(self, key):
        op, srcs = self.plan[key]
        shapes = [_shape(self.src, s) for s in srcs]
        if op == "cat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if op == "conv1x1":
            return (*shapes[0], 1, 1)
        return shapes[0]

    def __iter__(self):
        return iter(self.plan)

    def __len__(self):
        return len(self.plan)


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(sd.shape(key)) if hasattr(sd, "shape") else tuple(sd[key].shape)


def find_safetensors(folder: Path, stem: str | None = None) -> list[Path]:
    """The weight files of a folder: via `*.safetensors.index.json` when present (sharded), else all
    `*.safetensors` (optionally only those whose name starts with `stem`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if stem is None or p.name.startswith(stem))
    if indexes:
        index = json.loads(indexes[0].read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(f"{indexes[0]} lists shards that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(p for p in folder.glob("*.safetensors") if stem is None or p.name.startswith(stem))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found pickled files {pickled}, which are refused)" if pickled else ""
        raise CheckpointError(f"no .safetensors files in {folder}{hint}")
    return files


def open_checkpoint(path: str | Path) -> LazyStateDict:
    """A .safetensors file, or a folder of (possibly sharded) .safetensors files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return LazyStateDict(find_safetensors(path) if path.is_dir() else [path])


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str,
               also_missing=()) -> None:
    """Raise one CheckpointError naming every missing key, unexpected key and shape mismatch.
    `also_missing`: source-layout names a conversion needed but did not find (reported as they are in the file)."""
    missing = list(also_missing) + [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
              for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    msg = [f"{what} does not match the model:"]

    def block(title, items):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            msg.append(f"  {title} ({len(items)}): " + ", ".join(shown))

    block("missing keys", missing)
    block("unexpected keys", unexpected)
    block("shape mismatches", shapes)
    raise CheckpointError("\n".join(msg))


def load_streaming(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    rename: Callable[[str], str] | None = None,
    what: str = "checkpoint",
) -> torch.nn.Module:
    """Fill a (meta-device) module from `sd`, one tensor at a time, with a plain strict `load_state_dict`.

    `rename` maps checkpoint keys to model keys (e.g. diffusers -> BFL names); `dtype` is the compute dtype
    (floating tensors of any stored dtype — fp32, bf16, fp16, fp8 — are cast to it; None keeps each stored dtype).
    """
    names = {(rename(k) if rename else k): k for k in sd}
    shapes = {new: _shape(sd, old) for new, old in names.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, shapes, what, also_missing=getattr(sd, "missing", ()))
    device = torch.device(device)
    tensors = {}
    for new, old in names.items():
        t = sd[old]
        if dtype is not None and t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
        else:
            t = t.to(device=device)
        tensors[new] = t
    model.load_state_dict(tensors, strict=True, assign=True)
    return model
