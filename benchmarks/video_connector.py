"""Which video connector lets a decoder tell which way a shape moves: ShapeWorld's direction
questions alone, one small model per connector, held-out accuracy.

Each connector is an OmniConfig's (`video_pool_mode`, `video_motion`, `video_motion_halo`,
`video_motion_moments`): LLaVA-NeXT-Video's average pool or Qwen2-VL's side-by-side ("concat")
merge, each with and without motion features (the change of each token's patches since the frame
before, side by side); "+halo" widens the change to one patch around the token's, "+moments" sums
that window's change as it is, by column and by row (the recipe's default). The tower is the tiny preset's ViT at patch 16, frozen at its random initialisation (the
same weights for every connector), so each clip's features (`OmniModel.video_features`) are
computed once. On them trains what `omnilm demo-video` trains: a projector (LLaVA's MLP, started
by `whiten_` as --whiten-projector does) and a 2-layer decoder, the question's words as tokens after
the frames' and the answer read at the last position. AdamW (or with --optimizer muon, Muon for the
decoder's matrices and AdamW for the rest, as `omnilm train` splits them), cosine schedule, batch 32;
one run at a time, 2 threads.

    python benchmarks/video_connector.py [--clips 4500] [--steps 400] [--connectors average,concat+motion]
                                         [--optimizer muon --lr 2e-3] [--log-every 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from omnilm import OmniModel
from omnilm.data import ImageProcessor
from omnilm.data.shapeworld.video import make_video_example
from omnilm.model.connector import whiten_
from omnilm.model.layers import MLP
from omnilm.model.llm import LlamaDecoder
from omnilm.train.optim import build_optimizer

CONNECTORS = ("average", "average+motion", "concat", "concat+motion", "average+motion+halo",
              "average+motion+halo+moments")


def direction_questions(n_clips: int, n_test: int) -> list[tuple[str, list[Image.Image], str, str]]:
    """(split, frames, question, answer) for every direction question of n_clips ShapeWorld clips,
    the last n_test clips held out."""
    out = []
    for i in range(n_clips):
        split = "train" if i < n_clips - n_test else "test"
        clip = make_video_example(i, 0, split)
        for record in clip.records:
            if record["task"] == "direction":
                question = record["conversations"][0]["value"].split("\n", 1)[1]
                out.append((split, [Image.fromarray(f) for f in clip.frames], question,
                            record["conversations"][1]["value"]))
    return out


class DirectionModel(nn.Module):
    """Projector + decoder + a head over the word vocabulary: the answer at the last position."""

    def __init__(self, model: OmniModel, n_words: int, n_layers: int):
        super().__init__()
        text = model.config.text
        self.projector = MLP(model.config.video_feature_dim, text.dim, text.dim, "gelu", bias=True)
        self.decoder = LlamaDecoder(dataclasses.replace(text, n_layers=n_layers, vocab_size=n_words))
        self.head = nn.Linear(text.dim, n_words)

    def forward(self, frames: list[torch.Tensor], words: list[torch.Tensor]) -> torch.Tensor:
        rows = [torch.cat([self.projector(f.flatten(0, 1)), self.decoder.embed_tokens(w)]) for f, w in zip(frames, words)]
        width = max(len(r) for r in rows)  # left-padded: the last position is every row's question end
        x = torch.stack([F.pad(r, (0, 0, width - len(r), 0)) for r in rows])
        mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
        return self.head(self.decoder(x, attention_mask=mask)[:, -1])


def run(connector: str, data, args) -> float:
    mode, *extras = connector.split("+")
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", vision=dict(patch_size=16), video_token_id=4, video_pool_mode=mode,
                                  video_motion="motion" in extras, video_motion_halo=int("halo" in extras),
                                  video_motion_moments="moments" in extras).eval()
    processor = ImageProcessor.from_vision_config(model.config.vision)
    t = time.perf_counter()
    with torch.no_grad():
        feats = [model.video_features([processor(frames)]) for _, frames, _, _ in data]
    seconds = time.perf_counter() - t
    vocab = {w: i for i, w in enumerate(sorted({w for _, _, q, a in data for w in q.rstrip("?").split() + [a]}))}
    words = [torch.tensor([vocab[w] for w in q.rstrip("?").split()]) for _, _, q, _ in data]
    answers = torch.tensor([vocab[a] for _, _, _, a in data])
    train = [i for i, row in enumerate(data) if row[0] == "train"]
    test = [i for i, row in enumerate(data) if row[0] == "test"]
    torch.manual_seed(0)
    net = DirectionModel(model, len(vocab), args.layers)
    if not args.no_whiten:
        config = model.config  # as --whiten-projector starts a video projector: motion features standardised
        whiten_(net.projector, torch.cat([feats[i] for i in train[:600]]).flatten(0, 1),
                standardize_from=config.video_feature_dim - config.video_motion_dim)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=0.0)
    else:
        opt = build_optimizer(net, args.lr, kind="muon")
    rng = random.Random(0)
    curve = []
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, 32)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss = F.cross_entropy(net([feats[i] for i in batch], [words[i] for i in batch]), answers[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if args.log_every and step % args.log_every == 0:
            print(f"  step {step}: loss {sum(curve[-args.log_every:]) / args.log_every:.3f}", flush=True)
    net.eval()
    with torch.no_grad():
        right = sum(int((net([feats[i] for i in test[s:s + 64]], [words[i] for i in test[s:s + 64]]).argmax(-1)
                         == answers[test[s:s + 64]]).sum()) for s in range(0, len(test), 64))
    print(f"| {connector} | {model.config.video_feature_dim} | {right / len(test):.1%} | {loss.item():.3f} | "
          f"{seconds:.0f} |", flush=True)
    return right / len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4500, help="clips drawn (about 0.6 direction questions each)")
    ap.add_argument("--test-clips", type=int, default=500, help="of them held out")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                    help="muon: Muon for the decoder's block matrices, AdamW for the rest (as omnilm train)")
    ap.add_argument("--log-every", type=int, default=0, help="print the mean loss every N steps (0: only the last)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--no-whiten", action="store_true", help="start the projector at its random initialisation")
    ap.add_argument("--connectors", default=",".join(CONNECTORS), help="comma-separated, of " + ", ".join(CONNECTORS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    unknown = [c for c in args.connectors.split(",") if c not in CONNECTORS]
    if unknown:
        ap.error(f"--connectors: {', '.join(unknown)} unknown; choose from {', '.join(CONNECTORS)}")
    torch.set_num_threads(args.threads)
    data = direction_questions(args.clips, args.test_clips)
    n_test = sum(row[0] == "test" for row in data)
    print(f"{len(data) - n_test} training and {n_test} held-out direction questions (chance 50%), {args.steps} steps")
    print("| connector | width | held out | last loss | features s |\n|---|---:|---:|---:|---:|")
    for connector in args.connectors.split(","):
        run(connector, data, args)


if __name__ == "__main__":
    main()
