"""Stage 4: instances for every stage 1 instruction, from both arms.

* ``self_instruct``: the untrained backbone (the Self-Instruct baseline dataset);
* ``refine_af``: the backbone with stage 3's trained LoRA adapter.

Same instructions, same prompts, same decoding and random seeds, same filters; only the
generator differs. Raw completions are appended batch by batch to ``data/raw_<arm>.jsonl``
(a rerun continues after the last complete batch); both arms are scored with stage 2's
reward and exported as JSONL that ``datasets.load_dataset("json", ...)`` reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from refine_af_utils.instances import filter_instances, generate_instances, instance_prompts, parse_instances
from refine_af_utils.instructions import instructions_of_run
from refine_af_utils.jsonl import append_jsonl, read_jsonl, truncate_torn_tail
from refine_af_utils.params import Params
from refine_af_utils.reward import COMPONENTS, build_scorers, score_instances
from refine_af_utils.scorers import InstanceText

ARMS = ("self_instruct", "refine_af")
DATA_DIR = "data"


def load_generator(params: Params, arm: str, run_dir: Path) -> tuple[Any, Any]:
    """The backbone for ``self_instruct``; backbone + stage 3 adapter (merged) for ``refine_af``."""
    from refine_af_utils.models import load_causal_lm

    return load_causal_lm(params.model, run_dir / "rl" / "adapter" if arm == "refine_af" else None)


def generate_arm(params: Params, arm: str, records: Sequence[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """Raw completions of one arm for every instruction record, resuming from ``raw_<arm>.jsonl``."""
    cfg = params.instance_generation
    path = run_dir / DATA_DIR / f"raw_{arm}.jsonl"
    truncate_torn_tail(path)
    done = {r["instruction_id"] for r in read_jsonl(path)}
    batches = [records[i:i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]
    todo = [(index, batch) for index, batch in enumerate(batches) if any(r["id"] not in done for r in batch)]
    if todo:
        from refine_af_utils.seeds import seed_tasks_of_run

        model, tokenizer = load_generator(params, arm, run_dir)
        seeds = seed_tasks_of_run(run_dir)
        for index, batch in tqdm(todo, desc=f"instances ({arm})"):
            batch = [r for r in batch if r["id"] not in done]
            torch.manual_seed(params.random_seed * 7919 + index)  # the same noise for both arms
            texts = generate_instances(model, tokenizer, instance_prompts(batch, seeds, cfg, params.random_seed), cfg)
            append_jsonl(path, [{"instruction_id": r["id"], "text": t} for r, t in zip(batch, texts)])
    by_id = {r["instruction_id"]: r["text"] for r in read_jsonl(path)}
    return [{**r, "text": by_id[r["id"]]} for r in records]


def arm_instances(completions: Sequence[dict[str, Any]], max_instances: int) -> pd.DataFrame:
    """Parsed and filtered instances of one arm, one row per instance."""
    rows = []
    for record in completions:
        kept, _ = filter_instances(parse_instances(record["text"], record["is_classification"]), max_instances)
        rows.extend({"instruction_id": record["id"], "instruction": record["instruction"], "input": i.input,
                     "output": i.output, "is_classification": record["is_classification"]} for i in kept)
    return pd.DataFrame(rows, columns=["instruction_id", "instruction", "input", "output", "is_classification"])


def _words(texts: Sequence[str]) -> float:
    return round(float(np.mean([len(t.split()) for t in texts])), 1) if len(texts) else 0.0


def dataset_statistics(instances: pd.DataFrame, instructions: int) -> dict[str, Any]:
    """Self-Instruct's Table 1 layout: instructions, types, instances, empty inputs, mean lengths."""
    per_instruction = instances.drop_duplicates("instruction_id")
    non_empty = instances.loc[instances["input"].str.strip() != "", "input"]
    return {
        "instructions (stage 1)": instructions,
        "instructions with instances": len(per_instruction),
        "classification instructions": int(per_instruction["is_classification"].sum()),
        "non-classification instructions": int((~per_instruction["is_classification"].astype(bool)).sum()),
        "instances": len(instances),
        "instances with empty input": int((instances["input"].str.strip() == "").sum()),
        "mean instruction length (words)": _words(per_instruction["instruction"].tolist()),
        "mean non-empty input length (words)": _words(non_empty.tolist()),
        "mean output length (words)": _words(instances["output"].tolist()),
    }


def arm_rewards_figure(rewards: dict[str, Sequence[float]], path: Path) -> Path:
    """Both arms' reward distributions on shared bins (stage 4 and the report draw the same figure)."""
    from refine_af_utils.plots import overlaid_histograms, save_figure

    return save_figure(overlaid_histograms(rewards, "REFINE-AF reward of each arm's instances", "reward"), path)


@dataclass
class ArmsResult:
    """Both arms' scored instances, their statistics table and the reward comparison."""

    instances: dict[str, pd.DataFrame]
    statistics: pd.DataFrame
    reward_summary: pd.DataFrame
    figures: dict[str, Path]


def run_instance_stage(params: Params, run_dir: str | Path) -> ArmsResult:
    """Stage 4: generate, filter, score and export both arms' datasets under ``<run_dir>/data``."""
    from refine_af_utils.results import check_stage_config, record_metrics, stage_dir

    run_dir = Path(run_dir)
    out = stage_dir(run_dir, DATA_DIR)
    records = instructions_of_run(run_dir)
    adapter = run_dir / "rl" / "adapter" / "adapter_model.safetensors"
    settings = params.to_dict()
    check_stage_config(out, {
        "model": settings["model"], "random_seed": params.random_seed,
        "instance_generation": settings["instance_generation"],
        # the REFINE-AF arm's completions belong to one trained adapter
        "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest() if adapter.is_file() else None,
    })
    scorers = build_scorers(params.reward, run_dir / "reward_analysis" / "cache")
    instances, stats = {}, {}
    for arm in ARMS:
        table = arm_instances(generate_arm(params, arm, records, run_dir),
                              params.instance_generation.max_instances_per_task)
        texts = [InstanceText(r.instruction, r.input, r.output) for r in table.itertuples()]
        ids = [f"{arm}:{r.instruction_id}:{n}" for n, r in enumerate(table.itertuples())]
        scores = score_instances(scorers, texts, ids, params.reward) if texts else pd.DataFrame(
            columns=[*COMPONENTS, "reward"])
        table = pd.concat([table.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
        (out / f"{arm}.jsonl").write_text(table.to_json(orient="records", lines=True, force_ascii=False))
        instances[arm] = table
        stats[arm] = dataset_statistics(table, len(records))
    statistics = pd.DataFrame(stats)
    statistics.to_csv(out / "dataset_statistics.csv")
    summary = pd.DataFrame({arm: table[[*COMPONENTS, "reward"]].mean() for arm, table in instances.items()}).round(4)
    summary.to_csv(out / "reward_by_arm.csv")
    figures = {"rewards": arm_rewards_figure({arm: t["reward"] for arm, t in instances.items()},
                                             out / "reward_by_arm.png")}
    record_metrics(run_dir, "04", {
        **{f"{arm}_instances": len(t) for arm, t in instances.items()},
        **{f"{arm}_mean_reward": round(float(t["reward"].mean()), 6) if len(t) else None
           for arm, t in instances.items()},
    })
    return ArmsResult(instances, statistics, summary, figures)
