"""In-context learning, measured against the number of shots: `omnilm eval icl CKPT`.

For every attribute (colour, shape), number of words N (`--ways`) and shots k (`--shots`),
`--n` episodes of `omnilm.data.icl` are drawn on held-out images (the test split's pool), each
with one query, answered greedily and scored by exact match after `normalize_answer`, as `omnilm
eval` scores. A model that names what it sees before the word (`omnilm demo-icl`'s, "red dax":
`--describe`, the default) is scored on the word, and the names in its shots are its own: each
shot's image is first asked the turn's question alone ("What colour?"), and its answer stands in
the shot beside the prompt's word, so that the prompt holds only images and words. Nonsense
words come from the held-out set by default (`--words train`: the training set's). The controls,
each on the same grid:

    real       the attribute's own names: what perception alone reaches (the ceiling)
    shuffled   the own names on the wrong values: the share of answers that follow the prompt
               (reported as accuracy) and of those that name what the image shows instead; the
               headline counts the episodes with shots (with none, nothing binds a name)
    ambiguous  each word's first shot confounds colour and shape, and the query's colour points
               to one word, its shape to another: one shot each leaves chance, more shots settle it

Written to `--out`: icl.csv (one row per cell: variant, attribute, ways, shots, n, correct,
accuracy and its 95% Wilson interval, for shuffled the share naming the image, and the share of
the shots' names the model gave right), icl.png (accuracy against shots, one panel per attribute,
beside Frozen's published figures) and predictions.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.data.icl import (ATTRIBUTES, MAX_SHOTS, VALUES, VARIANTS, WORD_SETS, Episode, episode_attributes,
                             icl_rng, index_pool, make_episode, turn_question, write_pool)
from omnilm.data.processor import Processor
from omnilm.errors import OmniInputError
from omnilm.eval.niah import wilson_interval
from omnilm.eval.vqa import evaluate_vqa, normalize_answer
from omnilm.io import atomic_write, write_csv, write_text
from omnilm.model import OmniModel
from omnilm.model.layers import resolve_device
from omnilm.model.vision import FeatureCache
from omnilm.settings import check_output_folder, check_range, check_seed, setting

CONTROLS = tuple(v for v in VARIANTS if v != "novel")
CSV_FIELDS = ["variant", "attribute", "ways", "shots", "n", "correct", "accuracy", "ci_low", "ci_high",
              "named_image", "shots_named"]  # icl.csv, a row per cell
POOL = 600  # held-out single-object images the evaluation draws from: 20 of each colour and shape
# Frozen (Tsimpoukelli et al. 2021, Table 2): open-ended fast binding on miniImageNet, 2-way, with the
# task instruction, accuracy at 1, 3 and 5 shots; 5-way stays near chance.
FROZEN_2WAY = {1: 0.534, 3: 0.579, 5: 0.589}


@dataclass(kw_only=True)
class IclEvalArgs:
    """`omnilm eval icl`: accuracy against shots on new words for colours and shapes."""

    checkpoint: Path = setting(help="model folder with its tokenizer (omnilm demo-icl's model/)", positional=True)
    ways: tuple[int, ...] = setting((2, 5), "words per episode, comma-separated")
    shots: tuple[int, ...] = setting((0, 1, 2, 4, 8), f"examples of each word before the query, comma-separated "
                                                       f"(0 to {MAX_SHOTS})")
    words: str = setting("held-out", "nonsense words no training record used (held-out) or the training ones "
                                     "(train)", choices=WORD_SETS)
    attributes: tuple[str, ...] = setting(ATTRIBUTES, "what the words name: colour, shape, or both, comma-separated")
    controls: tuple[str, ...] = setting(CONTROLS, "controls run on the same grid, comma-separated: real (the own "
                                                  "names), shuffled (the own names on the wrong values), ambiguous "
                                                  "(first shots confound colour and shape); 'none' for none")
    describe: bool = setting(True, "the model names what each image shows before the word ('red dax'), as "
                                   "omnilm demo-icl's does: scored on the word, the shots' names its own answers "
                                   "about their images; --no-describe: the answer is the word alone")
    n: int = setting(200, "episodes per cell (attribute x ways x shots, per variant)")
    seed: int = setting(0, "seed of the episodes")
    out: Path = setting(Path("runs/icl"), "folder for icl.csv, icl.png, predictions.jsonl and the held-out images")
    batch_size: int = setting(32, "episodes per generation batch")
    device: str = setting("auto", "auto (CUDA when there is one), cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        check_seed(self)
        check_range(self, ("n", "batch_size"), low=1)
        self.attributes = tuple(self.attributes)
        self.controls = () if tuple(self.controls) in ((), ("none",)) else tuple(self.controls)
        for name, given, allowed in (("attributes", self.attributes, ATTRIBUTES),
                                     ("controls", self.controls, CONTROLS)):
            bad = [v for v in given if v not in allowed]
            if bad or (name == "attributes" and not given):
                raise OmniInputError(f"--{name} {','.join(given)}: choose from {', '.join(allowed)}")
        try:
            self.ways, self.shots = tuple(int(w) for w in self.ways), tuple(int(k) for k in self.shots)
        except (TypeError, ValueError):
            raise OmniInputError("--ways and --shots take whole numbers, comma-separated") from None
        most = max(len(VALUES[a]) for a in self.attributes)
        if not self.ways or not all(2 <= w <= most for w in self.ways):
            raise OmniInputError(f"--ways {','.join(map(str, self.ways))}: give 2 to {most} words per episode")
        if not self.shots or not all(0 <= k <= MAX_SHOTS for k in self.shots):
            raise OmniInputError(f"--shots {','.join(map(str, self.shots))}: give 0 to {MAX_SHOTS} examples per word")
        if self.words not in WORD_SETS:
            raise OmniInputError(f"--words {self.words!r}: choose held-out or train")
        resolve_device(self.device)
        check_output_folder(self.out, "--out")


def cells(args: IclEvalArgs) -> list[Episode]:
    """Every cell of the grid, the nonsense words first, then each control; ways beyond an
    attribute's values (6 of 5 shapes; ambiguous: of either attribute) are left out."""
    return [Episode(attribute, ways, shots, variant, args.words, describe=args.describe)
            for variant in ("novel", *args.controls) for attribute in args.attributes for ways in args.ways
            if ways <= min(len(VALUES[a]) for a in episode_attributes(attribute, variant))
            for shots in args.shots]


