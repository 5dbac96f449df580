"""Does the answer look at what it is about? Over held-out ShapeWorld questions, how often each
aggregated attention map (`omnilm.interpret.attention`) peaks on the cell of the object asked about
(`omnilm inspect attention-score`).

Question i comes from test example i drawn with `n_objects` objects (`make_example(i, seed,
"test", n_objects=...)`) and is asked alone with its image. With one object it is the example's
first question, of any family (the demo's test mix), and the object is the scene's only one; with
more, it is the first colour, shape or position question of the example asked every family, and the
object is the one the question names (`subject`). A map's peak is its largest patch, on the object
when the patch's centre lies in the object's cell (for the demo's 3 x 3 patch grid: the patch is
the cell). The answer's map is the mean of its tokens' maps; the first token's is scored too.
"""

from __future__ import annotations

from typing import Any

import torch

from omnilm.data import Processor
from omnilm.data.shapeworld import MAX_OBJECTS, Obj, make_example, subject
from omnilm.errors import OmniInputError
from omnilm.infer.chat import user_message
from omnilm.interpret.attention import look

GRID = 3  # ShapeWorld's scenes are 3 x 3 cells


def on_cell(grid: torch.Tensor, cell: int) -> bool:
    """Whether the largest value of `grid` (rows, columns) lies on ShapeWorld cell `cell` (0..8 in
    reading order): its patch's centre inside that cell."""
    rows, cols = grid.shape
    r, c = divmod(int(grid.argmax()), cols)
    return (int((r + 0.5) * GRID / rows), int((c + 0.5) * GRID / cols)) == divmod(cell, GRID)


def grounding_score(model, processor: Processor, n: int = 200, seed: int = 0, n_objects: int = 1,
                    max_new_tokens: int = 8) -> dict[str, Any]:
    """Ask `n` held-out questions about one object of scenes of `n_objects`; per aggregate, the share
    whose map peaks on that object (over the answer's tokens, and for its first token alone),
    overall and per question family, with the share answered right and each question's record."""
    if n < 1:
        raise OmniInputError(f"n is {n}: score at least one question")
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise OmniInputError(f"n_objects is {n_objects}: a scene holds 1 to {MAX_OBJECTS} objects")
    rows = []
    for index in range(n):
        example = make_example(index, seed, "test", n_objects=n_objects, questions="mixed" if n_objects == 1 else "all")
        family, question, expected, obj = _question(example)
        maps = look(model, processor, user_message(question, [example.image]), max_new_tokens)
        rows.append({"index": index, "family": family, "question": question, "expected": expected,
                     "answer": maps.answer, "cell": obj.position,
                     "on_object": {name: on_cell(maps.per_span(values.mean(0))[0], obj.cell)
                                   for name, values in maps.aggregates.items()},
                     "first_token_on_object": {name: on_cell(maps.per_span(values[0])[0], obj.cell)
                                               for name, values in maps.aggregates.items()}})

    def share(subset: list[dict], key: str) -> dict[str, float]:
        return {name: sum(r[key][name] for r in subset) / len(subset) for name in subset[0][key]}

    families = sorted({r["family"] for r in rows})
    return {"n": n, "seed": seed, "split": "test", "n_objects": n_objects,
            "answered_right": sum(r["answer"].lower().rstrip(".") == r["expected"] for r in rows) / n,
            "peak_on_object": share(rows, "on_object"),
            "first_token_peak_on_object": share(rows, "first_token_on_object"),
            "by_family": {f: {"n": sum(r["family"] == f for r in rows),
                              **share([r for r in rows if r["family"] == f], "on_object")} for f in families},
            "questions": rows}


def _question(example) -> tuple[str, str, str, Obj]:
    """(family, question, answer, the object it asks about) of a test example (see the module's
    docstring), its question without the image marker."""
    record, scene = example.records[1], example.scene
    turns = record["conversations"]
    for family, asked, answer in zip(record.get("turn_tasks", [record["task"]]), turns[::2], turns[1::2]):
        question = asked["value"].removeprefix("<image>\n")
        obj = scene[0] if len(scene) == 1 else subject(family, question, scene)
        if obj is not None:
            return family, question, answer["value"], obj
    raise ValueError(f"{record['id']} asks about no single object")  # "all" asks colour of every scene


def format_grounding(summary: dict[str, Any]) -> str:
    """A Markdown table: per aggregate, the share of maps peaking on the object, overall and by family;
    chance is one cell of nine."""
    names = list(summary["peak_on_object"])
    families = list(summary["by_family"])
    lines = [f"{summary['n']} held-out questions about one object of {summary['n_objects']} (ShapeWorld test split, "
             f"seed {summary['seed']}); answered right: {summary['answered_right']:.1%}; chance: {1 / GRID ** 2:.1%}",
             "", "| aggregate | answer's map | first token's map | " + " | ".join(
                 f"{f} ({summary['by_family'][f]['n']})" for f in families) + " |",
             "|---|---:|---:|" + "---:|" * len(families)]
    for name in names:
        cells = [f"{summary['by_family'][f][name]:.1%}" for f in families]
        lines.append(f"| {name} | {summary['peak_on_object'][name]:.1%} | "
                     f"{summary['first_token_peak_on_object'][name]:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
