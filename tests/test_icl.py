"""In-context learning: episodes that bind nonsense words to what the images show, words that are
one token each with embeddings that never train, and the evaluation's grid, controls and outputs."""

import csv
import random

import pytest
import torch

from conftest import cli_error, one_line_error, run_cli
from omnilm.data import train_tokenizer
from omnilm.data.tokenizer import Tokenizer
from omnilm.data import icl
from omnilm.data.llava_json import check_records, read_records
from omnilm.data.shapeworld import write_shapeworld
from omnilm.data.shapeworld.scenes import COLOURS, SHAPES
from omnilm.eval.icl import IclEvalArgs, cells, evaluate_icl, format_icl, name_shots, summary, write_outputs
from omnilm.eval.vqa import evaluate_vqa, normalize_answer
from omnilm.model import OmniModel
from omnilm.recipes.icl import CONTEXT, IclRecipe, draw_training_episode, run_icl_recipe
from omnilm.recipes.recipe import QUESTION_FAMILIES
from omnilm.train import Hyperparams, TrainArgs, train
from omnilm.train.stages import corpus


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    return folder, icl.write_pool(folder, "train", 0, 60)


def episode(pool, rng_seed, **kwargs):
    folder, images = pool
    return icl.make_episode(random.Random(rng_seed), icl.index_pool(images), icl.Episode(**kwargs), "e")


def objects(pool, record):
    by_path = {p.path: p.obj for p in pool[1]}
    return [by_path[path] for path in record["image"]]


def answers_of(record):
    return [t["value"] for t in record["conversations"][1::2]]


def test_word_sets_are_fixed_disjoint_and_not_shapeworld_words():
    assert len(set(icl.NOVEL_WORDS)) == 4096 and len(set(icl.HELD_OUT_WORDS)) == 512
    assert not set(icl.NOVEL_WORDS) & set(icl.HELD_OUT_WORDS)
    assert icl._nonsense_words(len(icl.ALL_WORDS)) == list(icl.ALL_WORDS)  # the same in every process
    assert not set(icl.ALL_WORDS) & set(COLOURS + SHAPES + ("this", "is", "a", "what", "words", "name"))


@pytest.mark.parametrize("attribute", icl.ATTRIBUTES)
@pytest.mark.parametrize("ways,shots", [(2, 0), (2, 3), (5, 2)])
def test_an_episode_binds_each_word_to_one_value(pool, attribute, ways, shots):
    record = episode(pool, 1, attribute=attribute, ways=ways, shots=shots, queries=3)
    info = record["icl"]
    objs = objects(pool, record)
    turns = record["conversations"]
    assert len(objs) == ways * shots + 3 and len(turns) == 2 * (ways * shots + 3)
    binding = dict(zip(info["labels"], info["values"]))
    assert len(binding) == ways == len(set(info["values"])) and set(info["labels"]) <= set(icl.NOVEL_WORDS)
    # A turn an image: each answer is the word of what its image shows; each word is shown `shots`
    # times before the queries, whose answers the record lists.
    said = answers_of(record)
    assert [binding[w] for w in said] == [getattr(o, attribute) for o in objs]
    assert all(said[:ways * shots].count(word) == shots for word in binding)
    assert said[-3:] == info["answers"] and [binding[a] for a in info["answers"]] == info["names"]
    first = turns[0]["value"]
    asked = f"<image> What {attribute}?"
    assert first.startswith("The words ") and first.endswith(f"name {attribute}s.\n{asked}")
    assert all(w in first for w in binding)
    assert all(t["value"] == asked for t in turns[2::2])


