"""Config fields that document themselves.

Each component owns a dataclass config in its own file; a field's help text and its
command-line spelling live on the field (``option(...)``), and ``main.py`` generates the
argparse options from them (``add_config_arguments``). A test or a script builds any
component from its config alone, without the command line.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     steps: int = option(8, "samples per ray")
...     fast: bool | None = option(None, "a speed lever", tristate=True)
>>> import argparse; p = argparse.ArgumentParser(); add_config_arguments(p, Demo)
>>> p.parse_args(["--steps", "4", "--no-fast"])
Namespace(steps=4, fast=False)
>>> from_namespace(Demo, p.parse_args([]))
Demo(steps=8, fast=None)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field with its command-line help.

    ``argparse_kwargs`` go to ``add_argument`` (``choices``, ``metavar``, ``nargs``, ``type``);
    ``tristate=True`` makes a ``--x/--no-x`` flag whose default None means "not given" (a
    preset such as ``-O`` may fill it in). Tuple defaults (ranges) become ``nargs=2`` options.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults (dataclass fields must be immutable)")
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line options (those with help)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _base_type(hint: Any) -> Any:
    """``int`` for ``int``, ``int | None`` and ``Optional[int]``: the type an option parses."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if args else hint
    return hint


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = ""
) -> None:
    """Add one ``--<prefix><name>`` option per documented field of ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        tristate = meta.pop("tristate", False)
        flags = [f"--{prefix}{f.name}"] + list(meta.pop("aliases", ()))
        default = f.default
        tp = _base_type(hints[f.name])
        if tristate:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=default, help=help_text, **meta
            )
        elif tp is bool:
            parser.add_argument(*flags, action="store_true", help=help_text, **meta)
        elif isinstance(default, tuple):
            item = type(default[0]) if default else str
            if "nargs" not in meta:
                meta.setdefault("metavar", ("MIN", "MAX"))
                meta["nargs"] = 2
            parser.add_argument(
                *flags, type=meta.pop("type", item), default=list(default), help=help_text, **meta
            )
        else:
            kind = meta.pop("type", None) or (tp if tp in (int, float, str) else None)
            parser.add_argument(*flags, type=kind, default=default, help=help_text, **meta)


def from_namespace(cls: type, ns: argparse.Namespace | dict, prefix: str = "", **overrides: Any) -> Any:
    """Build ``cls`` from the parsed options (lists become tuples); ``overrides`` win."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else ns
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in values:
            v = values[key]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    kwargs.update(overrides)
    return cls(**kwargs)
