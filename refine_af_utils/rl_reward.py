"""The REFINE-AF reward in the shapes trl's RL trainers ask for.

:class:`CompletionScorer` turns one generated completion into instances with the one extraction
rule of stages 2-4 and scores them with stage 2's reward (Eq. 1), or gives the parse penalty
when none is kept. trl's PPO asks for the reward as a sequence-classification model:
:class:`RefineAFRewardModel` gives it that interface. GRPO and RLOO take a reward function:
:func:`group_reward_function`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from refine_af_utils.generation import Generation, decode_completion
from refine_af_utils.instances import extract_instances
from refine_af_utils.params import RewardParams
from refine_af_utils.prompts import INSTANCE_STOP_STRINGS
from refine_af_utils.reward import COMPONENTS, component_weights, composite_reward
from refine_af_utils.scorers import InstanceText, Scorer


@dataclass
class CompletionReward:
    """The reward of one completion: the full reward, its content part and components, whether it parsed."""

    reward: float
    content: float          # mean Eq. 1 reward of the kept instances; NaN when none
    components: dict[str, float]
    parsed: bool
    instances: list[InstanceText] = field(default_factory=list)  # the kept instances it was scored on


class CompletionScorer:
    """Turns completions into instances (the shared extraction rule) and scores them with stage 2's reward.

    A completion's content reward and components are the means over its kept instances; a
    completion that yields none gets ``unparsed_reward`` and NaN components. Every scored
    completion is appended to :attr:`history`, which the metrics logger reads per update.
    """

    def __init__(self, scorers: dict[str, Scorer], reward: RewardParams, unparsed_reward: float,
                 max_instances: int = 5) -> None:
        self.scorers = scorers
        self.reward = reward
        self.weights = component_weights(reward)
        self.unparsed_reward = unparsed_reward
        self.max_instances = max_instances
        self.optimiser_view = OptimiserView()  # Eq. 1 as is; stage 3 sets each segment's (rl_training.optimiser_view)
        self.history: list[CompletionReward] = []

    def instances_of(self, instruction: str, is_classification: bool, generation: Generation) -> list[InstanceText]:
        """The instances a completion yields (none when it does not parse)."""
        kept, _ = extract_instances(generation.text, is_classification, generation.truncated, self.max_instances)
        return [InstanceText(instruction, i.input, i.output) for i in kept]

    def score(self, records: Sequence[dict[str, Any]], generations: Sequence[Generation],
              progress: bool = False) -> list[CompletionReward]:
        """One :class:`CompletionReward` per (instruction record, completion)."""
        kept = [self.instances_of(record["instruction"], record["is_classification"], generation)
                for record, generation in zip(records, generations)]
        flat = [instance for instances in kept for instance in instances]
        owners = [index for index, instances in enumerate(kept) for _ in instances]
        columns = {name: np.asarray(scorer.score(flat, progress=progress)) if flat else np.zeros(0)
                   for name, scorer in self.scorers.items()}
        content = composite_reward(columns, self.reward) if flat else np.zeros(0)
        owners_array = np.asarray(owners, dtype=int)
        results = []
        for index in range(len(generations)):
            mine = owners_array == index
            if not mine.any():
                results.append(CompletionReward(self.unparsed_reward, float("nan"),
                                                {name: float("nan") for name in COMPONENTS}, False))
                continue
            results.append(CompletionReward(float(content[mine].mean()), float(content[mine].mean()),
                                            {name: float(v[mine].mean()) for name, v in columns.items()}, True,
                                            kept[index]))
        self.history.extend(results)
        return results


@dataclass
class OptimiserView:
    """What the RL optimiser is given in place of each batch's Eq. 1 rewards (logs and reports keep Eq. 1).

    ``scale`` > 0: ``(reward - shift) / scale``, a positive affine map (the optimum is unchanged; with stage
    2's mean and SD, the reward in SD units, on the scale a KL coefficient is usually set for). ``placebo``:
    the batch's rewards shuffled with a seeded generator, so training sees a reward unrelated to its own
    completions (the control for what training does without the reward).
    """

    shift: float = 0.0
    scale: float = 1.0
    placebo_seed: Optional[int] = None
    _rng: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"the reward's scale must be > 0, got {self.scale}")
        seed = self.placebo_seed  # derived by the caller (rl_training.optimiser_view: derive_seed per segment)
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def __call__(self, rewards: Sequence[float]) -> list[float]:
        values = (np.asarray(rewards, dtype=np.float64) - self.shift) / self.scale
        if self._rng is not None:
            values = values[self._rng.permutation(len(values))]
        return values.tolist()


class _RewardBackbone(nn.Module):
    """What trl's ``get_reward`` calls as ``getattr(model, model.base_model_prefix)``."""

    def __init__(self, owner: "RefineAFRewardModel") -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        rewards = self._owner[0].rewards_for_rows(input_ids, attention_mask)
        hidden = rewards.to(torch.float32).view(-1, 1, 1).expand(-1, input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(hidden,))


class RefineAFRewardModel(nn.Module):
    """trl's PPO reward-model interface over the REFINE-AF reward.

    Contract (trl 1.9.2 ``trl.experimental.utils.get_reward``): trl calls
    ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., position_ids=...,
    return_dict=True, output_hidden_states=True, use_cache=False)`` on query + response tokens
    (padding replaced by id 0, mask = tokens != pad), then ``model.score(hidden_states[-1])`` and
    reads the value at the last response token. Here the backbone finds each row's registered
    prompt by token prefix, decodes the response with stage 4's rule
    (:func:`refine_af_utils.generation.decode_completion`), scores it and returns that reward at
    every position; ``score`` is the identity.
    """

    base_model_prefix = "refine_af_backbone"

    def __init__(self, tokenizer: Any, completion_scorer: CompletionScorer,
                 prompts: Sequence[tuple[Sequence[int], dict[str, Any]]], max_new_tokens: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.completion_scorer = completion_scorer
        self.max_new_tokens = max_new_tokens
        self.refine_af_backbone = _RewardBackbone(self)
        self.score = nn.Identity()
        self.config = SimpleNamespace(model_type="refine_af_reward")
        self._prompts = {tuple(ids): record for ids, record in prompts}
        self._prompt_lengths = sorted({len(ids) for ids, _ in prompts}, reverse=True)

    def split_row(self, tokens: Sequence[int]) -> tuple[dict[str, Any], list[int]]:
        """The registered prompt record a row starts with, and the response tokens after it."""
        for length in self._prompt_lengths:
            record = self._prompts.get(tuple(tokens[:length]))
            if record is not None:
                return record, list(tokens[length:])
        raise KeyError("a PPO row starts with no registered prompt (were the prompts tokenised the same way?)")

    def rewards_for_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The REFINE-AF reward of each row's response."""
        records, generations = [], []
        for row, mask in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            record, response = self.split_row([t for t, keep in zip(row, mask) if keep])
            records.append(record)
            generations.append(decode_completion(self.tokenizer, response, self.max_new_tokens,
                                                 INSTANCE_STOP_STRINGS))
        results = self.completion_scorer.score(records, generations)
        view = self.completion_scorer.optimiser_view
        return torch.tensor(view([r.reward for r in results]), device=input_ids.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards as (batch, 1) logits, like a sequence-classification reward model."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.rewards_for_rows(input_ids, attention_mask).view(-1, 1)


def group_reward_function(completion_scorer: CompletionScorer, tokenizer: Any, max_new_tokens: int) -> Callable:
    """trl's GRPO/RLOO reward function: the full REFINE-AF reward of each completion.

    trl calls it as ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)``;
    the completion's token ids are decoded with stage 4's rule, as for PPO.
    """
    def refine_af_reward(prompts, completions, completion_ids, instruction, is_classification, **_):
        generations = [decode_completion(tokenizer, ids, max_new_tokens, INSTANCE_STOP_STRINGS)
                       for ids in completion_ids]
        records = [{"instruction": i, "is_classification": k} for i, k in zip(instruction, is_classification)]
        return completion_scorer.optimiser_view([r.reward for r in completion_scorer.score(records, generations)])

    return refine_af_reward


# The judge-exploitation probe: degenerate outputs any instruction admits, scored like real instances.
PROBE_GENERIC_OUTPUT = "Here is a clear, complete and helpful answer to your request."
PROBES = ("instruction copied as the output", "a generic fluent sentence", "its input plus a period",
          "a real base sample")
DEGENERATE_PROBES = PROBES[:3]


def reward_probe(scorer: CompletionScorer, samples: Sequence[dict[str, Any]], reference: float) -> pd.DataFrame:
    """Eq. 1 of degenerate outputs beside a real one, per probe kind, against ``reference`` (stage 2's mean
    content reward): can the reward be earned without doing the task?

    Per held-out instruction (its base generator's ``samples``): the instruction copied as the output, a
    generic fluent sentence (:data:`PROBE_GENERIC_OUTPUT`), the first base instance's input plus a period as
    the output (where it has an input), and that first base instance itself. Returns one row per probe kind:
    ``instructions``, ``mean_reward``, ``share_at_or_above_reference``, ``mean_at_or_above_reference`` and
    ``reference``.
    """
    probes: list[tuple[str, InstanceText]] = []
    base = [s for s in samples if s["generator"] == "base"]
    for instruction in dict.fromkeys(s["instruction"] for s in base):
        probes += [(PROBES[0], InstanceText(instruction, "", instruction)),
                   (PROBES[1], InstanceText(instruction, "", PROBE_GENERIC_OUTPUT))]
        first = next((kept[0] for s in base if s["instruction"] == instruction
                      for kept in [scorer.instances_of(instruction, s["is_classification"],
                                                       Generation(s["text"], s["truncated"], 0))] if kept), None)
        if first is not None:
            if first.input.strip():
                probes.append((PROBES[2], InstanceText(instruction, first.input, first.input.strip() + ".")))
            probes.append((PROBES[3], first))
    texts = [text for _, text in probes]
    columns = {name: np.asarray(s.score(texts)) if texts else np.zeros(0) for name, s in scorer.scorers.items()}
    table = pd.DataFrame({"probe": [kind for kind, _ in probes],
                          "reward": composite_reward(columns, scorer.reward) if texts else np.zeros(0)})
    rows = []
    for kind in PROBES:
        rewards = table.loc[table["probe"] == kind, "reward"].astype(float)
        rows.append({"probe": kind, "instructions": int(len(rewards)),
                     "mean_reward": float(rewards.mean()) if len(rewards) else float("nan"),
                     "share_at_or_above_reference": float((rewards >= reference).mean()) if len(rewards) else float("nan"),
                     "mean_at_or_above_reference": bool(len(rewards) and rewards.mean() >= reference),
                     "reference": reference})
    return pd.DataFrame(rows)


def exploiting_probes(probe: pd.DataFrame) -> list[str]:
    """The degenerate kinds of :func:`reward_probe`'s table whose mean reward reaches its reference."""
    return list(probe.loc[probe["probe"].isin(DEGENERATE_PROBES)
                          & probe["mean_at_or_above_reference"].astype(bool), "probe"])


def probe_verdict(probe: pd.DataFrame) -> str:
    """One sentence: whether a degenerate output's mean reward reaches the reference (stage 2's mean)."""
    reached, reference = exploiting_probes(probe), float(probe["reference"].iloc[0])
    if reached:
        return (f"The reward is exploitable: {', '.join(reached)} scored on average at or above stage 2's "
                f"mean content reward ({reference:.4g}).")
    return (f"No degenerate output reached stage 2's mean content reward ({reference:.4g}) on average; each is "
            "below it (see the share per kind).")
