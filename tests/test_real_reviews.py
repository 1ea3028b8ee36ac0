"""Real review data as distributed: the Amazon Fine Food Reviews.csv layout (HTML in the text,
duplicate reviews, skewed ratings), class balancing, the recipe config, the run's curves.

The data here is a small generated file in that layout, never the real one."""
from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from ftcore.data.cleaning import clean_html, dedupe
from ftcore.config import ConfigError, load_config
from ftcore.data import Rendered, balance_classes, load_data_records, prepare_datasets
from ftcore.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["Id", "ProductId", "UserId", "ProfileName", "HelpfulnessNumerator", "HelpfulnessDenominator",
           "Score", "Time", "Summary", "Text"]
WORDS = {5: "great tasty love perfect", 4: "good nice fine", 3: "okay average bland", 2: "stale poor", 1: "awful rotten"}


def write_reviews_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Reviews.csv as Kaggle distributes it: skewed scores, <br /> breaks, links, entities,
    quoted commas and newlines, and a few reviews posted twice under another product id."""
    rng = random.Random(seed)
    rows = []
    for i in range(1, n + 1):
        score = rng.choices([1, 2, 3, 4, 5], weights=[9, 6, 9, 14, 62])[0]
        words = " ".join(rng.choice(WORDS[score].split()) for _ in range(12))
        text = (f"I bought the <a href=\"http://www.amazon.com/gp/product/B00{i}\">Snack {i}</a> box, "
                f"&quot;{words}&quot;.<br /><br />Would I buy it again?  {'Yes' if score > 3 else 'No'} &amp; done.")
        rows.append([i, f"B00{i}", f"U{i}", f"user, {i}", 0, 0, score, 1300000000 + i, f"{words.split()[0]} snack", text])
    for j in (3, 7, 11):  # the same review under a product variant
        rows.append([n + j, f"B99{j}"] + rows[j - 1][2:])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return path


RECIPE = ROOT / "configs" / "amazon_reviews_cpu.toml"


def test_clean_html_as_the_shared_sample_was_cleaned():
    assert clean_html("Great!<br /><br />Would buy <a href=\"x\">this</a> again &amp; again&#8230;") == \
        "Great!\n\nWould buy this again & again\u2026"
    assert clean_html("  a \t b\u00a0 c <br>\n\n\n<br/>d  ") == "a b c\n\nd"
    assert clean_html("I <3 it, 2 < 3 > 1") == "I <3 it, 2 < 3 > 1"  # not tags
    assert clean_html("Fine &quot;food&quot;") == "Fine \"food\""
    kept, dropped = dedupe([{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 1, "b": "x"}], ["a", "b"])
    assert dropped == 1 and [r["a"] for r in kept] == [1, 2]


def test_recipe_reads_the_reviews_csv_layout(tmp_path):
    path = write_reviews_csv(tmp_path / "Reviews.csv")
    cfg = load_config(RECIPE, [f"data.path={path}"])
    records = load_data_records(cfg.data)
    assert len(records) == 120  # 123 rows, 3 duplicates dropped (max_records 7567 > rows)
    r = records[0]
    assert r["record_id"] == "1" and int(r["rating"]) in range(1, 6)
    assert "<" not in r["text"] and "&quot;" not in r["text"] and "\n\n" in r["text"]
    assert r["text"].startswith("I bought the Snack 1 box, \"") and r["text"].endswith("& done.")
    # the same rows from JSON Lines give the same records
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"id": int(x["record_id"]), "score": int(x["rating"]), "summary": x["summary"],
                                         "text": x["text"]}) + "\n" for x in records))
    same = load_data_records(load_config(RECIPE, [f"data.path={jsonl}", 'data.rename={score="rating"}']).data)
    assert [(x["record_id"], x["rating"], x["summary"], x["text"]) for x in same] == \
        [(x["record_id"], int(x["rating"]), x["summary"], x["text"]) for x in records]
    with pytest.raises(Exception, match="data.dedupe: no record has a field 'title'"):
        load_data_records(load_config(RECIPE, [f"data.path={path}", 'data.dedupe=["title"]']).data)


def test_balance_classes_evens_out_labels_and_keeps_the_task_mix():
    labels = ["5"] * 620 + ["4"] * 140 + ["3"] * 90 + ["2"] * 60 + ["1"] * 90
    rendered = [Rendered.simple("p", f" {x}", record_id=str(i), template="rating", kind="classification")
                for i, x in enumerate(labels)]
    rendered += [Rendered.simple("p", " a summary", record_id=str(i), template="summary", kind="summarization")
                 for i in range(300)]
    full = balance_classes(rendered, 1.0, random.Random(0))
    counts = Counter(r.completion.strip() for r in full if r.template == "rating")
    assert all(abs(n - 200) < 40 for n in counts.values()), counts  # 1000 examples / 5 classes
    assert abs(sum(counts.values()) - 1000) < 50 and sum(r.template == "summary" for r in full) == 300
    half = Counter(r.completion.strip() for r in balance_classes(rendered, 0.5, random.Random(0)) if r.template == "rating")
    assert counts["5"] < half["5"] < 620 and 60 < half["2"] < counts["2"]
    assert balance_classes(rendered, 0.0, random.Random(0)) == rendered
    with pytest.raises(ConfigError, match="data.balance"):
        load_config(None, ["data.balance=1.5"])


def test_balanced_training_split_only(tmp_path):
    path = write_reviews_csv(tmp_path / "Reviews.csv", n=200)
    cfg = load_config(RECIPE, [f"data.path={path}", "data.max_seq_len=128", "data.max_completion_tokens=32"])
    tok = Tokenizer.train_bpe([r["text"] for r in load_data_records(cfg.data)], 400)
    ds = prepare_datasets(cfg.data, tok, seed=cfg.run.seed)
    train = ds.stats["splits"]["train"]["labels"]["rating"]
    test = ds.stats["splits"]["test"]["labels"]["rating"]
    assert max(train.values()) < 2 * min(train.values())  # balanced
    assert max(test.values()) > 3 * min(test.values())    # evaluation keeps the real skew


def test_recipe_end_to_end_and_curves(tmp_path):
    """The recipe on a generated Reviews.csv, shrunk to seconds: base model pretrained here, the
    whole report (baselines, macro-F1, confusion matrix) and curves.png linked from eval.md."""
    from ftcore.cli import main
    path = write_reviews_csv(tmp_path / "Reviews.csv", n=80)
    run = tmp_path / "run"
    rc = main(["train", str(RECIPE), f"data.path={path}", f"run.dir={run}", "pretrain.steps=3",
               "pretrain.vocab_size=300", "pretrain.hidden_size=32", "pretrain.num_heads=2", "pretrain.num_kv_heads=1",
               "pretrain.intermediate_size=64", "pretrain.seq_len=64", "pretrain.batch_size=2", "train.max_steps=4",
               "train.global_batch_size=4", "train.micro_batch_size=2", "eval.every=2", "eval.max_new_tokens=4",
               "data.max_seq_len=128", "data.max_completion_tokens=32", "log.every=1", "log.progress=false"])
    assert rc == 0
    data = json.loads((run / "eval.json").read_text())
    assert list(data) == ["baseline", "base", "base_kshot", "finetuned"]
    assert data["baseline"]["rating"]["majority_answer"] == "5"
    for section in ("base", "base_kshot", "finetuned"):
        for task in ("rating", "sentiment"):
            assert {"macro_f1", "rank_macro_f1", "confusion"} <= set(data[section][task])
        assert data[section]["rating"]["examples"] == 8  # the whole test split: 10 % of 80 records
    assert "lead_words" in data["baseline"]["summary"]
    assert (run / "curves.png").stat().st_size > 1000
    md = (run / "eval.md").read_text()
    assert "![training curves](curves.png)" in md and "Confusion matrix, fine-tuned" in md


def test_plot_errors(tmp_path):
    from ftcore.cli import main
    assert main(["plot", str(tmp_path)]) == 2
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2.0}\n')
    assert main(["plot", str(tmp_path)]) == 2
