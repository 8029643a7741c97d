from hypothesis import given, settings
from hypothesis import strategies as st

from refine_af_utils.instances import (
    Instance,
    filter_instances,
    instance_prompts,
    parse_classification_instances,
    parse_generation_instances,
    parse_instances,
)
from refine_af_utils.params import InstanceGenerationParams
from refine_af_utils.prompts import instance_generation_prompt
from refine_af_utils.seeds import load_seed_tasks

def test_generation_prompt_puts_input_first_and_classification_label_first():
    demos = [("Add the numbers.", [("2 and 3", "5")]), ("Name a fruit.", [("", "Apple")])]
    prompt = instance_generation_prompt("Double the number.", False, demos)
    assert "Task: Add the numbers.\nExample 1\nInput: 2 and 3\nOutput: 5" in prompt
    assert "Task: Name a fruit.\nExample 1\nOutput: Apple" in prompt  # no input line for an empty input
    assert prompt.endswith("Task: Double the number.\nExample 1")
    clf = instance_generation_prompt("Is it spam?", True, [("Rate the tone.", [("You are great", "Positive")])])
    assert "Class label: Positive\nInput: You are great" in clf
    assert clf.endswith("Task: Is it spam?\nClass label:")

def test_parsers():
    text = "\nInput: 4\nOutput: 8\nExample 2\nInput: 10\nOutput: 20\nExample 3\nOutput: 0"
    assert parse_generation_instances(text) == [Instance("4", "8"), Instance("10", "20"), Instance("", "0")]
    assert parse_generation_instances("no markers at all") == []
    text = " Spam\nInput: Win a prize now\nClass label: Not spam\nInput: (none)"
    assert parse_classification_instances(text) == [Instance("Win a prize now", "Spam"), Instance("", "Not spam")]

@settings(max_examples=200, deadline=None)
@given(st.text(), st.booleans())
def test_parsers_never_raise(text, classification):
    assert all(isinstance(i, Instance) for i in parse_instances(text, classification))

def test_self_instruct_filters():
    kept, counts = filter_instances([
        Instance("a", "b"), Instance("a", "b"), Instance("c", "d:"), Instance("e:", "f"), Instance("x", "x"),
        Instance("y", " "), Instance("g", "h"),
    ])
    assert kept == [Instance("a", "b"), Instance("g", "h")]
    assert counts == {"duplicate": 1, "ends_with_colon": 2, "input_equals_output": 1, "empty_output": 1,
                      "over_limit": 0}
    conflicting, counts = filter_instances([Instance("a", "b"), Instance("a", "c"), Instance("d", "e")])
    assert conflicting == [] and counts["conflicting_outputs_task_dropped"] == 3
    many, counts = filter_instances([Instance(str(i), "out") for i in range(8)], max_instances=5)
    assert len(many) == 5 and counts["over_limit"] == 3


def test_a_no_input_task_may_have_several_different_examples():
    # Self-Instruct's filter_duplicate_instances skips an empty input: "Write a haiku." with three examples
    # is three instances, not a conflict; a non-empty input with two outputs still drops the task
    haikus = [Instance("", "Autumn moon rises"), Instance("", "Rain on the old roof"), Instance(" ", "Frog, pond")]
    kept, counts = filter_instances(haikus)
    assert kept == haikus and counts.get("conflicting_outputs_task_dropped", 0) == 0
    kept, counts = filter_instances(haikus + [Instance("x", "1"), Instance("x", "2")])
    assert kept == [] and counts["conflicting_outputs_task_dropped"] == 5

def test_instance_prompts_depend_only_on_the_instruction():
    seeds = load_seed_tasks("bundled")
    records = [{"instruction": "Rate the review.", "is_classification": True},
               {"instruction": "Write a haiku.", "is_classification": False}]
    cfg = InstanceGenerationParams()
    first = instance_prompts(records, seeds, cfg, 42)
    assert first == instance_prompts(list(reversed(records)), seeds, cfg, 42)[::-1]
    assert first[0].endswith("Class label:") and first[1].endswith("Example 1")
    assert first != instance_prompts(records, seeds, cfg, 7)
