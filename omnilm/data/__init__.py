"""Data in: images, tokens, chat templates, and the processor that joins them."""

from omnilm.data.chat import DEFAULT_SYSTEM, normalize_messages, render_chat, render_turns
from omnilm.data.image import ImageProcessor, load_image
from omnilm.data.processor import Processor
from omnilm.data.tokenizer import IMAGE_TOKEN, Tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_SYSTEM",
    "IMAGE_TOKEN",
    "ImageProcessor",
    "Processor",
    "Tokenizer",
    "load_image",
    "normalize_messages",
    "render_chat",
    "render_turns",
    "train_tokenizer",
]
