"""Chat templates, run: the model's own Jinja chat template (tokenizer_config.json, chat_template.jinja,
a GGUF file's metadata), data.chat_template in its place, or ftcore's own for data.chat_format,
renders a conversation to exactly the text transformers' apply_chat_template gives (the same
jinja set-up, ftcore.data.jinja; the same variables: messages, add_generation_prompt, tools and
documents as None, bos_token, eos_token and the other named special tokens).

Which text carries loss is found for any template by rendering again, never by knowing a format:
- an assistant's content, as the template writes it (trimmed, after a think block...): the
  conversation rendered with a placeholder for that one content; the text before the placeholder
  is what comes before the content, the text after it is the rest of the conversation;
- its end-of-turn marker: what the template writes after the content when that turn ends the
  conversation, as far as the whole conversation has it there too, up to its last special token
  (ChatML's <|im_end|>, Phi-3's <|end|> and, after the last turn, the eos it appends, Command R7B's
  <|END_RESPONSE|><|END_OF_TURN_TOKEN|>). A marker with no special token (text markers, a tokenizer
  without the template's tokens) is followed by eos, so that a model can learn to stop.
And the prompt a model is given at generation (the conversation up to the answer, rendered with
add_generation_prompt=True) must be where the rendered conversation starts: a template that writes
its turns otherwise is refused, as is one that raises.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ftcore.config import DEFAULT_CHAT_DATE
from ftcore.data.jinja import chat_environment, error_text
from ftcore.data.records import DataError
from ftcore.data.templates import MissingField, TemplateError

# ftcore's own templates (data.chat_format), for `messages` data on a model that has none: ChatML
# and Llama 3's own text; bos_token is the tokenizer's BOS where it adds one, else empty
CHAT_FORMATS = {
    "chatml": ("{{ bos_token }}{% for message in messages %}"
               "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
               " + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}

_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
          "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
# the names transformers passes a template (its special_tokens_map), when the tokenizer has them
_NAMED_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_MARK = "\ue000ftcore-content\ue001"  # private-use characters: no template trims or splits them
_PROBE = [{"role": "user", "content": "Is this a question?"}, {"role": "assistant", "content": "It is."},
          {"role": "user", "content": "And this one?"}, {"role": "assistant", "content": "This one too."}]


def chat_messages(record: dict) -> list[dict]:
    """A record's `messages` as [{role, content}] up to its last assistant turn (nothing after it
    carries loss); ShareGPT's from/value and role names are understood. DataError for a malformed
    list, MissingField when no assistant speaks."""
    where = record.get("_where", "record")
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with role and content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in _ROLES:
            raise DataError(f"{where}: messages[{i}]: unknown role {role!r} (system, user, assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}]: content must be a string, got {type(content).__name__}")
        out.append({"role": _ROLES[role], "content": content})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise MissingField("assistant turn", "chat")
    return out[:last + 1]


@dataclass
class Conversation:
    """A conversation as its template renders it, and what carries loss: per trained assistant turn
    (content start, content end, end of its end-of-turn marker), character offsets into `text`;
    eos: the last marker holds no special token, so an eos follows it."""
    text: str
    spans: list[tuple[int, int, int]]
    eos: bool = False


class ChatTemplate:
    """A chat template ready to run: compiled, given the tokenizer's special tokens, and checked on a
    one-turn conversation (raises TemplateError naming `source`). stop_ids: the special tokens its
    turns end with (in a two-turn conversation), on which generation stops as it does on eos."""

    def __init__(self, text: str, source: str, tokenizer, today: str = DEFAULT_CHAT_DATE, own: bool = False):
        self.source = source
        try:
            self.template = chat_environment(today).from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{source}: {error_text(e)}") from None
        self.variables = _special_tokens(tokenizer, own)
        self.added = {t: i for t, i in tokenizer.added_tokens.items() if t.strip()}  # a newline is no marker
        self._ends: dict[str, str] = {}
        self.conversation(_PROBE[:2])  # one turn, as instruction prompts are: it must run
        text, ends = self.render(_PROBE), []
        for i in (1, 3):  # an earlier turn may end otherwise than the last (gpt-oss, Phi-3)
            _, end, final = self._content(_PROBE, i, text)
            ends.append(self._end_of_turn(final, text[end:])[0])
        ids = set(self.added.values())
        self.stop_ids = sorted({i for e in ends for i in tokenizer.encode(e) if i in ids})

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.variables)
        except Exception as e:  # raise_exception(), an undefined attribute, a type error: the template's
            raise TemplateError(f"{self.source}: {error_text(e)}") from None

    def conversation(self, messages: list[dict], train_on: str = "all_assistant") -> Conversation:
        """`messages` (ending with an assistant turn) rendered, with the spans of the assistant turns
        that carry loss: every one, or the last (train_on)."""
        text = self.render(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans, eos = [], False
        for i in (turns if train_on == "all_assistant" else turns[-1:]):
            prompt = self.render(messages[:i], add_generation_prompt=True)
            start, end, final = self._content(messages, i, text) if text.startswith(prompt) else (-1, 0, "")
            if start < len(prompt):
                earlier = " (an earlier turn's: data.train_on=\"last_assistant\" trains on the last turn only)" \
                    if i != turns[-1] else ""
                raise TemplateError(f"{self.source}: a conversation rendered in full does not begin with its prompt "
                                    "(the messages before an answer, add_generation_prompt=True): a model would be "
                                    f"asked in other words than it is trained on{earlier}")
            marker, eos = self._end_of_turn(final, text[end:])
            spans.append((start, end, end + len(marker)))
        return Conversation(text, spans, eos)

    def _content(self, messages: list[dict], i: int, text: str) -> tuple[int, int, str]:
        """(start, end) of assistant turn i's content in `text`, and what the template writes after
        that content when the turn ends the conversation."""
        marked = [dict(m, content=_MARK) if k == i else m for k, m in enumerate(messages)]
        with_mark = self.render(marked)
        k = with_mark.find(_MARK)
        if k < 0 or with_mark.find(_MARK, k + 1) >= 0:
            raise TemplateError(f"{self.source}: the template does not write an assistant's text content "
                                "once, as given (multimodal templates that take lists of content parts are not supported)")
        head, rest = with_mark[:k], with_mark[k + len(_MARK):]
        end = len(text) - len(rest)
        if not (text.startswith(head) and text.endswith(rest) and end >= k):
            raise TemplateError(f"{self.source}: the template writes the rest of a conversation differently when "
                                "an assistant's content changes: ftcore cannot tell which text is the answer")
        if i < len(messages) - 1:
            alone = self.render(marked[:i + 1])
            rest = alone[alone.find(_MARK) + len(_MARK):]
        return k, end, rest

    def _end_of_turn(self, final: str, after: str) -> tuple[str, bool]:
        """(the end-of-turn marker after an answer, whether an eos must follow it): the longest start
        of `after` that the turn's `final` text also has and that ends with a special token; else a
        special token `after` starts with (gpt-oss ends a last turn otherwise than an earlier one);
        else the shared text without trailing whitespace (text markers)."""
        common = os.path.commonprefix([final, after])
        if common not in self._ends:
            self._ends[common] = next((common[:n] for n in range(len(common), 0, -1)
                                       if any(common.endswith(t, 0, n) for t in self.added)), "")
        if marker := self._ends[common]:
            return marker, False
        if marker := next((t for t in self.added if after.startswith(t)), ""):
            return marker, False
        if common != final:  # the turn's text went on otherwise: keep what ends at a whitespace
            common = re.match(r"(?s)(.*\s)?", common).group()
        if not common.strip():
            raise TemplateError(f"{self.source}: the template writes nothing after an assistant's answer that "
                                "ends the turn, so a model trained on it would not learn to stop")
        return common.rstrip(), True


def _special_tokens(tokenizer, own: bool) -> dict[str, str]:
    """bos_token, eos_token and the other named special tokens, as transformers passes them."""
    def text(value):
        return value.get("content") if isinstance(value, dict) else value
    out = {k: v for k in _NAMED_TOKENS if isinstance(v := text(tokenizer.config.get(k)), str)}
    if tokenizer.bos_id is not None:
        out["bos_token"] = tokenizer.tok.id_to_token(tokenizer.bos_id)
    out["eos_token"] = tokenizer.tok.id_to_token(tokenizer.eos_id)
    if own:  # ftcore's own templates start with BOS as plain prompts do: where the tokenizer adds one
        out["bos_token"] = out.get("bos_token", "") if tokenizer.add_bos else ""
    return out


def template_text(data_cfg, tokenizer) -> tuple[str, str] | None:
    """(template, where it comes from) of data.chat_template (a .jinja file or the template itself),
    else of the tokenizer's chat_template; None when there is none."""
    if data_cfg.chat_template:
        value = data_cfg.chat_template
        if "{{" in value or "{%" in value:  # the template itself, not a file's name
            return value, "data.chat_template (inline)"
        try:
            return Path(value).read_text(encoding="utf-8"), f"data.chat_template ({value})"
        except OSError as e:
            raise TemplateError(f"data.chat_template: cannot read {value!r} ({e.strerror}); give a .jinja file "
                                "or the template itself") from None
    return model_template_text(tokenizer)


