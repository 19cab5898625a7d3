"""Triton kernels, installed as `minidit.kernels`."""
from .ref_attention import ref_attention

__all__ = ["ref_attention"]
