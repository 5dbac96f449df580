"""Video in: transformers' frame sampler index for index, lossless files written and read back bit
for bit, and one-line errors for files that cannot be used (PyAV tests skip where `av` is absent)."""

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from omnilm.data.video import VideoLimits, read_video, sample_indices, write_video
from omnilm.errors import OmniInputError


def frames(n: int = 12, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# --- the sampler -----------------------------------------------------------------------------------


def test_the_sampler_is_transformers_default_for_every_count_and_rate():
    """Every total of 1..300 frames and every request of 1..32, as a count and as frames per second
    (clips at 24, 25, 29.97 and 30 fps): the same indices, or both refuse."""
    video_utils = pytest.importorskip("transformers.video_utils")

    def theirs(total, **kw):
        meta = video_utils.VideoMetadata(total_num_frames=total, fps=kw.pop("video_fps", None))
        try:
            return video_utils.default_sample_indices_fn(meta, **kw).tolist()
        except ValueError:
            return "refused"

    def ours(total, **kw):
        try:
            return sample_indices(total, **kw)
        except OmniInputError:
            return "refused"

    compared = refused = 0
    for total in range(1, 301):
        for n in range(1, 33):
            cases = [dict(num_frames=n)] + [dict(fps=n, video_fps=rate) for rate in (24, 25, 29.97, 30)]
            for kw in cases:
                expected = theirs(total, **dict(kw))
                assert ours(total, **kw) == expected, (total, kw)
                compared += 1
                refused += expected == "refused"
    assert compared == 300 * 32 * 5 and 0 < refused < compared  # both kinds of outcome were compared
    assert sample_indices(5) == [0, 1, 2, 3, 4]  # neither: every frame
    one_line_error(lambda: sample_indices(10, fps=2), match="no frame rate: ask for a number of frames")


# --- files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_a_lossless_clip_reads_back_bit_for_bit(tmp_path, suffix):
    pytest.importorskip("av", reason="PyAV (the [media] extra) is not installed")
    clip = frames()
    path = tmp_path / f"clip{suffix}"
    write_video(path, clip, fps=4)
    video = read_video(path)
    assert np.array_equal(video.frames, clip) and video.total_frames == 12 and video.fps == 4.0
    sampled = read_video(path, num_frames=5)
    assert sampled.indices == [0, 2, 4, 7, 9] and np.array_equal(sampled.frames, clip[[0, 2, 4, 7, 9]])
    by_time = read_video(path, fps=2)  # 3 s at 4 fps: 6 frames
    assert by_time.indices == [0, 2, 4, 6, 8, 10] and by_time.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically: no temporary left


def test_an_animated_gif_and_frames_as_images(tmp_path):
    pytest.importorskip("av", reason="PyAV (the [media] extra) is not installed")
    clip = frames(6, 16, 16)
    images = [Image.fromarray(f) for f in clip]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i:03d}.png")
    from_folder = read_video(folder, num_frames=3)
    assert from_folder.indices == [0, 2, 4] and np.array_equal(from_folder.frames, clip[[0, 2, 4]])
    assert from_folder.fps is None and from_folder.timestamps is None
    assert np.array_equal(read_video(images).frames, clip)
    grey = [Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(5)]  # GIF's palette: exact
    grey[0].save(tmp_path / "a.gif", save_all=True, append_images=grey[1:], duration=250, loop=0)
    gif = read_video(tmp_path / "a.gif")
    assert gif.total_frames == 5 and gif.fps == 4.0 and gif.frames[:, 0, 0, 0].tolist() == [0, 40, 80, 120, 160]
    Image.fromarray(clip[0]).save(tmp_path / "still.png")  # FFmpeg reads a still image as one frame
    assert np.array_equal(read_video(tmp_path / "still.png").frames, clip[:1])


def test_unusable_files_get_one_line_errors(tmp_path):
    pytest.importorskip("av", reason="PyAV (the [media] extra) is not installed")
    for suffix in (".mp4", ".mkv", ".avi"):
        whole = tmp_path / f"clip{suffix}"
        write_video(whole, frames(), fps=4)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
        one_line_error(lambda: read_video(cut), match=f"cut{suffix} (is truncated|cannot be read as video)")
    (tmp_path / "empty.mp4").write_bytes(b"")
    one_line_error(lambda: read_video(tmp_path / "empty.mp4"), match="empty.mp4 is empty")
    (tmp_path / "notes.mp4").write_text("not a video at all")
    one_line_error(lambda: read_video(tmp_path / "notes.mp4"), match="notes.mp4 cannot be read as video.*not a video")
    one_line_error(lambda: read_video(tmp_path / "missing.mp4"), match="missing.mp4: no such video file")
    clip = tmp_path / "clip.mp4"
    for limits, match in ((VideoLimits(max_side=32), "64x48, over the 32 px"),
                          (VideoLimits(max_frames=5), "12 frames, over the 5"),
                          (VideoLimits(max_seconds=1), "lasts 3 s, over the 1 s"),
                          (VideoLimits(max_bytes=100), "over the 0 MiB")):
        one_line_error(lambda: read_video(clip, limits=limits), match=match)
    one_line_error(lambda: read_video(clip, num_frames=13), match="13 frames asked of a clip of 12")
    (tmp_path / "none").mkdir()
    one_line_error(lambda: read_video(tmp_path / "none"), match="holds no frames")
    one_line_error(lambda: read_video([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))]), match="differ in size")
    one_line_error(lambda: write_video(tmp_path / "x.webm", frames()), match="write lossless video to a .mp4, .mkv")
    one_line_error(lambda: write_video(tmp_path / "x.mp4", frames()[..., 0]), match=r"give \(T, H, W, 3\) uint8")
    one_line_error(lambda: write_video(tmp_path / "x.mp4", frames(), fps=0), match="fps=0 must be a number > 0")


