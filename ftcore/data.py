"""Instruction data: load records, split them, render prompt/completion pairs, tokenize with a
completion mask, and batch (pad, bucket or pack).

    records (dicts)  --split by record-->  train / validation / test records
        --render (templates, or the record's own instruction format)-->  Rendered
        --tokenize (batch encode, BOS once, + eos, truncation)-->  Example(input_ids, labels)
        --StepSampler (seed, step) + micro_batches (rank, world)-->  {input_ids, labels, position_ids[, doc_ids]}

Conventions that other modules rely on:
- `Example.labels` has the same length as `input_ids`, -100 on prompt tokens, the token itself on
  completion (+ eos) tokens: NOT shifted. `collate` shifts: `batch["labels"][b, t]` is the target
  of position t (the token at t + 1), -100 on prompt, padding and each example's last position.
- A record in a standard instruction format is rendered as such, whatever data.templates says:
  `messages` [{role, content}] (chat, loss on every assistant turn), instruction/input/output
  (Alpaca prompt), prompt/completion (verbatim). Every other record is rendered with the templates.
- When [bos] + prompt + completion + [eos] exceeds data.max_seq_len, a completion of at most
  data.max_completion_tokens tokens is kept whole and the prompt is cut in the middle (the
  instruction at its start and the answer cue at its end survive; the record text between them
  loses its middle). A longer completion is cut to max_completion_tokens (without eos: the model
  must not learn to stop mid-sentence) or the example is dropped, per data.overlong. Counted.
"""
from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ftcore.cleaning import clean_records, dedupe
from ftcore.reviews import generate_reviews
from ftcore.templates import DERIVED_FROM, MissingField, Template, TemplateError, heldout_templates, \
    resolve_templates, training_variants

IGNORE_INDEX = -100
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
# rendering: a record + a template (or its own instruction format) -> text segments

@dataclass
class Rendered:
    """segments: the texts in order with whether they carry loss; the last one is the completion.
    prompt/completion are the texts evaluation uses (prompt = every segment before the last)."""
    record_id: str
    template: str
    kind: str
    prompt: str
    completion: str
    segments: list[tuple[str, bool]]

    @classmethod
    def simple(cls, prompt: str, completion: str, record_id: str = "", template: str = "",
               kind: str = "generation") -> "Rendered":
        return cls(record_id, template, kind, prompt, completion, [(prompt, False), (completion, True)])


