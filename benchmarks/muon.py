"""Muon's Newton-Schulz iteration in bf16 (torch.optim.Muon) against fp32 (omnilm's `Muon` with
`ns_dtype=torch.float32`), on the decoder `omnilm demo` trains in its instruct stage.

Each arm is the optimizer `build_optimizer` makes for that stage (Muon for the decoder's block
matrices, AdamW for the rest), with its Muon half set to the arm's dtype (in bf16 its step is
torch.optim.Muon's to the bit: tests/test_optim.py); every step gets the same random gradients. For scale, the table also gives the median forward and backward pass of a batch
of the stage's size (32 records of `--tokens` tokens, text only). The arms run one after the other
in this process, nothing else running. On a CPU without bf16 matrix units (AVX2 only), torch's
bf16 iteration is emulated and dominates the step; with them, or on a GPU, bf16 is the faster,
which is why `build_optimizer` picks the dtype by `bf16_is_fast`.

    python benchmarks/muon.py [--steps 20] [--tokens 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from omnilm import OmniModel
from omnilm.recipes.recipe import Recipe, architecture
from omnilm.train.optim import bf16_is_fast, build_optimizer


def demo_decoder() -> OmniModel:
    recipe = Recipe()
    model = OmniModel.from_preset(recipe.preset, **architecture(recipe))
    model.vision.requires_grad_(False)  # frozen in stage instruct
    return model


def median_step(model: OmniModel, ns_dtype: torch.dtype, steps: int) -> float:
    optimizer = build_optimizer(model, 2e-3, kind="muon")
    muon = optimizer.parts[-1]
    muon.ns_dtype = ns_dtype
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        t0 = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - t0)
        optimizer.zero_grad()
    return statistics.median(seconds[1:])  # the first step makes the momentum buffers


def median_pass(model: OmniModel, tokens: int, steps: int) -> float:
    ids = torch.randint(10, model.config.text.vocab_size, (32, tokens))
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(seconds[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps (and passes) per arm")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per record of the forward-backward batch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = demo_decoder()
    in_muon = sum(p.numel() for g in build_optimizer(model, 2e-3, kind="muon").parts[-1].param_groups
                  for p in g["params"])
    bf16 = median_step(model, torch.bfloat16, args.steps)
    fp32 = median_step(model, torch.float32, args.steps)
    passes = median_pass(model, args.tokens, args.steps)
    print(f"demo decoder: {in_muon / 1e6:.2f}M parameters in Muon's matrices; {args.threads} threads; "
          f"bf16 fast here: {bf16_is_fast(torch.device('cpu'))}\n")
    print("| | median s |\n|---|---:|")
    print(f"| optimizer step, Newton-Schulz in bf16 (as torch.optim.Muon) | {bf16:.4f} |")
    print(f"| optimizer step, Newton-Schulz in fp32 | {fp32:.4f} |")
    print(f"| forward and backward, 32 x {args.tokens} tokens | {passes:.4f} |")
    print(f"\nfp32 iteration {bf16 / fp32:.1f}x as fast as bf16's")


if __name__ == "__main__":
    main()
