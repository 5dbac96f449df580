"""int8 weight-only quantisation (omnilm.model.quantize, `omnilm quantize`): the int8 layers equal
their dequantised float twins on both paths (PyTorch's kernel and the matmul), a quantised model's
logits stay within 2% of the float model's, the weights file is at most 0.3x the float one (the
demo's shape, with its vision tower, by default; LLaVA-1.5-7B's and Mixtral's shapes), a saved int8
model loads back to identical logits, the serving engine answers with it as `generate` does, and bad
input gets one line."""

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import cli_error, one_line_error, run_cli, tiny_checkpoint
from omnilm import OmniModel
from omnilm.data import Processor
from omnilm.data.shapeworld import write_shapeworld
from omnilm.infer import generate
from omnilm.model.moe import Experts
from omnilm.model.quantize import (KERNEL_MAX_ROWS, Int8Conv2d, Int8Embedding, Int8Experts, Int8Linear,
                                   _kernel_fits, quantize_int8, quantize_rows)
from omnilm.serve.engine import Engine, SamplingParams

DEMO_SHAPED = dict(text=dict(n_layers=2))  # the tiny preset with the demo's 2 decoder layers


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm())


def weight_bytes(model: torch.nn.Module) -> int:
    """What save_pretrained writes, counted from the shapes: each tensor once (a tied head is the embedding)."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_quantize_rows_is_symmetric_per_row_within_half_a_step():
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[5] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (48,)
    assert torch.equal(q[5], torch.zeros_like(q[5])) and scale[5] == 0
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS, 3 * KERNEL_MAX_ROWS])
def test_int8_linear_equals_its_dequantised_twin(dtype, rows):
    """Both paths (the CPU kernel serves bf16 at few rows, the matmul the rest) compute x @ (q s)^T + b."""
    linear = torch.nn.Linear(64, 96).to(dtype)
    int8 = Int8Linear(*quantize_rows(linear.weight), linear.bias)
    x = torch.randn(rows, 2, 64, dtype=dtype)[:, 0]  # rows apart in memory, as a slice of a batch
    assert _kernel_fits(x) == (dtype == torch.bfloat16 and rows <= KERNEL_MAX_ROWS)
    dequantised = int8.weight.float() * int8.scale.float()[:, None]
    expected = F.linear(x.float(), dequantised, linear.bias.float())
    assert relative_error(int8(x), expected) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert int8(x).dtype == dtype and relative_error(int8(x), linear(x)) < 0.02


def test_int8_linear_gives_gradients_to_its_input():
    """The kernel has no backward: an input that needs a gradient takes the matmul."""
    int8 = Int8Linear(*quantize_rows(torch.randn(8, 16)), None).to(torch.bfloat16)
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    int8(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_conv_equals_its_dequantised_twin(dtype):
    """Each output channel's kernel is a row: the scale factors out of the convolution."""
    conv = torch.nn.Conv2d(3, 16, 8, stride=4, padding=2).to(dtype)
    q, scale = quantize_rows(conv.weight.flatten(1))
    int8 = Int8Conv2d(conv, q.view(conv.weight.shape), scale)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    dequantised = int8.weight.float() * int8.scale.float()[:, None, None, None]
    expected = F.conv2d(x.float(), dequantised, conv.bias.float(), stride=4, padding=2)
    assert relative_error(int8(x), expected) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert int8(x).dtype == dtype and relative_error(int8(x), conv(x)) < 0.02


def test_int8_experts_equal_their_dequantised_twin():
    torch.manual_seed(0)
    experts = Experts(4, 32, 48)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    int8 = Int8Experts(experts)
    dequantised = copy.deepcopy(experts)
    with torch.no_grad():
        dequantised.gate_up_proj.copy_(int8.gate_up_proj * int8.gate_up_scale[..., None])
        dequantised.down_proj.copy_(int8.down_proj * int8.down_scale[..., None])
    counts = torch.tensor([3, 0, 1, 2])  # an idle expert is skipped
    x = torch.randn(6, 32)
    assert relative_error(int8(x, counts), dequantised(x, counts)) < 1e-6
    assert relative_error(int8(x, counts), experts(x, counts)) < 0.02


@pytest.mark.parametrize("fusion", ["joint", "early"])
def test_logits_stay_within_two_percent(fusion):
    """By default every part: early fusion's projector (its patch embedding) reads raw pixels."""
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", **DEMO_SHAPED, fusion=fusion).eval()
    ids = torch.randint(4, 500, (2, 24))
    ids[:, 1:1 + model.config.image_seq_len] = model.config.image_token_id
    pixels = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ref = model(ids, pixels).logits
        int8 = quantize_int8(copy.deepcopy(model))
        assert relative_error(int8(ids, pixels).logits, ref) < 0.02
    assert isinstance(int8.llm.embed_tokens, Int8Embedding)
    if fusion == "joint":
        assert isinstance(int8.vision.embeddings.patch_embedding, Int8Conv2d)
        assert isinstance(int8.vision.layers[0].mlp.fc1, Int8Linear) and isinstance(int8.projector.fc1, Int8Linear)
    else:
        assert isinstance(int8.projector.proj, Int8Linear)


def test_the_demo_shaped_model_is_under_0_3x_by_default_and_loads_back_identical(tmp_path):
    """Its ViT's patch convolution (590 K of 4.2 M parameters) and projector are quantised too: left
    float, they would hold the file at 0.38x."""
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", **DEMO_SHAPED).eval()
    model.save_pretrained(tmp_path / "float")
    int8 = quantize_int8(model)
    assert int8.config.quantization.modules == ["llm", "lm_head", "vision", "projector"]
    int8.save_pretrained(tmp_path / "int8")
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("float", "int8")}
    assert size["int8"] <= 0.3 * size["float"], size
    back = OmniModel.from_pretrained(tmp_path / "int8")
    assert isinstance(back.vision.embeddings.patch_embedding, Int8Conv2d)
    ids = torch.randint(4, 500, (2, 24))
    ids[:, 1:10] = model.config.image_token_id
    pixels = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(back(ids, pixels).logits, int8(ids, pixels).logits)


@pytest.mark.parametrize("tie", [False, True])
def test_saved_int8_model_is_under_0_3x_and_loads_back_identical(tmp_path, tie):
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", vision=None, text=dict(n_layers=2, tie_embeddings=tie)).eval()
    model.save_pretrained(tmp_path / "float")
    int8 = quantize_int8(copy.deepcopy(model))
    int8.save_pretrained(tmp_path / "int8")
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("float", "int8")}
    assert size["int8"] <= 0.3 * size["float"], size
    assert not (tmp_path / "int8" / "config.json").exists()  # transformers could not read it
    back = OmniModel.from_pretrained(tmp_path / "int8")
    assert back.config.quantization == int8.config.quantization and isinstance(back.lm_head, Int8Linear)
    assert (back.lm_head.weight is back.llm.embed_tokens.weight) == tie
    ids = torch.randint(4, 500, (2, 12))
    with torch.inference_mode():
        assert torch.equal(back(ids).logits, int8(ids).logits)
        assert torch.equal(generate(back, ids, max_new_tokens=4), generate(int8, ids, max_new_tokens=4))
    bf16 = OmniModel.from_pretrained(tmp_path / "int8", dtype="bfloat16")  # the CPU kernel's dtype
    with torch.inference_mode():
        assert relative_error(bf16(ids).logits, model(ids).logits) < 0.05


@pytest.mark.parametrize("preset, modules", [("llava-1.5-7b", ["llm", "lm_head"]),
                                             ("llava-1.5-7b", None),
                                             ("mixtral-8x7b", ["llm", "lm_head"])])
def test_real_shapes_shrink_under_0_3x(preset, modules):
    """Counted on the meta device: the token embedding, routed experts and vision tower included."""
    model = OmniModel.from_preset(preset, device="meta")
    float_bytes = weight_bytes(model)
    assert weight_bytes(quantize_int8(model, modules)) <= 0.3 * float_bytes


def test_moe_model_round_trips(tmp_path):
    torch.manual_seed(0)
    int8 = quantize_int8(OmniModel.from_preset("tiny-moe", vision=None, text=dict(n_layers=2)).eval())
    assert type(int8.llm.layers[0].mlp.gate) is torch.nn.Linear  # the router stays float
    int8.save_pretrained(tmp_path)
    ids = torch.randint(4, 500, (2, 12))
    with torch.inference_mode():
        assert torch.equal(OmniModel.from_pretrained(tmp_path)(ids).logits, int8(ids).logits)


