"""Batched text generation with left padding, stop strings and an OpenAI-style presence penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          StoppingCriteria, StoppingCriteriaList)

from refine_af_utils.models import encode_prompts


class PresencePenaltyLogitsProcessor(LogitsProcessor):
    """Subtract ``penalty`` from the logit of every token already present in the continuation.

    This is OpenAI's presence penalty (additive, once per distinct token, generated text
    only), which Self-Instruct set to 2. transformers runs custom processors before its
    temperature and top-p warpers, which is OpenAI's order too. transformers' own
    ``repetition_penalty`` differs: it is multiplicative and also counts prompt tokens.
    """

    def __init__(self, penalty: float, prompt_length: int) -> None:
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        present = torch.zeros_like(scores, dtype=torch.bool)
        present.scatter_(1, generated, True)
        return scores - self.penalty * present.to(scores.dtype)


class GeneratedStopCriteria(StoppingCriteria):
    """Stop a row once its generated text (the prompt excluded) holds a stop string.

    transformers' own ``stop_strings`` also match a stop string that begins in the prompt (a prompt ending
    in a newline stops at once on a generated newline with the stop string ``"\\n\\n"``); OpenAI's and vLLM's
    stop strings, which Self-Instruct used, look at the generated text only. Elsewhere both stop at the same
    token: the first whose text completes a stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stop_strings, self.prompt_length = tokenizer, tuple(stop_strings), prompt_length
        self.skipped = {tokenizer.pad_token_id, tokenizer.eos_token_id}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        done = [cut_at_stop(self.tokenizer.decode([t for t in row if t not in self.skipped], skip_special_tokens=True),
                            self.stop_strings)[1]
                for row in input_ids[:, self.prompt_length:].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass
class Generation:
    """One decoded continuation; ``truncated`` when it hit the token limit before any stop."""

    text: str
    truncated: bool
    num_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated tokens before the end token (past a stop string too)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    positions = [text.find(stop) for stop in stop_strings if stop in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def decode_completion(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int], max_new_tokens: int,
                      stop_strings: Sequence[str] = ()) -> Generation:
    """The text of generated ``tokens`` up to the end token or the first stop string.

    The one decoding rule of stages 2-4 and the RL rollouts: ``truncated`` is true when the
    completion hit the token limit without an end token or a stop string (Self-Instruct's
    ``finish_reason == "length"``). Padding is ignored wherever it stands.
    """
    row = list(tokens)
    ended_by_eos = tokenizer.eos_token_id in row
    if ended_by_eos:
        row = row[: row.index(tokenizer.eos_token_id)]
    kept = [t for t in row if t not in {tokenizer.pad_token_id, tokenizer.eos_token_id}]
    text, stopped = cut_at_stop(tokenizer.decode(kept, skip_special_tokens=True), stop_strings)
    truncated = not (ended_by_eos or stopped) and len(row) >= max_new_tokens
    return Generation(text=text, truncated=truncated, num_tokens=len(kept), token_ids=tuple(kept))


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    presence_penalty: float = 0.0,
    stop_strings: Sequence[str] = (),
) -> list[Generation]:
    """Continue every prompt in one left-padded batch; ``temperature == 0`` decodes greedily."""
    if tokenizer.padding_side != "left":
        raise ValueError("generate_batch needs a tokenizer with padding_side='left'")
    encoded = encode_prompts(tokenizer, prompts, return_tensors="pt", padding=True)
    encoded = encoded.to(model.device)
    prompt_length = encoded["input_ids"].shape[1]
    sampling = temperature > 0
    processors = LogitsProcessorList()
    if presence_penalty:
        processors.append(PresencePenaltyLogitsProcessor(presence_penalty, prompt_length))
    stopping = StoppingCriteriaList()
    if stop_strings:
        stopping.append(GeneratedStopCriteria(tokenizer, stop_strings, prompt_length))
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        logits_processor=processors,
        stopping_criteria=stopping,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [decode_completion(tokenizer, row, max_new_tokens, stop_strings)
            for row in output[:, prompt_length:].tolist()]
