"""Tokenised examples: prompt + completion -> input_ids with a completion mask in `labels`,
truncation that keeps the answer, and their statistics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftcore.model import IGNORE_INDEX
from ftcore.data.records import DataError
from ftcore.data.rendering import Rendered
from ftcore.data.templates import label_counts  # noqa: F401 (re-exported)


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
    context_len: int = 0  # leading tokens shared by every example: bos, a chat template's system turn
    choices: tuple[str, ...] = ()  # the template's answer choices for this record (its task's labels)

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
        """Tokens that carry loss once labels are shifted (position t predicts token t + 1): a label
        on the first token has no position before it, so it is never a target."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def _cut_middle(ids: list[int], labels: list[int], keep: int) -> tuple[list[int], list[int]]:
    if keep <= 0:
        return [], []
    head = keep // 2
    tail = keep - head
    return ids[:head] + ids[len(ids) - tail:], labels[:head] + labels[len(labels) - tail:]


def tokenize_examples(rendered: list[Rendered], tokenizer, *, max_seq_len: int = 512,
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
        prefix, prefix_labels, context = [], [], 0
        for i, (text, train) in enumerate(r.segments[:-1]):
            ids = encoded[k]
            k += 1
            prefix += ids
            prefix_labels += ids if train else [IGNORE_INDEX] * len(ids)
            if i < r.context_segments:
                context += len(ids)
        comp = encoded[k]
        k += 1
        if add_bos and prefix[:1] == [bos_id]:  # the text had BOS already: keep exactly one
            prefix, prefix_labels = prefix[1:], prefix_labels[1:]
            context = max(context - 1, 0)
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
                context = min(context, max(room, 0) // 2)  # _cut_middle keeps the head
                counts["truncated_prompt"] += 1
                truncated = True

        bos = [bos_id] if add_bos else []
        input_ids = bos + prefix + comp + eos
        labels = [IGNORE_INDEX] * n_bos + prefix_labels + comp + eos
        out.append(Example(r.record_id, r.template, r.kind, r.prompt, r.completion, input_ids, labels,
                           n_bos + len(prefix), truncated, n_bos + context, r.choices))
    return out


def example_stats(examples: list[Example]) -> dict[str, Any]:
    lengths = [len(e) for e in examples]
    targets = sum(e.num_targets for e in examples)
    per_template: dict[str, int] = {}
    for e in examples:
        per_template[e.template] = per_template.get(e.template, 0) + 1
    return {"examples": len(examples), "tokens": sum(lengths), "completion_tokens": targets,
            "mean_len": sum(lengths) / max(len(lengths), 1), "max_len": max(lengths, default=0),
            "truncated": sum(e.truncated for e in examples), "templates": per_template}



def group_by_task(examples, max_examples: int = 0, max_heldout_examples: int = 0) -> dict[str, list]:
    """Examples per task (template name, in order of first appearance), at most max_examples each
    (0 = all); a held-out paraphrase ('rating@heldout1') at most max_heldout_examples (0 = as the others)."""
    tasks: dict[str, list] = {}
    for ex in examples:
        group = tasks.setdefault(ex.template, [])
        cap = max_heldout_examples if "@" in ex.template and max_heldout_examples else max_examples
        if not cap or len(group) < cap:
            group.append(ex)
    return tasks
