"""Rendering: a record + a template, or the record's own instruction format (chat messages,
Alpaca instruction/input/output, prompt/completion), -> text segments, in a chat template
(ftcore.data.chat) when there is one; the training mix (template weights, paraphrases) and class
balancing."""
from __future__ import annotations

import random
from dataclasses import dataclass

from ftcore.data.chat import ChatTemplate, Conversation, chat_messages
from ftcore.data.records import DataError
from ftcore.data.templates import (ALPACA, ALPACA_NO_INPUT, PROMPT_COMPLETION, MissingField, Template, TemplateError, label_counts, normalize_label,
                              training_variants)


# ----------------------------------------------------------------------------------------------
# rendering: a record + a template (or its own instruction format) -> text segments

@dataclass
class Rendered:
    """segments: the texts in order with whether they carry loss; segments[answer] is the answer
    (plain prompts: the completion, last; a chat: the last trained assistant content, its
    end-of-turn marker after it). prompt/completion are the texts evaluation uses (the instruction
    as the template wrote it, the answer). chat: the segments are one conversation rendered by a
    chat template, tokenized as one text and given no BOS of ftcore's (the template writes its
    own); eos: an eos follows the answer's turn (plain prompts; chat markers with no special
    token). messages: that conversation's messages, from which k-shot prompts are rendered.
    choices: the template's answer choices for this record (a classification task's labels), if any."""
    record_id: str
    template: str
    kind: str
    prompt: str
    completion: str
    segments: list[tuple[str, bool]]
    answer: int = -1
    chat: bool = False
    eos: bool = True
    messages: list[dict] | None = None
    choices: tuple[str, ...] = ()

    @classmethod
    def simple(cls, prompt: str, completion: str, record_id: str = "", template: str = "",
               kind: str = "generation") -> "Rendered":
        return cls(record_id, template, kind, prompt, completion, [(prompt, False), (completion, True)])

    @classmethod
    def conversation(cls, conv: Conversation, messages: list[dict], record_id: str, template: str,
                     kind: str = "generation", prompt: str | None = None) -> "Rendered":
        """A rendered conversation (ftcore.data.chat): prompt defaults to the text before the answer."""
        segments, pos = [], 0
        for start, end, turn_end in conv.spans:
            segments += [(conv.text[pos:start], False), (conv.text[start:end], True), (conv.text[end:turn_end], True)]
            pos = turn_end
        segments.append((conv.text[pos:], False))
        start, end, _ = conv.spans[-1]
        return cls(record_id, template, kind, conv.text[:start] if prompt is None else prompt, conv.text[start:end],
                   segments, len(segments) - 3, chat=True, eos=conv.eos, messages=messages)


def record_format(record: dict) -> str | None:
    """'chat' | 'instruction' | 'prompt_completion', or None: rendered with data.templates."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def _converse(chat: ChatTemplate, messages: list[dict], record: dict, train_on: str = "all_assistant") -> Conversation:
    try:
        return chat.conversation(messages, train_on)
    except TemplateError as e:  # a template that refuses this record (Gemma: no system turn): say which
        raise DataError(f"{record.get('_where', 'record ' + str(record.get('record_id', '')))}: {e}") from None


def render_chat(record: dict, chat: ChatTemplate, train_on: str = "all_assistant") -> Rendered:
    """A `messages` record in `chat`: every assistant turn carries loss (content + end-of-turn
    marker), or the last only (train_on); messages after the last assistant turn are dropped.
    No assistant turn: MissingField."""
    messages = chat_messages(record)
    return Rendered.conversation(_converse(chat, messages, record, train_on), messages,
                                 str(record.get("record_id", "")), "chat")


def render_record(record: dict, template: Template | None = None, chat: ChatTemplate | None = None,
                  messages_chat: ChatTemplate | None = None, train_on: str = "all_assistant") -> Rendered:
    """The record's own instruction format if it has one, else `template`; with `chat` (the chat
    template prompts are rendered in) the instruction goes in as a user turn and the answer as the
    assistant's, without the leading space plain completions have (the template spaces its turns).
    `messages` records are rendered in messages_chat (default: chat). Raises MissingField."""
    fmt = record_format(record)
    if fmt == "chat":
        if (messages_chat or chat) is None:
            raise TypeError("render_record: a `messages` record needs a chat template (messages_chat)")
        return render_chat(record, messages_chat or chat, train_on)
    if fmt == "instruction":
        template = ALPACA if str(record.get("input") or "").strip() else ALPACA_NO_INPUT
    elif fmt == "prompt_completion":
        template = PROMPT_COMPLETION
    prompt, completion = template.render(record)
    record_id = str(record.get("record_id", ""))
    if chat is None:
        rendered = Rendered(record_id, template.name, template.kind, prompt, completion,
                            [(prompt, False), (completion, True)])
    else:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.removeprefix(" ")}]
        rendered = Rendered.conversation(_converse(chat, messages, record), messages, record_id, template.name,
                                         template.kind, prompt)
    rendered.choices = template.choices(record)
    return rendered


def render_records(records: list[dict], templates: list[tuple[Template, float]], *, chat: ChatTemplate | None = None,
                   messages_chat: ChatTemplate | None = None, train_on: str = "all_assistant",
                   missing_field: str = "skip", skipped: dict[str, int] | None = None,
                   rng: random.Random | None = None, paraphrases: bool = False) -> list[Rendered]:
    """Every record with every template (in the chat template `chat` when given; `messages` records
    in messages_chat, see render_record). With
    rng (training), a template of weight w renders a
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
                rendered = render_record(r, template, chat, messages_chat, train_on)
            except TemplateError as e:
                name = template.name if template is not None else record_format(r)
                if missing_field == "error" or not isinstance(e, MissingField):
                    what = str(e)
                    if isinstance(e, MissingField):
                        what = "no assistant turn in 'messages'" if template is None else e.what
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
    weight = {}
    for template, counts in label_counts(rendered).items():
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