# --- the model: LLaVA-NeXT-Video's video path ----------------------------------------------------------


def llava_next_video(tmp_path, seed: int = 0, video_token: int = 298, image_token: int = 299, pool: str = "average"):
    """A tiny random transformers LlavaNextVideo (frames of 32 px in 8 px patches: a 4 x 4 grid, 4
    tokens a frame after the 2 x 2 `pool`), saved by transformers, and omnilm's model loaded from that
    folder (its `image_newline`, for LLaVA-NeXT's anyres images, left out)."""
    import torch
    from conftest import randomize_, tiny_hf_configs

    from omnilm import OmniModel

    tf = pytest.importorskip("transformers")
    text_cfg, vision_cfg, _ = tiny_hf_configs()
    config = tf.LlavaNextVideoConfig(vision_config=vision_cfg, text_config=text_cfg, video_token_index=video_token,
                                     image_token_index=image_token, spatial_pool_mode=pool, spatial_pool_stride=2)
    torch.manual_seed(seed)
    theirs = randomize_(tf.LlavaNextVideoForConditionalGeneration(config), seed).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = OmniModel.from_pretrained(tmp_path / "hf").eval()
    assert (ours.config.video_token_id, ours.config.image_token_id, ours.config.video_pool_stride,
            ours.config.video_pool_mode) == (video_token, image_token, 2, pool)
    return theirs, ours


def video_chat(n_frames: int, frame_len: int, seed: int = 1):
    """Two chats, the second left-padded, each with one video among text (a turn before it, a
    text-only turn after): (input_ids, attention_mask, pixel_values_videos)."""
    import torch

    per_video = n_frames * frame_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (2, per_video + 14), generator=g)
    mask = torch.ones_like(ids)
    ids[0, 3:3 + per_video] = 298
    ids[1, :4], mask[1, :4] = 0, 0
    ids[1, 6:6 + per_video] = 298
    return ids, mask, torch.randn(2, n_frames, 3, 32, 32, generator=g)


def max_logit_gap(a, b, ids, mask, videos) -> float:
    """The largest difference between two models' logits at the real (unpadded) positions."""
    import torch

    with torch.no_grad():
        x = a(input_ids=ids, attention_mask=mask, pixel_values_videos=videos).logits
        y = b(input_ids=ids, attention_mask=mask, pixel_values_videos=videos).logits
    real = mask.bool()
    return (x[real] - y[real]).abs().max().item()


@pytest.mark.parametrize("n_frames,pool", [(1, "average"), (3, "average"), (8, "average"), (3, "max")])
def test_video_logits_equal_transformers_llava_next_video(tmp_path, n_frames, pool):
    """A batch of two chats, the second left-padded, each with one video of n_frames among text
    (a turn before it, a text-only turn after): logits equal at every real position, with frames
    averaged (LLaVA-NeXT-Video's trained mode) or max-pooled."""
    theirs, ours = llava_next_video(tmp_path, pool=pool)
    assert ours.config.video_frame_len == 4
    ids, mask, videos = video_chat(n_frames, ours.config.video_frame_len)
    assert max_logit_gap(theirs, ours, ids, mask, videos) <= 1e-5
    assert ours.encode_videos(videos).shape == (2, n_frames * 4, 64)


def test_a_saved_video_model_loads_in_transformers_and_back(tmp_path):
    import json

    from omnilm import OmniModel

    tf = pytest.importorskip("transformers")
    _, ours = llava_next_video(tmp_path)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "llava_next_video" and written["video_token_index"] == 298
    theirs = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "ours").eval()
    assert type(theirs).__name__ == "LlavaNextVideoForConditionalGeneration"
    ids, mask, videos = video_chat(3, 4, seed=2)
    assert max_logit_gap(theirs, ours, ids, mask, videos) <= 1e-5
    theirs.save_pretrained(tmp_path / "back")  # no omnilm.json: read from transformers' config.json
    back = OmniModel.from_pretrained(tmp_path / "back")
    assert back.config == ours.config
    assert max_logit_gap(back, ours, ids, mask, videos) == 0.0
    # The conv pooling mode is refused by name: it has weights omnilm does not have.
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    (tmp_path / "back" / "config.json").write_text(json.dumps({**config, "spatial_pool_mode": "conv"}))
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path / "back"), match="spatial_pool_mode='conv'.*average")


