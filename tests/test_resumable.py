"""The one crash-safe batch loop (``refine_af_utils.resumable``) on real files, with a seeded generator.

The stages' own SIGKILL tests (tests/test_reliability.py, tests/test_stage2_resume.py) run it through
real models; these pin its rules: fixed batches, torn tails, half-written batches, lazy loading, groups.
"""

from __future__ import annotations

import json

import pytest
import torch

from refine_af_utils.files import read_jsonl
from refine_af_utils.resumable import cut_batches, resume_batches

JOBS = [f"job-{n}" for n in range(7)]


class Crash(Exception):
    pass


def _sampler(loads: list[int], crash_after: int | None = None):
    """A generate() that draws from a generator seeded by its batch seed (as engines sample) and may crash mid-run."""
    calls = {"n": 0}

    def load() -> str:
        loads.append(1)
        return "model"

    def generate(context: str, batch: list[str], seed: int) -> list[dict]:
        assert context == "model"
        if crash_after is not None and calls["n"] == crash_after:
            raise Crash
        calls["n"] += 1
        generator = torch.Generator().manual_seed(seed)
        return [{"job": job, "draw": float(torch.rand(1, generator=generator))} for job in batch]

    return load, generate


def _run(path, generate, load, **kw):
    return resume_batches(path, JOBS, job_key=lambda j: j, record_key=lambda r: r["job"], batch_size=3, load=load,
                          generate=generate, desc="test", seed=lambda batch: int(batch[0].split("-")[1]), **kw)


def test_cut_batches_respects_size_and_groups():
    assert cut_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    jobs = [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    assert cut_batches(jobs, 2, group=lambda j: j[0]) == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)], [("b", 2)]]
    assert cut_batches([], 3) == []


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole = _run(tmp_path / "whole.jsonl", *reversed(_sampler([])))
    path = tmp_path / "resumed.jsonl"
    loads: list[int] = []
    load, generate = _sampler(loads, crash_after=1)
    with pytest.raises(Crash):
        _run(path, generate, load)
    assert len(read_jsonl(path)) == 3  # the first batch was appended before the crash
    # A crash mid-write: half of the second batch's lines and a torn line.
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    with open(path, "a") as handle:
        handle.write(lines[3] + lines[4][:10])
    load, generate = _sampler(loads)
    resumed = _run(path, generate, load)
    assert resumed == whole
    assert [r["job"] for r in read_jsonl(path)] == JOBS  # no duplicate, no loss, torn line gone
    assert len(loads) == 2
    # Everything done: the model is not loaded again and the file is untouched.
    before = path.read_bytes()
    assert _run(path, *reversed(_sampler(loads))) == whole
    assert len(loads) == 2 and path.read_bytes() == before


def test_only_asked_jobs_are_returned_and_counts_are_checked(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"job": "other", "draw": 0.5}) + "\n")
    records = _run(path, *reversed(_sampler([])))
    assert [r["job"] for r in records] == JOBS
    with pytest.raises(RuntimeError, match="a batch of 3 gave 2 records"):
        resume_batches(tmp_path / "short.jsonl", JOBS, job_key=lambda j: j, record_key=lambda r: r["job"],
                       batch_size=3, load=lambda: None, generate=lambda _, batch, seed: [{"job": j} for j in batch[:2]],
                       desc="test")


def test_pending_batching_prepares_only_what_is_missing(tmp_path):
    path = tmp_path / "greedy.jsonl"
    path.write_text("".join(json.dumps({"job": j}) + "\n" for j in JOBS[:4]))
    prepared: list[list[str]] = []

    def prepare(context, pending):
        prepared.append(list(pending))
        return sorted(pending, reverse=True)

    records = resume_batches(path, JOBS, job_key=lambda j: j, record_key=lambda r: r["job"], batch_size=2,
                             load=lambda: "tok", generate=lambda _, batch, seed: [{"job": j} for j in batch],
                             prepare=prepare, desc="test")
    assert prepared == [JOBS[4:]]
    assert [r["job"] for r in records] == [*JOBS[:4], "job-6", "job-5", "job-4"]
    with pytest.raises(ValueError, match="fixed batching"):
        resume_batches(path, JOBS, job_key=lambda j: j, record_key=lambda r: r["job"], batch_size=2,
                       load=lambda: None, generate=lambda _, b, seed: [], prepare=prepare, seed=lambda b: 0, desc="test")


def test_the_loaded_engine_is_closed_when_the_jobs_end_or_fail(tmp_path):
    class Engine:
        closed = 0

        def close(self) -> None:
            Engine.closed += 1

    def failing(engine, batch, seed):
        raise Crash

    def run(path, generate):
        return resume_batches(path, JOBS, job_key=lambda j: j, record_key=lambda r: r["job"], batch_size=3,
                              load=Engine, generate=generate, desc="test")

    run(tmp_path / "ok.jsonl", lambda engine, batch, seed: [{"job": j} for j in batch])
    assert Engine.closed == 1
    with pytest.raises(Crash):
        run(tmp_path / "failed.jsonl", failing)
    assert Engine.closed == 2
