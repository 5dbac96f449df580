"""`omnilm serve`'s settings, from which the command's flags are generated (omnilm.settings). How
the model loads (--device, --dtype) is the command line's business, as for `omnilm chat`.

They live apart from omnilm.serve.api so that the command line lists and checks them without the
serve extra (fastapi, uvicorn, httpx) installed. The media settings are nested, and their flags
carry no prefix (`--max-image-bytes`, not `--media-max-image-bytes`): see SERVE_FLAGS.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from omnilm.errors import OmniInputError
from omnilm.settings import check_range, setting


@dataclass(kw_only=True)
class MediaSettings:
    """Where the images of a request's `image_url` parts (and the videos of its `video_url` parts)
    may come from, and how large they may be (omnilm.serve.media applies them); and how large the
    audio of its `input_audio` parts (always sent inline, base64) may be."""

    allowed_local_media_path: Path | None = setting(
        None, "folder whose images requests may name by path or file:// URL (default: no local files)", metavar="DIR")
    allow_remote_media: bool = setting(
        False, "fetch http(s) image URLs: public addresses only, every redirect checked again")
    max_images: int = setting(4, "most images in one request")
    max_image_bytes: int = setting(10_000_000, "most bytes of one image as sent (decoded from base64)")
    max_image_pixels: int = setting(25_000_000, "most pixels of one image, read from its header before decoding")
    max_videos: int = setting(1, "most videos in one request (video_url parts, for models that read video)")
    max_video_bytes: int = setting(20_000_000, "most bytes of one video as sent (decoded from base64)")
    max_video_seconds: float = setting(600.0, "longest video, read from its header before decoding")
    max_audios: int = setting(1, "most audio clips in one request (input_audio parts, for models that hear)")
    max_audio_bytes: int = setting(20_000_000, "most bytes of one audio clip as sent (decoded from base64)")
    max_audio_seconds: float = setting(600.0, "longest audio clip, read from its header before decoding")
    remote_timeout: float = setting(5.0, "seconds a remote image or video may take to fetch, redirects included")

    def __post_init__(self) -> None:
        check_range(self, ("max_images", "max_image_bytes", "max_image_pixels", "max_videos", "max_video_bytes",
                           "max_audios", "max_audio_bytes"), low=1)
        check_range(self, ("remote_timeout", "max_video_seconds", "max_audio_seconds"), above=0)
        if self.allowed_local_media_path is not None:
            self.allowed_local_media_path = Path(self.allowed_local_media_path)
            if not self.allowed_local_media_path.is_dir():
                raise OmniInputError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a folder; "
                                     "give the folder that holds the images requests may name")


@dataclass(kw_only=True)
class ServeSettings:
    """`omnilm serve`: an OpenAI-compatible server for one checkpoint (omnilm.serve.api)."""

    checkpoint: str = setting(help="model folder with tokenizer.json (omnilm or Hugging Face LLaVA / LLaMA)",
                              positional=True)
    host: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 opens the server to the network")
    port: int = setting(8000, "port to listen on")
    api_key: str | None = setting(None, "require `Authorization: Bearer KEY` on every route but /health and the "
                                        "chat page (default: no key)", metavar="KEY")
    served_model_name: str | None = setting(None, "the model's name in the API (default: the checkpoint as given)",
                                            metavar="NAME")
    max_batch: int = setting(8, "most requests decoding at once")
    max_queue: int = setting(64, "most requests waiting for a slot; beyond it requests get 429")
    max_model_len: int | None = setting(None, "context per request, prompt plus max_tokens (default: the model's)")
    prefill_chunk: int = setting(512, "most prompt tokens prefilled per step: how long a newcomer may hold up "
                                      "the running streams")
    max_body_bytes: int = setting(50_000_000, "largest request body")
    media: MediaSettings = dataclasses.field(default_factory=MediaSettings)

    def __post_init__(self) -> None:
        check_range(self, ("port",), 0, 65535)
        check_range(self, ("max_batch", "max_queue", "max_model_len", "prefill_chunk", "max_body_bytes"), low=1)
        if self.api_key is not None and not self.api_key.strip():
            raise OmniInputError("--api-key is empty; give a key, or leave the flag out to serve without one")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.checkpoint


# How add_flags and from_flags see ServeSettings: the media settings' flags without a prefix.
SERVE_FLAGS = dict(prefixes={"media": ""})
