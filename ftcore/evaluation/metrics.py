"""Metrics, written here with no runtime dependency (tests check them against the reference libraries).

    rouge()                   ROUGE-1/2/L F1 as Google's `rouge-score` computes them (its default
                              tokenizer, no stemming)
    bleu()                    corpus BLEU as `sacrebleu.corpus_bleu` computes it by default
    classification_metrics()  accuracy, macro-F1, per-class recall, confusion matrix, the share of
                              answers outside the label set and of the most common answer
    output_diversity()        the share of distinct outputs and of the most common one: a model that
                              writes "Great product" 87 times out of 100 shows as 0.87
    generation_metrics()      the metrics of one task kind, from predictions and references

Accuracy alone flatters a model on skewed data (always answering "5" scores 0.62 on Amazon food
reviews), so classification is also judged by macro-F1, which that answer holds at 1/num_classes.
"""
from __future__ import annotations

import math
import re
from collections import Counter

from ftcore.data.templates import normalize_label  # noqa: F401 (the metrics' comparison)

# ---------------------------------------------------------------------------------------------
# ROUGE, as rouge-score computes it

# rouge-score's default tokenizer: lowercase, every run of characters outside [a-z0-9] becomes a
# space, split. (Non-ASCII letters are therefore separators, as in the original ROUGE-1.5.5.)
_ROUGE_SEPARATORS = re.compile(r"[^a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return _ROUGE_SEPARATORS.sub(" ", text.lower()).split()


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _rouge_n(ref: list[str], hyp: list[str], n: int) -> float:
    r, h = _ngrams(ref, n), _ngrams(hyp, n)
    overlap = sum((r & h).values())  # clipped counts: min(count in ref, count in hyp) per n-gram
    # max(.., 1): an empty side gives precision/recall 0 rather than a division by zero
    return _f1(overlap / max(sum(h.values()), 1), overlap / max(sum(r.values()), 1))


def _lcs_length(a: list[str], b: list[str]) -> int:
    # one row of the classic dynamic programme at a time: O(len(a)·len(b)) time, O(len(b)) memory
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(ref: list[str], hyp: list[str]) -> float:
    if not ref or not hyp:
        return 0.0
    lcs = _lcs_length(ref, hyp)
    return _f1(lcs / len(hyp), lcs / len(ref))


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """One pair's ROUGE-1, ROUGE-2 and ROUGE-L F1."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    return {"rouge1": _rouge_n(r, p, 1), "rouge2": _rouge_n(r, p, 2), "rougeL": _rouge_l(r, p)}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean over pairs of each pair's ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1), no stemming."""
    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions vs {len(references)} references")
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        for k, v in rouge_scores(pred, ref).items():
            totals[k] += v
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# BLEU, as sacrebleu computes it by default

# sacrebleu's "13a" tokenizer (mteval-v13a.pl, the WMT standard), applied in this order:
_BLEU_RULES = [
    # most ASCII punctuation and symbols become separate tokens ({|}~ [\]^_` space-& (-+ :-@ /)
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    # period and comma are split off unless they sit between digits (3.14, 1,000 stay whole)
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    # a dash after a digit is split off (2-3 -> 2 - 3)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def _bleu_tokens(line: str) -> list[str]:
    line = line.rstrip()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:  # undo the XML escapes mteval's input format used
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "  # the rules look at the characters around punctuation: pad both ends
    for pattern, repl in _BLEU_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def bleu_stats(prediction: str, reference: str, max_order: int = 4) -> list[int]:
    """One pair's sufficient statistics: [hyp_len, ref_len, correct_1..n, total_1..n]; corpus BLEU
    is bleu_from_stats of their sum (so a bootstrap resamples pairs without re-tokenising)."""
    h, r = _bleu_tokens(prediction), _bleu_tokens(reference)
    correct, total = [], []
    for n in range(1, max_order + 1):
        hn, rn = _ngrams(h, n), _ngrams(r, n)
        total.append(sum(hn.values()))
        correct.append(sum((hn & rn).values()))
    return [len(h), len(r), *correct, *total]


def bleu_from_stats(stats, max_order: int = 4) -> float:
    hyp_len, ref_len = stats[0], stats[1]
    correct, total = stats[2:2 + max_order], stats[2 + max_order:2 + 2 * max_order]
    if not any(correct):
        return 0.0
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    # 'exp' smoothing (NIST / mteval): the k-th order with no match counts as 1 / (2^k · total)
    precisions, smooth = [0.0] * max_order, 1.0
    for n in range(max_order):
        if total[n] == 0:  # hypotheses too short for this order: precision stays 0, BLEU is 0
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if min(precisions) == 0.0:
        return 0.0
    return bp * math.exp(sum(math.log(p) for p in precisions) / max_order)


def bleu(predictions: list[str], references: list[str], max_order: int = 4) -> float:
    """Corpus BLEU (0-100) with one reference per prediction: sacrebleu's default definition
    (13a tokenizer, case-sensitive, 'exp' smoothing, brevity penalty over the whole corpus)."""
    if len(predictions) != len(references):
        raise ValueError(f"bleu: {len(predictions)} predictions vs {len(references)} references")
    summed = [0] * (2 + 2 * max_order)
    for pred, ref in zip(predictions, references):
        summed = [a + b for a, b in zip(summed, bleu_stats(pred, ref, max_order))]
    return bleu_from_stats(summed, max_order)


# ---------------------------------------------------------------------------------------------
# classification

OFF_LABEL = "(other)"  # the confusion-matrix column of answers outside the label set


def accuracy(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def _top_share(items: list[str]) -> float:
    return Counter(items).most_common(1)[0][1] / len(items) if items else 0.0


def classification_metrics(predictions: list[str], references: list[str],
                           labels: list[str] | None = None) -> dict:
    """Answers and references compared as normalize_label makes them. `labels` is the label set
    (normalised; default: the references' labels); an answer outside it is wrong for every class
    and counted in `off_label_share` and the confusion matrix's "(other)" column.

    macro_f1 is the mean F1 over the classes that occur among the references or the answers (as
    scikit-learn's f1_score(average="macro") without an explicit label list); a class nobody
    answered has F1 0. Answering the majority class everywhere gives 2p/(1+p)/num_classes for a
    majority share p: 0.29 for three classes at 75 %.

    Returns the scalar metrics plus `recall` {label: recall} and `confusion` {"labels": rows,
    "columns": rows + "(other)" if any, "matrix": counts[reference][answer]}."""
    if len(predictions) != len(references):
        raise ValueError(f"classification: {len(predictions)} predictions vs {len(references)} references")
    preds = [normalize_label(p) for p in predictions]
    refs = [normalize_label(r) for r in references]
    label_set = list(dict.fromkeys(labels if labels is not None else sorted(set(refs))))
    known = set(label_set)
    rows = [lab for lab in label_set if lab in set(refs) | set(preds)] + sorted(set(refs) - known)
    answered = [p if p in known else OFF_LABEL for p in preds]
    columns = rows + ([OFF_LABEL] if OFF_LABEL in answered else [])
    pairs = Counter(zip(refs, answered))
    matrix = [[pairs[(r, c)] for c in columns] for r in rows]
    support, predicted = Counter(refs), Counter(answered)
    recall, f1s = {}, []
    for lab in rows:
        tp = pairs[(lab, lab)]
        r = tp / support[lab] if support[lab] else 0.0
        p = tp / predicted[lab] if predicted[lab] else 0.0
        recall[lab] = r
        f1s.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
    n = max(len(refs), 1)
    return {
        "accuracy": sum(p == r for p, r in zip(preds, refs)) / n,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "off_label_share": predicted[OFF_LABEL] / n,
        "top_output_share": _top_share(preds),
        "recall": recall,
        "confusion": {"labels": rows, "columns": columns, "matrix": matrix},
    }


# ---------------------------------------------------------------------------------------------
# every kind

def output_diversity(predictions: list[str]) -> dict[str, float]:
    """distinct_share: distinct outputs / outputs; top_output_share: the most common output's
    share (outputs compared lowercased, whitespace collapsed)."""
    norm = [" ".join(p.lower().split()) for p in predictions]
    return {"distinct_share": len(set(norm)) / len(norm) if norm else 0.0, "top_output_share": _top_share(norm)}


def generation_metrics(kind: str, predictions: list[str], references: list[str],
                       labels: list[str] | None = None) -> dict:
    """The metrics of a task kind: classification_metrics (labels: the label set); ROUGE for
    summarization; BLEU and ROUGE-L for generation and translation; output_diversity for the
    three generative kinds."""
    predictions = [p.strip() for p in predictions]
    references = [r.strip() for r in references]
    if kind == "classification":
        return classification_metrics(predictions, references, labels)
    if kind == "summarization":
        return {**rouge(predictions, references), **output_diversity(predictions)}
    if kind in ("generation", "translation"):
        return {"bleu": bleu(predictions, references), "rougeL": rouge(predictions, references)["rougeL"],
                **output_diversity(predictions)}
    raise ValueError(f"unknown task kind {kind!r} (classification | generation | summarization | translation)")


def natural_order(name: str):
    """Sort key for labels: numbers by value ("2" before "10"), then names."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


# ---------------------------------------------------------------------------------------------
# 95 % intervals: the bootstrap over test examples, paired between models

BOOTSTRAP_RESAMPLES = 1000


class Resampler:
    """A task's headline metric computed on resamples of its test examples: the same resamples
    (seeded; counts drawn with replacement) for every model, so two models' difference gets a paired
    interval — what a comparison on one test set can claim, since both models saw the same hard
    and easy examples. kind: classification (macro-F1), summarization (ROUGE-L), generation /
    translation (corpus BLEU, from per-pair statistics)."""

    def __init__(self, kind: str, references: list[str], labels: list[str] | None = None,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
        import numpy as np
        self.kind, self.references = kind, [r.strip() for r in references]
        n = len(references)
        self.counts = np.random.default_rng(seed).multinomial(n, [1.0 / n] * n, size=resamples).astype(np.float64) \
            if n else np.zeros((resamples, 0))
        if kind == "classification":
            self.refs = [normalize_label(r) for r in self.references]
            known = list(dict.fromkeys(labels if labels is not None else sorted(set(self.refs))))
            self.known = set(known)
            self.label_order = known + sorted(set(self.refs) - self.known)

    def values(self, predictions: list[str]):
        """The metric on every resample (an array of `resamples` values)."""
        import numpy as np
        predictions = [p.strip() for p in predictions]
        if len(predictions) != len(self.references):
            raise ValueError(f"{len(predictions)} predictions for {len(self.references)} references")
        W = self.counts
        if self.kind == "classification":
            preds = [normalize_label(p) for p in predictions]
            preds = [p if p in self.known else OFF_LABEL for p in preds]
            # the classes macro_f1 averages over: those among the references or the answers
            classes = [c for c in self.label_order if c in set(self.refs) | set(preds)]
            ref, pred = np.array(self.refs, dtype=object), np.array(preds, dtype=object)
            f1 = []
            for c in classes:
                tp = W @ ((ref == c) & (pred == c)).astype(np.float64)
                support, predicted = W @ (ref == c).astype(np.float64), W @ (pred == c).astype(np.float64)
                denom = support + predicted
                f1.append(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0))
            return np.mean(f1, axis=0) if f1 else np.zeros(len(W))
        if self.kind == "summarization":
            scores = np.array([rouge_scores(p, r)["rougeL"] for p, r in zip(predictions, self.references)])
            return W @ scores / max(len(scores), 1)
        stats = np.array([bleu_stats(p, r) for p, r in zip(predictions, self.references)], dtype=np.float64)
        return np.array([bleu_from_stats(row) for row in W @ stats])

    @staticmethod
    def interval(values) -> tuple[float, float]:
        import numpy as np
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)
