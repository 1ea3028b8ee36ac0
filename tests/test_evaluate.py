"""Evaluation driver: completion loss / perplexity, metrics per task kind, k-shot, the report."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ftcore.config import Config, EvalConfig
from ftcore.data import Rendered, tokenize_examples
from ftcore.evaluate import (LabelSet, _ShotBuilder, baseline_results, completion_loss, evaluate_model,
                             label_logprobs, label_sets, lead_source, rank_classify, read_generations, run_eval,
                             write_generations, write_report)
from ftcore.evaluation.metrics import accuracy, classification_metrics, generation_metrics, normalize_label
from ftcore.model import ModelConfig, Transformer
from ftcore.evaluation.report import HEADLINE
from ftcore.tokenizer import Tokenizer

TEXTS = ["The battery lasts all day and the screen is bright.", "Terrible: it broke after two days.",
         "Great value for the price, would buy again!", "Le chat est sur la table.", "The cat is on the table.",
         "Rating: 5", "Summary: works well", "Translate to English:"] * 5


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(TEXTS, vocab_size=320)


def tiny_model(vocab_size, seed=0, max_pos=512):
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=max_pos)
    model = Transformer(cfg)
    model.init_weights(std=0.1, seed=seed)
    return model.eval()


TASKS = {  # template -> (kind, [(prompt, completion)])
    "rating": ("classification", [("Review: great, love it.\nRating:", " 5"), ("Review: broke.\nRating:", " 1"),
                                  ("Review: fine I guess, nothing special\nRating:", " 3"),
                                  ("Review: ok\nRating:", " 4")]),
    "rating@heldout1": ("classification", [("How many stars? great\nStars:", " 5"), ("Stars for: awful\nStars:", " 1")]),
    "summary": ("summarization", [("Summarize: the battery lasts all day\nSummary:", " Great battery"),
                                  ("Summarize: it broke after two days and support never answered\nSummary:",
                                   " Broke quickly, bad support")]),
    "review": ("generation", [("Write a 5-star review titled \"Nice\".\nReview:", " Works well, bright screen."),
                              ("Write a 1-star review titled \"Bad\".\nReview:", " It broke after two days.")]),
    "translate": ("translation", [("Translate to English: Le chat est sur la table.\nTranslation:",
                                   " The cat is on the table.")]),
}
DIVERSITY = {"distinct_share", "top_output_share"}
CLASSIFICATION = {"accuracy", "macro_f1", "off_label_share", "top_output_share", "recall", "confusion"}
EXPECTED = {"classification": CLASSIFICATION | {"rank_accuracy", "rank_macro_f1", "label_set"},
            "summarization": {"rouge1", "rouge2", "rougeL"} | DIVERSITY,
            "generation": {"bleu", "rougeL"} | DIVERSITY, "translation": {"bleu", "rougeL"} | DIVERSITY}
COMMON = {"loss", "perplexity", "prompt_tokens", "examples"}


def make_examples(tok, prefix="r"):
    rendered = [Rendered.simple(p, c, record_id=f"{prefix}{name}{i}", template=name, kind=kind)
                for name, (kind, pairs) in TASKS.items() for i, (p, c) in enumerate(pairs)]
    return tokenize_examples(rendered, tok, max_seq_len=256)


def test_completion_loss_is_token_weighted_and_perplexity_is_its_exp(tok):
    model = tiny_model(tok.vocab_size)
    examples = make_examples(tok)
    # reference: every example alone, unpadded; sum of completion-token cross-entropies / count
    total, count, per_example = 0.0, 0, []
    for ex in examples:
        with torch.no_grad():
            logits = model(torch.tensor([ex.input_ids]))[0, :-1]
        target = torch.tensor(ex.labels[1:])
        keep = target != -100
        ce = F.cross_entropy(logits[keep].double(), target[keep], reduction="sum").item()
        total, count = total + ce, count + int(keep.sum())
        per_example.append(ce / int(keep.sum()))
    for bs in (1, 3, 16):
        loss, ppl, n = completion_loss(model, examples, tok.pad_id, bs, "cpu")
        assert n == count == sum(ex.num_targets for ex in examples)
        assert loss == pytest.approx(total / count, rel=1e-5)
        assert ppl == math.exp(loss)
    # token weighting matters: the mean of per-example means is a different number
    assert abs(sum(per_example) / len(per_example) - total / count) > 1e-3


def test_normalize_label_and_metrics():
    assert normalize_label(" Positive.\nThe review says...") == "positive"
    assert normalize_label("\n  5 ") == "5"
    assert normalize_label("5 stars!") != normalize_label("5")
    assert accuracy([" 5", "Negative!", "4\n5", "neutral-ish"], ["5", " negative", "5", "neutral"]) == 0.5
    g = generation_metrics("generation", ["the cat sat on the mat"], [" the cat sat on the mat "])
    assert g == {"bleu": pytest.approx(100.0), "rougeL": 1.0, "distinct_share": 1.0, "top_output_share": 1.0}
    assert set(generation_metrics("summarization", ["a"], ["b"])) == {"rouge1", "rouge2", "rougeL"} | DIVERSITY
    assert set(generation_metrics("classification", ["a"], ["b"])) == CLASSIFICATION
    with pytest.raises(ValueError):
        generation_metrics("poetry", ["a"], ["b"])


def test_one_prefill_gives_what_separate_passes_give(tok):
    """evaluate_model runs each prompt once and continues from its cache for the loss, the ranked
    labels and the answer: the same numbers as the teacher-forced loss, rank_classify and generate
    run on their own (batch sizes that pad differently included)."""
    from ftcore.evaluate import label_sets
    from ftcore.generate import generate
    model = tiny_model(tok.vocab_size)
    examples = make_examples(tok)
    for bs in (1, 3):
        cfg = EvalConfig(max_examples=0, shots=0, max_new_tokens=6, batch_size=bs)
        outputs = {}
        results = evaluate_model(model, tok, examples, cfg, "cpu", outputs=outputs, progress=False)
        labels = label_sets(examples)
        for task, m in results.items():
            exs = [e for e in examples if e.template == task]
            loss, _, _ = completion_loss(model, exs, tok.pad_id, 4, "cpu")
            assert m["loss"] == pytest.approx(loss, rel=1e-5), task
            new = 6 if task not in labels else min(6, max(map(len, labels[task].ids)) + 4)
            alone = [tok.decode(g) for g in generate(model, [e.prompt_ids for e in exs], new, tok.eos_ids, tok.pad_id)]
            assert [o["output"] for o in outputs[task]] == alone, task
            if task in labels:
                assert [o["ranked"] for o in outputs[task]] == rank_classify(
                    model, [e.prompt_ids for e in exs], labels[task], tok.pad_id, 2), task


def test_evaluate_model_reports_every_metric_per_kind(tok):
    model = tiny_model(tok.vocab_size)
    model.train()
    examples = make_examples(tok)
    cfg = EvalConfig(max_examples=3, shots=0, max_new_tokens=6, batch_size=2)
    outputs = {}
    results = evaluate_model(model, tok, examples, cfg, "cpu", outputs=outputs, progress=False)
    assert model.training  # the caller's mode is restored
    assert set(results) == set(TASKS)
    for task, (kind, pairs) in TASKS.items():
        m = results[task]
        assert set(m) == EXPECTED[kind] | COMMON, task
        assert m["examples"] == min(3, len(pairs)) == len(outputs[task])
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        exs = [e for e in examples if e.template == task][:3]
        assert m["prompt_tokens"] == pytest.approx(sum(e.prompt_len for e in exs) / len(exs))
        # the metrics are computed from exactly the outputs reported
        preds = [o["output"] for o in outputs[task]]
        assert [o["reference"] for o in outputs[task]] == [e.completion for e in exs]
        labels = label_sets(examples).get(task.split("@")[0])
        expected = generation_metrics(kind, preds, [e.completion for e in exs], labels and labels.names)
        assert {k: m[k] for k in expected} == expected
    # deterministic (greedy)
    assert evaluate_model(model, tok, examples, cfg, "cpu", progress=False) == results


def test_kshot_prompts(tok):
    model = tiny_model(tok.vocab_size)
    examples, pool = make_examples(tok), make_examples(tok, prefix="train")
    builder = _ShotBuilder(tok, pool, k=2, max_len=512, seed=0)
    ex = examples[0]
    ids, labels, prompt_len, used = builder(ex, room_for_new=8)
    assert used == 2
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # one bos, in front
    assert ids[-len(ex.input_ids) + 1:] == ex.input_ids[1:] and labels[-len(ex.labels) + 1:] == ex.labels[1:]
    assert ids[prompt_len:] == ex.input_ids[ex.prompt_len:]
    context = len(ids) - len(ex.input_ids) + 1
    assert all(lab == -100 for lab in labels[:context]) and context > 10
    assert tok.decode(ids[:context]).count("Rating:") == 2  # two solved examples of the same task
    # shots that do not fit the model's context are not taken, and the count says so
    ids2, _, _, used = _ShotBuilder(tok, pool, k=2, max_len=len(ex.input_ids) + 8, seed=0)(ex, room_for_new=8)
    assert ids2 == ex.input_ids and used == 0
    shortest = min(len(s.input_ids) for s in pool if s.template == ex.template)
    builder = _ShotBuilder(tok, pool, k=3, max_len=len(ex.input_ids) + 8 + shortest, seed=0)
    for _ in range(5):  # whatever the draw: at most what fits, never over the context
        ids3, _, _, used = builder(ex, room_for_new=8)
        assert used <= 1 and len(ids3) + 8 <= len(ex.input_ids) + 8 + shortest

    cfg = EvalConfig(max_examples=2, shots=2, max_new_tokens=4, batch_size=4)
    zero = evaluate_model(model, tok, examples, cfg, "cpu", progress=False)
    kshot = evaluate_model(model, tok, examples, cfg, "cpu", shots_pool=pool, progress=False)
    kshot2 = evaluate_model(model, tok, examples, cfg, "cpu", shots_pool=pool, progress=False)
    assert kshot == kshot2  # shots drawn with a seed
    for task in TASKS:
        assert set(kshot[task]) == set(zero[task]) | {"shots", "short_of_shots"}
        in_pool = sum(s.template == task for s in pool)  # translate has one training example
        assert kshot[task]["shots"] == min(2, in_pool)
        assert kshot[task]["short_of_shots"] == (1.0 if in_pool < 2 else 0.0)
        assert kshot[task]["prompt_tokens"] > zero[task]["prompt_tokens"] + 10
        assert kshot[task]["loss"] != zero[task]["loss"]


def _cls(accuracy, macro_f1, loss=None, **kw):
    m = {"accuracy": accuracy, "macro_f1": macro_f1, **kw}
    if loss is not None:
        m.update(loss=loss, perplexity=math.exp(loss), prompt_tokens=40.0)
    return {**m, "examples": 5}


RESULTS = {
    "baseline": {"rating": _cls(0.6, 0.15, majority_answer="5"),
                 "summary": {"rouge1": 0.07, "rouge2": 0.01, "rougeL": 0.06, "lead_words": 4, "examples": 5}},
    "base": {"rating": _cls(0.2, 0.1, 2.0, rank_accuracy=0.4, rank_macro_f1=0.2),
             "summary": {"rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.1, "loss": 3.0, "perplexity": math.exp(3.0),
                         "prompt_tokens": 50.0, "examples": 5}},
    "finetuned": {"rating": _cls(0.8, 0.5, 0.5, rank_accuracy=0.8, rank_macro_f1=0.5, top_output_share=0.4,
                                 recall={"1": 0.5, "5": 1.0},
                                 confusion={"labels": ["1", "5"], "columns": ["1", "5", "(other)"],
                                            "matrix": [[1, 0, 1], [0, 3, 0]]}),
                  "summary": {"rouge1": 0.4, "rouge2": 0.2, "rougeL": 0.35, "loss": 1.5, "perplexity": math.exp(1.5),
                              "prompt_tokens": 50.0, "examples": 5}},
    "base_kshot": {"rating": _cls(0.4, 0.3, 1.5, rank_accuracy=0.6, rank_macro_f1=0.25, shots=2.5, short_of_shots=0.5),
                   "summary": {"rouge1": 0.2, "rouge2": 0.1, "rougeL": 0.2, "loss": 2.5, "perplexity": math.exp(2.5),
                               "prompt_tokens": 200.0, "examples": 5, "shots": 3.0, "short_of_shots": 0.0}},
}


def test_write_report(tmp_path):
    samples = [{"task": "rating", "prompt": "Review: great | love it\nRating:", "reference": " 5",
                "outputs": {"base": " 3", "base_kshot": "5", "finetuned": " 5"}}]
    md = write_report(tmp_path, RESULTS, samples, shots=3)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data == RESULTS and list(data) == ["baseline", "base", "base_kshot", "finetuned"]
    assert (tmp_path / "eval.md").read_text() == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md"]  # no temp files left
    assert "## rating" in md and "## summary" in md
    assert "| metric | baseline | base | base 3-shot | fine-tuned | Δ base | Δ baseline |" in md
    assert "| accuracy | 0.6000 | 0.2000 | 0.4000 | 0.8000 | +0.6000 | +0.2000 |" in md
    assert "| macro_f1 | 0.1500 | 0.1000 | 0.3000 | 0.5000 | +0.4000 | +0.3500 |" in md
    assert "| loss | – | 2.0000 | 1.5000 | 0.5000 | -1.5000 | – |" in md
    assert "| prompt_tokens | – | 40.00 | 160.00 | 40.00 | – | – |" not in md  # k-shot's own value
    assert "| majority_answer | 5 | – | – | – | – | – |" in md
    assert "| shots | – | – | 2.50 | – | – | – |" in md
    # the summary: headline metric per task, the ranked base score, a verdict against the baseline
    summary = md.split("## Summary")[1].split("## rating")[0]
    # no generations/ were written here: no paired intervals, and the verdict says so before the point estimates
    unpaired = "no paired intervals (no per-example answers of baseline, base, base_kshot, finetuned in generations/): point estimates only; "
    assert "| rating | macro-f1 (answer) | 0.1500 | 0.1000 | 0.3000 | 0.5000 | " + unpaired + "**+0.35 over the baseline**" in summary
    assert "+0.2 over the best base score" in summary  # best base: k-shot 0.3 answered (0.25 ranked)
    assert "| rating | macro-f1 (ranked) | 0.1500 | 0.2000 | 0.2500 | 0.5000 |" in summary
    assert "| summary | rougeL | 0.0600 | 0.1000 | 0.2000 | 0.3500 | " + unpaired + "**+0.29 over the baseline**" in summary
    assert "50% of prompts short" in summary
    # the confusion matrix of the fine-tuned answers, with recall per class
    assert "| reference \\ answer | 1 | 5 | (other) | recall |" in md
    assert "| 1 | 1 | 0 | 1 | 0.50 |" in md and "| 5 | 0 | 3 | 0 | 1.00 |" in md
    assert "great \\| love it" not in md.split("```")[0]  # prompt shown in a code block
    assert "| 5 | 3 | 5 | 5 |" in md
    assert "curves.png" not in md

    # a fine-tuned model that only learned the majority class looks like the baseline, and says so
    majority = {"baseline": RESULTS["baseline"], "base": RESULTS["base"],
                "finetuned": {"rating": _cls(0.6, 0.15, 0.4, rank_accuracy=0.6, rank_macro_f1=0.15,
                                             top_output_share=1.0)}}
    md = write_report(tmp_path / "majority", majority, samples=[])
    assert "not better than the baseline (+0)" in md and "one answer for 100% of examples" in md

    # without a base or baseline section there is no difference column
    md = write_report(tmp_path / "ft", {"finetuned": RESULTS["finetuned"]}, samples=[])
    assert "| metric | fine-tuned |" in md and "Δ" not in md
    assert json.loads((tmp_path / "ft" / "eval.json").read_text()) == {"finetuned": RESULTS["finetuned"]}
    (tmp_path / "ft" / "curves.png").write_bytes(b"png")
    assert "![training curves](curves.png)" in write_report(tmp_path / "ft", {"finetuned": RESULTS["finetuned"]}, samples=[])


def test_report_samples_from_generation_files(tmp_path):
    for section, out in (("base", "three"), ("finetuned", "5")):
        write_generations(tmp_path, section, {"rating": [{"prompt": f"p{i}", "reference": "5", "output": out}
                                                         for i in range(4)]})
    assert len(read_generations(tmp_path, ["base", "finetuned"])["base"]["rating"]) == 4
    md = write_report(tmp_path, {"base": RESULTS["base"], "finetuned": RESULTS["finetuned"]}, n_samples=2)
    assert md.count("### rating") == 2 and "| 5 | three | 5 |" in md
    assert md.count("| reference |") == 2  # each example's table once (the last one was printed twice)


def test_run_eval_end_to_end(tmp_path):
    """`ftcore eval` on the embedded synthetic reviews: two tiny models, k-shot, held-out paraphrases."""
    from ftcore.data.reviews import generate_reviews, pretraining_texts
    from ftcore.weights import save_pretrained

    tok = Tokenizer.train_bpe(pretraining_texts(generate_reviews(200, seed=1)), vocab_size=600)
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"model{seed}"
        save_pretrained(tiny_model(tok.vocab_size, seed=seed, max_pos=1024), d, tokenizer=tok)
        dirs.append(str(d))
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.data.synthetic.num_records = 60
    cfg.eval.max_examples, cfg.eval.shots, cfg.eval.max_new_tokens, cfg.eval.samples = 2, 1, 4, 1
    cfg.log.progress = False
    results = run_eval(cfg, dirs, device="cpu")

    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(data) == ["baseline", "base", "base_kshot", "finetuned"] and data == json.loads(json.dumps(results))
    tasks = set(data["base"])
    kinds = {"rating": "classification", "sentiment": "classification", "review": "generation", "summary": "summarization"}
    assert {t.split("@")[0] for t in tasks} == set(kinds)
    assert any("@heldout" in t for t in tasks)
    assert set(data["baseline"]) == tasks
    for name, section in data.items():
        assert set(section) == tasks
        for task, m in section.items():
            kind = kinds[task.split("@")[0]]
            if name == "baseline":
                assert ("majority_answer" if kind == "classification" else "lead_words") in m
                assert HEADLINE[kind] in m
            else:
                extra = {"shots", "short_of_shots"} if name == "base_kshot" else set()
                # the 95 % bootstrap intervals of the headline (and of the ranked labels), and the
                # fine-tuned model's paired comparisons
                extra |= {f"{HEADLINE[kind]}_ci"} | ({f"rank_{HEADLINE[kind]}_ci"} if kind == "classification" else set())
                extra |= {"vs"} if name == "finetuned" else set()
                assert set(m) == EXPECTED[kind] | COMMON | extra
                lo, hi = m[f"{HEADLINE[kind]}_ci"]
                assert lo <= m[HEADLINE[kind]] + 1e-9 and m[HEADLINE[kind]] <= hi + 1e-9
            assert m["examples"] == 2
    for task in tasks:
        assert data["base_kshot"][task]["prompt_tokens"] > data["base"][task]["prompt_tokens"]
        vs = data["finetuned"][task]["vs"]
        assert set(vs) == {"baseline", "base", "base_kshot"}
        for c in vs.values():
            assert c["verdict"] in ("better", "worse", "tie") and c["ci"][0] <= c["ci"][1]
    md = (tmp_path / "run" / "eval.md").read_text()
    assert "base 1-shot" in md and md.count("### ") == len(tasks)
    assert "## Summary" in md and "| baseline |" in md
    assert (tmp_path / "run" / "generations" / "base_kshot.jsonl").is_file()


# ---------------------------------------------------------------------------------------------
# metrics that survive imbalance, rank classification, baselines

def test_classification_metrics_by_hand():
    refs = ["positive"] * 6 + ["negative"] * 3 + ["neutral"]
    preds = ["positive"] * 5 + ["negative"] + ["Negative."] * 2 + ["I think so"] + ["neutral"]
    m = classification_metrics(preds, refs, ["negative", "neutral", "positive"])
    # positive: tp 5, predicted 5, support 6; negative: tp 2, predicted 3, support 3; neutral: 1/1/1
    f1 = {"positive": 2 * 1 * (5 / 6) / (1 + 5 / 6), "negative": 2 * (2 / 3) * (2 / 3) / (4 / 3), "neutral": 1.0}
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["recall"] == pytest.approx({"negative": 2 / 3, "neutral": 1.0, "positive": 5 / 6})
    assert m["off_label_share"] == pytest.approx(0.1) and m["top_output_share"] == pytest.approx(0.5)
    assert m["confusion"] == {"labels": ["negative", "neutral", "positive"],
                              "columns": ["negative", "neutral", "positive", "(other)"],
                              "matrix": [[2, 0, 0, 1], [0, 1, 0, 0], [1, 0, 5, 0]]}
    # the majority answer: accuracy = its share, macro-F1 = 2p/(1+p)/classes
    maj = classification_metrics(["positive"] * 100, ["positive"] * 75 + ["negative"] * 13 + ["neutral"] * 12)
    assert maj["accuracy"] == 0.75 and maj["macro_f1"] == pytest.approx(2 * 0.75 / 1.75 / 3)
    assert maj["top_output_share"] == 1.0 and maj["recall"] == {"negative": 0.0, "neutral": 0.0, "positive": 1.0}


def test_output_diversity_shows_a_model_that_repeats_itself():
    m = generation_metrics("summarization", ["Great product"] * 87 + [f"summary {i}" for i in range(13)],
                           ["x"] * 100)
    assert m["top_output_share"] == pytest.approx(0.87) and m["distinct_share"] == pytest.approx(14 / 100)


class Bigram(torch.nn.Module):
    """A model whose next-token distribution depends on the last token only: log-probabilities
    are known by construction, so rank scores can be computed by hand."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log())

    def new_kv_cache(self, batch_size, max_len, dtype=None, device=None):
        class Cache:
            length = 0
        return Cache()

    def forward(self, input_ids, position_ids=None, kv_cache=None, attention_mask=None, last_only=False):
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        return self.logits[input_ids[:, -1:] if last_only else input_ids]


