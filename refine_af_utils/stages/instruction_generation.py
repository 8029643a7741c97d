"""Stage 1: Self-Instruct's instruction bootstrapping with a small local LLM.

Each batch samples in-context instructions (seeds plus up to two machine-generated ones),
lets the model continue the numbered list, parses and filters the continuation, applies
the ROUGE-L novelty rule against the ordered pool, marks accepted instructions as
classification or not, and commits the batch:

1. accepted instructions are appended to ``instructions.jsonl`` (flush + fsync);
2. then one record of the batch (counts, accepted ids) is appended to ``batches.jsonl``.

The batch record is the commit marker. On a rerun, instructions whose batch has no record
(a crash between 1 and 2) are cut off and that batch is generated again, so a kill -9 at
any moment loses nothing and duplicates nothing. Every batch draws its prompts and its
sampling noise from ``(random_seed, batch index)``, so a resumed run makes the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from refine_af_utils.figures import filter_counts_figure, novelty_figure
from refine_af_utils.engines import Decoding, Engine
from refine_af_utils.files import append_jsonl, read_jsonl, truncate_to_records, truncate_torn_tail
from refine_af_utils.layout import BATCHES_FILE, INSTRUCTIONS_FILE, stage_config, stage_of_module
from refine_af_utils.params import Params
from refine_af_utils.prompts import (
    INSTRUCTION_STOP_STRINGS,
    classification_prompt,
    instruction_generation_prompt,
    parse_yes_no,
)
from refine_af_utils.run_folder import StageResult, check_stage_config, stage_entry
from refine_af_utils.rouge import NoveltyPool
from refine_af_utils.seeding import derive_seed
from refine_af_utils.seeds import SeedTask, SeedTaskError
from refine_af_utils.progress import tqdm

BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
    "map", "maps", "draw", "plot", "go to",
]
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)
_ITEM_SPLIT_RE = re.compile(r"\n\d+\s?\. ")

# Reasons a candidate is dropped, in the order the filters run (Self-Instruct's order).
FILTERS = [
    "empty",
    "too_short",
    "too_long",
    "blacklisted_word",
    "starts_with_write_a_program",
    "starts_with_punctuation",
    "starts_with_non_ascii",
    "too_similar",
]

_STAGE = stage_of_module(__name__)  # this module's stage in the registry


def parse_continuation(text: str) -> list[str]:
    """Split the model's continuation of ``... N.`` into whitespace-collapsed, capitalised items.

    The first item continues the open number; later ones start at newline + number + period.
    Any string parses (possibly to an empty list); it never raises.
    """
    if not isinstance(text, str):
        return []
    items = []
    for raw in _ITEM_SPLIT_RE.split(text):
        item = re.sub(r"\s+", " ", raw).strip()
        if item:
            items.append(item[0].upper() + item[1:])
    return items


def filter_reason(instruction: str) -> Optional[str]:
    """Why Self-Instruct's rule-based filters drop ``instruction``, or None to keep it."""
    if not instruction:
        return "empty"
    words = len(instruction.split())
    if words <= 3:
        return "too_short"
    if words > 150:
        return "too_long"
    if _BLACKLIST_RE.search(instruction):
        return "blacklisted_word"
    if instruction.startswith("Write a program"):
        return "starts_with_write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_with_non_ascii"
    return None


@dataclass
class BootstrapState:
    """What a run has committed so far: accepted instruction records and batch records."""

    instructions: list[dict[str, Any]]
    batches: list[dict[str, Any]]


def load_state(out_dir: str | Path) -> BootstrapState:
    """Read the committed state of ``out_dir`` and cut off what an interrupted batch left."""
    out_dir = Path(out_dir)
    instructions_path, batches_path = out_dir / INSTRUCTIONS_FILE, out_dir / BATCHES_FILE
    truncate_torn_tail(batches_path)
    truncate_torn_tail(instructions_path)
    batches = read_jsonl(batches_path)
    committed = sum(b["accepted"] for b in batches)
    instructions = read_jsonl(instructions_path)
    if len(instructions) > committed:
        truncate_to_records(instructions_path, committed)
        instructions = instructions[:committed]
    expected = [i for b in batches for i in b["accepted_ids"]]
    if [r["id"] for r in instructions] != expected:
        raise RuntimeError(
            f"{instructions_path} does not match {batches_path}: the files were edited by hand; "
            "delete both (or rerun with --force) to start the stage again"
        )
    return BootstrapState(instructions, batches)


def prompt_seeds(params: Params, seeds: Sequence[SeedTask]) -> list[str]:
    """The seed instructions prompts draw from; refused in one line (before the stage writes anything) when
    they are fewer than a prompt's ``instruction_generation.num_prompt_instructions``."""
    cfg = params.instruction_generation
    classification = cfg.prompt_variant == "classification"
    chosen = [s.instruction for s in seeds if s.is_classification or not classification]
    if len(chosen) < cfg.num_prompt_instructions:
        kind = "classification seed tasks (prompt_variant: classification)" if classification else "seed tasks"
        raise SeedTaskError(f"{params.seed_tasks}: {len(chosen)} {kind}, but a prompt takes "
                            f"instruction_generation.num_prompt_instructions = {cfg.num_prompt_instructions}; "
                            "give more seed tasks or lower that key")
    return chosen


