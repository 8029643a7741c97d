"""CPU sweep of stage 3 settings: held-out reward gain (with its 95% CI) and wall time per setting.

    python bench/rl_sweep.py                       # every setting in SETTINGS, resuming
    python bench/rl_sweep.py --only ppo_b4_u10     # some of them
    python bench/rl_sweep.py --base results/default --params params/default.yaml

Each setting is stage 3 of the default run with some ``rl`` (or ``instance_generation``) keys
changed: it trains in its own folder under ``results/bench/rl_sweep/<setting>/`` on a copy of
the base run's stages 0-2 and is evaluated on the same held-out instructions with the same
decoding and seeds. The base generator's held-out samples depend only on the decoding, the split
and the seed, so they are generated once per decoding and reused by every setting that shares
it (their time is reported apart). A finished setting is skipped; a killed one resumes from its
checkpoints. Results: ``results/bench/rl_sweep.csv`` (one row per setting) and
``results/bench/rl_sweep.png``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from refine_af_utils.files import append_jsonl, read_jsonl  # noqa: E402
from refine_af_utils.layout import RunLayout  # noqa: E402
from refine_af_utils.params import Params, load_params  # noqa: E402
from refine_af_utils.rl_reward import CompletionScorer  # noqa: E402
from refine_af_utils.stages.rl_training import evaluate_heldout, train_generator  # noqa: E402

# name -> dotted overrides of the base params (64 new tokens unless the name says t96). The first three
# compare the algorithms at about the same number of sampled tokens; the rest vary one knob at a time.
# The parse penalty's unit (stage 2's content SD) comes from the base run's stage 2.
SHORT = {"instance_generation.max_new_tokens": 64, "rl.heldout_samples": 4, "rl.checkpoint_every": 4}
SETTINGS: dict[str, dict[str, Any]] = {
    "ppo_b4_u8_t64": {**SHORT, "rl.algorithm": "ppo", "rl.batch_size": 4, "rl.updates": 8},
    "grpo_b4g4_u4_t64": {**SHORT, "rl.algorithm": "grpo", "rl.batch_size": 4, "rl.num_generations": 4, "rl.updates": 4},
    "rloo_b4g4_u4_t64": {**SHORT, "rl.algorithm": "rloo", "rl.batch_size": 4, "rl.num_generations": 4, "rl.updates": 4},
    "ppo_b4_u8_t64_lr1e-3": {**SHORT, "rl.algorithm": "ppo", "rl.batch_size": 4, "rl.updates": 8,
                             "rl.learning_rate": 1e-3},
    "ppo_b8_u4_t64_whiten": {**SHORT, "rl.algorithm": "ppo", "rl.batch_size": 8, "rl.updates": 4},
    "ppo_b4_u8_t64_kl0.2": {**SHORT, "rl.algorithm": "ppo", "rl.batch_size": 4, "rl.updates": 8, "rl.kl_coef": 0.2},
    "ppo_b4_u8_t64_penalty0.5": {**SHORT, "rl.algorithm": "ppo", "rl.batch_size": 4, "rl.updates": 8,
                                 "rl.parse_penalty_sd": 0.5},
    "ppo_b4_u8_t64_penalty6": {**SHORT, "rl.algorithm": "ppo", "rl.batch_size": 4, "rl.updates": 8,
                               "rl.parse_penalty_sd": 6.0},
    "ppo_b4_u6_t96": {"rl.algorithm": "ppo", "rl.batch_size": 4, "rl.updates": 6},
}
# The rl keys of the default's stage 3 when the sweep ran (before the LoRA critic and GRPO became the defaults)
THEN = {"rl.critic": "full", "rl.kl_coef": 0.05, "rl.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rl.micro_batch_size": None, "rl.stop_at_stop_strings": False, "rl.activation_checkpointing": True}
SETTINGS = {name: {**THEN, **overrides} for name, overrides in SETTINGS.items()}
UPSTREAM = ("seed_tasks", "instruction_generation", "reward_analysis")  # stage folders 00-02


def decoding_signature(params: Params) -> str:
    """What the base generator's held-out samples depend on (model, decoding, split, seed)."""
    data = params.to_dict()
    key = {"model": data["model"], "instance_generation": data["instance_generation"],
           "random_seed": params.random_seed,
           "rl": {k: data["rl"][k] for k in ("heldout_instructions", "heldout_samples", "num_prompts")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def prepare(base: Path, run_dir: Path) -> None:
    """Copy the base run's stage 0-2 outputs into the setting's folder (once)."""
    for name in UPSTREAM:
        if not (run_dir / name).exists():
            shutil.copytree(base / name, run_dir / name)


def run_setting(name: str, overrides: dict[str, Any], params_path: Path, base: Path, out: Path) -> dict[str, Any]:
    """Train and evaluate one setting (resuming); return its result row."""
    from refine_af_utils.reward import build_scorers, unparsed_reward

    run_dir = out / name
    done = run_dir / "sweep_result.json"
    if done.is_file():
        return json.loads(done.read_text())
    prepare(base, run_dir)
    params = load_params(params_path, overrides={"run_name": name, **overrides})
    scorer = CompletionScorer(build_scorers(params.reward, run_dir / "reward_analysis" / "cache"), params.reward,
                              unparsed_reward(run_dir, params), params.instance_generation.max_instances_per_task)
    started, cpu_started = time.perf_counter(), time.process_time()
    metrics, adapter_dir = train_generator(params, run_dir, scorer=scorer)
    train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu_started

    shared = out / "_base_heldout" / f"{decoding_signature(params)}.jsonl"
    samples = RunLayout(run_dir).heldout_samples_file
    reused = shared.is_file() and not samples.is_file()
    if reused:
        append_jsonl(samples, read_jsonl(shared))
    started, cpu_started = time.perf_counter(), time.process_time()
    heldout = evaluate_heldout(params, run_dir, adapter_dir, scorer)
    heldout_seconds, heldout_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if not shared.is_file():
        append_jsonl(shared, [r for r in read_jsonl(samples) if r["generator"] == "base"])
    gain = heldout.summary.set_index("measure")
    half = max(1, len(metrics) // 2)
    row = {
        "setting": name, "overrides": json.dumps(overrides, sort_keys=True),
        "algorithm": params.rl.algorithm, "updates": params.rl.updates, "prompts_per_update": params.rl.batch_size,
        "generations_per_prompt": params.rl.num_generations if params.rl.algorithm != "ppo" else 1,
        "max_new_tokens": params.instance_generation.max_new_tokens, "learning_rate": params.rl.learning_rate,
        "kl_coef": params.rl.kl_coef, "parse_penalty_sd": params.rl.parse_penalty_sd,
        "heldout_instructions": len(heldout.per_instruction), "heldout_samples": params.rl.heldout_samples,
        "train_reward_first_half": float(metrics["reward"].iloc[:half].mean()),
        "train_reward_second_half": float(metrics["reward"].iloc[half:].mean()),
        **{f"heldout_{m}_{c}": float(gain.loc[m, col]) for m in ("reward", "parsed", "content")
           for c, col in (("gain", "mean_difference"), ("ci_low", "ci_low"), ("ci_high", "ci_high"))},
        "heldout_base_reward": float(gain.loc["reward", "mean_before"]),
        "train_seconds": round(train_seconds, 1), "heldout_seconds": round(heldout_seconds, 1),
        # CPU seconds of this process (all its threads): other work on the machine inflates the wall
        # times above but hardly these; on 2 idle cores the wall time is about half of them
        "train_cpu_seconds": round(train_cpu, 1), "heldout_cpu_seconds": round(heldout_cpu, 1),
        "base_samples_reused": reused,
    }
    done.write_text(json.dumps(row, indent=2) + "\n")
    del scorer, metrics, heldout
    gc.collect()
    return row


def sweep_figure(table: pd.DataFrame, path: Path) -> Path:
    """Held-out reward gain with its 95% CI per setting."""
    from refine_af_utils.plots import difference_chart, save_figure

    summary = pd.DataFrame({"group": table["setting"], "measure": "held-out reward gain",
                            "mean_difference": table["heldout_reward_gain"], "ci_low": table["heldout_reward_ci_low"],
                            "ci_high": table["heldout_reward_ci_high"]})
    return save_figure(difference_chart(summary, "RL sweep: held-out reward, trained minus base, 95% CI"), path)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO_ROOT / "params" / "default.yaml"))
    parser.add_argument("--base", default=str(REPO_ROOT / "results" / "default"),
                        help="a run folder whose stages 0-2 are complete")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench" / "rl_sweep"))
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="settings to run (default: all)")
    args = parser.parse_args(argv)
    base, out = Path(args.base), Path(args.out)
    missing = [name for name in UPSTREAM if not (base / name).is_dir()]
    if missing:
        print(f"error: {base} lacks {', '.join(missing)}; run stages 00-02 of {args.params} first", file=sys.stderr)
        return 2
    rows = []
    for name in args.only or list(SETTINGS):
        print(f"[sweep] {name}: {SETTINGS[name]}", flush=True)
        row = run_setting(name, SETTINGS[name], Path(args.params), base, out)
        print(f"[sweep] {name}: held-out reward gain {row['heldout_reward_gain']:+.4f} "
              f"[{row['heldout_reward_ci_low']:+.4f}, {row['heldout_reward_ci_high']:+.4f}], "
              f"train {row['train_seconds']:.0f} s, held-out {row['heldout_seconds']:.0f} s", flush=True)
        rows.append(row)
    finished = []
    for name in SETTINGS:
        result = out / name / "sweep_result.json"
        if result.is_file():
            # which stage 2 the setting's parse penalty was measured on (the base run's, copied)
            stage2 = json.loads((out / name / "reward_analysis" / "config.json").read_text())
            finished.append({**json.loads(result.read_text()),
                             "stage2_max_new_tokens": stage2["instance_generation"]["max_new_tokens"]})
    table = pd.DataFrame(finished)
    table.to_csv(out.parent / "rl_sweep.csv", index=False)
    sweep_figure(table, out.parent / "rl_sweep.png")
    print(table[["setting", "heldout_reward_gain", "heldout_reward_ci_low", "heldout_reward_ci_high",
                 "heldout_parsed_gain", "train_seconds", "heldout_seconds"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
