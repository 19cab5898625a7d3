"""minidit: a from-scratch, minimal FLUX.1 in pure PyTorch with training-free subject personalization."""
__version__ = "0.1.0"

from .autoencoder import AutoEncoder, AutoEncoderConfig, load_autoencoder  # noqa: E402
from .image import load_image, load_mask, pil_to_tensor, tensor_to_pil  # noqa: E402
from .clip import CLIPTextConfig, CLIPTextEncoder  # noqa: E402
from .loading import CheckpointError  # noqa: E402
from .masks import Reference  # noqa: E402
from .pipeline import Pipeline  # noqa: E402
from .freecus import FreeCusSettings  # noqa: E402
from .personalize import EditSettings, PersonalizeSettings  # noqa: E402
from .presets import PRESET  # noqa: E402
from .refstate import RefState  # noqa: E402
from .t5 import T5Config, T5Encoder  # noqa: E402
from .text_encoder import TextEncoder, load_clip, load_t5  # noqa: E402
from .tokenizer import CLIPTokenizer, T5Tokenizer  # noqa: E402
from .transformer import Flux, FluxConfig, load_transformer  # noqa: E402

__all__ = ["AutoEncoder", "AutoEncoderConfig", "load_autoencoder", "CLIPTextConfig",
           "CLIPTextEncoder", "CheckpointError", "Reference", "Pipeline", "RefState", "T5Config", "T5Encoder",
           "TextEncoder", "load_clip", "load_t5", "CLIPTokenizer", "T5Tokenizer", "Flux", "FluxConfig",
           "load_transformer", "load_image", "load_mask", "pil_to_tensor", "tensor_to_pil",
           "PersonalizeSettings", "EditSettings", "FreeCusSettings", "PRESET"]
