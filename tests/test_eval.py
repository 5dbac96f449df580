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


def test_questions_check_their_records():
    # questions() runs the validator training uses: a bad record or nothing to ask is a one-line error.
    from conftest import one_line_error

    records = [r for ex in (sw.make_example(i, 0, "test") for i in range(3)) for r in ex.records]
    bad = [*records[:2], {"id": "q", "conversations": [{"from": "human", "value": "<Image>\nWhat?"},
                                                       {"from": "gpt", "value": "red"}], "image": "a.png"}]
    one_line_error(lambda: questions(bad), "record 2 (id 'q'): conversations[0].value holds '<Image>'")
    captions = [r for r in records if r["task"] == "caption"]
    one_line_error(lambda: questions(captions), "no records other than those with task in ['caption']")
    one_line_error(lambda: questions([]), "holds no records")


def test_skipped_records_are_shown_under_the_table():
    summary = summarize([{"task": "colour", "correct": True}])
    summary["skipped"] = {"records": 2, "of": 3, "kinds": {"bad image": 2}, "report": "data.json: skipped 2 of 3"}
    assert format_vqa_results(summary).endswith("| **overall** | 1 | **100.0%** |\n\ndata.json: skipped 2 of 3")
