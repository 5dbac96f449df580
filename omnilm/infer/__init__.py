"""Inference: KV-cached prefill/decode, sampling, batched generation and text streaming."""

from omnilm.infer.generate import Sampling, decode_one_token, generate, iter_tokens, prefill, sample, stream

__all__ = ["Sampling", "decode_one_token", "generate", "iter_tokens", "prefill", "sample", "stream"]
