"""Steps per second of one training process against torchrun's data-parallel processes, on the same
model, data and global batch: stage instruct on ShapeWorld, one process, then `--nproc` processes
with `--parallel ddp`, then with `--parallel fsdp` (each of `--modes`), one run after another.

    python benchmarks/distributed.py [--out runs/bench-distributed] [--steps 30] [--modes ddp fsdp]

Each run writes OUT/<run>/metrics.jsonl; the table gives the median `step_s` past the first
`--skip` steps, as steps per second, and the ratio against one process. The torchrun runs give
each rank OMP_NUM_THREADS=1; one process runs with as many threads as the ranks together
(`--nproc`) and, for reference, with one. Every run is fp32 (--no-bf16): FSDP's bf16 policy is
CUDA's only, so a CPU comparison in bf16 would not be like for like. The losses of each run are
compared with the one-process run's: the ranks take the same steps (the loss is normalised by the
global count of supervised tokens), so they agree to float rounding.

On a 2-core CPU no gain is expected: two ranks of one thread each do the work one process does
with two threads, and add the gradient all-reduce (ddp) or the parameter gathers and gradient
reduce-scatters (fsdp) on top; measure on a quiet machine, with nothing else running. A mode that
fails (say fsdp where this omnilm lacks it) is reported with its error line and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from omnilm.data import train_tokenizer
from omnilm.data.shapeworld import write_shapeworld
from omnilm.train.stages import corpus


def launch(command: list, env: dict, timeout: float) -> str | None:
    """Run `command` to the end; None if it succeeded, else its error line."""
    # A session of its own, so that on a timeout torchrun's workers go with it: no process is left behind.
    process = subprocess.Popen([str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"timed out after {timeout:.0f}s"
    if process.returncode == 0:
        return None
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error: " in line]  # omnilm's one-line errors, from any rank
    return (errors or lines or [f"exit code {process.returncode}"])[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-distributed",
                    help="data in OUT/data (kept, reused); each run in OUT/<run>, replaced on every invocation")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median (default 5)")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch, split over the ranks (default 16)")
    ap.add_argument("--nproc", type=int, default=2, help="processes torchrun starts (default 2)")
    ap.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], help="--parallel modes to run (default ddp fsdp)")
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny, the demo's)")
    ap.add_argument("--config", default=None, help="JSON overrides of the preset's config, as omnilm train takes")
    ap.add_argument("--n", type=int, default=256, help="ShapeWorld training examples (default 256)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a run may take before it is stopped")
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error(f"--steps {args.steps} leaves nothing past the {args.skip} warm-up steps (--skip)")

    out = Path(args.out)
    data = out / "data"
    if not (data / "tokenizer").is_dir():
        train_json = write_shapeworld(data, args.n, seed=0, split="train", progress=False)
        train_tokenizer(corpus(train_json), vocab_size=400).save(data / "tokenizer")
    flags = ["train", "--stage", "instruct", "--data", data / "train.json", "--image-folder", data,
             "--tokenizer", data / "tokenizer", "--preset", args.preset, "--steps", args.steps,
             "--batch-size", args.batch_size, "--lr", "1e-3", "--warmup", "2", "--no-progress", "--no-bf16"]
    if args.config:
        flags += ["--config", args.config]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    one = [sys.executable, "-m", "omnilm", *flags]
    # (name, folder, processes, threads per process, command)
    runs = [(f"1 process, {args.nproc} threads", f"one-{args.nproc}t", 1, args.nproc, one)]
    if args.nproc != 1:
        runs.append(("1 process, 1 thread", "one-1t", 1, 1, one))
    runs += [(f"{mode}, {args.nproc} processes", mode, args.nproc, 1, [*torchrun, "-m", "omnilm", *flags, "--parallel",
                                                                          mode]) for mode in args.modes]

    results = {}  # name -> (median step_s, losses)
    for name, folder, _, threads, command in runs:  # one after another: never two at once
        run_out = out / folder
        shutil.rmtree(run_out, ignore_errors=True)  # a fresh run each time (train refuses to overwrite one)
        print(f"running: {name} ...", flush=True)
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        error = launch([*command, "--out", run_out], env, args.timeout)
        if error is not None:
            print(f"  skipped: {error}", flush=True)
            continue
        rows = [json.loads(line) for line in (run_out / "metrics.jsonl").read_text().splitlines()]
        results[name] = (statistics.median(r["step_s"] for r in rows[args.skip:]), [r["loss"] for r in rows])

    if not results:
        return
    base_name = runs[0][0]
    print(f"\n{args.preset}, global batch {args.batch_size}, {args.steps} steps, fp32; median step time past the "
          f"first {args.skip} steps. Ranks run with OMP_NUM_THREADS=1 each.\n")
    print(f"| run | processes | threads each | step s | steps/s | vs {base_name} | max loss diff vs {base_name} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = results.get(base_name)
    for name, _, processes, threads, _ in runs:
        if name not in results:
            print(f"| {name} | {processes} | {threads} | failed | | | |")
            continue
        step_s, losses = results[name]
        ratio = f"{base[0] / step_s:.2f}x" if base else ""
        diff = f"{max(abs(a - b) for a, b in zip(losses, base[1])):.1e}" if base else ""
        print(f"| {name} | {processes} | {threads} | {step_s:.3f} | {1 / step_s:.2f} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
