"""The generic validator of the params schema: types from annotations, ranges from field metadata.

:func:`build` turns a nested mapping into a schema dataclass. Each value is checked against its
field's annotation (ints widen to floats, NaN and inf are refused). A numeric constraint belongs
to the field that declares it (:func:`checked`, :func:`positive`, :func:`at_least_zero`,
:func:`fraction`), never to a field name: a new field is checked only when it says so. A schema
class may also define ``validate(prefix, source)`` for checks that span its fields; it runs after
the field ranges. Every refusal is a :class:`~refine_af_utils.errors.ParamsError` naming the
source and the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable, Literal, Union

from refine_af_utils.errors import ParamsError

RANGE = "range"  # the field metadata key: (predicate, what the value must be)


def checked(default: Any, check: Callable[[Any], bool], must_be: str) -> Any:
    """A dataclass field whose value (unless null) must pass ``check``, else "must be ``must_be``, got ..."."""
    return dataclasses.field(default=default, metadata={RANGE: (check, must_be)})


def positive(default: Any) -> Any:
    """A field that must be above 0 (or null)."""
    return checked(default, lambda v: v > 0, "positive")


def at_least_zero(default: Any, note: str = "") -> Any:
    """A field that must be 0 or more; ``note`` is added to the message in brackets."""
    return checked(default, lambda v: v >= 0, "at least 0" + (f" ({note})" if note else ""))


def fraction(default: Any, *, low_open: bool = False, high_open: bool = False) -> Any:
    """A field in [0, 1]; ``low_open`` / ``high_open`` leave out 0 / 1 (the message shows the interval)."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    return checked(default, lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1),
                   f"in {interval}")


def check_ranges(section: Any, source: str, prefix: str = "") -> None:
    """Refuse a field value outside the range its field declares (:func:`checked`); null passes."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if RANGE in f.metadata and value is not None:
            check, must_be = f.metadata[RANGE]
            if not check(value):
                raise ParamsError(f"{source}: key '{prefix}{f.name}' must be {must_be}, got {value}")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        return "a list of " + _type_name(typing.get_args(annotation)[0])
    if origin is dict:
        return "a mapping of names to values"
    return getattr(annotation, "__name__", str(annotation))


def _accepts_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts_float(a) for a in typing.get_args(annotation))
    return False


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check ``value`` against ``annotation``; return it (ints widen to floats; NaN and inf are refused)."""
    origin = typing.get_origin(annotation)
    if isinstance(value, float) and not math.isfinite(value) and _accepts_float(annotation):
        raise ParamsError(f"{source}: key '{key}' must be a finite number, got {value}")
    wrong = ParamsError(
        f"{source}: key '{key}' must be {_type_name(annotation)}, got {value!r} "
        f"({type(value).__name__})"
    )
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key, source)
            except ParamsError:
                continue
        raise wrong
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise wrong
        try:  # plain YAML values only: they go into the fingerprint and config.json
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ParamsError(f"{source}: key '{key}' must hold plain values (numbers, strings, lists, "
                              f"mappings), got {value!r} ({error})") from error
        return dict(value)
    if annotation is type(None):
        if value is None:
            return None
        raise wrong
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise wrong
        return build(annotation, value, source, key + ".")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported annotation {annotation!r} for key {key}")


def build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    """``cls`` (a schema dataclass) from ``data``: keys known, required keys given, types and ranges checked.

    Nested sections are built first; then :func:`check_ranges`, then ``cls.validate(prefix, source)`` if any.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ParamsError(
                f"{source}: unknown key '{prefix}{key}' (known keys here: {', '.join(sorted(known))})"
            )
    kwargs = {}
    for name, spec in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{source}: required key '{prefix}{name}' is missing")
    section = cls(**kwargs)
    check_ranges(section, source, prefix)
    validate = getattr(section, "validate", None)
    if validate is not None:
        validate(prefix, source)
    return section


def check_key(schema: type, dotted: str, source: str) -> None:
    """Refuse a dotted key (an override) that ``schema`` does not have, naming the whole key."""
    cls: Any = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(cls):
            raise ParamsError(f"{source}: key '{'.'.join(parts[:i])}' is a value, not a section: "
                              f"cannot set '{dotted}'")
        known = {f.name for f in dataclasses.fields(cls)}
        if part not in known:
            raise ParamsError(f"{source}: unknown key '{here}' (known keys here: {', '.join(sorted(known))})")
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) is dict:
            return  # a free mapping (trainer_args): its keys are checked with the whole params
