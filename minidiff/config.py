"""The one rule that turns a dict (a JSON file, saved settings) into a config dataclass.

    config_from_dict(cls, d, what)   cls(**d), nested configs built, lists made tuples where the field
                                     is a tuple, unknown fields an error naming them
    read_json(path, what)            a JSON object from a file, or an error naming the file
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path


def config_from_dict(cls, d, what: str = ""):
    """``cls(**d)`` for a config dataclass ``cls``, checked: minidiff's one way to read a config
    from a dict (a JSON file, saved settings).

    * a field whose type is a dataclass takes a dict of its fields (built by this same rule) or an
      instance;
    * a list becomes a tuple where the field is a tuple (JSON has no tuples), and each item an X
      where it is a ``tuple[X, ...]``;
    * unknown fields are a ``ValueError`` naming each of them and the fields ``cls`` takes; missing
      required fields are one naming them.

    ``d`` may also be an instance of ``cls`` (returned as it is).  ``what`` names the config in
    error messages ("the {what} config"; default: the class name)."""
    name = f"the {what} config" if what else cls.__name__
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(d).__name__}")
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {', '.join(unknown)}; "
                         f"{cls.__name__} takes {', '.join(names)}")
    missing = [f.name for f in fields(cls) if f.init and f.name not in d
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{name} lacks the field(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _as_field(hints[k], v, f"{what} {k}".strip()) for k, v in d.items()})


def _as_field(hint, value, what: str):
    """``value`` as a field of type ``hint`` takes it (see :func:`config_from_dict`)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if isinstance(value, Mapping):
        for option in options:
            if isinstance(option, type) and is_dataclass(option):
                return config_from_dict(option, value, what)
    if isinstance(value, list):
        for option in options:
            if option is tuple or typing.get_origin(option) is tuple:
                args = typing.get_args(option)
                if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: each item as an X
                    return tuple(_as_field(args[0], v, what) for v in value)
                return tuple(value)
    return value


def read_json(path, what: str = "JSON") -> dict:
    """A JSON object from a file; ``FileNotFoundError`` / ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a {what}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} should hold a {what} object")
    return d
