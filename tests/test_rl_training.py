"""Stage 3 on a tiny Llama with real scorers on tiny models: the shared extraction rule, trl's reward
contract, the held-out split and evaluation, PPO/GRPO/RLOO, resume, determinism, main-process writes."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments
from trl.experimental.utils import get_reward

from refine_af_utils.stages.instance_generation import arm_instances
from refine_af_utils.generation import decode_completion
from refine_af_utils.instances import Instance, extract_instances, instance_prompts
from refine_af_utils.files import append_jsonl
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import params_from_dict
from refine_af_utils.prompts import INSTANCE_STOP_STRINGS
from refine_af_utils.reward import COMPONENTS, build_scorers, content_reward_scale, score_instances, unparsed_reward
from refine_af_utils.rl_reward import CompletionScorer, RefineAFRewardModel
from refine_af_utils.stages.rl_training import MetricsLogger, evaluate_heldout, metrics_callback, split_instructions, train_generator, truncate_metrics
from refine_af_utils.scorers import InstanceText
from refine_af_utils.seeds import load_seed_tasks, write_seed_tasks

YES_NO = "Question: Is this a good response?\nResponse: {output}\nAnswer (Yes or No):"
INSTRUCTIONS = [("Classify the tone as formal or informal.", True), ("Suggest a title for a short story.", False),
                ("Summarise the sentence in five words.", False), ("Decide whether the claim is true or false.", True),
                ("Name a colour that matches the mood.", False), ("Translate the greeting into French.", False)]


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
        # PPO on the attention projections, whole batches, no stop-string cut: the tests' base case (default.yaml's
        # stage 3 is GRPO); a test names what it changes
        "rl": {"algorithm": "ppo", "num_prompts": 4, "heldout_instructions": 2, "heldout_samples": 2, "updates": 2,
               "batch_size": 2, "num_generations": 2, "ppo_epochs": 1, "checkpoint_every": 2, "kl_coef": 0.05,
               "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
               "micro_batch_size": None, "stop_at_stop_strings": False, "activation_checkpointing": True,
               "learning_rate": 1e-3} | rl,
    }


@pytest.fixture
def tiny_run(tmp_path, tiny_llama_dir):
    """A run folder with stage 0, 1 and 2 outputs (stage 2's scores written by hand)."""
    run_dir = tmp_path / "run"
    write_seed_tasks(load_seed_tasks("bundled"), run_dir / "seed_tasks" / "seed_tasks.jsonl")
    append_jsonl(run_dir / "instruction_generation" / "instructions.jsonl", [
        {"id": f"machine_{i}", "instruction": text, "is_classification": clf}
        for i, (text, clf) in enumerate(INSTRUCTIONS)])
    scores = pd.DataFrame({"instruction_id": ["machine_0", "machine_0", "machine_1"], "candidate": [0, 1, 0],
                           **{name: [0.2, 0.6, 0.4] for name in COMPONENTS}})
    (run_dir / "reward_analysis").mkdir(parents=True)
    scores.to_csv(run_dir / "reward_analysis" / "scores.csv", index=False)
    return run_dir


def test_the_parse_penalty_is_measured_in_stage_2_content_sds(tiny_llama_dir, tiny_run):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir, parse_penalty_sd=2.0))
    weight_sum = sum(getattr(params.reward, name).weight for name in COMPONENTS)
    contents = np.array([0.2, 0.6, 0.4]) * weight_sum + params.reward.intercept  # per instance
    per_candidate = np.array([contents[0], contents[1], contents[2]])  # one instance per candidate here
    mean, sd, count = content_reward_scale(tiny_run, params.reward)
    assert count == 3
    assert mean == pytest.approx(per_candidate.mean())
    assert sd == pytest.approx(per_candidate.std(ddof=1))
    assert unparsed_reward(tiny_run, params) == pytest.approx(per_candidate.mean() - 2.0 * per_candidate.std(ddof=1))


