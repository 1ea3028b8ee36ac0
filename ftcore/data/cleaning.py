"""Record cleaning for data as distributed: HTML in text fields, and duplicate records.

Scraped review dumps such as Amazon Fine Food's Reviews.csv keep the site's markup: `<br />` line
breaks, links around product names, `&quot;`-style entities. `clean_html` turns such a field into
plain text; `dedupe` drops records that repeat an earlier one (the same review posted under
several variants of a product), so that no test review is also a training review.
"""
from __future__ import annotations

import html
import re

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")   # a tag starts with a letter: "a <3 b" is text
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_html(text: str) -> str:
    """<br> -> newline; other tags removed, their text kept; entities decoded; runs of spaces,
    tabs and non-breaking spaces -> one space; lines stripped; at most one blank line in a row."""
    text = html.unescape(_TAG.sub("", _BREAK.sub("\n", text)))
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def clean_records(records: list[dict], mode: str) -> list[dict]:
    """data.clean: "" leaves records as they are; "html" applies clean_html to every string value."""
    if not mode:
        return records
    return [{k: clean_html(v) if isinstance(v, str) and k not in ("record_id", "_where") else v
             for k, v in r.items()} for r in records]


def dedupe(records: list[dict], fields: list[str]) -> tuple[list[dict], int]:
    """(records without those equal to an earlier one on every field in `fields`, how many were
    dropped). The first of each group, in file order, is kept."""
    if not fields:
        return records, 0
    seen, kept = set(), []
    for r in records:
        key = tuple(str(r.get(f, "")) for f in fields)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(records) - len(kept)
