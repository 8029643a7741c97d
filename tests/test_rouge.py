"""Our ROUGE-L must decide exactly as rouge-score does, on any string."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from refine_af_utils.rouge import NoveltyPool, rouge_l, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
STEMMING_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def reference(candidate, pool, scorer=SCORER):
    # Self-Instruct calls scorer.score(pool_instruction, new_instruction).
    return np.array([scorer.score(text, candidate)["rougeL"].fmeasure for text in pool], dtype=np.float64)


WORDS = ["the", "a", "task", "write", "list", "Classify", "sentence", "running", "runs", "ran", "éclair",
         "naïve", "İstanbul", "\u212aelvin", "straße", "日本", "x1", "42", "don't", "e-mail", "", " "]
adversarial_text = st.lists(
    st.one_of(st.sampled_from(WORDS), st.text(alphabet=st.characters(codec="utf-8"), max_size=6)),
    max_size=25,
).map(" ".join)
ascii_text = st.text(alphabet="ab c.d\n!A1", max_size=40)
any_text = st.one_of(adversarial_text, ascii_text, st.text(max_size=60))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(candidate=any_text, pool=st.lists(any_text, max_size=8))
def test_scores_are_bit_identical_to_rouge_score(candidate, pool):
    ours = rouge_l(candidate, pool)
    assert ours.dtype == np.float64 and ours.shape == (len(pool),)
    assert ours.tolist() == reference(candidate, pool).tolist()
    pool_object = NoveltyPool(pool)
    assert pool_object.scores(candidate).tolist() == reference(candidate, pool).tolist()


@settings(max_examples=100, deadline=None)
@given(candidate=adversarial_text, pool=st.lists(adversarial_text, max_size=5))
def test_stemmed_scores_match_rouge_score(candidate, pool):
    assert rouge_l(candidate, pool, use_stemmer=True).tolist() == reference(candidate, pool, STEMMING_SCORER).tolist()


def test_edge_cases():
    assert rouge_l("", [""]).tolist() == [0.0]  # rapidfuzz alone would say 1.0
    assert rouge_l("!!! ???", ["..."]).tolist() == [0.0]
    assert rouge_l("日本語 テキスト", ["日本語 テキスト"]).tolist() == [0.0]  # non-ASCII tokenises to nothing
    assert rouge_l("same words here", ["Same, words... HERE!"]).tolist() == [1.0]
    assert rouge_l("anything", []).shape == (0,)
    assert tokenize("Hello, World-42!") == ("hello", "world", "42")


def _pairs_at_threshold():
    """Token sequences whose exact F is 0.7: 2*lcs/(m+n) = 7/10."""
    pairs = []
    for m in range(1, 31):
        for n in range(1, 31):
            for lcs in range(1, min(m, n) + 1):
                if 20 * lcs == 7 * (m + n):
                    common = [f"w{i}" for i in range(lcs)]
                    a = common + [f"a{i}" for i in range(m - lcs)]
                    b = common + [f"b{i}" for i in range(n - lcs)]
                    pairs.append((" ".join(a), " ".join(b)))
    return pairs


@pytest.mark.parametrize("candidate, other", _pairs_at_threshold())
def test_threshold_decisions_follow_rouge_scores_rounding(candidate, other):
    expected = SCORER.score(other, candidate)["rougeL"].fmeasure
    ours = rouge_l(candidate, [other])[0]
    assert ours == expected
    assert (ours > 0.7) == (expected > 0.7)


def test_naive_lcs_ratio_would_decide_threshold_pairs_wrongly():
    """2*LCS/(m+n) gives exactly 0.7 where rouge-score's 2pr/(p+r) gives 0.7000000000000001."""
    flipped = 0
    for candidate, other in _pairs_at_threshold():
        m, n = len(tokenize(candidate)), len(tokenize(other))
        lcs = round(0.35 * (m + n))
        naive = 2 * lcs / (m + n)
        exact = SCORER.score(other, candidate)["rougeL"].fmeasure
        if (naive > 0.7) != (exact > 0.7):
            flipped += 1
            assert rouge_l(candidate, [other])[0] > 0.7  # we reject, as rouge-score does
    assert flipped > 0


def test_novelty_pool_most_similar_is_ordered_and_grows():
    pool = NoveltyPool(["classify the sentiment of a review", "write a poem about the sea"])
    scores, top = pool.most_similar("classify the sentiment of this tweet", top_k=2)
    assert top[0][0] == "classify the sentiment of a review"
    assert top[0][1] >= top[1][1]
    assert scores.shape == (2,)
    pool.add("classify the sentiment of this tweet")
    assert len(pool) == 3 and pool.scores("classify the sentiment of this tweet")[2] == 1.0
