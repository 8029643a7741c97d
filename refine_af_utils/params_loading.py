"""Reading params YAML files: one file's mapping, its ``extends`` chain, and ``--set`` overrides.

Nothing here knows the schema: these functions give the plain mapping that
:func:`refine_af_utils.params.load_params` then checks key by key. A file that is not UTF-8, not valid
YAML, gives a key twice or is not a mapping stops with a one-line
:class:`~refine_af_utils.errors.ParamsError` naming the file and the line.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from refine_af_utils.errors import ParamsError, decode_utf8


# YAML 1.2's core schema reads `1e-4` and `5E3` as floats; PyYAML follows YAML 1.1, which wants a dot in a
# float and so reads `1e-4` as the string '1e-4'. This is 1.1's float pattern with the dot made optional
# when an exponent is given (plain integers still resolve to int: the pattern needs a dot or an exponent).
_YAML12_FLOAT = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class _Yaml12NumberLoader(yaml.SafeLoader):
    """yaml's safe loader with YAML 1.2 floats (``1e-4`` is a float), for params files and ``--set`` alike."""


_Yaml12NumberLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def load_yaml_text(text: str) -> Any:
    """One YAML document with YAML 1.2 numbers (the params files' and ``--set``'s reading)."""
    return yaml.load(text, Loader=_Yaml12NumberLoader)  # noqa: S506 - a SafeLoader subclass


class _UniqueKeyLoader(_Yaml12NumberLoader):
    """The params loader, except that a key given twice in one mapping is an error (not: the last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that later keys may override
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark)
            except TypeError:  # an unhashable key: yaml's own constructor reports it
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(path: Path, error: yaml.YAMLError) -> str:
    """A YAML error as one line: ``file:line: not valid YAML (problem)``."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error)
    if problem.startswith("duplicate key"):
        return f"{where}: {problem}"
    if getattr(error, "context", None):
        context_mark = getattr(error, "context_mark", None)
        opened = f" (line {context_mark.line + 1})" if context_mark is not None and context_mark != mark else ""
        problem = f"{error.context}{opened}: {problem}"
    return f"{where}: not valid YAML ({' '.join(problem.split())})"


def read_params_yaml(path: Path) -> dict[str, Any]:
    """One params file's own mapping (its ``extends`` not yet followed)."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    text = decode_utf8(path.read_bytes(), str(path), ParamsError)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ParamsError(_yaml_error_line(path, error)) from error
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``delta`` over ``base``: mappings are merged key by key, any other value (lists too) replaces."""
    merged = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_extends(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file's mapping with its ``extends:`` chain applied (not yet validated).

    ``extends: other.yaml`` names a params file relative to this one; this file's keys are merged
    over it (:func:`deep_merge`). A chain that comes back to a file it already passed is refused.
    """
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise ParamsError(f"{path}: 'extends' makes a cycle ({cycle})")
    data = read_params_yaml(path)
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ParamsError(f"{path}: key 'extends' must be the path of a params file (relative to this one), "
                          f"got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ParamsError(f"{path}: key 'extends': {parent_path}: params file not found")
    return deep_merge(resolve_extends(parent_path, (*_chain, here)), data)


def parse_overrides(items: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """``["key.sub=value", ...]`` (the command line's ``--set``) as dotted keys; values parsed by YAML.

    ``--set evaluation.max_new_tokens=64`` gives the int 64, ``--set model.device=cuda`` the string,
    ``--set rl.lora.target_modules=[q_proj,v_proj]`` a list; the schema types and checks them later.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ParamsError(f"{source} {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                              "evaluation.max_new_tokens=64")
        try:
            overrides[key] = load_yaml_text(text)
        except yaml.YAMLError as error:
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            raise ParamsError(f"{source} {item!r}: the value is not valid YAML ({problem})") from error
    return overrides