def test_rank_classification_by_hand():
    # P(next | last token), tokens 0..3; token 0 is also the pad
    model = Bigram([[0.25, 0.25, 0.25, 0.25],
                    [0.1, 0.2, 0.3, 0.4],     # after 1
                    [0.5, 0.3, 0.1, 0.1],     # after 2
                    [0.2, 0.2, 0.2, 0.4]])    # after 3
    labels = LabelSet(["a", "b", "c"], [" a", " b c", " c"], [[3], [2, 0], [0]])
    prompts = [[3, 3, 1], [1, 2], [2, 3], [1]]
    scores = label_logprobs(model, prompts, labels.ids, pad_id=0, batch_size=3)
    expected = torch.tensor([[0.4, 0.3 * 0.5, 0.1], [0.1, 0.1 * 0.5, 0.5],
                             [0.4, 0.2 * 0.5, 0.2], [0.4, 0.3 * 0.5, 0.1]], dtype=torch.float64).log()
    torch.testing.assert_close(scores, expected)
    ranked = rank_classify(model, prompts, labels, pad_id=0, batch_size=2)
    assert ranked == ["a", "c", "a", "a"]
    m = classification_metrics(ranked, ["a", "c", "b", "c"], labels.names)
    assert m["accuracy"] == 0.5
    # a: tp 1 of 3 predicted, support 1 -> F1 0.5; b: 0; c: tp 1, predicted 1, support 2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0 + 2 / 3) / 3)


