"""Where a model looks: for each token of its answer, the attention from that token to the tokens
of its images (video frames, audio windows), per decoder layer and head, and aggregated over the
layers; drawn over the pictures and written as numbers (`omnilm inspect attention`).

    maps = look(model, processor, message)       # greedy answer, then one recorded forward over it
    rollout(attentions)                           # Abnar & Zuidema 2020
    gradient_rollout(attentions, gradients)       # Chefer et al. 2021
    write_maps(maps, out)                         # attention-<k>.png, heads-<k>.png, attention.json

Answer token k is read at the position that chose it: the query whose logits gave it (the prompt's
last position for the first token). The decoder's attention is recorded (`record_attention`) over
one forward of the prompt and the answer together, the same probabilities the cached decoding
used, without recording inside the decoding loop. Shape letters: n answer tokens, L decoder
layers, H query heads, S sequence length, P media cells (every span's grid cells, in order).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilm.data import Processor
from omnilm.data.collate import to_device
from omnilm.errors import OmniInputError
from omnilm.infer.generate import as_id_list, generate
from omnilm.model.layers import eval_mode, record_attention

# How each aggregate turns the per-layer attention into one map; written beside its numbers.
AGGREGATES = {
    "rollout": "attention rollout (Abnar & Zuidema 2020): each layer's head mean A becomes (A + I) with rows "
               "renormalised to 1 (= A / 2 + I / 2: the residual carries half), multiplied from the first layer to "
               "the last; the answer token's row",
    "gradient": "gradient-weighted rollout (Chefer et al. 2021, rule 6): each layer's mean over heads of "
                "(dlogit/dA * A) clamped at 0, with R = I, R <- R + A_bar R from the first layer to the last; "
                "dlogit is the chosen token's logit",
    "last_layer": "the last decoder layer's attention, averaged over heads",
}


@dataclass
class Span:
    """One picture the decoder reads: an image, a video frame or an audio window, as the sequence
    positions of its grid cells (row-major) and the grid's (rows, columns)."""

    kind: str  # "image", "video frame" or "audio window"
    index: int  # the k-th of its kind in the prompt
    positions: list[int]
    grid: tuple[int, int]


