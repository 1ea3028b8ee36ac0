"""Which templates a run uses: data.templates names built-in templates, templates defined in the
config (data.user_templates, in the `{field}` form or the Jinja form) and template files
(promptsource's templates.yaml form), each with a weight.

    templates = ["rating", "summary"]                                 # built-in / data.user_templates
    templates = ["configs/templates/amazon_reviews.yaml"]             # every template of the file
    templates = { "configs/templates/amazon_reviews.yaml#rating" = 2, summary = 1 }   # one, weighted

An entry ending in .yaml / .yml (before an optional #NAME) is a file, read relative to the working
directory like data.path; its templates are named by their `name`, which is also the task's name in
eval.json, and a weight given to a whole file applies to each of its templates.
"""
from __future__ import annotations

import re
from pathlib import Path

from ftcore.data.jinja_templates import TEMPLATE_KEYS, JinjaTemplate, template_from_spec
from ftcore.data.miniyaml import YamlError, YamlMap, load_yaml
from ftcore.data.templates import BUILTIN, Template, TemplateError

_FILE = re.compile(r"(?P<path>.+\.ya?ml)(?:#(?P<name>.*))?")


def read_template_file(path: str | Path) -> list[JinjaTemplate]:
    """The templates of a promptsource-style file: a top-level `templates:`, a mapping of
    id -> template (promptsource's) or a list of templates, each with name, jinja and optionally
    answer_choices, metadata.metrics and kind (see jinja_templates.template_from_spec)."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"data.templates: template file not found: {path}")
    try:
        doc = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except YamlError as e:
        raise TemplateError(str(e)) from None
    except UnicodeDecodeError as e:
        raise TemplateError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    entries = doc.get("templates") if isinstance(doc, dict) else None
    if not isinstance(entries, (dict, list)) or not entries:
        raise TemplateError(f"{path}:1: expected a top-level 'templates:' holding the templates "
                            "(promptsource's templates.yaml form)")
    out: dict[str, JinjaTemplate] = {}
    for entry in entries.values() if isinstance(entries, dict) else entries:
        line = getattr(entry, "line", 1)
        if not isinstance(entry, YamlMap) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise TemplateError(f"{path}:{line}: each template needs a name (and jinja, answer_choices, ...)")
        name = entry["name"].strip()
        if name in out:
            raise TemplateError(f"{path}:{line}: a second template named '{name}' (first at {out[name].where})")
        out[name] = template_from_spec(name, entry, f"{path}:{line}", entry.lines)
    return list(out.values())


def user_template(name: str, spec: dict) -> Template | JinjaTemplate:
    """data.user_templates.NAME: {prompt, completion, kind} or {jinja, answer_choices, kind}."""
    where = f"data.user_templates.{name}"
    if "jinja" in spec:
        return template_from_spec(name, spec, where)
    unknown = set(spec) - {"prompt", "completion", "kind"}
    if unknown:
        raise TemplateError(f"{where}: unknown key '{sorted(unknown)[0]}' (keys: prompt, completion, kind; "
                            f"or {', '.join(TEMPLATE_KEYS)} for a Jinja template)")
    for key in ("prompt", "completion"):
        if not isinstance(spec.get(key), str):
            raise TemplateError(f"{where}.{key} is required (a string with {{field}} placeholders)")
    if "@" in name:
        raise TemplateError(f"{where}: '@' is reserved for held-out templates, pick another name")
    return Template(name, spec["prompt"], spec["completion"], spec.get("kind", "generation"))


def available_templates(user_templates: dict | None = None) -> dict[str, Template | JinjaTemplate]:
    """Built-ins plus the user's (a user template of the same name replaces the built-in)."""
    out: dict = dict(BUILTIN)
    for name, spec in (user_templates or {}).items():
        out[name] = user_template(name, spec)
    return out


def resolve_templates(data_cfg) -> list[tuple[Template | JinjaTemplate, float]]:
    """data.templates (a list of entries, or {entry = weight}) -> [(template, weight)]; an entry
    is a template's name or a template file (FILE.yaml: all of its templates, FILE.yaml#NAME: one)."""
    avail = available_templates(data_cfg.user_templates)
    chosen = data_cfg.templates
    items = list(chosen.items()) if isinstance(chosen, dict) else [(n, 1.0) for n in chosen]
    if not items:
        raise TemplateError("data.templates is empty: name at least one of " + ", ".join(avail))
    out, seen, files = [], {}, {}
    for entry, weight in items:
        if not weight > 0:
            raise TemplateError(f"data.templates: weight of '{entry}' must be > 0, got {weight}")
        for template in _entry_templates(entry, avail, files):
            if template.name in seen:
                first = seen[template.name]
                again = "is listed twice" if first == entry else f"comes from both '{first}' and '{entry}'"
                raise TemplateError(f"data.templates: '{template.name}' {again}")
            seen[template.name] = entry
            out.append((template, float(weight)))
    return out


def _entry_templates(entry: str, avail: dict, files: dict) -> list:
    m = _FILE.fullmatch(entry)
    if m is None:
        if "@heldout" in entry:
            raise TemplateError(f"data.templates: '{entry}' is a held-out paraphrase, used only in evaluation")
        if entry not in avail:
            raise TemplateError(f"data.templates: unknown template '{entry}'; available: {', '.join(avail)} "
                                "(or a template file, FILE.yaml or FILE.yaml#NAME)")
        return [avail[entry]]
    if m["path"] not in files:
        files[m["path"]] = read_template_file(m["path"])
    templates = files[m["path"]]
    if m["name"] is None:
        return templates
    found = [t for t in templates if t.name == m["name"]]
    if not found:
        raise TemplateError(f"data.templates: {m['path']} has no template named '{m['name']}'; "
                            f"its templates: {', '.join(t.name for t in templates)}")
    return found