ALPACA = Template(
    "instruction",
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n", "{output}")
ALPACA_NO_INPUT = Template(
    "instruction",
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n", "{output}")
PROMPT_COMPLETION = Template("prompt_completion", "{prompt}", "{completion}")


@dataclass(frozen=True)
class ChatFormat:
    header: str  # before each message, {role} filled in
    end: str     # after each message's content; carries loss on assistant turns (the model learns to stop)
    sep: str     # between messages


CHAT_FORMATS = {
    "chatml": ChatFormat("<|im_start|>{role}\n", "<|im_end|>", "\n"),
    "llama3": ChatFormat("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""),
}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
          "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def record_format(record: dict) -> str | None:
    """'chat' | 'instruction' | 'prompt_completion', or None: rendered with data.templates."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def render_chat(record: dict, chat_format: str = "chatml") -> Rendered:
    """Every assistant turn carries loss (content + end token); messages after the last assistant
    turn are dropped (nothing to learn from them). No assistant turn: MissingField."""
    fmt = CHAT_FORMATS[chat_format]
    where = record.get("_where", "record")
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with role and content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in _ROLES:
            raise DataError(f"{where}: messages[{i}]: unknown role {role!r} (system, user, assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}]: content must be a string, got {type(content).__name__}")
        turns.append((_ROLES[role], content))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise MissingField("assistant turn", "chat")
    segments: list[tuple[str, bool]] = []
    pending = ""
    for role, content in turns[:last + 1]:
        pending += fmt.header.format(role=role)
        if role != "assistant":
            pending += content + fmt.end + fmt.sep
            continue
        segments.append((pending, False))
        segments.append((content + fmt.end, True))
        pending = fmt.sep
    prompt = "".join(text for text, _ in segments[:-1])
    return Rendered(str(record.get("record_id", "")), "chat", "generation", prompt, turns[last][1],
                    [s for s in segments if s[0]])


def render_record(record: dict, template: Template | None = None, chat_format: str = "chatml") -> Rendered:
    """The record's own instruction format if it has one, else `template`. Raises MissingField."""
    fmt = record_format(record)
    if fmt == "chat":
        return render_chat(record, chat_format)
    if fmt == "instruction":
        template = ALPACA if str(record.get("input") or "").strip() else ALPACA_NO_INPUT
    elif fmt == "prompt_completion":
        template = PROMPT_COMPLETION
    prompt, completion = template.render(record)
    return Rendered(str(record.get("record_id", "")), template.name, template.kind, prompt, completion,
                    [(prompt, False), (completion, True)])


def render_records(records: list[dict], templates: list[tuple[Template, float]], chat_format: str = "chatml",
                   missing_field: str = "skip", skipped: dict[str, int] | None = None,
                   rng: random.Random | None = None, paraphrases: bool = False) -> list[Rendered]:
    """Every record with every template. With rng (training), a template of weight w renders a
    record floor(w) times plus once more with probability frac(w): weight 0.5 = a seeded half of
    the records, weight 2 = every record twice. Records in their own instruction format are
    rendered once each. With paraphrases (and rng), each copy of a built-in template is rendered
    with the template or one of its training paraphrases, chosen by rng. A missing field is counted in `skipped[template]` or is an error, per
    missing_field; a value no derivation can use (a rating of 7) is always an error."""
    out: list[Rendered] = []
    for r in records:
        own = record_format(r) is not None
        for template, weight in ([(None, 1.0)] if own else templates):
            copies = 1
            if rng is not None and not own:
                copies = int(weight) + (rng.random() < weight - int(weight))
            if copies == 0:
                continue
            if rng is not None and paraphrases and template is not None:
                template = rng.choice(training_variants(template))
            try:
                rendered = render_record(r, template, chat_format)
            except TemplateError as e:
                name = template.name if template is not None else record_format(r)
                if missing_field == "error" or not isinstance(e, MissingField):
                    what = str(e)
                    if isinstance(e, MissingField):
                        what = "no assistant turn in 'messages'" if template is None else f"no field '{e.field}'"
                    hint = ' (data.missing_field="skip" skips such records)' if isinstance(e, MissingField) else ""
                    raise DataError(f"{r.get('_where', 'record ' + str(r.get('record_id')))}: "
                                    f"{what}, needed by template '{name}'{hint}") from None
                if skipped is not None:
                    skipped[name] = skipped.get(name, 0) + 1
                continue
            out.extend([rendered] * copies)
    return out


def balance_classes(rendered: list[Rendered], strength: float, rng: random.Random) -> list[Rendered]:
    """Resamples each classification template's examples so that a class of n examples gets a share
    proportional to n^(1 - strength) of that template's examples: 0 keeps the data's skew, 1 makes
    every class equally frequent (a class of 5 % is then drawn ~4x, one of 62 % ~0.3x for five
    classes). The template's total stays as it was, so the task mix does not change; the copies of
    an example are floor(w) plus one more with probability frac(w), drawn with `rng`."""
    from ftcore.metrics import normalize_label
    groups: dict[str, Counter] = {}
    for r in rendered:
        if r.kind == "classification":
            groups.setdefault(r.template, Counter())[normalize_label(r.completion)] += 1
    weight = {}
    for template, counts in groups.items():
        total = sum(counts.values())
        mass = sum(n ** (1 - strength) for n in counts.values())
        for label, n in counts.items():
            weight[(template, label)] = total * n ** (1 - strength) / mass / n
    out = []
    for r in rendered:
        if r.kind != "classification":
            out.append(r)
            continue
        w = weight[(r.template, normalize_label(r.completion))]
        out.extend([r] * (int(w) + (rng.random() < w - int(w))))
    return out


def label_counts(examples) -> dict[str, dict[str, int]]:
    """{template: {label: examples}} of the classification examples, labels in sorted order."""
    from ftcore.metrics import normalize_label
    counts: dict[str, Counter] = {}
    for e in examples:
        if e.kind == "classification":
            counts.setdefault(e.template, Counter())[normalize_label(e.completion)] += 1
    return {t: dict(sorted(c.items())) for t, c in counts.items()}


def check_fields(records: list[dict], templates: list[tuple[Template, float]], rename: dict[str, str],
                 source: str, kind: str = "field") -> None:
    """A field no record has is a configuration mistake (a missing CSV column, a misspelt rename),
    not a per-record gap: one error naming the column, instead of silently skipping everything."""
    plain = [r for r in records if record_format(r) is None]
    if not plain:
        return
    have = {k for r in plain for k, v in r.items()
            if k not in _PRIVATE and v is not None and not (isinstance(v, str) and not v.strip())}
    column_of = {v: k for k, v in rename.items()}
    for template, _ in templates:
        for f in sorted(template.fields):
            if f in have:
                continue
            if f in DERIVED_FROM and (DERIVED_FROM[f] is None or DERIVED_FROM[f] in have):
                continue
            need = DERIVED_FROM.get(f) or f  # sentiment is missing because rating is
            col = column_of.get(need, need)
            renamed = f" (renamed to '{need}')" if col != need else ""
            via = f" for '{f}'" if need != f else ""
            found = ", ".join(sorted({k for r in plain for k in r if k not in _PRIVATE})) or "none"
            raise DataError(f"{source}: no {kind} '{col}'{renamed}, needed{via} by template '{template.name}'; "
                            f"{kind}s found: {found} (map one with data.rename={{column=\"{need}\"}})")


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


# ----------------------------------------------------------------------------------------------
# tokenizing

@dataclass
class Example:
    """input_ids = [bos?] + prompt + completion + [eos]; labels the same length, -100 on the
    prompt (in chat data: on every non-assistant token), unshifted. input_ids[:prompt_len] is what
    a model is given to generate the completion (truncated like the training input); `prompt` and
    `completion` are the untruncated texts."""
    record_id: str
    template: str
    kind: str
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[:self.prompt_len]

    @property
    def task(self) -> str:
        return self.template.split("@", 1)[0]

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _cut_middle(ids: list[int], labels: list[int], keep: int) -> tuple[list[int], list[int]]:
    if keep <= 0:
        return [], []
    head = keep // 2
    tail = keep - head
    return ids[:head] + ids[len(ids) - tail:], labels[:head] + labels[len(labels) - tail:]


def tokenize_examples(rendered: list[Rendered], tokenizer, max_seq_len: int = 512,
                      max_completion_tokens: int = 128, overlong: str = "truncate",
                      counts: dict[str, int] | None = None) -> list[Example]:
    """All segments of all examples go through the Rust batch encoder in one call (100k short
    examples take seconds); the rest is list arithmetic. counts gets truncated_prompt,
    truncated_completion and dropped_overlong added to it."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
    counts = counts if counts is not None else {}
    for k in ("truncated_prompt", "truncated_completion", "dropped_overlong"):
        counts.setdefault(k, 0)
    encoded = tokenizer.encode_batch([text for r in rendered for text, _ in r.segments])
    bos_id, add_bos = tokenizer.bos_id, tokenizer.add_bos
    eos_ids = set(tokenizer.eos_ids)
    out, k = [], 0
    for r in rendered:
        prefix, prefix_labels = [], []
        for text, train in r.segments[:-1]:
            ids = encoded[k]
            k += 1
            prefix += ids
            prefix_labels += ids if train else [IGNORE_INDEX] * len(ids)
        comp = encoded[k]
        k += 1
        if add_bos and prefix[:1] == [bos_id]:  # the text had BOS already: keep exactly one
            prefix, prefix_labels = prefix[1:], prefix_labels[1:]
        n_bos = 1 if add_bos else 0
        eos = [] if comp[-1:] and comp[-1] in eos_ids else [tokenizer.eos_id]  # chat turns may end in one
        truncated = False

        if n_bos + len(prefix) + len(comp) + len(eos) > max_seq_len:
            cap = min(max_completion_tokens, max_seq_len - n_bos - len(eos) - (1 if prefix else 0))
            if len(comp) > cap:
                if overlong == "drop":
                    counts["dropped_overlong"] += 1
                    continue
                comp, eos = comp[:cap], []
                counts["truncated_completion"] += 1
                truncated = True
            room = max_seq_len - n_bos - len(comp) - len(eos)
            if len(prefix) > room:
                prefix, prefix_labels = _cut_middle(prefix, prefix_labels, room)
                counts["truncated_prompt"] += 1
                truncated = True

        bos = [bos_id] if add_bos else []
        input_ids = bos + prefix + comp + eos
        labels = [IGNORE_INDEX] * n_bos + prefix_labels + comp + eos
        out.append(Example(r.record_id, r.template, r.kind, r.prompt, r.completion, input_ids, labels,
                           n_bos + len(prefix), truncated))
    return out


# ----------------------------------------------------------------------------------------------
# the datasets of a run

@dataclass
class Datasets:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    stats: dict
    records: dict[str, list[dict]] = field(default_factory=dict)  # split name -> its records

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def _unpack(cfg, seed: int | None):
    """Config -> (data config, seed, train config); DataConfig -> (itself, seed or 0, None)."""
    if hasattr(cfg, "data"):
        return cfg.data, cfg.run.seed if seed is None else seed, cfg.train
    return cfg, 0 if seed is None else seed, None


def data_source(data_cfg) -> str:
    if data_cfg.path:
        return str(data_cfg.path)
    s = data_cfg.synthetic
    return f"synthetic reviews ({s.num_records} records, seed {s.seed})"


def load_data_records(data_cfg, counts: dict | None = None) -> list[dict]:
    """data.path, or the embedded review generator; data.max_records, data.rename, data.clean and
    data.dedupe applied, in that order."""
    if data_cfg.path:
        records = load_records(data_cfg.path, data_cfg.format)
    else:
        records = generate_reviews(data_cfg.synthetic.num_records, data_cfg.synthetic.seed)
    records = ensure_record_ids(records, data_source(data_cfg))
    if data_cfg.max_records:
        records = records[:data_cfg.max_records]  # the first N, in file order
    return clean_and_dedupe(apply_rename(records, data_cfg.rename, data_source(data_cfg)), data_cfg, counts)


def clean_and_dedupe(records: list[dict], data_cfg, counts: dict | None = None) -> list[dict]:
    """data.clean, then data.dedupe (counted in counts["duplicates_dropped"])."""
    records = clean_records(records, data_cfg.clean)
    for f in data_cfg.dedupe:
        if records and not any(f in r for r in records):
            raise DataError(f"data.dedupe: no record has a field '{f}' (after data.rename)")
    records, dropped = dedupe(records, data_cfg.dedupe)
    if counts is not None:
        counts["duplicates_dropped"] = dropped
    return records


def prepare_datasets(cfg, tokenizer, records: list[dict] | None = None, seed: int | None = None) -> Datasets:
    """cfg: a Config (seed = run.seed; padding share estimated with train.*) or a DataConfig.
    Training examples: each train record with each template, per weights (see render_records);
    validation/test: each record with every selected template once (per-task metrics)."""
    data_cfg, seed, train_cfg = _unpack(cfg, seed)
    source = data_source(data_cfg) if records is None else "records"
    if data_cfg.chat_format not in CHAT_FORMATS:
        raise DataError(f"data.chat_format must be one of {', '.join(CHAT_FORMATS)}, got {data_cfg.chat_format!r}")
    counts: dict[str, int] = {}
    if records is None:
        records = load_data_records(data_cfg, counts)
    else:
        records = ensure_record_ids(records, source)
        if data_cfg.max_records:
            records = records[:data_cfg.max_records]
        records = clean_and_dedupe(apply_rename(records, data_cfg.rename, source), data_cfg, counts)
    if not records:
        raise DataError(f"{source}: no records")
    templates = resolve_templates(data_cfg)  # TemplateError for an unknown name
    is_csv = source == data_cfg.path and \
        (data_cfg.format or FORMATS.get(Path(data_cfg.path).suffix.lower())) == "csv"
    check_fields(records, templates, data_cfg.rename, source, "column" if is_csv else "field")

    check_unique_ids(records)
    splits = dict(zip(("train", "validation", "test"), split_records(records, data_cfg.split, seed)))
    stats: dict[str, Any] = {"source": source, "seed": seed, "batching": data_cfg.batching,
                             "max_seq_len": data_cfg.max_seq_len, "skipped_missing": {}, "splits": {},
                             "duplicates_dropped": counts.get("duplicates_dropped", 0)}
    examples = {}
    for name, recs in splits.items():
        skipped: dict[str, int] = {}
        rng = random.Random(seed) if name == "train" else None
        rendered = render_records(recs, templates, data_cfg.chat_format, data_cfg.missing_field, skipped,
                                  rng=rng, paraphrases=data_cfg.paraphrases)
        if rng is not None:
            # the data's own label distribution, before any balancing: the majority baseline's
            stats["train_labels"] = label_counts(rendered)
            if data_cfg.balance > 0:
                rendered = balance_classes(rendered, data_cfg.balance, rng)
        counts: dict[str, int] = {}
        examples[name] = tokenize_examples(rendered, tokenizer, data_cfg.max_seq_len,
                                           data_cfg.max_completion_tokens, data_cfg.overlong, counts)
        for t, n in skipped.items():
            stats["skipped_missing"][t] = stats["skipped_missing"].get(t, 0) + n
        stats["splits"][name] = {"records": len(recs), **example_stats(examples[name]), **counts,
                                 "skipped_missing": skipped, "labels": label_counts(examples[name])}

    if not examples["train"]:
        s = stats["splits"]["train"]
        skipped = ", ".join(f"{t} {n}" for t, n in s["skipped_missing"].items()) or "none"
        raise DataError(f"{source}: no training examples left after filtering ({s['records']} train records; "
                        f"skipped for a missing field: {skipped}; dropped as overlong: {s['dropped_overlong']}); "
                        "check data.templates, data.rename, data.split and data.max_seq_len")
    if train_cfg is not None:
        stats["micro_batch_size"] = train_cfg.micro_batch_size
        stats["padding_share"] = padding_share(
            [len(e) for e in examples["train"]], data_cfg.batching, train_cfg.micro_batch_size,
            train_cfg.global_batch_size, data_cfg.max_seq_len, seed)
    return Datasets(examples["train"], examples["validation"], examples["test"], stats, splits)


def heldout_examples(records_or_split, tokenizer, cfg) -> list[Example]:
    """The records (default: a Datasets' test records) rendered with the held-out paraphrases of
    every selected built-in template; template names like 'rating@heldout1'. Records lacking a
    field are skipped here whatever data.missing_field says (they were handled already)."""
    data_cfg, _, _ = _unpack(cfg, None)
    records = records_or_split.records["test"] if isinstance(records_or_split, Datasets) else records_or_split
    paraphrases = [(h, 1.0) for t, _ in resolve_templates(data_cfg) for h in heldout_templates(t.name)]
    plain = [r for r in records if record_format(r) is None]
    rendered = render_records(plain, paraphrases, data_cfg.chat_format, "skip", {})
    return tokenize_examples(rendered, tokenizer, data_cfg.max_seq_len, data_cfg.max_completion_tokens,
                             data_cfg.overlong)


# ----------------------------------------------------------------------------------------------
# statistics

def example_stats(examples: list[Example]) -> dict[str, Any]:
    lengths = [len(e) for e in examples]
    targets = sum(e.num_targets for e in examples)
    per_template: dict[str, int] = {}
    for e in examples:
        per_template[e.template] = per_template.get(e.template, 0) + 1
    return {"examples": len(examples), "tokens": sum(lengths), "completion_tokens": targets,
            "mean_len": sum(lengths) / max(len(lengths), 1), "max_len": max(lengths, default=0),
            "truncated": sum(e.truncated for e in examples), "templates": per_template}


def padding_share(lengths: list[int], mode: str, micro_batch_size: int, global_batch_size: int,
                  max_seq_len: int, seed: int = 0, max_steps: int = 200) -> float:
    """Share of padding tokens in the collated micro-batches of the first epoch (at most max_steps
    steps), as StepSampler + micro_batches would build them on one process."""
    if not lengths:
        return 0.0
    sampler = StepSampler(len(lengths), global_batch_size, seed)
    steps = min(math.ceil(len(lengths) / global_batch_size), max_steps)
    real = total = 0
    for step in range(steps):
        batch = [lengths[i] for i in sampler.indices(step)]
        if mode == "bucket":
            batch.sort(reverse=True)
        for g in range(0, len(batch), micro_batch_size):
            group = batch[g:g + micro_batch_size]
            rows = [[group[i] for i in row] for row in pack_rows(group, max_seq_len)] if mode == "pack" \
                else [[n] for n in group]
            real += sum(group)
            total += len(rows) * max(sum(row) for row in rows)
    return 1.0 - real / total


def _shares(counts: dict[str, int]) -> str:
    total = max(sum(counts.values()), 1)
    return ", ".join(f"{k} {n / total:.0%}" for k, n in counts.items())


def format_stats(stats: dict) -> str:
    """The table printed before training."""
    lines = [f"data: {stats['source']}, split seed {stats['seed']}, max_seq_len {stats['max_seq_len']}"]
    lines.append(f"  {'split':<11}{'records':>8}{'examples':>10}{'tokens':>12}{'compl. share':>14}"
                 f"{'mean len':>10}{'max len':>9}{'truncated':>11}")
    for name, s in stats["splits"].items():
        share = s["completion_tokens"] / max(s["tokens"], 1)
        lines.append(f"  {name:<11}{s['records']:>8,}{s['examples']:>10,}{s['tokens']:>12,}{share:>13.1%} "
                     f"{s['mean_len']:>10.1f}{s['max_len']:>9}{s['truncated']:>11,}")
    train = stats["splits"].get("train", {})
    if train.get("templates"):
        lines.append("  train examples per template: " +
                     ", ".join(f"{t} {n:,}" for t, n in train["templates"].items()))
    for template, counts in stats.get("train_labels", {}).items():
        balanced = train.get("labels", {}).get(template, counts)
        lines.append(f"  train labels, {template}: " + _shares(counts) +
                     (f" (balanced: {_shares(balanced)})" if balanced != counts else ""))
    if stats.get("padding_share") is not None:
        lines.append(f"  padding share (train, batching={stats['batching']}, micro-batch "
                     f"{stats['micro_batch_size']}): {stats['padding_share']:.1%}")
    tot = {k: sum(s.get(k, 0) for s in stats["splits"].values())
           for k in ("truncated_prompt", "truncated_completion", "dropped_overlong")}
    skipped = ", ".join(f"{t} {n:,}" for t, n in stats["skipped_missing"].items()) or "0"
    lines.append(f"  truncated prompts {tot['truncated_prompt']:,}, truncated completions "
                 f"{tot['truncated_completion']:,}, dropped as overlong {tot['dropped_overlong']:,}, "
                 f"skipped for a missing field: {skipped}" +
                 (f", duplicate records dropped {stats['duplicates_dropped']:,}" if stats.get("duplicates_dropped") else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# batching: which examples form a step (StepSampler), how they are split and collated

class StepSampler:
    """The global batch of optimizer step `step` is a pure function of (seed, step): the stream of
    epoch-wise seeded permutations of range(num_examples), cut into global_batch_size slices (a
    batch may straddle two epochs). Nothing depends on rank or world size; the position to save
    in a checkpoint is the step counter."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int = 0):
        if num_examples <= 0:
            raise DataError("StepSampler: no examples to sample from")
        if global_batch_size <= 0:
            raise DataError(f"StepSampler: global_batch_size must be positive, got {global_batch_size}")
        self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
        self.step = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n, start = self.num_examples, step * self.global_batch_size
        return [int(self._perm(k // n)[k % n]) for k in range(start, start + self.global_batch_size)]

    def epoch(self, step: int | None = None) -> float:
        return (self.step if step is None else step) * self.global_batch_size / self.num_examples

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        idx = self.indices(self.step)
        self.step += 1
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "num_examples": self.num_examples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_examples", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"checkpoint data position is for {key}={state[key]}, this run has "
                                f"{getattr(self, key)}: the data or batch settings changed since the checkpoint")
        self.step = int(state["step"])


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths`, grouped into rows of total <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise DataError(f"example of {lengths[i]} tokens does not fit max_seq_len={capacity}")
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate(examples: list[Example], mode: str = "pad", pad_id: int = 0,
            max_seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch. pad/bucket: a row per example, right-padded to the longest. pack: examples
    first-fit-decreasing into rows of <= max_seq_len; position_ids restart at 0 per example and
    doc_ids number the examples of a row (padding -1) for the model's document-causal mask.
    labels are shifted: labels[b, t] is the target of position t; an example's last position,
    prompt and padding are -100, so no target ever crosses into the next packed example."""
    if mode not in ("pad", "bucket", "pack"):
        raise DataError(f"data.batching must be pad, bucket or pack, got {mode!r}")
    if not examples:
        raise DataError("collate: empty micro-batch")
    if mode == "pack":
        if max_seq_len is None:
            raise DataError("collate: pack mode needs max_seq_len")
        rows = [[examples[i] for i in row] for row in pack_rows([len(e) for e in examples], max_seq_len)]
    else:
        rows = [[e] for e in examples]
    T = max(sum(len(e) for e in row) for row in rows)
    input_ids, labels, position_ids, doc_ids = [], [], [], []
    for row in rows:
        ids, lab, pos, doc = [], [], [], []
        for d, e in enumerate(row):
            ids += e.input_ids
            lab += e.labels[1:] + [IGNORE_INDEX]
            pos += range(len(e))
            doc += [d] * len(e)
        pad = T - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        # padding: positions continue in pad mode; in pack mode padding is a "document" of its own
        position_ids.append(pos + (list(range(pad)) if mode == "pack" else list(range(len(pos), T))))
        doc_ids.append(doc + [-1] * pad)
    batch = {"input_ids": torch.tensor(input_ids, dtype=torch.long),
             "labels": torch.tensor(labels, dtype=torch.long),
             "position_ids": torch.tensor(position_ids, dtype=torch.long)}
    if mode == "pack":
        batch["doc_ids"] = torch.tensor(doc_ids, dtype=torch.long)
    return batch


def order_for_batching(examples: list[Example], mode: str) -> list[Example]:
    """bucket: the global batch sorted by length (longest first, ties by position), so each
    micro-batch holds similar lengths; pad and pack: as sampled."""
    if mode == "bucket":
        return [examples[i] for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))]
    return list(examples)


def micro_batches(examples: list[Example], micro_batch_size: int, accum_steps: int, rank: int = 0,
                  world_size: int = 1, mode: str = "pad", pad_id: int = 0,
                  max_seq_len: int | None = None) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one global batch. The batch is ordered (bucket) and cut into
    accum_steps * world_size groups of micro_batch_size examples: group g = examples
    [g*m, (g+1)*m), rank r takes groups r*accum_steps ... (r+1)*accum_steps - 1. Every group is
    the same on 1 or N processes, so the step's loss is too."""
    n_groups = accum_steps * world_size
    if len(examples) != n_groups * micro_batch_size:
        raise DataError(f"global batch of {len(examples)} examples != micro_batch_size {micro_batch_size} "
                        f"x accumulation steps {accum_steps} x world size {world_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    ordered = order_for_batching(examples, mode)
    m = micro_batch_size
    return [collate(ordered[g * m:(g + 1) * m], mode, pad_id, max_seq_len)
            for g in range(rank * accum_steps, (rank + 1) * accum_steps)]
