"""omnilm vs transformers on identical random weights: forward, prefill and decode speed.

Builds a small LLaVA (CLIP ViT + LLaMA) in transformers, saves it, loads it into omnilm, and
times both in the same process, alternating, median of repeats. Prints ratios (>1: omnilm faster).

    python benchmarks/generate.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as CI)")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers as tf

    from omnilm import OmniModel
    from omnilm.infer import generate

    torch.manual_seed(0)
    text = tf.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    vision = tf.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                 num_attention_heads=6, image_size=224, patch_size=16)
    hf = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text,
                                                         image_token_index=4095)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = OmniModel.from_pretrained(d).eval()

    B, L = 2, ours.config.image_seq_len
    ids = torch.randint(0, 4000, (B, L + 64))
    ids[:, 1:1 + L] = 4095
    px = torch.randn(B, 3, 224, 224)
    am = torch.ones_like(ids)
    n = args.new_tokens

    rows = []
    with torch.inference_mode():
        # Same weights must give the same answer before a timing means anything.
        mine = generate(ours, ids, px, am, max_new_tokens=n, stop_token_ids=[])
        theirs = hf.generate(input_ids=ids, pixel_values=px, attention_mask=am, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)[:, ids.shape[1]:]
        assert torch.equal(mine, theirs), "omnilm and transformers disagree; not timing"
        for name, f_ours, f_hf in [
            ("forward (B=2, T=%d)" % ids.shape[1],
             lambda: ours(ids, px, am), lambda: hf(input_ids=ids, pixel_values=px, attention_mask=am)),
            ("greedy generate %d tokens" % n,
             lambda: generate(ours, ids, px, am, max_new_tokens=n, stop_token_ids=[]),
             lambda: hf.generate(input_ids=ids, pixel_values=px, attention_mask=am, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)),
        ]:
            t_o, t_h = median_time(f_ours, args.repeats), median_time(f_hf, args.repeats)
            rows.append((name, t_o, t_h))

    print(f"torch {torch.__version__}, transformers {tf.__version__}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"| {'workload':<28} | {'omnilm s':>9} | {'transformers s':>14} | {'speed-up':>8} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 16}|{'-' * 10}|")
    for name, t_o, t_h in rows:
        print(f"| {name:<28} | {t_o:9.4f} | {t_h:14.4f} | {t_h / t_o:7.2f}x |")


if __name__ == "__main__":
    main()