@pytest.mark.slow
def test_rl_and_stage_4_extract_identical_instances_from_the_same_completion(tiny_llama_dir):
    """The RL reward (trl's rows continue past the stop string) and stage 4 (generation stopped there)."""
    _, tokenizer = load_causal_lm(params_from_dict(tiny_rl_params(tiny_llama_dir)).model)
    kept_text = "\nInput: 4\nOutput: 8\nExample 2\nInput: 10\nOutput: 20"
    cases = {
        "stopped": (kept_text + "\nTask: Next task\nExample 1\nOutput: 1", kept_text + "\nTask:", 64),
        "truncated": (kept_text + "\nExample 3\nInput: 7\nOutput: 1", None, None),
    }
    for name, (rl_text, stage4_text, limit) in cases.items():
        rl_tokens = tokenizer(rl_text, add_special_tokens=False)["input_ids"]
        stage4_tokens = tokenizer(stage4_text, add_special_tokens=False)["input_ids"] if stage4_text else rl_tokens
        limit = limit or len(rl_tokens)  # "truncated": the completion ends exactly at the token limit
        rl_generation = decode_completion(tokenizer, rl_tokens + [tokenizer.pad_token_id] * 3, limit,
                                          INSTANCE_STOP_STRINGS)
        stage4_generation = decode_completion(tokenizer, stage4_tokens, limit, INSTANCE_STOP_STRINGS)
        record = {"id": "m0", "instruction": "Double the number.", "is_classification": False}
        rl_instances, _ = extract_instances(rl_generation.text, False, rl_generation.truncated)
        stage4 = arm_instances([{**record, "text": stage4_generation.text, "truncated": stage4_generation.truncated}], 5)
        assert [Instance(r.input, r.output) for r in stage4.itertuples()] == rl_instances, name
        assert rl_instances == [Instance("4", "8"), Instance("10", "20")], name  # the cut-off third is dropped
        assert rl_generation.truncated == (name == "truncated")


def test_output_shape_counts_words_and_the_copy_of_instruction_and_input():
    from refine_af_utils.stages.rl_training import output_shape

    copied = InstanceText("Sort the list.", "3 1 2", "Sort the list. 3 1 2")
    answered = InstanceText("Sort the list.", "3 1 2", "1 2 3")
    shape = output_shape([copied, answered])
    assert shape["output_words"] == pytest.approx((6 + 3) / 2)
    # the copy scores ROUGE-L F 1 against "instruction\ninput"; "1 2 3" shares 2 of its 3 tokens in order ("1 2")
    lcs_f = 2 * (2 / 3) * (2 / 6) / ((2 / 3) + (2 / 6))
    assert shape["copy_rouge_l"] == pytest.approx((1.0 + lcs_f) / 2)
    assert all(np.isnan(v) for v in output_shape([]).values())  # nothing kept: undefined, not 0


def test_a_truncated_completion_loses_only_its_last_instance():
    text = "\nInput: 4\nOutput: 8\nExample 2\nInput: 10\nOutput: 2"
    kept, counts = extract_instances(text, False, truncated=True)
    assert kept == [Instance("4", "8")] and counts["cut_by_token_limit"] == 1
    assert extract_instances(text, False, truncated=False)[0] == [Instance("4", "8"), Instance("10", "2")]
    assert extract_instances("no markers", False, truncated=True)[0] == []


@pytest.mark.slow
def test_reward_adapter_matches_the_stage2_reward_through_trls_get_reward(tiny_llama_dir, tiny_run):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    scorers = build_scorers(params.reward)
    completion_scorer = CompletionScorer(scorers, params.reward, unparsed_reward=-0.5)
    _, tokenizer = load_causal_lm(params.model)
    records = [{"instruction": "Suggest a title for a short story.", "is_classification": False},
               {"instruction": "Classify the tone as formal or informal.", "is_classification": True},
               {"instruction": "Suggest a title for a short story.", "is_classification": False}]
    prompts = instance_prompts(records, load_seed_tasks("bundled"), params.instance_generation, 42)
    responses = ["\nOutput: The Last Lighthouse", " Formal\nInput: Dear Sir, I write to you.", " no markers"]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model = RefineAFRewardModel(tokenizer, completion_scorer, list(zip(prompt_ids, records)), max_new_tokens=64)

    pad = tokenizer.pad_token_id
    context = max(len(p) for p in prompt_ids)
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    width = max(len(r) for r in response_ids) + 2
    rows = [[pad] * (context - len(p)) + p + r + [pad] * (width - len(r)) for p, r in zip(prompt_ids, response_ids)]
    _, scores, _ = get_reward(model, torch.tensor(rows), pad, context)  # exactly what trl's PPO calls

    expected_instances = [InstanceText(records[0]["instruction"], "", "The Last Lighthouse"),
                          InstanceText(records[1]["instruction"], "Dear Sir, I write to you.", "Formal")]
    expected = score_instances(scorers, expected_instances, reward=params.reward)["reward"].to_numpy()
    np.testing.assert_allclose(scores.numpy()[:2], expected, rtol=1e-5, atol=1e-6)
    assert scores.numpy()[2] == pytest.approx(-0.5)  # no instance: the unparsed reward, nothing else
    assert [r.parsed for r in completion_scorer.history] == [True, True, False]
    assert np.isnan(completion_scorer.history[2].content)


