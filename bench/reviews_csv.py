"""The food-review sample that copies of this project carry beside them (JSON Lines: id, score,
summary, text) written out in the layout of Kaggle's Reviews.csv, which the real-data recipes
(configs/amazon_reviews_cpu.toml, configs/smollm2_reviews_cpu.toml) read:

    python bench/reviews_csv.py ../shared/data/amazon_fine_food_sample.jsonl runs/Reviews.csv

The columns the sample dropped (ProductId, UserId, ...) are left empty; Summary and Text are the
sample's cleaned text, so the recipes' HTML cleaning and de-duplication find nothing left to do.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

COLUMNS = ["Id", "ProductId", "UserId", "ProfileName", "HelpfulnessNumerator", "HelpfulnessDenominator",
           "Score", "Time", "Summary", "Text"]


def main(src: str, out: str) -> int:
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"Id": r["id"], "Score": r["score"], "Summary": r["summary"], "Text": r["text"]})
    print(f"wrote {out}: {len(rows)} reviews")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/reviews_csv.py SAMPLE.jsonl OUT.csv")
    sys.exit(main(sys.argv[1], sys.argv[2]))