def classification_examples(seeds: Sequence[SeedTask], count: int, rng: random.Random) -> list[tuple[str, bool]]:
    """About half yes and half no few-shot examples from the seeds, shuffled."""
    yes = [s.instruction for s in seeds if s.is_classification]
    no = [s.instruction for s in seeds if not s.is_classification]
    n_yes = min(len(yes), count // 2)
    n_no = min(len(no), count - n_yes)
    examples = [(t, True) for t in rng.sample(yes, n_yes)] + [(t, False) for t in rng.sample(no, n_no)]
    rng.shuffle(examples)
    return examples


def identify_classification(
    engine: Engine, instructions: Sequence[str], examples: Sequence[tuple[str, bool]],
    batch_size: int, max_new_tokens: int,
) -> list[bool]:
    """Few-shot yes/no: is each instruction a classification task with finite labels (greedy)."""
    answers: list[bool] = []
    decoding = Decoding(max_new_tokens=max_new_tokens, stop_strings=("\n",))
    for start in range(0, len(instructions), batch_size):
        chunk = instructions[start:start + batch_size]
        prompts = [classification_prompt(examples, text) for text in chunk]
        outputs = engine.generate(prompts, decoding)
        answers.extend(parse_yes_no(o.text) for o in outputs)
    return answers


def bootstrap_instructions(
    params: Params, seeds: Sequence[SeedTask], out_dir: str | Path, engine: Engine,
) -> BootstrapState:
    """Generate instructions until ``params.num_instructions`` are accepted, resuming from ``out_dir``."""
    cfg, clf = params.instruction_generation, params.classification
    out_dir = Path(out_dir)
    seed_texts = prompt_seeds(params, seeds)  # inputs first: a refused run leaves no config behind
    out_dir.mkdir(parents=True, exist_ok=True)
    check_stage_config(out_dir, stage_config(_STAGE, params))
    state = load_state(out_dir)
    pool = NoveltyPool(s.instruction for s in seeds)
    for record in state.instructions:
        pool.add(record["instruction"])
    machine = [r["instruction"] for r in state.instructions]
    examples = classification_examples(seeds, clf.num_examples,
                                      random.Random(derive_seed(params.random_seed, _STAGE.id, "classification-examples")))

    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        presence_penalty=cfg.presence_penalty, stop_strings=tuple(INSTRUCTION_STOP_STRINGS))
    progress = tqdm(total=params.num_instructions, initial=min(len(machine), params.num_instructions),
                    desc="instructions", unit="inst")
    batch = len(state.batches)
    while len(machine) < params.num_instructions:
        if cfg.max_batches is not None and batch >= cfg.max_batches:
            print(f"stopping at max_batches={cfg.max_batches} with {len(machine)} instructions", file=sys.stderr)
            break
        started = time.time()
        batch_seed = derive_seed(params.random_seed, _STAGE.id, "batch", batch)  # a batch number: the same on resume
        rng = random.Random(batch_seed)
        prompts = []
        for _ in range(cfg.batch_size):
            in_context = rng.sample(machine, min(cfg.num_machine_in_prompt, len(machine)))
            in_context += rng.sample(seed_texts, cfg.num_prompt_instructions - len(in_context))
            rng.shuffle(in_context)
            prompts.append(instruction_generation_prompt(in_context, cfg.prompt_variant))
        outputs = engine.generate(prompts, decoding, batch_seed)
        counts: Counter[str] = Counter()
        accepted: list[dict[str, Any]] = []
        for prompt_index, output in enumerate(outputs):
            if output.truncated and cfg.drop_truncated_responses:
                counts["truncated_response"] += 1
                continue
            items = parse_continuation(output.text)
            if not items:
                counts["unparseable_response"] += 1
                continue
            for item in items:
                counts["candidates"] += 1
                if len(machine) + len(accepted) >= params.num_instructions:
                    counts["not_needed"] += 1
                    continue
                reason = filter_reason(item)
                if reason is None:
                    scores, most_similar = pool.most_similar(item)
                    if scores.size and scores.max() > cfg.novelty_threshold:
                        reason = "too_similar"
                if reason is not None:
                    counts[reason] += 1
                    continue
                pool.add(item)
                accepted.append({
                    "id": f"machine_{len(machine) + len(accepted)}",
                    "instruction": item,
                    "max_rouge_l": float(scores.max()) if scores.size else 0.0,
                    "avg_rouge_l": float(scores.mean()) if scores.size else 0.0,
                    "most_similar": {text: score for text, score in most_similar},
                    "batch": batch,
                    "prompt_index": prompt_index,
                    "prompt_variant": cfg.prompt_variant,
                })
        labels = identify_classification(
            engine, [a["instruction"] for a in accepted], examples, clf.batch_size, clf.max_new_tokens,
        )
        for record, label in zip(accepted, labels):
            record["is_classification"] = label
        counts["accepted"] = len(accepted)
        append_jsonl(out_dir / INSTRUCTIONS_FILE, accepted)
        batch_record = {
            "batch": batch,
            "prompts": len(prompts),
            "generated_tokens": sum(o.num_tokens for o in outputs),
            "seconds": round(time.time() - started, 3),
            "counts": dict(counts),
            "accepted": len(accepted),
            "accepted_ids": [a["id"] for a in accepted],
        }
        append_jsonl(out_dir / BATCHES_FILE, [batch_record])  # commit marker
        state.instructions.extend(accepted)
        state.batches.append(batch_record)
        machine.extend(a["instruction"] for a in accepted)
        progress.update(len(accepted))
        batch += 1
    progress.close()
    return state


