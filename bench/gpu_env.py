"""What bench/gpu.py needs beyond torch and triton, on a machine with no network (the lent GPU machine).

    python bench/gpu_env.py pin               # the diffusers requirement of pyproject.toml's test extra
    python bench/gpu_env.py prune DIR         # drop from DIR the wheels of torch's and minidit's own dependencies
    python bench/gpu_env.py [--wheels DIR]    # install what is missing (offline), then print what is importable

bench/gpu_wheels.sh fills the wheel folder (default bench/.wheels/, git-ignored) on a machine with network:
diffusers, pinned to the test extra's version (the oracle the parity tests use), and its dependency closure for
the GPU machine's Python, less the packages that torch and minidit themselves depend on (numpy, pillow,
safetensors, filelock, ...): a machine that runs minidit has those already, and with them the folder would
grow from ~14 MB to ~37 MB. `ensure()` then installs, without any index:
  - minidit itself, editable from this checkout (`pip install --no-index --no-deps --no-build-isolation -e .`),
    when `minidit.kernels.ref_attention` is not importable (a copied checkout that was never installed);
  - diffusers from the wheel folder, when it is missing (`pip install --no-index --find-links DIR REQ`):
    dependencies already installed and new enough are kept, the others come from the folder.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib  # Python >= 3.11 (the GPU machine has 3.12)
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "bench" / ".wheels"
KERNEL = "minidit.kernels.ref_attention"  # importable only from an installed minidit (kernels/ maps into it)


def _name(req: str) -> str:
    """'diffusers==0.42.1; extra' -> 'diffusers' (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1)).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def diffusers_requirement() -> str:
    """The test extra's diffusers requirement as written there (e.g. 'diffusers==0.42.1')."""
    for req in project()["optional-dependencies"]["test"]:
        if _name(req) == "diffusers":
            return req.split(";")[0].strip()
    raise SystemExit("pyproject.toml: no diffusers in [project.optional-dependencies] test")


def provided() -> set[str]:
    """Names a machine that runs minidit already has: minidit's runtime dependencies and torch's own."""
    names = {_name(r) for r in project()["dependencies"]} | {"torch", "triton"}
    try:
        from importlib.metadata import requires
        names |= {_name(r) for r in requires("torch") or [] if "extra ==" not in r}
    except Exception:  # no torch here: its usual dependencies
        names |= {"filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec", "setuptools", "mpmath",
                  "markupsafe"}
    return names


def prune(folder: Path) -> list[str]:
    """Remove from `folder` the wheels of `provided()` packages; returns their file names."""
    keep = provided()
    gone = []
    for whl in sorted(folder.glob("*.whl")):
        if _name(whl.name.split("-")[0]) in keep:
            whl.unlink()
            gone.append(whl.name)
    return gone


def pip(*args: str) -> tuple[bool, str]:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def importable(module: str) -> bool:
    importlib.invalidate_caches()
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def ensure(wheels: Path = WHEELS, log=print) -> bool:
    """Install what is missing, offline. Returns True when minidit had to be installed (its editable finder only
    takes effect in a new interpreter: the caller re-executes itself)."""
    reexec = False
    if not importable(KERNEL):
        ok, out = pip("install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
        log(f"environment: minidit installed editable from {ROOT}" if ok else
            f"environment: editable install of minidit failed:\n{out[-2000:]}")
        reexec = ok
    if not importable("diffusers"):
        req = diffusers_requirement()
        if not any(wheels.glob("diffusers-*.whl")):
            log(f"environment: diffusers missing and no wheel folder at {wheels} (run bench/gpu_wheels.sh on a "
                "machine with network and carry that folder): the diffusers comparisons are skipped")
        else:
            ok, out = pip("install", "-q", "--no-index", "--find-links", str(wheels), req)
            importlib.invalidate_caches()  # this process imports it next
            log(f"environment: {req} installed from {wheels}" if ok else
                f"environment: installing {req} from {wheels} failed:\n{out[-2000:]}")
    return reexec


def main(argv: list[str]) -> None:
    if argv == ["pin"]:
        print(diffusers_requirement())
    elif len(argv) == 2 and argv[0] == "prune":
        for name in prune(Path(argv[1])):
            print(f"dropped {name} (torch or minidit already depends on it)")
    elif argv == [] or (len(argv) == 2 and argv[0] == "--wheels"):
        folder = Path(argv[1]) if argv else WHEELS
        if ensure(folder) and not os.environ.get("MINIDIT_GPU_ENV_REEXEC"):  # a new interpreter sees minidit
            env = dict(os.environ, MINIDIT_GPU_ENV_REEXEC="1")
            sys.exit(subprocess.run([sys.executable, __file__, "--wheels", str(folder)], env=env).returncode)
        for mod in (KERNEL, "diffusers"):
            m = importlib.import_module(mod) if importable(mod) else None
            print(f"{mod}: {getattr(m, '__version__', '') or 'ok'} {m.__file__}" if m else f"{mod}: MISSING")
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main(sys.argv[1:])
