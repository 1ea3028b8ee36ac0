"""Trivial baselines, the answers a gain must beat: the training split's majority label for
classification, the first k words of the source text for generation."""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from ftcore.data.examples import group_by_task
from ftcore.evaluation.metrics import generation_metrics, natural_order, normalize_label
from ftcore.data.rendering import record_format
from ftcore.data.templates import DERIVATIONS


def lead_source(record: dict, template) -> str:
    """The text a lead baseline copies from: the longest of the record's own fields the prompt
    shows (the review text for rating / summary prompts, the title for review writing); for a
    record in its own instruction format, its input (Alpaca), prompt, or last user turn."""
    fmt = record_format(record)
    if fmt == "instruction":
        return str(record.get("input") or record.get("instruction") or "")
    if fmt == "prompt_completion":
        return str(record.get("prompt") or "")
    if fmt == "chat":
        users = [m.get("content", m.get("value", "")) for m in record["messages"]
                 if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human")]
        return str(users[-1]) if users else ""
    values = [str(record[f]) for f in (template.prompt_fields if template is not None else [])
              if f not in DERIVATIONS and record.get(f) not in (None, "")]
    return max(values, key=len, default="")


def baseline_results(examples, train_examples, records: dict[str, dict], templates: dict,
                     max_examples: int = 0, train_labels: dict[str, dict[str, int]] | None = None,
                     outputs: dict | None = None, max_heldout_examples: int = 0) -> dict[str, dict]:
    """{task: metrics} of the trivial answers, on the same test examples as the models.
    classification: the majority label of the task's training examples, for every example
    (`majority_answer`; rank_* equal the plain metrics, since it ranks nothing; the label set is the
    template's answer_choices where it has them).
    summarization / generation / translation: the first k words of lead_source, k the median
    word count of the task's training completions (`lead_words`). records: record_id -> record;
    templates: name -> Template; train_labels: {task: {label: count}} of the training split as the
    data has it (before data.balance resampled it), else counted in train_examples. `outputs`, if a
    dict, receives {task: [{"prompt", "reference", "output"}]} as evaluate_model's does."""
    train_by_task: dict[str, list] = defaultdict(list)
    for ex in train_examples:
        train_by_task[ex.task].append(ex)
    out = {}
    for task, exs in group_by_task(examples, max_examples, max_heldout_examples).items():
        kind, pool = exs[0].kind, train_by_task.get(exs[0].task) or exs
        references = [e.completion for e in exs]
        if kind == "classification":
            counts = Counter((train_labels or {}).get(exs[0].task) or [normalize_label(e.completion) for e in pool])
            majority = counts.most_common(1)[0][0]
            answers = [majority] * len(exs)
            # the template's answer choices when one set serves every record, else the labels of training
            choices = {e.choices for e in exs}
            labels = list(dict.fromkeys(map(normalize_label, exs[0].choices))) if len(choices) == 1 and exs[0].choices \
                else sorted(counts, key=natural_order)
            m = generation_metrics(kind, answers, references, labels)
            m.update(rank_accuracy=m["accuracy"], rank_macro_f1=m["macro_f1"], majority_answer=majority, label_set=labels)
        else:
            k = max(1, round(statistics.median(len(e.completion.split()) for e in pool)))
            answers = [" ".join(lead_source(records.get(e.record_id, {}), templates.get(e.template)).split()[:k])
                       for e in exs]
            m = {**generation_metrics(kind, answers, references), "lead_words": k}
        if outputs is not None:
            outputs[task] = [{"prompt": e.prompt, "reference": e.completion, "output": a} for e, a in zip(exs, answers)]
        out[task] = {**m, "examples": len(exs)}
    return out
