"""The audio model against transformers' VoxtralForConditionalGeneration: a transformers folder loads
into OmniModel and gives its logits, an omnilm audio model saves a folder transformers loads and back,
a Whisper folder's encoder loads alone, and wrong inputs get one-line errors. Tiny random models,
fp32, eval, nothing downloaded."""

import json

import pytest
import torch
from conftest import one_line_error, randomize_

from omnilm.config import OmniConfig
from omnilm.model.hf import load_audio_encoder, save_audio_encoder
from omnilm.model.hf_config import config_from_hf, config_to_hf, hf_incompatibility
from omnilm.model.omni import OmniModel

tf = pytest.importorskip("transformers")

AUDIO_ID = 7
# 80 mels, 64 wide, a 256-wide feed-forward (frames_per_token 4); 2 s windows of 25 audio tokens.
AUDIO = dict(n_mels=80, dim=64, n_layers=2, n_heads=4, mlp_dim=256, max_source_positions=100)
TEXT = dict(vocab_size=300, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96, max_seq_len=512,
            rope_theta=10000.0)


def omni_config(**overrides) -> OmniConfig:
    return OmniConfig(**{"text": dict(TEXT), "vision": None, "audio": dict(AUDIO), "audio_token_id": AUDIO_ID,
                         **overrides})


def hf_voxtral(cfg: OmniConfig):
    """transformers' Voxtral of `cfg`'s shape, with O(1) random weights."""
    torch.manual_seed(0)
    model = tf.VoxtralForConditionalGeneration(tf.VoxtralConfig(**config_to_hf(cfg), attn_implementation="eager"))
    return randomize_(model).eval()


def prompt(n_windows: int, seq_len: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Text around n_windows windows of 25 audio tokens, left-padded by `pad`: (1, T) ids and mask."""
    g = torch.Generator().manual_seed(n_windows)
    text = torch.randint(10, 300, (6,), generator=g).tolist()
    ids = [0] * pad + text[:3] + [AUDIO_ID] * (seq_len * n_windows) + text[3:]
    mask = [0] * pad + [1] * (len(ids) - pad)
    return torch.tensor([ids]), torch.tensor([mask])


def features(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 80, 200, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_windows", [1, 3])
def test_transformers_folder_loads_and_gives_its_logits(tmp_path, n_windows):
    cfg = omni_config()
    theirs = hf_voxtral(cfg)
    theirs.save_pretrained(tmp_path)
    ours = OmniModel.from_pretrained(tmp_path)
    assert ours.config.audio == cfg.audio and ours.config.audio_token_id == AUDIO_ID
    ids, mask = prompt(n_windows, cfg.audio_seq_len)
    feats = features(n_windows)
    with torch.no_grad():
        want = theirs(input_ids=ids, input_features=feats, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, input_features=feats).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_padded_batch_with_a_text_turn_matches_transformers(tmp_path):
    """Two prompts, one left-padded, one window each, then a text-only continuation (no audio)."""
    cfg = omni_config()
    theirs = hf_voxtral(cfg)
    theirs.save_pretrained(tmp_path)
    ours = OmniModel.from_pretrained(tmp_path)
    a, a_mask = prompt(1, cfg.audio_seq_len, pad=4)
    b, b_mask = prompt(1, cfg.audio_seq_len)
    b = torch.cat([b, torch.tensor([[11, 12, 13, 14]])], 1)
    b_mask = torch.cat([b_mask, torch.ones(1, 4, dtype=torch.long)], 1)
    ids, mask = torch.cat([a, b]), torch.cat([a_mask, b_mask])
    feats = features(2, seed=1)
    with torch.no_grad():
        want = theirs(input_ids=ids, input_features=feats, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, input_features=feats).logits
        text = torch.tensor([[5, 20, 30, 40]])
        torch.testing.assert_close(ours(text).logits, theirs(input_ids=text).logits, atol=1e-5, rtol=0)
    keep = mask.bool()  # padded positions differ by design (HF and we mask them alike, but both are junk)
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0)


def test_omnilm_folder_loads_in_transformers_and_back(tmp_path):
    cfg = omni_config()
    ours = randomize_(OmniModel.from_config(cfg), seed=3).eval()
    ours.audio.reset_positions()  # as a trained model keeps them
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "voxtral" and written["audio_config"]["intermediate_size"] == 256
    theirs = tf.VoxtralForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = prompt(2, cfg.audio_seq_len)
    feats = features(2, seed=2)
    with torch.no_grad():
        want = theirs(input_ids=ids, input_features=feats, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, input_features=feats).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (tmp_path / "omnilm.json").unlink()  # read back from transformers' config.json alone
    again = OmniModel.from_pretrained(tmp_path)
    assert again.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_config_round_trips_and_reads_transformers_spelling():
    cfg = omni_config(audio_projector_act="silu")
    assert config_from_hf(config_to_hf(cfg)) == cfg
    d = config_to_hf(cfg)
    d["audio_config"] = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 256,
                         "num_mel_bins": 80, "max_source_positions": 100}  # WhisperConfig's names
    assert config_from_hf(d).audio == cfg.audio
    d["audio_config"]["encoder_ffn_dim"] = 200
    one_line_error(lambda: config_from_hf(d, "x/config.json"), "x/config.json", "intermediate_size=200",
                   "multiple of hidden_size=64")


def test_an_omni_model_keeps_omnilm_names(tmp_path):
    """Images and audio in one model: transformers has no class, so omnilm.json and omnilm's names."""
    cfg = OmniConfig.from_preset("tiny", audio=dict(AUDIO), audio_token_id=5)
    assert "images and audio" in hf_incompatibility(cfg)
    model = OmniModel.from_config(cfg)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    again = OmniModel.from_pretrained(tmp_path)
    assert again.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_whisper_folder_gives_its_encoder(tmp_path):
    hf_cfg = tf.WhisperConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                              encoder_ffn_dim=256, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                              max_source_positions=100, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1, attn_implementation="eager")
    torch.manual_seed(0)
    whisper = randomize_(tf.WhisperForConditionalGeneration(hf_cfg)).eval()
    whisper.save_pretrained(tmp_path)
    encoder = load_audio_encoder(tmp_path)
    mel = features(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder(mel), whisper.model.encoder(mel).last_hidden_state, atol=1e-5, rtol=0)
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path), "Whisper", "load_audio_encoder")


