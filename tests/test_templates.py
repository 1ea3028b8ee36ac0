"""Templates: safe substitution, missing fields, derivations, built-ins, held-out paraphrases,
resolving data.templates."""
import pytest

from ftcore.config import DataConfig
from ftcore.data.template_sources import resolve_templates
from ftcore.data.templates import BUILTIN, HELDOUT, KINDS, MissingField, Template, TemplateError, \
    heldout_templates, parse_rating

REVIEW = {"rating": 4, "summary": "Solid kettle", "text": "The handle is nice.", "product": "Lumo kettle"}


def test_placeholders():
    t = Template("t", "Say {a} and {b_2} {a}", "{c}", "generation")
    assert t.fields == {"a", "b_2", "c"}
    assert t.render({"a": "x", "b_2": 3, "c": "y"}) == ("Say x and 3 x", "y")


@pytest.mark.parametrize("bad", ["{a.b}", "{a[0]}", "{0}", "{}", "{ a }", "{a!r}", "{a:>4}", "lone { brace",
                                 "lone } brace", "{__class__.__init__}x{", "{a"])
def test_unsafe_or_broken_placeholders_are_refused(bad):
    with pytest.raises(TemplateError, match=r"template 'u' prompt: invalid placeholder .* plain field name.*"
                                            r"Jinja form, data.user_templates.u = \{jinja = "):
        Template("u", bad, "{a}")


@pytest.mark.parametrize("jinja", ["Review: {{review_body}}", "{{ text }}", "{% if a %}x{% endif %}", "a}}", "{{literal}}"])
def test_jinja_syntax_in_a_field_template_points_to_the_jinja_form(jinja):
    """`{{` was an escaped brace, so a pasted promptsource template rendered '{review_body}' silently."""
    with pytest.raises(TemplateError) as e:
        Template("mine", jinja, " {b}")
    msg = str(e.value)
    assert msg.startswith("template 'mine' prompt: '") and "is Jinja syntax, which a {field} template does not run" in msg
    assert 'data.user_templates.mine = {jinja = "... {{ field }} ... ||| {{ answer }}"}' in msg and "\n" not in msg


def test_values_are_inserted_literally_not_expanded():
    t = Template("t", "Review: {text}", " {summary}")
    record = {"text": "I typed {summary} and {{x}} and {text.__class__}", "summary": "S"}
    assert t.render(record) == ("Review: I typed {summary} and {{x}} and {text.__class__}", " S")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_or_empty_field_raises(value):
    t = BUILTIN["summary"]
    record = {**REVIEW, "summary": value}
    with pytest.raises(MissingField, match="no field 'summary' \\(needed by template 'summary'\\)") as e:
        t.render(record)
    assert e.value.field == "summary" and e.value.template == "summary"
    with pytest.raises(MissingField):
        t.render({"rating": 4})


def test_derivations():
    sentiment = BUILTIN["sentiment"]
    assert [sentiment.render({"text": "x", "rating": r})[1] for r in (1, 2, 3, 4, 5)] == \
           [" negative", " negative", " neutral", " positive", " positive"]
    # CSV strings, JSON floats
    assert sentiment.render({"text": "x", "rating": "2"})[1] == " negative"
    assert sentiment.render({"text": "x", "rating": 4.0})[1] == " positive"
    assert BUILTIN["rating"].render({"text": "x", "rating": 4.0})[1] == " 4"
    # a dataset's own column wins over the derivation
    assert sentiment.render({"text": "x", "rating": 1, "sentiment": "mixed"})[1] == " mixed"
    prompt, completion = BUILTIN["review"].render(REVIEW)
    assert prompt.startswith('Write a 4-star product review for Lumo kettle with the title "Solid kettle".')
    assert completion == " The handle is nice."
    no_product = {k: v for k, v in REVIEW.items() if k != "product"}
    assert BUILTIN["review"].render(no_product)[0].startswith('Write a 4-star product review with the title')
    with pytest.raises(MissingField, match="'stars'"):
        BUILTIN["review"].render({"summary": "s", "text": "t"})
    prompt, completion = BUILTIN["translate"].render({"source": "Bonjour", "target": "Hello"})
    assert "from the original language to English" in prompt and "Bonjour" in prompt and completion == " Hello"
    assert "from French to German" in BUILTIN["translate"].render(
        {"source": "Bonjour", "target": "Hallo", "source_lang": "French", "target_lang": "German"})[0]


@pytest.mark.parametrize("bad", [0, 6, "4.5", "four", True, None, ""])
def test_bad_rating_is_a_clear_error(bad):
    if bad in (None, ""):
        with pytest.raises(MissingField):
            BUILTIN["sentiment"].render({"text": "x", "rating": bad})
        return
    with pytest.raises(TemplateError, match="field 'rating' must be an integer from 1 to 5"):
        parse_rating(bad)
    with pytest.raises(TemplateError, match="field 'rating'"):
        BUILTIN["sentiment"].render({"text": "x", "rating": bad})


