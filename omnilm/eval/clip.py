"""Zero-shot evaluation of a CLIP model on LLaVA-format caption records.

(a) Image -> text retrieval: each image ranks all distinct captions of the evaluated set by
    cosine similarity; recall@k is the fraction whose own caption is among the top k. A
    caption that ties with the right one counts against it, so a collapsed model (all
    embeddings equal) scores 0, not 1.
(b) Attribute classification (single-object images): each image picks the best of the 540
    captions ShapeWorld's grammar can give one object (size x colour x shape x position);
    reported is how often each attribute of that pick is right, and all four at once.

Shape letters: N images, C captions, K candidate captions, E embedding dim.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from omnilm.data import ImageProcessor, Tokenizer
from omnilm.data import shapeworld as sw
from omnilm.data.captions import check_caption_tokenizer, tokenize_captions
from omnilm.data.llava_json import check_records, read_records
from omnilm.errors import OmniInputError
from omnilm.model.clip import ClipModel
from omnilm.model.layers import eval_mode


def caption_pairs(records: list[dict]) -> list[tuple[str, str]]:
    """(image path, caption) of every `task == "caption"` record: its image and its gpt turn."""
    pairs = []
    for rec in records:
        if rec.get("task") != "caption":
            continue
        image = rec.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                continue  # a caption of several images has no one image to retrieve for
            image = image[0]
        answers = [t["value"] for t in rec.get("conversations", []) if t.get("from") in ("gpt", "assistant")]
        if image and answers:
            pairs.append((image, answers[0].strip()))
    return pairs


def shapeworld_candidates() -> dict[str, dict[str, str]]:
    """Every caption ShapeWorld writes for a one-object scene -> that object's attributes."""
    out = {}
    for size, colour, shape, cell in itertools.product(sw.SIZES, sw.COLOURS, sw.SHAPES, range(len(sw.CELLS))):
        obj = sw.Obj(shape=shape, colour=colour, size=size, cell=cell)
        out[sw.caption((obj,))] = {"size": size, "colour": colour, "shape": shape, "position": obj.position}
    return out


def _embed_texts(model, tokenizer, texts: list[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize_captions(tokenizer, texts[start:start + batch_size], model.config.text.max_len)
        out.append(model.encode_text(ids.to(device), mask.to(device)).float())
    return torch.cat(out)  # (C, E)


def _embed_images(model, image_processor, paths: list[Path], batch_size: int, device) -> torch.Tensor:
    out = []
    dtype = model.visual_projection.weight.dtype
    for start in range(0, len(paths), batch_size):
        pixels = image_processor([str(p) for p in paths[start:start + batch_size]])
        out.append(model.encode_image(pixels.to(device, dtype)).float())
    return torch.cat(out)  # (N, E)


@torch.inference_mode()
def evaluate_clip(model, tokenizer, image_processor, records: list[dict], image_folder: str | Path,
                  batch_size: int = 64, candidates: dict[str, dict[str, str]] | None = None) -> dict[str, float]:
    """Zero-shot retrieval and attribute classification of `model` (a ClipModel) on the caption
    records; image paths are relative to `image_folder`.

    Returns floats: `n_images`, `n_captions` (distinct), `recall@1`, `recall@5`, and over the
    `n_single` images whose caption is one of `candidates` (default: ShapeWorld's one-object
    captions), `<attribute>_acc` per attribute and `all_acc`.
    """
    check_caption_tokenizer(model.config.text, tokenizer, "evaluate_clip")
    # The caption records pass the one LLaVA-data check first (each image decoded as it will be read).
    checked = check_records(records, image_folder, tasks={"caption"},
                            load=(lambda path: image_processor([path])) if image_processor is not None else None)
    pairs = caption_pairs([records[i] for i in checked.kept])
    if not pairs:
        raise OmniInputError("no caption records (task 'caption' with one image and a gpt turn) to evaluate")
    device = next(model.parameters()).device
    with eval_mode(model):
        folder = Path(image_folder)
        images = _embed_images(model, image_processor, [folder / p for p, _ in pairs], batch_size, device)
        texts = list(dict.fromkeys(c for _, c in pairs))  # distinct, first-seen order
        index = {c: i for i, c in enumerate(texts)}
        target = torch.tensor([index[c] for _, c in pairs], device=images.device)

        # (a) retrieval: rank = captions scoring at least as high as the right one, less itself
        sims = images @ _embed_texts(model, tokenizer, texts, batch_size, device).t()  # (N, C)
        rank = (sims >= sims.gather(1, target[:, None])).sum(1) - 1
        results = {"n_images": float(len(pairs)), "n_captions": float(len(texts)),
                   "recall@1": (rank < 1).float().mean().item(), "recall@5": (rank < 5).float().mean().item()}

        # (b) attributes of single-object images, by the best-scoring one-object caption
        candidates = shapeworld_candidates() if candidates is None else candidates
        single = [i for i, (_, c) in enumerate(pairs) if c in candidates]
        results["n_single"] = float(len(single))
        if single:
            names = list(candidates)
            scores = images[single] @ _embed_texts(model, tokenizer, names, batch_size, device).t()  # (n, K)
            picks = [candidates[names[k]] for k in scores.argmax(1).tolist()]
            truths = [candidates[pairs[i][1]] for i in single]
            for attr in truths[0]:
                results[f"{attr}_acc"] = sum(p[attr] == t[attr] for p, t in zip(picks, truths)) / len(single)
            results["all_acc"] = sum(p == t for p, t in zip(picks, truths)) / len(single)
    return results


def format_clip_results(results: dict[str, float]) -> str:
    """A small Markdown table of `evaluate_clip`'s results."""
    lines = ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        shown = str(int(value)) if key.startswith("n_") else f"{value:.3f}"
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def evaluate_clip_checkpoint(folder: str | Path, data: str | Path, image_folder: str | Path) -> dict[str, float]:
    """`evaluate_clip` of the CLIP folder `folder` (with its tokenizer) on the caption records of `data`."""
    model = ClipModel.from_pretrained(folder)
    if not (Path(folder) / "tokenizer.json").is_file():
        raise OmniInputError(f"{folder} has no tokenizer.json; save the CLIP model with its tokenizer")
    tokenizer = Tokenizer.from_file(folder)
    image_processor = ImageProcessor.from_vision_config(model.config.vision)
    return evaluate_clip(model, tokenizer, image_processor, read_records(data), image_folder)
