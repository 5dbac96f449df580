"""LoRA against peft: an omnilm adapter loads with `PeftModel.from_pretrained` onto transformers'
LLaVA with the same logits, a peft-made adapter loads into omnilm with the same logits, merging
changes nothing, and only the adapter (and the projector, trained in full) gets gradients."""

import pytest
import torch
from conftest import cli_error, one_line_error, run_cli, tiny_hf_model

from omnilm import OmniModel
from omnilm.train.lora import LoraSettings, apply_lora, load_adapter, lora_trainable, merge_lora, save_adapter

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IMAGE_ID, IMAGE_TOKENS = 299, 16  # tiny_hf_configs: the last id, (32 px / 8 px patches) ** 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "base"
    tiny_hf_model("llava").save_pretrained(folder)
    return folder


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (2, 30), generator=g)
    ids[0, 3:3 + IMAGE_TOKENS] = IMAGE_ID
    ids[1, 10:10 + IMAGE_TOKENS] = IMAGE_ID
    return dict(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32, generator=g))


def ours_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"]).logits


def theirs_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trained_adapter(model, settings: LoraSettings) -> None:
    """What training would leave: every LoRA B nonzero, the projector moved."""
    apply_lora(model, settings)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or name.startswith("projector."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft_with_the_same_logits(base, tmp_path, rslora):
    ours = OmniModel.from_pretrained(base).eval()
    settings = LoraSettings(lora_r=8, lora_alpha=16, lora_rslora=rslora)
    trained_adapter(ours, settings)
    save_adapter(ours, tmp_path / "adapter", full=("projector",), base_model=str(base))
    theirs = peft.PeftModel.from_pretrained(tf.LlavaForConditionalGeneration.from_pretrained(base).eval(),
                                            tmp_path / "adapter").eval()
    batch = inputs()
    reference = theirs_logits(tf.LlavaForConditionalGeneration.from_pretrained(base).eval(), batch)
    assert (ours_logits(ours, batch) - reference).abs().max() > 1e-2  # the adapter changes the answer
    torch.testing.assert_close(ours_logits(ours, batch), theirs_logits(theirs, batch), rtol=0, atol=1e-5)


def test_a_peft_adapter_loads_into_omnilm_with_the_same_logits_and_merges(base, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
                             modules_to_save=["multi_modal_projector"], init_lora_weights=False)
    theirs = peft.get_peft_model(tf.LlavaForConditionalGeneration.from_pretrained(base), config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = OmniModel.from_pretrained(base).eval()
    settings = load_adapter(ours, tmp_path / "adapter")
    assert (settings.lora_r, settings.lora_alpha) == (4, 12)
    batch = inputs(1)
    unmerged = ours_logits(ours, batch)
    torch.testing.assert_close(unmerged, theirs_logits(theirs, batch), rtol=0, atol=1e-5)
    merge_lora(ours)
    assert not any(".lora_" in name for name, _ in ours.named_parameters())
    torch.testing.assert_close(ours_logits(ours, batch), unmerged, rtol=0, atol=1e-5)


def test_only_the_adapter_and_the_projector_get_gradients(base):
    model = OmniModel.from_pretrained(base)
    wrapped = apply_lora(model, LoraSettings(lora_r=4))
    assert len(wrapped) == 2 * 7 and all(name.startswith("llm.layers.") for name in wrapped)
    lora_trainable(model, full=("projector",))
    batch = inputs()
    model(batch["input_ids"], batch["pixel_values"], labels=batch["input_ids"]).loss.backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got == {name for name, _ in model.named_parameters() if ".lora_" in name or name.startswith("projector.")}
    moved = {name for name in got if model.get_parameter(name).grad.abs().sum() > 0}
    # B starts at zero, so A's first gradient is zero too; B's and the projector's are not.
    assert any(".lora_B." in n for n in moved) and any(n.startswith("projector.") for n in moved)


def test_trainable_parameters_equal_peft_count(base):
    ours = OmniModel.from_pretrained(base)
    apply_lora(ours, LoraSettings(lora_r=8))
    lora_trainable(ours)
    theirs = peft.get_peft_model(tf.LlavaForConditionalGeneration.from_pretrained(base), peft.LoraConfig(
        r=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable


def test_bad_settings_and_folders_are_one_line_errors(base, tmp_path):
    model = OmniModel.from_pretrained(base)
    one_line_error(lambda: apply_lora(model, LoraSettings(lora_r=4, lora_targets=r"nothing\.here")), "matches no linear")
    one_line_error(lambda: LoraSettings(lora_r=-1), "--lora-r")
    one_line_error(lambda: LoraSettings(lora_targets="(unclosed"), "not a regular expression")
    one_line_error(lambda: load_adapter(model, tmp_path), "no adapter_config.json")


def test_info_counts_the_lora_parameters_of_the_7b_preset(capsys):
    """r (in + out) per targeted layer: LLaVA-1.5-7B's 32 layers, q k v o of 4096 x 4096, gate and up
    4096 -> 11008, down back (what peft counts for the same targets)."""
    code, out, err = run_cli(["info", "--preset", "llava-1.5-7b", "--lora-r", "128"], capsys)
    r, d, f = 128, 4096, 11008
    expected = 32 * (4 * r * (d + d) + 3 * r * (d + f))
    assert code == 0 and f"224 linear layers: {expected:,} LoRA parameters" in out, out + err


def test_merge_lora_writes_a_model_transformers_loads_with_the_adapters_logits(base, tmp_path, capsys):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|up_proj)",
                             init_lora_weights=False)
    theirs = peft.get_peft_model(tf.LlavaForConditionalGeneration.from_pretrained(base), config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    code, out, err = run_cli(["merge-lora", base, tmp_path / "adapter", tmp_path / "merged"], capsys)
    assert code == 0 and "merged into 4 layers" in out, err
    merged = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    batch = inputs(2)
    torch.testing.assert_close(theirs_logits(merged, batch), theirs_logits(theirs, batch), rtol=0, atol=1e-5)
    capsys.readouterr()  # transformers' progress bars so far
    code, _, err = run_cli(["merge-lora", base, tmp_path, tmp_path / "again"], capsys)
    cli_error(code, err, "no adapter_config.json")
