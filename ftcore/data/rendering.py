"""Rendering: a record + a template, or the record's own instruction format (chat messages,
Alpaca instruction/input/output, prompt/completion), -> prompt and completion text; the training
mix (template weights, paraphrases) and class balancing."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ftcore.data.records import DataError
from ftcore.data.templates import (ALPACA, ALPACA_NO_INPUT, PROMPT_COMPLETION, MissingField, Template, TemplateError, label_counts, normalize_label,
                              training_variants)


# ----------------------------------------------------------------------------------------------
# rendering: a record + a template (or its own instruction format) -> text segments

@dataclass
class Rendered:
    """segments: the texts in order with whether they carry loss; the last one is the completion.
    prompt/completion are the texts evaluation uses (the instruction as the template wrote it, the
    answer). context_segments: how many leading segments are conversation context shared by every
    example (a chat template's system turn), which k-shot evaluation puts once in front of the shots.
    choices: the template's answer choices for this record (a classification task's labels), if any."""
    record_id: str
    template: str
    kind: str
    prompt: str
    completion: str
    segments: list[tuple[str, bool]]
    context_segments: int = 0
    choices: tuple[str, ...] = ()

    @classmethod
    def simple(cls, prompt: str, completion: str, record_id: str = "", template: str = "",
               kind: str = "generation") -> "Rendered":
        return cls(record_id, template, kind, prompt, completion, [(prompt, False), (completion, True)])


@dataclass(frozen=True)
class ChatFormat:
    header: str  # before each message, {role} filled in
    end: str     # after each message's content; carries loss on assistant turns (the model learns to stop)
    sep: str     # between messages


CHAT_FORMATS = {
    "chatml": ChatFormat("<|im_start|>{role}\n", "<|im_end|>", "\n"),
    "llama3": ChatFormat("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template as ftcore renders it: the message format, and the system turn the
    template adds when the conversation has none (SmolLM2 and Qwen2.5 do). Recognised from the
    template text (tokenizer_config.json's or GGUF's `chat_template`), not executed: ftcore has no
    Jinja; tests check the rendering against transformers' apply_chat_template."""
    name: str
    format: ChatFormat
    system: str | None = None
    bos: str = ""  # text the template writes first (Llama 3: <|begin_of_text|>)

    @classmethod
    def recognise(cls, template: str, where: str = "chat_template") -> "ChatTemplate":
        if "<|im_start|>" in template and "<|im_end|>" in template:
            return cls("chatml", CHAT_FORMATS["chatml"], _default_system(template, "<|im_start|>system\n", "<|im_end|>"))
        if "<|start_header_id|>" in template and "<|eot_id|>" in template:
            if "Cutting Knowledge Date" in template:
                raise TemplateError(f"{where}: a Llama 3.1+ template (dates, tools) that ftcore does not render; "
                                    "set data.prompt_format=\"plain\" for plain prompts")
            bos = "<|begin_of_text|>" if "bos_token" in template or "<|begin_of_text|>" in template else ""
            return cls("llama3", CHAT_FORMATS["llama3"], None, bos)
        raise TemplateError(f"{where}: a chat template ftcore does not recognise (it renders ChatML and Llama 3); "
                            "set data.prompt_format=\"plain\" for plain prompts")

    def context(self) -> str:
        """What comes before the first user turn."""
        if self.system is None:
            return self.bos
        return self.bos + self.format.header.format(role="system") + self.system + self.format.end + self.format.sep

    def user_turn(self, prompt: str) -> str:
        """A user message and the assistant header after it: what the model continues."""
        f = self.format
        return f.header.format(role="user") + prompt + f.end + f.sep + f.header.format(role="assistant")

    def segments(self, prompt: str, completion: str) -> list[tuple[str, bool]]:
        context = self.context()
        return ([(context, False)] if context else []) + [(self.user_turn(prompt), False),
                                                          (completion + self.format.end, True)]


def _default_system(template: str, start: str, end: str) -> str | None:
    """The text of the system turn a template writes as a literal (its default), if any: the first
    start...end span with no Jinja inside it."""
    for m in re.finditer(re.escape(start) + r"(.*?)" + re.escape(end), template, flags=re.S):
        if "{{" not in m.group(1) and "{%" not in m.group(1) and "'" not in m.group(1):
            return m.group(1).replace("\\n", "\n")
    return None


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


def render_chat(record: dict, chat: "ChatTemplate | str" = "chatml") -> Rendered:
    """Every assistant turn carries loss (content + end token); messages after the last assistant
    turn are dropped (nothing to learn from them). No assistant turn: MissingField. `chat`: the
    model's ChatTemplate (its system turn when the record has none), or a format name."""
    chat = chat if isinstance(chat, ChatTemplate) else ChatTemplate(chat, CHAT_FORMATS[chat])
    fmt = chat.format
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
    pending = chat.bos if turns[0][0] == "system" else chat.context()
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


def render_record(record: dict, template: Template | None = None, chat_format: str = "chatml",
                  chat: ChatTemplate | None = None) -> Rendered:
    """The record's own instruction format if it has one, else `template`; with `chat` (the model's
    chat template) the instruction goes in as a user turn and the answer as the assistant's, ended
    by its end-of-turn token. Raises MissingField."""
    fmt = record_format(record)
    if fmt == "chat":
        return render_chat(record, chat or chat_format)
    if fmt == "instruction":
        template = ALPACA if str(record.get("input") or "").strip() else ALPACA_NO_INPUT
    elif fmt == "prompt_completion":
        template = PROMPT_COMPLETION
    prompt, completion = template.render(record)
    if chat is None:
        segments, context = [(prompt, False), (completion, True)], 0
    else:
        segments = chat.segments(prompt, completion)
        context = len(segments) - 2
    return Rendered(str(record.get("record_id", "")), template.name, template.kind, prompt, completion,
                    segments, context, template.choices(record))


def render_records(records: list[dict], templates: list[tuple[Template, float]], *, chat_format: str = "chatml",
                   chat: ChatTemplate | None = None, missing_field: str = "skip",
                   skipped: dict[str, int] | None = None, rng: random.Random | None = None,
                   paraphrases: bool = False) -> list[Rendered]:
    """Every record with every template (in the model's chat template when `chat` is given). With
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
                rendered = render_record(r, template, chat_format, chat)
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