def model_template_text(tokenizer) -> tuple[str, str] | None:
    """(template, where it comes from) of the tokenizer's own chat_template, None without one. Of
    several named templates (a list in tokenizer_config.json, or files), the "default", as
    transformers takes it without tools."""
    if tokenizer is None:
        return None
    text, where = tokenizer.config.get("chat_template"), tokenizer.chat_template_source or "the tokenizer"
    if isinstance(text, (list, dict)):
        named = text if isinstance(text, dict) else {t.get("name"): t.get("template") for t in text}
        if "default" not in named:
            raise TemplateError(f"{where}: several chat templates ({', '.join(map(str, named))}) and none named "
                                "'default': set data.chat_template to the one to use")
        text, where = named["default"], f"{where} ('default')"
    return (text, f"the chat_template of {where}") if text else None


def set_chat_template(tokenizer, data_cfg) -> None:
    """data.chat_template, when set, becomes the tokenizer's own: the one a run's final/ (and its
    GGUF file) carries, so the fine-tuned model is asked as it was trained."""
    if found := template_text(data_cfg, None):
        tokenizer.config["chat_template"] = found[0]


def check_chat_template(data_cfg) -> None:
    """data.chat_template compiles (a syntax error found before a base model is pretrained; the
    tokenizer's own template and the probe run when the data is prepared)."""
    if found := template_text(data_cfg, None):
        text, source = found
        try:
            chat_environment(data_cfg.chat_date).parse(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{source}: {error_text(e)}") from None


def chat_template(data_cfg, tokenizer, messages: bool = False) -> ChatTemplate | None:
    """The chat template instruction prompts are rendered in, per data.prompt_format: data.chat_template,
    else the model's own; None for plain prompts. messages=True: the one `messages` records are
    rendered in: that template whatever data.prompt_format says, else ftcore's own data.chat_format."""
    found = template_text(data_cfg, tokenizer)
    if messages:
        if found is None:
            return ChatTemplate(CHAT_FORMATS[data_cfg.chat_format], f"data.chat_format={data_cfg.chat_format!r}",
                                tokenizer, data_cfg.chat_date, own=True)
        return ChatTemplate(*found, tokenizer, data_cfg.chat_date)
    if data_cfg.prompt_format == "plain":
        return None
    if found is None:
        if data_cfg.prompt_format == "chat":
            raise DataError("data.prompt_format=\"chat\", but the model's tokenizer has no chat_template "
                            "(set data.chat_template to a .jinja file)")
        return None
    return ChatTemplate(*found, tokenizer, data_cfg.chat_date)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens the turns of the tokenizer's own chat template end with ([] without one): where
    decoding a chat-formatted prompt stops, as it does at eos."""
    found = model_template_text(tokenizer)
    return ChatTemplate(*found, tokenizer).stop_ids if found else []
