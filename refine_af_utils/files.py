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


MAX_DOWNLOAD_BYTES = 512 * 2**20  # a generous cap on one downloaded file (not measured against Super-NI's largest)
MAX_DOWNLOAD_SECONDS = 600.0  # in all, however slowly the server sends (a timeout only bounds each read)


def copy_capped(source: Any, out: Any, what: str, max_bytes: int = MAX_DOWNLOAD_BYTES,
                seconds: float = MAX_DOWNLOAD_SECONDS) -> int:
    """Copy a response body to ``out`` in chunks, at most ``max_bytes`` and ``seconds`` in all; return its size.

    Raises :class:`~refine_af_utils.errors.DownloadLimitError` (an ``OSError``) naming ``what`` and the limit.
    """
    import time

    from refine_af_utils.errors import DownloadLimitError

    headers = getattr(source, "headers", None)
    length = headers.get("Content-Length") if headers is not None else None
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise DownloadLimitError(f"{what}: {int(length)} bytes, over the {max_bytes}-byte limit")
    started, size = time.monotonic(), 0
    while chunk := source.read(1 << 20):
        size += len(chunk)
        if size > max_bytes:
            raise DownloadLimitError(f"{what}: over the {max_bytes}-byte limit")
        if time.monotonic() - started > seconds:
            raise DownloadLimitError(f"{what}: not done after {seconds:.0f} s (the limit for one download)")
        out.write(chunk)
    return size


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


def whole_csv_rows(path: str | Path) -> tuple[str, list[str]]:
    """An append-only CSV's header and its whole rows: a last row without its newline (torn by a crash) or
    with another number of fields than the header is left out. ``("", [])`` for a missing or empty file.
    Every reader of such a file (the stage that resumes it, the report) uses this one rule."""
    path = Path(path)
    if not path.is_file():
        return "", []
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]  # after the last newline: torn or empty
    if not complete:
        return "", []
    width = len(complete[0].split(","))
    return complete[0], [line for line in complete[1:] if len(line.split(",")) == width]


def read_whole_csv(path: str | Path) -> Any:
    """:func:`whole_csv_rows` as a pandas DataFrame (a missing or empty file raises FileNotFoundError)."""
    import io

    import pandas as pd

    header, rows = whole_csv_rows(path)
    if not header:
        raise FileNotFoundError(f"{path}: missing or empty")
    return pd.read_csv(io.StringIO("\n".join([header, *rows]) + "\n"))


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
