"""Run settings as dataclasses, and the command-line flags generated from them.

A setting is declared once: a dataclass field with its default and, beside it, its help text.

    steps: int = setting(500, "optimizer steps")

`add_flags(parser, cls)` gives every field a flag (`--steps`) typed, defaulted and documented from
the field; `from_flags(cls, args)` builds the dataclass back from the parsed arguments. A setting
is checked in its dataclass's `__post_init__`, so the library and the command line refuse alike.
A field that holds another settings dataclass (a recipe's per-stage training settings) gets its
flags with a prefix (`--clip-steps`), or none where the command says so.

    bool = False        --name             (store_true)
    bool = True         --no-name          (store_false)
    bool | None         --name / --no-name (None: decided at run time)
    tuple[str, ...]     --name a,b,c
    dict                --name '{"json": "object"}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnilm.config import is_finite_number, is_int
from omnilm.errors import OmniInputError

SUPPRESS = argparse.SUPPRESS  # as a help text: a flag that works but is not listed


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
            choices: tuple | None = None, metavar: str | None = None, positional: bool = False) -> Any:
    """A dataclass field with the help text of its flag (and optionally its choices; `positional`:
    an argument without a flag name, `omnilm eval CHECKPOINT`)."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "positional": positional}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside an `X | None`, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _nested(tp: Any) -> type | None:
    base, _ = _unwrap(tp)
    return base if dataclasses.is_dataclass(base) else None


class Flag(typing.NamedTuple):
    path: str  # dotted field path from the top dataclass: "instruct.steps"
    option: str  # "--instruct-steps"
    field: dataclasses.Field
    type: Any
    default: Any  # dataclasses.MISSING: required


def flags(cls: type, defaults: Any = None, prefixes: dict[str, str] | None = None, skip: tuple[str, ...] = (),
          _path: str = "", _prefix: str = "") -> list[Flag]:
    """Every flag of `cls`, nested settings flattened. `defaults`: an instance whose values are the
    defaults (else the fields' own); `prefixes`: dotted path of a nested field -> its flags' prefix
    (default "name-"); `skip`: dotted paths that get no flag (they keep their default)."""
    prefixes = prefixes or {}
    hints = typing.get_type_hints(cls)
    out = []
    own = set(cls.__dict__.get("__annotations__", {}))  # a subclass's own fields first: `stage` before `steps`
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        path = f"{_path}{f.name}"
        if not f.init or path in skip:
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        sub = _nested(hints[f.name])
        if sub is not None:
            out += flags(sub, default, prefixes, skip, path + ".", _nested_prefix(prefixes, path, _prefix))
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with omnilm.settings.setting")
        out.append(Flag(path, f"--{_prefix}{f.name.replace('_', '-')}", f, hints[f.name], default))
    return out


def _nested_prefix(prefixes: dict[str, str], path: str, parent: str) -> str:
    """The flag prefix of the nested settings at `path`: as `prefixes` says, else "parent-name-"."""
    return prefixes.get(path, f"{parent}{path.rsplit('.', 1)[-1].replace('_', '-')}-")


