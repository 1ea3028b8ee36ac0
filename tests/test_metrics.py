"""ROUGE and BLEU written in ftcore equal the reference libraries (test extra only)."""
import random

import pytest

from ftcore.evaluate import bleu, rouge

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
sacrebleu = pytest.importorskip("sacrebleu")

WORDS = ("the a cat dog sat on mat great product would buy again not worth it battery life "
         "Screen BROKEN after 2 days 3.14 1,000 5-star 10-20 U.S.A. e-mail don't it's "
         "café naïve Straße 日本語 emoji🙂 x86_64 & &amp; &lt;tag&gt; <skipped> \"quoted\" (paren) "
         "[br] {x} ok! why? well... -- --- ; : / \\ $5 100% #1 @user").split()


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.06:
        return ""
    if kind < 0.10:
        return rng.choice(["   ", ".", "!!!", "?", "-", "\n", "🙂", "…"])
    n = rng.randint(1, 25)
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.2:  # repeated words
        words = words[: max(1, n // 3)] * 3
    seps = [rng.choice([" ", " ", " ", "  ", "\t", ", ", ". ", "-", "\n", ""]) for _ in words]
    text = "".join(w + s for w, s in zip(words, seps)).strip(" ")
    if rng.random() < 0.5:
        text += rng.choice([".", " .", "!", "?", "", "...", " ", "\n"])
    return text if rng.random() < 0.8 else text.upper()


def _pairs(seed: int, n: int):
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        ref = _sentence(rng)
        r = rng.random()
        if r < 0.3:  # a perturbed copy of the reference: many partial n-gram matches
            words = ref.split(" ")
            rng.shuffle(words) if rng.random() < 0.3 else None
            words = [w for w in words if rng.random() > 0.25] + ([rng.choice(WORDS)] if rng.random() < 0.5 else [])
            pred = " ".join(words)
        elif r < 0.35:
            pred = ref
        else:
            pred = _sentence(rng)
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def test_rouge_matches_rouge_score():
    preds, refs = _pairs(0, 400)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    # pair by pair (each pair's F1) and as the mean over pairs
    ref_totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        expected = scorer.score(r, p)  # rouge-score's argument order: (target, prediction)
        got = rouge([p], [r])
        for k in ref_totals:
            assert got[k] == pytest.approx(expected[k].fmeasure, abs=1e-6), (k, p, r)
            ref_totals[k] += expected[k].fmeasure
    got = rouge(preds, refs)
    for k, v in ref_totals.items():
        assert got[k] == pytest.approx(v / len(preds), abs=1e-6)
    assert 0.0 < got["rougeL"] < 1.0  # the test data has both matches and misses


def test_rouge_edge_cases():
    assert rouge(["same words here"], ["Same, words: here!"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge([""], [""]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError):
        rouge(["a"], [])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bleu_matches_sacrebleu_corpus(seed):
    preds, refs = _pairs(seed, 300)
    expected = sacrebleu.corpus_bleu(preds, [refs]).score
    assert bleu(preds, refs) == pytest.approx(expected, abs=0.01)
    assert expected > 1.0  # non-trivial score


def test_bleu_matches_sacrebleu_small_corpora():
    # small corpora exercise the smoothing (orders with no match), the brevity penalty and zeros
    rng = random.Random(7)
    for _ in range(300):
        preds, refs = _pairs(rng.randrange(10**6), rng.randint(1, 4))
        expected = sacrebleu.corpus_bleu(preds, [refs]).score
        assert bleu(preds, refs) == pytest.approx(expected, abs=0.01), (preds, refs)


def test_bleu_edge_cases():
    cases = [
        (["the cat sat on the mat"], ["the cat sat on the mat"]),  # 100
        ([""], ["a reference"]),                                   # empty hypothesis
        (["cat"], ["the cat"]),                                    # too short for 2..4-grams
        (["the cat sat on a mat ."], ["the cat sat on the mat."]),
        (["It costs $3.50, i.e. 3,000 yen (2-3 days)."], ["It costs $3.50 - 3,000 yen (2-3 days)"]),
        (["A B C D E"], ["a b c d e"]),                            # case-sensitive
    ]
    for preds, refs in cases:
        assert bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=0.01)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
