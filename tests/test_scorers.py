"""Every scorer kind on tiny random models built from a config; the reward is the weighted sum."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from refine_af_utils.params import UNIEVAL_QUESTIONS, RewardParams, ScorerParams, paper_reward_params
from refine_af_utils.reward import COMPONENTS, composite_reward, score_instances
from refine_af_utils.scorers import (
    GPTNeoXRewardModel,
    InstanceText,
    ScoringError,
    build_scorer,
    load_gpt_neox_reward_model,
)

INSTANCES = [
    InstanceText("Classify the sentiment of the review.", "I loved every minute.", "Positive"),
    InstanceText("Suggest a name for a bakery.", "", "Crumb and Crust, a name that sounds warm and local."),
    InstanceText("Summarise the passage in one sentence.", "The council voted to build a new library " * 6,
                 "The council approved a library."),
    InstanceText("Say hi.", "", "Hi!"),
]


def _tokenizer_into(folder: Path, tiny_llama_dir: Path) -> None:
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)


@pytest.fixture(scope="module")
def oasst_layout_dir(tmp_path_factory, tiny_llama_dir):
    """A tiny checkpoint in OpenAssistant's gpt_neox_reward_model layout (custom model type, out_proj head)."""
    folder = tmp_path_factory.mktemp("oasst-rm")
    _tokenizer_into(folder, tiny_llama_dir)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, rotary_pct=0.25)
    torch.manual_seed(1)
    model = GPTNeoXRewardModel(config)
    with torch.no_grad():
        model.out_proj.bias.fill_(0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    data = config.to_dict() | {"model_type": "gpt_neox_reward_model", "architectures": ["GPTNeoXRewardModel"],
                               "pooling": "last"}
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def hf_classifier_dir(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("hf-rm")
    _tokenizer_into(folder, tiny_llama_dir)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(2)
    GPTNeoXForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("t5")
    _tokenizer_into(folder, tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id or 0)
    torch.manual_seed(3)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sentence_encoder_dir(tmp_path_factory):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertTokenizerFast

    base = tmp_path_factory.mktemp("bert")
    words = sorted({w.lower().strip(".,!") for i in INSTANCES for w in f"{i.prompt} {i.output}".split()})
    (base / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(base / "vocab.txt"))
    torch.manual_seed(4)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    folder = tmp_path_factory.mktemp("st")
    SentenceTransformer(modules=[Transformer(str(base)), Pooling(32, "mean")]).save(str(folder))
    return folder


def _spec(kind, model, template, **extra):
    return ScorerParams(kind=kind, model=str(model), template=template, weight=1.0, batch_size=3, **extra)


CAUSAL_YES_NO = "Question: Is this a natural response?\nResponse: {output}\nAnswer (Yes or No):"


@pytest.fixture(scope="module")
def every_scorer(oasst_layout_dir, hf_classifier_dir, t5_dir, sentence_encoder_dir, tiny_llama_dir):
    return {
        "oasst_layout": build_scorer("rm", _spec("sequence_classification", oasst_layout_dir,
                                                 "<|prompter|>{prompt}<|endoftext|><|assistant|>{output}<|endoftext|>")),
        "hf_classifier": build_scorer("rm2", _spec("sequence_classification", hf_classifier_dir, "{prompt}\n{output}")),
        "t5_yes_no": build_scorer("nat", _spec("yes_no", t5_dir, UNIEVAL_QUESTIONS["naturalness"])),
        "causal_yes_no": build_scorer("und", _spec("yes_no", tiny_llama_dir, CAUSAL_YES_NO)),
        "embedding": build_scorer("coh", _spec("embedding_similarity", sentence_encoder_dir, "{context}",
                                               pair_template="{output}")),
        "fluency": build_scorer("flu", _spec("lm_fluency", tiny_llama_dir, "{prompt}\n", pair_template="{output}")),
    }


@pytest.mark.parametrize("name", ["oasst_layout", "hf_classifier", "t5_yes_no", "causal_yes_no", "embedding", "fluency"])
@pytest.mark.slow
def test_scorer_shape_range_determinism_and_batch_invariance(every_scorer, name):
    scorer = every_scorer[name]
    scores = scorer.score(INSTANCES, progress=False)
    assert scores.shape == (len(INSTANCES),) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    if scorer.bounded:
        assert ((scores >= 0) & (scores <= 1)).all()
    scorer._cache.clear()
    assert np.array_equal(scorer.score(INSTANCES, progress=False), scores)
    scorer._cache.clear()
    alone = np.array([scorer.score([i], progress=False)[0] for i in INSTANCES])
    np.testing.assert_allclose(alone, scores, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(scores, 6))) > 1  # the texts do not all score alike


@pytest.mark.slow
def test_oasst_layout_loader_pools_the_last_attended_token(oasst_layout_dir):
    model = load_gpt_neox_reward_model(oasst_layout_dir)
    assert model.pooling == "last" and model.out_proj.bias.item() == 0.5
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batched = model(ids, mask)[:, 0]
    assert batched.shape == (2,)
    alone = model(ids[:1, :3], mask[:1, :3])[0, 0]
    torch.testing.assert_close(batched[0], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_oasst_loader_rejects_another_layout(tmp_path, oasst_layout_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((oasst_layout_dir / name).read_bytes())
    save_file({"score.weight": torch.zeros(1, 32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not match the gpt_neox_reward_model layout"):
        load_gpt_neox_reward_model(tmp_path)


@pytest.mark.slow
def test_yes_no_is_p_yes_over_p_yes_plus_p_no(every_scorer):
    scorer = every_scorer["t5_yes_no"]
    text = scorer.format(INSTANCES[0])
    encoded = scorer.tokenizer([text], return_tensors="pt")
    start = torch.tensor([[scorer.model.config.decoder_start_token_id]])
    with torch.no_grad():
        probs = torch.softmax(scorer.model(**encoded, decoder_input_ids=start).logits[0, 0], -1)
    yes, no = probs[scorer.yes_ids].sum(), probs[scorer.no_ids].sum()
    scorer._cache.clear()
    assert scorer.score(INSTANCES[:1], progress=False)[0] == pytest.approx(float(yes / (yes + no)), rel=1e-5)


def test_unieval_questions_are_pinned():
    output, context = "Sure, here it is.", "Say hi.\nHello"
    assert UNIEVAL_QUESTIONS["naturalness"].format(output=output) == (
        "question: Is this a natural response in the dialogue? </s> response: Sure, here it is.")
    assert UNIEVAL_QUESTIONS["coherence"].format(output=output, context=context) == (
        "question: Is this a coherent response given the dialogue history? </s> response: Sure, here it is. "
        "</s> dialogue history: Say hi.\nHello")
    assert UNIEVAL_QUESTIONS["understandability"].format(output=output) == (
        "question: Is this an understandable response in the dialogue? </s> response: Sure, here it is.")
    paper = paper_reward_params()  # RewardParams() holds default.yaml's offline stand-ins
    assert paper.reward_model.model == "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"
    assert paper.reward_model.template.format(prompt="Q", output="A") == (
        "<|prompter|>Q<|endoftext|><|assistant|>A<|endoftext|>")
    assert paper.understandability.weight == -0.4421


def test_composite_reward_is_the_weighted_sum():
    reward = RewardParams()
    reward.intercept = 0.25
    parts = {"reward_model": [2.0, -1.0], "understandability": [0.5, 1.0], "naturalness": [0.1, 0.0],
             "coherence": [1.0, 0.2]}
    expected = [0.25 + 0.0078 * 2.0 - 0.4421 * 0.5 + 0.3212 * 0.1 + 0.1520 * 1.0,
                0.25 + 0.0078 * -1.0 - 0.4421 * 1.0 + 0.3212 * 0.0 + 0.1520 * 0.2]
    np.testing.assert_allclose(composite_reward(parts, reward), expected, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_score_instances_keeps_every_component(every_scorer):
    names = {"reward_model": "oasst_layout", "understandability": "causal_yes_no", "naturalness": "t5_yes_no",
             "coherence": "embedding"}
    scorers = {component: every_scorer[name] for component, name in names.items()}
    table = score_instances(scorers, INSTANCES, reward=RewardParams())
    assert list(table.columns) == [*COMPONENTS, "reward"]
    for scorer in scorers.values():
        scorer._cache.clear()
    for component, scorer in scorers.items():  # each column holds its own scorer's scores, scored again
        np.testing.assert_allclose(table[component], scorer.score(INSTANCES, progress=False), rtol=1e-5, atol=1e-6)
    for i, first in enumerate(COMPONENTS):  # distinct columns: a swapped weight changes the reward
        for second in COMPONENTS[i + 1:]:
            assert (table[first] - table[second]).abs().max() > 1e-3

    def paper_eq1(t):  # Eq. 1 with the paper's weights written out (RewardParams() defaults), not composite_reward
        return (0.0078 * t["reward_model"] - 0.4421 * t["understandability"] + 0.3212 * t["naturalness"]
                + 0.1520 * t["coherence"]).to_numpy()

    np.testing.assert_allclose(table["reward"], paper_eq1(table), rtol=0, atol=1e-12)  # intercept 0
    shifted = RewardParams()
    shifted.intercept = -1.5
    again = score_instances(scorers, INSTANCES, reward=shifted)
    np.testing.assert_allclose(again["reward"], paper_eq1(again) - 1.5, rtol=0, atol=1e-12)
    assert "reward" not in score_instances(scorers, INSTANCES).columns  # no reward params: components only


@pytest.mark.slow
def test_cache_makes_a_rerun_recompute_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    spec = _spec("lm_fluency", tiny_llama_dir, "{prompt}\n", pair_template="{output}")
    first = build_scorer("flu", spec, tmp_path).score(INSTANCES, progress=False)
    again = build_scorer("flu", spec, tmp_path)

    def no_model_calls(batch):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(again, "_score_batch", no_model_calls)
    assert np.array_equal(again.score(INSTANCES, progress=False), first)


@pytest.mark.slow
def test_bad_input_never_enters_the_reward(tiny_llama_dir, monkeypatch):
    scorer = build_scorer("und", _spec("yes_no", tiny_llama_dir, CAUSAL_YES_NO, max_length=12))
    with pytest.raises(ScoringError, match="scorer 'und': instance i-2 has an empty output"):
        scorer.score([INSTANCES[0], InstanceText("Say hi.", "", "  ")], ids=["i-1", "i-2"], progress=False)
    scorer.score(INSTANCES, progress=False)
    assert scorer.truncated == len(INSTANCES)  # every formatted text is longer than 12 tokens
    monkeypatch.setattr(scorer, "_score_batch", lambda batch: [float("nan")] * len(batch))
    with pytest.raises(ScoringError, match=r"scorer 'und': non-finite score nan for instance #0"):
        scorer.score([InstanceText("New", "", "text")], progress=False)


# --- the paper's scorers in the formats their real checkpoints ship (issue 21, item 6) ---

@pytest.mark.slow
def test_a_bin_only_checkpoint_in_openassistants_layout_scores_like_its_safetensors_copy(oasst_layout_dir, tmp_path):
    """OpenAssistant's reward model ships only pytorch_model.bin, with the attention buffers of old GPT-NeoX
    checkpoints (causal mask, masked_bias, rotary inv_freq): loaded through the same scorer path."""
    from safetensors.torch import load_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((oasst_layout_dir / name).read_bytes())
    state = load_file(oasst_layout_dir / "model.safetensors")
    for layer in range(2):  # what GPT-NeoX checkpoints of 2023 carry beside the weights
        prefix = f"gpt_neox.layers.{layer}.attention"
        state[f"{prefix}.bias"] = torch.tril(torch.ones(512, 512, dtype=torch.bool)).view(1, 1, 512, 512)
        state[f"{prefix}.masked_bias"] = torch.tensor(-1e9)
        state[f"{prefix}.rotary_emb.inv_freq"] = torch.rand(2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert not list(tmp_path.glob("*.safetensors"))
    template = "<|prompter|>{prompt}<|endoftext|><|assistant|>{output}<|endoftext|>"
    from_bin = build_scorer("rm", _spec("sequence_classification", tmp_path, template))
    from_safetensors = build_scorer("rm", _spec("sequence_classification", oasst_layout_dir, template))
    assert from_bin._custom and from_bin.model.pooling == "last"
    np.testing.assert_allclose(from_bin.score(INSTANCES, progress=False),
                               from_safetensors.score(INSTANCES, progress=False), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def t5_own_tokenizer_dir(tmp_path_factory):
    """A tiny T5 with a SentencePiece-style (Unigram, Metaspace) tokenizer of its own, saved as tokenizer.json
    the way UniEval's T5 ships it: pad 0, </s> 1, <unk> 2, and the decoder starting from the pad token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder = tmp_path_factory.mktemp("t5-own")
    # a SentencePiece unigram vocabulary: pad, </s>, <unk>, then "▁word" pieces and single characters
    text = " ".join([f"{i.prompt} {i.output}" for i in INSTANCES] + [UNIEVAL_QUESTIONS["naturalness"], "Yes No"])
    words = sorted({"▁" + w for w in text.split()})
    characters = sorted(set(text.replace(" ", "")) | {"▁"})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -5.0) for w in words] + [(c, -10.0) for c in characters]
    unigram = Tokenizer(models.Unigram(vocab, unk_id=2))
    unigram.normalizer, unigram.pre_tokenizer, unigram.decoder = normalizers.NFKC(), pre_tokenizers.Metaspace(), decoders.Metaspace()
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=unigram, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(5)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
                               ).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_t5_with_its_own_tokenizer_scores_p_yes_from_its_decoder_start(t5_own_tokenizer_dir):
    scorer = build_scorer("nat", _spec("yes_no", t5_own_tokenizer_dir, UNIEVAL_QUESTIONS["naturalness"]))
    assert type(scorer.tokenizer).__name__.startswith("T5Tokenizer") and scorer.tokenizer.pad_token_id == 0
    assert scorer.model.config.decoder_start_token_id == 0 and scorer.model.config.is_encoder_decoder
    assert [scorer.tokenizer.decode([i]).strip() for i in scorer.yes_ids] == ["Yes"]
    assert [scorer.tokenizer.decode([i]).strip() for i in scorer.no_ids] == ["No"]
    text = scorer.format(INSTANCES[1])
    encoded = scorer.tokenizer([text], return_tensors="pt")
    assert encoded["input_ids"][0, -1].item() == 1  # T5's own </s> closes the encoder input
    with torch.no_grad():
        probs = torch.softmax(scorer.model(**encoded, decoder_input_ids=torch.tensor([[0]])).logits[0, 0], -1)
    yes, no = probs[scorer.yes_ids].sum(), probs[scorer.no_ids].sum()
    assert scorer.score(INSTANCES[1:2], progress=False)[0] == pytest.approx(float(yes / (yes + no)), rel=1e-5)


@pytest.mark.slow
def test_an_answer_word_spelled_after_a_bare_word_boundary_is_the_word(t5_own_tokenizer_dir):
    from refine_af_utils.scorers import _answer_token_ids

    tokenizer = AutoTokenizer.from_pretrained(t5_own_tokenizer_dir)

    def pieces(word):
        return tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False)["input_ids"])

    # a word the vocabulary has no "▁word" piece for: the bare boundary "▁" comes first, then its letters
    word = next(w for w in ("eee", "ooo", "sss", "aaa", "ttt") if pieces(w)[0] == "▁" and pieces(w)[1] != "<unk>")
    assert [tokenizer.decode([i]) for i in _answer_token_ids(tokenizer, word)] == [pieces(word)[1]]  # not "▁"
