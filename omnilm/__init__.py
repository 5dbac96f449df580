"""omnilm: an open, hackable multimodal LLM (CLIP ViT + projector + LLaMA), weight-compatible with HF."""

from omnilm.config import OmniConfig, TextConfig, VisionConfig
from omnilm.errors import OmniInputError
from omnilm.model import OmniModel

__all__ = ["OmniConfig", "OmniInputError", "OmniModel", "TextConfig", "VisionConfig"]
__version__ = "0.1.0"