def test_the_heldout_split_is_seeded_disjoint_and_independent_of_file_order():
    records = [{"id": f"m{i}", "instruction": f"Instruction number {i}.", "is_classification": False}
               for i in range(30)]
    split = split_instructions(records, heldout=8, num_prompts=16, random_seed=42)
    by_name = {r["instruction"]: r["split"] for r in split}
    assert sum(v == "heldout" for v in by_name.values()) == 8
    assert sum(v == "train" for v in by_name.values()) == 16
    assert sum(v == "unused" for v in by_name.values()) == 6
    reversed_split = split_instructions(records[::-1], heldout=8, num_prompts=16, random_seed=42)
    assert {r["instruction"]: r["split"] for r in reversed_split} == by_name
    other_seed = split_instructions(records, heldout=8, num_prompts=16, random_seed=7)
    assert {r["instruction"]: r["split"] for r in other_seed} != by_name
    with pytest.raises(ValueError, match="leaves no training prompt"):
        split_instructions(records, heldout=30, num_prompts=4, random_seed=42)


def test_truncate_metrics_cuts_a_torn_row_and_later_updates(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("update,reward\n1,0.5\n2,0.6\n3,0.7\n4,0.")
    truncate_metrics(path, 3)
    assert path.read_text() == "update,reward\n1,0.5\n2,0.6\n3,0.7\n"
    truncate_metrics(path, 2)
    assert path.read_text() == "update,reward\n1,0.5\n2,0.6\n"
    path.write_text("update,re")
    truncate_metrics(path, 2)
    assert not path.exists()


def test_every_reader_of_metrics_csv_leaves_out_a_torn_row(tmp_path):
    """Issue 24 item 3: the report read a torn last row of rl_training/metrics.csv (second-half reward 0.0284 ->
    0.4642); the stage that resumes the file and the report now read it by one rule (files.read_whole_csv)."""
    import inspect

    from refine_af_utils.files import read_whole_csv
    from refine_af_utils.stages import report

    path = tmp_path / "metrics.csv"
    path.write_text("update,reward\n1,0.02\n2,0.03\n3,0.4642")
    assert read_whole_csv(path)["reward"].tolist() == [0.02, 0.03]
    path.write_text("update,reward\n1,0.02\n2,0.03,9\n")
    assert read_whole_csv(path)["update"].tolist() == [1]
    assert "read_whole_csv(_require(layout.rl_metrics_file))" in inspect.getsource(report)


def test_only_the_main_process_writes_metrics_rows(tmp_path, tiny_llama_dir):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    scorer = CompletionScorer({}, params.reward, unparsed_reward=-0.5)
    logger = MetricsLogger(tmp_path / "metrics.csv", scorer, offset=0, kl_coef=0.1)
    callback = metrics_callback(logger)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    for is_main in (False, True):
        state = TrainerState(is_world_process_zero=is_main, global_step=1)
        callback.on_log(args, state, TrainerControl(), logs={"objective/scores": 0.1, "objective/kl": 2.0})
        assert (tmp_path / "metrics.csv").is_file() == is_main
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 1 and rows.loc[0, "kl_penalty"] == pytest.approx(0.2)


def _metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "rl_training" / "metrics.csv")


