"""The run folder's records: metrics carry the peak memory of the stage's process."""

from __future__ import annotations

import pytest


def test_recorded_metrics_carry_the_process_peak_memory(tmp_path):
    import resource

    from refine_af_utils.run_folder import read_metrics, record_metrics

    record_metrics(tmp_path, "03", {"updates": 4})
    metrics = read_metrics(tmp_path, "03")
    assert metrics["updates"] == 4
    assert metrics["peak_rss_gb"] == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                                                   abs=0.01)
