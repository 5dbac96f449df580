"""Audio through every door: the processor expands each <audio> marker to its windows' tokens and
gives their log-mel features, chats carry audio as transformers' and OpenAI's parts, LLaVA records
with `audio` fields train and evaluate (silence as the control), chunked prefill gives the logits
of one pass, `omnilm chat --audio` and `omnilm eval niah --needle audio` run, and every misuse gets
a one-line error. Tiny random models; soundfile (the [media] extra) for the files."""

import base64
import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, randomize_

from omnilm import OmniModel
from omnilm.data import LlavaDataset, Processor, collate, train_tokenizer
from omnilm.data.audio import LogMelConfig, load_audio, log_mel
from omnilm.data.chat import normalize_messages
from omnilm.data.llava_json import check_records, write_records
from omnilm.infer import generate

pytest.importorskip("soundfile", reason="reading and writing audio files needs soundfile (the [media] extra)")
from omnilm.data.audio import write_audio  # noqa: E402

RATE = 16000
AUDIO = dict(n_mels=80, dim=32, n_layers=1, n_heads=4, mlp_dim=128, max_source_positions=100)  # 2 s, 25 tokens


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def audio_model(folder=None, vision: bool = False):
    """A tiny random audio model (no vision tower unless `vision`) and its processor; saved to
    `folder` with the tokenizer when given."""
    tokenizer = train_tokenizer(["How many tones are there? 1 2 3 up down low mid high"] * 4, vocab_size=300,
                                audio=True, system_prompt="Answer.")
    overrides = {} if vision else {"vision": None}
    model = OmniModel.from_preset("tiny", text=dict(vocab_size=300, n_layers=1, dim=32, n_heads=4, n_kv_heads=2,
                                                    mlp_dim=64), audio=dict(AUDIO), image_token_id=3,
                                  audio_token_id=tokenizer.audio_token_id, **overrides)
    torch.manual_seed(0)
    randomize_(model.eval())
    model.audio.reset_positions()
    processor = Processor.for_model(model, tokenizer=tokenizer)
    if folder is not None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return model, processor


def ask(audio_part: dict, question: str = "How many tones are there?") -> list[dict]:
    return [{"role": "user", "content": [audio_part, {"type": "text", "text": question}]}]


def test_the_tokenizer_keeps_audio_a_single_special_token():
    tokenizer = train_tokenizer(["a <audio> b <video> c"] * 3, vocab_size=300, video=True, audio=True)
    assert (tokenizer.video_token_id, tokenizer.audio_token_id) == (4, 5)
    assert tokenizer.encode("x<audio>y", add_bos=False).count(5) == 1
    assert train_tokenizer(["a"], vocab_size=300).audio_token_id is None


def test_each_marker_becomes_its_windows_and_their_features(tmp_path):
    model, processor = audio_model()
    samples = tone(3.0)  # two 2 s windows, the second half silence
    write_audio(tmp_path / "a.wav", samples)
    batch = processor(ask({"type": "audio", "audio": str(tmp_path / "a.wav")}))
    assert batch["input_features"].shape == (2, 80, 200)
    assert batch["input_ids"][0].tolist().count(model.config.audio_token_id) == 2 * 25
    # Voxtral's front end on the file's samples: one normalisation over the whole padded clip.
    heard = load_audio(tmp_path / "a.wav")
    assert np.abs(heard - samples).max() <= 1 / 32768  # one 16-bit step
    want = log_mel(heard, LogMelConfig(n_mels=80, window_seconds=2.0), per_window=False)
    torch.testing.assert_close(batch["input_features"], want, atol=1e-6, rtol=0)
    # The same clip as OpenAI's base64 part, and as samples.
    wav = base64.b64encode((tmp_path / "a.wav").read_bytes()).decode()
    for part, audios in [({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}, None),
                         ({"type": "audio"}, [heard])]:
        other = processor(ask(part), audios=audios)
        assert torch.equal(other["input_ids"], batch["input_ids"])
        torch.testing.assert_close(other["input_features"], batch["input_features"], atol=1e-6, rtol=0)
    resampled = processor(ask({"type": "audio"}), audios=[(tone(3.0)[::2].copy(), 8000)])
    assert resampled["input_features"].shape == (2, 80, 200)
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_audio_and_images_in_one_chat():
    model, processor = audio_model(vision=True)
    from PIL import Image

    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (96, 96), "red")},
                                         {"type": "audio", "audio": tone(1.0)},
                                         {"type": "text", "text": "Are there as many tones as shapes?"}]}]
    batch = processor(chat)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(3) == model.config.image_seq_len and ids.count(model.config.audio_token_id) == 25
    assert ids.index(3) < ids.index(model.config.audio_token_id)  # in the order of the parts
    assert model(**batch).logits.shape[1] == len(ids)