@pytest.mark.slow
def test_ppo_two_updates_then_resume_from_the_checkpoint(tiny_llama_dir, tiny_run):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    metrics, adapter_dir = train_generator(params, tiny_run)
    assert list(metrics["update"]) == [1, 2]
    assert metrics[["reward", "parsed_share", "kl", "policy_loss", "value_loss"]].notna().all().all()
    assert (adapter_dir / "adapter_config.json").is_file()
    assert json.loads((tiny_run / "rl_training" / "checkpoints" / "update-2" / "complete").read_text()) == {"updates": 2}
    assert (tiny_run / "rl_training" / "checkpoints" / "update-2" / "value_model").is_dir()
    prompts = pd.read_json(tiny_run / "rl_training" / "prompts.jsonl", lines=True)
    assert sorted(prompts["split"].value_counts().items()) == [("heldout", 2), ("train", 4)]
    after_two = (adapter_dir / "adapter_model.safetensors").read_bytes()

    # A run asked for more updates continues after the last checkpoint instead of starting over.
    more = params_from_dict(tiny_rl_params(tiny_llama_dir, updates=3))
    resumed, _ = train_generator(more, tiny_run)
    assert list(resumed["update"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(resumed.iloc[:2], metrics)
    assert not (tiny_run / "rl_training" / "checkpoints" / "update-2").exists()  # only the newest checkpoint is kept
    after_three = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert after_three != after_two  # the third update trained the adapter further
    train_generator(more, tiny_run)  # complete: nothing is trained again
    assert list(_metrics(tiny_run)["update"]) == [1, 2, 3]
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == after_three
    other = params_from_dict(tiny_rl_params(tiny_llama_dir, updates=3, learning_rate=1e-2))
    with pytest.raises(RuntimeError, match=r"other settings \(rl.learning_rate differ\)"):
        train_generator(other, tiny_run)  # checkpoints of other settings are never resumed silently


@pytest.mark.slow
def test_ppo_with_a_lora_critic_and_micro_batches_trains_resumes_and_saves_only_the_critics_own_tensors(
        tiny_llama_dir, tiny_run):
    from safetensors.torch import load_file

    params = params_from_dict(tiny_rl_params(tiny_llama_dir, critic="lora", micro_batch_size=1, checkpoint_every=1))
    metrics, adapter_dir = train_generator(params, tiny_run)  # two segments: the second resumes the first's critic
    assert list(metrics["update"]) == [1, 2] and (adapter_dir / "adapter_config.json").is_file()
    assert metrics[["reward", "kl", "policy_loss", "value_loss"]].notna().all().all()
    assert metrics["kl"].iloc[0] == pytest.approx(0.0, abs=1e-3)
    saved = load_file(tiny_run / "rl_training" / "checkpoints" / "update-2" / "value_model" / "critic.safetensors")
    assert saved and all("lora_" in name or name.startswith("score.") for name in saved)
    assert any(name.startswith("score.") and tensor.abs().sum() > 0 for name, tensor in saved.items())  # it learnt


@pytest.mark.slow
def test_micro_batches_accumulate_into_one_optimiser_step_per_update_also_at_the_end_of_the_prompts(
        tiny_llama_dir, tiny_run, monkeypatch):
    steps = []
    real_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):  # the real step, counted
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    # 4 prompts in batches of 2: update 2 draws the last batch of the epoch, where accelerate would step per micro-batch
    params = params_from_dict(tiny_rl_params(tiny_llama_dir, micro_batch_size=1, checkpoint_every=2))
    train_generator(params, tiny_run)
    assert len(steps) == 2  # updates x ppo_epochs, one step each


@pytest.mark.slow
def test_ppo_with_the_same_seed_gives_the_same_metrics_and_adapter(tmp_path, tiny_llama_dir, tiny_run):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)
    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    first, first_adapter = train_generator(params, tiny_run)
    second, second_adapter = train_generator(params, twin)
    pd.testing.assert_frame_equal(first, second)
    assert (first_adapter / "adapter_model.safetensors").read_bytes() == (
        second_adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_heldout_evaluation_pairs_base_and_trained_on_unseen_instructions(tiny_llama_dir, tiny_run):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir, updates=1, checkpoint_every=1))
    _, adapter_dir = train_generator(params, tiny_run)
    scorer = CompletionScorer(build_scorers(params.reward), params.reward, unparsed_reward(tiny_run, params))
    result = evaluate_heldout(params, tiny_run, adapter_dir, scorer)
    table = pd.read_csv(tiny_run / "rl_training" / "heldout_eval.csv")
    measures = ["reward", "parsed", "content", *COMPONENTS, "output_words", "copy_rouge_l", "kl_to_base"]  # primary first
    assert list(table.columns) == ["instruction", *[f"{g}_{m}" for m in measures for g in ("base", "trained")]]
    split = pd.read_json(tiny_run / "rl_training" / "prompts.jsonl", lines=True).set_index("instruction")["split"]
    assert set(table["instruction"]) == set(split[split == "heldout"].index)  # never a training prompt
    samples = pd.read_json(tiny_run / "rl_training" / "heldout_samples.jsonl", lines=True)
    assert len(samples) == 2 * 2 * 2  # generators x instructions x samples
    assert list(result.summary["measure"]) == measures
    p_values = result.summary.set_index("measure")["sign_flip_p"]  # NaN only where no pair parsed
    assert 0 < p_values["reward"] <= 1 and (p_values.isna() | p_values.between(0, 1)).all()
    expected = (table["trained_reward"] - table["base_reward"]).mean()
    assert result.summary.loc[0, "mean_difference"] == pytest.approx(expected)
    assert (table["base_kl_to_base"] == 0).all() and table["trained_kl_to_base"].notna().all()
    before = (tiny_run / "rl_training" / "heldout_samples.jsonl").read_text()
    evaluate_heldout(params, tiny_run, adapter_dir, scorer)  # complete: nothing is sampled again
    assert (tiny_run / "rl_training" / "heldout_samples.jsonl").read_text() == before


