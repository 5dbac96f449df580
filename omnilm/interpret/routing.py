"""Where a mixture-of-experts decoder sends tokens: numbers for training logs, a heatmap, and a
per-token table for one prompt (`omnilm inspect routing`).

    summarize_routing(routing)   -> {"aux_loss", "z_loss", "dropped", "load": [[share per expert] per MoE layer]}
    plot_load(load, png)          layers x experts heatmap of the share of tokens each expert got
    route_prompt(model, tokenizer, batch)  -> per token: the experts (and weights) each MoE layer chose
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omnilm.model.layers import eval_mode
from omnilm.model.moe import Routing


def summarize_routing(routing: list[Routing]) -> dict[str, Any]:
    """Plain numbers for a metrics row: the router losses and drop rate averaged over the MoE
    layers, and each layer's expert load (share of kept assignments per expert)."""
    if not routing:
        return {}
    mean = lambda xs: float(torch.stack([x.detach().float() for x in xs]).mean())  # noqa: E731
    return {"aux_loss": round(mean([r.aux_loss for r in routing]), 6),
            "z_loss": round(mean([r.z_loss for r in routing]), 6),
            "dropped": round(mean([r.dropped for r in routing]), 6),
            "load": [[round(v, 4) for v in r.load.tolist()] for r in routing]}


def plot_load(load: list[list[float]], png: str | Path, title: str = "", layer_ids: list[int] | None = None) -> None:
    """Heatmap of expert load: one row per MoE layer, one column per expert, colour = share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.tensor(load, dtype=torch.float32)
    n_layers, n_experts = data.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n_experts, 1.2 + 0.45 * n_layers), dpi=110)
    image = ax.imshow(data.numpy(), cmap="viridis", vmin=0, aspect="auto")
    for i in range(n_layers):
        for j in range(n_experts):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if data[i, j] < 0.6 * data.max() else "black")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers), labels=[str(i) for i in (layer_ids or range(n_layers))])
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer" if layer_ids else "MoE layer")
    ax.set_title(title or f"expert load (uniform = {1 / n_experts:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of tokens")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


@torch.inference_mode()
def route_prompt(model, tokenizer, batch: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[list[float]]]:
    """For a single prompt (batch of 1): each token's text (decoded with `tokenizer`; None shows
    ids) and, per MoE layer, the experts it went to with their combine weights (-1: padding); and
    each layer's load over the prompt."""
    if not model.config.text.n_experts:
        raise ValueError("this model has a dense decoder (n_experts = 0): there is no routing to show")
    with eval_mode(model):
        out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"), output_routing=True)
    ids = batch["input_ids"][0].tolist()
    rows = []
    for t, token_id in enumerate(ids):
        text = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)
        rows.append({"token": text, "id": token_id,
                     "experts": [r.experts[t].tolist() for r in out.routing],
                     "weights": [[round(w, 3) for w in r.weights[t].tolist()] for r in out.routing]})
    return rows, summarize_routing(out.routing)["load"]


def moe_layer_ids(model) -> list[int]:
    return [i for i, layer in enumerate(model.llm.layers) if layer.is_moe]


def format_routes(rows: list[dict[str, Any]], layer_ids: list[int]) -> str:
    """A Markdown table: token, then the experts of each MoE layer ("e3 .71, e5 .29")."""
    head = "| # | token | " + " | ".join(f"layer {i}" for i in layer_ids) + " |"
    lines = [head, "|---:|---|" + "---|" * len(layer_ids)]
    for t, row in enumerate(rows):
        token = row["token"].replace("|", "\\|").replace("\n", "\\n") or "␣"
        cells = [", ".join("dropped" if e < 0 else f"e{e} {w:.2f}".replace("0.", ".")
                           for e, w in zip(experts, weights))
                 for experts, weights in zip(row["experts"], row["weights"])]
        lines.append(f"| {t} | `{token}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