def test_misuse_gets_one_line_errors(tmp_path):
    model, processor = audio_model()
    one_line_error(lambda: processor("USER: <audio>\nHow many? ASSISTANT:"), "1 <audio> markers", "0 audios")
    one_line_error(lambda: processor(ask({"type": "audio"}), audios=[tone(1.0), tone(1.0)]), "2 audios")
    (tmp_path / "notes.wav").write_text("not audio")
    one_line_error(lambda: processor(ask({"type": "audio", "audio": tmp_path / "notes.wav"})), "notes.wav")
    one_line_error(lambda: normalize_messages(ask({"type": "input_audio", "input_audio": {"data": "%%%"}})),
                   "not base64")
    tokenizer = train_tokenizer(["a b c"] * 3, vocab_size=300)
    text_only = Processor(tokenizer, None, 0)
    one_line_error(lambda: text_only.read_audio(tone(1.0)), "takes no audio")


def test_records_with_audio_train_and_are_checked(tmp_path):
    model, processor = audio_model()
    (tmp_path / "audio").mkdir()
    for i, seconds in enumerate((1.0, 3.0)):
        write_audio(tmp_path / f"audio/{i}.wav", tone(seconds, 300 + 300 * i))
    (tmp_path / "audio/bad.wav").write_bytes(b"RIFF....WAVEjunk")
    records = [{"id": i, "audio": f"audio/{i}.wav", "conversations": [
        {"from": "human", "value": "<audio>\nHow many tones are there?"}, {"from": "gpt", "value": "1"}]}
        for i in range(2)]
    write_records(tmp_path / "train.json", records)
    data = LlavaDataset(tmp_path / "train.json", tmp_path, processor)
    first, second = data[0], data[1]
    assert first["input_features"].shape == (1, 80, 200) and second["input_features"].shape == (2, 80, 200)
    audio_id = model.config.audio_token_id
    assert (second["input_ids"] == audio_id).sum() == 50 and (second["labels"][second["input_ids"] == audio_id]
                                                              == -100).all()
    batch = collate([first, second], pad_id=0)
    assert batch["input_features"].shape == (3, 80, 200)
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                input_features=batch["input_features"])
    assert torch.isfinite(out.loss)

    good = records[0]
    cases = {
        "audio/bad.wav": {**good, "audio": "audio/bad.wav"},
        "is not a file": {**good, "audio": "audio/nope.wav"},
        "1 <audio> markers but the record has 2 audios": {**good, "audio": ["audio/0.wav", "audio/1.wav"]},
        "which is not the audio marker": {**good, "conversations": [
            {"from": "human", "value": "<Audio>\nHow many?"}, {"from": "gpt", "value": "1"}]},
        "outside the image folder": {**good, "audio": "../x.wav"},
    }
    for says, record in cases.items():
        checked = check_records([record, good], tmp_path, processor=processor, skip_bad=True)
        assert len(checked.skipped) == 1 and says in str(checked.skipped[0].problem), (says, checked.skipped)
    text = {"id": 9, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "1"}]}
    deaf = Processor(processor.tokenizer, None, 0)  # a model that reads no audio
    checked = check_records([good, text], tmp_path, processor=deaf, skip_bad=True)
    assert checked.kept == [1] and "the model is without audio" in str(checked.skipped[0].problem)