def test_wrong_audio_inputs_get_one_line_errors():
    model = OmniModel.from_config(omni_config()).eval()
    ids, _ = prompt(1, 25)
    one_line_error(lambda: model(ids), "25 audio tokens", "no input_features", "pass the audio")
    one_line_error(lambda: model(ids, input_features=features(2)), "room for 1 audio window", "2 audio window(s)",
                   "expand each <audio> marker to 25 tokens a window")
    one_line_error(lambda: model(ids, input_features=torch.randn(1, 80, 150)), "(1, 80, 150)", "(B, 80, 200)",
                   "log_mel")
    text_only = OmniModel.from_config(OmniConfig(text=dict(TEXT), vision=None))
    one_line_error(lambda: text_only(ids[:, :3], input_features=features(1)), "takes no audio")


def test_audio_config_checks():
    with pytest.raises(ValueError, match="audio_token_id=None must be set too"):
        OmniConfig(text=dict(TEXT), vision=None, audio=dict(AUDIO))
    with pytest.raises(ValueError, match="is the image_token_id too"):
        OmniConfig.from_preset("tiny", audio=dict(AUDIO), audio_token_id=3)
    with pytest.raises(ValueError, match="fusion='late' must be 'joint'"):
        OmniConfig.from_preset("tiny", audio=dict(AUDIO), audio_token_id=5, fusion="late")
    assert OmniConfig.from_dict(omni_config().to_dict()) == omni_config()


def test_a_saved_audio_processor_is_whispers_feature_extractor(tmp_path):
    """An audio model's folder holds its front end as transformers' WhisperFeatureExtractor: the same
    features for a clip of one window, and omnilm reads the settings back."""
    import numpy as np

    from omnilm.data import Processor, train_tokenizer
    from omnilm.data.audio import LogMelConfig
    from omnilm.io import read_json

    tokenizer = train_tokenizer(["a b c"] * 3, vocab_size=300, audio=True)
    cfg = omni_config(audio_token_id=tokenizer.audio_token_id)
    processor = Processor.for_model(cfg, tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    extractor = tf.WhisperFeatureExtractor.from_pretrained(tmp_path)
    t = np.arange(32000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) * (t < 1.3)).astype(np.float32)
    want = extractor(clip, sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(processor.audio_features(clip), want, atol=1e-5, rtol=0)
    assert LogMelConfig.from_hf(read_json(tmp_path / "preprocessor_config.json")) == processor.log_mel


def test_an_encoder_saved_alone_is_transformers_voxtral_encoder(tmp_path):
    from omnilm.config import AudioConfig
    from omnilm.model.audio import WhisperEncoder

    encoder = randomize_(WhisperEncoder(AudioConfig(**AUDIO)), seed=5).eval()
    save_audio_encoder(encoder, tmp_path)
    theirs = tf.VoxtralEncoder.from_pretrained(tmp_path, attn_implementation="eager").eval()
    mel = features(2)
    again = load_audio_encoder(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(mel).last_hidden_state, encoder(mel), atol=1e-5, rtol=0)
        assert torch.equal(again(mel), encoder(mel))
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path), "load_audio_encoder")
