"""Stage 3 on a tiny Llama with real scorers on tiny models: PPO, GRPO, RLOO, resume, trl's reward contract."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from trl.experimental.utils import get_reward

from refine_af_utils.instances import instance_prompts
from refine_af_utils.jsonl import append_jsonl
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import params_from_dict
from refine_af_utils.reward import COMPONENTS, build_scorers, composite_reward, score_instances
from refine_af_utils.rl import CompletionScorer, RefineAFRewardModel, grpo_reward_functions, train_generator
from refine_af_utils.scorers import InstanceText
from refine_af_utils.seeds import load_seed_tasks, write_seed_tasks

YES_NO = "Question: Is this a good response?\nResponse: {output}\nAnswer (Yes or No):"


def tiny_rl_params(tiny_llama_dir: Path, **rl) -> dict:
    scorer = {"kind": "yes_no", "model": str(tiny_llama_dir), "template": YES_NO, "max_length": 256}
    return {
        "run_name": "tiny-rl",
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "instance_generation": {"batch_size": 4, "max_new_tokens": 12, "num_demonstrations": 1},
        "reward": {
            "reward_model": scorer | {"weight": 0.0078},
            "understandability": scorer | {"weight": -0.4421},
            "naturalness": scorer | {"weight": 0.3212, "template": "Natural?\n{output}\nAnswer:"},
            "coherence": {"kind": "lm_fluency", "model": str(tiny_llama_dir), "template": "{prompt}\n",
                          "pair_template": "{output}", "weight": 0.1520, "max_length": 256},
            "intercept": 0.1,
        },
        "rl": {"num_prompts": 4, "updates": 2, "batch_size": 2, "num_generations": 2, "ppo_epochs": 1,
               "response_length": 8, "checkpoint_every": 2, "lora_r": 4, "lora_alpha": 8} | rl,
    }


@pytest.fixture
def tiny_run(tmp_path, tiny_llama_dir):
    run_dir = tmp_path / "run"
    write_seed_tasks(load_seed_tasks("bundled"), run_dir / "seeds" / "seed_tasks.jsonl")
    append_jsonl(run_dir / "instructions" / "instructions.jsonl", [
        {"id": f"machine_{i}", "instruction": text, "is_classification": clf}
        for i, (text, clf) in enumerate([("Classify the tone as formal or informal.", True),
                                         ("Suggest a title for a short story.", False),
                                         ("Summarise the sentence in five words.", False),
                                         ("Decide whether the claim is true or false.", True)])
    ])
    return run_dir


def test_reward_adapter_matches_the_stage2_reward_through_trls_get_reward(tiny_llama_dir, tiny_run):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    scorers = build_scorers(params.reward)
    completion_scorer = CompletionScorer(scorers, params.reward, invalid_reward=-1.0)
    _, tokenizer = load_causal_lm(params.model)
    records = [{"instruction": "Suggest a title for a short story.", "is_classification": False},
               {"instruction": "Classify the tone as formal or informal.", "is_classification": True}]
    prompts = instance_prompts(records, load_seed_tasks("bundled"), params.instance_generation, 42)
    responses = ["\nOutput: The Last Lighthouse", " Formal\nInput: Dear Sir, I write to you."]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model = RefineAFRewardModel(tokenizer, completion_scorer, list(zip(prompt_ids, records)))

    pad = tokenizer.pad_token_id
    context = max(len(p) for p in prompt_ids)
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    width = max(len(r) for r in response_ids) + 2
    rows = [[pad] * (context - len(p)) + p + r + [pad] * (width - len(r)) for p, r in zip(prompt_ids, response_ids)]
    query_responses = torch.tensor(rows)
    _, scores, _ = get_reward(model, query_responses, pad, context)  # exactly what trl's PPO calls

    expected_instances = [InstanceText(records[0]["instruction"], "", "The Last Lighthouse"),
                          InstanceText(records[1]["instruction"], "Dear Sir, I write to you.", "Formal")]
    expected = score_instances(scorers, expected_instances, reward=params.reward)["reward"].to_numpy()
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert all(r.parsed for r in model.history)

    unparseable = completion_scorer.score([records[0]], ["no markers here"])[0]
    raw = score_instances(scorers, [InstanceText(records[0]["instruction"], "", "no markers here")])
    assert not unparseable.parsed
    assert unparseable.reward == pytest.approx(float(composite_reward(raw, params.reward)[0]) - 1.0)


def test_grpo_reward_functions_weight_to_the_composite(tiny_llama_dir):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    completion_scorer = CompletionScorer(build_scorers(params.reward), params.reward, invalid_reward=-1.0)
    functions, weights = grpo_reward_functions(completion_scorer)
    assert [f.__name__ for f in functions] == [*COMPONENTS, "parse_penalty"]
    completions = ["\nOutput: A quiet harbour", "nothing to parse"]
    columns = dict(instruction=["Suggest a title.", "Suggest a title."], is_classification=[False, False])
    values = np.array([f(prompts=["p", "p"], completions=completions, **columns) for f in functions])
    total = params.reward.intercept + weights @ values
    expected = [r.reward for r in completion_scorer.score(
        [{"instruction": "Suggest a title.", "is_classification": False}] * 2, completions)]
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def _metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "rl" / "metrics.csv")


def test_ppo_two_updates_then_resume_from_the_checkpoint(tiny_llama_dir, tiny_run):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    result = train_generator(params, tiny_run)
    metrics = _metrics(tiny_run)
    assert list(metrics["update"]) == [1, 2]
    assert metrics[["reward", "kl", "policy_loss", "value_loss", *COMPONENTS]].notna().all().all()
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert json.loads((tiny_run / "rl" / "checkpoints" / "update-2" / "complete").read_text()) == {"updates": 2}
    assert (tiny_run / "rl" / "checkpoints" / "update-2" / "value_model").is_dir()
    after_two = (result.adapter_dir / "adapter_model.safetensors").read_bytes()

    # A run asked for more updates continues after the last checkpoint instead of starting over.
    more = params_from_dict(tiny_rl_params(tiny_llama_dir, updates=3))
    train_generator(more, tiny_run)
    resumed = _metrics(tiny_run)
    assert list(resumed["update"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(resumed.iloc[:2], metrics)
    assert not (tiny_run / "rl" / "checkpoints" / "update-2").exists()  # only the newest checkpoint is kept
    after_three = (result.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert after_three != after_two  # the third update trained the adapter further
    train_generator(more, tiny_run)  # complete: nothing is trained again
    assert list(_metrics(tiny_run)["update"]) == [1, 2, 3]
    assert (result.adapter_dir / "adapter_model.safetensors").read_bytes() == after_three
    other = params_from_dict(tiny_rl_params(tiny_llama_dir, updates=3, learning_rate=1e-3))
    with pytest.raises(RuntimeError, match=r"other settings \(rl differ\)"):
        train_generator(other, tiny_run)  # checkpoints of other settings are never resumed silently


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_run_one_step(tiny_llama_dir, tiny_run, algorithm):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir, algorithm=algorithm, updates=1))
    result = train_generator(params, tiny_run)
    metrics = _metrics(tiny_run)
    assert list(metrics["update"]) == [1]
    assert np.isfinite(metrics.loc[0, ["reward", *COMPONENTS, "parsed_share"]].astype(float)).all()
    assert (result.adapter_dir / "adapter_config.json").is_file()