@pytest.mark.parametrize("variant", ["novel", "shuffled", "ambiguous"])
def test_a_described_answer_names_what_the_image_shows_then_the_word(pool, variant):
    plain = episode(pool, 4, attribute="shape", ways=3, shots=2, variant=variant)
    record = episode(pool, 4, attribute="shape", ways=3, shots=2, variant=variant, describe=True)
    assert record["icl"]["describe"] and not plain["icl"]["describe"]
    # The same draw: each answer is the image's shape (an ambiguous episode's colour and shape, as its
    # question asks for either), then the word the plain episode gives it.
    assert record["image"] == plain["image"] and record["icl"]["answers"] == plain["icl"]["answers"]
    shown = [f"{o.colour} {o.shape}" if variant == "ambiguous" else o.shape for o in objects(pool, record)]
    assert answers_of(record) == [f"{name} {word}" for name, word in zip(shown, answers_of(plain))]


def test_episodes_are_drawn_afresh_and_deterministically(pool):
    a, b = (episode(pool, 5, attribute="colour", ways=2, shots=2) for _ in range(2))
    assert a == b
    labels = {tuple(episode(pool, seed, attribute="colour", ways=2, shots=1)["icl"]["labels"]) for seed in range(30)}
    assert len(labels) > 25  # words are re-drawn every episode: no binding to memorise
    held = {w for seed in range(30) for w in episode(pool, seed, attribute="shape", ways=3, shots=1,
                                                        words="held-out")["icl"]["labels"]}
    assert held <= set(icl.HELD_OUT_WORDS)


def test_real_and_shuffled_labels(pool):
    for seed in range(20):
        real = episode(pool, seed, attribute="colour", ways=3, shots=1, variant="real")["icl"]
        assert real["labels"] == real["values"] and real["answers"] == real["names"]
        shuffled = episode(pool, seed, attribute="shape", ways=2, shots=2, variant="shuffled")
        info = shuffled["icl"]
        assert sorted(info["labels"]) == sorted(info["values"])
        assert all(label != value for label, value in zip(info["labels"], info["values"]))  # never its own name
        assert info["answers"][0] != info["names"][0]
        obj = objects(pool, shuffled)[-1]
        assert obj.shape == info["names"][0]


def test_ambiguous_first_shots_confound_both_attributes_and_the_query_splits_them(pool):
    for seed in range(20):
        record = episode(pool, seed, attribute="colour", ways=2, shots=4, variant="ambiguous")
        info, objs = record["icl"], objects(pool, record)
        said = answers_of(record)
        assert "name colours or shapes." in record["conversations"][0]["value"]
        # Every turn asks for the object, not for the attribute the episode hides.
        assert all(t["value"].endswith("> What is the object?") for t in record["conversations"][::2])
        first = {said[k]: objs[k] for k in range(2)}  # each word's first shot
        assert set(first) == set(info["labels"]) and len({o.shape for o in first.values()}) == 2
        query = objs[-1]
        word = info["answers"][0]
        other = next(w for w in first if w != word)
        # Its colour is its word's, its shape the other word's first shot's: one shot each is a tie.
        assert query.colour == first[word].colour and query.shape == first[other].shape


def test_records_pass_the_llava_checks_and_the_spec_writes_them(tmp_path):
    spec = icl.IclSpec(out=tmp_path, n=20, seed=3, ways=(2, 5), shots=(0, 4), variants=("novel", "ambiguous"),
                       queries=2, pool=40)
    path = spec.write(progress=False)
    records = read_records(path)
    assert len(records) == 20 and check_records(records, tmp_path).kept == list(range(20))
    assert {r["icl"]["ways"] for r in records} == {2, 5} and {r["icl"]["shots"] for r in records} == {0, 4}
    assert path.read_bytes() == spec.write(progress=False).read_bytes()  # the same flags, the same file


@pytest.mark.parametrize("kwargs,parts", [
    (dict(ways=(6,), attributes=("shape",)), ("--ways 6", "2 to 5")),
    (dict(ways=(1,)), ("--ways 1",)),
    (dict(shots=(17,)), ("--shots 17", "0 to 16")),
    (dict(variants=("flipped",)), ("--variants flipped", "novel, real, shuffled, ambiguous")),
    (dict(attributes=("size",)), ("--attributes size", "colour, shape")),
    (dict(words="test"), ("--words 'test'", "held-out")),
    (dict(pool=10), ("--pool",)),
    (dict(split="val"), ("--split 'val'",)),
])
def test_bad_spec_is_one_line(tmp_path, kwargs, parts):
    one_line_error(lambda: icl.IclSpec(out=tmp_path, **kwargs), *parts)


