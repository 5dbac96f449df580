"""omnilm's MoE layer vs transformers' MixtralSparseMoeBlock on identical weights.

Both layers get the same router and expert weights (our stacked layout is transformers 5's); the
script first checks that they compute the same output, then times forward (no grad) and
forward+backward at several Mixtral-like shapes sized for a CPU, alternating the two, median
of repeats. Like transformers' block, ours runs without its routing statistics (`stats=False`:
no aux/z-loss, no load counts). Prints a Markdown table of times and ratios (> 1: omnilm faster).

    python benchmarks/moe_layer.py [--repeats 7] [--threads 2] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# (tokens, width D, expert width F, experts E, experts per token k): Mixtral-8x7B is
# (-, 4096, 14336, 8, 2); these keep its F/D ratio of 3.5 and its routing at CPU size.
SHAPES = [
    (256, 256, 896, 8, 2),
    (1024, 256, 896, 8, 2),
    (1024, 512, 1792, 8, 2),
    (2048, 512, 1792, 8, 2),
    (1024, 512, 896, 16, 4),
]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build(tokens: int, dim: int, hidden: int, n_experts: int, k: int, dtype: torch.dtype):
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from omnilm.config import TextConfig
    from omnilm.model.moe import MoE

    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(tf.MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=n_experts,
                                                num_experts_per_tok=k))
    ours = MoE(TextConfig(dim=dim, n_heads=8, n_kv_heads=8, mlp_dim=hidden, n_layers=1, n_experts=n_experts,
                          n_experts_per_token=k))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
        ours.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    hf, ours = hf.to(dtype).train(), ours.to(dtype).train()
    x = torch.randn(1, tokens, dim, dtype=dtype)
    return hf, ours, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as CI)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from omnilm.model.moe import _grouped_mm_works

    print(f"{args.dtype}, {args.threads} threads, median of {args.repeats}; grouped GEMM: "
          f"{'torch._grouped_mm' if _grouped_mm_works('cpu', dtype) else 'one matmul per expert'}\n")
    print("| tokens | D | F | experts | k | fwd ours | fwd HF | fwd speed-up | fwd+bwd ours | fwd+bwd HF | fwd+bwd speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        hf, ours, x = build(*shape, dtype)
        with torch.no_grad():
            expected, got = hf(x.clone()), ours(x)[0]
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        assert torch.allclose(got.float(), expected.float(), atol=tol, rtol=tol), "the two layers disagree"
        xg = x.clone().requires_grad_()

        def call(layer, inputs):
            return layer(inputs, stats=False)[0] if layer is ours else layer(inputs)

        def fwd(layer, unpack):
            with torch.no_grad():
                unpack(call(layer, x.clone()))

        def fwd_bwd(layer, unpack):
            unpack(call(layer, xg)).float().square().mean().backward()

        ours_out, hf_out = (lambda o: o), (lambda o: o)
        times = {}
        for name, fn in [("fwd", fwd), ("fwd_bwd", fwd_bwd)]:
            run_ours, run_hf = (lambda: fn(ours, ours_out)), (lambda: fn(hf, hf_out))
            run_ours(), run_hf()  # warm-up
            a, b = [], []
            for _ in range(args.repeats):  # alternate, so drift in machine load hits both
                a.append(timed(run_ours))
                b.append(timed(run_hf))
            times[name] = statistics.median(a), statistics.median(b)
        (fo, fh), (bo, bh) = times["fwd"], times["fwd_bwd"]
        print(f"| {shape[0]} | {shape[1]} | {shape[2]} | {shape[3]} | {shape[4]} | {1e3 * fo:.1f} ms | {1e3 * fh:.1f} ms "
              f"| **{fh / fo:.2f}x** | {1e3 * bo:.1f} ms | {1e3 * bh:.1f} ms | **{bh / bo:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
