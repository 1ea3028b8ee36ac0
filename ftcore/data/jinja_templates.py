"""Jinja prompt templates, as the template libraries write them: promptsource's form, a `jinja`
text whose output splits at `|||` into the prompt and the answer, and optional `answer_choices`,
itself a Jinja text rendered with the record and split at `|||` into the labels.

    jinja: "Given the following review:\\n{{review_body}}\\npredict the associated rating ... ||| {{answer_choices[star_rating-1]}}"
    answer_choices: "1 ||| 2 ||| 3 ||| 4 ||| 5"

Rendering follows promptsource's `Template.apply`: jinja2 with its default settings (plus
promptsource's `zip` global and `choice` / `most_frequent` filters), the record's fields as
variables with their types (`star_rating-1` works on a JSON number), `answer_choices` as a list,
a `|||` inside a record's own text kept out of the split, both parts stripped. Where ftcore differs,
on purpose:
- the environment is sandboxed (ftcore.data.jinja, `mutable`): a template reaches no Python
  internals; it may build and modify lists of its own (`x.append(..)`: 194 of promptsource's 2,085
  templates do), and what it modifies of the record is a copy made for that one render;
- a variable the record lacks (absent, None or blank, as for `{field}` templates) raises
  MissingField naming it, where jinja would print nothing; `x is defined` and `x | default(..)` still
  work, and such a field is not required of the dataset;
- a record for which the template renders no answer (or no prompt), as promptsource templates do
  for records they do not apply to, raises NoAnswer, a MissingField: skipped and counted;
- `choice` draws with a generator seeded by the record's id and the template's name, so a record
  reads the same in every run (promptsource's draws from the global `random`);
- no per-variable cut to 2,048 characters: data.max_seq_len cuts the prompt's middle instead;
- the completion is " " + answer, the convention of ftcore's own templates (a plain prompt and its
  completion tokenize as running text; a chat turn drops the space).
"""
from __future__ import annotations

import copy
import functools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, meta, nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing

from ftcore.data.jinja import environment
from ftcore.data.templates import DERIVATIONS, KINDS, MissingField, TemplateError, _present

SEPARATOR = "|||"
_PIPE = "\x00pipe\x00"  # stands in for a record's own '|||' while the output is split
_RANDOM = "__ftcore_random__"  # the context variable holding the record's seeded generator

# promptsource's metadata.metrics -> the task kind (the first listed that is known decides)
METRIC_KINDS = {"accuracy": "classification", "rouge": "summarization", "bleu": "generation"}


class NoAnswer(MissingField):
    """The template renders an empty answer (or prompt) for this record: it does not apply to it."""

    def __init__(self, template: str):
        TemplateError.__init__(self, f"template '{template}' renders no answer for this record")
        self.field, self.template = "answer", template

    @property
    def what(self) -> str:
        return "the template renders no answer for it"


def kind_of(answer_choices: str | None, metrics: list) -> str:
    """classification with answer_choices, else from the first known metric, else generation."""
    if answer_choices:
        return "classification"
    return next((METRIC_KINDS[str(m).lower()] for m in metrics if str(m).lower() in METRIC_KINDS), "generation")


