"""A run killed with SIGKILL at any moment finishes, after the recovery its error message names,
with the losses and weights of a run never killed, and a complete model/.

Each killed run is a subprocess that replaces one function with a `kill -9` of itself on a chosen
call: the moment of death is fixed by the code path, not by timing. 6 steps, a checkpoint every 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from safetensors.torch import load_file

from omnilm import OmniModel
from omnilm.train import train
from test_train import args, shapeworld  # noqa: F401 (the fixture)

RUN = dict(steps=6, save_every=2, batch_size=8)

# Runs train() with the test's settings (argv[1], JSON) after making `target` kill the process on
# its `nth` call whose arguments mention `match`; writes the returned losses to `summary`.
SCRIPT = """
import importlib, json, os, signal, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["tests"])
from test_train import args
from omnilm.train import train
kill = spec["kill"]
if kill:
    module_name, name = kill["target"].rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, seen = getattr(module, name), [0]
    def dying(*a, **k):
        if kill["match"] in " ".join(map(str, a)):
            seen[0] += 1
            if seen[0] == kill["nth"]:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    setattr(module, name, dying)
summary = train(args(Path(spec["root"]), Path(spec["out"]), **spec["run"]))
Path(spec["summary"]).write_text(json.dumps(summary["losses"]))
"""


def run(root: Path, out: Path, kill: dict | None = None, **kw) -> subprocess.CompletedProcess:
    spec = dict(tests=str(Path(__file__).parent), root=str(root), out=str(out), run=RUN | kw, kill=kill,
                summary=str(out.parent / f"{out.name}.losses.json"))
    # MKL picks its kernels by the buffers' memory alignment unless told not to, and two processes then
    # round a matrix product differently now and then: bit-for-bit needs one code path.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MKL_CBWR": "COMPATIBLE"}
    return subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=120)


def losses(out: Path) -> list[float]:
    return json.loads((out.parent / f"{out.name}.losses.json").read_text())


def logged(out: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def straight(shapeworld, tmp_path_factory):
    """The run never killed, in a subprocess like the others (the same threads, the same numbers)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = run(shapeworld, out)
    assert done.returncode == 0, done.stderr
    return out


# (the kill, what it leaves behind, the steps the recovery runs: None for a plain rerun)
KILLS = {
    # Inside the first checkpoint's save, its weights written to a temp file not yet renamed.
    "first save": (dict(target="os.replace", match="step-000002.tmp/model/model.safetensors", nth=1),
                   "checkpoints/step-000002.tmp/model/.model.safetensors.*.tmp", None),
    # After step-000004/ is complete, before `latest` names it (its temp file written).
    "middle save": (dict(target="os.replace", match="checkpoints/latest", nth=2),
                    "checkpoints/.latest.*.tmp", [3, 4, 5, 6]),
    # Copying the final checkpoint's model folder to model/, some of its files copied.
    "final model": (dict(target="shutil.copyfile", match="model.tmp", nth=3), "model.tmp/*", []),
    # In step 3, after its backward pass, before its optimizer step.
    "mid-step": (dict(target="torch.nn.utils.clip_grads_with_norm_", match="", nth=3), "checkpoints/step-000002",
                 [3, 4, 5, 6]),
}


@pytest.mark.parametrize("moment", KILLS)
def test_a_run_killed_at_any_moment_recovers_to_the_same_model(shapeworld, straight, tmp_path, moment):
    kill, left, resumed_steps = KILLS[moment]
    out = tmp_path / "run"
    killed = run(shapeworld, out, kill=kill)
    assert killed.returncode == -9, killed.stderr  # died where the kill was placed, not of something else
    assert list(out.glob(left)) and not (out / "model").exists()

    if resumed_steps is None:
        # No finished checkpoint: --resume says so and names the recovery, a plain rerun.
        one_line_error(lambda: train(args(shapeworld, out, resume=True, **RUN)), "no finished checkpoint",
                       "rerun without --resume")
    recovered = run(shapeworld, out, resume=resumed_steps is not None)
    assert recovered.returncode == 0, recovered.stderr

    every = losses(straight)
    assert losses(out) == (every if resumed_steps is None else [every[s - 1] for s in resumed_steps])  # bit for bit
    assert logged(out) == logged(straight)  # one row per step, none lost or repeated
    ours, theirs = load_file(out / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "model" / "tokenizer.json").is_file()
    OmniModel.from_pretrained(out / "model")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000004", "step-000006"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # what the kill left is gone
