"""Hugging Face interop: parity with transformers' CLIP, LLaMA and LLaVA, checkpoints both ways,
every key layout, and one-line errors for broken folders. fp32 on CPU, tiny random weights."""

import json
import os

import pytest
import torch
import transformers as tf
from conftest import one_line_error, randomize_, tiny_hf_model
from safetensors.torch import load_file, save_file

from omnilm import OmniConfig, OmniInputError, OmniModel
from omnilm.model import hf as hfio
from omnilm.model import hf_config

TOL = 1e-4


def positions(mask: torch.Tensor) -> torch.Tensor:
    # transformers' plain forward counts positions 0..T-1 even over left padding; ours counts real tokens.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()  # real (non-padding) positions only


def llava_batch(image_token_id: int, image_len: int, vocab: int, seed: int = 0):
    """Two rows: row 0 holds two images, row 1 one image after 5 left-padding tokens."""
    g = torch.Generator().manual_seed(seed)
    L, T = image_len, 2 * image_len + 18
    ids = torch.randint(3, vocab, (2, T), generator=g)
    ids[ids == image_token_id] = 5
    ids[0, 3:3 + L] = image_token_id
    ids[0, 8 + L:8 + 2 * L] = image_token_id
    ids[1, :5] = 0
    ids[1, 9:9 + L] = image_token_id
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, torch.randn(3, 3, 32, 32, generator=g), mask


def text_batch(vocab: int, T: int = 24, pad: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=g)
    ids[0, 7] = min(32000, vocab - 1)  # llava's default image id is an ordinary token in a text-only model
    ids[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def hf_llava_logits(hf, ids, pixels, mask):
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions(mask)).logits


def hf_llama_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


def our_logits(model, ids, mask, pixels=None):
    with torch.no_grad():
        return model(ids, pixels, mask).logits


def assert_same_weights(a: OmniModel, b: OmniModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k



def rewrite_weights(folder, change) -> None:
    """Rewrite folder/model.safetensors through `change(dict) -> dict`."""
    file = folder / "model.safetensors"
    save_file(change(load_file(file)), file, metadata={"format": "pt"})


# --- 1. parity with transformers ---------------------------------------------------------------


def test_clip_vision_matches_transformers(tmp_path):
    hf = tiny_hf_model("clip")
    hf.save_pretrained(tmp_path)
    ours = hfio.load_vision_encoder(tmp_path)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixels, output_hidden_states=True)
        states = ours.hidden_states(pixels)
        assert len(states) == len(ref.hidden_states) == 4
        for a, b in zip(states, ref.hidden_states):
            assert (a - b).abs().max().item() <= TOL
        assert (ours.pooled(pixels) - ref.pooler_output).abs().max().item() <= TOL


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matches_transformers(tmp_path, tied):
    hf = tiny_hf_model("llama", text=dict(vocab_size=32010, tie_word_embeddings=tied))
    hf.save_pretrained(tmp_path)
    ours = OmniModel.from_pretrained(tmp_path)
    t = ours.config.text
    assert (t.n_heads, t.n_kv_heads, t.rope_theta, t.norm_eps, ours.config.vision) == (4, 2, 5000.0, 3e-5, None)
    assert (ours.lm_head.weight is ours.llm.embed_tokens.weight) == tied
    assert all(p.requires_grad and not p.is_meta for p in ours.parameters())
    ids, mask = text_batch(32010)
    assert max_diff(our_logits(ours, ids, mask), hf_llama_logits(hf, ids, mask), mask) <= TOL


def test_llava_matches_transformers_with_two_images_and_left_padding(tmp_path):
    hf = tiny_hf_model("llava")
    hf.save_pretrained(tmp_path)  # transformers 5's own layout: vision_tower.encoder..., no vision_model.
    ours = OmniModel.from_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.image_token_id, cfg.vision.norm_eps, cfg.text.norm_eps, cfg.vision_feature_layer) == (299, 2e-5, 3e-5, -2)
    ids, pixels, mask = llava_batch(299, cfg.image_seq_len, 300)
    assert max_diff(our_logits(ours, ids, mask, pixels), hf_llava_logits(hf, ids, pixels, mask), mask) <= TOL


# --- 2. our checkpoints load in transformers -----------------------------------------------------


