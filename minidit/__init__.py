"""minidit: a from-scratch, minimal FLUX.1 in pure PyTorch."""
__version__ = "0.1.0"
