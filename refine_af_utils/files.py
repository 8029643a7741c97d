"""Files that survive a crash (kill -9) at any moment, and where the package caches downloads.

* Whole or absent: :func:`atomic_write_text` writes ``<name>.<pid>.partial`` and renames it into
  place (the pid keeps processes under accelerate apart); readers never see half a file.
* Append-only JSONL: writers append whole batches of lines with one write, then flush and fsync.
  A crash can leave at most one torn (newline-less) line at the end; readers ignore it and
  :func:`truncate_torn_tail` removes it before the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable


def cache_dir() -> Path:
    """The cache folder for prepared models and downloads: ``$REFINE_AF_CACHE`` or ``~/.cache/refine-af``."""
    return Path(os.environ.get("REFINE_AF_CACHE", Path.home() / ".cache" / "refine-af"))


def partial_path(path: str | Path) -> Path:
    """Where a whole-or-absent write of ``path`` (a file or a folder) is made before it is renamed into place."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (write a partial file, then rename); return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append ``records`` as JSON lines with one write, then flush and fsync."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of ``path`` (a missing file reads as empty; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                break  # torn tail of a crashed write
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
    return records


def truncate_torn_tail(path: str | Path) -> None:
    """Cut a newline-less last line (left by a crash mid-write) off ``path``."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            os.fsync(handle.fileno())


def truncate_to_records(path: str | Path, keep: int) -> None:
    """Keep only the first ``keep`` lines of ``path`` (drops records of an uncommitted batch)."""
    path = Path(path)
    if not path.is_file():
        return
    offset = 0
    with open(path, "rb") as handle:
        for _ in range(keep):
            line = handle.readline()
            if not line.endswith(b"\n"):
                break
            offset += len(line)
    with open(path, "r+b") as handle:
        handle.truncate(offset)
        os.fsync(handle.fileno())