def test_heldout_kl_to_the_base_is_the_trained_minus_the_base_log_likelihood_of_each_trained_sample(
        tmp_path, tiny_llama_dir, tiny_run):
    """kl_to_base_logratios against an independent computation: the merged trained model's and the plain base
    model's summed token log-likelihoods of the kept text after the prompt (transformers' own loss)."""
    from peft import get_peft_model

    from refine_af_utils.models import encode_prompts, lora_config
    from refine_af_utils.stages.rl_training import kl_to_base_logratios, rl_prompts

    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    base, tokenizer = load_causal_lm(params.model)
    policy = get_peft_model(base, lora_config(params.rl.lora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
    adapter_dir = tmp_path / "adapter"
    policy.save_pretrained(adapter_dir)
    heldout = [r for r in rl_prompts(params, tiny_run) if r["split"] == "heldout"]
    samples = [{"generator": g, "instruction": r["instruction"], "text": text}
               for r in heldout for g, text in (("base", "Output: 12"), ("trained", "Input: a cat\nOutput: yes"),
                                                ("trained", ""))]
    ratios = kl_to_base_logratios(params, tiny_run, adapter_dir, samples)

    def log_likelihood(model, prompt: str, text: str) -> float:
        prompt_ids = encode_prompts(tokenizer, prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + tokenizer(text, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[0, :len(prompt_ids)] = -100
        with torch.no_grad():
            return -float(model(input_ids=ids, labels=labels).loss) * (ids.shape[1] - len(prompt_ids))

    merged = policy.merge_and_unload()
    plain, _ = load_causal_lm(params.model)
    prompts = {r["instruction"]: r["prompt"] for r in heldout}
    for sample, ratio in zip(samples, ratios):
        if sample["generator"] == "base" or not sample["text"]:
            assert ratio == 0.0
        else:
            expected = (log_likelihood(merged, prompts[sample["instruction"]], sample["text"])
                        - log_likelihood(plain, prompts[sample["instruction"]], sample["text"]))
            assert ratio == pytest.approx(expected, abs=1e-3) and abs(expected) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_run_one_step(tiny_llama_dir, tiny_run, algorithm):
    params = params_from_dict(tiny_rl_params(tiny_llama_dir, algorithm=algorithm, updates=1, stop_at_stop_strings=True,
                                             scale_rewards="batch"))
    metrics, adapter_dir = train_generator(params, tiny_run)
    assert list(metrics["update"]) == [1]
    assert np.isfinite(metrics.loc[0, ["reward", "parsed_share", "unparsed_reward"]].astype(float)).all()
    assert (adapter_dir / "adapter_config.json").is_file()


@pytest.mark.slow
def test_grpo_micro_batches_give_the_whole_batchs_rollouts_and_update(tmp_path, tiny_llama_dir, tiny_run):
    """``rl.micro_batch_size`` splits GRPO's backward into prompts' groups (less memory) and accumulates them into
    the update of the whole batch: the same rollouts and, up to float summation order, the same adapter."""
    import shutil

    from safetensors.torch import load_file, save_file

    from refine_af_utils.layout import RL_CHECKPOINT, RunLayout

    common = {"algorithm": "grpo", "checkpoint_every": 1, "kl_coef": 0.1, "scale_rewards": "batch"}
    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)
    runs = {"whole": (tiny_run, {}), "micro": (twin, {"micro_batch_size": 1})}
    starts = {}
    for name, (run_dir, micro_rl) in runs.items():
        train_generator(params_from_dict(tiny_rl_params(tiny_llama_dir, updates=1, **common, **micro_rl)), run_dir)
        # The tiny model parses nothing, so every advantage is 0: start update 2 from an adapter with B != 0, which
        # the KL term pulls back towards the base, so there is a gradient to accumulate.
        saved = (RunLayout(run_dir).rl_checkpoints / RL_CHECKPOINT.format(update=1) / "adapter"
                 / "adapter_model.safetensors")
        generator = torch.Generator().manual_seed(0)
        starts[name] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v
                        for k, v in load_file(saved).items()}
        save_file(starts[name], saved)
    start = starts["whole"]
    assert all(torch.equal(starts["micro"][name], tensor) for name, tensor in start.items())
    (whole, whole_adapter), (micro, micro_adapter) = (
        train_generator(params_from_dict(tiny_rl_params(tiny_llama_dir, updates=2, **common, **micro_rl)), run_dir)
        for run_dir, micro_rl in runs.values())
    assert list(micro["update"]) == [1, 2]  # one optimiser step per update, not one per micro-batch
    pd.testing.assert_frame_equal(whole[["reward", "parsed_share"]], micro[["reward", "parsed_share"]])
    assert micro["kl"].iloc[1] == pytest.approx(whole["kl"].iloc[1], rel=1e-4) and whole["kl"].iloc[1] > 1e-4
    weights = load_file(whole_adapter / "adapter_model.safetensors")
    micro_weights = load_file(micro_adapter / "adapter_model.safetensors")
    assert weights.keys() == micro_weights.keys() == start.keys()
    assert any(not torch.equal(weights[name], start[name]) for name in weights)  # update 2 moved the adapter
    for name, tensor in weights.items():
        torch.testing.assert_close(micro_weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("patched", [True, False])
def test_ppo_rollout_logprobs_equal_the_reference_with_a_fresh_adapter(tiny_llama_dir, dtype, patched):
    """At update 1 (LoRA B = 0) policy and reference are one model: trl's rollout log-probs, as stage 3 runs trl,
    must equal its reference log-probs per token, so the KL starts at 0. Without the package's forward-based
    rollout log-probs, bfloat16 fails this (generate()'s KV-cached scores round otherwise); float32 passes both."""
    import contextlib

    import trl.experimental.ppo.ppo_trainer as ppo
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, GenerationConfig

    from refine_af_utils import trl_bridge
    from refine_af_utils.models import encode_prompts, lora_config

    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    spec = params.model.__class__(**{**params.to_dict()["model"], "dtype": dtype})
    base, tokenizer = load_causal_lm(spec)
    policy = get_peft_model(base, lora_config(params.rl.lora))
    policy.train()
    prompts = ["Instruction: Sort the numbers.\nInput:",
               "Instruction: Is this positive?\nOutput: yes\n\nInstruction: Name a colour.\nInput:"]  # unequal: padded
    queries = DataCollatorWithPadding(tokenizer)(
        [{"input_ids": encode_prompts(tokenizer, p)["input_ids"]} for p in prompts])["input_ids"]
    context, temperature = queries.shape[1], params.instance_generation.temperature
    generation = GenerationConfig(max_new_tokens=24, temperature=temperature + 1e-7, top_k=0, top_p=1.0, do_sample=True)
    torch.manual_seed(0)
    with trl_bridge.ppo_logprobs_from_forward() if patched else contextlib.nullcontext():
        query_responses, logits = ppo.batch_generation(policy, queries, len(prompts), tokenizer.pad_token_id, generation)
    response = query_responses[:, context:]
    logprob = ppo.selective_log_softmax(logits, response)
    with torch.no_grad(), policy.disable_adapter():  # trl's reference path, as in PPOTrainer.train
        reference = ppo.forward(policy, query_responses, tokenizer.pad_token_id).logits[:, context - 1:-1]
        reference /= temperature + 1e-7
        ref_logprob = ppo.selective_log_softmax(reference, response)
    ends = ppo.first_true_indices(ppo.truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id, response)
                                  == tokenizer.pad_token_id) - 1
    valid = torch.arange(response.shape[1]) <= ends.unsqueeze(1)
    gap = (logprob - ref_logprob).float()[valid].abs().max().item()
    kl = ((logprob - ref_logprob).float() * valid).sum(1).mean().item()
    if patched or dtype == "float32":
        assert gap <= 1e-5 and kl >= -1e-3, (gap, kl)
    else:  # the bug the patch fixes is real: without it, bf16 rollout and reference disagree
        assert gap > 1e-3, gap


def test_a_rollout_ends_at_its_first_stop_string_and_keeps_its_reward(tiny_llama_dir):
    """rl.stop_at_stop_strings: the tokens after the one completing a stop string become padding, and the
    kept tokens decode (with the shared rule) to the same text and truncation flag as the whole rollout."""
    import trl.experimental.ppo.ppo_trainer as ppo

    from refine_af_utils import trl_bridge
    from refine_af_utils.generation import decode_completion
    from refine_af_utils.prompts import INSTANCE_STOP_STRINGS

    _, tokenizer = load_causal_lm(params_from_dict(tiny_rl_params(tiny_llama_dir)).model)
    stopped = tokenizer("a list of numbers\nOutput: 1, 2, 3\nTask: write more and more words here",
                        add_special_tokens=False)["input_ids"]
    plain = tokenizer("yes it is fine", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    end = trl_bridge.stop_string_end(tokenizer, stopped, INSTANCE_STOP_STRINGS)
    assert "\nTask:" in tokenizer.decode(stopped[:end]) and "\nTask:" not in tokenizer.decode(stopped[:end - 1])
    assert end < len(stopped) and trl_bridge.stop_string_end(tokenizer, plain, INSTANCE_STOP_STRINGS) is None
    width, pad = max(len(stopped), len(plain)), tokenizer.pad_token_id
    responses = torch.tensor([row + [pad] * (width - len(row)) for row in (stopped, plain)])
    with trl_bridge.ppo_rollouts_end_at_stop_strings(tokenizer, INSTANCE_STOP_STRINGS):
        truncated = ppo.truncate_response(tokenizer.eos_token_id, pad, responses)
    assert ppo.truncate_response is not None and truncated[0, :end].tolist() == stopped[:end]
    assert set(truncated[0, end:].tolist()) == {pad}  # the tail: no score, no advantage, no KL
    assert truncated[1].tolist() == responses[1].tolist()  # no stop string: trl's own end-token rule only
    whole = decode_completion(tokenizer, stopped, len(stopped), INSTANCE_STOP_STRINGS)
    kept = decode_completion(tokenizer, truncated[0].tolist(), len(stopped), INSTANCE_STOP_STRINGS)
    assert (kept.text, kept.truncated) == (whole.text, whole.truncated) == ("a list of numbers\nOutput: 1, 2, 3", False)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_a_resumed_group_segment_keeps_the_base_as_its_kl_reference(tiny_llama_dir, tiny_run, algorithm):
    """Segment 2 starts from segment 1's adapter: its first update's KL is to the base (> 0), not to that adapter
    (trl's own "ref" copy gave 0), and the saved checkpoint holds the policy's adapter alone."""
    from safetensors.torch import load_file, save_file

    from refine_af_utils.layout import RL_CHECKPOINT, RunLayout

    first = params_from_dict(tiny_rl_params(tiny_llama_dir, algorithm=algorithm, updates=1, checkpoint_every=1,
                                            kl_coef=0.1))
    metrics, _ = train_generator(first, tiny_run)
    assert metrics["kl"].iloc[0] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter: policy equals the base
    # The tiny model parses nothing, so every reward is equal and update 1 leaves the adapter at B = 0: give the
    # checkpoint a trained-looking adapter (B != 0) before the next segment resumes from it.
    saved = RunLayout(tiny_run).rl_checkpoints / RL_CHECKPOINT.format(update=1) / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v
               for k, v in load_file(saved).items()}
    save_file(tensors, saved)
    metrics, adapter_dir = train_generator(params_from_dict(tiny_rl_params(
        tiny_llama_dir, algorithm=algorithm, updates=2, checkpoint_every=1, kl_coef=0.1)), tiny_run)
    assert list(metrics["update"]) == [1, 2]
    # to the base, which the adapter moved away from (RLOO logs a sampled log-ratio, which may come out below 0)
    assert abs(metrics["kl"].iloc[1]) > 1e-4, metrics["kl"].tolist()
    assert not (adapter_dir / "ref").exists()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_completions_end_at_their_first_stop_string(tiny_llama_dir, tmp_path, algorithm):
    """rl.stop_at_stop_strings under GRPO/RLOO: the real trainer's sampled token lists are cut after the token
    completing the first stop string (so the tail gets no advantage), the others are left whole, and the
    trainer's own method is back after the block."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from refine_af_utils import trl_bridge
    from refine_af_utils.prompts import INSTANCE_STOP_STRINGS

    model, tokenizer = load_causal_lm(params_from_dict(tiny_rl_params(tiny_llama_dir)).model)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    Config, Trainer = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    # A newline bias on the random tiny model: some samples reach "\n\n\n" (a stop string) within 12 tokens, some not.
    config = Config(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=12, report_to=[], seed=0, generation_kwargs={"sequence_bias": [[newline, 5.0]]})

    def zero(completions, **_):
        return [0.0] * len(completions)

    trainer = Trainer(model=model, reward_funcs=[zero], args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_list([{"prompt": "Write a list."}] * 4))
    prompt_ids = [tokenizer("Write a list of colours.", add_special_tokens=False)["input_ids"]] * 16

    def sample() -> list[list[int]]:
        torch.manual_seed(0)
        out = trainer._generate_single_turn(prompt_ids, None, {})
        return [list(ids) for ids in (out[0] if isinstance(out, tuple) else out)]

    whole = sample()
    with trl_bridge.group_rollouts_end_at_stop_strings(trainer, tokenizer, INSTANCE_STOP_STRINGS):
        cut = sample()
    assert "_generate_single_turn" not in vars(trainer) and sample() == whole  # the class's method again
    ends = [trl_bridge.stop_string_end(tokenizer, ids, INSTANCE_STOP_STRINGS) for ids in whole]
    assert any(e is not None and e < len(w) for e, w in zip(ends, whole)) and None in ends  # both cases occur
    assert cut == [w if e is None else w[:e] for w, e in zip(whole, ends)]


def test_the_optimiser_view_standardises_or_shuffles_and_leaves_eq1_alone_by_default():
    from refine_af_utils.rl_reward import OptimiserView

    rewards = [0.01, 0.05, -0.03, 0.02]
    assert OptimiserView()(rewards) == rewards  # the default: Eq. 1 exactly
    standardised = OptimiserView(shift=0.02, scale=0.04)(rewards)
    assert standardised == pytest.approx([-0.25, 0.75, -1.25, 0.0])  # positive affine: the order is kept
    placebo = OptimiserView(placebo_seed=7)
    shuffled = [placebo(rewards) for _ in range(5)]
    assert all(sorted(s) == sorted(rewards) for s in shuffled) and any(s != rewards for s in shuffled)
    again = OptimiserView(placebo_seed=7)
    assert [again(rewards) for _ in range(5)] == shuffled  # seeded: the same shuffles on a rerun
    with pytest.raises(ValueError, match="scale must be > 0"):
        OptimiserView(scale=0.0)


@pytest.mark.slow
def test_ppo_with_a_standardised_reward_stop_strings_and_the_placebo_trains_and_logs_in_eq1_units(tiny_llama_dir,
                                                                                                tiny_run):
    from refine_af_utils.reward import content_reward_scale

    params = params_from_dict(tiny_rl_params(tiny_llama_dir, standardise_reward=True, stop_at_stop_strings=True,
                                             placebo=True))
    metrics, adapter_dir = train_generator(params, tiny_run)
    assert list(metrics["update"]) == [1, 2] and (adapter_dir / "adapter_config.json").is_file()
    assert metrics["kl"].iloc[0] == pytest.approx(0.0, abs=1e-3)  # KL starts at 0 whatever the reward's view
    _, sd, _ = content_reward_scale(tiny_run, params.reward)
    assert metrics["kl_penalty"].tolist() == pytest.approx((params.rl.kl_coef * sd * metrics["kl"]).tolist())
    assert metrics["reward"].between(-1, 1).all()  # the logged reward is Eq. 1's, not SD units


@pytest.mark.slow  # the tiny model's scorers
def test_the_reward_probe_scores_degenerate_outputs_like_real_instances(tiny_llama_dir):
    from refine_af_utils.rl_reward import PROBE_GENERIC_OUTPUT, PROBES, probe_verdict, reward_probe

    params = params_from_dict(tiny_rl_params(tiny_llama_dir))
    scorers = build_scorers(params.reward)
    scorer = CompletionScorer(scorers, params.reward, unparsed_reward=-0.5)
    samples = [{"generator": "base", "instruction": "Add the numbers.", "is_classification": False,
                "text": "\nInput: 2 and 3\nOutput: 5\n", "truncated": False},
               {"generator": "base", "instruction": "Name a colour.", "is_classification": False,
                "text": " no markers at all", "truncated": False},
               {"generator": "trained", "instruction": "Add the numbers.", "is_classification": False,
                "text": "\nInput: 4 and 4\nOutput: 8\n", "truncated": False}]  # the trained side is not probed
    probe = reward_probe(scorer, samples, reference=0.01).set_index("probe")
    assert list(probe.index) == list(PROBES)
    assert probe["instructions"].tolist() == [2, 2, 1, 1]  # "Name a colour." parsed nothing: no input, no sample
    expected = score_instances(scorers, [
        InstanceText("Add the numbers.", "", "Add the numbers."), InstanceText("Name a colour.", "", "Name a colour."),
        InstanceText("Add the numbers.", "", PROBE_GENERIC_OUTPUT), InstanceText("Name a colour.", "", PROBE_GENERIC_OUTPUT),
        InstanceText("Add the numbers.", "2 and 3", "2 and 3."), InstanceText("Add the numbers.", "2 and 3", "5"),
    ], reward=params.reward)["reward"].to_numpy()
    got = probe["mean_reward"].to_numpy()
    np.testing.assert_allclose(got, [expected[:2].mean(), expected[2:4].mean(), expected[4], expected[5]], rtol=1e-5)
    low, high = min(got[:3]) - 1.0, max(got[:3]) + 1.0  # the verdict follows the reference
    assert probe_verdict(reward_probe(scorer, samples, low)).startswith("The reward is exploitable")
    assert probe_verdict(reward_probe(scorer, samples, high)).startswith("No degenerate output")
