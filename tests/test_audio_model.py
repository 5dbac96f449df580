"""The audio tower against transformers: omnilm's WhisperEncoder loads the state dict of transformers'
WhisperEncoder and of Voxtral's audio tower with strict=True and computes what they compute; its
VoxtralProjector is Voxtral's multi_modal_projector, reshape included; a window of the wrong size
is refused in one line. Tiny random models, fp32, eval, nothing downloaded."""

import numpy as np
import pytest
import torch
from conftest import one_line_error, randomize_

from omnilm.config import AudioConfig, ConfigError
from omnilm.data.audio import LogMelConfig, log_mel
from omnilm.model.audio import VoxtralProjector, WhisperEncoder, sinusoids

tf = pytest.importorskip("transformers")

# 80 mels, 64 wide, 2 layers of 4 heads, a 256-wide feed-forward (4 x 64, as in every Whisper, which
# makes Voxtral's frames_per_token 4); 100 encoder frames = 200 mel frames = 2 s windows = 25 audio tokens.
TINY = dict(n_mels=80, dim=64, n_layers=2, n_heads=4, mlp_dim=256, max_source_positions=100)


def hf_audio_kwargs(cfg: AudioConfig) -> dict:
    return dict(num_mel_bins=cfg.n_mels, d_model=cfg.dim, encoder_layers=cfg.n_layers,
                encoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.mlp_dim,
                max_source_positions=cfg.max_source_positions, activation_function=cfg.act)


def windows(cfg: AudioConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    """(n, n_mels, window_frames) log-mel windows of noise and tones, as the front end makes them."""
    seconds = cfg.window_frames / 100  # log_mel's hop: 100 frames a second
    t = np.arange(round(n * seconds * 16000) - 4000) / 16000  # the last window part silence
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    mel = log_mel(audio.astype(np.float32), LogMelConfig(n_mels=cfg.n_mels, window_seconds=seconds))
    assert mel.shape == (n, cfg.n_mels, cfg.window_frames)
    return mel


def assert_same_keys(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_whisper_encoder_equals_transformers():
    cfg = AudioConfig(**TINY)
    hf_cfg = tf.WhisperConfig(**hf_audio_kwargs(cfg), attn_implementation="eager")  # eager: the plain reference
    torch.manual_seed(0)
    theirs = randomize_(tf.models.whisper.modeling_whisper.WhisperEncoder(hf_cfg)).eval()
    ours = WhisperEncoder(cfg).eval()
    assert_same_keys(ours, theirs)

    mel = windows(cfg)  # (2, 80, 200)
    with torch.no_grad():
        want = theirs(mel).last_hidden_state
        got = ours(mel)
    assert got.shape == (2, cfg.max_source_positions, cfg.dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fresh_positions_are_whispers_sinusoids():
    hf_sinusoids = tf.models.whisper.modeling_whisper.sinusoids
    torch.testing.assert_close(sinusoids(1500, 1280), hf_sinusoids(1500, 1280), atol=0, rtol=0)
    encoder = WhisperEncoder(AudioConfig(**TINY))
    assert torch.equal(encoder.embed_positions.weight, hf_sinusoids(100, 64))
    assert not encoder.embed_positions.weight.requires_grad  # frozen, as in transformers


def test_voxtral_audio_features_equal_transformers():
    """Voxtral's whole audio path: audio tower, the stacking of 4 frames into one vector, the projector."""
    cfg = AudioConfig(**TINY)
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2)
    audio = hf_audio_kwargs(cfg) | dict(model_type="voxtral_encoder")
    hf_cfg = tf.VoxtralConfig(audio_config=audio, text_config=text, audio_token_id=299, attn_implementation="eager")
    assert hf_cfg.audio_config.intermediate_size // hf_cfg.audio_config.d_model == cfg.frames_per_token
    torch.manual_seed(0)
    model = randomize_(tf.VoxtralForConditionalGeneration(hf_cfg)).eval()
    tower, projector = model.model.audio_tower, model.model.multi_modal_projector

    encoder = WhisperEncoder(cfg).eval()
    ours = VoxtralProjector(cfg.dim, text["hidden_size"], cfg.frames_per_token, hf_cfg.projector_hidden_act)
    assert_same_keys(encoder, tower)
    assert_same_keys(ours, projector)

    mel = windows(cfg)
    with torch.no_grad():
        frames = encoder(mel)
        torch.testing.assert_close(frames, tower(mel).last_hidden_state, atol=1e-5, rtol=0)
        want = model.get_audio_features(mel).pooler_output  # (B*T/K, E)
        got = ours(frames)  # (B, T/K, E)
    assert got.shape == (2, cfg.tokens_per_window, text["hidden_size"])
    torch.testing.assert_close(got.flatten(0, 1), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 80, 199), (2, 80, 100), (1, 80, 400), (80, 200), (2, 128, 200)])
def test_wrong_window_is_one_line_error(shape):
    encoder = WhisperEncoder(AudioConfig(**TINY))
    one_line_error(lambda: encoder(torch.zeros(shape)), str(shape), "(B, 80, 200)", "log_mel")


def test_audio_config_checks():
    assert AudioConfig().window_frames == 3000 and AudioConfig().tokens_per_window == 375
    with pytest.raises(ConfigError, match="audio.max_source_positions"):
        AudioConfig(**TINY, frames_per_token=3)
    with pytest.raises(ConfigError, match="audio.dim"):
        AudioConfig(**(TINY | dict(dim=63, n_heads=3)))
    with pytest.raises(ConfigError, match="audio.act"):
        AudioConfig(**TINY, act="relu")
    with pytest.raises(ValueError, match="unknown audio config field"):
        AudioConfig.from_dict(TINY | dict(d_model=64))
