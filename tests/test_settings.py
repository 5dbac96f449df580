"""Run settings are declared once: every field of the settings dataclasses has a flag, its help and
default come from the field, and the flags parse back into the same dataclass."""

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import one_line_error

from omnilm.cli import build_parser, parse_args
from omnilm.data.icl import IclSpec
from omnilm.data.shapeworld import JITTER, ShapeWorldSpec
from omnilm.eval.icl import IclEvalArgs
from omnilm.recipes.fusion import BENCH_FLAGS, FusionBench
from omnilm.recipes.icl import ICL_FLAGS, IclRecipe
from omnilm.recipes.recipe import Recipe
from omnilm.settings import add_flags, flags, from_flags, setting
from omnilm.train import Hyperparams, TrainArgs


def subcommand_help(*names: str) -> str:
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser.format_help()


@pytest.mark.parametrize("command, cls, defaults, layout", [
    (("train",), TrainArgs, None, {}),
    (("demo",), Recipe, None, {}),
    (("data", "shapeworld"), ShapeWorldSpec, None, {}),
    (("bench", "fusion"), FusionBench, FusionBench(), BENCH_FLAGS),
    (("demo-icl",), IclRecipe, None, ICL_FLAGS),
    (("data", "icl"), IclSpec, None, {}),
    (("eval-icl",), IclEvalArgs, None, {}),
])
def test_every_setting_has_a_flag_in_help(command, cls, defaults, layout):
    text = subcommand_help(*command)
    listed = flags(cls, defaults, **layout)
    assert listed, cls
    for flag in listed:
        if flag.field.metadata["help"] == argparse.SUPPRESS:
            continue
        if flag.field.metadata.get("positional"):  # an argument: named in the usage line
            assert flag.field.name in text.split("\n\n")[0].lower(), f"{cls.__name__}.{flag.path} is not in the usage"
            continue
        shown = f"--no-{flag.option[2:]}" if flag.default is True else flag.option
        assert shown in text, f"{cls.__name__}.{flag.path} has no flag {shown} in `omnilm {' '.join(command)} --help`"


def test_train_help_lists_every_training_field():
    text = subcommand_help("train")
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    assert names >= {f.name for f in dataclasses.fields(Hyperparams)}  # a stage's settings are TrainArgs' too
    hidden = {"stop_after"}  # a test hook: parsed, not listed
    for name in names - hidden:
        flag = "--" + name.replace("_", "-")
        assert flag in text or flag.replace("--", "--no-", 1) in text, name


def test_a_field_without_help_is_refused():
    @dataclass
    class Bare:
        steps: int = 3

    with pytest.raises(TypeError, match="Bare.steps has no help text"):
        add_flags(argparse.ArgumentParser(), Bare)


def test_flags_parse_back_into_the_dataclass():
    args = parse_args(["train", "--stage", "instruct", "--data", "d.json", "--image-folder", "img", "--out", "o",
                       "--steps", "7", "--tasks", "colour,shape", "--config", '{"text": {"n_layers": 2}}',
                       "--no-cache-images", "--no-bf16", "--optimizer", "muon", "--group-by-length"])
    got = from_flags(TrainArgs, args)
    assert got == TrainArgs(stage="instruct", data=Path("d.json"), image_folder=Path("img"), out=Path("o"), steps=7,
                            tasks=("colour", "shape"), config={"text": {"n_layers": 2}}, cache_images=False,
                            bf16=False, optimizer="muon", group_by_length=True)
    assert from_flags(TrainArgs, parse_args(["train", "--stage", "clip", "--data", "d", "--image-folder", "i",
                                             "--out", "o"])).bf16 is None  # decided at run time


def test_nested_settings_take_their_stage_prefix():
    args = parse_args(["demo", "--instruct-steps", "9", "--clip-lr", "0.5", "--align-batch-size", "4", "--n-train", "80",
                       "--no-progress"])
    recipe = from_flags(Recipe, args)
    default = Recipe()
    assert recipe.instruct == dataclasses.replace(default.instruct, steps=9)
    assert recipe.clip == dataclasses.replace(default.clip, lr=0.5)
    assert recipe.align == dataclasses.replace(default.align, batch_size=4)
    assert (recipe.n_train, recipe.progress, recipe.jitter) == (80, False, JITTER)
    assert from_flags(Recipe, parse_args(["demo"])) == default  # no flags: the demo's own recipe


def test_the_bench_is_the_recipe_plus_its_own_settings():
    args = parse_args(["bench", "fusion", "--steps", "40", "--clip-steps", "3", "--modes", "joint,late",
                       "--projector-lr", "0.01", "--no-group-by-length", "--no-clip"])
    bench = from_flags(FusionBench, args, FusionBench(), **BENCH_FLAGS)
    default = FusionBench()
    assert bench.modes == ("joint", "late") and not bench.clip and not bench.trains_clip
    assert bench.recipe.instruct == dataclasses.replace(default.recipe.instruct, steps=40, projector_lr=0.01,
                                                        group_by_length=False)
    assert bench.recipe.clip.steps == 3 and bench.recipe.align == default.recipe.align
    assert bench.recipe.stages == ("instruct",)  # no tower to train: no stage clip data either
    assert "--align-steps" not in subcommand_help("bench", "fusion")  # the bench runs no align stage


def test_settings_are_checked_once_for_library_and_command_line(capsys):
    one_line_error(lambda: Hyperparams(steps=0), "--steps is 0")
    one_line_error(lambda: Hyperparams(lr=-1.0), "--lr is -1.0")
    with pytest.raises(SystemExit) as e:
        from omnilm.cli import main

        main(["demo", "--instruct-steps", "0", "--out", "unused"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --instruct-steps is 0; it must be at least 1"
    assert not Path("unused").exists()
    with pytest.raises(SystemExit):
        main(["bench", "fusion", "--gate-lr", "0", "--clip-steps", "2", "--out", "unused"])
    assert capsys.readouterr().err.strip() == "error: --gate-lr is 0.0; it must be > 0"  # the bench's --gate-lr is instruct's


def test_setting_defaults_show_in_help():
    @dataclass(kw_only=True)
    class Demo:
        rate: float = setting(0.5, "a rate")
        names: tuple[str, ...] = setting(("a", "b"), "some names")
        on: bool = setting(True, "switched on")

    parser = argparse.ArgumentParser()
    add_flags(parser, Demo)
    text = parser.format_help()
    assert "a rate (default 0.5)" in text and "some names (default a,b)" in text and "--no-on" in text
    assert from_flags(Demo, parser.parse_args(["--names", "x,y", "--no-on"])) == Demo(names=("x", "y"), on=False)
