"""Super-NI loader and metrics against hand-computed cases (Tk-Instruct's protocol)."""

import json

import pytest

from refine_af_utils.prompts import evaluation_prompt
from refine_af_utils.superni import (
    SuperNIError,
    SuperNIInstance,
    load_task,
    load_tasks,
    normalize_answer,
    score,
)


def test_rouge_l_uses_the_porter_stemmer_and_the_best_reference():
    assert score("running dogs", ["run dog"])["rougeL"] == 100.0  # stems match: running->run, dogs->dog
    assert score("the cat sat", ["a dog ran", "the cat sat down"])["rougeL"] == pytest.approx(100 * 6 / 7)
    assert score("", ["anything"]) == {"rougeL": 0.0, "exact_match": 0.0}


def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Cat, sat! ") == "cat sat"
    assert score("The Entailment.", ["entailment"])["exact_match"] == 100.0
    assert score("Entailment", ["Contradiction", "Neutral"])["exact_match"] == 0.0
    assert score("neutral", ["Contradiction", "Neutral"]) == {"rougeL": 100.0, "exact_match": 100.0}
    with pytest.raises(SuperNIError):
        score("x", [])


def _task(**overrides):
    data = {"Definition": ["Say whether the claim holds"], "Categories": ["Textual Entailment"],
            "Positive Examples": [], "Negative Examples": [],
            "Instances": [{"id": f"t-{i}", "input": f"Claim {i}", "output": ["Yes"]} for i in range(3)]}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not ...}


def _write_dir(tmp_path, tasks):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    for name, data in tasks.items():
        (tmp_path / "tasks" / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("\n".join(tasks) + "\n")
    return tmp_path


def test_load_tasks_keeps_the_first_instances_and_excludes_task1415(tmp_path):
    many = _task(Instances=[{"id": f"m-{i}", "input": str(i), "output": [str(i)]} for i in range(120)])
    root = _write_dir(tmp_path, {"task001_many": many, "task1415_youtube_caption": _task(), "task002_few": _task()})
    with pytest.warns(UserWarning, match="task002_few: 3 instances, fewer than 100"):
        tasks = load_tasks(root)
    assert [t.name for t in tasks] == ["task001_many", "task002_few"]
    assert len(tasks[0].instances) == 100 and tasks[0].instances[-1].id == "m-99"
    assert tasks[0].available_instances == 120 and tasks[0].category == "Textual Entailment"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"Definition": ...}, "missing field 'Definition'"),
        ({"Definition": []}, "field 'Definition' must be a non-empty list"),
        ({"Instances": ...}, "missing field 'Instances'"),
        ({"Instances": [{"id": "a", "input": "x"}]}, "field 'Instances[0]': 'output' must be a non-empty list"),
        ({"Instances": [{"id": "a", "input": "x", "output": []}]}, "'output' must be a non-empty list"),
        ({"Categories": ...}, "missing field 'Categories'"),
    ],
)
def test_malformed_task_files_name_the_file_and_field(tmp_path, overrides, message):
    path = tmp_path / "task9_bad.json"
    path.write_text(json.dumps(_task(**overrides)))
    with pytest.raises(SuperNIError) as error:
        load_task(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_missing_split_or_task_file(tmp_path):
    with pytest.raises(SuperNIError, match="test task list not found"):
        load_tasks(tmp_path)
    root = _write_dir(tmp_path, {"task001_a": _task()})
    (root / "splits" / "default" / "test_tasks.txt").write_text("task001_a\ntask404_missing\n")
    with pytest.raises(SuperNIError, match="lists 'task404_missing'"):
        load_tasks(root)


def test_prompt_is_definition_only_zero_shot(tmp_path):
    path = tmp_path / "task1_x.json"
    path.write_text(json.dumps(_task()))
    task = load_task(path, max_instances=3)
    assert evaluation_prompt(task, SuperNIInstance("i", "Is the sky blue?", ["Yes"])) == (
        "Definition: Say whether the claim holds.\n\nNow complete the following example -\n"
        "Input: Is the sky blue?\nOutput:")
    assert evaluation_prompt(task, SuperNIInstance("i", "a claim", ["Yes"])).endswith("Input: a claim.\nOutput:")


def test_the_evaluation_prompt_is_defined_with_the_other_prompts():
    assert evaluation_prompt.__module__ == "refine_af_utils.prompts"


def test_bundled_evaluation_set_covers_the_12_test_categories():
    import warnings

    from refine_af_utils.superni import BUNDLED_SUPERNI

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 12 instances a task, fewer than 100 by design
        tasks = load_tasks(BUNDLED_SUPERNI)
    assert {t.category for t in tasks} == {
        "Textual Entailment", "Cause Effect Classification", "Coreference Resolution", "Dialogue Act Recognition",
        "Answerability Classification", "Word Analogy", "Overlap Extraction", "Keyword Tagging",
        "Question Rewriting", "Title Generation", "Data to Text", "Grammar Error Correction"}
    assert all(len(t.instances) >= 10 for t in tasks)
    for task in tasks:
        for instance in task.instances:
            assert score(instance.references[0], instance.references)["rougeL"] == 100.0
