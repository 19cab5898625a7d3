"""Package hygiene: no test oracle at run time, the README's Python example runs, the kernels/weights mapping."""
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_minidit_never_imports_diffusers_or_transformers():
    code = ("import sys, minidit, minidit.pipeline, minidit.personalize, minidit.freecus, minidit.cli, "
            "minidit.kernels.ref_attention, minidit.weights.tiny; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for path in list((ROOT / "minidit").rglob("*.py")) + list((ROOT / "kernels").glob("*.py")) + list((ROOT / "weights").glob("*.py")):
        assert not re.search(r"^\s*(from|import)\s+(diffusers|transformers)\b", path.read_text(), re.M), path


def test_kernels_and_weights_live_in_the_package_namespace():
    import minidit.kernels.ref_attention
    import minidit.weights
    assert Path(minidit.kernels.ref_attention.__file__).resolve() == ROOT / "kernels" / "ref_attention.py"
    assert minidit.weights.__file__.startswith(str(ROOT / "weights"))


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's 'one forward pass' example, pointed at the tiny built-in repository."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## One forward pass in Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 30
    block = block.replace('root = "/models/FLUX.1-dev"', "from minidit.weights.tiny import tiny_repo; root = tiny_repo()")
    block = block.replace("H, W, T = 1, 512, 512, 512", "H, W, T = 1, 64, 48, 16")
    monkeypatch.setenv("MINIDIT_CACHE", str(tmp_path))
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([1, 12, 64])" in r.stdout
