"""Stage 3's peak memory and time per critic setup, measured in one run on a copy of a finished run.

Each setup trains stage 3 (``rl_training.train_generator``) from scratch in its own process on a copy of
RUN_DIR's stages 0-2 (so one setup's peak cannot hide another's), then runs the held-out evaluation; the
process's resident set is sampled every 0.2 s per phase. The setups, in the order they run (repeated
``--rounds`` times, alternating, so a busy neighbour slows all alike):

* ``full, no checkpointing``: trl's setup as stage 3 ran it before the LoRA critic (a full float32 copy of
  the backbone as critic, activations kept);
* ``full``: the same with activation checkpointing (trl's flag, now honoured by stage 3's PPO);
* ``lora``: the LoRA critic on the policy's shared frozen weights, with checkpointing (the default critic).

Every setup is PPO with the default's stage 3 of when it was measured (4 updates; the default is now GRPO).

Writes ``results/bench/stage3_memory.csv`` and ``.png`` and prints a table with each setup's peak and time as a
ratio of the first setup's, and the per-update metrics of each, which show whether the setups trained alike.

    python bench/stage3_memory.py [--params params/default.yaml] [--run-dir results/default] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

# PPO as the default's stage 3 was when this was measured (the default is now GRPO)
PPO = ["rl.algorithm=ppo", "rl.updates=4", "rl.kl_coef=0.05", "rl.lora.target_modules=[q_proj, k_proj, v_proj, o_proj]",
       "rl.micro_batch_size=null", "rl.stop_at_stop_strings=false"]
SETUPS = {
    "full, no checkpointing": [*PPO, "rl.critic=full", "rl.activation_checkpointing=false"],
    "full": [*PPO, "rl.critic=full", "rl.activation_checkpointing=true"],
    "lora": [*PPO, "rl.critic=lora", "rl.activation_checkpointing=true"],
}
STAGES_0_2 = ("seed_tasks", "instruction_generation", "reward_analysis")


def measure(params_path: str, run_dir: Path, overrides: list[str]) -> dict:
    """In this process: stage 3's training and held-out evaluation on ``run_dir``, with peak RSS per phase."""
    import psutil

    from refine_af_utils.params import load_params
    from refine_af_utils.params_loading import parse_overrides
    from refine_af_utils.stages import rl_training

    params = load_params(params_path, parse_overrides(overrides))
    process, phase, peaks = psutil.Process(), {"name": "load"}, {}

    def sample() -> None:
        while True:
            peaks[phase["name"]] = max(peaks.get(phase["name"], 0.0), process.memory_info().rss / 1e9)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    scorer = rl_training._stage_scorer(params, run_dir, None)
    phase["name"], start = "train", time.perf_counter()
    metrics, adapter = rl_training.train_generator(params, run_dir, scorer=scorer)
    train_seconds = time.perf_counter() - start
    phase["name"] = "heldout"
    rl_training.evaluate_heldout(params, run_dir, adapter, scorer)
    time.sleep(0.5)
    return {"peak_train_gb": peaks["train"], "peak_heldout_gb": peaks["heldout"], "train_seconds": train_seconds,
            "metrics": metrics[["update", "reward", "parsed_share", "kl", "value_loss"]].to_dict("list")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--run-dir", default="results/default", help="a run whose stages 0-2 are complete")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="results/bench/stage3_memory.csv")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)  # one setup, in its own process
    parser.add_argument("--summarise", action="store_true", help="summarise the existing --out table, run nothing")
    args = parser.parse_args()
    if args.summarise:
        summarise(pd.read_csv(args.out), Path(args.out).with_suffix(".png"))
        return
    if args.child is not None:
        print(json.dumps(measure(args.params, Path(args.run_dir), args.child)))
        return
    from refine_af_utils.environment import cpu_kind, cpu_model

    rows = []
    for round_number in range(args.rounds):
        for name, overrides in SETUPS.items():
            with tempfile.TemporaryDirectory() as scratch:
                copy = Path(scratch) / "run"
                for stage in STAGES_0_2:
                    shutil.copytree(Path(args.run_dir) / stage, copy / stage)
                done = subprocess.run([sys.executable, __file__, "--params", args.params, "--run-dir", str(copy),
                                       "--child", *overrides], capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"setup": name, "round": round_number, **{k: v for k, v in result.items() if k != "metrics"},
                         "metrics": json.dumps(result["metrics"])})
            print(f"{name}: {result['peak_train_gb']:.2f} GB, {result['train_seconds']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table.insert(0, "machine", f"{cpu_kind()} {cpu_model()}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    summarise(table, Path(args.out).with_suffix(".png"))


def summarise(table: pd.DataFrame, figure: Path) -> None:
    """Print each setup's mean peak and time with ratios against the first setup, its metrics, and the figure."""
    from refine_af_utils.plots import grouped_bars, save_figure

    summary = table.groupby("setup", sort=False)[["peak_train_gb", "peak_heldout_gb", "train_seconds"]].mean()
    first = summary.iloc[0]
    summary["peak_ratio"] = summary["peak_train_gb"] / first["peak_train_gb"]
    summary["time_ratio"] = summary["train_seconds"] / first["train_seconds"]
    print(summary.round(3).to_string())
    for name, metrics in zip(table["setup"], table["metrics"]):
        print(name, pd.DataFrame(json.loads(metrics)).round(6).to_dict("list"))
    ratios = summary[["peak_ratio", "time_ratio"]].rename(columns={"peak_ratio": "peak memory in training",
                                                                  "time_ratio": "training time"})
    save_figure(grouped_bars(ratios, f"Stage 3 on the default run: each setup / '{summary.index[0]}' "
                                     f"({table['machine'].iloc[0].split()[0]} CPU)", "ratio"), figure)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