def filter_counts(batches: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Total count per filter reason over all batches (Self-Instruct's filter statistics)."""
    totals: Counter[str] = Counter()
    for record in batches:
        totals.update(record["counts"])
    order = ["truncated_response", "unparseable_response", "candidates", *FILTERS, "not_needed", "accepted"]
    rows = [(reason, totals.get(reason, 0)) for reason in order]
    rows.insert(0, ("responses", sum(b["prompts"] for b in batches)))
    return pd.DataFrame(rows, columns=["stage", "count"])


def instruction_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Accepted instructions as a table: text, length, novelty score, classification flag."""
    return pd.DataFrame(
        {
            "id": [r["id"] for r in records],
            "instruction": [r["instruction"] for r in records],
            "words": [len(r["instruction"].split()) for r in records],
            "max_rouge_l": [r["max_rouge_l"] for r in records],
            "is_classification": [r["is_classification"] for r in records],
            "most_similar": [next(iter(r["most_similar"]), "") for r in records],
        }
    )


def generation_throughput(batches: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Batches, generated tokens, seconds and tokens/s over the committed batches."""
    tokens = sum(b["generated_tokens"] for b in batches)
    seconds = sum(b["seconds"] for b in batches)
    return {
        "batches": len(batches),
        "generated_tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else float("nan"),
        "accepted_per_batch": round(float(np.mean([b["accepted"] for b in batches])), 2) if batches else 0.0,
    }


@dataclass
class InstructionGenerationResult(StageResult):
    """What stage 1 made: the accepted instructions, per-filter counts and throughput."""

    instructions: pd.DataFrame
    filter_counts: pd.DataFrame
    throughput: dict[str, float]


@stage_entry
def run(params: Params, run_dir: str | Path) -> InstructionGenerationResult:
    """Stage 1: bootstrap instructions into ``<run_dir>/instruction_generation`` with tables and figures."""
    from refine_af_utils.engines import load_engine
    from refine_af_utils.plots import histogram, save_figure
    from refine_af_utils.run_folder import open_stage

    stage = open_stage(__name__, params, run_dir)
    seeds = stage.layout.seed_tasks()
    prompt_seeds(params, seeds)  # before the slow model load; bootstrap_instructions checks again for direct callers
    with load_engine(params.model, random_seed=params.random_seed) as engine:  # checks the device first
        state = bootstrap_instructions(params, seeds, stage.folder, engine)
    table = instruction_table(state.instructions)
    counts = filter_counts(state.batches)
    throughput = generation_throughput(state.batches)
    table.to_csv(stage.file("table"), index=False)
    counts.to_csv(stage.file("filter_counts"), index=False)
    figures = {
        "filter_counts": filter_counts_figure(counts, stage.file("fig_filter_counts")),
        "novelty": novelty_figure(table["max_rouge_l"], params.instruction_generation.novelty_threshold,
                                  stage.file("fig_novelty")),
        "lengths": save_figure(histogram(table["words"], "Length of the new instructions", "words"),
                               stage.file("fig_lengths")),
    }
    stage.record_metrics({
        "instructions": len(table),
        "classification_share": round(float(table["is_classification"].mean()), 3) if len(table) else 0.0,
        "mean_max_rouge_l": round(float(table["max_rouge_l"].mean()), 4) if len(table) else 0.0,
        "mean_words": round(float(table["words"].mean()), 2) if len(table) else 0.0,
        **{f"count_{k}": int(v) for k, v in zip(counts["stage"], counts["count"])},
        **throughput,
    })
    return InstructionGenerationResult(table, counts, throughput, figures=figures)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m refine_af_utils.stages.instruction_generation PARAMS OUT_DIR``: stage 1 without the notebook."""
    import argparse

    from refine_af_utils.engines import load_engine
    from refine_af_utils.params import load_params
    from refine_af_utils.seeds import load_seed_tasks

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("params")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with load_engine(params.model, random_seed=params.random_seed) as engine:
        state = bootstrap_instructions(params, load_seed_tasks(params.seed_tasks), args.out_dir, engine)
    print(f"{len(state.instructions)} instructions in {len(state.batches)} batches")


if __name__ == "__main__":
    main()