@pytest.mark.parametrize("mode", ["concat", "average"])
def test_pooling_modes_and_motion_features(tmp_path, mode):
    """video_pool_mode="concat" lays a token's s x s patches side by side (row-major), "average"
    averages them; video_motion joins each frame's tokens by the change of their patches, side by
    side, since the same video's frame before (zero for a video's first frame). The wider frames
    get a projector of their own; the model has no transformers class and saves as omnilm's own."""
    import torch

    from omnilm import OmniModel
    from omnilm.model.hf_config import hf_incompatibility

    model = OmniModel.from_preset("tiny", text=dict(n_layers=1), vision=dict(patch_size=16, n_layers=1),
                                  video_token_id=4, video_pool_mode=mode, video_motion=True).eval()
    dv = model.config.vision.dim
    looks_dim = 4 * dv if mode == "concat" else dv
    assert (model.config.video_feature_dim, model.config.video_motion_dim) == (looks_dim + 4 * dv, 4 * dv)
    assert model.video_projector.fc1.in_features == looks_dim + 4 * dv and model.projector.fc1.in_features == dv
    assert ("concat" if mode == "concat" else "motion") in hf_incompatibility(model.config)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, 96, 96, generator=g), torch.randn(2, 3, 96, 96, generator=g)
    with torch.no_grad():
        grid = model.image_features(a).view(3, 6, 6, dv)
        blocks = torch.stack([torch.stack([grid[:, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)], 1)
                              for i in range(3) for j in range(3)], 1)  # (3 frames, 9 tokens, 4 patches, dv)
        looks = blocks.flatten(2) if mode == "concat" else blocks.mean(2)
        both = model.video_features([a, b])
        torch.testing.assert_close(both, torch.cat([model.video_features([a]), model.video_features([b])]))
        got_looks, change = both.split([looks_dim, 4 * dv], dim=-1)
        assert change[0].abs().max() == 0 and change[3].abs().max() == 0  # each video's first frame
        torch.testing.assert_close(change[1:3], (blocks[1:] - blocks[:-1]).flatten(2))
        torch.testing.assert_close(got_looks[:3], looks)
    model.save_pretrained(tmp_path / "m")
    again = OmniModel.from_pretrained(tmp_path / "m").eval()
    assert (again.config.video_pool_mode, again.config.video_motion) == (mode, True)
    ids = torch.tensor([[5] + [4] * 27 + [6] + [4] * 18 + [7]])
    with torch.no_grad():
        x, y = (m(ids, pixel_values_videos=[a, b]).logits for m in (model, again))
    assert torch.equal(x, y)
    plain = OmniModel.from_preset("tiny", vision=dict(patch_size=16), video_token_id=4, video_pool_mode="concat")
    assert "concat" in hf_incompatibility(plain.config) and plain.config.video_motion_dim == 0


