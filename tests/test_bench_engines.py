"""``make bench``'s engine benchmark (bench/bench_engines.py) end to end on a few prompts: one run, two engines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_engine_benchmark_writes_its_table_ratios_and_paired_comparisons(tmp_path):
    out = tmp_path / "engines"
    env = {**os.environ, "BENCH_ENGINES_LIMIT": "2"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "bench_engines.py"), "--engines", "static,continuous",
                          "--scales", "1", "--shapes", "stage4,stage6", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio_vs_static" in run.stdout  # the printed table

    speed = pd.read_csv(out.with_suffix(".csv"))
    static = speed[(speed.engine == "static") & (speed["shape"].isin(["stage4", "stage6"]))]
    assert (static.prompts == 2).all() and static[static["shape"] == "stage4"].ratio_vs_static.item() == 1.0
    refused = speed[(speed.engine == "continuous") & (speed["shape"] == "stage4")]
    assert refused.refused.str.contains("greedily only").all()  # stage 4 samples: continuous batching refuses it
    greedy = speed[(speed.engine == "continuous") & (speed["shape"] == "stage6")]
    # greedy decoding: the same text as static batching (no ratio where static kept no token at all)
    assert greedy.useful_tokens.item() == static[static["shape"] == "stage6"].useful_tokens.item()
    assert greedy.startup_seconds.item() > 0
    assert "all, start-up included" not in set(speed[speed.engine == "continuous"]["shape"])  # one shape refused

    outputs = pd.read_csv(out.with_name("engines_outputs.csv"))
    stage4 = set(outputs[(outputs.engine == "static") & (outputs["shape"] == "stage4")].measure)
    assert {"parsed", "output_words", "reward", "useful_tokens"} <= stage4
    paired = outputs[(outputs.engine == "continuous") & (outputs.measure == "rougeL")].iloc[0]
    assert paired.pairs == 2 and paired.ci_low <= paired.difference <= paired.ci_high
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["scales"] == [1] and set(meta["startup_seconds"]) == {"static", "continuous"}
    assert out.with_suffix(".png").stat().st_size > 0
