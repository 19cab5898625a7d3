"""Reading official checkpoints: safetensors only, streamed tensor by tensor onto a meta-built module.

Every component (transformer, text encoders, autoencoder) loads the same way:

    sd = open_checkpoint(path)                        # lazy: reads headers only
    with torch.device("meta"): model = Model(cfg)     # no memory allocated
    load_streaming(model, sd, device, dtype)          # one tensor at a time, then load_state_dict(assign=True)

so a 23.8 GB bf16 file never needs a second full copy in host RAM: each tensor is read from the memory-mapped
file, cast/moved to its final device and dtype, and the host copy is dropped before the next one is read.
Pickled checkpoints (.ckpt/.pt/.pth/.bin) are refused and never unpickled.

What is read: only regular files (a FIFO or device is refused from its stat, never opened), and from a shard
index only plain file names inside the index's folder (no "..", no separators, no absolute paths: the message
never says whether such a path exists). Every floating tensor is checked finite as it streams in, and its kind
(float vs integer/bool) against the model's. Tensors are read with plain file reads into memory the process
owns (`LazyStateDict.read`; a fused diffusers q/k/v is read straight into its rows), never left as views of the
memory-mapped file, so truncating or rewriting the file later cannot change them or SIGBUS, and no page of the
file stays mapped beside them: peak host memory is one model plus one tensor. Set MINIDIT_MMAP=1 to keep the
mapping instead (weights stay views of the file's pages, which must then stay unchanged).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import files
from .validate import device as checked_device

# stored dtypes of quantized formats that are not weights on their own, refused by name (whatever safetensors'
# table says): MX block scales (exponent only) and fp4 values packed two per byte
# safetensors' dtype names (the header's "dtype") -> torch; what safetensors.torch reads, written out here
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "C64": torch.complex64}
NOT_WEIGHTS = {"F8_E8M0": "MX block scales (exponent only)", "F4": "fp4 values packed two per byte"}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_JSON_BYTES = files.LIMITS["json"]  # configs, indexes and tokenizer.json are far smaller


class CheckpointError(ValueError):
    """A checkpoint is missing, not safetensors, corrupt, or does not match the model."""


def check_regular(path: Path, what: str = "checkpoint") -> None:
    """Raise unless `path` is a regular file (symlinks followed), decided from stat: a FIFO is never opened."""
    files.regular(path, what, error=CheckpointError)


def read_json(path: str | Path, what: str = "config") -> dict:
    """A JSON object from a regular file of bounded size (files.read_json); every failure is a CheckpointError
    naming the file."""
    return files.read_json(path, what, MAX_JSON_BYTES, error=CheckpointError)


def plain_name(name, where: Path) -> str:
    """A file name listed inside `where` (a shard, a snapshot): a plain name, never a path out of the folder."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
            or os.path.isabs(name):
        raise CheckpointError(f"{where}: {name!r} is not a plain file name in its folder (paths are refused)")
    return name


def _check_file(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: pickled checkpoints are refused (they can run arbitrary code when loaded); "
            "minidit reads .safetensors only — convert it with safetensors.torch.save_file first")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file")
    check_regular(path)


