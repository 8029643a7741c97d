"""Seed tasks in Self-Instruct's ``seed_tasks.jsonl`` schema: the schema, the loader and the writer.

One JSON object a line: ``id``, ``name``, ``instruction``, ``instances`` (a list of
``{input, output}``; input may be empty) and ``is_classification``. Extra fields are kept.
Sources are a local path, ``bundled`` (our own 36 tasks) or an http(s) URL fetched once
into the cache. Stage 0 (:mod:`refine_af_utils.stages.seed_tasks`) validates them into the run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from refine_af_utils.errors import RefineAFError, decode_utf8
from refine_af_utils.files import atomic_write_text, cache_dir, copy_capped, partial_path

if TYPE_CHECKING:
    pass

BUNDLED = "bundled"
BUNDLED_SEED_TASKS = Path(__file__).parent / "data" / "seed_tasks.jsonl"
SELF_INSTRUCT_SEED_TASKS_URL = (
    "https://raw.githubusercontent.com/yizhongw/self-instruct/"
    "0b26ccaa415992100fa32df62d41b994cf928e23/data/seed_tasks.jsonl"
)


# One seed task a line: Self-Instruct's longest is under 2 kB. A 50 MB line once made stage 1 use
# 9.9 GB (its prompts and ROUGE-L pool hold every seed instruction), so longer lines are refused.
MAX_SEED_LINE_BYTES = 100_000


class SeedTaskError(RefineAFError, ValueError):
    """A seed file that does not match the schema."""


@dataclass
class Instance:
    """One input/output example of a task; ``input`` may be empty."""

    input: str
    output: str


@dataclass
class SeedTask:
    """One seed task; ``extra`` keeps fields beyond the schema."""

    id: str
    name: str
    instruction: str
    instances: list[Instance]
    is_classification: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The task as a JSON-ready dict, in the file's schema."""
        return {
            "id": self.id,
            "name": self.name,
            "instruction": self.instruction,
            "instances": [{"input": i.input, "output": i.output} for i in self.instances],
            "is_classification": self.is_classification,
            **self.extra,
        }


def _cache_path(url: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "seeds" / f"{digest}-{Path(url.split('?')[0]).name or 'seeds.jsonl'}"


def cached_seed_file(url: str) -> Optional[Path]:
    """The downloaded copy of a seed URL (None before the first download)."""
    target = _cache_path(url)
    return target if target.is_file() else None


def refresh_seed_download(source: str | Path) -> None:
    """Fetch a seed URL again into the cache (the runner's ``--refresh-downloads``); other sources: nothing."""
    if str(source).startswith(("http://", "https://")):
        _fetch(str(source), refresh=True)


def _fetch(url: str, refresh: bool = False) -> Path:
    """Download ``url`` once into the cache; later calls reuse the file (``refresh``: download it again)."""
    target = _cache_path(url)
    if target.is_file() and not refresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            size = copy_capped(response, out, url)
            expected = response.headers.get("Content-Length")
        if expected is not None and size != int(expected):
            raise SeedTaskError(f"{url}: download cut off ({size} of {expected} bytes); run again")
    except (OSError, http.client.HTTPException) as error:  # timeouts, resets, limits, IncompleteRead
        raise SeedTaskError(f"{url}: could not download the seed tasks ({error})") from error
    partial.replace(target)
    return target


def resolve_seed_source(source: str | Path) -> Path:
    """The local file behind ``source`` (a path, ``bundled`` or a URL, fetched once)."""
    source = str(source)
    if source == BUNDLED:
        return BUNDLED_SEED_TASKS
    if source.startswith(("http://", "https://")):
        return _fetch(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise SeedTaskError(f"{source}: seed task file not found")
    return path


def _require(record: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in record:
        raise SeedTaskError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SeedTaskError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def _parse_task(record: Any, where: str) -> SeedTask:
    if not isinstance(record, dict):
        raise SeedTaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
    task_id = _require(record, "id", (str, int), where)
    name = _require(record, "name", str, where)
    instruction = _require(record, "instruction", str, where)
    if not instruction.strip():
        raise SeedTaskError(f"{where}: field 'instruction' is empty")
    raw_instances = _require(record, "instances", list, where)
    if not raw_instances:
        raise SeedTaskError(f"{where}: field 'instances' is an empty list")
    instances = []
    for index, raw in enumerate(raw_instances):
        spot = f"{where}: field 'instances[{index}]'"
        if not isinstance(raw, dict):
            raise SeedTaskError(f"{spot} must be an object with 'input' and 'output'")
        for key in ("input", "output"):
            if key not in raw:
                raise SeedTaskError(f"{spot}: missing field '{key}'")
            if not isinstance(raw[key], str):
                raise SeedTaskError(f"{spot}: field '{key}' must be str, got {type(raw[key]).__name__}")
        instances.append(Instance(raw["input"], raw["output"]))
    is_classification = _require(record, "is_classification", bool, where)
    known = {"id", "name", "instruction", "instances", "is_classification"}
    extra = {k: v for k, v in record.items() if k not in known}
    return SeedTask(str(task_id), name, instruction, instances, is_classification, extra)


def load_seed_tasks(source: str | Path) -> list[SeedTask]:
    """Read and validate seed tasks from a path, ``bundled`` or a URL.

    Raises :class:`SeedTaskError` naming the file, the line and the field for bad JSON,
    missing fields, wrong types, empty instructions, duplicate ids, bytes that are not UTF-8,
    lines longer than :data:`MAX_SEED_LINE_BYTES` and empty files.
    """
    path = resolve_seed_source(source)
    tasks: list[SeedTask] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as handle:
        line_number = 0
        while raw := handle.readline(MAX_SEED_LINE_BYTES + 2):  # a bounded read: never a whole huge line
            line_number += 1
            where = f"{path}:{line_number}"
            if len(raw.rstrip(b"\r\n")) > MAX_SEED_LINE_BYTES:
                raise SeedTaskError(
                    f"{where}: line longer than {MAX_SEED_LINE_BYTES} bytes, the limit for one seed task "
                    "(is the file one JSON object a line?)"
                )
            line = decode_utf8(raw, str(path), SeedTaskError, first_line=line_number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SeedTaskError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from error
            except RecursionError:
                raise SeedTaskError(f"{where}: JSON nested too deeply to read (a seed task is a flat object)") from None
            task = _parse_task(record, where)
            if task.id in seen:
                raise SeedTaskError(f"{where}: field 'id' duplicates id {task.id!r} of line {seen[task.id]}")
            seen[task.id] = line_number
            tasks.append(task)
    if not tasks:
        raise SeedTaskError(f"{path}: no seed tasks (the file is empty)")
    return tasks


def write_seed_tasks(tasks: list[SeedTask], path: str | Path) -> None:
    """Write tasks as JSONL in the seed schema (the stage 0 artefact)."""
    atomic_write_text(path, "".join(json.dumps(task.to_dict(), ensure_ascii=False) + "\n" for task in tasks))


