"""Instruction data, assembled for a run from its stages: records (ftcore.data.records: load, rename,
split), rendering (ftcore.data.rendering: text segments, in a chat template (ftcore.data.chat) when
there is one), tokenisation with a completion mask (ftcore.data.examples), batching
(ftcore.data.batching: pad, bucket or pack).

    records (dicts)  --split by record-->  train / validation / test records
        --render (templates, or the record's own instruction format; a chat template)-->  Rendered
        --tokenize (batch encode, BOS once, + eos, truncation)-->  Example(input_ids, labels)
        --StepSampler (seed, step) + micro_batches (rank, world)-->  {input_ids, labels, position_ids[, doc_ids]}

Conventions that other modules rely on:
- `Example.labels` has the same length as `input_ids`, -100 on prompt tokens, the token itself on
  completion (+ eos) tokens: NOT shifted. `collate` shifts: `batch["labels"][b, t]` is the target
  of position t (the token at t + 1), -100 on prompt, padding and each example's last position.
- A record in a standard instruction format is rendered as such, whatever data.templates says:
  `messages` [{role, content}] (chat, loss on every assistant turn or the last, data.train_on),
  instruction/input/output (Alpaca prompt), prompt/completion (verbatim). Every other record is
  rendered with the templates.
- In a chat template the text is exactly what the template renders (transformers'
  apply_chat_template), tokenized as one text; loss on each trained assistant's content and its
  end-of-turn marker (ftcore.data.chat); plain completions lose their leading space there.
- When [bos] + prompt + completion + [eos] exceeds data.max_seq_len, a completion of at most
  data.max_completion_tokens tokens is kept whole and the prompt is cut in the middle (the
  instruction at its start and the answer cue at its end survive; the record text between them
  loses its middle). A longer completion is cut to max_completion_tokens (without eos: the model
  must not learn to stop mid-sentence) or the example is dropped, per data.overlong. Counted.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore.config import DataConfig, TrainConfig
from ftcore.data.batching import (StepSampler, collate, micro_batches, order_for_batching, pack_rows,  # noqa: F401
                             padding_share)
from ftcore.data.cleaning import clean_records, dedupe
from ftcore.data.examples import Example, example_stats, label_counts, tokenize_examples  # noqa: F401
from ftcore.model import IGNORE_INDEX  # noqa: F401 (re-exported)
from ftcore.data.records import (_PRIVATE, FORMATS, DataError, apply_rename, check_unique_ids,  # noqa: F401
                            ensure_record_ids, load_records, split_records)
from ftcore.data.chat import (CHAT_FORMATS, ChatTemplate, chat_template, check_chat_template,  # noqa: F401 (re-exported)
                              set_chat_template)
from ftcore.data.rendering import (Rendered, balance_classes, record_format, render_chat, render_record,  # noqa: F401
                                   render_records)
from ftcore.data.reviews import generate_reviews
from ftcore.data.jinja_templates import JinjaTemplate
from ftcore.data.templates import DERIVED_FROM, Template, TemplateError, heldout_templates
from ftcore.data.template_sources import resolve_templates

# The modules above hold each stage; this one assembles a run's datasets from them (and re-exports
# their names, which is where users and tests have always imported them from).


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
# the datasets of a run

@dataclass
class Datasets:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    stats: dict
    records: dict[str, list[dict]] = field(default_factory=dict)  # split name -> its records
    answer_forms: list[Example] = field(default_factory=list)     # each answer choice written as an answer

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


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


def prepare_datasets(data_cfg: DataConfig, tokenizer, records: list[dict] | None = None, seed: int = 0,
                     train_cfg: TrainConfig | None = None) -> Datasets:
    """The splits of `seed` (a run's run.seed). Training examples: each train record with each
    template, per weights (see render_records); validation/test: each record with every selected
    template once (per-task metrics). train_cfg: the padding share of its batches is estimated."""
    if not isinstance(data_cfg, DataConfig):  # a whole Config was accepted once: say what changed
        raise TypeError(f"prepare_datasets takes a DataConfig (cfg.data, with seed=cfg.run.seed), "
                        f"got {type(data_cfg).__name__}")
    source = data_source(data_cfg) if records is None else "records"
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
    chat = chat_template(data_cfg, tokenizer)  # run on a probe conversation: a template that fails stops here
    messages_chat = None  # `messages` records: that template whatever data.prompt_format says, else data.chat_format
    if any(record_format(r) == "chat" for r in records):
        messages_chat = chat or chat_template(data_cfg, tokenizer, messages=True)
    is_csv = source == data_cfg.path and \
        (data_cfg.format or FORMATS.get(Path(data_cfg.path).suffix.lower())) == "csv"
    check_fields(records, templates, data_cfg.rename, source, "column" if is_csv else "field")

    check_unique_ids(records)
    splits = dict(zip(("train", "validation", "test"), split_records(records, data_cfg.split, seed)))
    stats: dict[str, Any] = {"source": source, "seed": seed, "batching": data_cfg.batching,
                             "prompt_format": "chat" if chat else "plain",
                             "chat_template": (chat or messages_chat).source if (chat or messages_chat) else "",
                             "max_seq_len": data_cfg.max_seq_len, "skipped_missing": {}, "splits": {},
                             "duplicates_dropped": counts.get("duplicates_dropped", 0)}
    examples = {}
    for name, recs in splits.items():
        skipped: dict[str, int] = {}
        rng = random.Random(seed) if name == "train" else None
        rendered = render_records(recs, templates, chat=chat, messages_chat=messages_chat, train_on=data_cfg.train_on,
                                  missing_field=data_cfg.missing_field, skipped=skipped, rng=rng,
                                  paraphrases=data_cfg.paraphrases)
        if rng is not None:
            # the data's own label distribution, before any balancing: the majority baseline's
            stats["train_labels"] = label_counts(rendered)
            if data_cfg.balance > 0:
                rendered = balance_classes(rendered, data_cfg.balance, rng)
        counts: dict[str, int] = {}
        examples[name] = tokenize_examples(rendered, tokenizer, max_seq_len=data_cfg.max_seq_len,
                                           max_completion_tokens=data_cfg.max_completion_tokens,
                                           overlong=data_cfg.overlong, counts=counts)
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
    forms = tokenize_examples(answer_forms(splits["train"], templates, chat), tokenizer,
                              max_seq_len=data_cfg.max_seq_len, max_completion_tokens=data_cfg.max_completion_tokens)
    return Datasets(examples["train"], examples["validation"], examples["test"], stats, splits, forms)


def answer_forms(records: list[dict], templates, chat) -> list[Rendered]:
    """Each answer choice of each template that has answer_choices, written as the template's
    answer to the first record it renders: the tokens ranked scoring gives each label, a label no
    training example has included."""
    out: list[Rendered] = []
    for template, _ in templates:
        if not isinstance(template, JinjaTemplate) or template.answer_choices is None:
            continue
        for r in records:
            if record_format(r) is None:
                try:
                    out += [render_record(r, template.answering(c), chat) for c in template.choices(r)]
                    break
                except TemplateError:  # not this record (a field missing, no answer): the next one
                    continue
    return out


def heldout_examples(records_or_split, tokenizer, data_cfg: DataConfig) -> list[Example]:
    """The records (default: a Datasets' test records) rendered with the held-out paraphrases of
    every selected built-in template; template names like 'rating@heldout1'. Records lacking a
    field are skipped here whatever data.missing_field says (they were handled already)."""
    records = records_or_split.records["test"] if isinstance(records_or_split, Datasets) else records_or_split
    paraphrases = [(h, 1.0) for t, _ in resolve_templates(data_cfg) for h in heldout_templates(t.name)]
    plain = [r for r in records if record_format(r) is None]
    rendered = render_records(plain, paraphrases, chat=chat_template(data_cfg, tokenizer), missing_field="skip")
    return tokenize_examples(rendered, tokenizer, max_seq_len=data_cfg.max_seq_len,
                             max_completion_tokens=data_cfg.max_completion_tokens, overlong=data_cfg.overlong)


# ----------------------------------------------------------------------------------------------
# statistics

def _shares(counts: dict[str, int]) -> str:
    total = max(sum(counts.values()), 1)
    return ", ".join(f"{k} {n / total:.0%}" for k, n in counts.items())


def format_stats(stats: dict) -> str:
    """The table printed before training."""
    prompts = "in " + stats["chat_template"] if stats.get("prompt_format") == "chat" else "plain"
    lines = [f"data: {stats['source']}, split seed {stats['seed']}, max_seq_len {stats['max_seq_len']}, "
             f"prompts {prompts}"]
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