def test_a_tiny_model_learns_a_pitch_through_train(tmp_path):
    """train() with audio records: the encoder trains from scratch (--train-audio), its fixed positions
    stay Whisper's sinusoids, and the loss falls; refused flags say so in one line."""
    from omnilm.model.audio import sinusoids
    from omnilm.train import TrainArgs, train

    (tmp_path / "audio").mkdir()
    records = []
    for i in range(24):
        pitch = ("low", "high")[i % 2]
        write_audio(tmp_path / f"audio/{i}.wav", tone(1.0, (300, 1200)[i % 2]) * (0.5 + i / 48))
        records.append({"id": i, "audio": f"audio/{i}.wav", "conversations": [
            {"from": "human", "value": "<audio>\nIs the tone low or high?"}, {"from": "gpt", "value": pitch}]})
    write_records(tmp_path / "train.json", records)
    config = {"vision": None, "text": {"n_layers": 1, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 128},
              "audio": dict(AUDIO)}
    common = dict(stage="instruct", data=tmp_path / "train.json", image_folder=tmp_path, config=config,
                  batch_size=8, lr=3e-3, warmup=2, progress=False, bf16=False)
    summary = train(TrainArgs(out=tmp_path / "run", steps=30, train_audio=True, **common))
    model = summary["model"]
    assert torch.equal(model.audio.embed_positions.weight, sinusoids(100, 32))
    losses = summary["losses"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    saved = OmniModel.from_pretrained(tmp_path / "run" / "model")
    assert saved.config.audio == model.config.audio
    assert json.loads((tmp_path / "run/model/config.json").read_text())["model_type"] == "voxtral"
    one_line_error(lambda: train(TrainArgs(out=tmp_path / "r2", steps=1, **{**common, "config": {"vision": None}})),
                   "the data has audio", "--config")
    write_records(tmp_path / "text.json", [{"id": 0, "conversations": [{"from": "human", "value": "Hi"},
                                                                       {"from": "gpt", "value": "low"}]}])
    deaf = {**config, "audio": None}
    one_line_error(lambda: train(TrainArgs(out=tmp_path / "r3", steps=1, train_audio=True,
                                           **{**common, "data": tmp_path / "text.json", "config": deaf})),
                   "--train-audio needs the model's audio encoder")


def test_chunked_prefill_equals_one_pass_with_audio():
    model, processor = audio_model()
    batch = processor(ask({"type": "audio"}, "How many tones are there? Tell me."), audios=[tone(5.0)])
    assert batch["input_features"].shape[0] == 3
    whole = generate(model, **batch, max_new_tokens=5)
    for chunk in (7, 30, 64):  # each cuts an audio window, which then goes whole into its chunk
        assert torch.equal(generate(model, **batch, max_new_tokens=5, prefill_chunk=chunk), whole)


def test_evaluation_hears_the_audio_or_silence(tmp_path):
    from omnilm.eval.vqa import evaluate_vqa

    model, processor = audio_model()
    (tmp_path / "audio").mkdir()
    records = []
    for i in range(4):
        write_audio(tmp_path / f"audio/{i}.wav", tone(1.0, 300 * (i + 1)))
        records.append({"id": i, "task": "pitch", "audio": f"audio/{i}.wav", "conversations": [
            {"from": "human", "value": "<audio>\nIs the tone low or high?"}, {"from": "gpt", "value": "low"}]})
    heard, predictions = evaluate_vqa(model, processor, records, tmp_path, progress=False)
    silent, quiet = evaluate_vqa(model, processor, records, tmp_path, progress=False, audio="silence")
    assert heard["n"] == silent["n"] == 4
    # Silence is one input: every clip then gets the same answer; the tones need not.
    assert len({p["prediction"] for p in quiet}) == 1
    assert [p["question"] for p in predictions] == ["Is the tone low or high?"] * 4


def test_chat_and_niah_commands_hear_audio(tmp_path, capsys):
    from omnilm.cli import main

    folder = tmp_path / "model"
    model, processor = audio_model(folder)
    write_audio(tmp_path / "a.wav", tone(2.5))
    main(["chat", str(folder), "--audio", str(tmp_path / "a.wav"), "--max-new-tokens", "3", "--temperature", "0",
          "How many tones are there?"])
    batch = processor(ask({"type": "audio", "audio": str(tmp_path / "a.wav")}))
    new = generate(model, **batch, max_new_tokens=3)[0].tolist()
    expected = processor.decode(new[:new.index(2)] if 2 in new else new).strip()
    assert capsys.readouterr().out.strip() == expected
    main(["eval", "niah", str(folder), "--needle", "audio", "--lengths", "2,3", "--depths", "2", "--samples", "1",
          "--out", str(tmp_path / "niah")])
    out = capsys.readouterr().out
    assert "audio needle in a haystack" in out and "25 tokens a window" in out
    rows = (tmp_path / "niah/niah.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2
    with pytest.raises(SystemExit):
        main(["eval", "niah", str(folder), "--needle", "audio", "--lengths", "0"])
    assert "1 to 64" in capsys.readouterr().err


@pytest.mark.parametrize("cross, silent", [(0, 0.1), (6, 0.0)])
def test_the_audio_recipe_runs_end_to_end(tmp_path, cross, silent):
    """demo-audio at toy size: data (with --silent's copies for a second stage, or --cross's image
    pairs), the training stages, every family heard and over silence, the haystack grid, and a model
    folder transformers reads as Voxtral (an audio-only model) or omnilm's own names (one that also
    sees)."""
    from omnilm.errors import OmniInputError
    from omnilm.recipes.audio import SILENCE, AudioRecipe, format_audio_results, run_audio_recipe
    from omnilm.train import Hyperparams

    recipe = AudioRecipe(n_train=20, n_needles=4, needle_windows=(1, 2), cross=cross, silent=silent, n_test=5,
                         haystack_windows=(2, 3), haystack_depths=2, haystack_samples=1, progress=False,
                         instruct=Hyperparams(steps=2, batch_size=4, lr=1e-3, warmup=1),
                         calibrate=Hyperparams(steps=1, batch_size=4, lr=1e-4, warmup=1))
    result = run_audio_recipe(tmp_path / "run", recipe)
    data = tmp_path / "run" / "data"
    train = json.loads((data / "train.json").read_text())
    assert not any(r["audio"] == SILENCE for r in train)
    if silent:  # the last stage: the same records and silent copies of 10% of the 20 conversations
        calibrate = json.loads((data / "calibrate.json").read_text())
        assert calibrate[:len(train)] == train and [r["audio"] for r in calibrate[len(train):]] == [SILENCE] * 2
        assert json.loads((tmp_path / "run" / "calibrate" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    assert (data / "calibrate.json").is_file() == bool(silent) and set(result["timings"]) >= {"instruct", "data"}
    assert ("calibrate" in result["timings"]) == bool(silent)
    assert sum("image" in r for r in train) == cross
    assert set(result["eval"]) == {"heard", "silence"}
    n = result["eval"]["heard"]["n"]
    assert n == len(json.loads((data / "test.json").read_text())) and n > 5
    assert [(r["length"], r["depth"]) for r in result["haystack"]] == [(2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    table = format_audio_results(result["eval"])
    assert table.count("\n") == 2 + len(result["eval"]["heard"]["tasks"]) and "| melody |" in table
    model = tmp_path / "run" / "model"
    assert (model / "config.json").is_file() == (not cross)  # Voxtral describes an audio-only model
    assert (tmp_path / "run" / "niah" / "niah.png").is_file() and (tmp_path / "run" / "results.json").is_file()
    with pytest.raises(OmniInputError, match="--frames-per-token 3"):
        AudioRecipe(frames_per_token=3)


def test_a_tokenizer_without_the_models_audio_or_video_marker_is_refused():
    from omnilm.config import OmniConfig
    from omnilm.data.processor import check_tokenizer_fits

    model, _ = audio_model()
    plain = train_tokenizer(["a b c"] * 3, vocab_size=300)
    one_line_error(lambda: check_tokenizer_fits(model.config, plain, "tok"), "tok: the tokenizer's <audio> is missing",
                   "audio_token_id is 4", "the audio model was trained with")
    video = OmniConfig.from_preset("tiny", text=dict(vocab_size=300), vision=dict(patch_size=16), image_token_id=3,
                                   video_token_id=4)
    one_line_error(lambda: check_tokenizer_fits(video, plain, "tok"), "<video> is missing", "video_token_id is 4")


def test_demo_audio_flags_name_each_stage_and_leave_out_what_the_recipe_decides(capsys):
    """--calibrate-* set the last stage; the flags the recipe decides itself (the instruct stage
    always trains the encoder; a stage from a model cannot whiten a fresh projector) are refused by
    the parser in one line rather than taken and overridden, or refused after the data is written."""
    from omnilm.cli import build_parser
    from omnilm.recipes.audio import AUDIO_FLAGS, AudioRecipe
    from omnilm.settings import from_flags

    parser = build_parser()
    args = parser.parse_args(["demo-audio", "--calibrate-steps", "7", "--calibrate-lr", "1e-4", "--silent", "0.05"])
    recipe = from_flags(AudioRecipe, args, **AUDIO_FLAGS)
    assert (recipe.calibrate.steps, recipe.calibrate.lr, recipe.silent) == (7, 1e-4, 0.05)
    assert recipe.instruct == AudioRecipe().instruct
    for flag in ("--calibrate-whiten-projector", "--instruct-train-audio", "--instruct-whiten-projector"):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo-audio", flag])
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1
