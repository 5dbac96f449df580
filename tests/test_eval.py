"""VQA scoring: accuracy per task family and, for ShapeWorld, per number of objects in the scene."""

import collections

from omnilm.data import shapeworld as sw
from omnilm.eval.vqa import format_vqa_results, questions, summarize


def test_accuracy_is_split_by_objects_in_the_scene():
    # A model that reads a lone object but cannot pick one out of several: right on one-object
    # scenes only. The split must show exactly that, with the question counts of the records.
    examples = [sw.make_example(i, 0, "test") for i in range(60)]
    expected = collections.defaultdict(collections.Counter)  # task -> objects -> questions
    for ex in examples:
        record = ex.records[1]
        for task in record.get("turn_tasks") or [record["task"]]:
            expected[task][len(ex.scene)] += 1
            expected["overall"][len(ex.scene)] += 1
    items = questions([r for ex in examples for r in ex.records])
    predictions = [{**q, "correct": q["n_objects"] == 1} for q in items]
    summary = summarize(predictions)

    assert set(summary["objects"]) == set(expected)
    for task, by_k in summary["objects"].items():
        assert {k: r["n"] for k, r in by_k.items()} == dict(expected[task])
        assert all(r["accuracy"] == (1.0 if k == 1 else 0.0) for k, r in by_k.items())
    assert list(summary["objects"])[-1] == "overall"
    assert summary["accuracy"] == expected["overall"][1] / len(items)
    table = format_vqa_results(summary)
    assert f"| **overall** | 100.0% ({expected['overall'][1]}) | 0.0% ({expected['overall'][2]}) |" in table


def test_records_without_object_counts_get_no_split():
    predictions = [{"task": "colour", "correct": True}, {"task": "colour", "correct": False}]
    summary = summarize(predictions)
    assert "objects" not in summary and summary["tasks"]["colour"] == {"n": 2, "accuracy": 0.5}
    assert "objects in the scene" not in format_vqa_results(summary)
