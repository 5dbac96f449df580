"""Prefill time and peak memory of long prompts, by length: is attention memory linear?

Each length runs in a fresh process: a random-weight model (the tiny preset, or a larger one), a
random prompt of N tokens, `omnilm.infer.prefill` in chunks of `--chunk` tokens under no_grad.
Peak memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs once the model is built) over the prefill, the KV cache included; time is
wall-clock. The table ends with the least-squares slope of memory against length (MiB per 1k
tokens) and how far the largest length's figure is from that line: a quadratic term would show
as a growing gap.

    python benchmarks/long_context.py [--model tiny|large] [--lengths 1024 2048 ... 131072]
                                      [--chunk 1024] [--threads 2]

Time grows quadratically (every chunk attends to all the positions before it), memory linearly:
the CPU path builds no (chunk x context) mask (`omnilm.model.layers.causal_attention`). On 2
cores, 64k tokens on the tiny model take minutes; the larger model's default lengths stop at 16k.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from omnilm import OmniModel
from omnilm.infer import prefill

MODELS = {
    "tiny": dict(preset="tiny", text={}),
    # 128M parameters: 12 layers of width 768 (GPT-2 small's shape), 12 heads of 64, 4 key/value heads,
    # a 32k vocabulary.
    "large": dict(preset="tiny", text=dict(n_layers=12, dim=768, n_heads=12, n_kv_heads=4, mlp_dim=2048,
                                           vocab_size=32000)),
}
DEFAULT_LENGTHS = {"tiny": [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072],
                   "large": [1024, 2048, 4096, 8192, 16384]}


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def one(model_name: str, length: int, chunk: int, threads: int) -> dict:
    """In this process: the prefill of one prompt; its seconds and its rise of peak memory."""
    torch.set_num_threads(threads)
    spec = MODELS[model_name]
    model = OmniModel.from_preset(spec["preset"], text={**spec["text"], "max_seq_len": max(length, 4096)}).eval()
    ids = torch.randint(4, model.config.text.vocab_size, (1, length))
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
    before = peak_kib()
    t0 = time.perf_counter()
    with torch.no_grad():
        prefill(model, ids, None, None, model.new_cache(1, length), chunk=chunk)
    seconds = time.perf_counter() - t0
    return {"length": length, "seconds": seconds, "peak_mib": (peak_kib() - before) / 1024,
            "parameters": model.num_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens (default: by model)")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk in tokens (default 1024)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one length here, print JSON
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.model, args.one, args.chunk, args.threads)))
        return
    rows = []
    for length in args.lengths or DEFAULT_LENGTHS[args.model]:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", str(length), "--chunk",
                              str(args.chunk), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{length} tokens: failed: {out.stderr.strip().splitlines()[-1]}")
            break
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{length:>7} tokens: {r['seconds']:8.1f} s, peak +{r['peak_mib']:8.1f} MiB", flush=True)
    if len(rows) < 2:
        return
    x = torch.tensor([r["length"] / 1024 for r in rows], dtype=torch.float64)
    y = torch.tensor([r["peak_mib"] for r in rows], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    intercept = float(y.mean() - slope * x.mean())
    print(f"\n{args.model} model ({rows[0]['parameters']:,} parameters), chunks of {args.chunk}, "
          f"{args.threads} threads\n")
    print("| tokens | prefill s | peak memory rise, MiB | MiB per 1k tokens |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']:,} | {r['seconds']:.1f} | {r['peak_mib']:.1f} | {r['peak_mib'] / (r['length'] / 1024):.2f} |")
    last = rows[-1]
    fitted = intercept + slope * last["length"] / 1024
    print(f"\nfitted: {slope:.2f} MiB per 1k tokens + {intercept:.1f} MiB; the largest length run, "
          f"{last['length']:,} tokens: {last['peak_mib']:.1f} MiB measured, {fitted:.1f} on the line")


if __name__ == "__main__":
    main()
