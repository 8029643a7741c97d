"""Library messages that tell a user of this package nothing, filtered where the package calls the library.

Each entry says what is filtered and why it is harmless here. Everything else a library prints still shows.
They come from trl's PPO loop and from peft wrapping a model (stages 3-6), so :func:`quiet_known_noise`
wraps every stage's ``run`` (``run_folder.stage_entry``) and stage 3's PPO training (also run alone under
``accelerate launch``); :func:`quiet_load_report` wraps the one load whose report lists an intended fresh
weight.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

# (category, message pattern, why it is harmless here)
KNOWN_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "trl 1.9.2 (pinned: its last release with PPO) and peft 0.21.2 (building every PeftModel) read transformers' "
     "old attribute name; nothing to change here"),
]
# transformers' own log records (not the warnings module): (message pattern, why)
KNOWN_LOG_RECORDS: list[tuple[str, str]] = [
    (r"Passing `generation_config` together with generation-related arguments",
     "trl 1.9.2's rollout generation passes both; transformers merges them the same way"),
]
_LOG_PATTERN = re.compile("|".join(f"(?:{pattern})" for pattern, _ in KNOWN_LOG_RECORDS))


class _KnownRecords(logging.Filter):
    """Drops the log records of :data:`KNOWN_LOG_RECORDS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _LOG_PATTERN.search(record.getMessage())


@contextlib.contextmanager
def quiet_known_noise() -> Iterator[None]:
    """Inside the block, drop :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_RECORDS` (nothing else)."""
    from transformers.utils import logging as transformers_logging

    root = transformers_logging.get_logger()  # the library's root logger: its modules' records propagate here
    record_filter = _KnownRecords()
    holders = [root, *root.handlers]
    with warnings.catch_warnings():
        for category, pattern, _ in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
        for holder in holders:
            holder.addFilter(record_filter)
        try:
            yield
        finally:
            for holder in holders:
                holder.removeFilter(record_filter)


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Hide transformers' load report inside the block: for a load whose missing weights are intended (stage
    3's value head starts fresh, and is then zeroed), the report's "MISSING ... Consider training" reads
    as an alarm. Errors still show."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