def test_quantize_refuses_in_one_line():
    model = OmniModel.from_preset("tiny", vision=None, text=dict(n_layers=1, tie_embeddings=True))
    one_line_error(lambda: quantize_int8(model, ["vision"]), "'vision'", "no vision encoder")
    one_line_error(lambda: quantize_int8(model, ["llm", "projector"]), "'projector'", "no projector")
    one_line_error(lambda: quantize_int8(model, ["llm", "connector"]), "quantization.modules")
    one_line_error(lambda: quantize_int8(model, ["llm"]), "'llm' and 'lm_head'", "tie_embeddings")
    quantize_int8(model)
    one_line_error(lambda: quantize_int8(model), "quantised already")


def test_a_checkpoint_that_disagrees_with_its_quantization_is_refused_in_one_line(tmp_path):
    float_model = OmniModel.from_preset("tiny", vision=None, text=dict(n_layers=1))
    float_model.save_pretrained(tmp_path / "float")
    quantize_int8(copy.deepcopy(float_model)).save_pretrained(tmp_path / "int8")
    config = (tmp_path / "int8" / "omnilm.json").read_text()
    (tmp_path / "int8" / "omnilm.json").write_text(config.replace('"method": "int8"', '"method": "int4"'))
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path / "int8"), "quantization.method='int4'")
    (tmp_path / "float" / "omnilm.json").write_text(config)  # says int8, holds float weights
    one_line_error(lambda: OmniModel.from_pretrained(tmp_path / "float"), "missing", "scale")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    tiny_checkpoint(root / "model")
    write_shapeworld(root / "data", 2, seed=0, split="test", progress=False)
    return root


def test_cli_quantize_writes_a_checkpoint_that_chat_loads(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    code, out, err = run_cli(["quantize", "model", "int8", "--int8"], capsys)
    assert code == 0 and err == "" and out.startswith("wrote int8: int8 weights in llm, lm_head, vision, projector")
    assert {"model.safetensors", "omnilm.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"} \
        <= {p.name for p in (world / "int8").iterdir()}
    assert OmniModel.from_pretrained(world / "int8").config.quantization.modules == ["llm", "lm_head", "vision",
                                                                                     "projector"]
    code, out, err = run_cli(["chat", "int8", "--image", "data/images/test_000000.png", "--max-new-tokens", "3",
                              "What colour is the circle?"], capsys)
    assert code == 0 and err == "" and out.strip(), (out, err)


def test_the_engine_serves_an_int8_model_as_generate_answers_alone(world):
    model = quantize_int8(OmniModel.from_pretrained(world / "model"))
    processor = Processor.for_model(model, world / "model")
    image = Image.new("RGB", (40, 40), "red")
    chats = [[{"role": "user", "content": [{"type": "image", "image": image}] * (i % 2) +
               [{"type": "text", "text": "What colour is the circle? " * (1 + i)}]}] for i in range(6)]
    batches = [processor(chat) for chat in chats]
    expected = [generate(model, b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=6,
                         stop_token_ids=[])[0].tolist() for b in batches]
    engine = Engine(model, processor.tokenizer, max_batch=4)
    ids = {engine.add_request(b["input_ids"][0].tolist(), b["pixel_values"],
                              SamplingParams(max_tokens=6, ignore_eos=True)): i for i, b in enumerate(batches)}
    got = [[] for _ in chats]
    while engine.has_work():
        for out in engine.step():
            got[ids[out.request_id]] += out.token_ids
    assert got == expected


@pytest.mark.parametrize("argv, phrase", [
    (["quantize", "missing", "out", "--int8"], "no such folder"),
    (["quantize", "model", "out"], "--int8"),
    (["quantize", "model", "model", "--int8"], "OUT is the checkpoint"),
    (["quantize", "model", "out", "--int8", "--modules", "llm,audio"], "no audio encoder"),
    (["quantize", "int8", "again", "--int8"], "quantised already"),
    (["train", "--stage", "instruct", "--init", "int8", "--data", "data/test.json", "--image-folder", "data",
      "--out", "never"], "do not train"),
])
def test_cli_refuses_in_one_line(world, capsys, monkeypatch, argv, phrase):
    monkeypatch.chdir(world)
    if not (world / "int8").exists():
        run_cli(["quantize", "model", "int8", "--int8"], capsys)
    code, _, err = run_cli(argv, capsys)
    cli_error(code, err, phrase)
    assert not (world / "out").exists() and not (world / "again").exists()
