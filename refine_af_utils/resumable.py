"""The one crash-safe batch loop: jobs in batches, each batch's records appended to a JSONL file.

Stages 2 (candidate instances), 3 (held-out samples), 4 (instances per arm) and 6 (Super-NI
predictions) all decode many jobs in batches and must survive a SIGKILL at any moment with no
duplicate and no loss. They share this loop:

1. cut the torn tail a crash may have left (:func:`refine_af_utils.files.truncate_torn_tail`);
2. collect the keys of the records already written;
3. cut the batches still to do;
4. load the model only if there is work;
5. seed each batch from its content (sampling stages), generate, append the missing records with one
   fsynced write;
6. read the file back, keeping the records of the jobs asked for.

Two batching rules:

* **fixed** (the default, for sampling): batches are cut from the full job list, so a batch is
  the same on every run; a half-written batch is regenerated whole with the same seed and only
  its missing records are appended. A resumed run equals an uninterrupted one.
* **pending** (``prepare`` given, for greedy decoding): only the jobs not yet done are batched,
  after ``prepare(context, pending)`` has turned them into what ``generate`` takes (for example
  prompts clipped with the loaded tokenizer, sorted by length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence, TypeVar


from refine_af_utils.files import append_jsonl, read_jsonl, truncate_torn_tail
from refine_af_utils.progress import tqdm

Job = TypeVar("Job")
Context = TypeVar("Context")
Record = dict[str, Any]


def cut_batches(items: Sequence[Any], size: int, group: Optional[Callable[[Any], Hashable]] = None) -> list[list[Any]]:
    """``items`` in order, in batches of at most ``size``; a batch never spans two consecutive ``group`` values."""
    batches: list[list[Any]] = []
    previous: Any = object()
    for item in items:
        label = group(item) if group is not None else None
        if not batches or len(batches[-1]) == size or label != previous:
            batches.append([])
        batches[-1].append(item)
        previous = label
    return batches


def resume_batches(
    path: str | Path,
    jobs: Sequence[Job],
    *,
    job_key: Callable[[Job], Hashable],
    record_key: Callable[[Record], Hashable],
    batch_size: int,
    load: Callable[[], Context],
    generate: Callable[[Context, list[Any], Optional[int]], list[Record]],
    desc: str,
    seed: Optional[Callable[[list[Job]], int]] = None,
    group: Optional[Callable[[Job], Hashable]] = None,
    prepare: Optional[Callable[[Context, list[Job]], list[Any]]] = None,
) -> list[Record]:
    """Run every job not yet recorded in ``path`` and return the records of ``jobs``, in file order.

    ``generate(context, batch, batch_seed)`` returns one record per item of ``batch``, in order; ``job_key``
    of a job equals ``record_key`` of its record. ``seed(batch)`` (fixed batching only) is the batch's seed,
    which ``generate`` hands its engine (``None`` without ``seed``); ``group(job)`` keeps jobs of different groups out of one
    batch (fixed batching only). With ``prepare``, batching is pending-only (see the
    module docstring).
    """
    path = Path(path)
    truncate_torn_tail(path)
    done = {record_key(r) for r in read_jsonl(path)}
    if prepare is None:
        todo = [batch for batch in cut_batches(jobs, batch_size, group) if any(job_key(j) not in done for j in batch)]
        pending: list[Job] = []
    else:
        if seed is not None or group is not None:
            raise ValueError("seed and group need fixed batching: pending batches differ between runs")
        pending = [job for job in jobs if job_key(job) not in done]
        todo = []
    if todo or pending:
        context = load()
        try:
            if prepare is not None:
                todo = cut_batches(prepare(context, pending), batch_size)
            for batch in tqdm(todo, desc=desc):
                batch_seed = None if seed is None else seed(batch)  # the caller's derive_seed(...) of the batch's content
                records = generate(context, batch, batch_seed)
                if len(records) != len(batch):
                    raise RuntimeError(f"{path}: a batch of {len(batch)} gave {len(records)} records")
                append_jsonl(path, [r for r in records if record_key(r) not in done])
        finally:
            close = getattr(context, "close", None)  # an engine frees what it holds (vLLM's temporary model folder)
            if callable(close):
                close()
    wanted = {job_key(j) for j in jobs}
    return [r for r in read_jsonl(path) if record_key(r) in wanted]
