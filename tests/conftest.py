"""Test set-up: never reach for a hub, CPU determinism, shared paths."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIP_VOCAB = ROOT / "weights" / "clip_tokenizer"  # the real CLIP-L vocabulary (see its NOTE.md)
SHARED = ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