def test_builtins():
    assert set(BUILTIN) == {"rating", "sentiment", "review", "summary", "translate"}
    kinds = {n: t.kind for n, t in BUILTIN.items()}
    assert kinds == {"rating": "classification", "sentiment": "classification", "review": "generation",
                     "summary": "summarization", "translate": "translation"}
    for name in ("rating", "sentiment", "review", "summary"):
        prompt, completion = BUILTIN[name].render(REVIEW)
        assert "{" not in prompt and completion.startswith(" ") and not completion.startswith("  ")
    assert BUILTIN["rating"].render(REVIEW)[1] == " 4"
    # rating/sentiment prompts only show the text: the answer is not in the prompt
    for name in ("rating", "sentiment"):
        assert BUILTIN[name].fields == {"text", name}


def test_heldout_paraphrases():
    for name, train in BUILTIN.items():
        held = heldout_templates(name)
        assert 2 <= len(held) <= 3
        for i, h in enumerate(held, 1):
            assert h.name == f"{name}@heldout{i}" and h.task == name and h.kind == train.kind
            assert h.prompt != train.prompt and h.completion == train.completion
            assert h.fields <= train.fields  # needs nothing the training template did not
        assert len({h.prompt for h in held}) == len(held)
    assert heldout_templates("my_template") == []
    assert set(HELDOUT) == set(BUILTIN)


def test_resolve_templates():
    got = resolve_templates(DataConfig())
    assert [(t.name, w) for t, w in got] == [("rating", 1.0), ("sentiment", 1.0), ("summary", 1.0), ("review", 1.0)]
    cfg = DataConfig(templates={"rating": 2, "mine": 0.5},
                     user_templates={"mine": {"prompt": "Q: {question}\nA:", "completion": " {answer}",
                                              "kind": "classification"}})
    got = resolve_templates(cfg)
    assert [(t.name, w) for t, w in got] == [("rating", 2.0), ("mine", 0.5)]
    assert got[1][0].fields == {"question", "answer"} and got[1][0].kind == "classification"
    # a user template may replace a built-in of the same name; kind defaults to generation
    cfg = DataConfig(templates=["summary"], user_templates={"summary": {"prompt": "{text}", "completion": "{summary}"}})
    assert resolve_templates(cfg)[0][0].prompt == "{text}" and resolve_templates(cfg)[0][0].kind == "generation"


@pytest.mark.parametrize("cfg, msg", [
    (DataConfig(templates=["ratng"]), r"unknown template 'ratng'; available: rating, sentiment, review, summary, translate"),
    (DataConfig(templates=["rating@heldout1"]), r"'rating@heldout1' is a held-out paraphrase, used only in evaluation"),
    (DataConfig(templates=[]), r"data.templates is empty"),
    (DataConfig(templates={"rating": 0}), r"weight of 'rating' must be > 0"),
    (DataConfig(templates=["rating", "rating"]), r"'rating' is listed twice"),
    (DataConfig(templates=["x"], user_templates={"x": {"prompt": "{a}"}}), r"data.user_templates.x.completion is required"),
    (DataConfig(templates=["x"], user_templates={"x": {"prompt": "{a}", "completion": "{b}", "knd": "g"}}),
     r"data.user_templates.x: unknown key 'knd'"),
    (DataConfig(templates=["x"], user_templates={"x": {"prompt": "{a}", "completion": "{b}", "kind": "chat"}}),
     r"template 'x': kind must be one of " + ", ".join(KINDS)),
    (DataConfig(templates=["x"], user_templates={"x": {"prompt": "{a.b}", "completion": "{b}"}}),
     r"template 'x' prompt: invalid placeholder '\{a.b\}'"),
])
def test_resolve_errors(cfg, msg):
    with pytest.raises(TemplateError, match=msg) as e:
        resolve_templates(cfg)
    assert "\n" not in str(e.value)


def test_training_paraphrases_never_meet_the_heldout_ones():
    import random

    from ftcore.data import ensure_record_ids, render_records
    from ftcore.data.reviews import generate_reviews
    from ftcore.data.templates import TRAIN_PARAPHRASES, training_variants

    for task, variants in TRAIN_PARAPHRASES.items():
        assert all(v.name == task and v.kind == BUILTIN[task].kind for v in variants)
        heldout = {h.prompt for h in HELDOUT[task]}
        assert not heldout & {v.prompt for v in training_variants(BUILTIN[task])}
    # user templates have no paraphrases
    mine = Template("mine", "Q: {text}", " {rating}", "classification")
    assert training_variants(mine) == [mine]

    records = ensure_record_ids(generate_reviews(200, 0), "generated")
    templates = [(BUILTIN["rating"], 1.0), (BUILTIN["sentiment"], 1.0)]
    on = render_records(records, templates, rng=random.Random(0), paraphrases=True)
    off = render_records(records, templates, rng=random.Random(0), paraphrases=False)
    text = {str(r["record_id"]): r["text"] for r in records}
    heads = lambda rendered: {r.prompt.replace(text[r.record_id], "{text}") for r in rendered if r.template == "rating"}
    assert len(heads(off)) == 1 and len(heads(on)) == 1 + len(TRAIN_PARAPHRASES["rating"])
    assert [r.template for r in on] == [r.template for r in off]  # same tasks, same completions
    assert [r.completion for r in on] == [r.completion for r in off]