class _Absent(UndefinedError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class _Undefined(StrictUndefined):
    """StrictUndefined whose error, for a variable the record lacks, carries the variable's name."""
    __slots__ = ()

    def __init__(self, hint=None, obj=missing, name=None, exc=UndefinedError):
        if hint is None and obj is missing and isinstance(name, str):
            exc = functools.partial(_Absent, name)
        super().__init__(hint, obj, name, exc)


@pass_context
def _choice(context, items):
    return context[_RANDOM].choice(items)


@functools.cache
def jinja_environment() -> SandboxedEnvironment:
    """The sandboxed environment prompt templates run in (one per process): ftcore's one Jinja set-up
    with Jinja's default whitespace handling, promptsource's globals and filters, and an undefined
    variable an error that names it."""
    env = environment(mutable=True, undefined=_Undefined)
    env.globals["zip"] = zip
    env.filters.update(choice=_choice, most_frequent=_most_frequent)
    return env


def _most_frequent(items):
    """promptsource's filter: the items that occur most often (None for no items)."""
    if not items:
        return None
    counts = Counter(items).most_common()
    return [item for item, n in counts if n == counts[0][1]]


@dataclass(frozen=True)
class JinjaTemplate:
    """A prompt template in the template libraries' Jinja form; used where a Template is (name,
    kind, fields, prompt_fields, task, render, choices). `where` says where it was written
    (file:line, or data.user_templates.NAME) for error messages."""
    name: str
    jinja: str
    answer_choices: str | None = None
    kind: str = "generation"
    where: str = ""
    _compiled: tuple = field(init=False, repr=False, compare=False)
    _names: frozenset = field(init=False, repr=False, compare=False)
    fields: frozenset = field(init=False, compare=False)       # what a record must have
    prompt_fields: tuple = field(init=False, compare=False)    # the fields the prompt shows, in order

    def __post_init__(self):
        where = f"{self.where}: template '{self.name}'" if self.where else f"template '{self.name}'"
        if not self.name or "@" in self.name:
            raise TemplateError(f"{where}: a name is needed, without '@' (reserved for held-out templates)")
        if self.kind not in KINDS:
            raise TemplateError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if SEPARATOR not in self.jinja:
            raise TemplateError(f"{where}: its jinja has no '{SEPARATOR}' between the prompt and the answer")
        env = jinja_environment()
        sources = [self.jinja] + ([self.answer_choices] if self.answer_choices is not None else [])
        try:
            trees = [env.parse(s) for s in sources]
        except TemplateSyntaxError as e:
            what = "jinja" if e.source == self.jinja else "answer_choices"
            raise TemplateError(f"{where}: Jinja syntax error in its {what}, line {e.lineno}: {e.message}") from None
        names = set().union(*(meta.find_undeclared_variables(t) for t in trees)) - {"answer_choices"} - set(env.globals)
        optional = {n.node.name for t in trees for n in t.find_all((nodes.Test, nodes.Filter))
                    if n.name in ("defined", "undefined", "default", "d") and isinstance(n.node, nodes.Name)}
        shown, printing = [], False  # the fields printed ({{ }}, not {% %}) before the first |||
        for _, token, value in env.lex(self.jinja):
            if token == "data" and SEPARATOR in value:
                break
            printing = token != "variable_end" and (printing or token == "variable_begin")
            if printing and token == "name" and value in names:
                shown.append(value)
        object.__setattr__(self, "_compiled", tuple(env.from_string(s) for s in sources))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "fields", frozenset(names - optional))
        object.__setattr__(self, "prompt_fields", tuple(dict.fromkeys(shown)))

    @property
    def task(self) -> str:
        return self.name

    @property
    def _where(self) -> str:
        return self.where or f"template '{self.name}'"

    def render(self, record: dict) -> tuple[str, str]:
        """(prompt, " " + answer). MissingField for a field the record lacks, NoAnswer when the
        template renders no answer for it, TemplateError when rendering fails."""
        context = self._context(record)
        text = self._run(self._compiled[0], {**context, "answer_choices": self._choices(context)})
        parts = text.split(SEPARATOR)
        if len(parts) > 2:
            raise TemplateError(f"{self._where}: renders {len(parts) - 1} '{SEPARATOR}' for this "
                                "record; one separates the prompt from the answer")
        prompt, answer = (p.replace(_PIPE, SEPARATOR).strip() for p in parts) if len(parts) == 2 else ("", "")
        if not prompt or not answer:
            raise NoAnswer(self.name)
        return prompt, " " + answer

    def choices(self, record: dict) -> tuple[str, ...]:
        """The record's answer choices (the label set of a classification task); () without any."""
        return tuple(self._choices(self._context(record)) or ())

    def answering(self, answer: str) -> "_Answering":
        """This template with `answer` as every record's answer: how each label is written."""
        return _Answering(self, answer)

    # ------------------------------------------------------------------------------------------

    def _context(self, record: dict) -> dict[str, Any]:
        """The record's fields with values (private ones left out), a '|||' in text hidden; a
        derived field the template names and the record lacks (sentiment from rating, ...)."""
        context = {k: v.replace(SEPARATOR, _PIPE) if isinstance(v, str) else copy.deepcopy(v)
                   for k, v in record.items() if not k.startswith("_") and _present(record, k)}
        for name in self._names - context.keys():
            if name in DERIVATIONS and (value := DERIVATIONS[name](record)) is not None:
                context[name] = value
        if self.answer_choices is not None and "answer_choices" in context:
            raise TemplateError(f"{self._where}: the record has a field 'answer_choices', which the "
                                "template's own answer_choices hide: rename it with data.rename")
        context[_RANDOM] = random.Random(f"{record.get('record_id')}\x00{self.name}")
        return context

    def _choices(self, context: dict) -> list[str] | None:
        if self.answer_choices is None:
            return None
        text = self._run(self._compiled[1], context)
        return [c.replace(_PIPE, SEPARATOR).strip() for c in text.split(SEPARATOR)]

    def _run(self, compiled, context: dict) -> str:
        try:
            return compiled.render(context)
        except _Absent as e:
            raise MissingField(e.name, self.name) from None
        except SecurityError as e:
            raise TemplateError(f"{self._where}: the sandbox refuses it: {e} (a template may not reach "
                                "Python's internals)") from None
        except Exception as e:  # the template's own failure on this record: a user error, one line
            hint = " (CSV values are text: {{ x | int }} makes a number)" if isinstance(e, TypeError) and "'str'" in str(e) else ""
            raise TemplateError(f"{self._where}: rendering failed ({type(e).__name__}: {e}){hint}") from None


