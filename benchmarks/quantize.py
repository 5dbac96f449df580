"""int8 weight-only quantisation against the float model it came from: decode speed, energy per
token and weights file size, on the same weights.

Builds a random LLaMA decoder of about 110M parameters (or loads --checkpoint), quantises a copy
(omnilm.model.quantize) and times greedy decoding of both in the same process, alternating call by
call, median of repeats, at batch 1 and 8, with float32 and with bfloat16 activations (the dtype
PyTorch's CPU int8 kernel is vectorised for). Decode speed counts the new tokens past the first,
B (n - 1) / (t(n) - t(1)): prefill is left out. Prints int8 / float (>1: int8 faster), and the
joules per decoded token from the meter omnilm.cost finds (RAPL, or an estimate from CPU time).
Quality is measured elsewhere: random weights turn a small change into a large one as it passes
through the layers, so that only a trained model's answers say what int8 costs (docs/quantization.md).

    python benchmarks/quantize.py [--repeats 5] [--threads 2] [--checkpoint CKPT] [--json quantize.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from omnilm import OmniModel
from omnilm.cost import EnergyMeter
from omnilm.infer import generate
from omnilm.model.hf import weights_size
from omnilm.model.quantize import quantize_int8


def measure(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Each fn's median seconds and mean joules per call, over `repeats` rounds in which every fn runs
    once in turn (so that a machine growing busier slows them all alike), after a warm-up."""
    meter = EnergyMeter.for_device("cpu")
    times: dict[str, list[float]] = {name: [] for name in fns}
    joules = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            before, t0 = meter.poll(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            joules[name] += meter.poll() - before
    return {name: (statistics.median(times[name]), joules[name] / repeats) for name in fns}


def weights_mb(model: OmniModel) -> float:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return weights_size(d) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as CI)")
    ap.add_argument("--checkpoint", type=Path, help="a float model folder instead of the random decoder")
    ap.add_argument("--modules", help="the parts to quantise (omnilm quantize; default every part the model has)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded (at least 2)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2: decoding is timed past the first new token")
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.checkpoint is not None:
        model = OmniModel.from_pretrained(args.checkpoint)
    else:
        model = OmniModel.from_preset("tiny", vision=None, text=dict(vocab_size=8192, dim=1024, n_layers=8, n_heads=16,
                                                                     n_kv_heads=8, mlp_dim=2816))
    model.eval()
    int8 = quantize_int8(copy.deepcopy(model), args.modules.split(",") if args.modules else None)
    modules = ",".join(int8.config.quantization.modules)
    n, vocab = args.new_tokens, model.config.text.vocab_size
    sizes = {"float": weights_mb(model), "int8": weights_mb(int8)}

    rows = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            peers = {"float": model.to(dtype), "int8": int8.to(dtype)}  # int8 weights stay int8; scales follow
            for B in (1, 8):
                ids = torch.randint(4, vocab, (B, args.prompt), generator=torch.Generator().manual_seed(B))
                fns = {f"{name} {k}": (lambda m=m, k=k: generate(m, ids, max_new_tokens=k, stop_token_ids=[]))
                       for name, m in peers.items() for k in (1, n)}
                timed = measure(fns, args.repeats)
                row = {"dtype": str(dtype).removeprefix("torch."), "batch": B}
                for name in peers:
                    (t1, j1), (tn, jn) = timed[f"{name} 1"], timed[f"{name} {n}"]
                    decoded = B * (n - 1)
                    row[name] = {"decode_tokens_per_s": decoded / (tn - t1), "joules_per_token": (jn - j1) / decoded}
                row["speedup"] = row["int8"]["decode_tokens_per_s"] / row["float"]["decode_tokens_per_s"]
                rows.append(row)

    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; "
          f"{model.num_parameters():,} parameters; int8 in {modules}; weights {sizes['float']:,.1f} MB float, "
          f"{sizes['int8']:,.1f} MB int8 ({sizes['int8'] / sizes['float']:.2f}x)")
    print(f"| {'activations':<11} | {'batch':>5} | {'float tok/s':>11} | {'int8 tok/s':>10} | {'int8/float':>10} "
          f"| {'J/token float':>13} | {'J/token int8':>12} |")
    print(f"|{'-' * 13}|{'-' * 7}|{'-' * 13}|{'-' * 12}|{'-' * 12}|{'-' * 15}|{'-' * 14}|")
    for r in rows:
        f, q = r["float"], r["int8"]
        print(f"| {r['dtype']:<11} | {r['batch']:>5} | {f['decode_tokens_per_s']:11.1f} "
              f"| {q['decode_tokens_per_s']:10.1f} | {r['speedup']:9.2f}x | {f['joules_per_token']:13.4g} "
              f"| {q['joules_per_token']:12.4g} |")
    meter = EnergyMeter.for_device("cpu")
    print(f"energy: {meter.method} ({meter.note})")
    if args.json:
        args.json.write_text(json.dumps(dict(torch=torch.__version__, threads=args.threads, repeats=args.repeats,
                                             parameters=model.num_parameters(), modules=modules,
                                             weights_mb=sizes, energy_method=meter.method, rows=rows),
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
