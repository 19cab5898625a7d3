"""`minidit info PATH`: what a FLUX.1 weights folder contains, read from safetensors headers only (no tensors).

Cheap checks only: every safetensors header parses and covers its file exactly (a truncated file fails here),
every config/tokenizer JSON parses, spiece.model and merges.txt are non-empty regular files. `minidit info` exits
with code 1 unless the folder is complete and every check passes."""
from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

from ..loading import CheckpointError, LazyStateDict, check_regular, find_safetensors, read_json
from ..repository import resolve_weights

COMPONENTS = [  # (name, candidates relative to the root, what it is)
    ("transformer", ["flux1-dev.safetensors", "flux1-schnell.safetensors", "flux1-*.safetensors", "transformer"], "FLUX MMDiT"),
    ("ae", ["ae.safetensors", "vae"], "autoencoder"),
    ("text_encoder", ["text_encoder"], "CLIP-L text encoder"),
    ("text_encoder_2", ["text_encoder_2"], "T5-v1.1-XXL encoder"),
    ("tokenizer", ["tokenizer/vocab.json"], "CLIP tokenizer"),
    ("tokenizer_2", ["tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json"], "T5 tokenizer"),
]


def _find(root: Path, candidates: list[str]) -> Path | None:
    for c in candidates:
        hits = sorted(root.glob(c))
        if hits:
            return hits[0]
    return None


def _check_small_files(p: Path) -> None:
    """The JSON and tokenizer files of a component: parse the JSON, check the rest are non-empty files."""
    if not p.is_dir():  # a FIFO or device where a file belongs: refused from its stat, never opened
        check_regular(p, p.name)
    for f in sorted(p.iterdir()) if p.is_dir() else [p]:
        if f.suffix == ".json" and not f.name.endswith(".safetensors.index.json"):
            read_json(f, f.name)
        elif f.name in ("merges.txt", "spiece.model", "vocab.json"):
            check_regular(f, f.name)
            if f.stat().st_size == 0:
                raise CheckpointError(f"{f}: empty file")
    if p.name == "vocab.json" and not (p.parent / "merges.txt").is_file():
        raise CheckpointError(f"{p.parent}: vocab.json without merges.txt")


def inspect(path: str | Path) -> tuple[str, bool]:
    """-> (the report, whether the folder is complete and every cheap check passed)."""
    root = resolve_weights(path)
    lines = [f"weights: {root}"]
    missing = []
    variant = "unknown"
    for name, candidates, what in COMPONENTS:
        p = _find(root, candidates)
        if p is None:
            missing.append(name)
            lines.append(f"  {name:<15} MISSING ({what}: looked for {', '.join(candidates)})")
            continue
        try:
            _check_small_files(p.parent if p.suffix in (".json", ".model") else p)
            if p.suffix in (".json", ".model"):
                lines.append(f"  {name:<15} {p.relative_to(root)}")
                continue
            sd = LazyStateDict(find_safetensors(p) if p.is_dir() else [p])
        except CheckpointError as e:
            lines.append(f"  {name:<15} UNREADABLE: {e}")
            missing.append(name)
            continue
        n = sum(prod(sd.shape(k)) for k in sd)
        dtypes = Counter(str(sd.dtype(k)).replace("torch.", "") for k in sd)
        if name == "transformer":
            variant = "dev" if any("guidance_in." in k or "guidance_embedder." in k for k in sd) else "schnell"
        size = sum(prod(sd.shape(k)) * sd.dtype(k).itemsize for k in sd)
        lines.append(f"  {name:<15} {str(p.relative_to(root)):<32} {n / 1e6:10.1f} M params  {size / 2**30:6.2f} GiB  "
                     f"{', '.join(f'{d} x{c}' for d, c in dtypes.most_common())}")
    lines.insert(1, f"variant: FLUX.1-{variant}" if variant != "unknown" else "variant: unknown (no transformer)")
    lines.append("complete: yes" if not missing else f"complete: no (missing {', '.join(missing)})")
    return "\n".join(lines), not missing
