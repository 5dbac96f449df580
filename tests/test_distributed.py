"""Data parallel training under torchrun (2 processes, gloo, CPU, fp32): every step's loss and the
final weights equal one process's on the same global batch. The ranks' shares of supervised tokens
differ (ShapeWorld questions vary in length): a loss normalised per rank fails this test (checked by
hand: a gap of 3.6e-3 in the losses). The MoE run has its router losses off: they are functions of
the whole batch's routing, which each rank sees in part (exact across ranks is issue 23's next step)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import cli_error, run_cli
from safetensors.torch import load_file

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


def run(data, out, config: str, nproc: int = 1, batch: int = 8, accum: int = 2) -> list[float]:
    flags = ["train", "--stage", "instruct", "--data", data / "train.json", "--image-folder", data, "--tokenizer",
             data / "tokenizer", "--config", config, "--out", out, "--steps", "10", "--batch-size", batch,
             "--grad-accum", accum, "--lr", "1e-3", "--warmup", "2", "--no-progress", "--no-bf16"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "omnilm", *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "omnilm", *flags, "--parallel", "ddp"]
    # A session of its own, so that on a timeout torchrun's workers go with it: no process is left behind.
    process = subprocess.Popen([str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("config", [SMALL, MOE], ids=["dense", "moe"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(data, tmp_path, config):
    """Global batch 16 a step: 2 ranks x 2 micro-batches of 4, against one process taking the same
    16 records as 2 micro-batches of 8 (losses) and as 4 micro-batches of 4 (the same shapes as
    each rank's, so that float rounding differs only in the order of the gradient sums: weights)."""
    two = run(data, tmp_path / "two", config, nproc=2)
    one = run(data, tmp_path / "one", config)
    assert len(one) == len(two) == 10
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    run(data, tmp_path / "same_shapes", config, batch=4, accum=4)
    mine, theirs = weights(tmp_path / "same_shapes"), weights(tmp_path / "two")
    assert mine.keys() == theirs.keys()
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-6


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
