"""SDPA's flash kernel against its math kernel on CPU, forward + backward, by sequence length.

Where `omnilm.model.layers.CPU_MATH_ATTENTION_MAX_LEN` comes from: one causal, grouped-query
attention call as the tiny decoder trains it (8 query heads and 4 key/value heads of 32, the
projections included, bf16 autocast, the boolean mask of a right-padded batch), the batch
shrinking as the sequence grows so that every batch holds about the same number of tokens. Both
kernels run alternately in the same process; the table gives medians and the ratio (> 1: math
faster).

    python benchmarks/attention.py [--repeats 7] [--threads 2] [--tokens 3328]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnilm.model.layers import decoder_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as CI)")
    ap.add_argument("--tokens", type=int, default=3328, help="tokens per batch (default: the demo's 32 x 104)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 104, 128, 192, 256, 512, 1024])
    ap.add_argument("--fp32", action="store_true", help="no autocast: float32 throughout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, n_heads, n_kv_heads, head_dim = 256, 8, 4, 32
    proj = torch.nn.ModuleDict({name: torch.nn.Linear(dim, width) for name, width in
                                (("q", n_heads * head_dim), ("k", n_kv_heads * head_dim), ("v", n_kv_heads * head_dim))})

    def step(x: torch.Tensor, backend: SDPBackend) -> None:
        B, T, _ = x.shape
        # Right padding as the collate leaves it: row i holds T - i % 16 real tokens.
        real = torch.arange(T)[None, :] < (T - torch.arange(B) % 16)[:, None]
        mask = decoder_mask(real.long(), T, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32), sdpa_kernel(backend):
            q = proj["q"](x).view(B, T, n_heads, head_dim).transpose(1, 2)
            k = proj["k"](x).view(B, T, n_kv_heads, head_dim).transpose(1, 2)
            v = proj["v"](x).view(B, T, n_kv_heads, head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y.float().square().mean().backward()

    print(f"| tokens | batch | flash ms | math ms | math speed-up |  ({'fp32' if args.fp32 else 'bf16 autocast'}, "
          f"{args.threads} threads, median of {args.repeats})")
    print("|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        x = torch.randn(max(1, args.tokens // length), length, dim, requires_grad=True)
        times: dict[SDPBackend, list[float]] = {SDPBackend.FLASH_ATTENTION: [], SDPBackend.MATH: []}
        for rep in range(args.repeats + 1):
            for backend, samples in times.items():
                t0 = time.perf_counter()
                step(x, backend)
                if rep:  # the first round warms up
                    samples.append(time.perf_counter() - t0)
        flash, math_ = (statistics.median(times[b]) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH))
        print(f"| {length} | {x.shape[0]} | {1e3 * flash:.1f} | {1e3 * math_:.1f} | {flash / math_:.2f}x |")


if __name__ == "__main__":
    main()
