"""Shared test helpers: tiny random-weight transformers models, the oracles for parity tests.

Nothing is downloaded: the models are built from configs here, with fixed seeds.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnilm.errors import OmniInputError


def one_line_error(fn, *parts: str, match: str | None = None) -> str:
    """Call fn; it must raise OmniInputError with a one-line message containing every part
    (and matching the regex `match`). Returns the message."""
    with pytest.raises(OmniInputError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    if match is not None:
        assert re.search(match, msg), msg
    return msg


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run `omnilm ARGV` in this process: (exit code, stdout, stderr)."""
    from omnilm.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(code: int, err: str, *parts: str) -> str:
    """The command exited 2 with one `error: ...` line holding every part; returns the line."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def torchrun(*args, timeout: float = 120) -> tuple[int, str]:
    """`torchrun --standalone --nproc-per-node 2 ARGS` on one thread per rank: (exit code, stderr).
    In a session of its own, so that on a timeout torchrun's workers are killed with it: no process
    is left behind."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stderr


def rss_bytes() -> int:
    """This process's resident memory, from /proc (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter O(1)-scale random values, so parity compares meaningful numbers
    (transformers' N(0, 0.02) init leaves activations and logits close to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:  # biases, CLIP's class embedding
                p.copy_(0.1 * noise)
            else:  # matrices, embeddings, conv kernels: unit-variance outputs
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def tiny_hf_configs(text: dict | None = None, vision: dict | None = None, **llava):
    """(LlamaConfig, CLIPVisionConfig, LlavaConfig) of a tiny LLaVA-1.5: grouped-query attention,
    a non-default rope_theta and norm eps, 32 px images in 8 px patches (16 tokens per image)."""
    import transformers as tf

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=3e-5, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0) | (text or {})
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, layer_norm_eps=2e-5) | (vision or {})
    text_cfg, vision_cfg = tf.LlamaConfig(**text), tf.CLIPVisionConfig(**vision)
    llava_cfg = tf.LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                               **(dict(image_token_index=text_cfg.vocab_size - 1) | llava))
    return text_cfg, vision_cfg, llava_cfg


def tiny_hf_model(kind: str, seed: int = 0, **config_overrides):
    """A tiny random transformers model in eval mode: kind "llava", "llama" or "clip"."""
    import transformers as tf

    text_cfg, vision_cfg, llava_cfg = tiny_hf_configs(**config_overrides)
    cls, cfg = {"llava": (tf.LlavaForConditionalGeneration, llava_cfg), "llama": (tf.LlamaForCausalLM, text_cfg),
                "clip": (tf.CLIPVisionModel, vision_cfg)}[kind]
    torch.manual_seed(seed)
    return randomize_(cls(cfg), seed).eval()


def tiny_checkpoint(folder: Path, fusion: str = "joint", seed: int = 0, max_seq_len: int = 256, **overrides) -> Path:
    """A small random LLaVA-style checkpoint with its tokenizer, as `omnilm serve` and `chat` load
    one: 32 px images in 16 px patches (4 tokens each), weights at O(1) scale so greedy answers vary."""
    from omnilm import OmniConfig, OmniModel
    from omnilm.data import Processor, train_tokenizer

    tokenizer = train_tokenizer(["What colour is the circle? a red circle and a blue square, three green triangles"] * 4,
                                vocab_size=300)
    text = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                max_seq_len=max_seq_len) | overrides.pop("text", {})
    vision = dict(image_size=32, patch_size=16, dim=32, n_layers=2, n_heads=4, mlp_dim=64)
    config = OmniConfig(text=text, vision=vision, image_token_id=tokenizer.image_token_id, fusion=fusion, **overrides)
    torch.manual_seed(seed)
    model = randomize_(OmniModel.from_config(config), seed).eval()
    model.save_pretrained(folder)
    Processor.for_model(model, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    """One tiny joint-fusion checkpoint folder shared by the serving tests."""
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "model")