def test_label_logprobs_equal_full_recompute(tok):
    """Through the real model: batched, left-padded, multi-token labels from the KV cache equal
    each prompt + label scored alone with a plain forward."""
    model = tiny_model(tok.vocab_size, seed=3)
    prompts = [tok.encode(t, add_bos=True) for t in ["Review: great\nRating:", "Rating:", "The battery lasts all day"]]
    cands = [tok.encode(" 5"), tok.encode(" works well"), tok.encode(" Terrible: it broke")]
    assert max(map(len, cands)) > 2
    scores = label_logprobs(model, prompts, cands, tok.pad_id, batch_size=2)
    for i, p in enumerate(prompts):
        for c, cand in enumerate(cands):
            with torch.no_grad():
                lp = model(torch.tensor([p + cand]))[0].double().log_softmax(-1)
            ref = sum(lp[len(p) - 1 + j, t] for j, t in enumerate(cand))
            assert scores[i, c].item() == pytest.approx(ref.item(), abs=1e-4)


def test_label_sets_come_from_the_completions(tok):
    examples = make_examples(tok)
    sets = label_sets(examples)
    assert set(sets) == {"rating"}  # held-out paraphrases share their task's labels
    assert sets["rating"].names == ["1", "3", "4", "5"] and sets["rating"].texts == [" 1", " 3", " 4", " 5"]
    assert sets["rating"].ids == [tok.encode(t) for t in sets["rating"].texts]


