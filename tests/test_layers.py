"""The packages import one way: each module imports only its own layer and the layers below it.

    errors  <  io, config, settings, cost  <  model  <  data  <  infer  <  interpret  <  train  <  eval
            <  recipes  <  serve  <  cli, __main__

The walk reads every `import` in omnilm/ (at the top of a module or inside a function: a function
that imports another omnilm module is an upward import in hiding, so those are refused too) and
fails with the offending lines. `omnilm/__init__.py` re-exports the model layer.
"""

import ast
from pathlib import Path

import pytest

import omnilm

LAYERS = [("errors",), ("io", "config", "settings", "cost"), ("model",), ("data",), ("infer",), ("interpret",),
          ("train",), ("eval",), ("recipes",), ("serve",), ("cli", "__main__")]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
RANK[""] = RANK["model"]  # `from omnilm import OmniModel`: the package's facade over the model layer


def layer(module: str) -> str:
    """'omnilm.model.hf' -> 'model'; 'omnilm' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_violations(root: Path) -> list[str]:
    """Every import in the package at `root` that reaches a higher layer, or another omnilm
    module from inside a function, as 'path:line: what'."""
    problems = []
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        if layer(module) not in RANK:
            problems.append(f"{file}: omnilm.{layer(module)} is in no layer; add it to LAYERS in tests/test_layers.py")
            continue
        tree = ast.parse(file.read_text(), str(file))
        in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            for target in (t for t in targets if t == "omnilm" or t.startswith("omnilm.")):
                where = f"{file.relative_to(root.parent)}:{node.lineno}"
                if RANK.get(layer(target), len(LAYERS)) > RANK[layer(module)]:
                    problems.append(f"{where}: omnilm.{layer(module) or '__init__'} imports {target}, a layer above it")
                elif id(node) in in_function:
                    problems.append(f"{where}: {target} imported inside a function; import it at the top")
    return problems


def test_layers_import_one_way():
    problems = import_violations(Path(omnilm.__file__).parent)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("from omnilm.data.tokenizer import Tokenizer\n", "omnilm.model imports omnilm.data.tokenizer, a layer above it"),
    ("def f():\n    from omnilm.infer.generate import generate\n", "a layer above it"),
    ("def f():\n    from omnilm.model.layers import eval_mode\n", "imported inside a function"),
    ("import omnilm.train.loop\n", "a layer above it"),
])
def test_an_upward_import_is_caught(tmp_path, source, expected):
    package = tmp_path / "omnilm"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("from omnilm.model import OmniModel\n")
    (package / "model" / "bad.py").write_text(source)
    problems = import_violations(package)
    assert len(problems) == 1 and expected in problems[0], problems
    (package / "model" / "bad.py").write_text("from omnilm.config import OmniConfig\nimport torch\n")
    assert import_violations(package) == []