def tiny_omni(vision: bool = True, seed: int = 0, **text) -> OmniModel:
    cfg = OmniConfig(
        text=dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128, norm_eps=3e-5,
                  rope_theta=5000.0, max_seq_len=128, pad_token_id=0) | text,
        vision=dict(image_size=32, patch_size=8, dim=48, n_layers=3, n_heads=4, mlp_dim=96, norm_eps=2e-5) if vision else None,
        image_token_id=299, vision_feature_layer=-1, vision_feature_select="full",  # not the defaults: they must travel
    )
    model = OmniModel.from_config(cfg)
    return randomize_(model, seed).eval()


@pytest.mark.parametrize("max_shard_size", ["5GB", "100KB"])
def test_llava_save_loads_in_transformers_and_back(tmp_path, max_shard_size):
    ours = tiny_omni()
    ours.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_size == "100KB":
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"]
    hf, info = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    ids, pixels, mask = llava_batch(299, ours.config.image_seq_len, 300)
    ref = hf_llava_logits(hf.eval(), ids, pixels, mask)
    assert max_diff(our_logits(ours, ids, mask, pixels), ref, mask) <= TOL

    again = OmniModel.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert_same_weights(again, ours)
    assert torch.equal(our_logits(again, ids, mask, pixels), our_logits(ours, ids, mask, pixels))


ROPE_WRITES = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope", list(ROPE_WRITES))
def test_text_only_save_loads_in_transformers(tmp_path, rope):
    tied = rope == "linear"
    ours = tiny_omni(vision=False, rope_scaling=ROPE_WRITES[rope], tie_embeddings=tied)
    ours.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    hf, info = tf.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert hf.config.rope_parameters["rope_theta"] == 5000.0
    assert hf.config.rope_parameters["rope_type"] == (ROPE_WRITES[rope] or {"rope_type": "default"})["rope_type"]
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    ids, mask = text_batch(300, T=40)
    assert max_diff(our_logits(ours, ids, mask), hf_llama_logits(hf.eval(), ids, mask), mask) <= TOL

    again = OmniModel.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert (again.lm_head.weight is again.llm.embed_tokens.weight) == tied
    assert_same_weights(again, ours)


def test_saving_again_replaces_the_old_shards(tmp_path):
    ours = tiny_omni()
    ours.save_pretrained(tmp_path, max_shard_size=100_000)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_tokenizer_travels_with_the_model(tmp_path):
    from omnilm.data import Processor, train_tokenizer

    ours = tiny_omni(vision=False)
    tokenizer = train_tokenizer(["a red circle left of a blue square"] * 4, vocab_size=300)
    ours.save_pretrained(tmp_path)
    Processor.for_model(ours, tokenizer=tokenizer).save_pretrained(tmp_path)
    again = Processor.for_model(OmniModel.from_pretrained(tmp_path), tmp_path)
    text = "a blue circle"
    assert again.tokenizer.encode(text) == tokenizer.encode(text)
    with pytest.raises(OmniInputError, match="has no tokenizer.json"):
        Processor.for_model(ours, tmp_path / "elsewhere")


