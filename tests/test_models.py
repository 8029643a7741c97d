import pytest
import torch
from transformers import AutoTokenizer

from refine_af_utils.generation import PresencePenaltyLogitsProcessor, cut_at_stop, generate_batch
from refine_af_utils.models import (
    ModelNotFoundError,
    embedded_encoder_dir,
    embedded_llm_dir,
    ensure_distinct_pad_token,
    load_causal_lm,
    lora_config,
    prepare_embedded_models,
    resolve_model_path,
)
from refine_af_utils.params import LoraParams, ModelParams, RLParams, SFTParams


def test_missing_local_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-model"))
    with pytest.raises(ModelNotFoundError, match="unknown embedded model"):
        resolve_model_path("embedded:gpt-5")
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"  # hub ids pass through


def test_one_lora_builder_reads_the_rl_and_sft_lora_sections():
    rl = lora_config(LoraParams(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (rl.r, rl.lora_alpha, rl.lora_dropout, rl.bias, rl.task_type) == (4, 8, 0.1, "none", "CAUSAL_LM")
    assert rl.target_modules == {"q_proj", "v_proj"}
    sft = lora_config(SFTParams().lora)  # peft's "all-linear" shorthand stays a string
    assert (sft.r, sft.lora_alpha, sft.lora_dropout, sft.target_modules) == (16, 32, 0.05, "all-linear")
    assert lora_config(LoraParams(target_modules=["o_proj"])).target_modules == {"o_proj"}
    assert lora_config(RLParams().lora, task_type="SEQ_CLS").task_type == "SEQ_CLS"


@pytest.mark.slow
def test_tiny_model_gets_a_pad_token_distinct_from_eos(tiny_llama_dir):
    raw = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert raw.pad_token_id is None or raw.pad_token_id == raw.eos_token_id
    model, tokenizer = load_causal_lm(ModelParams(name_or_path=str(tiny_llama_dir), dtype="float32"))
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"
    assert not model.training


@pytest.mark.slow
def test_pad_token_is_added_when_the_vocabulary_has_no_endoftext(tiny_llama_dir):
    model, tokenizer = load_causal_lm(ModelParams(name_or_path=str(tiny_llama_dir), dtype="float32"))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": []})
    vocab_before = len(tokenizer)
    # Pretend <|endoftext|> is the end token: then a new <pad> must be added and embeddings grow.
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    ensure_distinct_pad_token(tokenizer, model)
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == vocab_before + 1
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)


@pytest.mark.slow
def test_embedded_models_are_prepared_offline():
    folder = prepare_embedded_models()
    assert folder == embedded_llm_dir() and (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert (embedded_encoder_dir() / "model.safetensors").is_file()


def test_presence_penalty_hits_only_tokens_already_generated():
    processor = PresencePenaltyLogitsProcessor(penalty=2.0, prompt_length=2)
    input_ids = torch.tensor([[0, 1, 3, 3], [1, 1, 4, 2]])
    scores = torch.zeros(2, 6)
    out = processor(input_ids, scores)
    assert out[0].tolist() == [0, 0, 0, -2, 0, 0]  # token 3 once, however often it appeared
    assert out[1].tolist() == [0, 0, -2, 0, -2, 0]  # prompt tokens (0, 1) are not penalised
    assert processor(input_ids[:, :2], scores).tolist() == scores.tolist()


def test_cut_at_stop():
    assert cut_at_stop("a\n10. b\n\nc", ["\n\n", "\n16."]) == ("a\n10. b", True)
    assert cut_at_stop("abc", ["\n\n"]) == ("abc", False)


@pytest.mark.slow
def test_generate_batch_marks_truncation_and_is_greedy_deterministic(tiny_llama_dir):
    model, tokenizer = load_causal_lm(ModelParams(name_or_path=str(tiny_llama_dir), dtype="float32"))
    prompts = ["Come up with a series of tasks:\n1.", "Classify"]
    first = generate_batch(model, tokenizer, prompts, max_new_tokens=8)
    second = generate_batch(model, tokenizer, prompts, max_new_tokens=8)
    assert [g.text for g in first] == [g.text for g in second]
    assert all(g.truncated and g.num_tokens == 8 for g in first)  # a random model never stops by itself
    with pytest.raises(ValueError, match="padding_side"):
        tokenizer.padding_side = "right"
        generate_batch(model, tokenizer, prompts, max_new_tokens=2)