def episode_records(args: IclEvalArgs, folder: Path) -> list[dict]:
    """The evaluation's episodes, `args.n` per cell, their images in `folder/images/`."""
    by_value = index_pool(write_pool(folder, "test", args.seed, POOL))
    records = []
    for cell in cells(args):
        name = f"{cell.variant}-{cell.attribute}-{cell.ways}-{cell.shots}"
        for i in range(args.n):
            records.append(make_episode(icl_rng(f"eval-{name}", args.seed, i), by_value, cell, f"{name}-{i:04d}"))
    return records


def name_shots(model, processor: Processor, records: list[dict], folder: Path, batch_size: int = 32,
               progress: bool = True) -> None:
    """Put the model's own names in the shots of described episodes (every answer before the last):
    each shot's image is asked the turn's question alone ("What colour?", both attributes for an
    ambiguous episode), and the first word of its answer replaces the name the episode was drawn
    with, beside the prompt's word. Each record's "icl" gets "shots_named": how many of its shots
    the model named right, and of how many."""
    described = [(r, episode_attributes(r["icl"]["attribute"], r["icl"]["variant"])) for r in records
                 if r["icl"]["describe"] and r["icl"]["form"] == "image"]
    asked: dict[str, dict] = {}
    for r, attributes in described:
        for path in r["image"][:-1]:
            for attribute in attributes:
                asked.setdefault(f"{path}|{attribute}", {"id": f"{path}|{attribute}", "image": path, "conversations": [
                    {"from": "human", "value": f"<image> {turn_question(attribute)}"}, {"from": "gpt", "value": "-"}]})
    said = evaluate_vqa(model, processor, list(asked.values()), folder, batch_size=batch_size, max_new_tokens=2,
                        progress=progress)[1] if asked else []
    names = {p["id"]: (normalize_answer(p["prediction"]).split() or ["-"])[0] for p in said}
    for r, attributes in described:
        answers = [turn for turn in r["conversations"] if turn["from"] == "gpt"][:-1]
        right = 0
        for turn, path in zip(answers, r["image"]):
            *truth, word = turn["value"].split()
            given = [names[f"{path}|{attribute}"] for attribute in attributes]
            right += given == truth
            turn["value"] = " ".join([*given, word])
        r["icl"]["shots_named"] = [right, len(answers)]