def test_baselines_majority_and_lead(tok):
    from ftcore.data.templates import BUILTIN
    train = [Rendered.simple("p", c, record_id=f"t{i}", template="sentiment", kind="classification")
             for i, c in enumerate([" positive"] * 5 + [" negative"] * 2)]
    train += [Rendered.simple("p", c, record_id=f"s{i}", template="summary", kind="summarization")
              for i, c in enumerate([" Great", " Works well", " Broke after two days"])]
    test = [Rendered.simple("p", c, record_id=f"x{i}", template="sentiment", kind="classification")
            for i, c in enumerate([" negative", " positive", " neutral", " positive"])]
    test += [Rendered.simple("p", " Lasts all day", record_id="x9", template="summary", kind="summarization")]
    records = {"x9": {"text": "The battery lasts all day and the screen is bright.", "summary": "Lasts all day"}}
    train, test = tokenize_examples(train, tok), tokenize_examples(test, tok)
    out = baseline_results(test, train, records, dict(BUILTIN))
    s = out["sentiment"]
    assert s["majority_answer"] == "positive" and s["accuracy"] == 0.5 and s["examples"] == 4
    assert s["macro_f1"] == pytest.approx((2 * 0.5 / 1.5) / 3)  # positive F1 2/3, two classes at 0
    assert s["rank_macro_f1"] == s["macro_f1"] and s["top_output_share"] == 1.0
    # a balanced training split (data.balance) does not move the majority: the data's own counts do
    skewed = baseline_results(test, train, records, dict(BUILTIN), train_labels={"sentiment": {"negative": 2, "positive": 1}})
    assert skewed["sentiment"]["majority_answer"] == "negative"
    m = out["summary"]
    assert m["lead_words"] == 2  # median word count of the training summaries
    assert lead_source(records["x9"], BUILTIN["summary"]) == records["x9"]["text"]
    assert m["rougeL"] == pytest.approx(generation_metrics("summarization", ["The battery"], ["Lasts all day"])["rougeL"])
    # a review-writing prompt shows the title: that is its source
    assert lead_source({"summary": "Nice", "rating": 5, "text": "long text"}, BUILTIN["review"]) == "Nice"


