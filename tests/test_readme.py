"""Every ```python block of README.md runs verbatim (issue 14), in a fresh folder and namespace each.

The snippets use the built-in checkpoint (`Pipeline.load()`, weights/trained). The default step counts (28 / 30,
and the model's own in its minidit.json) are lowered to 2 while the snippets run, so the test adds seconds, not
minutes; everything else runs as written."""
import re

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    from dataclasses import replace

    from minidit import freecus, pipeline
    from minidit.defaults import ModelDefaults
    monkeypatch.setattr(pipeline, "DEFAULT_STEPS", {"dev": 2, "schnell": 2})
    monkeypatch.setattr(freecus, "DEFAULT_STEPS", {"dev": 2, "schnell": 2})
    read = ModelDefaults.read  # the built-in model's minidit.json states its 28 steps
    monkeypatch.setattr(ModelDefaults, "read", classmethod(lambda cls, root: replace(read(root), steps=2)))
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_first_command_prompt_is_the_one_the_quality_bench_draws():
    """bench/quality.py's row "the README's prompt" draws `world.caption(quality.README_SCENE)` over 16 seeds and
    reads it back against that scene: it must be the prompt of the README's first command."""
    from minidit.weights import quality, world
    first = re.search(r'^```bash\n.*?minidit generate --prompt "([^"]+)"', (ROOT / "README.md").read_text(),
                      flags=re.S | re.M)
    assert first is not None and first.group(1) == world.caption(quality.README_SCENE)