@dataclass
class AttentionMaps:
    """Where each answer token looked. `heads` (n, L, H, P) are attention probabilities from the
    token's query to each media cell; `aggregates` name -> (n, P) (see AGGREGATES)."""

    question: str
    answer: str
    tokens: list[str]
    token_ids: list[int]
    queries: list[int]  # the query position of each answer token
    spans: list[Span]
    heads: torch.Tensor
    aggregates: dict[str, torch.Tensor]
    backgrounds: list[np.ndarray]  # per span what it shows: RGB (h, w, 3) in [0, 1], or a log-mel (M, F)

    def per_span(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(..., P) -> per span (..., rows, columns)."""
        sizes = [len(s.positions) for s in self.spans]
        return [v.unflatten(-1, s.grid) for v, s in zip(values.split(sizes, dim=-1), self.spans)]


# --- where the media sit ----------------------------------------------------------------------


def check_attends_to_media(config) -> None:
    """Refuse, in one line, a model whose decoder has no media tokens to attend to: a text-only one,
    or one that fuses images late or by cross-attention (they stay out of its sequence)."""
    if config.vision is None and config.audio is None:
        raise OmniInputError("this is a text-only model: it reads no image, video or audio, so there is nothing "
                             "for its attention to be mapped over")
    if config.fusion in ("late", "cross_attention"):
        raise OmniInputError(f"this model fuses images {config.fusion.replace('_', '-')}: they stay out of the "
                             "decoder's sequence, so no token attends to them; attention maps need joint or early "
                             "fusion")


def media_spans(input_ids: list[int], config) -> list[Span]:
    """The grids of every image, video frame and audio window in `input_ids` (markers expanded),
    for a model whose decoder reads them in its sequence (`check_attends_to_media`): row breaks of
    early fusion and a class token kept by `vision_feature_select` "full" are no cells."""
    check_attends_to_media(config)
    spans = []
    if config.vision is not None:
        side = config.vision.image_size // config.vision.patch_size
        if config.fusion == "early":  # each row of patches, then its break
            cells = [r * (side + 1) + c for r in range(side) for c in range(side)]
        else:  # vision_feature_select "full" keeps the class token first
            cells = list(range(config.image_seq_len - side * side, config.image_seq_len))
        spans += _spans(input_ids, config.image_token_id, config.image_seq_len, cells, (side, side), "image")
        if config.video_token_id is not None:
            g = side // config.video_pool_stride
            spans += _spans(input_ids, config.video_token_id, g * g, list(range(g * g)), (g, g), "video frame")
    if config.audio is not None:
        n = config.audio_seq_len
        spans += _spans(input_ids, config.audio_token_id, n, list(range(n)), (1, n), "audio window")
    return spans


def _spans(input_ids: list[int], marker: int, length: int, cells: list[int], grid: tuple[int, int],
           kind: str) -> list[Span]:
    """Every run of `length` `marker` tokens, in order, as a span of the run's `cells`."""
    at = [t for t, token in enumerate(input_ids) if token == marker]
    return [Span(kind, k, [at[k * length + c] for c in cells], grid) for k in range(len(at) // length)]


# --- aggregates -------------------------------------------------------------------------------


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-layer attention (H, S, S), first layer first:
    (S, S), row t the share of position t's last hidden state that flows from each input position.
    Each layer's head mean A becomes A + I (the residual stream), its rows renormalised to 1, and
    the layers multiply: R = Â_L ... Â_1."""
    eye = torch.eye(attentions[0].shape[-1], dtype=torch.float64, device=attentions[0].device)
    relevance = eye
    for a in attentions:
        a = a.double().mean(0) + eye
        relevance = (a / a.sum(-1, keepdim=True)) @ relevance
    return relevance


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted relevance (Chefer et al. 2021, "Generic Attention-model Explainability",
    eqs. 5-6) of per-layer attention (H, S, S) and the gradients of one output with respect to it:
    Ā = mean over heads of (∇A ⊙ A) clamped at 0, and R = I, R <- R + Ā R, first layer first; (S, S)."""
    relevance = torch.eye(attentions[0].shape[-1], dtype=torch.float64, device=attentions[0].device)
    for a, g in zip(attentions, gradients):
        relevance = relevance + (g.double() * a.double()).clamp(min=0).mean(0) @ relevance
    return relevance


# --- the answer, and where it looked ----------------------------------------------------------


def look(model, processor: Processor, message: dict, max_new_tokens: int = 16) -> AttentionMaps:
    """Answer `message` (a user turn with its images, videos or audio) greedily, then record the
    decoder's attention over the prompt and the answer (its stop token left out) in one forward,
    and take each answer token's row: per layer and head, and aggregated (AGGREGATES)."""
    if max_new_tokens < 1:
        raise OmniInputError(f"max_new_tokens is {max_new_tokens}: the answer needs at least one token to map")
    device = next(model.parameters()).device
    batch = to_device(processor([message]), device)
    media = {k: batch.get(k) for k in ("pixel_values", "pixel_values_videos", "input_features")}
    prompt = batch["input_ids"]
    spans = media_spans(prompt[0].tolist(), model.config)
    if not spans:
        raise OmniInputError("the message holds no image, video or audio: attention maps show where the answer "
                             "looks in them")
    answer = generate(model, prompt, attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                      **media)[0].tolist()
    stops = as_id_list(model.config.text.eos_token_id)
    answer = answer[:next((i for i, t in enumerate(answer) if t in stops), len(answer))]
    if not answer:
        raise OmniInputError("the model answered with its stop token alone: there is no answer token to map")
    ids = torch.cat([prompt, torch.tensor([answer], device=device)], dim=1)
    queries = list(range(prompt.shape[1] - 1, ids.shape[1] - 1))
    cells = torch.tensor([p for s in spans for p in s.positions], device=device)

    with eval_mode(model), _gradients(model), record_attention(model.llm) as records:
        logits = model(ids, **media).logits[0]  # (S, V)
    recorded = [records[f"layers.{i}.self_attn"][0] for i in range(len(model.llm.layers))]  # (1, H, S, S) each
    attentions = [a[0].detach() for a in recorded]
    heads = torch.stack([a[:, queries][..., cells] for a in attentions]).permute(2, 0, 1, 3)  # (n, L, H, P)
    relevance = rollout(attentions)
    gradient = []
    for q, token in zip(queries, answer):
        grads = torch.autograd.grad(logits[q, token], recorded, retain_graph=True)
        gradient.append(gradient_rollout(attentions, [g[0] for g in grads])[q, cells])
    aggregates = {"rollout": relevance[queries][:, cells], "gradient": torch.stack(gradient),
                  "last_layer": heads[:, -1].mean(1)}
    tokenizer = processor.tokenizer
    return AttentionMaps(
        question=_text(message), answer=tokenizer.decode(answer, skip_special_tokens=True).strip(),
        tokens=[tokenizer.decode([t], skip_special_tokens=False) for t in answer], token_ids=answer,
        queries=queries, spans=spans, heads=heads.detach().float().cpu(),
        aggregates={k: v.float().cpu() for k, v in aggregates.items()},
        backgrounds=_backgrounds(spans, media, processor))


@contextmanager
def _gradients(model) -> Iterator[None]:
    """Gradients on, with every parameter requiring them, so that the recorded attention is in the
    autograd graph whatever a caller froze; each parameter's own flag comes back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _text(message: dict) -> str:
    return " ".join(part["text"] for part in message["content"] if part["type"] == "text")


def _backgrounds(spans: list[Span], media: dict[str, Any], processor: Processor) -> list[np.ndarray]:
    """What each span shows: its image or frame as the model saw it (preprocessed, then
    un-normalised to RGB in [0, 1]), or its audio window's log-mel."""
    frames = media["pixel_values_videos"]
    if isinstance(frames, (list, tuple)):  # videos of different lengths
        frames = torch.cat(list(frames))
    elif frames is not None:  # (V, F, 3, H, W)
        frames = frames.flatten(0, 1)
    shown = {"image": media["pixel_values"], "video frame": frames, "audio window": media["input_features"]}
    out = []
    for span in spans:
        x = shown[span.kind][span.index].detach().float().cpu()
        if span.kind != "audio window":
            p = processor.image_processor
            x = (x * torch.tensor(p.image_std)[:, None, None] + torch.tensor(p.image_mean)[:, None, None])
            x = x.clamp(0, 1).permute(1, 2, 0)
        out.append(x.numpy())
    return out


# --- pictures and numbers ---------------------------------------------------------------------


def write_maps(maps: AttentionMaps, out: str | Path) -> list[Path]:
    """Write, for answer token k, attention-<k>.png (each aggregate over each span's picture) and
    heads-<k>.png (every layer's and head's attention over the spans), and attention.json with
    every number; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, token in enumerate(maps.tokens):
        title = f"answer token {k} {token.strip()!r} of {maps.answer!r}"
        written.append(out / f"attention-{k}.png")
        plot_aggregates(maps, k, written[-1], title)
        written.append(out / f"heads-{k}.png")
        plot_heads(maps, k, written[-1], title)
    written.append(out / "attention.json")
    written[-1].write_text(json.dumps(maps_to_json(maps)) + "\n")
    return written


def format_maps(maps: AttentionMaps) -> str:
    """A Markdown table: per answer token, where each aggregate peaks (span, row, column) and its
    value there."""
    names = list(maps.aggregates)
    lines = [f"answer: {maps.answer}", "", "| # | token | " + " | ".join(n.replace("_", " ") + " peak" for n in names)
             + " |", "|---:|---|" + "---|" * len(names)]
    for k, token in enumerate(maps.tokens):
        cells = []
        for name in names:
            grids = maps.per_span(maps.aggregates[name][k])
            i = max(range(len(grids)), key=lambda j: float(grids[j].max()))
            r, c = divmod(int(grids[i].argmax()), grids[i].shape[1])
            cells.append(f"{maps.spans[i].kind} {maps.spans[i].index} ({r}, {c}) {float(grids[i].max()):.3f}")
        lines.append(f"| {k} | `{token}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def maps_to_json(maps: AttentionMaps) -> dict[str, Any]:
    """The numbers: per answer token and span, each aggregate (rows x columns) and the attention
    of every layer and head (L x H x rows x columns)."""
    def grids(values: torch.Tensor) -> list:
        return [np.round(v.numpy(), 6).tolist() for v in maps.per_span(values)]

    return {
        "question": maps.question, "answer": maps.answer, "methods": AGGREGATES,
        "query": "answer token k is read at the position whose logits chose it (the prompt's last for k = 0)",
        "spans": [{"kind": s.kind, "index": s.index, "grid": list(s.grid), "positions": s.positions}
                  for s in maps.spans],
        "tokens": [{"token": token, "id": token_id, "query_position": q,
                    **{name: grids(values[k]) for name, values in maps.aggregates.items()},
                    "layers": grids(maps.heads[k])}
                   for k, (token, token_id, q) in enumerate(zip(maps.tokens, maps.token_ids, maps.queries))],
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _overlay(ax, background: np.ndarray, grid: np.ndarray | None, vmax: float) -> None:
    """`grid` (rows, columns) stretched over `background` cell by cell, half transparent (None: the
    background alone)."""
    h, w = background.shape[:2]
    aspect = "auto" if background.ndim == 2 else None  # a log-mel fills its panel
    if background.ndim == 3:
        ax.imshow(background, extent=(0, w, h, 0))
    else:  # low frequencies at the bottom
        ax.imshow(background, extent=(0, w, h, 0), origin="lower", cmap="gray", aspect=aspect)
    if grid is not None:
        ax.imshow(grid, extent=(0, w, h, 0), cmap="inferno", alpha=0.55, vmin=0, vmax=vmax, interpolation="nearest",
                  aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_aggregates(maps: AttentionMaps, k: int, png: str | Path, title: str = "") -> None:
    """One row per span (a video's frames and an audio's windows make a strip), its picture then
    each aggregate over it, one colour scale per aggregate across the rows."""
    plt = _pyplot()
    names = list(maps.aggregates)
    fig, axes = plt.subplots(len(maps.spans), 1 + len(names), figsize=(0.4 + 2 * (1 + len(names)),
                             0.7 + 2 * len(maps.spans)), dpi=80, squeeze=False)
    for col, name in enumerate(names, start=1):
        grids = maps.per_span(maps.aggregates[name][k])
        vmax = max(float(g.max()) for g in grids) or 1.0
        for row, grid in enumerate(grids):
            _overlay(axes[row, col], maps.backgrounds[row], grid.numpy(), vmax)
        axes[0, col].set_title(name.replace("_", " "), fontsize=9)
    for row, (span, background) in enumerate(zip(maps.spans, maps.backgrounds)):
        _overlay(axes[row, 0], background, None, 1.0)
        axes[row, 0].set_ylabel(f"{span.kind} {span.index}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_heads(maps: AttentionMaps, k: int, png: str | Path, title: str = "") -> None:
    """A layers x heads table of heatmaps: each panel the spans' grids side by side (a blank column
    between), one colour scale per layer, so that a layer's heads compare."""
    plt = _pyplot()
    n_layers, n_heads = maps.heads.shape[1:3]
    rows = max(s.grid[0] for s in maps.spans)
    blank = np.full((rows, 1), np.nan)
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(0.6 + 1.1 * n_heads, 0.6 + 1.1 * n_layers), dpi=80,
                             squeeze=False)
    for layer in range(n_layers):
        vmax = float(maps.heads[k, layer].max()) or 1.0
        for head in range(n_heads):
            parts = []
            for grid in maps.per_span(maps.heads[k, layer, head]):
                g = grid.numpy()
                parts += [np.pad(g, ((0, rows - g.shape[0]), (0, 0)), constant_values=np.nan), blank]
            ax = axes[layer, head]
            ax.imshow(np.concatenate(parts[:-1], axis=1), cmap="inferno", vmin=0, vmax=vmax, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=7)
        axes[layer, 0].set_ylabel(f"layer {layer}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