def test_saved_llava_folder_loads_as_a_transformers_processor(tmp_path):
    from PIL import Image

    from omnilm.data import Processor, train_tokenizer

    ours = tiny_omni()
    tokenizer = train_tokenizer(["what colour is the red circle"] * 4, vocab_size=300)
    with pytest.raises(OmniInputError, match="tokenizer's <image> is id 3 but the model's image_token_id is 299"):
        Processor.for_model(ours, tokenizer=tokenizer)
    ours.config.image_token_id = tokenizer.image_token_id
    ours.save_pretrained(tmp_path)
    Processor.for_model(ours, tokenizer=tokenizer).save_pretrained(tmp_path)
    theirs = tf.AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(theirs, tf.LlavaProcessor)
    images = [Image.new("RGB", (45, 37), "red"), Image.new("L", (20, 64), 90)]
    text = "USER: <image>\nwhat colour? <image>\nthe circle ASSISTANT:"
    mine = Processor.from_pretrained(tmp_path, ours.config.image_seq_len)(text, images)
    ref = theirs(text=text, images=images, return_tensors="pt")
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert (mine["input_ids"] == ours.config.image_token_id).sum() == 2 * ours.config.image_seq_len
    torch.testing.assert_close(mine["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


# --- 3. other layouts, shards, dtypes ----------------------------------------------------------

# The hub's llava-1.5 checkpoints (written by transformers 4.x) and the 4.52-4.57 names, made
# from the layout a fresh transformers 5 model writes (`vision_tower.embeddings...`).
LLAVA_LAYOUTS = {
    "transformers 4.x (hub)": [("vision_tower.", "vision_tower.vision_model.")],
    "transformers 4.52-4.57": [("vision_tower.", "model.vision_tower.vision_model."),
                               ("multi_modal_projector.", "model.multi_modal_projector."),
                               ("language_model.model.", "model.language_model."),
                               ("language_model.lm_head.", "lm_head.")],
}


def _rename_prefixes(rules):
    def change(sd):
        out = {}
        for k, v in sd.items():
            for old, new in rules:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        return out
    return change


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A transformers-saved tiny LLaVA and the model we load from it."""
    folder = tmp_path_factory.mktemp("llava")
    tiny_hf_model("llava").save_pretrained(folder)
    return folder, OmniModel.from_pretrained(folder)


def _copy(folder, dest):
    dest.mkdir(exist_ok=True)
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.mark.parametrize("layout", list(LLAVA_LAYOUTS))
def test_loads_older_llava_layouts(tmp_path, llava_folder, layout):
    folder, reference = llava_folder
    folder = _copy(folder, tmp_path / "m")
    rewrite_weights(folder, _rename_prefixes(LLAVA_LAYOUTS[layout]))
    assert_same_weights(OmniModel.from_pretrained(folder), reference)


def test_loads_transformers_in_memory_names(tmp_path, llava_folder):
    folder, reference = llava_folder
    folder = _copy(folder, tmp_path / "m")
    hf = tf.LlavaForConditionalGeneration.from_pretrained(folder)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "model.safetensors")
    assert_same_weights(OmniModel.from_pretrained(folder), reference)


def test_loads_sharded_transformers_checkpoint(tmp_path, llava_folder):
    _, reference = llava_folder
    tf.LlavaForConditionalGeneration.from_pretrained(llava_folder[0]).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_weights(OmniModel.from_pretrained(tmp_path), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_half_precision_weights(tmp_path, dtype):
    hf = tiny_hf_model("llava").to(dtype)
    hf.save_pretrained(tmp_path)
    hf_state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    fp32 = OmniModel.from_pretrained(tmp_path)  # default: float32, as transformers
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert torch.equal(fp32.llm.embed_tokens.weight, hf_state["language_model.embed_tokens.weight"].float())
    auto = OmniModel.from_pretrained(tmp_path, dtype="auto")  # keep the checkpoint's dtype
    assert {p.dtype for p in auto.parameters()} == {dtype}
    assert torch.equal(auto.vision.embeddings.class_embedding, hf_state["vision_tower.embeddings.class_embedding"])
    assert {p.dtype for p in OmniModel.from_pretrained(tmp_path, dtype="bfloat16").parameters()} == {torch.bfloat16}


def test_clip_layouts(tmp_path):
    hf = tiny_hf_model("clip")
    hf.save_pretrained(tmp_path / "v5")  # transformers 5 writes embeddings..., encoder.layers... (no vision_model.)
    reference = hfio.load_vision_encoder(tmp_path / "v5")
    # transformers 4.x CLIPVisionModel: the same under vision_model.
    v4 = _copy(tmp_path / "v5", tmp_path / "v4")
    rewrite_weights(v4, lambda sd: {"vision_model." + k: v for k, v in sd.items()})
    # A whole CLIPModel (model_type "clip"): its text side is skipped.
    clip_cfg = tf.CLIPConfig(vision_config=hf.config.to_dict(),
                             text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    full = tf.CLIPModel(clip_cfg)
    full.vision_model.load_state_dict(hf.state_dict())
    full.save_pretrained(tmp_path / "clip")
    for folder in (v4, tmp_path / "clip"):
        got = hfio.load_vision_encoder(folder)
        for k, v in reference.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), (folder, k)
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path / "clip"), "CLIP encoder", "load_vision_encoder")


def test_vision_encoder_of_a_llava_folder(llava_folder):
    folder, reference = llava_folder
    encoder = hfio.load_vision_encoder(folder)
    for k, v in reference.vision.state_dict().items():
        assert torch.equal(encoder.state_dict()[k], v)


# --- 4. parameter counts of the real architectures --------------------------------------------


@pytest.mark.parametrize("name, dim, n_layers, mlp_dim, expected", [
    ("llava-1.5-7b", 4096, 32, 11008, 7_063_427_072),  # llava-hf/llava-1.5-7b-hf
    ("llava-1.5-13b", 5120, 40, 13824, 13_351_494_656),  # llava-hf/llava-1.5-13b-hf
])
def test_preset_parameter_counts_match_transformers(name, dim, n_layers, mlp_dim, expected):
    # transformers' LLaVA-1.5, configured by hand (not through our conversion): Vicuna-v1.5 with
    # the padded 32064 vocabulary, CLIP ViT-L/14 at 336 px.
    text = tf.LlamaConfig(vocab_size=32064, hidden_size=dim, intermediate_size=mlp_dim, num_hidden_layers=n_layers,
                          num_attention_heads=dim // 128, max_position_embeddings=4096)
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 image_size=336, patch_size=14, projection_dim=768)
    with torch.device("meta"):
        hf = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text))
    n_hf = sum(p.numel() for p in hf.parameters())
    ours = OmniModel.from_preset(name, device="meta")
    assert ours.num_parameters() == n_hf == expected
    assert ours.config.image_seq_len == 576


# --- configs and key tables -------------------------------------------------------------------


@pytest.mark.parametrize("partial", [
    {"model_type": "llava"},
    {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064, "num_key_value_heads": 8},
     "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "num_attention_heads": 4}},
    {"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": True},
])
def test_partial_configs_read_as_transformers_completes_them(partial):
    # config.json may leave fields out: we must fill them as transformers does.
    completed = tf.AutoConfig.for_model(**partial).to_dict()
    assert hf_config.config_from_hf(partial) == hf_config.config_from_hf(completed)


def test_config_defaults_follow_transformers():
    # A llava config.json may omit vision_config and most text fields: transformers' defaults fill them.
    cfg = hf_config.config_from_hf({"model_type": "llava", "text_config": {"vocab_size": 32064}})
    assert (cfg.vision.dim, cfg.vision.n_layers, cfg.vision.image_size, cfg.vision.patch_size) == (1024, 24, 336, 14)
    assert (cfg.vision.act, cfg.vision.norm_eps, cfg.image_token_id, cfg.image_seq_len) == ("quick_gelu", 1e-5, 32000, 576)
    assert (cfg.text.dim, cfg.text.n_kv_heads, cfg.text.norm_eps, cfg.text.max_seq_len) == (4096, 32, 1e-6, 2048)
    # transformers 4.x rope fields, with the older "type" name
    t = hf_config.text_config_from_hf({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (t.rope_theta, t.rope_scaling) == (5e5, {"rope_type": "linear", "factor": 2.0})


@pytest.mark.parametrize("preset", ["tiny", "llava-1.5-7b"])
@pytest.mark.parametrize("rope", list(ROPE_WRITES))
def test_config_round_trip(preset, rope):
    cfg = OmniConfig.from_preset(preset, text=dict(rope_scaling=ROPE_WRITES[rope], rope_theta=1e6))
    d = hf_config.config_to_hf(cfg)
    back = hf_config.config_from_hf(d)
    back.vision.image_mean, back.vision.image_std = cfg.vision.image_mean, cfg.vision.image_std
    assert back == cfg
    text_only = OmniConfig(text=cfg.text, vision=None)
    assert hf_config.config_from_hf(hf_config.config_to_hf(text_only)).text == cfg.text


def test_key_tables_round_trip():
    for vision in (True, False):
        model = tiny_omni(vision=vision)
        kind = "llava" if vision else "llama"
        for name in model.state_dict():
            assert hfio.key_from_hf(hfio.key_to_hf(name, kind), kind) == name


# --- RoPE scaling parity ----------------------------------------------------------------------

ROPE_SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, 128),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 32),  # the 48-token batch outgrows 32
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, 128),
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path, kind):
    scaling, max_len = ROPE_SCALINGS[kind]
    hf = tiny_hf_model("llama", text=dict(rope_parameters={**scaling, "rope_theta": 5000.0}, max_position_embeddings=max_len))
    hf.save_pretrained(tmp_path)
    ours = OmniModel.from_pretrained(tmp_path)
    assert ours.config.text.rope_scaling["rope_type"] == kind and ours.config.text.rope_theta == 5000.0
    ids, mask = text_batch(300, T=48, pad=0)
    assert max_diff(our_logits(ours, ids, mask), hf_llama_logits(hf, ids, mask), mask) <= TOL


# --- 5. one-line errors -----------------------------------------------------------------------


@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "llama"
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    file = folder / "config.json"
    d = json.loads(file.read_text()) | changes
    file.write_text(json.dumps(d))


def test_truncated_safetensors(tmp_path):
    tiny_omni().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    os.truncate(file, file.stat().st_size // 2)
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path), "model.safetensors", "truncated or corrupt", "again")


def test_config_that_does_not_match_the_weights(llama_folder):
    _edit_config(llama_folder, hidden_size=32, head_dim=8)
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "config.json does not match the weights",
                   "llm.embed_tokens.weight", "(300, 64) in the checkpoint", "implies (300, 32)")


def test_config_with_more_or_fewer_layers(llama_folder):
    _edit_config(llama_folder, num_hidden_layers=3)
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "missing", "llm.layers.2.")
    _edit_config(llama_folder, num_hidden_layers=1)
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "unexpected", "model.layers.1.")


def test_missing_and_unexpected_weights(llama_folder):
    rewrite_weights(llama_folder, lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"})
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "missing 1 weight(s)", "llm.norm.weight")
    rewrite_weights(llama_folder, lambda sd: sd | {"model.norm.weight": torch.ones(64), "model.extra.weight": torch.ones(2)})
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "1 unexpected weight(s)", "model.extra.weight")


def test_pickle_only_folder_is_refused(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    (llama_folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "pytorch_model.bin", "safetensors only")


def test_folder_errors(tmp_path, llama_folder):
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path / "nope"), "no such folder")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path / "empty"), "no config.json")
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder / "model.safetensors"), "is a file")
    (llama_folder / "model.safetensors").rename(llama_folder / "model-00001-of-00002.safetensors")
    (llama_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "model-00002-of-00002.safetensors", "incomplete")
    _edit_config(llama_folder, model_type="mistral")
    one_line_error(lambda: OmniModel.from_pretrained(llama_folder), "model_type 'mistral'")


def test_unsupported_llava_configs():
    one_line_error(lambda: hf_config.config_from_hf({"model_type": "llava", "vision_feature_layer": [-2, -5]}),
                   "vision_feature_layer=[-2, -5]", "takes one")
    one_line_error(lambda: hf_config.config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "longrope"}}),
                   "'longrope'")
    one_line_error(lambda: hf_config.config_from_hf({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}),
                   "n_kv_heads=4")
    one_line_error(lambda: hfio.parse_size("5 parsecs"), "max_shard_size")
    assert hfio.parse_size("500MB") == 500 * 10**6 and hfio.parse_size("2GiB") == 2 * 2**30



def test_config_json_errors_name_the_key():
    # A field is reported under the key config.json spells, inside its section.
    one_line_error(lambda: hf_config.config_from_hf({"model_type": "llava", "text_config": {"hidden_size": "64"}}),
                   "text_config.hidden_size='64'", "must be an integer")
    one_line_error(lambda: hf_config.config_from_hf({"model_type": "llama", "num_key_value_heads": 0}),
                   "config.json: num_key_value_heads=0")
    one_line_error(lambda: hf_config.config_from_hf({"model_type": "llava", "vision_config": {"image_size": 8}}),
                   "vision_config.image_size=8", "patch_size=32")
    one_line_error(lambda: hf_config.config_from_hf([1]), "the config is [1]")


def test_tokenizer_ids_must_fit_the_embedding():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    from omnilm.data import Processor, Tokenizer

    # A LLaMA tokenizer gains <image> as its last id, one past a text-only model's embedding: it fits,
    # since the processor refuses that id without images; any other id past the embedding does not.
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["a red circle"] * 4, trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = Tokenizer(backend, pad_token="<pad>")
    n = tokenizer.vocab_size
    assert tokenizer.image_token_id == n - 1
    text = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    for vision, image_token_id in ((None, 32000), (dict(image_size=32, patch_size=16, dim=32, n_layers=1, n_heads=4,
                                                         mlp_dim=64), n - 1)):
        fits = OmniConfig(text=dict(text, vocab_size=n - 1), vision=vision, image_token_id=image_token_id)
        Processor.for_model(fits, tokenizer=tokenizer)
        small = OmniConfig(text=dict(text, vocab_size=n - 2), vision=vision, image_token_id=image_token_id)
        one_line_error(lambda: Processor.for_model(small, tokenizer=tokenizer), f"the tokenizer has {n} tokens",
                       f"embeds {n - 2}")
