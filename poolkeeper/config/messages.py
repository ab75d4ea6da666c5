"""What a config error says, and where: pydantic's errors turned into `file:line:col: message`
lines, and the "did you mean" suggestions.

`Invalid` is the error a field validator (model.py) raises; `issue_for` maps one pydantic error
(an `Invalid`, or pydantic's own) to an `Issue` at the position yamlload recorded for it, through
a `Where` (the positions of one validated mapping; `JobWhere` for a job with merged defaults).
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from poolkeeper.config.yamlload import Document, Issue, Loc, Pos, describe, trap_message


class Invalid(ValueError):
    """A field's value is wrong. The message gets ", got <the input>" when `show_input`, in
    words that say what YAML made of the text. `wants_string`: the field is written as a
    string, so a non-string that YAML 1.1 made of an unquoted word gets the trap explanation,
    followed by `hint` (default: "quote it")."""

    def __init__(
        self,
        message: str,
        *,
        show_input: bool = False,
        wants_string: bool = False,
        hint: str | None = None,
        any_string: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.show_input = show_input
        self.wants_string = wants_string
        self.hint = hint
        self.any_string = any_string  # any string would do: quoting the input fixes it


def did_you_mean(word: str, choices: Any) -> str:
    """The suffix " (did you mean 'x'?)" for the choice closest to `word`, or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- Positions of model locs ------------------------------------------------------------------


class Where:
    """Positions and source scalars for model locs of one validated mapping."""

    def __init__(self, doc: Document, prefix: tuple[Any, ...] = (), what: str | None = None):
        self.doc = doc
        self.prefix = prefix
        self.what = what  # "job 'x'" for messages about the mapping itself

    def pos(self, rel: tuple[Any, ...], *, key: bool = False) -> Pos:
        path = (*self.prefix, *rel)
        return (
            self.doc.key_pos(path) if key or not rel and self.prefix else self.doc.value_pos(path)
        )

    def loc(self, rel: tuple[Any, ...]) -> Loc | None:
        return self.doc.locs.get((*self.prefix, *rel))


class JobWhere(Where):
    """Like Where, but keys merged from `defaults:` point into the defaults section."""

    def __init__(self, doc: Document, name: str, defaults: Where, merged: set[str]):
        super().__init__(doc, ("jobs", name), f"job '{name}'")
        self.defaults = defaults
        self.merged = merged

    def pos(self, rel: tuple[Any, ...], *, key: bool = False) -> Pos:
        if rel and rel[0] in self.merged:
            return self.defaults.pos(rel, key=key)
        return super().pos(rel, key=key)

    def loc(self, rel: tuple[Any, ...]) -> Loc | None:
        if rel and rel[0] in self.merged:
            return self.defaults.loc(rel)
        return super().loc(rel)


# --- Pydantic errors -> messages at positions --------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def issue_for(error: Any, where: Where, model: type[BaseModel]) -> Issue:
    """One pydantic error of validating `model` -> an Issue at its position in the file."""
    loc = tuple(error["loc"])
    at_key = bool(loc) and loc[-1] == "[key]"  # a dict key failed its own validation
    if at_key:
        loc = loc[:-1]
    kind = error["type"]
    if kind == "extra_forbidden":
        key = loc[-1]
        return Issue.at(
            where.pos(loc, key=True),
            f"unknown key '{key}'{did_you_mean(str(key), _fields_at(model, loc[:-1]))}",
        )
    if kind == "missing":
        owner = _shown(loc[:-1]) or (where.what if where.prefix else None)
        message = f"missing required key '{loc[-1]}'"
        if loc == ("version",):
            message += "; a job spec starts with 'version: 1'"
        return Issue.at(where.pos(loc[:-1], key=True), f"{owner}: {message}" if owner else message)
    value = error.get("input")
    source = where.loc(loc)
    scalar = source.scalar if source is not None and not at_key else None
    message = _message(kind, error, value, scalar)
    shown = _shown(loc)
    return Issue.at(where.pos(loc, key=at_key), f"{shown}: {message}" if shown else message)


def _message(kind: str, error: Any, value: Any, scalar: Any) -> str:
    got = describe(value, scalar)
    trap = scalar is not None and scalar.plain and scalar.text != "" and got != describe(value)
    if kind == "value_error" and isinstance(error["ctx"]["error"], Invalid):
        exc: Invalid = error["ctx"]["error"]
        if exc.wants_string and trap and not isinstance(value, str):
            return f"got {got}; {exc.hint or f'quote it ({chr(39)}{scalar.text}{chr(39)}) if you meant the string'}"
        message = f"{exc.message}, got {got}" if exc.show_input else exc.message
        if (
            exc.any_string
            and scalar is not None
            and scalar.plain
            and scalar.text
            and value is not None
        ):
            message += f"; quote it ('{scalar.text}')"  # e.g. PORT: 8080 -> '8080'
        return message
    if kind == "string_type":
        return trap_message(value, scalar)
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }[kind]
        bound = next(iter(error["ctx"].values()))
        return f"must be {op} {bound:g}, got {value:g}"
    if kind == "finite_number":
        return f"must be a finite number, got {got}"
    return str(error.get("msg", "invalid value"))


def _shown(loc: tuple[Any, ...]) -> str:
    """('retry', 'initial') -> 'retry.initial', ('pythonpath', 0) -> 'pythonpath[0]'. Locs of
    job settings and of `defaults:` are shown the same, so a bad default reported for the
    defaults section and for each job that inherits it is one message."""
    if loc[:1] == ("defaults",):
        loc = loc[1:]
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model allows in the mapping at `loc` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if (
            isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            current = _unwrap(current.model_fields[part].annotation)
        elif get_origin(current) is dict:
            current = _unwrap(get_args(current)[1])
        else:
            return []
    return (
        list(current.model_fields)
        if isinstance(current, type) and issubclass(current, BaseModel)
        else []
    )


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / Annotated[X, ...] -> X."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation
