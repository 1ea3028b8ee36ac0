"""Instruction templates: turn one record (a dict of fields) into a (prompt, completion) pair.

A template is a prompt and a completion with `{field}` placeholders, plus a task kind that decides
the evaluation metric. Placeholders are plain field names filled by one regex pass: no attribute
or index access (what `str.format` would allow on user-controlled templates), and a value that
itself contains `{text}` is inserted literally, never expanded again. `{{`, `}}` and `{%` are
Jinja's: refused, with a line that points to the Jinja form (ftcore.data.jinja_templates, where a
lone brace is plain text); which templates a run uses is ftcore.data.template_sources'.

Fields come from the record or from a named built-in derivation (`sentiment` and `stars` from
`rating`, `product_clause` from `product`, language defaults for translation), so templates stay
plain text with no expressions in them. A field missing from the record (absent, None or an empty
string) raises `MissingField`; the data pipeline skips and counts such records or stops, per
`data.missing_field`. Nothing is ever rendered with a `{text}` left in it.

Completions start with a space: the prompt ends with a cue such as "Rating:" and the completion is
" 4", so the completion, tokenized on its own, gets the same tokens it would get in running text
(byte-level BPE and Metaspace tokenizers both attach the space to the word). Compare predictions
with `completion.strip()`.

Held-out paraphrases (`heldout_templates`) re-word each built-in instruction with the same
completion; they are never used for training, only to measure instruction following.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("classification", "generation", "summarization", "translation")


class TemplateError(ValueError):
    """A broken template or template configuration: the message names the template and field."""


class MissingField(TemplateError):
    """A record lacks (or has an empty) field that a template needs."""

    def __init__(self, field: str, template: str):
        super().__init__(f"record has no field '{field}' (needed by template '{template}')")
        self.field, self.template = field, template

    @property
    def what(self) -> str:
        """Why the record cannot be rendered, as an error about that record says it."""
        return f"no field '{self.field}'"


# one token of template text: Jinja's delimiters (refused), a placeholder, or a stray brace (an error)
_TOKEN = re.compile(r"\{\{|\}\}|\{%|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{[^{}]*\}?|\}")


def _parse(text: str, where: str, name: str) -> list[str | tuple[str]]:
    """Literal strings and 1-tuples (field,) in order; Jinja syntax and stray braces are a
    TemplateError that says how to write the template instead."""
    parts: list[str | tuple[str]] = []
    pos = 0
    jinja_form = (f"data.user_templates.{name} = {{jinja = \"... {{{{ field }}}} ... ||| {{{{ answer }}}}\"}} "
                  "(or a template file in data.templates)")
    for m in _TOKEN.finditer(text):
        parts.append(text[pos:m.start()])
        tok = m.group(0)
        if tok in ("{{", "}}", "{%"):
            raise TemplateError(f"{where}: {tok!r} is Jinja syntax, which a {{field}} template does not run: write "
                                f"the template in the Jinja form, {jinja_form}")
        if not m.group(1):
            raise TemplateError(f"{where}: invalid placeholder {tok!r}: use a plain field name like {{text}}; "
                                f"for a literal brace write the template in the Jinja form, {jinja_form}")
        parts.append((m.group(1),))
        pos = m.end()
    parts.append(text[pos:])
    return [p for p in parts if p != ""]


# ----------------------------------------------------------------------------------------------
# derived fields: name -> function(record) -> value, or None when the record lacks the source

def _present(record: dict, name: str) -> bool:
    v = record.get(name)
    return v is not None and not (isinstance(v, str) and not v.strip())


def parse_rating(value: Any) -> int:
    """1-5 from 4, 4.0, "4", " 4.0 "; anything else is a TemplateError naming the field."""
    try:
        f = float(str(value).strip())
    except ValueError:
        f = 0.0
    if f not in (1.0, 2.0, 3.0, 4.0, 5.0) or isinstance(value, bool):
        raise TemplateError(f"field 'rating' must be an integer from 1 to 5, got {value!r}")
    return int(f)


def _sentiment(r: dict) -> str | None:
    if not _present(r, "rating"):
        return None
    n = parse_rating(r["rating"])
    return "negative" if n <= 2 else "neutral" if n == 3 else "positive"


def _stars(r: dict) -> str | None:
    return f"{parse_rating(r['rating'])}-star" if _present(r, "rating") else None


def _product_clause(r: dict) -> str:
    # optional: " for the Lumo kettle"-style clause, or nothing when the record has no product
    return f" for {to_text(r['product'])}" if _present(r, "product") else ""


DERIVATIONS: dict[str, Callable[[dict], Any]] = {
    "sentiment": _sentiment,          # rating 1-2 negative, 3 neutral, 4-5 positive
    "stars": _stars,                  # rating 4 -> "4-star"
    "product_clause": _product_clause,
    "source_lang": lambda r: "the original language",
    "target_lang": lambda r: "English",
}


# where each derived field comes from (None: always available), for checking a dataset up front
DERIVED_FROM: dict[str, str | None] = {"sentiment": "rating", "stars": "rating", "product_clause": None,
                                       "source_lang": None, "target_lang": None}


def to_text(value: Any, name: str = "?") -> str:
    if isinstance(value, (dict, list, tuple)):  # its Python repr would be rendered into the prompt
        raise TemplateError(f"field '{name}' is a {type(value).__name__}; templates take text and numbers")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 4.0 from a JSON file reads as the rating "4"
    return str(value)


def field_value(record: dict, name: str, template: str = "?") -> str:
    """The record's own value wins; else a derivation; else MissingField."""
    if _present(record, name):
        return to_text(record[name], name)
    derive = DERIVATIONS.get(name)
    value = derive(record) if derive is not None else None
    if value is None:
        raise MissingField(name, template)
    return to_text(value)


# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    name: str
    prompt: str
    completion: str
    kind: str = "generation"
    _prompt_parts: list = field(init=False, repr=False, compare=False)
    _completion_parts: list = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TemplateError(f"template '{self.name}': kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "_prompt_parts", _parse(self.prompt, f"template '{self.name}' prompt", self.name))
        object.__setattr__(self, "_completion_parts", _parse(self.completion, f"template '{self.name}' completion", self.name))
        if not self._completion_parts:
            raise TemplateError(f"template '{self.name}': the completion is empty")

    @property
    def fields(self) -> set[str]:
        return {p[0] for p in self._prompt_parts + self._completion_parts if isinstance(p, tuple)}

    @property
    def prompt_fields(self) -> list[str]:
        """The fields the prompt shows, in order of first appearance."""
        return list(dict.fromkeys(p[0] for p in self._prompt_parts if isinstance(p, tuple)))

    @property
    def task(self) -> str:
        """'rating' for 'rating' and for its paraphrase 'rating@heldout1'."""
        return self.name.split("@", 1)[0]

    def render(self, record: dict) -> tuple[str, str]:
        values = {f: field_value(record, f, self.name) for f in sorted(self.fields)}

        def fill(parts):
            return "".join(values[p[0]] if isinstance(p, tuple) else p for p in parts)

        return fill(self._prompt_parts), fill(self._completion_parts)

    def choices(self, record: dict) -> tuple[str, ...]:
        """A {field} template has no answer choices (its labels are the answers the data has)."""
        return ()


# ----------------------------------------------------------------------------------------------
# the standard instruction formats a record may come in (rendered whatever data.templates says)

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


# ----------------------------------------------------------------------------------------------
# built-in templates for review records (rating 1-5, summary, text, optional product)
# and for translation records (source, target, optional source_lang/target_lang)

BUILTIN: dict[str, Template] = {t.name: t for t in [
    Template("rating",
             "Predict the star rating (1 to 5) that the customer gave with this product review.\n\n"
             "Review: {text}\n\nRating:", " {rating}", "classification"),
    Template("sentiment",
             "Classify this product review as positive, neutral or negative.\n\n"
             "Review: {text}\n\nSentiment:", " {sentiment}", "classification"),
    Template("review",
             "Write a {stars} product review{product_clause} with the title \"{summary}\".\n\nReview:",
             " {text}", "generation"),
    Template("summary",
             "Give a short sentence describing the following product review.\n\n"
             "Review: {text}\n\nSummary:", " {summary}", "summarization"),
    Template("translate",
             "Translate the following text from {source_lang} to {target_lang}.\n\n"
             "{source}\n\nTranslation:", " {target}", "translation"),
]}

_HELDOUT: dict[str, list[tuple[str, str]]] = {   # task -> [(prompt, completion)], same kind
    "rating": [
        ("How many stars, from 1 to 5, did the writer of this review give the product?\n\n{text}\n\nStars:",
         " {rating}"),
        ("Read the customer's opinion below and guess their score on a scale of 1 to 5.\n\n"
         "Opinion: {text}\n\nScore:", " {rating}"),
    ],
    "sentiment": [
        ("Is the opinion in the following review positive, neutral or negative?\n\n{text}\n\nOpinion:",
         " {sentiment}"),
        ("Review: {text}\n\nDoes this customer feel positive, neutral or negative about the product? Answer:",
         " {sentiment}"),
    ],
    "review": [
        ("Compose a customer review{product_clause} titled \"{summary}\" that gives a {stars} rating.\n\nText:",
         " {text}"),
        ("Title: {summary}\nRating: {stars}\n\nWrite the full product review{product_clause} that goes with "
         "this title and rating.\n\nReview:", " {text}"),
    ],
    "summary": [
        ("Summarize this product review in a few words.\n\n{text}\n\nTitle:", " {summary}"),
        ("Write a brief headline for the review below.\n\nReview: {text}\n\nHeadline:", " {summary}"),
    ],
    "translate": [
        ("{source}\n\nRender the text above in {target_lang}.\n\nAnswer:", " {target}"),
        ("What is the {target_lang} version of this {source_lang} text?\n\n{source}\n\nAnswer:", " {target}"),
    ],
}

# Training paraphrases: other wordings of the built-in instructions (other cue words too). With
# data.paraphrases on, each training record of a built-in task is rendered with the canonical
# template or one of these, chosen by the seeded RNG, so the model learns the task from several
# phrasings rather than one fixed string; the held-out paraphrases above stay unseen.
_TRAIN_PARAPHRASES: dict[str, list[tuple[str, str]]] = {
    "rating": [
        ("On a scale from 1 to 5, what score does this review give?\n\nReview: {text}\n\nScore:", " {rating}"),
        ("Review: {text}\n\nHow would the author rate the product, 1 to 5? Answer:", " {rating}"),
        ("Guess the number of stars (1-5) behind this customer review.\n\n{text}\n\nNumber of stars:",
         " {rating}"),
    ],
    "sentiment": [
        ("What is the sentiment of this review: positive, neutral or negative?\n\nReview: {text}\n\nAnswer:",
         " {sentiment}"),
        ("{text}\n\nIs the customer's attitude positive, neutral or negative? Attitude:", " {sentiment}"),
        ("Label the tone of the following review (positive, neutral or negative).\n\n{text}\n\nTone:",
         " {sentiment}"),
    ],
    "review": [
        ("Title: {summary}\nStars: {stars}\n\nWrite the review{product_clause}.\n\nReview:", " {text}"),
        ("Write what a customer who gave a {stars} rating{product_clause} might say, under the headline "
         "\"{summary}\".\n\nText:", " {text}"),
    ],
    "summary": [
        ("Write a title for this review.\n\nReview: {text}\n\nTitle:", " {summary}"),
        ("{text}\n\nIn a few words, what is this review about? Summary:", " {summary}"),
    ],
}

TRAIN_PARAPHRASES: dict[str, list[Template]] = {
    task: [Template(task, p, c, BUILTIN[task].kind) for p, c in pairs]
    for task, pairs in _TRAIN_PARAPHRASES.items()
}


def training_variants(template: Template) -> list[Template]:
    """The template itself and its training paraphrases (built-in templates only)."""
    if BUILTIN.get(template.name) is not template:
        return [template]
    return [template, *TRAIN_PARAPHRASES.get(template.name, [])]


HELDOUT: dict[str, list[Template]] = {
    task: [Template(f"{task}@heldout{i + 1}", p, c, BUILTIN[task].kind) for i, (p, c) in enumerate(pairs)]
    for task, pairs in _HELDOUT.items()
}


def heldout_templates(name: str) -> list[Template]:
    """Paraphrases of a built-in template, never used in training; [] for user templates."""
    return list(HELDOUT.get(name, []))


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_label(text: str) -> str:
    """A classification answer as compared: its first non-empty line, lowercased, without
    punctuation, whitespace collapsed (' Positive.' == 'positive')."""
    line = text.strip().split("\n", 1)[0]
    return " ".join(line.lower().translate(_PUNCT).split())


def label_counts(items) -> dict[str, dict[str, int]]:
    """{template: {label: count}} of the classification items (rendered records or examples: anything
    with .kind, .template and .completion), labels in sorted order."""
    counts: dict[str, Counter] = {}
    for e in items:
        if e.kind == "classification":
            counts.setdefault(e.template, Counter())[normalize_label(e.completion)] += 1
    return {t: dict(sorted(c.items())) for t, c in counts.items()}