class LazyStateDict(Mapping):
    """Read-only `{name: tensor}` over one or more .safetensors files; a tensor is read only when indexed."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, int] = {}  # key -> index into self._handles
        self._handles = []
        self._offset_cache: dict[int, dict[str, tuple[int, int]]] = {}
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

    def __contains__(self, key) -> bool:  # from the header: Mapping's default would read the tensor
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{self.files[self._where[key]]}: cannot read tensor {key!r} ({e})") from None

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key` as an owned CPU tensor, read with plain file reads rather than through the memory map, so
        no page of the file stays mapped (resident) in this process: `out` (contiguous, the stored dtype and
        shape, e.g. a slice of a fused tensor) or a new tensor is the only copy."""
        f = self.files[self._where[key]]
        begin, end = self._offsets(self._where[key])[key]
        if out is None:
            out = torch.empty(self.shape(key), dtype=self.dtype(key))
        if not out.is_contiguous() or out.dtype != self.dtype(key) or tuple(out.shape) != self.shape(key) \
                or out.numel() * out.element_size() != end - begin:
            raise CheckpointError(f"{f}: tensor {key!r} ({end - begin} bytes) does not fit {out.dtype} {tuple(out.shape)}")
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(f, "rb", buffering=0) as fh:
            fh.seek(begin)
            while buf:
                n = fh.readinto(buf)
                if not n:
                    raise CheckpointError(f"{f}: truncated while reading tensor {key!r}")
                buf = buf[n:]
        return out

    def _offsets(self, i: int) -> dict[str, tuple[int, int]]:
        """key -> (begin, end) byte offsets in file i, from its header (read once; safe_open has validated it)."""
        if i not in self._offset_cache:
            with open(self.files[i], "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self._offset_cache[i] = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                                     for k, v in header.items() if k != "__metadata__"}
        return self._offset_cache[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def _slice(self, key: str):
        return self._handles[self._where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slice(key).get_dtype()
        if name in NOT_WEIGHTS:
            raise CheckpointError(f"{self.files[self._where[key]]}: tensor {key!r} has dtype {name}: "
                                  f"{NOT_WEIGHTS[name]} of a quantized format, not weights minidit can read")
        try:
            return SAFETENSORS_DTYPES[name]
        except KeyError:
            raise CheckpointError(f"{self.files[self._where[key]]}: tensor {key!r} has dtype {name}, "
                                  "which torch cannot hold") from None

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
        return self._apply(op, [self.src[s] for s in srcs])

    def read(self, key, out: torch.Tensor | None = None) -> torch.Tensor:
        """`self[key]` as an owned tensor (into `out` if given) from plain file reads of a file-backed source
        (`LazyStateDict.read`), with no transient copy: a fused ("cat") tensor is allocated once and each source
        is read straight into its rows."""
        op, srcs = self.plan[key]
        if op == "copy":
            return self.src.read(srcs[0], out)
        if op != "cat":
            t = self._apply(op, [self.src.read(srcs[0])])
            return t if out is None else out.copy_(t)
        if out is None:
            out = torch.empty(self.shape(key), dtype=self.dtype(key))
        row = 0
        for s in srcs:
            part = out[row:row + tensor_shape(self.src, s)[0]]
            if self.src.dtype(s) == out.dtype:
                self.src.read(s, part)
            else:  # mixed stored dtypes: read, then cast into place
                part.copy_(self.src.read(s))
            row += part.shape[0]
        return out

    def dtype(self, key) -> torch.dtype:
        return functools.reduce(torch.promote_types, (self.src.dtype(s) for s in self.plan[key][1]))

    @staticmethod
    def _apply(op: str, ts: list[torch.Tensor]) -> torch.Tensor:
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
        shapes = [tensor_shape(self.src, s) for s in srcs]
        if op == "cat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if op == "conv1x1":
            return (*shapes[0], 1, 1)
        return shapes[0]

    def __iter__(self):
        return iter(self.plan)

    def __len__(self):
        return len(self.plan)


def _reads_files(sd: Mapping) -> bool:
    """Whether `sd` (a LazyStateDict, possibly under Converted views) can `read` its tensors from files."""
    while isinstance(sd, Converted):
        sd = sd.src
    return isinstance(sd, LazyStateDict)


def tensor_shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(sd.shape(key)) if hasattr(sd, "shape") else tuple(sd[key].shape)


def find_safetensors(folder: Path, stem: str | None = None) -> list[Path]:
    """The weight files of a folder: via `*.safetensors.index.json` when present (sharded), else all
    `*.safetensors` (optionally only those whose name starts with `stem`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if stem is None or p.name.startswith(stem))
    if indexes:
        weight_map = read_json(indexes[0], "shard index").get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{indexes[0]}: weight_map must be an object {{tensor: shard file}}")
        names = sorted({plain_name(n, indexes[0]) for n in weight_map.values()})
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


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t. The sum is finite only if every element is (NaN and Inf propagate) and is ~20x cheaper
    on the CPU than isfinite(t).all(); only a sum that overflows a finite tensor needs the exact check."""
    if t.element_size() == 1:  # fp8: no sum kernels
        t = t.to(torch.bfloat16)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


MAX_CONFIG_INT = 1 << 24  # bigger than any width, depth or vocabulary of FLUX.1's components
POSITIVE_FIELDS = ("eps", "scale_factor", "mlp_ratio", "theta")


def check_config(cfg, what: str, sd: Mapping | None = None, layers: Mapping[str, str] | None = None) -> None:
    """Bounds on a config dataclass before any module is built: every int in [0, 2^24], every float finite
    (eps, scale_factor, ... > 0); each `layers` field {field: key prefix} equal to the number of blocks the
    checkpoint `sd` holds under that prefix, so `num_layers = 10**9` is a quick named error, never a hang."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if isinstance(x, int) and not 0 <= x <= MAX_CONFIG_INT:
                raise CheckpointError(f"{what}: config {f.name} = {x} is out of range [0, {MAX_CONFIG_INT}]")
            if isinstance(x, float) and not math.isfinite(x) or f.name in POSITIVE_FIELDS and not x > 0:
                raise CheckpointError(f"{what}: config {f.name} = {x} (must be a finite"
                                      f"{' positive' if f.name in POSITIVE_FIELDS else ''} number)")
    for name, prefix in (layers or {}).items():
        found = {k.split(prefix, 1)[1].split(".", 1)[0] for k in sd if prefix in k}
        if getattr(cfg, name) != len(found):
            raise CheckpointError(f"{what}: config {name} = {getattr(cfg, name)} but the checkpoint holds "
                                  f"{len(found)} blocks ({prefix}N)")


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
    shapes = {new: tensor_shape(sd, old) for new, old in names.items()}
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    check_keys(expected, shapes, what, also_missing=getattr(sd, "missing", ()))
    device = torch.device(device)
    keep_mmap = os.environ.get("MINIDIT_MMAP", "") == "1"
    owned = not keep_mmap and _reads_files(sd)  # plain file reads: owned copies, no mapped page stays resident
    tensors = {}
    for new, old in names.items():
        src = sd.read(old) if owned else sd[old]
        if src.is_floating_point() != state[new].is_floating_point():
            raise CheckpointError(f"{what}: tensor {old!r} is {str(src.dtype).replace('torch.', '')} where the "
                                  f"model has {str(state[new].dtype).replace('torch.', '')}")
        if dtype is not None and src.is_floating_point():
            t = src.to(device=device, dtype=dtype)
        else:
            t = src.to(device=device)
        if not (keep_mmap or owned) and t.device.type == "cpu" \
                and t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            t = t.clone()  # still a view of the mapped file: own it, so later changes to the file cannot reach it
        if t.is_floating_point() and not _all_finite(t):
            cast = f" after the cast to {str(t.dtype).replace('torch.', '')}" if t.dtype != src.dtype else ""
            raise CheckpointError(f"{what}: tensor {old!r} holds NaN or Inf{cast}")
        tensors[new] = t
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def default_device_dtype(device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """The one default rule every loader shares: device CUDA if available, else the CPU; dtype bf16 on CUDA,
    fp32 elsewhere. Given values are kept."""
    # "--device cuda" without CUDA: a named error before any loading
    device = checked_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