def evaluate_icl(model, processor: Processor, args: IclEvalArgs,
                 progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Score every cell; returns its rows (as icl.csv has them) and every prediction."""
    args.out.mkdir(parents=True, exist_ok=True)
    records = episode_records(args, args.out)
    cache = model.feature_cache
    if cache is None and model.vision is not None:  # the episodes share a pool of images: encode each once
        model.feature_cache = FeatureCache(2**30)
    try:  # an answer is a name or two and a word: a few tokens
        name_shots(model, processor, records, args.out, args.batch_size, progress)
        _, predictions = evaluate_vqa(model, processor, records, args.out, batch_size=args.batch_size,
                                      max_new_tokens=4, progress=progress, last_only=True)
    finally:
        model.feature_cache = cache
    by_id = {r["id"]: r for r in records}
    grouped: dict[tuple, list[dict]] = {}
    for p in predictions:
        info = by_id[p["id"]]["icl"]
        said = normalize_answer(p["prediction"])
        if info["describe"]:  # scored on the word, after the names of what the image shows
            said = (said.split() or [""])[-1]
            p["correct"] = said == normalize_answer(info["answers"][0])
        p["named_image"] = said == info["names"][0]
        p.update({k: info[k] for k in ("variant", "attribute", "ways", "shots")})
        p["shots_named"] = info.get("shots_named", [0, 0])
        grouped.setdefault((info["variant"], info["attribute"], info["ways"], info["shots"]), []).append(p)
    rows = []
    for (variant, attribute, ways, shots), group in grouped.items():
        correct, n = sum(p["correct"] for p in group), len(group)
        low, high = wilson_interval(correct, n)
        named = [sum(k) for k in zip(*(p["shots_named"] for p in group))]
        rows.append({"variant": variant, "attribute": attribute, "ways": ways, "shots": shots, "n": n,
                     "correct": correct, "accuracy": correct / n, "ci_low": low, "ci_high": high,
                     "named_image": sum(p["named_image"] for p in group) / n,
                     "shots_named": named[0] / named[1] if named[1] else None})
    return rows, predictions


def shuffled_shares(rows: list[dict]) -> tuple[float, float] | None:
    """Of the shuffled-label episodes with at least one shot, the share of answers that follow the
    prompt's label and the share that name what the image shows (None without such episodes). With
    no shots the prompt binds no name to a value, so there is nothing to follow."""
    shown = [r for r in rows if r["variant"] == "shuffled" and r["shots"] > 0]
    if not shown:
        return None
    n = sum(r["n"] for r in shown)
    return sum(r["correct"] for r in shown) / n, sum(r["named_image"] * r["n"] for r in shown) / n


def format_icl(rows: list[dict]) -> str:
    """Accuracy per cell as markdown: a row per variant, attribute and ways, a column per shot count."""
    shots = sorted({r["shots"] for r in rows})
    lines = ["| words | attribute | ways | chance | " + " | ".join(f"{k} shot{'s' * (k != 1)}" for k in shots) + " |",
             "|---|---|---:|---:|" + "---:|" * len(shots)]
    table: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        table.setdefault((r["variant"], r["attribute"], r["ways"]), {})[r["shots"]] = r
    for (variant, attribute, ways), by_shots in table.items():
        cells_ = [f"{100 * by_shots[k]['accuracy']:.1f} ({100 * by_shots[k]['ci_low']:.0f}–"
                  f"{100 * by_shots[k]['ci_high']:.0f})" if k in by_shots else "–" for k in shots]
        lines.append(f"| {variant} | {attribute} | {ways} | {100 / ways:.0f} | " + " | ".join(cells_) + " |")
    shuffled = shuffled_shares(rows)
    if shuffled:
        follow, image = shuffled
        lines += ["", f"Shuffled labels, 1 shot or more: {100 * follow:.1f}% of answers follow the prompt's label, "
                      f"{100 * image:.1f}% name what the image shows."]
    named = [(r["shots_named"], r["n"] * r["ways"] * r["shots"]) for r in rows if r.get("shots_named") is not None]
    if named:
        share = sum(s * w for s, w in named) / sum(w for _, w in named)
        lines += ["", f"Answers name what the image shows, then the word, and are scored on the word. The shots' "
                      f"names are the model's own: {100 * share:.1f}% of them say what the image shows (lowest cell "
                      f"{100 * min(s for s, _ in named):.1f}%)."]
    return "\n".join(lines) + "\n\nAccuracy % (95% Wilson interval); chance is 1/ways."


def plot_icl(rows: list[dict], png: str | Path, title: str = "in-context learning on ShapeWorld") -> None:
    """Accuracy against shots, a panel per attribute, a line per variant and ways (95% intervals
    as bands), chance dashed, and Frozen's 2-way figures for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = [a for a in ATTRIBUTES if any(r["attribute"] == a for r in rows)]
    fig, axes = plt.subplots(1, len(attributes), figsize=(6 * len(attributes), 4.2), squeeze=False)
    styles = {"novel": "-", "real": ":", "shuffled": "-.", "ambiguous": "--"}
    for ax, attribute in zip(axes[0], attributes):
        lines: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["attribute"] == attribute:
                lines.setdefault((r["variant"], r["ways"]), []).append(r)
        for (variant, ways), points in sorted(lines.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])):
            points.sort(key=lambda r: r["shots"])
            x = [r["shots"] for r in points]
            line, = ax.plot(x, [100 * r["accuracy"] for r in points], styles[variant], marker="o", markersize=3,
                            label=f"{variant}, {ways}-way")
            ax.fill_between(x, [100 * r["ci_low"] for r in points], [100 * r["ci_high"] for r in points],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        for ways in sorted({w for _, w in lines}):
            ax.axhline(100 / ways, color="grey", linewidth=0.8, linestyle="--")
        ax.plot(list(FROZEN_2WAY), [100 * v for v in FROZEN_2WAY.values()], "s", color="black", markersize=5,
                label="Frozen, 2-way (miniImageNet)")
        ax.set(title=f"words for {attribute}s", xlabel="shots per word", ylabel="accuracy (%)", ylim=(0, 102))
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(rows: list[dict], predictions: list[dict], out: Path) -> None:
    write_csv(out / "icl.csv", rows, CSV_FIELDS)
    plot_icl(rows, out / "icl.png")
    write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))


