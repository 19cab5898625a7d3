"""Where a FLUX.1 repository's files are: a folder, the local Hugging Face cache (offline), or the built-in one.

    root = resolve_weights("black-forest-labs/FLUX.1-dev")      # the snapshot folder in the HF cache
    paths = WeightPaths.find(root, transformer="flux1-dev-fp8.safetensors")
    schedule = read_schedule(root, guidance_embed=True)
    root = builtin_repo()                                       # weights/trained, shipped with minidit
    defaults = minidit.defaults.ModelDefaults.read(root)        # its minidit.json: size, steps, true CFG

minidit never downloads. The built-in checkpoint and the CLIP vocabulary live in the repository's `weights/`
folder, installed as `minidit/weights/` (pyproject.toml); `shipped` finds them in either place without importing
the training tools that live there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import files, sampling
from .defaults import shipped  # weights/<name>, installed or in a checkout (torch-free: the CLI's --help reads it)
from .loading import CheckpointError, plain_name, read_json
from .flux_loading import find_transformer

BUILTIN_NAME = "minidit-tiny (trained on the procedural world, weights/trained)"


def builtin_repo() -> Path:
    """The default checkpoint of every command: the tiny FLUX.1 trained on the procedural world (weights/world.py,
    weights/train_tiny.py), shipped with the package as a FLUX.1 repository folder in the official layouts."""
    root = shipped("trained")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"the built-in trained tiny checkpoint is missing from the installation ({root}); "
                                "reinstall minidit or pass --weights")
    return root


def read_schedule(root: str | Path, guidance_embed: bool) -> sampling.FlowSchedule:
    """The time shift from `root/scheduler/scheduler_config.json` as diffusers reads it; without a scheduler/
    folder, FLUX.1's own rule: dynamic shifting for dev (guidance-distilled), none for schnell. A config that is
    there but cannot be read (a FIFO, a directory, too large, not JSON) is an error, never replaced by defaults."""
    folder = Path(root) / "scheduler"
    file = folder / "scheduler_config.json"
    if not os.path.lexists(folder) and not os.path.lexists(file):
        return sampling.FlowSchedule(dynamic=guidance_embed)
    config = read_json(file, "scheduler config")
    try:
        return sampling.FlowSchedule.from_config(config, str(file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None


def hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloads (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    return dirs


def resolve_weights(path: str | Path) -> Path:
    """A local folder, a Hugging Face cache folder `models--org--name`, or a repo name `org/name` looked up
    offline in the local cache (the snapshot `refs/main` points to, else the newest). Never downloads."""
    p = Path(path).expanduser()
    if p.exists():
        return snapshot(p) if p.name.startswith("models--") else p
    if "/" in str(path) and not str(path).startswith(("/", ".")) and len(str(path).split("/")) == 2:
        name = "models--" + str(path).replace("/", "--")
        for d in hf_cache_dirs():
            if (d / name).is_dir():
                return snapshot(d / name)
        raise CheckpointError(f"{path!r} is not in the local Hugging Face cache (looked in "
                              f"{', '.join(str(d) for d in hf_cache_dirs())}); minidit never downloads: "
                              f"run `hf download {path}` or pass a folder")
    raise CheckpointError(f"weights not found: {path}")


def snapshot(repo: Path) -> Path:
    """The snapshot folder of a Hugging Face cache folder `models--org--name`: the one `refs/main` names (a plain
    commit hash, never a path), else the newest. A snapshot that is a link out of the repository folder is refused
    like a path in refs/main: nothing is read from outside the folder the user gave."""
    repo = Path(repo)
    ref = repo / "refs" / "main"
    found = None
    if os.path.lexists(ref):
        name = plain_name(files.read_text(ref, "Hugging Face ref", 256, error=CheckpointError).strip(), ref)
        found = repo / "snapshots" / name if (repo / "snapshots" / name).is_dir() else None
    if found is None:
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda s: s.stat().st_mtime) \
            if (repo / "snapshots").is_dir() else []
        if not snaps:
            raise CheckpointError(f"{repo} has no snapshots")
        found = snaps[-1]
    if not found.resolve().is_relative_to(repo.resolve()):
        raise CheckpointError(f"{repo}: snapshot {found.name!r} links out of the repository folder (paths are refused)")
    return found


@dataclass
class WeightPaths:
    """Where each component comes from; any field may be set explicitly."""
    transformer: Path
    ae: Path
    text_encoder: Path       # CLIP
    text_encoder_2: Path     # T5
    tokenizer: Path          # CLIP vocab.json + merges.txt
    tokenizer_2: Path        # T5 tokenizer.json or spiece.model

    @staticmethod
    def find(root: Path, **overrides) -> "WeightPaths":
        root = Path(root)
        found = dict(
            transformer=find_transformer(root) or root / "transformer",
            ae=root / "ae.safetensors" if (root / "ae.safetensors").exists() else root / "vae",
            text_encoder=root / "text_encoder", text_encoder_2=root / "text_encoder_2",
            tokenizer=root / "tokenizer", tokenizer_2=root / "tokenizer_2")
        unknown = sorted(set(overrides) - set(found))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; the components are {sorted(found)}")
        for k, v in overrides.items():  # a relative override is looked up in the root first, then as given
            if v is not None:
                found[k] = root / v if not Path(v).is_absolute() and (root / v).exists() else Path(v)
        missing = [f"{k} ({v})" for k, v in found.items() if not v.exists()]
        if missing:
            raise CheckpointError(f"weights incomplete in {root}: missing {', '.join(missing)}. Expected a FLUX.1 "
                                  "repository: flux1-*.safetensors (or transformer/), ae.safetensors (or vae/), "
                                  "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
        return WeightPaths(**found)