def test_each_made_up_word_is_one_token(tmp_path):
    # The recipe gives every word, training's and held-out, an id of its own: one token in a prompt
    # and in an answer, after BPE's space; a longer word that contains one stays BPE's pieces. No word
    # is a piece of a BPE trained on ShapeWorld's chats, so each gets a new id.
    folder = tmp_path / "tok"
    write_shapeworld(tmp_path, 200, 0, "train", progress=False)
    train_tokenizer(corpus(tmp_path / "train.json", ""), vocab_size=300, system_prompt="").save(folder)
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    first = tok.vocab_size
    ids = tok.add_words(icl.ALL_WORDS)
    assert ids == list(range(first, first + len(icl.ALL_WORDS)))
    train_word, held_word = icl.NOVEL_WORDS[7], icl.HELD_OUT_WORDS[3]
    text = f"USER: The words {train_word} and {held_word} name colours. ASSISTANT: {held_word}</s>"
    encoded = tok.encode(text, add_bos=False)
    held_id, train_id = tok.token_to_id(held_word), tok.token_to_id(train_word)
    assert encoded.count(held_id) == 2 and encoded.count(train_id) == 1
    assert held_id not in tok.encode(f"the {held_word}es", add_bos=False)
    assert tok.decode(encoded[-3:]) == f" {held_word}"
    tok.save(folder)
    assert Tokenizer.from_file(folder / "tokenizer.json").encode(text, add_bos=False) == encoded  # saved with them
    one_line_error(lambda: tok.add_words([train_word]), repr(train_word), "does not hold yet")
    one_line_error(lambda: tok.add_words(["two words"]), "letters alone")
    one_line_error(lambda: tok.add_words(["mo", "mo"]), "repeat")


def test_an_episodes_words_start_with_different_letters(pool):
    for seed in range(40):
        labels = episode(pool, seed, attribute="colour", ways=5, shots=0)["icl"]["labels"]
        assert len({w[0] for w in labels}) == 5


def _episode_data(folder, n=64):
    spec = icl.IclSpec(out=folder, n=n, seed=0, ways=(2,), shots=(1, 2), queries=2, pool=30)
    path = spec.write(progress=False)
    train_tokenizer(corpus(path, ""), vocab_size=300, system_prompt="").save(folder / "tokenizer")
    return path


def test_the_grid_has_every_cell_and_the_controls(tmp_path):
    args = IclEvalArgs(checkpoint=tmp_path, out=tmp_path / "out", ways=(2, 6), shots=(0, 1))
    grid = cells(args)
    assert {c.variant for c in grid} == {"novel", "real", "shuffled", "ambiguous"}
    assert not any(c.ways == 6 and c.attribute == "shape" for c in grid)  # 5 shapes
    assert len(grid) == 3 * (2 * 2 + 1 * 2) + 2 * 2  # ambiguous: 2-way alone (6 colours, 5 shapes)
    assert all(c.words == "held-out" for c in grid)
    assert {c.variant for c in cells(IclEvalArgs(checkpoint=tmp_path, controls=("none",)))} == {"novel"}


@pytest.mark.parametrize("kwargs,parts", [
    (dict(ways=(1,)), ("--ways 1",)), (dict(shots=(0, 40)), ("--shots 0,40",)),
    (dict(controls=("flipped",)), ("--controls flipped",)), (dict(n=0), ("--n",)),
])
def test_bad_eval_flags_are_one_line(tmp_path, kwargs, parts):
    one_line_error(lambda: IclEvalArgs(checkpoint=tmp_path, **kwargs), *parts)


