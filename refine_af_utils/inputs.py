"""Inputs that params name by path, fingerprinted by their content.

A stage's fingerprint hashes its params; for a path that would see only the path, so an edited local seed
file or an updated Super-NI checkout left stages 0 and 6 "complete". :func:`input_contents` adds the sha256
of what such a path holds: the seed file (a local one, or a URL's downloaded copy) and the files of a
local ``evaluation.superni_dir`` that the evaluation reads (its test split and those tasks). The bundled
inputs are part of the package, and ``superni@<commit>`` names its content by its commit.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Optional

from refine_af_utils.files import sha256_file


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def content_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per process while its size and modification time stay (the markers'
    rule): every stage's fingerprint and params record ask for the same inputs again."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def superni_tree_sha256(folder: Path) -> Optional[str]:
    """sha256 over a Super-NI checkout's test split and the task files it lists (None when there is no split)."""
    from refine_af_utils.superni import task_file, test_split_file

    split = test_split_file(folder)
    if not split.is_file():
        return None
    digest = hashlib.sha256(content_sha256(split).encode())
    for name in sorted({line.strip() for line in split.read_text(errors="replace").splitlines() if line.strip()}):
        path = task_file(folder, name)
        digest.update(f"{name} {content_sha256(path) if path.is_file() else 'missing'}".encode())
    return digest.hexdigest()


def input_contents(params: Any, sections: list[str]) -> dict[str, str]:
    """``{params key: sha256}`` for the path-valued keys of ``sections`` whose content is on this machine."""
    from refine_af_utils.seeds import BUNDLED, cached_seed_file

    contents: dict[str, str] = {}
    if "seed_tasks" in sections and str(params.seed_tasks) != BUNDLED:
        source = str(params.seed_tasks)
        path = cached_seed_file(source) if source.startswith(("http://", "https://")) else Path(source).expanduser()
        if path is not None and path.is_file():
            contents["seed_tasks"] = content_sha256(path)
    if "evaluation" in sections:
        value = params.evaluation.superni_dir
        if value != "bundled" and not value.startswith("superni@"):
            digest = superni_tree_sha256(Path(value).expanduser())
            if digest is not None:
                contents["evaluation.superni_dir"] = digest
    return contents