def test_motion_halo_shows_a_step_across_a_token_border_whole():
    """video_motion_halo=1: a token's motion features are the change of the 4 x 4 patches around
    its 2 x 2 (zero beyond the frame), row-major; halo 0 is the plain motion features; with
    video_motion_moments, the window's change summed, weighted by column and by row."""
    import torch

    from omnilm import OmniModel
    from omnilm.config import ConfigError

    def model(halo, moments=False):
        torch.manual_seed(0)
        return OmniModel.from_preset("tiny", text=dict(n_layers=1), vision=dict(patch_size=16, n_layers=1),
                                     video_token_id=4, video_motion=True, video_motion_halo=halo,
                                     video_motion_moments=moments).eval()

    wide, plain, moments = model(1), model(0), model(1, moments=True)
    dv = wide.config.vision.dim
    assert (wide.config.video_motion_dim, wide.config.video_feature_dim) == (16 * dv, 17 * dv)
    a = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid = wide.image_features(a).view(3, 6, 6, dv)
        change = torch.nn.functional.pad((grid[1:] - grid[:-1]).permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
        want = torch.stack([change[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4].flatten(1) for i in range(3) for j in range(3)],
                           1)  # (2 frames, 9 tokens, 16 dv): token (i, j)'s patches 2i-1..2i+2 by 2j-1..2j+2
        got = wide.video_features([a])
        torch.testing.assert_close(got[1:, :, dv:], want)
        assert got[0, :, dv:].abs().max() == 0
        inner = got[1:, :, dv:].unflatten(-1, (4, 4, dv))[:, :, 1:3, 1:3].flatten(2)  # the token's own patches
        torch.testing.assert_close(inner, plain.video_features([a])[1:, :, dv:])
        window = want.unflatten(-1, (4, 4, dv))  # (frames, tokens, row, column, dv)
        at = torch.tensor([-1.5, -0.5, 0.5, 1.5])
        sums = [window.sum((2, 3)), (window * at[:, None]).sum((2, 3)), (window * at[:, None, None]).sum((2, 3))]
        summed = moments.video_features([a])
        assert moments.config.video_motion_dim == 3 * dv and summed.shape[-1] == 4 * dv
        torch.testing.assert_close(summed[1:, :, dv:], torch.cat(sums, -1))
        torch.testing.assert_close(summed[..., :dv], got[..., :dv])  # the looks are the same
    for flag, value in (("video_motion_halo", 1), ("video_motion_moments", True)):
        with pytest.raises(ConfigError, match=f"{flag}.*video_motion=True"):
            OmniModel.from_preset("tiny", vision=dict(patch_size=16), video_token_id=4, **{flag: value})


def test_video_markers_and_configs_are_checked_in_one_line(tmp_path):
    import torch

    from omnilm import OmniConfig, OmniModel
    from omnilm.config import ConfigError

    _, ours = llava_next_video(tmp_path)
    ours.save_pretrained(tmp_path / "again")  # omnilm.json keeps the video settings
    again = OmniModel.from_pretrained(tmp_path / "again").config
    assert (again.video_token_id, again.video_pool_stride, again.video_frame_len) == (298, 2, 4)
    ids = torch.full((1, 8), 298)
    one_line_error(lambda: ours(ids), match="8 video tokens but no pixel_values_videos")
    one_line_error(lambda: ours(ids, pixel_values_videos=torch.zeros(1, 1, 3, 32, 32)),
                   match="8 video tokens, room for 2 video.*1 video.*<video> marker to 4 tokens")
    one_line_error(lambda: ours.encode_videos(torch.zeros(1, 3, 32, 32)), match=r"give \(videos, frames, 3")
    image_only = OmniModel.from_preset("tiny", text=dict(n_layers=1), vision=dict(n_layers=1))
    one_line_error(lambda: image_only(torch.zeros(1, 4, dtype=torch.long), pixel_values_videos=torch.zeros(1, 1, 3, 96, 96)),
                   match="takes no video")
    # The tiny preset's 96 px frames in 32 px patches: a 3 x 3 grid, which a stride of 2 does not divide.
    with pytest.raises(ConfigError, match="video_pool_stride.*grid of 3 x 3 patches"):
        OmniConfig.from_preset("tiny", video_token_id=5)
    with pytest.raises(ConfigError, match="video_token_id.*image_token_id too"):
        OmniConfig.from_preset("tiny", video_token_id=OmniConfig.from_preset("tiny").image_token_id, video_pool_stride=3)
    with pytest.raises(ConfigError, match="video_token_id.*fusion='joint'"):
        OmniConfig.from_preset("tiny", video_token_id=5, video_pool_stride=3, fusion="late")
    with pytest.raises(ConfigError, match="video_pool_mode='mean' must be one of 'average', 'max', 'concat'"):
        OmniConfig.from_preset("tiny", video_token_id=5, video_pool_stride=3, video_pool_mode="mean")


# --- the processor, chats and generation ----------------------------------------------------------


def video_processor(model, **sampling):
    """omnilm's processor for `model` (video marker 4, image marker 3), its BPE trained here."""
    from omnilm.data import Processor, train_tokenizer
    from omnilm.data.processor import VideoSampling

    tokenizer = train_tokenizer(["What moves in the clip? a red circle moves left, then a square"] * 4,
                                vocab_size=300, video=True, system_prompt="Answer.")
    assert (tokenizer.image_token_id, tokenizer.video_token_id) == (3, 4)
    processor = Processor.for_model(model, tokenizer=tokenizer)
    processor.video = VideoSampling(**sampling)
    return processor


def test_a_chat_with_videos_and_a_text_turn_equals_transformers(tmp_path):
    """The processor turns a chat (a video, an answer, a text-only question) into ids and frames;
    transformers' LlavaNextVideo gives the same logits on them, alone and in a batch with a video of
    another length (which travels as a list of videos)."""
    import torch

    theirs, ours = llava_next_video(tmp_path, video_token=4, image_token=3)
    processor = video_processor(ours)
    clip5, clip3 = frames(5, 40, 48, seed=1), frames(3, 40, 48, seed=2)
    chat = [{"role": "user", "content": [{"type": "video", "video": clip5}, {"type": "text", "text": "What moves?"}]},
            {"role": "assistant", "content": "a red circle"}, {"role": "user", "content": "And then?"}]
    one = processor(chat)
    assert int((one["input_ids"] == 4).sum()) == 5 * 4 and one["pixel_values_videos"].shape == (1, 5, 3, 32, 32)
    pixels = processor.image_processor([Image.fromarray(f) for f in clip5])
    assert torch.equal(one["pixel_values_videos"][0], pixels)
    with torch.no_grad():
        mine = ours(**one).logits
        assert (mine - theirs(**one).logits).abs().max().item() <= 1e-5
        other = [{"role": "user", "content": [{"type": "text", "text": "Which way?"}, {"type": "video", "video": clip3}]}]
        both = processor([chat, other])
        assert isinstance(both["pixel_values_videos"], list) and [len(v) for v in both["pixel_values_videos"]] == [5, 3]
        batched = ours(**both).logits
        T = one["input_ids"].shape[1]
        assert (batched[0, -T:] - mine[0]).abs().max().item() <= 1e-5  # the first row is the longer one
        alone = processor(other)
        real = both["attention_mask"][1].bool()
        expected = theirs(**alone).logits[0]
        assert (batched[1][real] - expected).abs().max().item() <= 1e-5


def test_timestamps_sampling_and_the_saved_video_settings(tmp_path):
    from omnilm.data import Processor
    from omnilm.data.processor import VideoSampling

    _, ours = llava_next_video(tmp_path, video_token=4, image_token=3)
    processor = video_processor(ours, num_frames=4, timestamps=True)
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(frames(10, 32, 32)):
        Image.fromarray(f).save(clip / f"{i:03d}.png")
    out = processor([{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": "Hi"}]}])
    ids = out["input_ids"][0].tolist()
    assert ids.count(4) == 4 * 4 and out["pixel_values_videos"].shape[:2] == (1, 4)
    # Frames 0, 2, 5, 7 of 10 (transformers' uniform sampler), a second apart, each time before its tokens.
    text = processor.tokenizer.decode([i if i != 4 else processor.tokenizer.token_to_id("<video>") for i in ids],
                                      skip_special_tokens=False)
    assert "0s<video><video><video><video>2s<video>" in text.replace(" ", "") and "5s" in text and "7s" in text
    processor.save_pretrained(tmp_path / "saved")
    back = Processor.for_model(ours, tmp_path / "saved")
    assert back.video == VideoSampling(num_frames=4, timestamps=True) and back.video_frame_len == 4
    one_line_error(lambda: VideoSampling(num_frames=4, fps=2.0), match="num_frames or fps, not both")
    one_line_error(lambda: VideoSampling(num_frames=0), match="num_frames=0")
    # A text-only or image-only model's processor refuses videos in one line.
    image_only = Processor(processor.tokenizer, processor.image_processor, 16)
    one_line_error(lambda: image_only([{"role": "user", "content": [{"type": "video", "path": str(clip)}]}]),
                   match="takes no video")


def test_chunked_prefill_cuts_no_frame_and_generates_the_same(tmp_path):
    import torch

    from omnilm.infer import generate

    _, ours = llava_next_video(tmp_path, video_token=4, image_token=3)
    processor = video_processor(ours, timestamps=True)
    chat = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "video", "video": frames(6)},
                                         {"type": "text", "text": "and"}, {"type": "video", "video": frames(2, seed=3)},
                                         {"type": "text", "text": "What moves?"}]}]
    batch = processor(chat)
    assert isinstance(batch["pixel_values_videos"], list)
    whole = generate(ours, **batch, max_new_tokens=6)
    for chunk in (1, 3, 5, 17):
        assert torch.equal(generate(ours, **batch, max_new_tokens=6, prefill_chunk=chunk), whole), chunk