def test_evaluation_scores_every_cell_and_writes_its_outputs(tmp_path):
    data = _episode_data(tmp_path / "data", n=32)
    run = train(TrainArgs(stage="instruct", data=data, image_folder=tmp_path / "data", out=tmp_path / "run",
                          tokenizer=tmp_path / "data" / "tokenizer", preset="tiny", config={"text": {"n_layers": 1}},
                          steps=2, batch_size=8, progress=False))
    model, processor = run["model"].eval(), run["processor"]
    args = IclEvalArgs(checkpoint=tmp_path / "run" / "model", out=tmp_path / "eval", ways=(2,), shots=(0, 1), n=3,
                       controls=("shuffled",), attributes=("colour",))
    rows, predictions = evaluate_icl(model, processor, args, progress=False)
    assert model.feature_cache is None  # the evaluation's cache is its own
    assert len(rows) == 4 and len(predictions) == 12 and all(r["n"] == 3 for r in rows)
    for r in rows:
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"] and r["correct"] == round(r["accuracy"] * 3)
    for p in predictions:  # scored on the last word (after the names of what the image shows), the prompt's label
        said = normalize_answer(p["prediction"]).split()
        assert p["correct"] == (said[-1:] == p["answer"].split()[-1:]) and len(p["answer"].split()) == 2
    write_outputs(rows, predictions, args.out)
    table = list(csv.DictReader((args.out / "icl.csv").open()))
    assert len(table) == 4 and (args.out / "icl.png").stat().st_size > 10_000
    assert len((args.out / "predictions.jsonl").read_text().splitlines()) == 12
    report = format_icl(rows)
    assert "| novel | colour | 2 | 50 |" in report and "Shuffled labels, 1 shot or more:" in report
    assert "The shots' names are the model's own" in report and table[1]["shots_named"] != ""
    # --no-describe: the answer is the word alone, scored whole.
    plain = IclEvalArgs(**{**vars(args), "describe": False, "out": tmp_path / "plain"})
    rows, predictions = evaluate_icl(model, processor, plain, progress=False)
    assert all(len(p["answer"].split()) == 1 for p in predictions)
    assert all(p["correct"] == (p["prediction"].strip().lower().rstrip(".") == p["answer"]) for p in predictions)
    assert all(r["shots_named"] is None for r in rows) and "names are the model's own" not in format_icl(rows)
    # With no shots there is nothing to name.
    rows, _ = evaluate_icl(model, processor, IclEvalArgs(**{**vars(args), "shots": (0,), "out": tmp_path / "zero"}),
                           progress=False)
    assert {r["shots"] for r in rows} == {0} and all(r["shots_named"] is None for r in rows)


def test_the_shots_names_are_the_models_own(tmp_path, pool):
    # A described episode's shots carry the names the model gives each image when asked about it
    # alone; the prompt's words stay, and the record counts the names that say what the image shows.
    folder, _ = pool
    data = _episode_data(tmp_path / "data", n=16)
    run = train(TrainArgs(stage="instruct", data=data, image_folder=tmp_path / "data", out=tmp_path / "run",
                          tokenizer=tmp_path / "data" / "tokenizer", preset="tiny", config={"text": {"n_layers": 1}},
                          steps=1, batch_size=8, progress=False))
    model, processor = run["model"].eval(), run["processor"]
    records = [episode(pool, seed, attribute=a, ways=2, shots=2, variant=v, describe=True)
               for seed, (a, v) in enumerate([("colour", "novel"), ("shape", "ambiguous"), ("shape", "shuffled")])]
    drawn = [answers_of(r) for r in records]
    name_shots(model, processor, records, folder, progress=False)
    for record, before in zip(records, drawn):
        after = answers_of(record)
        assert after[-1] == before[-1]  # the query's answer is the truth it is scored on
        assert [a.split()[-1] for a in after] == [b.split()[-1] for b in before]  # the prompt's words stay
        attributes = icl.ATTRIBUTES if record["icl"]["variant"] == "ambiguous" else (record["icl"]["attribute"],)
        for answer, path in zip(after[:-1], record["image"]):
            alone = [{"id": "q", "image": path, "conversations": [
                {"from": "human", "value": f"<image> {icl.turn_question(a)}"}, {"from": "gpt", "value": "-"}]}
                for a in attributes]
            _, said = evaluate_vqa(model, processor, alone, folder, max_new_tokens=2, progress=False)
            assert answer.split()[:-1] == [(normalize_answer(p["prediction"]).split() or ["-"])[0] for p in said]
        right = sum(a.split()[:-1] == b.split()[:-1] for a, b in zip(after[:-1], before[:-1]))
        assert record["icl"]["shots_named"] == [right, 4]


