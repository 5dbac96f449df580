"""Cost accounting: FLOPs from the architecture against torch's FlopCounterMode, the measured matmul
peak, the energy meters (a fake RAPL tree, a fake NVML) and what `omnilm train` and `omnilm eval`
report."""

import json
import sys
import types

import pytest
import torch
from conftest import one_line_error, run_cli, tiny_checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import omnilm.cost as cost
import omnilm.model.moe as moe
from omnilm import OmniModel
from omnilm.config import OmniConfig
from omnilm.cost import EnergyMeter, describe_cost, matmul_peak, measure_matmul_peak
from omnilm.infer import generate
from omnilm.model.flops import (batch_flops, batch_generate_flops, flops_per_token, forward_flops, generate_flops,
                                trained_shares, training_flops)

AUDIO = dict(n_mels=16, dim=64, n_layers=2, n_heads=4, mlp_dim=128, max_source_positions=40)
SMALL = dict(text=dict(n_layers=2), vision=dict(n_layers=2))
MODELS = {  # each fusion mode, dense and sparse decoders, video and audio; every one counted whole
    "dense": dict(preset="tiny", vision=None),
    "moe": dict(preset="tiny-moe", text=dict(n_layers=2, n_shared_experts=1)),
    "joint": dict(preset="tiny", **SMALL),
    "joint-full-last-layer": dict(preset="tiny", **SMALL, vision_feature_select="full", vision_feature_layer=-1),
    "early": dict(preset="tiny", **SMALL, fusion="early"),
    "late": dict(preset="tiny", **SMALL, fusion="late"),
    "cross_attention": dict(preset="tiny", **SMALL, fusion="cross_attention", attend="all"),
    "video": dict(preset="tiny", text=dict(n_layers=2, token_conv=3), vision=dict(n_layers=2, patch_size=16),
                  video_token_id=4, video_pool_mode="concat"),
    "audio": dict(preset="tiny", **SMALL, audio=AUDIO, audio_token_id=5),
}


