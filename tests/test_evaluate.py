"""Evaluation driver: completion loss / perplexity, metrics per task kind, k-shot, the report."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ftcore.config import Config, EvalConfig
from ftcore.data import Rendered, tokenize_examples
from ftcore.evaluate import (_ShotBuilder, accuracy, completion_loss, evaluate_model, generation_metrics,
                             normalize_label, read_generations, run_eval, write_generations, write_report)
from ftcore.model import ModelConfig, Transformer
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
EXPECTED = {"classification": {"accuracy"}, "summarization": {"rouge1", "rouge2", "rougeL"},
            "generation": {"bleu", "rougeL"}, "translation": {"bleu", "rougeL"}}
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
    assert g == {"bleu": pytest.approx(100.0), "rougeL": 1.0}
    assert set(generation_metrics("summarization", ["a"], ["b"])) == {"rouge1", "rouge2", "rougeL"}
    with pytest.raises(ValueError):
        generation_metrics("poetry", ["a"], ["b"])


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
        assert all(math.isfinite(v) for v in m.values())
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        exs = [e for e in examples if e.template == task][:3]
        assert m["prompt_tokens"] == pytest.approx(sum(e.prompt_len for e in exs) / len(exs))
        # the metrics are computed from exactly the outputs reported
        preds = [o["output"] for o in outputs[task]]
        assert [o["reference"] for o in outputs[task]] == [e.completion for e in exs]
        assert {k: m[k] for k in EXPECTED[kind]} == generation_metrics(kind, preds, [e.completion for e in exs])
    # deterministic (greedy)
    assert evaluate_model(model, tok, examples, cfg, "cpu", progress=False) == results


def test_kshot_prompts(tok):
    model = tiny_model(tok.vocab_size)
    examples, pool = make_examples(tok), make_examples(tok, prefix="train")
    builder = _ShotBuilder(tok, pool, k=2, max_len=512, seed=0)
    ex = examples[0]
    ids, labels, prompt_len = builder(ex, room_for_new=8)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # one bos, in front
    assert ids[-len(ex.input_ids) + 1:] == ex.input_ids[1:] and labels[-len(ex.labels) + 1:] == ex.labels[1:]
    assert ids[prompt_len:] == ex.input_ids[ex.prompt_len:]
    context = len(ids) - len(ex.input_ids) + 1
    assert all(lab == -100 for lab in labels[:context]) and context > 10
    assert tok.decode(ids[:context]).count("Rating:") == 2  # two solved examples of the same task
    # shots that do not fit the model's positions are dropped
    ids2, _, _ = _ShotBuilder(tok, pool, k=2, max_len=len(ex.input_ids) + 8, seed=0)(ex, room_for_new=8)
    assert ids2 == ex.input_ids

    cfg = EvalConfig(max_examples=2, shots=2, max_new_tokens=4, batch_size=4)
    zero = evaluate_model(model, tok, examples, cfg, "cpu", progress=False)
    kshot = evaluate_model(model, tok, examples, cfg, "cpu", shots_pool=pool, progress=False)
    kshot2 = evaluate_model(model, tok, examples, cfg, "cpu", shots_pool=pool, progress=False)
    assert kshot == kshot2  # shots drawn with a seed
    for task in TASKS:
        assert set(kshot[task]) == set(zero[task])
        assert kshot[task]["prompt_tokens"] > zero[task]["prompt_tokens"] + 10
        assert kshot[task]["loss"] != zero[task]["loss"]


RESULTS = {
    "base": {"rating": {"accuracy": 0.2, "loss": 2.0, "perplexity": math.exp(2.0), "prompt_tokens": 40.0, "examples": 5},
             "summary": {"rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.1, "loss": 3.0, "perplexity": math.exp(3.0),
                         "prompt_tokens": 50.0, "examples": 5}},
    "finetuned": {"rating": {"accuracy": 0.8, "loss": 0.5, "perplexity": math.exp(0.5), "prompt_tokens": 40.0, "examples": 5},
                  "summary": {"rouge1": 0.4, "rouge2": 0.2, "rougeL": 0.35, "loss": 1.5, "perplexity": math.exp(1.5),
                              "prompt_tokens": 50.0, "examples": 5}},
    "base_kshot": {"rating": {"accuracy": 0.4, "loss": 1.5, "perplexity": math.exp(1.5), "prompt_tokens": 160.0, "examples": 5},
                   "summary": {"rouge1": 0.2, "rouge2": 0.1, "rougeL": 0.2, "loss": 2.5, "perplexity": math.exp(2.5),
                               "prompt_tokens": 200.0, "examples": 5}},
}


def test_write_report(tmp_path):
    samples = [{"task": "rating", "prompt": "Review: great | love it\nRating:", "reference": " 5",
                "outputs": {"base": " 3", "base_kshot": "5", "finetuned": " 5"}}]
    md = write_report(tmp_path, RESULTS, samples, shots=3)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data == RESULTS and list(data) == ["base", "base_kshot", "finetuned"]
    assert (tmp_path / "eval.md").read_text() == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md"]  # no temp files left
    assert "## rating" in md and "## summary" in md
    assert "| metric | base | base 3-shot | fine-tuned | Δ |" in md
    assert "| accuracy | 0.2000 | 0.4000 | 0.8000 | +0.6000 |" in md
    assert "| loss | 2.0000 | 1.5000 | 0.5000 | -1.5000 |" in md
    assert "| prompt_tokens | 40.00 | 160.00 | 40.00 | – |" in md
    assert "great \\| love it" not in md.split("```")[0]  # prompt shown in a code block
    assert "| 5 | 3 | 5 | 5 |" in md

    # without a base section there is no difference column
    md = write_report(tmp_path / "ft", {"finetuned": RESULTS["finetuned"]}, samples=[])
    assert "| metric | fine-tuned |" in md and "Δ" not in md
    assert json.loads((tmp_path / "ft" / "eval.json").read_text()) == {"finetuned": RESULTS["finetuned"]}


def test_report_samples_from_generation_files(tmp_path):
    for section, out in (("base", "three"), ("finetuned", "5")):
        write_generations(tmp_path, section, {"rating": [{"prompt": f"p{i}", "reference": "5", "output": out}
                                                         for i in range(4)]})
    assert len(read_generations(tmp_path, ["base", "finetuned"])["base"]["rating"]) == 4
    md = write_report(tmp_path, {"base": RESULTS["base"], "finetuned": RESULTS["finetuned"]}, n_samples=2)
    assert md.count("### rating") == 2 and "| 5 | three | 5 |" in md


def test_run_eval_end_to_end(tmp_path):
    """`ftcore eval` on the embedded synthetic reviews: two tiny models, k-shot, held-out paraphrases."""
    from ftcore.reviews import generate_reviews, pretraining_texts
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
    assert list(data) == ["base", "base_kshot", "finetuned"] and data == json.loads(json.dumps(results))
    tasks = set(data["base"])
    kinds = {"rating": "classification", "sentiment": "classification", "review": "generation", "summary": "summarization"}
    assert {t.split("@")[0] for t in tasks} == set(kinds)
    assert any("@heldout" in t for t in tasks)
    for section in data.values():
        assert set(section) == tasks
        for task, m in section.items():
            assert set(m) == EXPECTED[kinds[task.split("@")[0]]] | COMMON
            assert m["examples"] == 2
    for task in tasks:
        assert data["base_kshot"][task]["prompt_tokens"] > data["base"][task]["prompt_tokens"]
    md = (tmp_path / "run" / "eval.md").read_text()
    assert "base 1-shot" in md and md.count("### ") == len(tasks)
    assert (tmp_path / "run" / "generations" / "base_kshot.jsonl").is_file()