def run_icl_eval(args: IclEvalArgs, progress: bool = True) -> tuple[str, list[dict]]:
    """`omnilm eval icl`: evaluate, write the outputs, return the report and the rows."""
    model = OmniModel.from_pretrained(args.checkpoint, device=resolve_device(args.device)).eval()
    processor = Processor.for_model(model, args.checkpoint)
    rows, predictions = evaluate_icl(model, processor, args, progress)
    write_outputs(rows, predictions, args.out)
    return format_icl(rows) + f"\n\nWritten: {args.out / 'icl.csv'}, {args.out / 'icl.png'}", rows


def summary(rows: list[dict]) -> dict[str, Any]:
    """The headline figures the acceptance lines name, from `rows` (None where a cell is missing)."""

    def acc(variant: str, ways: int, shots: int, attributes=ATTRIBUTES) -> float | None:
        hit = [r for r in rows if r["variant"] == variant and r["ways"] == ways and r["shots"] == shots
               and r["attribute"] in attributes]
        return sum(r["correct"] for r in hit) / sum(r["n"] for r in hit) if hit else None

    shuffled = shuffled_shares(rows)
    return {"novel_2way": {k: acc("novel", 2, k) for k in sorted({r["shots"] for r in rows})},
            "novel_5way_colour_4shot": acc("novel", 5, 4, ("colour",)),
            "ambiguous_2way": {k: acc("ambiguous", 2, k) for k in sorted({r["shots"] for r in rows})},
            "shuffled_follow": shuffled[0] if shuffled else None}