def _rows(references, answers):
    return [{"prompt": "p", "reference": r, "output": a} for r, a in zip(references, answers)]


def test_the_report_calls_a_difference_inside_its_interval_a_tie(tmp_path):
    """A model a hair below the lead baseline on one test set (better on some examples, worse on a
    few more) is a tie, not "worse" and not "better"; a gain whose paired interval excludes 0 is
    "better"; the majority-class answer gets its low macro-F1 with an interval."""
    import random

    from ftcore.evaluation.metrics import classification_metrics, rouge
    from ftcore.evaluation.report import write_generations, write_report
    rng = random.Random(0)
    words = ["great", "tasty", "dog", "food", "coffee", "bad"]
    refs = [" ".join(rng.choice(words) for _ in range(3)) for _ in range(300)]
    lead = [r.split()[0] + " x y" for r in refs]                   # ROUGE-L 1/3 on every example
    near = [r if i in (5, 40, 90, 200) else "zzz x y" if i in (1, 50, 60, 70, 80, 100, 150, 250, 299) else l
            for i, (r, l) in enumerate(zip(refs, lead))]           # 4 better, 9 worse: -0.0011 in all
    good = [r if i % 2 else lead[i] for i, r in enumerate(refs)]  # half the summaries exact
    labels = [rng.choice(["positive"] * 6 + ["negative", "neutral"]) for _ in range(300)]

    def results_of(run, sections):
        out = {}
        for section, (summaries, answers) in sections.items():
            write_generations(run, section, {"summary": _rows(refs, summaries),
                                             **({"sentiment": _rows(labels, answers)} if answers else {})})
            out[section] = {"summary": {**rouge(summaries, refs), "examples": 300}}
            if answers:
                out[section]["sentiment"] = {**classification_metrics(answers, labels),
                                             "label_set": ["negative", "neutral", "positive"], "examples": 300}
        return out

    tie = results_of(tmp_path / "tie", {"baseline": (lead, None), "finetuned": (near, None)})
    md = write_report(tmp_path / "tie", tie)
    c = tie["finetuned"]["summary"]["vs"]["baseline"]
    assert -0.002 < c["diff"] < 0 and c["ci"][0] < 0 < c["ci"][1] and c["verdict"] == "tie", c
    assert "a tie with the baseline" in md and "better than" not in md

    win = results_of(tmp_path / "win", {"baseline": (lead, ["positive"] * 300), "finetuned": (good, labels)})
    md = write_report(tmp_path / "win", win)
    assert win["finetuned"]["summary"]["vs"]["baseline"]["verdict"] == "better"
    assert win["finetuned"]["sentiment"]["vs"]["baseline"]["verdict"] == "better"
    lo, hi = win["baseline"]["sentiment"]["macro_f1_ci"]
    assert lo <= win["baseline"]["sentiment"]["macro_f1"] <= hi < 0.35  # always "positive"
    assert "**better than the baseline**" in md and "[lo, hi]" in md