def test_summary_and_table_from_rows():
    rows = [{"variant": v, "attribute": a, "ways": w, "shots": k, "n": 10, "correct": c, "accuracy": c / 10,
             "ci_low": 0.0, "ci_high": 1.0, "named_image": 0.0}
            for v, a, w, k, c in [("novel", "colour", 2, 0, 5), ("novel", "shape", 2, 0, 6), ("novel", "colour", 5, 4, 9),
                                  ("shuffled", "colour", 2, 4, 10), ("shuffled", "shape", 2, 4, 8),
                                  ("shuffled", "colour", 2, 0, 1)]]  # no shots: nothing to follow, not counted
    s = summary(rows)
    assert s["novel_2way"][0] == 0.55 and s["novel_5way_colour_4shot"] == 0.9 and s["shuffled_follow"] == 0.9
    assert "Shuffled labels, 1 shot or more: 90.0% of answers follow" in format_icl(rows)
    assert summary(rows[:3])["shuffled_follow"] is None


def test_cli_data_icl_and_eval_icl_flags(tmp_path, capsys):
    code, out, err = run_cli(["data", "icl", tmp_path, "--n", "5", "--pool", "30", "--ways", "2,3"], capsys)
    assert code == 0 and "wrote 5 episodes" in out
    assert len(read_records(tmp_path / "icl_train.json")) == 5
    code, _, err = run_cli(["data", "icl", tmp_path, "--ways", "9"], capsys)
    cli_error(code, err, "--ways 9")
    code, _, err = run_cli(["eval", "icl", tmp_path, "--shots", "x"], capsys)
    cli_error(code, err, "--shots")


def test_the_lessons_draw_what_their_settings_say():
    # The first three lessons: 2-way, 1 to 4 shots, made-up labels, "What is this?", the word alone.
    # The last: every episode within --max-images (5-way up to 4 shots, 2-way up to --max-shots), the
    # variants at their shares, each turn asking for the attribute and each answer naming what the
    # image shows before the word, as the evaluation's episodes do.
    recipe, rng = IclRecipe(), random.Random(0)
    for lesson in ("lookup", "look", "words"):
        drawn = [draw_training_episode(recipe, lesson, rng) for _ in range(200)]
        assert {(e.ways, e.variant, e.ask, e.describe) for e in drawn} == {(2, "novel", False, False)}
        assert {e.shots for e in drawn} == {1, 2, 3, 4}
    drawn = [draw_training_episode(recipe, "icl", rng) for _ in range(4000)]
    assert all(e.ask and e.describe for e in drawn)
    assert all(e.ask and e.describe for e in cells(IclEvalArgs(checkpoint="unused")))
    assert all(e.ways * e.shots <= recipe.max_images and e.shots <= recipe.max_shots for e in drawn)
    assert max(e.shots for e in drawn if e.ways == 5) == recipe.max_images // 5 == 4
    assert max(e.shots for e in drawn if e.ways == 2) == recipe.max_shots
    for variant in ("ambiguous", "real", "shuffled"):
        share = sum(e.variant == variant for e in drawn) / len(drawn)
        assert abs(share - getattr(recipe, variant)) < 0.03, (variant, share)
    short = (draw_training_episode(IclRecipe(max_images=12), "icl", rng) for _ in range(1000))
    assert max(e.shots for e in short if e.ways == 5) == 2


