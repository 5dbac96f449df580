"""Prompts, images, videos and audio -> model inputs, as transformers' `LlavaProcessor` (and
`LlavaNextVideoProcessor`, `VoxtralProcessor`) build them.

Every `<image>` marker becomes `image_seq_len` image-token ids where it stands, so the
model can later overwrite exactly those positions with the image's features (one masked
assignment). Every `<video>` marker becomes, for each of the video's sampled frames,
`video_frame_len` video-token ids (with `VideoSampling.timestamps`, the frame's time as text
before them, "1.5s"). Every `<audio>` marker becomes, for each window of the audio (the encoder's
window, 30 s in Whisper), `audio_seq_len` audio-token ids, and the windows' log-mel features go to
`input_features`. Batches are left-padded so that every row's next token is at the same index.

Shape letters: B prompts, T tokens, N images, V videos, F frames, W audio windows, M mel bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omnilm.data.audio import AudioLimits, LogMelConfig, load_audio, log_mel
from omnilm.data.chat import chat_audios, chat_videos, hf_chat_template, render_chat
from omnilm.data.collate import pad_rows
from omnilm.data.image import ImageProcessor
from omnilm.data.tokenizer import AUDIO_TOKEN, VIDEO_TOKEN, Tokenizer
from omnilm.data.video import Video, VideoLimits, read_video
from omnilm.errors import OmniInputError
from omnilm.io import read_json, write_json, write_text
from omnilm.model.hf_config import hf_incompatibility, processor_config_to_hf

_MISMATCH_HINT = "add a marker per {what} or remove {what}s"
VIDEO_CONFIG = "video_preprocessor_config.json"


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video the model reads: up to `num_frames` spread uniformly over the clip
    (transformers' sampler; a shorter clip gives all its frames, where transformers refuses it), or
    with `fps` that many frames a second; None for both: every frame. `timestamps` writes each
    frame's time before its tokens ("1.5s"; frames given as images are taken a second apart).
    `limits` bound the files read. Saved beside the model as video_preprocessor_config.json."""

    num_frames: int | None = 8
    fps: float | None = None
    timestamps: bool = False
    limits: VideoLimits = field(default_factory=VideoLimits)

    def __post_init__(self) -> None:
        n, fps = self.num_frames, self.fps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise OmniInputError(f"num_frames={n!r}: give a number of frames >= 1, or None for fps or every frame")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                                or fps <= 0):
            raise OmniInputError(f"fps={fps!r}: give frames per second > 0, or None")
        if n is not None and fps is not None:
            raise OmniInputError("give num_frames or fps, not both: frames are sampled by count or by rate")
        if not isinstance(self.timestamps, bool):
            raise OmniInputError(f"timestamps={self.timestamps!r}: give true or false")

    def to_dict(self) -> dict:
        return {"do_sample_frames": True, "num_frames": self.num_frames, "fps": self.fps,
                "timestamps": self.timestamps}

    @classmethod
    def from_dict(cls, d, source: str | Path = VIDEO_CONFIG) -> VideoSampling:
        if not isinstance(d, dict):
            raise OmniInputError(f"{source} holds a JSON {type(d).__name__}, not an object; fix or delete it")
        try:
            return cls(num_frames=d.get("num_frames"), fps=d.get("fps"), timestamps=d.get("timestamps", False))
        except OmniInputError as e:
            raise OmniInputError(f"{source}: {e}") from None

    def read(self, source) -> Video:
        """`source`'s frames as the model reads them: a path, a folder of frames or a list of images
        (sampled here), a `Video` or a (T, H, W, 3) uint8 array (taken as they are)."""
        if isinstance(source, Video):
            return source
        if isinstance(source, np.ndarray):
            if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8 or not len(source):
                raise OmniInputError(f"a video array of shape {source.shape} and type {source.dtype}: give (frames, "
                                     "height, width, 3) uint8 RGB")
            return Video(source, list(range(len(source))), len(source), None)
        return read_video(source, self.num_frames, self.fps, self.limits, up_to=True)


