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
    """input_ids = [bos?] + prompt + completion + [eos] (a chat: the conversation as its template
    renders it, tokenized as one text); labels the same length, -100 where no loss (the prompt; in
    a chat every token but the trained assistant turns' answers and end-of-turn markers),
    unshifted. input_ids[:prompt_len] is what a model is given to generate the completion
    (truncated like the training input), input_ids[prompt_len:prompt_len + answer_len] the answer
    without its end-of-turn or eos; `prompt` and `completion` are the untruncated texts, `messages`
    a chat example's conversation."""
    record_id: str
    template: str
    kind: str
    prompt: str
    completion: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool = False
    context_len: int = 0  # leading tokens that k-shot prompts keep in front of the shots: ftcore's bos
    answer_len: int = 0
    messages: list[dict] | None = None
    choices: tuple[str, ...] = ()  # the template's answer choices for this record (its task's labels)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[:self.prompt_len]

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:self.prompt_len + self.answer_len]

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


@dataclass
class _Parts:
    """An example before it is fitted into max_seq_len: prefix (everything before the answer, with
    its labels), completion (the answer and its end-of-turn marker, all labelled; answer_len of it
    the answer), tail (eos, labelled; or the template's unlabelled text after the last turn)."""
    prefix: list[int]
    prefix_labels: list[int]
    completion: list[int]
    answer_len: int
    tail: list[int]
    tail_labels: list[int]
    n_bos: int = 0


def _plain_parts(r: Rendered, encoded: list[list[int]], tokenizer) -> _Parts:
    """Each segment tokenized on its own (a completion gets the tokens it has in running text), BOS
    once in front when the tokenizer adds one, eos after the completion unless it ends in one."""
    prefix, prefix_labels = [], []
    for (_, train), ids in zip(r.segments[:-1], encoded[:-1]):
        prefix += ids
        prefix_labels += ids if train else [IGNORE_INDEX] * len(ids)
    comp = encoded[-1]
    n_bos = 1 if tokenizer.add_bos else 0
    if n_bos and prefix[:1] == [tokenizer.bos_id]:  # the text had BOS already: keep exactly one
        prefix, prefix_labels = prefix[1:], prefix_labels[1:]
    ends = bool(comp) and comp[-1] in tokenizer.eos_ids
    eos = [] if ends else [tokenizer.eos_id]
    return _Parts(prefix, prefix_labels, comp, len(comp) - ends, eos, list(eos), n_bos)


def _chat_parts(r: Rendered, ids: list[int], offsets: list[tuple[int, int]], eos_id: int) -> _Parts:
    """The conversation tokenized as one text (as the runtime tokenizes it); a token carries loss when
    its characters overlap a trained segment. The answer's turn starts at the first token that
    overlaps the answer or its end-of-turn marker."""
    bounds, pos = [], 0
    for text, train in r.segments:
        bounds.append((pos, pos + len(text), train))
        pos += len(text)
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        e = max(e, s + 1)  # a zero-width token belongs where it stands
        while k < len(bounds) and bounds[k][1] <= s:
            k += 1
        j = k
        while j < len(bounds) and bounds[j][0] < e:
            if bounds[j][2] and bounds[j][0] < bounds[j][1]:
                labels[t] = ids[t]
                break
            j += 1
    answer_start, answer_end = bounds[r.answer][:2]
    turn_end = bounds[r.answer + 1][1]
    first = next((t for t, (s, e) in enumerate(offsets) if max(e, s + 1) > answer_start), len(ids))
    answer = next((t for t in range(first, len(ids)) if offsets[t][0] >= answer_end), len(ids))
    last = next((t for t in range(answer, len(ids)) if offsets[t][0] >= turn_end), len(ids))
    tail, tail_labels = ids[last:], labels[last:]
    if r.eos:  # an end-of-turn marker with no special token: eos follows it, the text after it goes
        tail, tail_labels = [eos_id], [eos_id]
    return _Parts(ids[:first], labels[:first], ids[first:last], answer - first, tail, tail_labels)


def tokenize_examples(rendered: list[Rendered], tokenizer, *, max_seq_len: int = 512,
                      max_completion_tokens: int = 128, overlong: str = "truncate",
                      counts: dict[str, int] | None = None) -> list[Example]:
    """All texts of all examples go through the Rust batch encoder in one call per kind (100k short
    examples take seconds); the rest is list arithmetic. counts gets truncated_prompt,
    truncated_completion and dropped_overlong added to it."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
    counts = counts if counts is not None else {}
    for k in ("truncated_prompt", "truncated_completion", "dropped_overlong"):
        counts.setdefault(k, 0)
    plain = iter(tokenizer.encode_batch([text for r in rendered if not r.chat for text, _ in r.segments]))
    chats = _encode_chunks(tokenizer, ["".join(text for text, _ in r.segments) for r in rendered if r.chat])
    out = []
    for r in rendered:
        if r.chat:
            parts = _chat_parts(r, *next(chats), tokenizer.eos_id)
        else:
            parts = _plain_parts(r, [next(plain) for _ in r.segments], tokenizer)
        example = _fit(r, parts, tokenizer.bos_id, max_seq_len, max_completion_tokens, overlong, counts)
        if example is not None:
            out.append(example)
    return out


def _encode_chunks(tokenizer, texts: list[str], size: int = 1024):
    """(ids, offsets) of each text, encoded a chunk at a time: the offsets of all would be large."""
    for start in range(0, len(texts), size):
        yield from tokenizer.encode_with_offsets(texts[start:start + size])


def _fit(r: Rendered, p: _Parts, bos_id: int | None, max_seq_len: int, max_completion_tokens: int,
         overlong: str, counts: dict[str, int]) -> Example | None:
    """The example within max_seq_len: an unlabelled tail goes first, then a completion longer than
    max_completion_tokens is cut (without its end-of-turn or eos: the model must not learn to stop
    mid-sentence) or the example dropped, then the prompt is cut in the middle."""
    prefix, prefix_labels, comp, tail, tail_labels = p.prefix, p.prefix_labels, p.completion, p.tail, p.tail_labels
    truncated = False
    if p.n_bos + len(prefix) + len(comp) + len(tail) > max_seq_len and all(x == IGNORE_INDEX for x in tail_labels):
        tail, tail_labels = [], []
    if p.n_bos + len(prefix) + len(comp) + len(tail) > max_seq_len:
        cap = min(max_completion_tokens, max_seq_len - p.n_bos - len(tail) - (1 if prefix else 0))
        if len(comp) > cap:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                return None
            comp, tail, tail_labels = comp[:cap], [], []
            counts["truncated_completion"] += 1
            truncated = True
        room = max_seq_len - p.n_bos - len(comp) - len(tail)
        if len(prefix) > room:
            prefix, prefix_labels = _cut_middle(prefix, prefix_labels, room)
            counts["truncated_prompt"] += 1
            truncated = True
    bos = [bos_id] * p.n_bos
    return Example(r.record_id, r.template, r.kind, r.prompt, r.completion, bos + prefix + comp + tail,
                   [IGNORE_INDEX] * p.n_bos + prefix_labels + comp + tail_labels, p.n_bos + len(prefix), truncated,
                   p.n_bos, min(p.answer_len, len(comp)), r.messages, r.choices)


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