def test_a_report_without_paired_intervals_says_why(tmp_path):
    """Sections scored on other examples (a base evaluated before eval.* changed) or without their
    per-example answers cannot be paired: the report says so, per task, instead of dropping the
    intervals and comparing point estimates without a word."""
    from ftcore.evaluation.metrics import rouge
    from ftcore.evaluation.report import write_generations, write_report
    refs = ["good dog food", "tasty coffee", "bad tea"] * 10
    outs = ["good food", "coffee", "tea"] * 10
    run = tmp_path / "run"
    write_generations(run, "base", {"summary": _rows(refs[:20], outs[:20])})  # fewer examples than the fine-tuned
    write_generations(run, "finetuned", {"summary": _rows(refs, outs)})
    results = {s: {"summary": {**rouge(o, r), "examples": len(r)}} for s, r, o in
               (("base", refs[:20], outs[:20]), ("finetuned", refs, outs))}
    md = write_report(run, results)
    assert "vs" not in results["finetuned"]["summary"]
    assert results["finetuned"]["summary"]["no_intervals"] == "finetuned scored other examples than base"
    assert "no paired intervals (finetuned scored other examples than base): point estimates only" in md
    assert "No 95 % intervals for summary: finetuned scored other examples than base." in md

    results = {s: {"summary": {**rouge(outs, refs), "examples": 30}} for s in ("base_kshot", "finetuned")}
    md = write_report(run, results)  # generations/base_kshot.jsonl was never written
    assert "no per-example answers of base_kshot in generations/" in md
