"""Jinja as ftcore runs it: one sandboxed environment, set up the way transformers sets up the one
that runs chat templates (transformers/utils/chat_template_utils.py), so that a template written for
Hugging Face renders here to the same text.

- `ImmutableSandboxedEnvironment`: templates come from model files and configs, so they get no
  access to Python internals and cannot mutate the lists and dicts they are given;
- `loopcontrols` (`{% break %}`, `{% continue %}`) and `{% generation %}...{% endgeneration %}`,
  transformers' marker of assistant text (TRL's *_training templates use it); here it renders its
  body and nothing more: ftcore finds the text that carries loss itself (ftcore.data.chat);
- `raise_exception(message)`, the `tojson` filter with transformers' arguments and no HTML
  escaping, and `strftime_now(format)`, which formats a date fixed by the run (the `today`
  argument; data.chat_date in a config) instead of the clock, so the same config renders the same
  tokens on any day.

Chat templates also get `trim_blocks` and `lstrip_blocks` (`chat_environment`); other templates
(the prompt-template libraries' Jinja, ftcore.data.jinja_templates) take Jinja's defaults and a
sandbox that lets them build lists of their own (`mutable`; each render gets a copy of the record).
"""
from __future__ import annotations

import datetime
import json
import traceback

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

from ftcore.config import DEFAULT_CHAT_DATE


class _Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment(today: str = DEFAULT_CHAT_DATE, mutable: bool = False, **options) -> SandboxedEnvironment:
    """The sandboxed environment with transformers' extensions, filters and globals; `today`
    (YYYY-MM-DD, midnight) is what strftime_now formats; options go to the Environment. mutable:
    lists and dicts may be modified (`x.append(..)`, which promptsource's templates use on lists
    they build); the sandbox still keeps Python's internals out of reach."""
    now = datetime.datetime.combine(datetime.date.fromisoformat(today), datetime.time())
    sandbox = SandboxedEnvironment if mutable else ImmutableSandboxedEnvironment
    env = sandbox(extensions=[_Generation, loopcontrols], **options)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = now.strftime
    return env


def chat_environment(today: str = DEFAULT_CHAT_DATE) -> ImmutableSandboxedEnvironment:
    """The environment chat templates run in: `environment` with trim_blocks and lstrip_blocks."""
    return environment(today, trim_blocks=True, lstrip_blocks=True)


def error_text(exc: BaseException) -> str:
    """One line for an error raised while compiling or rendering a template: 'line N: what'."""
    line = getattr(exc, "lineno", None)
    if line is None:  # a runtime error: jinja maps the template's frames back to "<template>" lines
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
        line = frames[-1].lineno if frames else None
    what = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if not isinstance(exc, jinja2.exceptions.TemplateError):
        what = f"{type(exc).__name__}: {what}"
    return (f"line {line}: " if line else "") + " ".join(str(what).split())
