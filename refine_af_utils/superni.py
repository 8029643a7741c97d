"""Super-NaturalInstructions evaluation data and metrics (Self-Instruct / Tk-Instruct protocol).

Data as released in allenai/natural-instructions: ``tasks/<name>.json`` per task and the
test task list ``splits/default/test_tasks.txt``. The first ``max_instances`` (100) instances
of each test task are used, zero-shot with the task definition only. Metrics follow
Tk-Instruct's ``compute_metrics.py``: ROUGE-L F with the Porter stemmer and exact match after
normalisation, each the maximum over the acceptable answers, times 100; task1415 is excluded.
The prompt, :func:`refine_af_utils.prompts.evaluation_prompt`, is defined with the other prompts.
"""

from __future__ import annotations

import json
import re
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_af_utils.errors import RefineAFError, decode_utf8
from refine_af_utils.rouge import rouge_l

EXCLUDED_TASKS = ("task1415",)  # excluded by Tk-Instruct's evaluation (prefix match)
BUNDLED_SUPERNI = Path(__file__).parent / "data" / "superni_mini"


class SuperNIError(RefineAFError, ValueError):
    """A Super-NI task file or split that does not match the released format."""


@dataclass
class SuperNIInstance:
    """One evaluation instance: its id, input and acceptable answers."""

    id: str
    input: str
    references: list[str]


@dataclass
class SuperNITask:
    """One test task: name, category (first of ``Categories``), definition and instances."""

    name: str
    category: str
    definition: str
    instances: list[SuperNIInstance]
    available_instances: int


def _field(data: dict, key: str, kind: type, path: Path) -> Any:
    if key not in data:
        raise SuperNIError(f"{path}: missing field '{key}'")
    if not isinstance(data[key], kind) or not data[key]:
        raise SuperNIError(f"{path}: field '{key}' must be a non-empty {kind.__name__}")
    return data[key]


def load_task(path: str | Path, max_instances: int = 100) -> SuperNITask:
    """Read and validate one task file; keep its first ``max_instances`` instances."""
    path = Path(path)
    try:
        data = json.loads(decode_utf8(path.read_bytes(), str(path), SuperNIError))
    except json.JSONDecodeError as error:
        raise SuperNIError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from error
    except RecursionError:
        raise SuperNIError(f"{path}: JSON nested too deeply to read (not a Super-NI task file)") from None
    except OSError as error:
        raise SuperNIError(f"{path}: cannot read the task ({error})") from error
    if not isinstance(data, dict):
        raise SuperNIError(f"{path}: expected a JSON object")
    definition = _field(data, "Definition", list, path)
    if not isinstance(definition[0], str) or not definition[0].strip():
        raise SuperNIError(f"{path}: field 'Definition' must start with a non-empty string")
    categories = _field(data, "Categories", list, path)
    raw_instances = _field(data, "Instances", list, path)
    instances, seen = [], {}
    for index, raw in enumerate(raw_instances[:max_instances]):
        where = f"{path}: field 'Instances[{index}]'"
        if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
            raise SuperNIError(f"{where} must be an object with a string 'input'")
        outputs = raw.get("output")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise SuperNIError(f"{where}: 'output' must be a non-empty list of acceptable answers")
        instance_id = str(raw.get("id", f"{path.stem}-{index}"))
        if instance_id in seen:  # predictions are keyed by (task, id): a duplicate would merge two instances
            raise SuperNIError(f"{where}: id {instance_id!r} duplicates that of 'Instances[{seen[instance_id]}]'")
        seen[instance_id] = index
        instances.append(SuperNIInstance(instance_id, raw["input"], outputs))
    if len(raw_instances) < max_instances:
        warnings.warn(f"{path.stem}: {len(raw_instances)} instances, fewer than {max_instances}; using all of them",
                      stacklevel=2)
    return SuperNITask(path.stem, str(categories[0]), definition[0], instances, len(raw_instances))


def test_split_file(superni_dir: str | Path) -> Path:
    """A Super-NI checkout's list of test tasks, ``splits/default/test_tasks.txt``."""
    return Path(superni_dir) / "splits" / "default" / "test_tasks.txt"


def task_file(superni_dir: str | Path, name: str) -> Path:
    """A Super-NI checkout's file of task ``name``, ``tasks/<name>.json``."""
    return Path(superni_dir) / "tasks" / f"{name}.json"


def load_tasks(superni_dir: str | Path, max_instances: int = 100) -> list[SuperNITask]:
    """The tasks of ``splits/default/test_tasks.txt`` (task1415 excluded), each with its first instances."""
    superni_dir = Path(superni_dir)
    split = test_split_file(superni_dir)
    if not split.is_file():
        raise SuperNIError(f"{split}: test task list not found (point superni_dir at a natural-instructions checkout)")
    names = [line.strip() for line in decode_utf8(split.read_bytes(), str(split), SuperNIError).splitlines()
             if line.strip()]
    if not names:
        raise SuperNIError(f"{split}: no task names (the file is empty); list one test task a line, "
                           "e.g. task1356_xlsum_title_generation")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # predictions are keyed by (task, id): refused now, not after every prediction is made
        raise SuperNIError(f"{split}: lists {', '.join(repeated)} more than once; list each test task once")
    tasks = []
    for name in names:
        if name.startswith(EXCLUDED_TASKS):
            continue
        path = task_file(superni_dir, name)
        if not path.is_file():
            raise SuperNIError(f"{split}: lists '{name}', but {path} does not exist")
        tasks.append(load_task(path, max_instances))
    if not tasks:
        raise SuperNIError(f"{split}: lists only excluded tasks ({', '.join(EXCLUDED_TASKS)}); nothing to evaluate")
    return tasks


def normalize_answer(text: str) -> str:
    """Tk-Instruct's (SQuAD's) normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score(prediction: str, references: list[str]) -> dict[str, float]:
    """``rougeL`` (Porter-stemmed ROUGE-L F) and ``exact_match``, each the max over references, times 100."""
    if not references:
        raise SuperNIError("score needs at least one reference answer")
    rouge = float(rouge_l(prediction, references, use_stemmer=True).max())
    exact = max(normalize_answer(prediction) == normalize_answer(r) for r in references)
    return {"rougeL": 100.0 * rouge, "exact_match": 100.0 * float(exact)}
