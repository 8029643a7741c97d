"""Progress bars under the runner are text (a widget is invisible in the terminal and frozen in the saved
notebook); the smoke run's executed notebooks check the same end to end (tests/test_notebooks.py)."""

from __future__ import annotations

import io

import datasets
from transformers.utils import logging as transformers_logging

from refine_af_utils import progress


def test_package_bars_are_text_with_a_heartbeat_under_the_runner(monkeypatch):
    monkeypatch.setenv(progress.TEXT_PROGRESS_ENV, "1")
    bar = progress.tqdm(range(3), file=io.StringIO())
    assert bar.mininterval == progress.HEARTBEAT_SECONDS and type(bar).__module__ == "tqdm.std"
    monkeypatch.delenv(progress.TEXT_PROGRESS_ENV)
    assert progress.tqdm(range(3), file=io.StringIO()).mininterval != progress.HEARTBEAT_SECONDS


def test_library_bars_are_text_inside_a_stage_under_the_runner_and_restored_after(monkeypatch):
    monkeypatch.setenv(progress.TEXT_PROGRESS_ENV, "1")
    assert datasets.is_progress_bar_enabled()
    with progress.library_bars_as_text():
        loading = transformers_logging.tqdm(range(3), desc="Loading weights")  # what from_pretrained makes
        assert loading.mininterval == progress.HEARTBEAT_SECONDS and type(loading).__module__ == "tqdm.std"
        loading.close()
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    after = transformers_logging.tqdm(range(3))
    assert after.mininterval != progress.HEARTBEAT_SECONDS
    after.close()


def test_library_bars_are_left_alone_outside_the_runner(monkeypatch):
    monkeypatch.delenv(progress.TEXT_PROGRESS_ENV, raising=False)
    with progress.library_bars_as_text():
        bar = transformers_logging.tqdm(range(3))
        assert bar.mininterval != progress.HEARTBEAT_SECONDS and datasets.is_progress_bar_enabled()
        bar.close()
