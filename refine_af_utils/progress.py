"""Progress bars: widgets in Jupyter, text where the runner executes a notebook.

Under the runner (papermill), a widget bar is invisible in the terminal and saved frozen at 0% in the
executed notebook. So the runner sets ``REFINE_AF_TEXT_PROGRESS=1`` for its kernels, and every bar of the
package (:func:`tqdm`) and of the trainers (:func:`use_text_progress`) is then a text bar that redraws at
most every :data:`HEARTBEAT_SECONDS`: papermill echoes each redraw to the terminal as a heartbeat line
(done / total, elapsed, ETA, rate), and the executed notebook keeps the bar's final state.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

TEXT_PROGRESS_ENV = "REFINE_AF_TEXT_PROGRESS"
HEARTBEAT_SECONDS = 30.0


def text_progress() -> bool:
    """True where bars are text (the runner's kernels, ``REFINE_AF_TEXT_PROGRESS=1``)."""
    return os.environ.get(TEXT_PROGRESS_ENV) == "1"


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm`` (widgets in Jupyter), or a text bar redrawn every :data:`HEARTBEAT_SECONDS` under
    the runner."""
    if text_progress():
        from tqdm.std import tqdm as text_tqdm

        kwargs.setdefault("mininterval", HEARTBEAT_SECONDS)
        kwargs.setdefault("ascii", True)
        return text_tqdm(*args, **kwargs)
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(*args, **kwargs)


def use_text_progress(trainer: Any, desc: str) -> None:
    """Under the runner, give a transformers/trl ``trainer`` a text bar (its notebook bar is HTML that the
    terminal never sees) named ``desc``; elsewhere leave it as it is."""
    if not text_progress():
        return
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    class TextProgressCallback(ProgressCallback):
        """transformers' ProgressCallback with this module's text bar and no per-log printing."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=state.max_steps, desc=desc, unit="step")
            self.current_step = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            return None  # the metrics go to the stage's own tables

    trainer.remove_callback(NotebookProgressCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TextProgressCallback(max_str_len=100))


@contextlib.contextmanager
def library_bars_as_text() -> Iterator[None]:
    """Under the runner, the libraries' own bars inside the block are text too: transformers' (weight loading)
    through its tqdm hook; datasets' (map, filter) are switched off, being seconds long. Elsewhere, nothing."""
    if not text_progress():
        yield
        return
    import datasets
    from transformers.utils import logging as transformers_logging

    def text_bar(factory: Any, args: Any, kwargs: Any) -> Any:  # bars switched off stay off
        return tqdm(*args, **kwargs) if transformers_logging.is_progress_bar_enabled() else factory(*args, **kwargs)

    previous = transformers_logging.set_tqdm_hook(text_bar)
    datasets_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        transformers_logging.set_tqdm_hook(previous)
        if datasets_bars:
            datasets.enable_progress_bars()
