"""Data parallel training under torchrun (2 processes, gloo, CPU, fp32): every step's loss and the
final weights equal one process's on the same global batch. The ranks' shares of supervised tokens
differ (ShapeWorld questions vary in length): a loss normalised per rank fails this test (checked by
hand: a gap of 3.6e-3 in the losses). The MoE run has its router losses off: they are functions of
the whole batch's routing, which each rank sees in part (exact across ranks is issue 23's next step)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import cli_error, run_cli
from safetensors.torch import load_file

from omnilm import OmniModel
from omnilm.data import train_tokenizer
from omnilm.data.shapeworld import write_shapeworld
from omnilm.train.stages import corpus

SMALL = json.dumps(dict(text=dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128),
                        vision=dict(n_layers=2, dim=64, n_heads=4, mlp_dim=128)))
MOE = json.dumps(dict(text=dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, mlp_dim=128, n_experts=4,
                                n_experts_per_token=2, router_aux_loss_coef=0.0, router_z_loss_coef=0.0),
                      vision=dict(n_layers=2, dim=64, n_heads=4, mlp_dim=128)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    train_json = write_shapeworld(root, 32, seed=0, split="train")
    train_tokenizer(corpus(train_json), vocab_size=400).save(root / "tokenizer")
    return root


def run(data, out, config: str, parallel: str = "none", batch: int = 8, accum: int = 2, *extra,
        fails: bool = False) -> list[float] | str:
    """Train 10 steps on one process or on 2 ranks under torchrun; the logged losses (with `fails`, the
    stderr of a run that must fail)."""
    flags = ["train", "--stage", "instruct", "--data", data / "train.json", "--image-folder", data, "--tokenizer",
             data / "tokenizer", "--config", config, "--out", out, "--steps", "10", "--batch-size", batch,
             "--grad-accum", accum, "--lr", "1e-3", "--warmup", "2", "--no-progress", "--no-bf16", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if parallel == "none":
        command = [sys.executable, "-m", "omnilm", *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "omnilm", *flags, "--parallel", parallel]
    # A session of its own, so that on a timeout torchrun's workers go with it: no process is left behind.
    process = subprocess.Popen([str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    if fails:
        assert process.returncode != 0
        return stderr
    assert process.returncode == 0, stderr[-3000:]
    return losses(out)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """One process on the same global batches, computed once per model: as 2 micro-batches of 8
    (losses), and as 4 micro-batches of 4, the shapes of each rank's (weights: float rounding then
    differs only in the order of the gradient sums)."""
    root, runs = tmp_path_factory.mktemp("one"), {}

    def get(config: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        if config not in runs:
            n = len(runs)
            losses = run(data, root / f"{n}-losses", config)
            run(data, root / f"{n}-weights", config, "none", 4, 4)
            runs[config] = losses, weights(root / f"{n}-weights")
        return runs[config]
    return get


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """The OUT folder of a 2-rank run of 10 steps, by (model, parallel), run once."""
    root, runs = tmp_path_factory.mktemp("two"), {}

    def get(config: str, parallel: str) -> Path:
        if (config, parallel) not in runs:
            runs[config, parallel] = out = root / str(len(runs))
            run(data, out, config, parallel)
        return runs[config, parallel]
    return get


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("config", [SMALL, MOE], ids=["dense", "moe"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(two_ranks, one_process, config, parallel):
    """Global batch 16 a step: 2 ranks x 2 micro-batches of 4."""
    out = two_ranks(config, parallel)
    two, (one, mine) = losses(out), one_process(config)
    assert len(one) == len(two) == 10
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    theirs = weights(out)
    assert mine.keys() == theirs.keys()
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-6


def test_lora_trains_the_same_on_two_ranks(data, tmp_path):
    """LoRA under DDP and FSDP: the losses and the adapter (LoRA matrices and projector) of 2 ranks are
    one process's on the same global batch (taken as 4 micro-batches of 4, each rank's shape)."""
    lora = ("--lora-r", "4", "--lora-alpha", "8")
    one = run(data, tmp_path / "one", SMALL, "none", 4, 4, *lora)
    mine = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for parallel in ("ddp", "fsdp"):
        two = run(data, tmp_path / parallel, SMALL, parallel, 8, 2, *lora)
        assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (parallel, one, two)
        theirs = load_file(tmp_path / parallel / "adapter" / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys() and any(".lora_B." in k for k in mine)
        assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-6, parallel


def test_a_sharded_checkpoint_resumes_on_two_ranks_and_on_one_process(data, tmp_path, two_ranks):
    """2 ranks write a checkpoint at step 5 through torch.distributed.checkpoint (each its shards);
    resumed on 2 ranks, and on 1 process (which reads both ranks' shards), the next 5 losses are the
    uninterrupted run's."""
    whole = losses(two_ranks(SMALL, "fsdp"))
    run(data, tmp_path / "two", SMALL, "fsdp", 8, 2, "--save-every", "5", "--stop-after", "5")
    assert (tmp_path / "two" / "checkpoints" / "step-000005" / "sharded").is_dir()
    assert len(list((tmp_path / "two" / "checkpoints" / "step-000005" / "sharded").glob("*.safetensors"))) == 2
    shutil.copytree(tmp_path / "two", tmp_path / "saved")
    resumed = {"two": run(data, tmp_path / "two", SMALL, "fsdp", 8, 2, "--resume")}
    shutil.rmtree(tmp_path / "two")
    (tmp_path / "saved").rename(tmp_path / "two")  # the same --out: a resumed run must be the same run
    resumed["one"] = run(data, tmp_path / "two", SMALL, "none", 8, 2, "--resume")
    for where, after in resumed.items():
        assert len(after) == 10 and after[:5] == whole[:5]
        assert max(abs(a - b) for a, b in zip(after[5:], whole[5:])) <= 1e-6, (where, after, whole)


def test_a_sharded_run_exports_a_model_transformers_loads(two_ranks):
    """The final model of a 2-rank FSDP run, gathered whole by rank 0: transformers' LLaVA class
    loads it with nothing missing and computes omnilm's logits."""
    folder = two_ranks(SMALL, "fsdp") / "model"
    ours = OmniModel.from_pretrained(folder)
    theirs, info = tf.LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    cfg, g = ours.config, torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.text.vocab_size, (1, cfg.image_seq_len + 12), generator=g)
    ids[ids == cfg.image_token_id] = 3
    ids[0, 4:4 + cfg.image_seq_len] = cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    with torch.no_grad():
        mine = ours(ids, pixels).logits
        hf = theirs.eval()(input_ids=ids, pixel_values=pixels).logits
    assert (mine - hf).abs().max().item() <= 1e-5


def test_a_bad_flag_fails_on_every_rank_in_one_line(data, tmp_path):
    stderr = run(data, tmp_path, SMALL, "fsdp", 8, 2, "--optimizer", "muon", fails=True)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1] and "--optimizer muon" in errors[0], stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_parallel_needs_torchrun_and_torchrun_needs_parallel(data, tmp_path, monkeypatch, capsys):
    flags = ["train", "--stage", "instruct", "--data", data / "train.json", "--image-folder", data, "--tokenizer",
             data / "tokenizer", "--out", tmp_path, "--steps", "1", "--no-progress"]
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli([*flags, "--parallel", "ddp"], capsys)
    cli_error(code, err, "runs under torchrun")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(flags, capsys)
    cli_error(code, err, "torchrun started 2 processes", "--parallel ddp")
