"""Every prompt the pipeline sends to a model, in one place.

Wording is ours; the structure follows Self-Instruct (see the method notes): a header
line, numbered in-context instructions, and the next number for the model to continue.
Also here: the Super-NI evaluation prompt (stage 6) and the reward scorers' templates
(the paper's: UniEval's questions and OpenAssistant's layout; the offline stand-ins': the
same questions for a causal LM). Scorer templates are params, settable per run: these are
the schema's defaults, and ``params/default.yaml`` spells the same text out.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # superni's data classes; superni imports this module, so not at run time
    from refine_af_utils.superni import SuperNIInstance, SuperNITask

INSTRUCTION_HEADERS = {
    "all": "Come up with a series of tasks:",
    "classification": (
        "Come up with a series of classification tasks. "
        "Try to specify the possible output labels when possible."
    ),
}

# Stop generating at a blank line or once the model starts item 16 (Self-Instruct's stops).
INSTRUCTION_STOP_STRINGS = ["\n\n", "\n16.", "16 ."]


def clean_prompt_instruction(instruction: str) -> str:
    """Collapse whitespace and drop a trailing colon, as Self-Instruct does in its prompts."""
    return re.sub(r"\s+", " ", instruction).strip().rstrip(":")


def instruction_generation_prompt(instructions: Sequence[str], variant: str = "all") -> str:
    """The numbered-list prompt: header, ``1. ...`` to ``N. ...``, then ``N+1.`` to continue."""
    lines = [INSTRUCTION_HEADERS[variant]]
    for number, instruction in enumerate(instructions, start=1):
        lines.append(f"{number}. {clean_prompt_instruction(instruction)}")
    lines.append(f"{len(instructions) + 1}.")
    return "\n".join(lines)


CLASSIFICATION_QUESTION = "Can this task be regarded as a classification task with finite output labels?"


def classification_prompt(examples: Sequence[tuple[str, bool]], instruction: str) -> str:
    """Few-shot yes/no prompt: labelled seed examples, then the instruction to judge."""
    blocks = [CLASSIFICATION_QUESTION, ""]
    for text, is_classification in examples:
        blocks.append(f"Task: {clean_prompt_instruction(text)}")
        blocks.append(f"Is it classification? {'Yes' if is_classification else 'No'}")
        blocks.append("")
    blocks.append(f"Task: {clean_prompt_instruction(instruction)}")
    blocks.append("Is it classification?")
    return "\n".join(blocks)


def parse_yes_no(answer: str) -> bool:
    """True when the model's answer starts with yes (any case, leading space allowed)."""
    return answer.strip().lower().startswith("yes")


# Instance generation (Self-Instruct style, our wording). Non-classification tasks: input first,
# then output. Classification tasks: the class label first, then an input that fits it, so the
# model cannot drift to one label.
INSTANCE_HEADER = (
    "Come up with examples for the following tasks. Write several examples when you can. "
    "If a task needs no input, write the output directly."
)
CLASSIFICATION_INSTANCE_HEADER = (
    "For each classification task below, write a class label and then an input that belongs to that label. "
    "If the task needs no input, write the class labels only."
)


def _instance_block(instruction: str, instances: Sequence[tuple[str, str]], classification: bool) -> str:
    lines = [f"Task: {clean_prompt_instruction(instruction)}"]
    for number, (input_text, output) in enumerate(instances, start=1):
        if classification:
            lines.append(f"Class label: {output}")
            lines.append(f"Input: {input_text}" if input_text.strip() else "Input: (none)")
        else:
            lines.append(f"Example {number}")
            if input_text.strip():
                lines.append(f"Input: {input_text}")
            lines.append(f"Output: {output}")
    return "\n".join(lines)


def instance_generation_prompt(
    instruction: str, classification: bool, demonstrations: Sequence[tuple[str, Sequence[tuple[str, str]]]],
) -> str:
    """Header, demonstration tasks with their (input, output) instances, then the open task.

    The prompt ends where the model starts writing the first instance: ``Example 1`` for
    generation tasks and ``Class label:`` for classification tasks.
    """
    header = CLASSIFICATION_INSTANCE_HEADER if classification else INSTANCE_HEADER
    blocks = [header, ""]
    for demo_instruction, demo_instances in demonstrations:
        blocks.append(_instance_block(demo_instruction, demo_instances, classification))
        blocks.append("")
    opener = "Class label:" if classification else "Example 1"
    blocks.append(f"Task: {clean_prompt_instruction(instruction)}\n{opener}")
    return "\n".join(blocks)


# Stop when the model starts the next task.
INSTANCE_STOP_STRINGS = ["\nTask:", "\n\n\n"]


def sft_prompt(instruction: str, input_text: str) -> str:
    """The instruction, the input on its own lines when there is one, then ``Output:``."""
    text = instruction.strip()
    if input_text.strip():
        text += f"\n\nInput: {input_text.strip()}"
    return text + "\n\nOutput:"


# Super-NaturalInstructions evaluation (stage 6): zero-shot with the task definition only, in
# Self-Instruct's / Tk-Instruct's wording.
def _with_period(text: str) -> str:
    text = text.strip()
    return text if text and text[-1] in string.punctuation else text + "."


def evaluation_prompt(task: "SuperNITask", instance: "SuperNIInstance") -> str:
    """Zero-shot, definition only: ``Definition: ...`` blank line ``Now complete the following example -``."""
    return (f"Definition: {_with_period(task.definition)}\n\n"
            f"Now complete the following example -\nInput: {_with_period(instance.input)}\nOutput:")


# Stage 2 scorers' templates for the paper's models (the recipes spell them out in their ``reward``
# section; scorers format any template from params with :meth:`InstanceText.fields`). UniEval's
# dialogue questions, in its own input layout:
UNIEVAL_QUESTIONS = {
    "naturalness": "question: Is this a natural response in the dialogue? </s> response: {output}",
    "coherence": (
        "question: Is this a coherent response given the dialogue history? </s> response: {output} "
        "</s> dialogue history: {context}"
    ),
    "understandability": "question: Is this an understandable response in the dialogue? </s> response: {output}",
}
# OpenAssistant's reward model reads the prompter and assistant turns with its special tokens.
OASST_TEMPLATE = "<|prompter|>{prompt}<|endoftext|><|assistant|>{output}<|endoftext|>"
# The offline stand-ins (params/default.yaml and the schema's defaults): the paper's questions asked
# of a small causal LM, whose next token after "Answer (Yes or No):" is read as P(Yes).
YES_NO_QUESTIONS = {
    "reward_model": (
        "Question: Is this a helpful and correct response to the request?\nRequest: {prompt}\nResponse: {output}\n"
        "Answer (Yes or No):"
    ),
    "understandability": "Question: Is this an understandable response in the dialogue?\nResponse: {output}\nAnswer (Yes or No):",
    "naturalness": "Question: Is this a natural response in the dialogue?\nResponse: {output}\nAnswer (Yes or No):",
}