def test_the_recipe_end_to_end_at_toy_size(tmp_path):
    # The demo's stages, the convolution and the word tokens grown on the instruct stage's model, the
    # four lessons, then the ordinary questions before and after and the grid: every output in its place.
    tiny = dict(batch_size=8, warmup=0)
    lesson = dict(steps=2, group_by_length=True, optimizer="muon", **tiny)
    recipe = IclRecipe(n_train=160, n_test=10, clip_images=64, pool=30, eval_n=1, token_conv=4, word_dims=8,
                       progress=False,
                       clip=Hyperparams(steps=2, **tiny), align=Hyperparams(steps=2, **tiny),
                       instruct=Hyperparams(steps=2, optimizer="muon", tasks=QUESTION_FAMILIES, **tiny),
                       lookup=Hyperparams(**lesson), look=Hyperparams(**lesson), words=Hyperparams(**lesson),
                       icl=Hyperparams(**lesson))
    result = run_icl_recipe(tmp_path, recipe)
    assert set(result["eval"]) == {"before", "after"} and result["eval"]["after"]["n"] > 0
    assert len(result["icl"]) == 3 * (2 * 2 * 5) + 2 * 5 * 2  # ambiguous: 5 ways at most for both attributes
    final, demo = OmniModel.from_pretrained(tmp_path / "model"), OmniModel.from_pretrained(tmp_path / "instruct" / "model")
    assert final.config.text.token_conv == 4 and demo.config.text.token_conv == 0  # the demo's, unchanged
    assert final.config.text.max_seq_len == CONTEXT > demo.config.text.max_seq_len  # the grid's longest prompts fit
    assert final.config.text.fixed_tokens == len(icl.ALL_WORDS)
    assert final.config.text.vocab_size == demo.config.text.vocab_size + len(icl.ALL_WORDS)
    start = OmniModel.from_pretrained(tmp_path / "icl_start")  # the lessons never moved the words' rows
    for weight in ("llm.embed_tokens.weight", "lm_head.weight"):
        fixed = slice(demo.config.text.vocab_size, None)
        assert torch.equal(final.state_dict()[weight][fixed], start.state_dict()[weight][fixed])
        assert not torch.equal(final.state_dict()[weight][:fixed.start], start.state_dict()[weight][:fixed.start])
    for name in ("icl.csv", "icl.png", "predictions.jsonl"):
        assert (tmp_path / "icl_eval" / name).is_file()
    lessons = {}
    for lesson in ("lookup", "look", "words", "icl"):  # --replay 0.25: a quarter of every lesson the questions
        records = read_records(tmp_path / "data" / f"icl_{lesson}.json")
        lessons[lesson] = [r for r in records if r["task"] == "icl"]
        assert len(lessons[lesson]) == 12 and sum(r["task"] in QUESTION_FAMILIES for r in records) == 4
    assert all(r["icl"]["words"] == "letters" and "image" not in r for r in lessons["lookup"])
    assert all(r["icl"]["words"] == "letters" and "image" in r for r in lessons["look"])
    assert all(r["icl"]["words"] == "train" and "image" not in r for r in lessons["words"])
    # --word-dims 8: every word's rows in one 8-dimension subspace
    rows = final.state_dict()["llm.embed_tokens.weight"][demo.config.text.vocab_size:]
    assert torch.linalg.matrix_rank(rows) == 8
    one_line_error(lambda: IclRecipe(replay=0.95), "--replay", "0.9")
    one_line_error(lambda: IclRecipe(word_dims=100_000), "--word-dims", "width")
    one_line_error(lambda: IclRecipe(real=0.6, shuffled=0.6), "at most 1 in all")
