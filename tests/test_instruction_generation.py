import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_af_utils.engines import StaticEngine
from refine_af_utils.layout import BATCHES_FILE, INSTRUCTIONS_FILE
from refine_af_utils.stages.instruction_generation import bootstrap_instructions, filter_counts, filter_reason, load_state, parse_continuation
from refine_af_utils.files import append_jsonl, read_jsonl
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import params_from_dict
from refine_af_utils.prompts import classification_prompt, instruction_generation_prompt
from refine_af_utils.seeds import load_seed_tasks

from conftest import REPO_ROOT


def test_parse_continuation_splits_numbered_items():
    text = " write a haiku  about   rain.\n10. Translate the sentence into French.\n11 . Name three rivers.\n12."
    assert parse_continuation(text) == [
        "Write a haiku about rain.", "Translate the sentence into French.",
        "Name three rivers. 12.",  # Self-Instruct's split needs a space after the number's period
    ]
    assert parse_continuation("") == []
    assert parse_continuation("   \n  ") == []


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_continuation_never_raises(text):
    items = parse_continuation(text)
    assert all(isinstance(i, str) and i and i == i.strip() for i in items)


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("", "empty"),
        ("Name three rivers", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the IMAGE shown below in detail.", "blacklisted_word"),
        ("Explain how to go to the station from here.", "blacklisted_word"),
        ("Write a program that sorts a list of numbers.", "starts_with_write_a_program"),
        ("\"Quoted\" text at the start is not allowed here.", "starts_with_punctuation"),
        ("Éclair recipes are what we want you to list.", "starts_with_non_ascii"),
        ("Describe an imagery-rich poem about the sea.", None),  # whole words only
        ("Summarise the paragraph in one sentence.", None),
        (" ".join(["word"] * 150), None),
    ],
)
def test_filters(instruction, reason):
    assert filter_reason(instruction) == reason


def test_prompts_follow_self_instruct_layout():
    prompt = instruction_generation_prompt(["Say  hi:", "Count\nto three"])
    assert prompt == "Come up with a series of tasks:\n1. Say hi\n2. Count to three\n3."
    assert instruction_generation_prompt(["a"], "classification").startswith(
        "Come up with a series of classification tasks. Try to specify the possible output labels when possible.")
    clf = classification_prompt([("Is it spam?", True), ("Write a poem.", False)], "Rate it")
    assert clf.endswith("Task: Rate it\nIs it classification?")
    assert "Is it classification? Yes" in clf and "Is it classification? No" in clf


def test_load_state_cuts_uncommitted_batch_and_torn_lines(tmp_path):
    append_jsonl(tmp_path / INSTRUCTIONS_FILE, [{"id": "machine_0", "instruction": "a"}])
    append_jsonl(tmp_path / BATCHES_FILE, [{"batch": 0, "accepted": 1, "accepted_ids": ["machine_0"], "counts": {}}])
    # batch 1 wrote its instructions, then the process died before the commit marker ...
    append_jsonl(tmp_path / INSTRUCTIONS_FILE, [{"id": "machine_1", "instruction": "b"}])
    # ... and a later write was torn mid-line.
    with open(tmp_path / INSTRUCTIONS_FILE, "a") as handle:
        handle.write('{"id": "machine_2", "instr')
    with open(tmp_path / BATCHES_FILE, "a") as handle:
        handle.write('{"batch": 1, "acc')
    state = load_state(tmp_path)
    assert [r["id"] for r in state.instructions] == ["machine_0"]
    assert len(state.batches) == 1
    assert (tmp_path / INSTRUCTIONS_FILE).read_text().count("\n") == 1
    assert (tmp_path / BATCHES_FILE).read_text().endswith("}\n")


def test_load_state_refuses_hand_edited_files(tmp_path):
    append_jsonl(tmp_path / INSTRUCTIONS_FILE, [{"id": "other", "instruction": "a"}])
    append_jsonl(tmp_path / BATCHES_FILE, [{"batch": 0, "accepted": 1, "accepted_ids": ["machine_0"], "counts": {}}])
    with pytest.raises(RuntimeError, match="edited by hand"):
        load_state(tmp_path)


def tiny_params(tiny_llama_dir: Path, **generation) -> dict:
    return {
        "run_name": "tiny",
        "num_instructions": 10,
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        # A random model never stops by itself, so keep its cut-off continuations.
        "instruction_generation": {"batch_size": 4, "max_new_tokens": 24, "max_batches": 30,
                                   "drop_truncated_responses": False, **generation},
        "classification": {"num_examples": 4, "batch_size": 4},
    }


@pytest.mark.slow
def test_bootstrap_on_a_tiny_model(tmp_path, tiny_llama_dir):
    params = params_from_dict(tiny_params(tiny_llama_dir))
    engine = StaticEngine(*load_causal_lm(params.model))
    seeds = load_seed_tasks("bundled")
    state = bootstrap_instructions(params, seeds, tmp_path, engine)
    records = read_jsonl(tmp_path / INSTRUCTIONS_FILE)
    assert len(records) == 10 == len(state.instructions)
    texts = [r["instruction"] for r in records]
    assert len(set(texts)) == 10
    for record in records:
        assert filter_reason(record["instruction"]) is None
        assert record["max_rouge_l"] <= 0.7
        assert isinstance(record["is_classification"], bool)
        assert len(record["most_similar"]) == 10
    counts = dict(zip(*filter_counts(state.batches).to_dict("list").values()))
    assert counts["accepted"] == 10
    assert counts["candidates"] == sum(counts[k] for k in counts if k not in {"responses", "candidates",
                                       "truncated_response", "unparseable_response"})
    # The run is complete: running again generates nothing more.
    again = bootstrap_instructions(params, seeds, tmp_path, engine)
    assert len(again.batches) == len(state.batches)
    # A stricter truncation rule drops every cut-off continuation of the random model.
    strict = params_from_dict(tiny_params(tiny_llama_dir, drop_truncated_responses=True, max_batches=2))
    with pytest.raises(RuntimeError, match="other settings"):
        bootstrap_instructions(strict, seeds, tmp_path, engine)
    strict_state = bootstrap_instructions(strict, seeds, tmp_path / "strict", engine)
    assert strict_state.instructions == []
    assert sum(b["counts"]["truncated_response"] for b in strict_state.batches) == 8


def _run_stage1(params_file: Path, out_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "refine_af_utils.stages.instruction_generation", str(params_file), str(out_dir)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("kill_after_batches", [1, 3])
@pytest.mark.slow
def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path, tiny_llama_dir, kill_after_batches):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(tiny_llama_dir, batch_size=2) | {"num_instructions": 16}))
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    assert _run_stage1(params_file, reference_dir).wait(timeout=300) == 0

    process = _run_stage1(params_file, crashed_dir)
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(read_jsonl(crashed_dir / BATCHES_FILE)) >= kill_after_batches:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = [r["id"] for r in load_state(crashed_dir).instructions]
    assert process.returncode == -signal.SIGKILL

    assert _run_stage1(params_file, crashed_dir).wait(timeout=300) == 0
    resumed = read_jsonl(crashed_dir / INSTRUCTIONS_FILE)
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == 16
    assert len({r["instruction"] for r in resumed}) == 16
    assert ids[: len(committed)] == committed  # nothing committed was lost
    # Batches draw their randomness from (seed, batch index): the resumed run equals an uninterrupted one.
    assert resumed == read_jsonl(reference_dir / INSTRUCTIONS_FILE)
    batches = read_jsonl(crashed_dir / BATCHES_FILE)
    assert [b["batch"] for b in batches] == list(range(len(batches)))
