"""Cold start: the way to the first image must not import torch._dynamo (about 1 s of a ~3 s process).

Run in a fresh interpreter, since anything else in the test session (diffusers, an earlier test) may have imported
it already."""
import os
import subprocess
import sys

from conftest import ROOT

from minidit.weights.tiny import write_tiny_repo

CHILD = r"""
import sys
from minidit.pipeline import Pipeline
pipe = Pipeline.load(sys.argv[1], device="cpu")
(image,) = pipe.generate("a cat", height=64, width=64, steps=2, seed=0)
assert image.size == (64, 64)
print(sorted(m for m in sys.modules if m == "torch._dynamo" or m.startswith("torch._dynamo.")))
"""


def test_load_and_generate_do_not_import_dynamo(tmp_path):
    root = write_tiny_repo(tmp_path / "FLUX.1-dev", "dev", seed=0)
    r = subprocess.run([sys.executable, "-c", CHILD, str(root)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_meta_built_embedding_skips_init_but_a_real_one_does_not():
    import torch

    from minidit.t5 import Embedding
    with torch.device("meta"):
        assert Embedding(4, 3).weight.is_meta
    e = Embedding(1000, 8)
    assert 0.5 < e.weight.std().item() < 1.5  # nn.Embedding's N(0, 1) init where there is memory
