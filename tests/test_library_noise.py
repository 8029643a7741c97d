"""The known library messages are dropped inside ``quiet_known_noise`` / ``quiet_load_report``, and only those."""

from __future__ import annotations

import logging
import warnings

from refine_af_utils.library_noise import quiet_known_noise, quiet_load_report


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_known_messages_are_dropped_inside_the_block_and_others_still_show():
    from transformers.utils import logging as transformers_logging

    root = transformers_logging.get_logger()
    collect = _Collect()
    root.addHandler(collect)
    module_logger = transformers_logging.get_logger("transformers.generation.utils")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_known_noise():
                warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
                warnings.warn("something else is deprecated", FutureWarning)
                module_logger.warning("Passing `generation_config` together with generation-related arguments=(...)")
                module_logger.warning("a real problem")
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            module_logger.warning("Passing `generation_config` together with generation-related arguments=(...)")
        assert [str(w.message) for w in caught] == [
            "something else is deprecated", "`is_gradient_checkpointing` is deprecated and will be removed in v6."]
        assert collect.messages == [
            "a real problem", "Passing `generation_config` together with generation-related arguments=(...)"]
    finally:
        root.removeHandler(collect)


def test_the_load_report_is_hidden_inside_the_block_and_the_verbosity_restored():
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.get_verbosity()
    with quiet_load_report():
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    assert transformers_logging.get_verbosity() == before
