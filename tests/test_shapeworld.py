"""ShapeWorld: determinism, records, and ground truth checked against the rendered pixels.

The pixel oracle here reads objects back from an image (cell, colour, size, shape) with its
own simple rules, and answers each question by parsing the question text; so the tests
assert that the image shows what the text says, not only that the text agrees with itself.
"""

import collections
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omnilm.data import shapeworld as sw
from omnilm.eval.vqa import normalize_answer


# --- the pixel oracle ---------------------------------------------------------------------------


def _classify_shape(mask: np.ndarray) -> str:
    """Name the shape in a tight boolean mask from its row widths, fill and top/bottom mass."""
    h, w = mask.shape
    widths = mask.sum(1)
    fill = mask.mean()
    if fill > 0.9:
        return "square"
    if widths[0] == widths[h // 4] < w / 2 and widths[h // 2] == w:  # arm, then the full bar
        return "cross"
    if mask[: h // 2].sum() < 0.6 * mask[h - h // 2:].sum():  # mass at the bottom
        return "triangle"
    return "circle" if fill > 0.65 else "diamond"


def read_objects(image: Image.Image) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, cell name) of every object in reading order, from the pixels."""
    pixels = np.asarray(image).astype(int)
    S = pixels.shape[0]
    background = pixels[0, 0]  # shapes keep a 1 px margin inside their cell
    foreground = np.abs(pixels - background).max(-1) > 40
    palette = np.array([sw.COLOUR_RGB[c] for c in sw.COLOURS])
    edges = [round(i * S / 3) for i in range(4)]
    found = []
    for cell, name in enumerate(sw.CELLS):
        r, c = divmod(cell, 3)
        ys, xs = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
        mask = foreground[ys, xs]
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        tight = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        colour_rgb = np.median(pixels[ys, xs][mask], axis=0)
        colour = sw.COLOURS[int(np.argmin(((palette - colour_rgb) ** 2).sum(1)))]
        size = "large" if tight.shape[1] > 0.65 * S / 3 else "small"
        found.append((size, colour, _classify_shape(tight), name))
    return found


_C, _S, _P = "|".join(sw.COLOURS), "|".join(sw.SHAPES), "|".join(sorted(sw.CELLS, key=len, reverse=True))
_REF = rf"(?:(small|large) )?(?:({_C}) )?({_S}|object)(?: at the ({_P}))?"


def _resolve(words: tuple, objects: list) -> tuple:
    size, colour, shape, cell = words
    matches = [o for o in objects if (size in (None, o[0]) and colour in (None, o[1])
                                      and shape in ("object", o[2]) and cell in (None, o[3]))]
    assert len(matches) == 1, f"reference {words} picks {len(matches)} objects out of {objects}"
    return matches[0]


def answer_from_pixels(question: str, objects: list) -> str:
    """Answer a ShapeWorld question by parsing it against objects read from pixels."""
    grid = {name: divmod(i, 3) for i, name in enumerate(sw.CELLS)}
    if m := re.fullmatch(rf"What (?:colour is|is the colour of) the {_REF}\?", question):
        return _resolve(m.groups(), objects)[1]
    if m := re.fullmatch(rf"What (?:shape is|is the shape of) the {_REF}\?", question):
        return _resolve(m.groups(), objects)[2]
    if m := re.fullmatch(rf"Where is the {_REF}(?: in the image)?\?", question):
        return _resolve(m.groups(), objects)[3]
    if re.fullmatch(r"How many (shapes|objects) are there\?", question):
        return str(len(objects))
    if m := re.fullmatch(rf"How many ({_C}) shapes are there\?", question):
        return str(sum(o[1] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(sw.PLURALS[o[2]] == m[1] for o in objects))
    if m := re.fullmatch(rf"Is there an? ({_C}) ({_S})(?: in the image)?\?", question):
        return "yes" if any(o[1:3] == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(rf"Is the {_REF} (left of|to the left of|above) the {_REF}\?", question):
        a, b = _resolve(m.groups()[:4], objects), _resolve(m.groups()[5:], objects)
        axis = 0 if m[5] == "above" else 1  # row for above, column for left of
        return "yes" if grid[a[3]][axis] < grid[b[3]][axis] else "no"
    raise AssertionError(f"question in no known phrasing: {question!r}")


def _turns(record):
    convs = record["conversations"]
    return [(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(convs[::2], convs[1::2])]


# --- tests --------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_index_same_bytes_and_splits_differ():
    a, b = sw.make_example(7, 3, "train"), sw.make_example(7, 3, "train")
    assert _png(a.image) == _png(b.image) and a.records == b.records
    test = [sw.make_example(i, 3, "test") for i in range(20)]
    train = [sw.make_example(i, 3, "train") for i in range(20)]
    assert all(_png(x.image) != _png(y.image) for x, y in zip(train, test))
    assert sw.make_example(7, 4, "train").records != a.records  # the seed matters too
    # Text does not depend on the image size.
    assert sw.make_example(7, 3, "train", image_size=128).records == a.records


def test_determinism_across_processes():
    code = ("import hashlib, io, json; from omnilm.data.shapeworld import make_example as m; e = m(11, 5, 'test'); "
            "b = io.BytesIO(); e.image.save(b, format='PNG'); "
            "print(hashlib.sha256(b.getvalue() + json.dumps(e.records).encode()).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 2)]  # in parallel
    runs = [proc.communicate()[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    e = sw.make_example(11, 5, "test")
    here = hashlib.sha256(_png(e.image) + json.dumps(e.records).encode()).hexdigest()
    assert runs[0] == runs[1] == here + "\n"


def test_write_shapeworld_is_reproducible(tmp_path):
    paths = [sw.write_shapeworld(tmp_path / name, 12, seed=1, split="test") for name in ("a", "b")]
    assert paths[0] == tmp_path / "a" / "test.json"
    assert paths[0].read_bytes() == paths[1].read_bytes()
    records = json.loads(paths[0].read_text())
    assert len(records) == 24 and len({r["id"] for r in records}) == 24
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert [p.name for p in images] == [f"test_{i:06d}.png" for i in range(12)]
    for p in images:
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    assert all((tmp_path / "a" / r["image"]).is_file() for r in records)
    assert not list((tmp_path / "a").glob(".*tmp*"))  # the temp file was renamed away
    assert json.loads(sw.write_shapeworld(tmp_path / "a", 0, seed=1, split="test").read_text()) == []
    with pytest.raises(ValueError, match="split"):
        sw.write_shapeworld(tmp_path, 1, seed=1, split="../x")


def test_jitter_moves_shapes_and_nothing_else():
    # jitter 0 puts every shape's bounding box in the middle of its cell; the text never changes.
    for index in range(30):
        centred = sw.make_example(index, 0, "train", 96, jitter=0.0)
        moved = sw.make_example(index, 0, "train", 96, jitter=1.0)
        assert centred.records == moved.records and centred.scene == moved.scene
        pixels = np.abs(np.asarray(centred.image).astype(int) - np.asarray(centred.image)[0, 0]).max(-1) > 40
        for obj in centred.scene:
            r, c = divmod(obj.cell, 3)
            cell = pixels[32 * r:32 * r + 32, 32 * c:32 * c + 32]
            rows, cols = np.nonzero(cell.any(1))[0], np.nonzero(cell.any(0))[0]
            assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1, obj
    with pytest.raises(ValueError, match="jitter"):
        sw.write_shapeworld("unused", 1, seed=0, split="train", jitter=1.5)


def test_all_questions_ask_every_family_once():
    for index in range(40):
        mixed, every = sw.make_example(index, 0, "train"), sw.make_example(index, 0, "train", questions="all")
        assert _png(mixed.image) == _png(every.image) and mixed.records[0] == every.records[0]  # same scene, caption
        record = every.records[1]
        assert sorted(record["turn_tasks"]) == sorted(f for f in sw.FAMILIES if sw.can_ask(f, every.scene))
        for question, answer in _turns(record):
            assert answer_from_pixels(question, read_objects(every.image)) == answer
    with pytest.raises(ValueError, match="questions"):
        sw.write_shapeworld("unused", 1, seed=0, split="train", questions="some")


def test_command_line(tmp_path):
    from omnilm.cli import main

    main(["data", "shapeworld", "--out", str(tmp_path), "--n", "3", "--seed", "2", "--split", "train"])
    records = json.loads((tmp_path / "train.json").read_text())
    assert len(records) == 6 and Image.open(tmp_path / records[0]["image"]).size == (96, 96)


@pytest.mark.parametrize("image_size, jitter", [(64, 1.0), (96, 1.0), (128, 1.0), (96, 0.25), (96, 0.0)])
def test_pixels_show_what_the_text_says(image_size, jitter):
    # Every object's size, colour, shape and cell read back from the pixels matches the
    # caption, and every question answered from the pixels gets the record's answer.
    for index in range(150 if image_size == 64 else 40):
        example = sw.make_example(index, 0, "train", image_size, jitter)
        objects = read_objects(example.image)
        described = re.findall(rf"a (small|large) ({_C}) ({_S}) at the ({_P})[,. ]", example.records[0]
                               ["conversations"][1]["value"])
        assert objects == described, (index, example.scene)
        assert [r["n_objects"] for r in example.records] == [len(objects)] * 2
        for question, answer in _turns(example.records[1]):
            assert answer_from_pixels(question, objects) == answer, (index, question, objects)


def test_single_object_dominant_colour():
    # The plainest check: in a one-object image the most common non-background colour of the
    # object's cell is nearest to the answer's colour, and every other cell is blank.
    rng = random.Random(0)
    for _ in range(60):
        scene = sw.generate_scene(rng, n_objects=1)
        pixels = np.asarray(sw.render(scene, 64, rng, jitter=1.0)).astype(int)
        question, answer = sw.ask("colour", scene, rng)
        assert question in (f"What colour is the {scene[0].shape}?", f"What is the colour of the {scene[0].shape}?")
        edges, (r, c) = [0, 21, 43, 64], divmod(scene[0].cell, 3)
        cell = pixels[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].reshape(-1, 3)
        colours, counts = np.unique(cell[np.abs(cell - pixels[0, 0]).max(1) > 40], axis=0, return_counts=True)
        dominant = colours[counts.argmax()]
        nearest = min(sw.COLOURS, key=lambda name: ((np.array(sw.COLOUR_RGB[name]) - dominant) ** 2).sum())
        assert nearest == answer
        outside = np.abs(pixels - pixels[0, 0]).max(-1) > 40
        outside[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = False
        assert not outside.any()


def test_palette_is_far_apart():
    rgb = {name: np.array(v) for name, v in sw.COLOUR_RGB.items()}
    assert set(rgb) == set(sw.COLOURS)
    assert min(np.linalg.norm(rgb[a] - rgb[b]) for a in rgb for b in rgb if a < b) > 95
    assert min(np.linalg.norm(v - np.array([220, 220, 220])) for v in rgb.values()) > 150


def test_question_properties_over_many_scenes():
    rng = random.Random(1)
    answers, families, hard_no = collections.defaultdict(collections.Counter), collections.Counter(), 0
    for _ in range(3000):
        scene = sw.generate_scene(rng)
        assert list(scene) == sorted(scene, key=lambda o: o.cell) and len({o.cell for o in scene}) == len(scene)
        text = sw.caption(scene)
        assert all(f"{o.size} {o.colour} {o.shape} at the {o.position}" in text for o in scene)
        for family in sw.FAMILIES:
            if not sw.can_ask(family, scene):
                assert family == "spatial" and len(scene) == 1
                continue
            question, answer = sw.ask(family, scene, rng)
            assert answer in sw.ANSWERS and answer == normalize_answer(answer)
            answers[family][answer] += 1
            if family == "existence" and answer == "no":
                colour, shape = re.fullmatch(rf"Is there an? ({_C}) ({_S}).*", question).groups()
                hard_no += any(o.colour == colour or o.shape == shape for o in scene)
    for family in ("existence", "spatial"):
        assert 0.4 <= answers[family]["yes"] / sum(answers[family].values()) <= 0.6
    assert hard_no / answers["existence"]["no"] > 0.6
    assert set(answers["colour"]) == set(sw.COLOURS) and set(answers["shape"]) == set(sw.SHAPES)
    assert set(answers["position"]) == set(sw.CELLS) and set(answers["count"]) == set("01234")
    # Families are roughly balanced in the written conversations.
    for index in range(2000):
        record = sw.make_example(index, 0, "train").records[1]
        families.update(record.get("turn_tasks", [record["task"]]))
    assert set(families) == set(sw.FAMILIES)
    assert max(families.values()) < 1.25 * min(families.values())


def test_record_format():
    tasks = collections.Counter()
    for index in range(400):
        records = sw.make_example(index, 2, "test").records
        assert [r["task"] for r in records][0] == "caption"
        for record in records:
            assert record["id"].startswith(f"test-{index:06d}-")
            assert record["image"] == f"images/test_{index:06d}.png"
            convs = record["conversations"]
            assert len(convs) % 2 == 0 and [t["from"] for t in convs] == ["human", "gpt"] * (len(convs) // 2)
            assert convs[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in convs) == 1
            assert all(isinstance(t["value"], str) and t["value"] for t in convs)
            tasks[record["task"]] += 1
            if record["task"] == "multi_turn":
                assert 2 <= len(record["turn_tasks"]) == len(convs) // 2 <= 4
                assert len(set(record["turn_tasks"])) == len(record["turn_tasks"])
                assert set(record["turn_tasks"]) <= set(sw.FAMILIES)
            elif record["task"] != "caption":
                assert record["task"] in sw.FAMILIES and len(convs) == 2 and "turn_tasks" not in record
            for _, answer in _turns(record)[(record["task"] == "caption"):]:
                assert answer in sw.ANSWERS
    assert 0.3 < sum(tasks[f] for f in sw.FAMILIES) / 400 < 0.5  # single-turn about 40 %


def test_normalize_answer():
    assert normalize_answer("  Two. ") == "2"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("Top   Left") == "top left"
    assert normalize_answer("'red'") == "red"
    assert normalize_answer("centre") == "center"
    assert normalize_answer("zero") == "0" and normalize_answer("4") == "4"


# --- multi-image examples -----------------------------------------------------------------------
#
# The oracle below answers multi-image questions from object tuples (size, colour, shape,
# cell name) per image, parsing the question text with its own patterns; it is fed the scenes
# and, where the images are read back, the pixels.

_ORD = {"first": 0, "second": 1, "third": 2, "fourth": 3}
_O = "first|second|third|fourth"
_QUESTION = re.compile(r"(?:Which|What|Do|Is|How|Where)[^?\n]*\?")


def _objects(scene) -> list:
    return [(o.size, o.colour, o.shape, o.position) for o in scene]


def answer_multi(question: str, images: list) -> str:
    """Answer a multi-image question from the objects of each image (in marker order)."""
    counts = [len(objects) for objects in images]
    if m := re.fullmatch(r"Which (?:of the two images|image) has (more|the most) (?:shapes|objects)\?", question):
        assert (m[1] == "more") == (len(images) == 2), question  # "more" for two images, "the most" for more
        assert counts.count(max(counts)) == 1, counts
        return list(_ORD)[counts.index(max(counts))]
    if m := (re.fullmatch(rf"Which colour (?:appears|is) in the ({_O}) image but not in the ({_O})(?: image)?\?", question)
             or re.fullmatch(rf"What colour does the ({_O}) image have that the ({_O}) image does not\?", question)):
        b, a = (images[_ORD[m[1]]], images[_ORD[m[2]]])
        new = {o[1] for o in b} - {o[1] for o in a}
        assert len(new) == 1, (question, images)
        return new.pop()
    if m := (re.fullmatch(rf"Do the ({_O}) and ({_O}) images show the same shape\?", question)
             or re.fullmatch(rf"Is the shape in the ({_O}) image the same as the shape in the ({_O}) image\?", question)):
        a, b = images[_ORD[m[1]]], images[_ORD[m[2]]]
        assert len(a) == len(b) == 1, (question, images)  # "the shape" of an image is one shape
        return "yes" if a[0][2] == b[0][2] else "no"
    everything = [o for objects in images for o in objects]
    if re.fullmatch(r"How many (?:shapes|objects) are there in (?:the|all the) images(?: altogether)?\?", question):
        return str(len(everything))
    if m := re.fullmatch(rf"How many ({_C}) shapes are there in (?:the|all the) images\?", question):
        return str(sum(o[1] == m[1] for o in everything))
    if m := re.fullmatch(r"How many (\w+) are there in (?:the|all the) images\?", question):
        return str(sum(sw.PLURALS[o[2]] == m[1] for o in everything))
    raise AssertionError(f"multi-image question in no known phrasing: {question!r}")


def _check_answers(record: dict, images: list) -> None:
    # Every turn's answer from the images its chat has shown so far: the first turn of a chat
    # with one image is an ordinary single-image question.
    convs, shown = record["conversations"], 0
    for human, gpt in zip(convs[::2], convs[1::2]):
        shown += human["value"].count("<image>")
        [question] = _QUESTION.findall(human["value"])
        seen = images[:shown]
        expected = answer_from_pixels(question, seen[0]) if shown == 1 else answer_multi(question, seen)
        assert expected == gpt["value"], (record["id"], question, seen)


def test_multi_image_same_index_same_bytes():
    a, b = sw.make_multi_example(7, 3, "train"), sw.make_multi_example(7, 3, "train")
    assert a.record == b.record and [_png(x) for x in a.images] == [_png(x) for x in b.images]
    assert a.scenes == b.scenes and len(a.images) == len(a.scenes) >= 2
    assert sw.make_multi_example(7, 3, "test").record != a.record
    assert sw.make_multi_example(7, 4, "train").record != a.record
    # Text does not depend on the image size or jitter.
    assert sw.make_multi_example(7, 3, "train", image_size=96, jitter=0.0).record == a.record


def test_multi_image_record_format():
    tasks, n_images = collections.Counter(), collections.Counter()
    for index in range(400):
        record = sw.make_multi_example(index, 2, "test").record
        images, convs = record["image"], record["conversations"]
        assert images == [f"images/test_{index:06d}_{k}.png" for k in range(1, len(images) + 1)]
        assert 2 <= len(images) <= 4 and record["id"] == f"test-{index:06d}-{record['task']}"
        assert [t["from"] for t in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert sum(t["value"].count("<image>") for t in convs[::2]) == len(images)
        assert not any("<image>" in t["value"] for t in convs[1::2])  # markers in human turns only
        for turn in convs[1::2]:
            assert turn["value"] in sw.ANSWERS and normalize_answer(turn["value"]) == turn["value"]
        tasks[record["task"]] += 1
        n_images[len(images)] += 1
        if record["task"] == "multi_turn":
            families = record["turn_tasks"]
            assert len(families) == len(convs) // 2 == len(images) in (2, 3)
            assert families[0] in sw.FAMILIES and set(families[1:]) <= set(sw.MULTI_FAMILIES)
            assert all(t["value"].count("<image>") == 1 for t in convs[::2])  # one new image a turn
        else:
            assert record["task"] in sw.MULTI_FAMILIES and len(convs) == 2 and "turn_tasks" not in record
    assert set(tasks) == {*sw.MULTI_FAMILIES, "multi_turn"} and set(n_images) == {2, 3, 4}
    assert 0.3 < tasks["multi_turn"] / 400 < 0.5  # chats are about 40 %


def test_multi_image_answers_from_scenes_and_pixels():
    families = collections.Counter()
    for index in range(300):
        example = sw.make_multi_example(index, 0, "train")
        record = example.record
        _check_answers(record, [_objects(scene) for scene in example.scenes])
        if index < 60:  # the pixels show the scenes, so the answers hold for what is drawn
            pixels = [read_objects(image) for image in example.images]
            assert pixels == [_objects(scene) for scene in example.scenes], index
            _check_answers(record, pixels)
        families.update(record.get("turn_tasks", [record["task"]]))
    assert set(sw.MULTI_FAMILIES) <= set(families)


def test_all_questions_follow_a_multi_image_question_with_every_family_its_images_answer():
    # questions="all": after the drawn question (or the chat's last image turn), one text-only turn
    # for each other multi-image family the same images answer, each answer checked by the oracle.
    more = 0
    for index in range(300):
        mixed, full = sw.make_multi_example(index, 6, "train"), sw.make_multi_example(index, 6, "train", questions="all")
        assert full.scenes == mixed.scenes and full.record["image"] == mixed.record["image"]
        convs = full.record["conversations"]
        assert convs[:len(mixed.record["conversations"])] == mixed.record["conversations"]
        extra = len(convs) - len(mixed.record["conversations"])
        assert all("<image>" not in turn["value"] for turn in convs[len(convs) - extra::2])
        _check_answers(full.record, [_objects(scene) for scene in full.scenes])
        families = full.record.get("turn_tasks", [full.record["task"]])
        last = len(mixed.record.get("turn_tasks", [mixed.record["task"]])) - 1
        assert len(set(families[last:])) == len(families[last:])  # each family once about the final images
        # Every family the images answer is asked: "more" whenever one image has the most objects.
        counts = [len(scene) for scene in full.scenes]
        assert ("multi_more" in families[last:]) == (counts.count(max(counts)) == 1)
        more += extra // 2
    assert more > 300  # well over one more question per example


def test_multi_image_layouts_and_later_turn_images():
    placed = collections.Counter()
    for index in range(300):
        record = sw.make_multi_example(index, 1, "train").record
        convs = record["conversations"]
        for turn in convs[::2]:
            text = turn["value"]
            if text.index("?") < text.rindex("<image>"):
                placed["after the question"] += 1
            if re.search(r"<image>[^\n]", text):
                placed["mid-sentence"] += 1
            if re.search(r"Image 2: <image>", text):
                placed["labelled"] += 1
            if text.startswith("<image>\n<image>\n"):
                placed["before"] += 1
        if record["task"] == "multi_turn":
            placed["chat"] += 1
            assert convs[0]["value"].count("<image>") == 1 and convs[2]["value"].count("<image>") == 1
            placed["chat with a third image"] += len(convs) == 6
    assert min(placed.values()) >= 10 and len(placed) == 6, placed


def test_multi_image_answer_balance():
    answers = collections.defaultdict(collections.Counter)
    for index in range(400):
        record = sw.make_multi_example(index, 5, "train").record
        families = record.get("turn_tasks", [record["task"]])
        for family, turn in zip(families, record["conversations"][1::2]):
            answers[family][turn["value"]] += 1
    same = answers["multi_same_shape"]
    assert set(same) == {"yes", "no"} and 0.35 <= same["yes"] / sum(same.values()) <= 0.65, same
    assert set(answers["multi_more"]) == set(sw.ORDINALS), answers["multi_more"]
    assert set(answers["multi_new_colour"]) == set(sw.COLOURS)
    assert {"0", "9"} <= set(answers["multi_total"]) <= set("0123456789")
    # Directly: with every image drawn, "more" picks its winner uniformly.
    rng = random.Random(0)
    winners = collections.Counter(sw.ask_multi("multi_more", [None] * 4, rng)[2] for _ in range(2000))
    assert set(winners) == set(sw.ORDINALS) and max(winners.values()) < 1.3 * min(winners.values()), winners


def test_ask_multi_keeps_given_images_and_refuses_the_impossible():
    rng = random.Random(3)
    given = sw.generate_scene(rng, 4)
    for family in sw.MULTI_FAMILIES:
        if family == "multi_same_shape":  # needs a one-object image to compare with
            assert not sw.can_ask_multi(family, [given, None])
            with pytest.raises(ValueError, match="no multi_same_shape question"):
                sw.ask_multi(family, [given, None], rng)
            continue
        scenes, question, answer = sw.ask_multi(family, [given, None], rng)
        assert scenes[0] == given and answer_multi(question, [_objects(s) for s in scenes]) == answer
    tied = (sw.generate_scene(rng, 4), sw.generate_scene(rng, 4))
    assert not sw.can_ask_multi("multi_more", [*tied, None])  # a third image cannot break a tie of 4
    assert not sw.can_ask_multi("multi_total", [*tied, sw.generate_scene(rng, 2), None])  # over 9
    with pytest.raises(ValueError, match="unknown multi-image question family"):
        sw.ask_multi("colour", [None, None], rng)


def test_write_multi_image_keeps_single_image_examples(tmp_path):
    n = 30
    plain = json.loads(sw.write_shapeworld(tmp_path / "plain", n, seed=4, split="train").read_text())
    assert plain == [r for i in range(n) for r in sw.make_example(i, 4, "train").records]
    path = sw.write_shapeworld(tmp_path / "mixed", n, seed=4, split="train", multi_image=0.5)
    records = {}
    for record in json.loads(path.read_text()):
        records.setdefault(int(record["id"].split("-")[1]), []).append(record)
    multi = [i for i in range(n) if isinstance(records[i][0]["image"], list)]
    assert 5 < len(multi) < 25
    for index, written in records.items():
        if index in multi:
            example = sw.make_multi_example(index, 4, "train")
            assert written == [example.record]
            for name, image in zip(example.record["image"], example.images):
                assert (tmp_path / "mixed" / name).read_bytes() == _png(image)
        else:
            assert written == sw.make_example(index, 4, "train").records
            name = written[0]["image"]
            assert (tmp_path / "mixed" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    only = json.loads(sw.write_shapeworld(tmp_path / "only", 12, seed=4, split="train", multi_image=1.0).read_text())
    assert len(only) == 12 and all(isinstance(r["image"], list) and r["task"] != "caption" for r in only)
    again = sw.write_shapeworld(tmp_path / "again", n, seed=4, split="train", multi_image=0.5)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_multi_image_fraction_is_refused(bad):
    from omnilm.errors import OmniInputError

    with pytest.raises(OmniInputError, match="multi_image is .*from 0 .* to 1"):
        sw.write_shapeworld("unused", 1, seed=0, split="train", multi_image=bad)


def test_llava_dataset_reads_multi_image_records(tmp_path):
    import torch

    from omnilm.data import ImageProcessor, LlavaDataset, Processor, train_tokenizer

    path = sw.write_shapeworld(tmp_path, 8, seed=0, split="train", image_size=32, multi_image=1.0)
    records = json.loads(path.read_text())
    texts = [t["value"] for r in records for t in r["conversations"]] * 3
    seq = 4
    processor = Processor(train_tokenizer(texts, vocab_size=400), ImageProcessor(size=32, crop_size=32), seq)
    dataset = LlavaDataset(path, None, processor)
    assert len(dataset) == len(records)
    for i, record in enumerate(records):
        sample = dataset[i]
        paths = [tmp_path / name for name in record["image"]]
        assert sample["pixel_values"].shape == (len(paths), 3, 32, 32)
        assert (sample["input_ids"] == processor.tokenizer.image_token_id).sum() == seq * len(paths)
        assert torch.equal(sample["pixel_values"], processor.image_processor(paths))  # one per marker, in order
        assert not torch.equal(sample["pixel_values"][0], sample["pixel_values"][1])


def test_command_line_multi_image(tmp_path, capsys):
    from omnilm.cli import main

    main(["data", "shapeworld", "--out", str(tmp_path), "--n", "4", "--seed", "2", "--multi-image", "1",
          "--image-size", "64"])
    records = json.loads((tmp_path / "train.json").read_text())
    assert len(records) == 4 and all(isinstance(r["image"], list) for r in records)
    n_images = sum(len(r["image"]) for r in records)
    assert f"wrote 4 examples ({n_images} images, 4 records)" in capsys.readouterr().out


def test_normalize_answer_multi_image_words():
    assert normalize_answer("Seven.") == "7" and normalize_answer("nine") == "9"
    assert normalize_answer("2nd") == "second" and normalize_answer("The 4th") == "the fourth"
    assert normalize_answer("First!") == "first"
    assert set(sw.ORDINALS) | set("0123456789") <= sw.ANSWERS