def _dest(path: str) -> str:
    return path.replace(".", "__")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _comma_list(kind: type):
    def parse(text: str):
        return kind(item.strip() for item in text.split(",") if item.strip())
    parse.__name__ = "comma-separated list"  # argparse names the type in its errors
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None,
              prefixes: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add a flag to `parser` for every field of `cls` (see `flags`)."""
    for flag in flags(cls, defaults, prefixes, skip):
        base, optional = _unwrap(flag.type)
        meta = flag.field.metadata
        kw: dict[str, Any] = {"dest": _dest(flag.path), "help": meta["help"]}
        name = flag.option
        if meta.get("positional"):
            parser.add_argument(_dest(flag.path), type=base, help=meta["help"], metavar=flag.field.name.upper())
            continue
        if flag.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = flag.default
        if base is bool and optional:
            kw["action"] = argparse.BooleanOptionalAction
        elif base is bool and flag.default:
            name = "--no-" + name[2:]
            kw["action"] = "store_false"
        elif base is bool:
            kw["action"] = "store_true"
        else:
            origin = typing.get_origin(base)
            if origin in (tuple, list):
                kw["type"] = _comma_list(origin)
            elif base is dict or origin is dict:
                kw["type"] = json.loads
            else:
                kw["type"] = base
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            else:
                kw["metavar"] = meta.get("metavar") or flag.field.name.upper()
        if (kw["help"] != SUPPRESS and "default" in kw and base is not bool and flag.default not in (None, {}, ())
                and "default" not in kw["help"]):
            kw["help"] += f" (default {_shown(flag.default)})"
        if kw["help"] != SUPPRESS:
            kw["help"] = kw["help"].replace("%", "%%")
        parser.add_argument(name, **kw)


def from_flags(cls: type, args: argparse.Namespace, defaults: Any = None, prefixes: dict[str, str] | None = None,
               skip: tuple[str, ...] = (), _path: str = "", _prefix: str = "") -> Any:
    """The `cls` that the parsed `args` describe (`defaults`, `prefixes` and `skip` as given to
    `add_flags`; fields without a flag keep `defaults`' values or their own defaults). A nested
    setting refused by its dataclass is named by the flag the command line gave it."""
    prefixes = prefixes or {}
    hints = typing.get_type_hints(cls)
    values = vars(args)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{_path}{f.name}"
        if not f.init:
            continue
        sub = _nested(hints[f.name])
        if sub is not None and path not in skip:
            kwargs[f.name] = from_flags(sub, args, getattr(defaults, f.name, None), prefixes, skip, path + ".",
                                        _nested_prefix(prefixes, path, _prefix))
        elif path not in skip and _dest(path) in values:
            kwargs[f.name] = values[_dest(path)]
        elif defaults is not None:
            kwargs[f.name] = getattr(defaults, f.name)
    try:
        return cls(**kwargs)
    except OmniInputError as e:
        if not _prefix:
            raise
        # The dataclass names its own flags (--steps); the command line knows them as --clip-steps.
        names = "|".join(re.escape(f.name.replace("_", "-")) for f in dataclasses.fields(cls))
        raise OmniInputError(re.sub(rf"(?<![\w-])--({names})(?![\w-])", rf"--{_prefix}\1", str(e))) from None


def to_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready values (paths as strings, tuples as lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(settings))


# --- checks a settings dataclass runs in __post_init__ (messages name the flag) ---------------------


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_range(settings: Any, names: tuple[str, ...], low: float | None = None, high: float | None = None,
                above: float | None = None, what: str = "", named: Callable[[str], str] = flag_name) -> None:
    """Each of `names` (None allowed) is a finite number in [low, high], and > `above` if given.
    Errors call a field by its flag (`named`: for fields that come from elsewhere, `str`)."""
    for name in names:
        value = getattr(settings, name)
        if value is None:
            continue
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        if not (is_int(value) or is_finite_number(value)):  # an int of any size compares exactly
            raise OmniInputError(f"{named(name)} is {shown}; give a finite number")
        if (low is not None and value < low) or (high is not None and value > high) or \
                (above is not None and not value > above):
            if high is None:
                bounds = f"> {above}" if above is not None else f"at least {low}"
            else:
                bounds = f"in ({above}, {high}]" if above is not None else f"between {low} and {high}"
            raise OmniInputError(f"{named(name)} is {shown}; it must be {bounds}{what}")


SEED_MAX = 2**32 - 1  # seeds are mixed with the epoch into torch's 64-bit generator seeds


def check_seed(settings: Any, name: str = "seed") -> None:
    check_range(settings, (name,), 0, SEED_MAX)


def check_output_folder(path: str | Path, flag: str) -> None:
    """`path` can be a folder we write into: not a file, and under a folder we may write in."""
    _check_writable(Path(path), flag, folder=True)


def check_output_file(path: str | Path, flag: str) -> None:
    """`path` can be a file we write: not a folder, in an existing folder we may write in."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OmniInputError(f"{flag} {path}: the folder {path.parent} does not exist; create it or choose another")
    _check_writable(path, flag, folder=False)


def _check_writable(path: Path, flag: str, folder: bool) -> None:
    if path.exists() and path.is_dir() != folder:
        what = "a file" if folder else "a folder"
        raise OmniInputError(f"{flag} {path} is {what}; give {'a folder' if folder else 'a file'} path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise OmniInputError(f"{flag} {path}: {existing} is a file, so nothing can be written under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OmniInputError(f"{flag} {path}: {existing} is not writable by this user; choose another path")