class Processor:
    """Tokenizer + image processor + the number of tokens each image (and each video frame, each
    audio window) occupies.

    `image_processor` is None for a text-only model; such a processor refuses images.
    `llava_config`: what transformers' LlavaProcessor needs to expand images the same way
    (processor_config.json), where transformers has a class for the model; `for_model` sets it.
    `video_frame_len`: tokens per video frame, None for a model without video (which refuses them);
    `video` how frames are sampled and marked. `audio_seq_len`: tokens per audio window, None for a
    model without audio (which refuses it); `log_mel` the front end that cuts audio into its
    windows (Voxtral's: one normalisation over the whole clip); `audio_limits` bound what is read.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor | None, image_seq_len: int,
                 llava_config: dict | None = None, video_frame_len: int | None = None,
                 video: VideoSampling | None = None, audio_seq_len: int | None = None,
                 log_mel: LogMelConfig | None = None, audio_limits: AudioLimits = AudioLimits()):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.llava_config = llava_config
        self.video_frame_len = video_frame_len
        self.video = video if video is not None else VideoSampling()
        if (audio_seq_len is None) != (log_mel is None):
            raise ValueError("give audio_seq_len and log_mel together (an audio model), or neither")
        self.audio_seq_len = audio_seq_len
        self.log_mel = log_mel
        self.audio_limits = audio_limits

    def __call__(
        self,
        conversations,
        images=None,
        add_generation_prompt: bool = True,
        max_length: int | None = None,
        videos=None,
        audios=None,
    ) -> dict:
        """Encode one chat (a list of messages), a list of chats, a prompt string or a list
        of strings. Returns `input_ids` (B, T) and `attention_mask` (B, T), left-padded,
        `pixel_values` (N, 3, H, W) with the images in marker order across the batch, or None, and
        `pixel_values_videos` (only where there are videos): the videos in marker order, (V, F, 3, H, W)
        when they have the same number of frames, else a list of (F_i, 3, H, W), and `input_features`
        (only where there is audio): every audio's log-mel windows in marker order, (W, M, frames).

        Images, videos and audio ride inside chat messages, or come through `images`, `videos` and
        `audios`: a flat list in marker order across the batch, or one list per prompt. Not both. An
        audio is a file (path or bytes), 1-D samples at 16 kHz or a (samples, rate) pair.
        """
        prompts, carried, carried_videos, carried_audios = self._render(conversations, add_generation_prompt)
        rows = [self.tokenizer.encode(prompt) for prompt in prompts]
        counts = [row.count(self.tokenizer.image_token_id) for row in rows]
        per_prompt = _assign_media(counts, carried, images, "image")
        video_id = self.tokenizer.video_token_id
        video_counts = [row.count(video_id) if video_id is not None else 0 for row in rows]
        per_prompt_videos = _assign_media(video_counts, carried_videos, videos, "video")
        read = [[self.read_video(v) for v in group] for group in per_prompt_videos]
        audio_id = self.tokenizer.audio_token_id
        audio_counts = [row.count(audio_id) if audio_id is not None else 0 for row in rows]
        per_prompt_audios = _assign_media(audio_counts, carried_audios, audios, "audio")
        heard = [[self.audio_features(self.read_audio(a)) for a in group] for group in per_prompt_audios]
        rows = [self.expand(row, group, audio_windows=[len(f) for f in features])
                for row, group, features in zip(rows, read, heard)]
        if max_length is not None:
            for i, (row, n_images) in enumerate(zip(rows, counts)):
                if len(row) > max_length:
                    raise OmniInputError(
                        f"prompt {i} is {len(row)} tokens ({n_images} images of {self.image_seq_len} tokens each, "
                        f"{len(read[i])} videos, {len(heard[i])} audios) but max_length is {max_length}: shorten it, "
                        "use fewer images, frames or seconds of audio, or raise max_length"
                    )
        # Padding sits under attention_mask 0, so with no pad or eos token any id would do.
        input_ids, attention_mask = pad_rows(rows, self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0,
                                             left=True)
        flat = [image for group in per_prompt for image in group]
        if flat and self.image_processor is None:
            raise OmniInputError(f"{len(flat)} images were given but this processor is text-only: pass no images")
        pixel_values = self.image_processor(flat) if flat else None
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if any(read):  # as transformers: the key only where there are videos
            out["pixel_values_videos"] = self.video_pixels([v for group in read for v in group])
        if any(heard):
            out["input_features"] = torch.cat([f for group in heard for f in group])
        return out

    def read_audio(self, source) -> np.ndarray:
        """An audio as 16 kHz mono float32 samples (`omnilm.data.audio.load_audio`: a file's path or
        bytes, samples, or a (samples, rate) pair); a one-line error for a model without audio."""
        if self.log_mel is None:
            raise OmniInputError("an audio was given but this model takes no audio: use an audio model")
        return load_audio(source, self.audio_limits, self.log_mel.sampling_rate)

    def audio_features(self, samples: np.ndarray) -> torch.Tensor:
        """The log-mel windows of `samples` (16 kHz mono), (W, M, frames): padded with silence to
        whole windows, normalised over the whole clip as Voxtral's processor does."""
        return log_mel(samples, self.log_mel, per_window=False)

    def read_video(self, source) -> Video:
        """A video as this processor's model reads it (see `VideoSampling.read`); a one-line error for
        a model without video."""
        if self.video_frame_len is None or self.image_processor is None:
            raise OmniInputError("a video was given but this model takes no video: pass its frames as images, or "
                                 "use a video model")
        return self.video.read(source)

    def video_tokens(self, video: Video) -> list[int]:
        """The ids a `<video>` marker becomes for `video`: per frame, its time as text when
        `timestamps` is on, then `video_frame_len` video tokens."""
        marker = [self.tokenizer.video_token_id] * self.video_frame_len
        if not self.video.timestamps:
            return marker * len(video.indices)
        times = video.timestamps or [float(i) for i in video.indices]
        return [i for t in times for i in self.tokenizer.encode(f"{round(t, 2):g}s", add_bos=False) + marker]

    def video_pixels(self, videos: list[Video]) -> torch.Tensor | list[torch.Tensor] | None:
        """Preprocessed frames: (V, F, 3, H, W) when every video has F frames, else a list of (F_i, 3, H, W)."""
        if not videos:
            return None
        pixels = [self.image_processor([Image.fromarray(f) for f in v.frames]) for v in videos]
        return torch.stack(pixels) if len({len(p) for p in pixels}) == 1 else pixels

    def expand(self, ids: list[int], videos: list[Video] = (), *aligned: list,
               audio_windows: list[int] = ()) -> list[list] | list[int]:
        """`ids` with each `<image>` expanded to `image_seq_len` tokens, the k-th `<video>` to
        `video_tokens(videos[k])` and the k-th `<audio>` to `audio_windows[k]` windows of
        `audio_seq_len` tokens; lists in `aligned` (labels, offsets) stretched alike (each new
        position takes its marker's value). Returns the ids, or `[ids, *aligned]` with `aligned`."""
        spans = {self.tokenizer.image_token_id: [[self.tokenizer.image_token_id] * self.image_seq_len]}
        if videos:
            spans[self.tokenizer.video_token_id] = [self.video_tokens(v) for v in videos]
        if audio_windows:
            audio_id = self.tokenizer.audio_token_id
            spans[audio_id] = [[audio_id] * (n * self.audio_seq_len) for n in audio_windows]
        out = expand_markers(ids, spans, *aligned)
        return out if aligned else out[0]

    def _render(self, conversations, add_generation_prompt: bool) -> tuple[list[str], list[list], list[list],
                                                                          list[list]]:
        # One prompt (a string, or a chat: a list of message dicts) becomes a batch of one.
        if isinstance(conversations, str) or (
            isinstance(conversations, list) and conversations and isinstance(conversations[0], dict)
        ):
            conversations = [conversations]
        if not isinstance(conversations, list) or not conversations:
            raise OmniInputError(
                "nothing to encode: pass a prompt string, a chat (list of messages), or a list of either"
            )
        prompts, carried, carried_videos, carried_audios = [], [], [], []
        for i, item in enumerate(conversations):
            if isinstance(item, str):
                prompts.append(item)
                carried.append([])
                carried_videos.append([])
                carried_audios.append([])
            elif isinstance(item, list):
                text, item_images = render_chat(item, add_generation_prompt, self.tokenizer.system_prompt)
                prompts.append(text)
                carried.append(item_images)
                carried_videos.append(chat_videos(item))
                carried_audios.append(chat_audios(item))
            else:
                raise OmniInputError(f"prompt {i} is a {type(item).__name__}: pass a string or a list of messages")
        return prompts, carried, carried_videos, carried_audios

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @classmethod
    def for_model(cls, model, folder: str | Path | None = None, tokenizer: Tokenizer | None = None) -> Processor:
        """The processor that feeds `model` (an OmniModel, or its config): `tokenizer`, else the
        tokenizer files in the checkpoint `folder`; the image preprocessing of `folder`'s
        preprocessor_config.json when there is one, else the CLIP preprocessing the model's vision
        config implies; the model's tokens per image (and per video frame, with the frame sampling of
        `folder`'s video_preprocessor_config.json, else `VideoSampling()`; per audio window, with the
        log-mel front end its audio config implies: mel bins and window length)."""
        config = getattr(model, "config", model)
        if tokenizer is None:
            if folder is None or not (Path(folder) / "tokenizer.json").is_file():
                where = f"{folder} has no tokenizer.json" if folder is not None else "no tokenizer was given"
                raise OmniInputError(f"{where}: pass the checkpoint folder saved with its tokenizer, or tokenizer=")
            tokenizer = Tokenizer.from_file(folder)
        check_tokenizer_fits(config, tokenizer, folder or "the tokenizer")
        image_processor = None
        if config.vision is not None:
            image_processor = _read_image_processor(folder) or ImageProcessor.from_vision_config(config.vision)
        llava = processor_config_to_hf(config) if config.vision is not None and not hf_incompatibility(config) else None
        frame_len = config.video_frame_len if config.video_token_id is not None else None
        return cls(tokenizer, image_processor, config.image_seq_len, llava, frame_len, _read_video_sampling(folder),
                   config.audio_seq_len or None, log_mel_config(config))

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_seq_len: int, video_frame_len: int | None = None) -> Processor:
        """Load the tokenizer files, preprocessor_config.json (text-only without one) and
        video_preprocessor_config.json from `folder`. Tokens per image and per video frame belong to
        the model (its vision tower's patches): pass them in."""
        return cls(Tokenizer.from_file(folder), _read_image_processor(folder), image_seq_len,
                   video_frame_len=video_frame_len, video=_read_video_sampling(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the tokenizer files, the chat template (chat_template.jinja: transformers'
        `apply_chat_template`, and `transformers serve`, render the prompts `render_chat` does), (unless
        text-only) a transformers-loadable preprocessor_config.json, and with `llava_config` the
        processor_config.json with which `AutoProcessor` builds a LlavaProcessor; for a video model,
        the frame sampling (video_preprocessor_config.json); for a model that hears and does not see,
        its log-mel front end as a `WhisperFeatureExtractor`'s preprocessor_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(folder)
        write_text(folder / "chat_template.jinja", hf_chat_template(self.tokenizer.system_prompt))
        if self.image_processor is not None:
            write_json(folder / "preprocessor_config.json", self.image_processor.to_hf_dict())
        if self.llava_config is not None:
            write_json(folder / "processor_config.json", self.llava_config)
        if self.video_frame_len is not None:
            write_json(folder / VIDEO_CONFIG, self.video.to_dict())
        if self.log_mel is not None and self.image_processor is None:  # a model that hears and does not see
            write_json(folder / "preprocessor_config.json", self.log_mel.to_hf())


def _read_image_processor(folder: str | Path | None) -> ImageProcessor | None:
    """The image preprocessing `folder`'s preprocessor_config.json describes; None without one."""
    file = Path(folder) / "preprocessor_config.json" if folder is not None else None
    return ImageProcessor.from_hf_dict(read_json(file), source=file) if file is not None and file.is_file() else None


def log_mel_config(config) -> LogMelConfig | None:
    """The log-mel front end an OmniConfig's audio encoder reads (Whisper's STFT at 16 kHz: 100
    frames a second, so a window of 2 * max_source_positions frames); None without audio."""
    a = config.audio
    return LogMelConfig(n_mels=a.n_mels, window_seconds=a.window_frames / 100) if a is not None else None


def _read_video_sampling(folder: str | Path | None) -> VideoSampling:
    file = Path(folder) / VIDEO_CONFIG if folder is not None else None
    return VideoSampling.from_dict(read_json(file), file) if file is not None and file.is_file() else VideoSampling()


def check_tokenizer_fits(config, tokenizer: Tokenizer, where: str | Path) -> None:
    """Every id `tokenizer` makes must index the model's embedding (`config`, an OmniConfig), and its
    <image> must be the id the model fills with image features; `where` names the tokenizer."""
    n, vocab = tokenizer.vocab_size, config.text.vocab_size
    image = tokenizer.image_token_id
    # An id past the embedding would fail at the first forward; only <image> may lie there, since
    # the model overwrites its embedding (and a text-only model refuses it).
    if n > vocab and not (n == vocab + 1 and image == vocab):
        raise OmniInputError(
            f"{where}: the tokenizer has {n} tokens but the model embeds {vocab}: ids {vocab} and up would index past "
            "the embedding; use the tokenizer the model was trained with"
        )
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_id")
        if token_id is not None and not 0 <= token_id < vocab:
            raise OmniInputError(
                f"{where}: the tokenizer's {name}_token {getattr(tokenizer, f'{name}_token')!r} is id {token_id}, "
                f"outside the model's {vocab}-row embedding; fix tokenizer_config.json or use the model's tokenizer"
            )
    if config.vision is not None and image != config.image_token_id:
        raise OmniInputError(
            f"{where}: the tokenizer's <image> is id {image} but the model's image_token_id is "
            f"{config.image_token_id}; set config image_token_id to the tokenizer's id"
        )
    for kind, marker in (("audio", AUDIO_TOKEN), ("video", VIDEO_TOKEN)):  # where the model reads them
        want, token = getattr(config, f"{kind}_token_id"), getattr(tokenizer, f"{kind}_token_id")
        if want is not None and token != want:
            has = f"is id {token}" if token is not None else "is missing"
            raise OmniInputError(
                f"{where}: the tokenizer's {marker} {has} but the model's {kind}_token_id is {want}; use the "
                f"tokenizer the {kind} model was trained with"
            )



def expand_markers(ids: list[int], spans: dict[int, list[list[int]]], *aligned: list) -> list[list]:
    """Replace the k-th occurrence of each marker id in `ids` by `spans[id][k]` (the last span again
    when there are fewer: one for every image): the positions the model overwrites with that
    medium's features. Lists in `aligned` (one entry per id, such as labels or offsets) are stretched
    the same way, each new position taking its marker's value. Returns `[ids, *aligned]`, expanded."""
    out: list[list] = [[] for _ in range(1 + len(aligned))]
    seen = dict.fromkeys(spans, 0)
    for i, token in enumerate(ids):
        if token in spans:
            span = spans[token][min(seen[token], len(spans[token]) - 1)]
            seen[token] += 1
            out[0].extend(span)
            for column, values in zip(out[1:], aligned):
                column.extend([values[i]] * len(span))
        else:
            for column, values in zip(out, (ids, *aligned)):
                column.append(values[i])
    return out


def expand_image_tokens(ids: list[int], image_token_id: int, image_seq_len: int, *aligned: list) -> list[list]:
    """Repeat each image token `image_seq_len` times (`expand_markers` for images alone). Returns
    `[ids, *aligned]`, expanded."""
    return expand_markers(ids, {image_token_id: [[image_token_id] * image_seq_len]}, *aligned)


def _assign_media(counts: list[int], carried: list[list], media, what: str) -> list[list]:
    # The images (or videos) of each prompt, checked against its number of `<image>` (`<video>`) markers.
    hint = _MISMATCH_HINT.format(what=what)
    if media is None:
        per_prompt = carried
    elif any(carried):
        raise OmniInputError(f"{what}s came both inside the chat messages and as {what}s=: pass each {what} one way")
    else:
        if not isinstance(media, (list, tuple)) or (what == "video" and _is_one_video(media)) or (
                what == "audio" and _is_one_audio(media)):
            media = [media]  # a single image, video or audio
        if media and all(isinstance(group, (list, tuple)) and not (what == "audio" and _is_one_audio(group))
                         for group in media):  # one list per prompt (a (samples, rate) pair is one audio)
            if len(media) != len(counts):
                raise OmniInputError(
                    f"{len(media)} {what} lists were given for {len(counts)} prompts: give one list per prompt"
                )
            per_prompt = [list(group) for group in media]
        else:
            if len(media) != sum(counts):
                raise OmniInputError(
                    f"the prompts have {sum(counts)} <{what}> markers but {len(media)} {what}s were given: {hint}"
                )
            starts = [sum(counts[:i]) for i in range(len(counts))]
            per_prompt = [list(media[start:start + n]) for start, n in zip(starts, counts)]
    for i, (n_markers, group) in enumerate(zip(counts, per_prompt)):
        if n_markers != len(group):
            raise OmniInputError(
                f"prompt {i} has {n_markers} <{what}> markers but {len(group)} {what}s were given: {hint}"
            )
    return per_prompt


def _is_one_audio(media) -> bool:
    # A (samples, rate) pair is one audio, not a list of two.
    return isinstance(media, tuple) and len(media) == 2 and isinstance(media[1], int) and not isinstance(media[0], str)


def _is_one_video(media) -> bool:
    # A list of frames (images) is one video, not a list of videos.
    return bool(media) and all(isinstance(m, Image.Image) for m in media)
