"""Datasets from outside the pipeline as extra SFT arms (``sft.external_arms``: ``{name: source}``).

A source is a JSONL file of ``instruction``/``input``/``output`` records, a Hugging Face dataset folder (what
``python -m refine_af_utils.export`` writes) or a hub id (split ``train``, read with ``datasets``). Each record
is checked like the seed tasks: a bad one stops with one line naming the source, the record and the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from refine_af_utils.errors import ParamsError, RefineAFError

ARM_NAME = re.compile(r"[a-z][a-z0-9_]*")
# layout.MODELS, spelled here because params (which checks names at load) may not import layout (a test keeps
# the two equal)
RESERVED_NAMES = ("base", "self_instruct", "refine_af")


class ExternalArmError(RefineAFError, ValueError):
    """An external arm's dataset cannot be read or has a bad record."""


def check_external_arms(arms: dict[str, Any], source: str) -> None:
    """Names that cannot clash with the pipeline's models or folders, and sources given as strings."""
    for name, where in arms.items():
        if not isinstance(name, str) or not ARM_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise ParamsError(f"{source}: key 'sft.external_arms.{name}': an arm's name must match "
                              f"{ARM_NAME.pattern} and not be one of {', '.join(RESERVED_NAMES)}")
        if not isinstance(where, str) or not where.strip():
            raise ParamsError(f"{source}: key 'sft.external_arms.{name}' must be a path or hub id, got {where!r}")


def load_external_arm(name: str, source: str) -> list[dict[str, str]]:
    """The records of external arm ``name`` from ``source``, each with string ``instruction``, ``input``
    (empty when absent) and ``output``; :class:`ExternalArmError` on the first bad one."""
    path = Path(source).expanduser()
    if path.is_file():
        rows: list[tuple[str, Any]] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except ValueError as error:
                    raise ExternalArmError(f"{path}:{number}: not a JSON record ({error.msg})") from None
    else:
        try:
            from datasets import load_dataset

            dataset = load_dataset(str(path) if path.is_dir() else source, split="train")
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; the user needs the one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExternalArmError(f"sft.external_arms.{name}: cannot read {source!r} as a dataset: {first}") from None
        rows = [(f"{source} (train row {n})", row) for n, row in enumerate(dataset, start=1)]
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ExternalArmError(f"{where}: a record must be a mapping, got {type(row).__name__}")
        record = {"instruction": row.get("instruction"), "input": row.get("input") or "", "output": row.get("output")}
        for key in ("instruction", "output"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise ExternalArmError(f"{where}: key '{key}' must be a non-empty string, got {record[key]!r}")
        if not isinstance(record["input"], str):
            raise ExternalArmError(f"{where}: key 'input' must be a string, got {record['input']!r}")
        records.append(record)
    if not records:
        raise ExternalArmError(f"sft.external_arms.{name}: {source!r} holds no record")
    return records


def records_sha256(records: list[dict[str, str]]) -> str:
    """A hash of an arm's records (its adapter is made from exactly these)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
