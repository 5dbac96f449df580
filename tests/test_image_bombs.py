"""Decompression bombs at the command line: a few-hundred-byte PNG declaring 200000 x 1 pixels
(harmless to decode, ruinous to resize) and one declaring 20000 x 20000 are refused by `chat`,
`eval` and `train` with exit code 2, one `error:` line naming the image, and little memory.

Each command runs in a child process whose peak resident memory its own parent (a small
wrapper process) reads with getrusage, so that no other test's memory is counted.
"""

import json
import struct
import subprocess
import sys
import zlib

import pytest

PEAK_LIMIT_BYTES = 1 << 30
# A safety net, far above the limit: a regression fails the test instead of exhausting the machine.
ADDRESS_SPACE_CAP = 6 << 30

# Runs argv[1:] with capped address space and prints its exit code, stderr and peak RSS as JSON.
WRAPPER = """
import json, resource, subprocess, sys
cap = int(sys.argv[1])
limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
result = subprocess.run(sys.argv[2:], capture_output=True, text=True, preexec_fn=limit, timeout=300)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, bytes on macOS
peak = peak if sys.platform == "darwin" else peak * 1024
print(json.dumps({"returncode": result.returncode, "stderr": result.stderr, "peak": peak}))
"""


def _png(width: int, height: int, colour_type: int) -> bytes:
    """A valid PNG of black pixels, compressed as it is written: the rows are zeros, so even
    20000 x 20000 pixels take well under a megabyte."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + width * {0: 1, 2: 3}[colour_type])  # filter byte, then the samples
    per_block = max(1, (1 << 20) // len(row))
    z, parts, done = zlib.compressobj(), [], 0
    while done < height:
        n = min(per_block, height - done)
        parts.append(z.compress(row * n))
        done += n
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


# name -> (width, height, PNG colour type (0 grey, 2 RGB), a part of the expected message)
BOMBS = {"wide": (200_000, 1, 2, "200000x1"), "huge": (20_000, 20_000, 0, "400000000 pixels")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model folder with its tokenizer, the bombs, and a LLaVA JSON per bomb."""
    from omnilm import OmniModel
    from omnilm.data import Processor, train_tokenizer

    root = tmp_path_factory.mktemp("bombs")
    for name, (width, height, colour_type, _) in BOMBS.items():
        (root / f"{name}.png").write_bytes(_png(width, height, colour_type))
        turns = [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]
        records = [{"id": f"{name}-{i}", "image": f"{name}.png", "conversations": turns} for i in range(2)]
        (root / f"{name}.json").write_text(json.dumps(records))
    tokenizer = train_tokenizer(["what colour is the circle? red"] * 4, vocab_size=300)
    tokenizer.save(root / "tokenizer")
    model = OmniModel.from_preset("tiny", text=dict(vocab_size=300, n_layers=1, dim=64, n_heads=4, n_kv_heads=2,
                                                    mlp_dim=128),
                                  vision=dict(n_layers=1, dim=64, n_heads=4, mlp_dim=128),
                                  image_token_id=tokenizer.image_token_id)
    model.save_pretrained(root / "model")
    Processor.for_model(model, tokenizer=tokenizer).save_pretrained(root / "model")
    return root


def _args(command: str, root, bomb: str) -> list[str]:
    return {
        "chat": ["chat", str(root / "model"), "--image", str(root / f"{bomb}.png"), "what colour?"],
        "eval": ["eval", str(root / "model"), "--data", str(root / f"{bomb}.json"), "--image-folder", str(root)],
        "train": ["train", "--stage", "instruct", "--data", str(root / f"{bomb}.json"), "--image-folder", str(root),
                  "--out", str(root / f"run-{bomb}"), "--preset", "tiny", "--tokenizer", str(root / "tokenizer"),
                  "--steps", "1", "--batch-size", "1", "--no-progress"],
    }[command]


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("command", ["chat", "eval", "train"])
def test_bomb_is_refused_in_little_memory(work, command, bomb):
    argv = [sys.executable, "-m", "omnilm.cli", *_args(command, work, bomb)]
    wrapper = subprocess.run([sys.executable, "-c", WRAPPER, str(ADDRESS_SPACE_CAP), *argv],
                             capture_output=True, text=True, timeout=360, check=True)
    result = json.loads(wrapper.stdout)
    lines = result["stderr"].strip().splitlines()
    assert result["returncode"] == 2, result["stderr"][-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"][-2000:]
    assert f"{bomb}.png" in lines[0] and BOMBS[bomb][3] in lines[0], lines[0]
    assert result["peak"] < PEAK_LIMIT_BYTES, f"{command} peaked at {result['peak'] / 2**20:.0f} MiB"
