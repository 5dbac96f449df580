"""Data in: images, tokens, chat templates, and the processor that joins them."""

from omnilm.data.chat import DEFAULT_SYSTEM, normalize_messages, render_chat, render_turns
from omnilm.data.collate import collate
from omnilm.data.image import ImageProcessor, load_image
from omnilm.data.llava_json import LlavaDataset
from omnilm.data.processor import Processor, expand_image_tokens
from omnilm.data.tokenizer import IMAGE_TOKEN, Tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_SYSTEM",
    "IMAGE_TOKEN",
    "ImageProcessor",
    "LlavaDataset",
    "Processor",
    "Tokenizer",
    "collate",
    "expand_image_tokens",
    "load_image",
    "normalize_messages",
    "render_chat",
    "render_turns",
    "train_tokenizer",
]