@dataclass(frozen=True)
class _Answering:
    template: JinjaTemplate
    answer: str

    name = property(lambda self: self.template.name)
    kind = property(lambda self: self.template.kind)

    def render(self, record: dict) -> tuple[str, str]:
        return self.template.render(record)[0], " " + self.answer

    def choices(self, record: dict) -> tuple[str, ...]:
        return self.template.choices(record)


# ----------------------------------------------------------------------------------------------
# a template written as a mapping: an entry of a template file, or data.user_templates.NAME

TEMPLATE_KEYS = ("jinja", "answer_choices", "kind")
FILE_KEYS = ("name", "metadata", "id", "reference", "task_template")  # promptsource's; only name and metadata are read


def template_from_spec(name: str, spec: dict, where: str, lines: dict | None = None) -> JinjaTemplate:
    """A JinjaTemplate from {jinja, answer_choices?, kind?, metadata?: {metrics}}; the kind is the
    explicit one, else from answer_choices and the metrics (kind_of). `lines` {key: line} places
    errors in a file; else they name `where`.KEY."""
    def at(key):  # file:line of the key (of the template where the key is missing), or where.KEY
        if lines is None:
            return f"{where}.{key}"
        path, line = where.rsplit(":", 1)
        return f"{path}:{lines.get(key, line)}"

    keys = TEMPLATE_KEYS + (FILE_KEYS if lines is not None else ())
    for key in spec:
        if key not in keys:
            raise TemplateError(f"{at(key)}: unknown key '{key}' in template '{name}' (keys: {', '.join(keys)})")
    if not isinstance(spec.get("jinja"), str):
        raise TemplateError(f"{at('jinja')}: template '{name}' needs jinja: a string, the prompt and the answer "
                            f"with '{SEPARATOR}' between them")
    choices, kind = spec.get("answer_choices"), spec.get("kind")
    if choices is not None and not isinstance(choices, str):
        raise TemplateError(f"{at('answer_choices')}: answer_choices of '{name}' must be a string like "
                            f"'no {SEPARATOR} yes', got {type(choices).__name__}")
    metadata = spec.get("metadata") or {}
    metrics = (metadata.get("metrics") or []) if isinstance(metadata, dict) else None
    if not isinstance(metrics, list):
        raise TemplateError(f"{at('metadata')}: metadata of '{name}' must be a mapping with metrics: a list")
    if kind is not None and not isinstance(kind, str):
        raise TemplateError(f"{at('kind')}: kind of '{name}' must be a string")
    return JinjaTemplate(name, spec["jinja"], choices, kind or kind_of(choices, metrics), where)
