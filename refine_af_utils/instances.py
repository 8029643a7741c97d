"""Instances (input, output) for instructions: prompts' demonstrations, parsing and Self-Instruct's filters."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from refine_af_utils.generation import Generation
from refine_af_utils.params import InstanceGenerationParams
from refine_af_utils.prompts import INSTANCE_STOP_STRINGS, instance_generation_prompt
from refine_af_utils.seeding import derive_seed
from refine_af_utils.seeds import SeedTask

if TYPE_CHECKING:
    from refine_af_utils.engines import Decoding, Engine

_EXAMPLE_SPLIT_RE = re.compile(r"(?:^|\n)\s*Example\s*\d+\s*[.:]?\s*(?:\n|$)")
_LABEL_SPLIT_RE = re.compile(r"(?:^|\n)\s*Class label:\s*")
_OUTPUT_RE = re.compile(r"(?:^|\n)\s*Output\s*:\s*")
_INPUT_RE = re.compile(r"^\s*Input\s*:\s*")
_NONE_INPUTS = {"(none)", "none", "n/a", "-"}


@dataclass(frozen=True)
class Instance:
    """One generated (input, output) pair of an instruction."""

    input: str
    output: str


def _clean_input(text: str) -> str:
    text = _INPUT_RE.sub("", text.strip()).strip()
    return "" if text.lower() in _NONE_INPUTS else text


def parse_generation_instances(text: str) -> list[Instance]:
    """Instances of a generation task: split on ``Example N``, then on ``Output:``.

    The prompt already opened ``Example 1``, so the text starts inside the first example.
    A part without an ``Output:`` marker is skipped. Never raises.
    """
    instances = []
    for part in _EXAMPLE_SPLIT_RE.split("\n" + text if isinstance(text, str) else ""):
        pieces = _OUTPUT_RE.split(part, maxsplit=1)
        if len(pieces) != 2:
            continue
        instances.append(Instance(_clean_input(pieces[0]), pieces[1].strip()))
    return instances


def parse_classification_instances(text: str) -> list[Instance]:
    """Instances of a classification task: split on ``Class label:``; label line, then the input.

    The prompt already opened ``Class label:``, so the text starts with the first label. Never raises.
    """
    instances = []
    for part in _LABEL_SPLIT_RE.split(text if isinstance(text, str) else ""):
        if not part.strip():
            continue
        label, _, rest = part.strip().partition("\n")
        instances.append(Instance(_clean_input(rest), label.strip()))
    return instances


def parse_instances(text: str, classification: bool) -> list[Instance]:
    """Parse a model's instances for a classification or a generation task."""
    return parse_classification_instances(text) if classification else parse_generation_instances(text)


# Every reason an instance is dropped (filter_instances, and extract_instances' token-limit cut): the
# stages report each one, zeros included, so their metrics always have the same keys.
FILTER_REASONS = ("empty_output", "input_equals_output", "ends_with_colon", "conflicting_outputs_task_dropped",
                  "duplicate", "over_limit", "cut_by_token_limit")


def filter_instances(instances: Sequence[Instance], max_instances: int = 5) -> tuple[list[Instance], dict[str, int]]:
    """Self-Instruct's instance filters; returns the kept instances and a count per reason.

    Drops input == output, an empty output, an input or output ending with a colon; if one
    non-empty input has different outputs the whole task is dropped (Self-Instruct's
    ``filter_duplicate_instances`` skips empty inputs: a no-input task's examples may differ);
    exact duplicates are removed; at most ``max_instances`` are kept.
    """
    counts: dict[str, int] = defaultdict(int)
    kept: list[Instance] = []
    for instance in instances:
        if not instance.output.strip():
            counts["empty_output"] += 1
        elif instance.input.strip() == instance.output.strip():
            counts["input_equals_output"] += 1
        elif instance.input.strip().endswith(":") or instance.output.strip().endswith(":"):
            counts["ends_with_colon"] += 1
        else:
            kept.append(instance)
    outputs_by_input: dict[str, set[str]] = defaultdict(set)
    for instance in kept:
        if instance.input.strip():
            outputs_by_input[instance.input].add(instance.output)
    if any(len(outputs) > 1 for outputs in outputs_by_input.values()):
        counts["conflicting_outputs_task_dropped"] += len(kept)
        return [], dict(counts)
    unique = list(dict.fromkeys(kept))
    counts["duplicate"] += len(kept) - len(unique)
    counts["over_limit"] += max(0, len(unique) - max_instances)
    return unique[:max_instances], dict(counts)


def extract_instances(text: str, classification: bool, truncated: bool,
                      max_instances: int = 5) -> tuple[list[Instance], dict[str, int]]:
    """The one instance-extraction rule of stage 2, the RL reward and stage 4.

    ``text`` is a completion already cut at :data:`INSTANCE_STOP_STRINGS` (see
    :func:`refine_af_utils.generation.decode_completion`). A completion that hit the token
    limit (``truncated``) loses its last parsed instance, which the limit cut off
    (Self-Instruct drops a response on ``finish_reason == "length"``); then Self-Instruct's
    filters apply. Returns the kept instances and a count per drop reason.
    """
    parsed = parse_instances(text, classification)
    cut = 1 if truncated and parsed else 0
    kept, counts = filter_instances(parsed[: len(parsed) - cut], max_instances)
    if cut:
        counts["cut_by_token_limit"] = 1
    return kept, counts


def demonstrations(seeds: Sequence[SeedTask], classification: bool, count: int,
                   rng: random.Random) -> list[tuple[str, list[tuple[str, str]]]]:
    """``count`` seed tasks of the same type (classification or not) with their instances."""
    same_type = [s for s in seeds if s.is_classification == classification] or list(seeds)
    chosen = rng.sample(same_type, min(count, len(same_type)))
    return [(s.instruction, [(i.input, i.output) for i in s.instances]) for s in chosen]


def instance_prompts(records: Sequence[dict[str, Any]], seeds: Sequence[SeedTask],
                     cfg: InstanceGenerationParams, random_seed: int) -> list[str]:
    """One instance-generation prompt per instruction record (``instruction``, ``is_classification``).

    Demonstrations are drawn from ``(random_seed, instruction)``, so the same instruction always
    gets the same prompt, whichever generator (untrained or trained) writes its instances.
    """
    prompts = []
    for record in records:
        rng = random.Random(derive_seed(random_seed, "demonstrations", record["instruction"]))
        demos = demonstrations(seeds, record["is_classification"], cfg.num_demonstrations, rng)
        prompts.append(instance_generation_prompt(record["instruction"], record["is_classification"], demos))
    return prompts


def instance_decoding(cfg: InstanceGenerationParams) -> "Decoding":
    """Stage 4's decoding (sampled, stopped at the next task), shared by stage 2, RL's held-out set and stage 4."""
    from refine_af_utils.engines import Decoding

    return Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    stop_strings=tuple(INSTANCE_STOP_STRINGS))


def generate_instances(engine: "Engine", prompts: Sequence[str], cfg: InstanceGenerationParams,
                       seed: Optional[int]) -> list[Generation]:
    """Raw continuations of instance prompts (sampled, stopped at the next task), with their truncation flag."""
    return engine.generate(prompts, instance_decoding(cfg), seed)
