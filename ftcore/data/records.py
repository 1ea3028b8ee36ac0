"""Records: load .jsonl / .json / .csv into dicts, apply data.rename, give each an id, and split
them into train / validation / test by record (every template instance of a record lands in one
split)."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Iterable

_PRIVATE = ("record_id", "_where")  # keys the loader adds to every record


class DataError(ValueError):
    """Bad input data or data settings: the message says what and where (file:line, key)."""


# ----------------------------------------------------------------------------------------------
# loading: .jsonl, .json (an array of objects), .csv; each record gets record_id and _where

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


def load_records(path: str | Path, format: str = "") -> list[dict]:
    """The file's records as dicts, values as the file has them (CSV: all strings). Each gets
    record_id (its `id` field, else its 0-based position in the file) and _where ("file:line",
    for error messages)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}")
    fmt = format or FORMATS.get(path.suffix.lower())
    if fmt not in ("jsonl", "json", "csv"):
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        "set data.format to jsonl, json or csv")
    records = {"jsonl": _load_jsonl, "json": _load_json, "csv": _load_csv}[fmt](path)
    for i, r in enumerate(records):
        r["record_id"] = str(r["id"]) if r.get("id") not in (None, "") else str(i)
    return records


def _load_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            obj["_where"] = f"{path}:{lineno}"
            out.append(obj)
    return out


def _load_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__} "
                        "(one object per line? name the file .jsonl)")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
        obj["_where"] = f"{path}: item {i}"
    return data


def _load_csv(path: Path) -> list[dict]:
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            dup = next((c for c in header if header.count(c) > 1), None)
            if dup is not None:
                raise DataError(f"{path}:1: column {dup!r} appears twice in the header")
            start = reader.line_num + 1
            for row in reader:
                extra = row.pop(None, None) or []             # more values than columns
                missing = sum(v is None for v in row.values())  # fewer
                if extra or missing:
                    n = len(header) + len(extra) - missing
                    raise DataError(f"{path}:{start}: row has {n} values, the header has {len(header)} columns")
                row["_where"] = f"{path}:{start}"
                out.append(row)
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    return out


def apply_rename(records: list[dict], rename: dict[str, str], source: str) -> list[dict]:
    """data.rename = {column: field}; record_id follows a renamed `id`. A column no record has is a
    typo that would otherwise pass silently (the field may even exist under its own name)."""
    if not rename:
        return records
    have = {k for r in records for k in r}
    for column in rename:
        if records and column not in have:
            found = ", ".join(sorted(have - set(_PRIVATE))) or "none"
            raise DataError(f"{source}: data.rename maps a column '{column}' that no record has (columns found: {found})")
    out = []
    for r in records:
        r2 = {rename.get(k, k): v for k, v in r.items()}
        if r2.get("id") not in (None, ""):
            r2["record_id"] = str(r2["id"])
        out.append(r2)
    return out


def ensure_record_ids(records: list[dict], source: str) -> list[dict]:
    """Records handed in directly (or generated) get record_id and _where like loaded ones."""
    out = []
    for i, r in enumerate(records):
        if "record_id" not in r or "_where" not in r:
            r = dict(r)
            r.setdefault("record_id", str(r["id"]) if r.get("id") not in (None, "") else str(i))
            r.setdefault("_where", f"{source}: record {r['record_id']}")
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# splitting by record

def check_unique_ids(records: list[dict]) -> None:
    """Records are split by id: two records with one id would be one group, so a file whose ids
    repeat (or are all equal) would silently leave a split empty."""
    first: dict[str, str] = {}
    for r in records:
        rid = r["record_id"]
        if rid in first:
            raise DataError(f"{r.get('_where', 'record')}: id {rid!r} was already used at {first[rid]}; "
                            "record ids must be unique (fix the file, drop repeated rows with data.dedupe, "
                            "or rename the id column away with data.rename)")
        first[rid] = r.get("_where", "?")


def split_records(records: list[dict], ratios: Iterable[float], seed: int = 0) -> tuple[list, list, list]:
    """Deterministic train/validation/test split of the records, grouped by record_id (all copies
    of a record, and so every template instance of it, land in one split). Group counts follow the
    ratios exactly (largest remainder), and a split with a non-zero ratio gets at least one group
    when there are enough. Each split comes back in a seeded shuffled order."""
    ratios = [float(x) for x in ratios]
    if len(ratios) != 3 or any(x < 0 for x in ratios) or sum(ratios) <= 0:
        raise DataError(f"data.split must be three non-negative ratios (train, validation, test), got {ratios}")
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.get("record_id", i)), []).append(r)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    exact = [n * x / sum(ratios) for x in ratios]
    counts = [int(e) for e in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    for i in range(3):  # e.g. 5 records at 0.8/0.1/0.1 still give a validation and a test record
        if ratios[i] > 0 and counts[i] == 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    bounds = [0, counts[0], counts[0] + counts[1], n]
    return tuple([r for k in keys[bounds[s]:bounds[s + 1]] for r in groups[k]] for s in range(3))