# --- LLaVA-format records with videos --------------------------------------------------------------


def video_records(tmp_path, timestamps: bool = True):
    """A video model's processor (4 tokens a frame, timestamps on) and a JSON of three records: a
    clip of 5 frames as PNGs, one of 3 frames and an image, and text only."""
    import json

    from omnilm import OmniConfig
    from omnilm.data import Processor, train_tokenizer
    from omnilm.data.processor import VideoSampling

    tokenizer = train_tokenizer(["USER: Which way does it move? ASSISTANT: left</s> the red circle"] * 4,
                                vocab_size=300, video=True, system_prompt="Answer.")
    config = OmniConfig.from_preset("tiny", text=dict(vocab_size=300, n_layers=1), vision=dict(n_layers=1, patch_size=16),
                                    video_token_id=4, video_pool_stride=3)
    processor = Processor.for_model(config, tokenizer=tokenizer)
    processor.video = VideoSampling(num_frames=8, timestamps=timestamps)
    for name, n in (("a", 5), ("b", 3)):
        (tmp_path / name).mkdir()
        for i, f in enumerate(frames(n, 40, 40, seed=n)):
            Image.fromarray(f).save(tmp_path / name / f"{i:02d}.png")
    Image.fromarray(frames(1, 40, 40)[0]).save(tmp_path / "still.png")
    records = [
        {"id": "a", "video": "a", "conversations": [{"from": "human", "value": "<video>\nWhich way does it move?"},
                                                    {"from": "gpt", "value": "left"}]},
        {"id": "b", "video": ["b"], "image": "still.png",
         "conversations": [{"from": "human", "value": "<image>\nand <video>\nWhich way?"},
                           {"from": "gpt", "value": "right"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "left"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return processor, tmp_path / "data.json", records


@pytest.mark.parametrize("max_length, timestamps, cache", [(None, True, False), (500, True, True),
                                                       (None, False, False), (500, False, True)])
def test_video_records_train_as_the_processor_prompts(tmp_path, max_length, timestamps, cache):
    """Each video record's tokens are what the processor makes of the same chat (its answer
    supervised, no video token), its frames come in order, and a batch carries every video."""
    import torch

    from omnilm.data import LlavaDataset, collate, render_chat

    processor, path, records = video_records(tmp_path, timestamps)
    assert processor.video_frame_len == 4
    dataset = LlavaDataset(path, tmp_path, processor, max_length=max_length, cache_images=cache)
    for i, (record, n_frames) in enumerate(zip(records, (5, 3, 0))):
        sample = dataset[i]
        ids, labels = sample["input_ids"], sample["labels"]
        assert int((ids == 4).sum()) == 4 * n_frames and not (labels == 4).any()
        chat = record["conversations"][:1]
        media = {"videos": [[str(tmp_path / v) for v in ([record["video"]] if isinstance(record["video"], str)
                                                         else record["video"])]]} if "video" in record else {}
        if "image" in record:
            media["images"] = [[str(tmp_path / record["image"])]]
        prompt = processor([chat], **media)["input_ids"][0]
        assert torch.equal(ids[:len(prompt)], prompt)  # the prompt, then the supervised answer
        supervised = labels[labels != -100].tolist()
        assert processor.tokenizer.decode(supervised).strip() == record["conversations"][1]["value"]
        assert [len(v) for v in sample["pixel_values_videos"]] == ([n_frames] if n_frames else [])
    batch = collate([dataset[i] for i in range(3)], processor.tokenizer.pad_id)
    assert [len(v) for v in batch["pixel_values_videos"]] == [5, 3] and batch["pixel_values"].shape[0] == 1
    assert collate([dataset[2]], 0)["pixel_values_videos"] is None


def test_bad_video_records_are_one_line(tmp_path):
    import json

    from omnilm.data import LlavaDataset, Processor

    processor, path, records = video_records(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    cases = {
        "no file": ({"video": "nope.mp4"}, r"video \"nope.mp4\" is not a file"),
        "marker without video": ({"video": None}, "1 <video> markers but the record has 0 videos"),
        "outside": ({"video": "../a"}, "outside the image folder"),
        "no frames": ({"video": "empty"}, r"video .*empty holds no frames"),
        "odd marker": ({"conversations": [{"from": "human", "value": "<Video>\nx"}, {"from": "gpt", "value": "y"}]},
                       "which is not the video marker"),
        "in answer": ({"conversations": [{"from": "human", "value": "<video>\nx"}, {"from": "gpt", "value": "<video>"}]},
                      "holds a <video> marker in a 'gpt' turn"),
    }
    if pytest.importorskip("av", reason="decoding video files needs PyAV (the [media] extra)"):
        cases["broken"] = ({"video": "broken.mp4"}, "broken.mp4 cannot be read as video")
    for name, (change, says) in cases.items():
        record = {**records[0], **change}
        record = {k: v for k, v in record.items() if v is not None}
        path.write_text(json.dumps([records[2], record]))
        one_line_error(lambda: LlavaDataset(path, tmp_path, processor), match="record 1 .*" + says)
    # An image model's processor refuses video records by name.
    path.write_text(json.dumps(records))
    image_only = Processor(processor.tokenizer, processor.image_processor, 9)
    one_line_error(lambda: LlavaDataset(path, tmp_path, image_only), match="record 0.*model is without video")


# --- the command line: data, chat, the video haystack ----------------------------------------------


def video_checkpoint(folder, **config):
    """A tiny random video model (96 px frames in 16 px patches, 2 x 2 pooled: 9 tokens a frame;
    `config` changes more) saved with its tokenizer and frame sampling, as `omnilm chat` and
    `eval niah` load one."""
    import torch
    from conftest import randomize_

    from omnilm import OmniModel
    from omnilm.data import Processor, train_tokenizer
    from omnilm.data.processor import VideoSampling

    tokenizer = train_tokenizer(["What colour is the cross? red green blue yellow purple orange"] * 4,
                                vocab_size=300, video=True, system_prompt="Answer.")
    model = OmniModel.from_preset("tiny", text=dict(vocab_size=300, n_layers=1, dim=32, n_heads=4, n_kv_heads=2,
                                                    mlp_dim=64), vision=dict(n_layers=1, patch_size=16, dim=32,
                                                                             n_heads=4, mlp_dim=64),
                                  image_token_id=3, video_token_id=4, **config)
    torch.manual_seed(0)
    randomize_(model.eval())
    model.save_pretrained(folder)
    processor = Processor.for_model(model, tokenizer=tokenizer)
    processor.video = VideoSampling(num_frames=8, timestamps=True)
    processor.save_pretrained(folder)
    return folder


def test_video_haystack_grid_and_chat_on_the_command_line(tmp_path, capsys):
    import csv
    import json

    from conftest import cli_error, run_cli

    ckpt = video_checkpoint(tmp_path / "model")
    code, out, err = run_cli(["eval", "niah", ckpt, "--needle", "video", "--lengths", "4,12", "--depths", "3",
                              "--samples", "2", "--max-new-tokens", "2", "--out", tmp_path / "niah"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "niah" / "niah.csv").open()))
    assert [(r["length"], r["depth"], r["samples"]) for r in rows] == [
        (n, d, "2") for n in ("4", "12") for d in ("0.0", "0.5", "1.0")]
    predictions = [json.loads(line) for line in (tmp_path / "niah" / "predictions.jsonl").read_text().splitlines()]
    # The needle sits at the cell's depth; every frame is in the prompt (9 tokens each, plus its time).
    assert [p["needle_frame"] for p in predictions[:6]] == [0, 0, 2, 2, 3, 3]
    assert all(p["tokens"] > 9 * p["length"] for p in predictions) and (tmp_path / "niah" / "niah.png").is_file()
    assert "video needle in a haystack" in out and "clip length" not in out
    cli_error(*run_cli(["eval", "niah", ckpt, "--needle", "video", "--lengths", "2x"], capsys)[::2],
              "with --needle video give frames per clip")
    # chat --video: the answer to a question about a clip file; a text-only model refuses before loading.
    clip = tmp_path / "clip.mp4"
    pytest.importorskip("av", reason="writing the clip needs PyAV (the [media] extra)")
    write_video(clip, frames(5, 96, 96))
    code, out, err = run_cli(["chat", ckpt, "What colour is the cross?", "--video", clip, "--max-new-tokens", "3"],
                             capsys)
    assert code == 0 and out.strip(), err
    code, _, err = run_cli(["chat", ckpt, "Hi", "--video", tmp_path / "nope.mp4"], capsys)
    cli_error(code, err, "nope.mp4: no such video file")


def test_the_video_recipe_runs_end_to_end(tmp_path):
    """demo-video at toy size with --no-motion --one-stage: data, one training stage, every family
    with the two controls, the haystack grid, and a model folder transformers reads as
    LLaVA-NeXT-Video."""
    import json

    pytest.importorskip("av", reason="the recipe writes its clips as mp4 (PyAV, the [media] extra)")
    from omnilm.recipes.video import VideoRecipe, format_video_results, run_video_recipe
    from omnilm.train import Hyperparams

    recipe = VideoRecipe(n_train=24, n_needles=6, needle_frames=(4, 6), n_direction=4, n_test=6,
                         haystack_frames=(4, 6), haystack_depths=2, haystack_samples=1, motion=False, one_stage=True,
                         cache_features=0, progress=False, instruct=Hyperparams(steps=2, batch_size=4, lr=1e-3, warmup=1))
    result = run_video_recipe(tmp_path / "run", recipe)
    assert not (tmp_path / "run" / "lookup").exists()
    assert set(result["eval"]) == {"all", "shuffled", "first"}
    n = result["eval"]["all"]["n"]
    assert n == len(json.loads((tmp_path / "run" / "data" / "test.json").read_text())) and n > 6
    assert [(r["length"], r["depth"]) for r in result["haystack"]] == [(4, 0.0), (4, 1.0), (6, 0.0), (6, 1.0)]
    table = format_video_results(result["eval"])
    assert table.count("\n") == 2 + len(result["eval"]["all"]["tasks"]) and "| direction |" in table
    model = tmp_path / "run" / "model"
    assert json.loads((model / "config.json").read_text())["model_type"] == "llava_next_video"
    assert json.loads((model / "video_preprocessor_config.json").read_text())["num_frames"] is None
    assert (tmp_path / "run" / "niah" / "niah.png").is_file() and (tmp_path / "run" / "results.json").is_file()
    with pytest.raises(OmniInputError, match="--patch-size 20"):
        VideoRecipe(patch_size=20)


def test_the_video_recipe_learns_the_look_ups_first(tmp_path):
    """The look-up stage trains on --n-direction's records and the haystack clips alone (and
    whitens the projector of the model it shapes, with motion, its halo and moments, the defaults);
    the main stage starts from its model on every record, those included."""
    import json

    pytest.importorskip("av", reason="the recipe writes its clips as mp4 (PyAV, the [media] extra)")
    from omnilm.data.llava_json import read_records
    from omnilm.recipes.video import VideoRecipe, run_video_recipe
    from omnilm.train import Hyperparams

    tiny = dict(batch_size=4, lr=1e-3, warmup=1)
    recipe = VideoRecipe(n_train=8, n_needles=2, needle_frames=(4,), n_direction=10, n_test=3, haystack_frames=(4,),
                         haystack_depths=2, haystack_samples=1, progress=False,
                         lookup=Hyperparams(steps=3, **tiny), instruct=Hyperparams(steps=2, **tiny))
    run_video_recipe(tmp_path / "run", recipe)
    data = tmp_path / "run" / "data"
    lookup = read_records(data / "lookup.json")
    assert [r["task"] for r in lookup].count("needle") == 2 and {r["task"] for r in lookup} == {"direction", "needle"}
    assert {r["id"] for r in lookup} < {r["id"] for r in read_records(data / "train.json")}
    steps = [[json.loads(line)["step"] for line in (tmp_path / "run" / stage / "metrics.jsonl").open()
              if '"loss"' in line] for stage in ("lookup", "instruct")]
    assert (steps[0][-1], steps[1][-1]) == (3, 2)
    config = json.loads((tmp_path / "run" / "model" / "omnilm.json").read_text())
    assert (config["video_motion"], config["video_motion_halo"], config["video_motion_moments"]) == (True, 1, True)


def test_motion_conversations_keep_only_their_families_and_the_marker_first(tmp_path):
    """--n-motion's extra clips: each conversation cut to its motion and event turns (questions and
    answers kept together), the video marker before the first; --n-direction's a direction
    question each; both in train.json."""
    pytest.importorskip("av", reason="the recipe writes its clips as mp4 (PyAV, the [media] extra)")
    from omnilm.data.llava_json import read_records
    from omnilm.data.shapeworld.video import make_video_example
    from omnilm.recipes.video import MOTION_FAMILIES, VideoRecipe, keep_turns, write_data

    for index in range(20):
        record = make_video_example(index, 0, "motion", questions="all").records[0]
        cut = keep_turns(record, MOTION_FAMILIES)
        pairs = list(zip(record["turn_tasks"], record["conversations"][::2], record["conversations"][1::2]))
        kept = [(task, q["value"].removeprefix("<video>\n"), a["value"]) for task, q, a in pairs
                if task in MOTION_FAMILIES]
        if not kept:
            assert cut is None
            continue
        assert cut["turn_tasks"] == [task for task, _, _ in kept] and cut["video"] == record["video"]
        questions, answers = cut["conversations"][::2], cut["conversations"][1::2]
        assert [q["value"] for q in questions] == ["<video>\n" + kept[0][1]] + [q for _, q, _ in kept[1:]]
        assert [a["value"] for a in answers] == [a for _, _, a in kept]
    records = read_records(write_data(tmp_path, VideoRecipe(n_train=4, n_direction=6, n_motion=6, n_needles=0,
                                                            n_test=1, progress=False))[0])
    motion = [r for r in records if r["id"].startswith("motion-")]
    assert 0 < len(motion) <= 6 and all(set(r["turn_tasks"]) <= set(MOTION_FAMILIES) for r in motion)
    direction = [r for r in records if r["id"].startswith("direction-")]
    assert 0 < len(direction) <= 6 and all(r["task"] == "direction" for r in direction)
    assert all((tmp_path / r["video"]).is_file() for r in motion + direction)


def test_controls_shuffle_or_cut_the_frames_but_keep_the_times():
    from omnilm.data.video import Video
    from omnilm.eval.vqa import control_frames

    clip = frames(6)
    video = Video(clip, [0, 2, 4, 6, 8, 10], 12, 2.0)
    assert control_frames(video, "all", "x") is video
    for seed in map(str, range(20)):
        shuffled = control_frames(video, "shuffled", seed)
        order = [next(i for i in range(6) if (clip[i] == f).all()) for f in shuffled.frames]
        assert sorted(order) == list(range(6)) and order != list(range(6))
        assert shuffled.timestamps == video.timestamps  # the times of the places shown, not of the frames
    first = control_frames(video, "first", "x")
    assert (first.frames == clip[:1]).all() and first.timestamps == [0.0]
    one = Video(clip[:1], [0], 1, None)
    assert (control_frames(one, "shuffled", "x").frames == clip[:1]).all()


def test_data_shapeworld_video_on_the_command_line(tmp_path, capsys):
    import json

    from conftest import cli_error, run_cli

    code, out, err = run_cli(["data", "shapeworld", "--video", "--out", tmp_path, "--n", "3", "--frames-as", "png",
                              "--questions", "all", "--split", "test"], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "test.json").read_text())
    assert "wrote 3 examples (3 videos, 3 records)" in out and len(records) == 3
    for r in records:
        assert r["task"] == "multi_turn" and len(r["turn_tasks"]) == len(r["conversations"]) // 2 >= 3
        assert r["conversations"][0]["value"].startswith("<video>\n") and (tmp_path / r["video"]).is_dir()
        assert len(list((tmp_path / r["video"]).glob("*.png"))) == r["n_frames"]
    cli_error(*run_cli(["data", "shapeworld", "--video", "--out", tmp_path, "--n", "1", "--multi-image", "0.5"],
                       capsys)[::2], "--multi-image shapes still images")
    cli_error(*run_cli(["data", "shapeworld", "--out", tmp_path, "--n", "1", "--n-frames", "5"], capsys)[::2],
              "--frames-as and --n-frames shape clips")