@pytest.fixture(autouse=True)
def counted(monkeypatch):
    """What FlopCounterMode can count: SDPA's math kernel (it has no formula for the CPU's flash
    kernel) and the experts one matmul each (nor for torch._grouped_mm)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(moe, "_grouped_mm_works", lambda *_: False)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.set_num_threads(threads)


def build(name: str) -> tuple[OmniModel, torch.Tensor, dict, tuple[int, int, int]]:
    """A model, a 40-token sequence with two images (or three video frames, two audio windows) at
    its markers, the media, and their counts."""
    kw = dict(MODELS[name])
    torch.manual_seed(0)
    model = OmniModel.from_preset(kw.pop("preset"), **kw)
    c = model.config
    ids = torch.randint(10, 400, (1, 40))
    size = c.vision.image_size if c.vision is not None else 0
    if name == "video":
        ids[0, 1:1 + 3 * c.video_frame_len] = c.video_token_id
        return model, ids, dict(pixel_values_videos=torch.randn(1, 3, 3, size, size)), (0, 3, 0)
    if name == "audio":
        ids[0, 1:1 + 2 * c.audio_seq_len] = c.audio_token_id
        return model, ids, dict(input_features=torch.randn(2, AUDIO["n_mels"], c.audio.window_frames)), (0, 0, 2)
    if c.vision is None:
        return model, ids, {}, (0, 0, 0)
    L = c.image_seq_len
    ids[0, 2:2 + L] = ids[0, 4 + L:4 + 2 * L] = c.image_token_id
    return model, ids, dict(pixel_values=torch.randn(2, 3, size, size)), (2, 0, 0)


def flop_count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", MODELS)
def test_forward_flops_are_what_flop_counter_counts(name):
    model, ids, media, counts = build(name)
    counted = flop_count(lambda: model.eval()(ids, **media))
    assert forward_flops(model.config, ids.shape[1], *counts).forward == pytest.approx(counted, rel=0.01)
    assert batch_flops(model.config, ids).forward == pytest.approx(counted, rel=0.01)  # media from the markers


@pytest.mark.parametrize("name, trains", [
    ("dense", "all"), ("joint", "all"), ("joint", "all but vision"), ("joint", "projector"), ("moe", "all"),
    ("late", "projector"),  # the gradient reaches the pooled images, not the decoder: late fusion's text path
    ("cross_attention", "all but vision"),
])
def test_training_step_flops_follow_what_trains(name, trains):
    model, ids, media, _ = build(name)
    model.train()
    if trains == "all but vision":
        model.vision.requires_grad_(False)
    elif trains == "projector":
        model.requires_grad_(False)
        (model.projector or model.fusion.pool).requires_grad_(True)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    counted = flop_count(lambda: model(ids, labels=labels, loss_only=True, **media).loss.backward())
    targets = int((labels[:, 1:] != -100).sum())
    assert training_flops(model, ids, n_logits=targets) == pytest.approx(counted, rel=0.01)
    if name == "dense":  # nothing before the embedding: every product's backward is twice its forward
        assert counted == 3 * flop_count(lambda: model(ids, labels=labels, loss_only=True))


@pytest.mark.parametrize("name", ["joint", "late", "cross_attention", "moe"])
def test_generation_flops_count_prefill_and_each_decoding_step(name):
    model, ids, media, (n_images, _, _) = build(name)
    model.eval().requires_grad_(False)
    counted = flop_count(lambda: generate(model, ids, max_new_tokens=5, stop_token_ids=[], **media))
    assert generate_flops(model.config, ids.shape[1], 5, n_images).forward == pytest.approx(counted, rel=0.01)


def test_a_batch_generation_counts_each_row_alone_at_its_length():
    """Two prompts, one with two images, one left-padded text: the FLOPs of each row's own generation
    (its padding and the steps it idles after stopping left out)."""
    model, ids, media, _ = build("joint")
    model.eval().requires_grad_(False)
    short = torch.randint(10, 400, (1, 20))
    alone = flop_count(lambda: generate(model, ids, max_new_tokens=5, stop_token_ids=[], **media))
    alone += flop_count(lambda: generate(model, short, max_new_tokens=3, stop_token_ids=[]))
    batch = torch.cat([ids, torch.cat([torch.zeros(1, 20, dtype=torch.long), short], 1)])
    mask = (torch.arange(40) >= torch.tensor([[0], [20]])).long()
    assert batch_generate_flops(model.config, batch, mask, [5, 3]).forward == pytest.approx(alone, rel=0.01)


def test_per_token_flops_grow_with_the_sequence_and_count_only_active_experts():
    dense = OmniConfig.from_preset("tiny", vision=None)
    t = dense.text
    # Attention's scores and values: 4 H hd S more per token and layer for S more keys.
    growth = flops_per_token(dense, 200) - flops_per_token(dense, 100)
    assert growth == pytest.approx(4 * t.n_layers * t.n_heads * t.head_dim * 100)
    assert flops_per_token(dense, 100, training=True) == 3 * flops_per_token(dense, 100)
    # tiny-moe's 8 experts of width 344, 2 a token: the dense MLP's 688, plus the router's 2 D E.
    sparse = OmniConfig.from_preset("tiny-moe", vision=None)
    router = 2 * t.dim * sparse.text.n_experts * t.n_layers
    assert flops_per_token(sparse, 100) == pytest.approx(flops_per_token(dense, 100) + router)


def test_trained_shares_and_wrong_counts():
    model, *_ = build("joint")
    model.vision.requires_grad_(False)
    model.llm.layers[0].requires_grad_(False)
    shares = trained_shares(model)
    assert shares["encoders"] == 0 and shares["connector"] == shares["head"] == 1 and 0 < shares["decoder"] < 1
    text_only = OmniConfig.from_preset("tiny", vision=None)
    one_line_error(lambda: forward_flops(text_only, 10, n_images=1), "no vision tower")
    one_line_error(lambda: forward_flops(text_only, -1), "seq_len=-1", ">= 0")
    one_line_error(lambda: forward_flops(model.config, 10, n_windows=1), "takes no audio")


# --- the matmul peak ------------------------------------------------------------------------------


def test_matmul_peak_is_measured_once_per_dtype_and_thread_count(monkeypatch):
    rate = measure_matmul_peak("cpu", torch.float32, seconds=0.05)
    assert 1e8 < rate < 1e14  # at least 0.1 GFLOP/s, at most 100 TFLOP/s from one CPU thread
    calls = []
    monkeypatch.setattr(cost, "measure_matmul_peak", lambda *a: calls.append(a) or 1e9)
    cost._peak.cache_clear()
    assert matmul_peak("cpu") == matmul_peak("cpu") == 1e9 and len(calls) == 1
    cost._peak.cache_clear()


# --- energy ---------------------------------------------------------------------------------------


def write_domain(root, name: str, kind: str, uj: int, max_uj: int = 1_000_000_000):
    domain = root / name
    domain.mkdir(exist_ok=True)
    (domain / "name").write_text(kind + "\n")
    (domain / "energy_uj").write_text(f"{uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_adds_package_domains_only_and_sees_a_wrap(tmp_path):
    write_domain(tmp_path, "intel-rapl:0", "package-0", 999_000_000)  # 1 J before its wrap
    write_domain(tmp_path, "intel-rapl:0:0", "core", 5_000_000)  # a part of package 0: not again
    write_domain(tmp_path, "intel-rapl:1", "package-1", 10_000_000)
    write_domain(tmp_path, "intel-rapl:2", "psys", 0)  # the platform: it holds the packages
    write_domain(tmp_path, "intel-rapl-mmio:0", "package-0", 0)  # package 0 again, through MMIO
    meter = EnergyMeter.for_device("cpu", rapl_root=tmp_path)
    assert meter.method == "rapl" and "2 CPU package(s)" in meter.note
    write_domain(tmp_path, "intel-rapl:0", "package-0", 2_000_000)  # wrapped: 1 J + 2 J
    write_domain(tmp_path, "intel-rapl:0:0", "core", 9_000_000)
    write_domain(tmp_path, "intel-rapl:1", "package-1", 14_500_000)  # 4.5 J
    write_domain(tmp_path, "intel-rapl:2", "psys", 50_000_000)
    assert meter.poll() == pytest.approx(7.5)
    write_domain(tmp_path, "intel-rapl:1", "package-1", 15_000_000)
    assert meter.poll() == pytest.approx(8.0)


def test_unreadable_rapl_falls_back_to_an_estimate_that_names_its_constant(tmp_path, monkeypatch):
    write_domain(tmp_path, "intel-rapl:0", "package-0", 0)
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir()  # unreadable (as root, a mode would not be)
    monkeypatch.setattr(cost.time, "process_time", iter([100.0, 103.5]).__next__)
    meter = EnergyMeter.for_device("cpu", rapl_root=tmp_path)
    assert meter.method == "estimate" and f"{cost.CPU_WATTS_PER_CORE:g} W per busy CPU core" in meter.note
    assert meter.poll() == pytest.approx(3.5 * cost.CPU_WATTS_PER_CORE)


def fake_nvml(readings_mj: list[int], supported: bool = True) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def energy(handle):
        assert handle == "gpu-1"
        if not supported:
            raise NVMLError("Not Supported")
        return readings_mj.pop(0)

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"gpu-{i}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    return nvml


def test_nvml_reads_millijoules_of_its_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([5_000_000, 5_250_500, 5_400_000]))
    meter = EnergyMeter.nvml(1)
    assert meter.method == "nvml"
    assert meter.poll() == pytest.approx(250.5)
    assert meter.poll() == pytest.approx(400.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], supported=False))  # before Volta
    assert EnergyMeter.nvml(1) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert EnergyMeter.nvml(1) is None


# --- what a training run reports ------------------------------------------------------------------


def test_train_prints_and_writes_mfu_and_joules_per_token(tmp_path, capsys):
    from omnilm.data import train_tokenizer
    from omnilm.data.shapeworld import write_shapeworld
    from omnilm.train.stages import corpus

    train_json = write_shapeworld(tmp_path, 8, seed=0, split="train")
    train_tokenizer(corpus(train_json), vocab_size=300).save(tmp_path / "tokenizer")
    config = dict(text=dict(n_layers=1, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128),
                  vision=dict(n_layers=1, dim=64, n_heads=4, mlp_dim=128))
    code, out, err = run_cli(["train", "--stage", "instruct", "--data", train_json, "--image-folder", tmp_path,
                              "--out", tmp_path / "run", "--tokenizer", tmp_path / "tokenizer", "--steps", 2,
                              "--batch-size", 4, "--no-progress", "--no-bf16", "--config", json.dumps(config)], capsys)
    assert code == 0, err
    spent = json.loads((tmp_path / "run" / "cost.json").read_text())
    assert spent["peak_dtype"] == "float32" and spent["energy_method"] in ("rapl", "estimate")
    assert 0 < spent["mfu"] < 1
    assert spent["mfu"] == pytest.approx(spent["flops"] / spent["step_seconds"] / spent["peak_flops"], rel=0.02)
    assert spent["joules_per_token"] > 0
    assert f"cost ({tmp_path / 'run' / 'cost.json'}): {describe_cost(spent)}" in out
    assert "MFU" in out and "J/token" in out


def test_eval_prints_and_writes_mfu_and_joules_per_token(tmp_path, capsys):
    from omnilm.data.shapeworld import write_shapeworld

    tiny_checkpoint(tmp_path / "model", max_seq_len=1024)  # room for the multi-turn records
    test_json = write_shapeworld(tmp_path / "data", 6, seed=0, split="test", progress=False)
    code, out, err = run_cli(["eval", tmp_path / "model", "--data", test_json, "--image-folder", tmp_path / "data",
                              "--batch-size", 4, "--json", tmp_path / "eval.json"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "eval.json").read_text())
    spent, config = summary["cost"], OmniModel.from_pretrained(tmp_path / "model").config
    assert spent["peak_dtype"] == "float32" and spent["energy_method"] in ("rapl", "estimate")
    assert 0 < spent["mfu"] < 1
    assert spent["mfu"] == pytest.approx(spent["flops"] / spent["step_seconds"] / spent["peak_flops"], rel=0.02)
    # Each question's prompt holds its image and a few words at least, and max_seq_len tokens at most.
    least = generate_flops(config, config.image_seq_len + 4, 1, n_images=1).forward
    most = generate_flops(config, config.text.max_seq_len - 16, 16, n_images=1).forward
    assert summary["n"] * least < spent["flops"] < summary["n"] * most
    assert spent["joules_per_token"] > 0
    assert describe_cost(spent) in out and "MFU" in out and "J/token" in out
