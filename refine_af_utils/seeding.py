"""The one seed rule: every random stream of the pipeline is derived from the run's seed and a stable key."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def derive_seed(random_seed: int, stage: str, *keys: Any) -> int:
    """A 31-bit seed for ``stage`` and ``keys`` (JSON-serialisable), stable across runs and resumes.

    Keys name *what* is drawn (an instruction, a batch's first job, an update number), never a
    position in a list of jobs still to do, so a resumed stage draws exactly what an
    uninterrupted one would.
    """
    text = json.dumps([int(random_seed), str(stage), *keys], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF
