"""Jinja prompt templates in the template libraries' form (promptsource's templates.yaml, or inline
in the config): rendered as promptsource renders them, in a sandbox, a missing field named and a
record a template does not apply to skipped and counted; the task kind; data.templates naming
files; answer_choices as the label set of ranked scoring, macro-F1 and the majority baseline; and
promptsource's own 2,085 templates, which nobody here wrote."""
import json
import random
import re
from pathlib import Path

import pytest

from ftcore.config import DataConfig
from ftcore.data import DataError, prepare_datasets, render_records
from ftcore.data.jinja_templates import JinjaTemplate, NoAnswer, kind_of, template_from_spec
from ftcore.data.template_sources import read_template_file, resolve_templates
from ftcore.data.templates import BUILTIN, MissingField, TemplateError
from ftcore.evaluate import baseline_results, label_sets
from ftcore.tokenizer import Tokenizer
from helpers import make_run_setup, promptsource_files, run_overrides

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "review_templates.yaml"
AMAZON = ROOT / "configs" / "templates" / "amazon_reviews.yaml"
REVIEW = {"record_id": "7", "text": "Sturdy ||| and quiet.", "summary": "Quiet", "rating": 4, "label": 1,
          "option_a": "loud", "option_b": "quiet"}


def templates(path) -> dict[str, JinjaTemplate]:
    return {t.name: t for t in read_template_file(path)}


def test_a_promptsource_form_file_renders_as_promptsource_renders():
    t = templates(FIXTURE)
    assert list(t) == ["polarity", "write a review", "pick one", "summary"]
    polarity = t["polarity"]
    # both parts stripped, the answer behind the space of ftcore's completions; a '|||' in the
    # record's own text stays text
    assert polarity.render(REVIEW) == ("Review: Sturdy ||| and quiet.\nIs this review negative or positive?", " positive")
    assert polarity.choices(REVIEW) == ("negative", "positive") and polarity.kind == "classification"
    assert polarity.fields == {"text", "label"} and polarity.prompt_fields == ("text",)
    review = t["write a review"]
    assert review.render(REVIEW) == ("Write a 4-star review.", " Sturdy ||| and quiet.")
    assert review.render({**REVIEW, "product": "kettle"})[0] == "Write a 4-star review of the kettle."
    assert review.fields == {"rating", "text"} and review.kind == "generation"  # `product is defined`: optional
    pick = t["pick one"]  # choices that depend on the record
    assert pick.render(REVIEW) == ("Which fits the review better?\n- loud\n- quiet", " quiet")
    assert pick.choices(REVIEW) == ("loud", "quiet") and pick.kind == "classification"
    assert t["summary"].kind == "summarization" and t["summary"].render(REVIEW)[1] == " Quiet"
    assert polarity.where == f"{FIXTURE}:10" and t["summary"].where == f"{FIXTURE}:45"  # their first lines


def test_the_readmes_amazon_templates():
    t = templates(AMAZON)
    record = {"record_id": "1", "review_body": "Tasty, but the bag arrived torn.", "review_headline": "Tasty",
              "star_rating": 3}
    assert {n: x.kind for n, x in t.items()} == {"rating": "classification", "review": "generation",
                                                 "summary": "summarization"}
    prompt, completion = t["rating"].render(record)  # star_rating - 1 on the JSON number
    assert prompt.endswith("Review: Tasty, but the bag arrived torn.\n\nRating:") and completion == " 3"
    assert t["rating"].choices(record) == ("1", "2", "3", "4", "5")
    assert t["review"].render(record) == ('Generate a 3-star review of a product, under the title "Tasty".\n\nReview:',
                                          " Tasty, but the bag arrived torn.")
    assert t["summary"].render(record)[1] == " Tasty" and t["summary"].prompt_fields == ("review_body",)


@pytest.mark.parametrize("value", ["absent", None, "", "  "])
def test_a_missing_field_is_named_not_rendered_empty(value):
    """jinja's default Undefined prints nothing: 'Review: \\nIs this review ...' would be trained on."""
    record = {k: v for k, v in REVIEW.items() if k != "text"} if value == "absent" else {**REVIEW, "text": value}
    with pytest.raises(MissingField) as e:
        templates(FIXTURE)["polarity"].render(record)
    assert (e.value.field, e.value.template) == ("text", "polarity")
    # an attribute or element a value lacks is the template's mistake, not a silent gap
    t = JinjaTemplate("t", "{{ meta.colour }} ||| x")
    with pytest.raises(TemplateError, match=r"rendering failed \(UndefinedError: 'dict object' has no attribute 'colour'\)"):
        t.render({"meta": {"size": 1}})


def test_a_record_a_template_does_not_apply_to_is_skipped_and_counted():
    pick = templates(FIXTURE)["pick one"]
    records = [{**REVIEW, "record_id": str(i), "label": label} for i, label in enumerate([0, -1, 1, -1])]
    skipped = {}
    out = render_records(records, [(pick, 1.0)], skipped=skipped)
    assert [r.completion for r in out] == [" loud", " quiet"] and skipped == {"pick one": 2}
    assert out[0].choices == ("loud", "quiet")
    with pytest.raises(NoAnswer):
        pick.render(records[1])
    with pytest.raises(DataError) as e:
        render_records(records, [(pick, 1.0)], missing_field="error")
    assert str(e.value) == ("record 1: the template renders no answer for it, needed by template 'pick one' "
                            '(data.missing_field="skip" skips such records)')


@pytest.mark.parametrize("jinja, record, message", [
    ("{{ text.__class__.__mro__ }} ||| x", {"text": "a"}, "the sandbox refuses it: access to attribute '__class__'"),
    ("{{ star - 1 }} ||| x", {"star": "5"}, "rendering failed (TypeError: unsupported operand type(s) for -: 'str' and "
                                            "'int') (CSV values are text: {{ x | int }} makes a number)"),
    ("{{ a }} ||| {{ b }} ||| {{ c }}", {"a": 1, "b": 2, "c": 3}, "renders 2 '|||' for this record; one separates"),
])
def test_rendering_failures_are_one_line(jinja, record, message):
    t = JinjaTemplate("t", jinja, where="data.user_templates.t")
    with pytest.raises(TemplateError) as e:
        t.render(record)
    assert str(e.value).startswith("data.user_templates.t: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not isinstance(e.value, MissingField)
    assert JinjaTemplate("t", "{{ star - 1 }} ||| x").render({"star": 5}) == ("4", " x")  # types kept


def test_a_template_builds_lists_of_its_own_and_never_changes_the_record():
    """promptsource's templates build lists with .append (194 of 2,085): allowed, on their own lists
    and on the copy of the record each render gets."""
    t = JinjaTemplate("t", "{% set seen = [] %}{% for w in words %}{% if w not in seen %}{{ seen.append(w) or '' }}"
                           "{% endif %}{% endfor %}{{ seen | join(' ') }}{{ words.append('x') or '' }} ||| {{ words | length }}")
    record = {"words": ["a", "b", "a"]}
    assert t.render(record) == ("a b", " 4") and t.render(record) == ("a b", " 4")
    assert record == {"words": ["a", "b", "a"]}


def test_choice_draws_the_same_for_a_record_in_every_run():
    summary = templates(FIXTURE)["summary"]
    cues = [summary.render({**REVIEW, "record_id": str(i)})[0].split(":")[0] for i in range(40)]
    assert set(cues) == {"Summarize", "In short"}
    again = templates(FIXTURE)["summary"]  # read afresh, as a later run would, with the global random moved on
    random.seed(123)
    assert [again.render({**REVIEW, "record_id": str(i)})[0].split(":")[0] for i in range(40)] == cues


@pytest.mark.parametrize("choices, metrics, kind", [
    ("no ||| yes", ["BLEU"], "classification"), (None, ["ROUGE", "BLEU"], "summarization"),
    (None, ["BLEU", "ROUGE"], "generation"), (None, ["Accuracy"], "classification"),
    (None, ["Squad", "rouge"], "summarization"), (None, ["Other"], "generation"), (None, [], "generation"),
])
def test_the_kind_comes_from_answer_choices_then_the_metrics(choices, metrics, kind):
    assert kind_of(choices, metrics) == kind
    spec = {"jinja": "{{ q }} ||| {{ a }}", "answer_choices": choices, "metadata": {"metrics": metrics}}
    assert template_from_spec("t", spec, "f.yaml:3", {}).kind == kind
    assert template_from_spec("t", {**spec, "kind": "translation"}, "f.yaml:3", {}).kind == "translation"


def test_data_templates_names_files_and_their_templates():
    cfg = DataConfig(templates=[str(FIXTURE)])
    assert [(t.name, w) for t, w in resolve_templates(cfg)] == [("polarity", 1.0), ("write a review", 1.0),
                                                                ("pick one", 1.0), ("summary", 1.0)]
    cfg = DataConfig(templates={f"{FIXTURE}#summary": 2, "rating": 1, f"{AMAZON}#review": 0.5})
    got = resolve_templates(cfg)
    assert [(t.name, w) for t, w in got] == [("summary", 2.0), ("rating", 1.0), ("review", 0.5)]
    assert isinstance(got[0][0], JinjaTemplate) and got[1][0] is BUILTIN["rating"]
    # inline, in the same form; the {field} form still works beside it
    cfg = DataConfig(templates=["yes_no", "plain"], user_templates={
        "yes_no": {"jinja": "Is it good? {{ text }} ||| {{ answer_choices[label] }}", "answer_choices": "no ||| yes"},
        "plain": {"prompt": "{text}", "completion": " {summary}"}})
    (yes_no, _), (plain, _) = resolve_templates(cfg)
    assert yes_no.kind == "classification" and yes_no.render(REVIEW) == ("Is it good? Sturdy ||| and quiet.", " yes")
    assert plain.render(REVIEW) == ("Sturdy ||| and quiet.", " Quiet")


def _write(tmp_path, text) -> str:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return str(path)


ENTRY = "templates:\n  a1: !Template\n    name: mine\n"


@pytest.mark.parametrize("text, entry, message", [
    (None, "nope.yaml", "data.templates: template file not found: nope.yaml"),
    (None, f"{FIXTURE}#nope", "has no template named 'nope'; its templates: polarity, write a review, pick one, summary"),
    (None, [str(FIXTURE), f"{FIXTURE}#summary"], f"'summary' comes from both '{FIXTURE}' and '{FIXTURE}#summary'"),
    (None, [f"{FIXTURE}#summary", "summary"], f"'summary' comes from both '{FIXTURE}#summary' and 'summary'"),
    ("dataset: x\n", "FILE", "FILE:1: expected a top-level 'templates:'"),
    ("templates:\n  a: 'open\n", "FILE", "FILE:2: the ' quote opened here is never closed"),
    (ENTRY + "    jinja: 'no separator'\n", "FILE", "FILE:3: template 'mine': its jinja has no '|||'"),
    (ENTRY + "    jinja: '{{ x ||| y'\n", "FILE", "FILE:3: template 'mine': Jinja syntax error in its jinja, line 1"),
    (ENTRY + "    jinja: 'a ||| b'\n    answer_choice: 1 ||| 2\n", "FILE",
     "FILE:5: unknown key 'answer_choice' in template 'mine' (keys: jinja, answer_choices, kind, name, metadata"),
    (ENTRY + "    jinja: 'a ||| b'\n    kind: chat\n", "FILE", "FILE:3: template 'mine': kind must be one of"),
    (ENTRY + "    jinja: 'a ||| b'\n    metadata:\n      metrics: BLEU\n", "FILE",
     "FILE:5: metadata of 'mine' must be a mapping with metrics: a list"),
    (ENTRY + "    jinja: 'a ||| b'\n  a2: !Template\n    name: mine\n    jinja: 'c ||| d'\n", "FILE",
     "FILE:6: a second template named 'mine' (first at FILE:3)"),
    (ENTRY.replace("name: mine", "name: a@b") + "    jinja: 'a ||| b'\n", "FILE", "'@' (reserved for held-out templates)"),
    ("templates:\n  - jinja: 'a ||| b'\n", "FILE", "FILE:2: each template needs a name"),
])
def test_template_file_mistakes_are_one_line(tmp_path, text, entry, message):
    path = _write(tmp_path, text) if text is not None else None
    entries = entry if isinstance(entry, list) else [entry.replace("FILE", path or "")]
    with pytest.raises(TemplateError) as e:
        resolve_templates(DataConfig(templates=entries))
    assert message.replace("FILE", path or "") in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("spec, message", [
    ({"jinja": "a ||| b", "answer_choice": "x"}, "data.user_templates.t.answer_choice: unknown key 'answer_choice' in "
                                                 "template 't' (keys: jinja, answer_choices, kind)"),
    ({"prompt": "{a}", "completion": "{b}", "jinja": "a ||| b"}, "data.user_templates.t.prompt: unknown key 'prompt'"),
    ({"prompt": "{a}", "answer_choices": "x"}, "data.user_templates.t: unknown key 'answer_choices' (keys: prompt, "
                                               "completion, kind; or jinja, answer_choices, kind for a Jinja template)"),
])
def test_inline_template_mistakes_are_one_line(spec, message):
    with pytest.raises(TemplateError, match=re.escape(message)):
        resolve_templates(DataConfig(templates=["t"], user_templates={"t": spec}))


# ------------------------------------------------------------------------------------------------
# answer_choices: the label set

def _reviews(n: int, ratings) -> list[dict]:
    words = ["awful", "poor", "fine", "good", "superb"]
    return [{"id": i, "review_body": f"The kettle is {words[r - 1]} and boils {i % 7} cups.",
             "review_headline": words[r - 1].title(), "star_rating": r} for i, r in zip(range(n), ratings)]


def test_answer_choices_are_the_label_set_even_for_a_label_training_lacks():
    records = _reviews(60, [1, 3, 4, 5] * 15)  # no rating 2 at all
    tok = Tokenizer.train_bpe([r["review_body"] for r in records] * 3, vocab_size=300)
    cfg = DataConfig(templates=[f"{AMAZON}#rating"], split=[0.8, 0.1, 0.1], max_seq_len=128, max_completion_tokens=8)
    data = prepare_datasets(cfg, tok, records=records)
    assert sorted({e.completion for e in data.train}) == [" 1", " 3", " 4", " 5"]
    sets = label_sets(data.train + data.answer_forms)
    assert sets["rating"].names == ["1", "2", "3", "4", "5"] and sets["rating"].texts == [" 1", " 2", " 3", " 4", " 5"]
    assert sets["rating"].ids == [tok.encode(f" {n}") for n in "12345"]  # each as a completion is tokenized
    assert label_sets(data.train)["rating"].names == ["1", "3", "4", "5"]  # what the forms add
    base = baseline_results(data.test, data.train, {}, {})["rating"]
    assert base["label_set"] == ["1", "2", "3", "4", "5"] and base["majority_answer"] in {"1", "3", "4", "5"}


def test_record_dependent_choices_are_no_label_set_and_answers_outside_the_choices_no_label():
    tok = Tokenizer.train_bpe(["loud quiet warm cold Which fits the review better? 7"] * 5, vocab_size=280)
    pick = templates(FIXTURE)["pick one"]
    records = [{**REVIEW, "record_id": str(i), "option_a": a, "option_b": b, "label": i // 2 % 2}
               for i, (a, b) in enumerate([("loud", "quiet"), ("warm", "cold")] * 3)]
    from ftcore.data import tokenize_examples
    examples = tokenize_examples(render_records(records, [(pick, 1.0)]), tok)
    assert label_sets(examples) == {}  # choices differ per record: not one label set to rank
    fixed = [e for e in examples if e.choices == ("loud", "quiet")]
    outside = tokenize_examples(render_records([{**records[0], "option_b": "7"}], [(pick, 1.0)]), tok)
    outside[0].choices = ("loud", "quiet")  # an answer that is none of its choices
    assert label_sets(fixed + outside)["pick one"].names == ["loud", "quiet"]


# ------------------------------------------------------------------------------------------------
# a run

def test_a_broken_template_file_stops_the_run_before_pretraining(tmp_path, capsys):
    from ftcore.cli import main
    bad = _write(tmp_path, ENTRY + "    jinja: 'Rate: {{ text }} ||| {{ rating'\n")
    run = tmp_path / "run"
    rc = main(["train", str(ROOT / "configs" / "tiny_cpu.toml"), f"run.dir={run}", f"data.templates=[\"{bad}\"]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"ftcore train: error: {bad}:3: template 'mine': Jinja syntax error in its jinja, line 1: unexpected end "
                               "of template, expected 'end of print statement'."], err
    assert not (run / "base").exists() and not (run / "config.toml").exists()


def test_a_run_on_a_template_file(tmp_path):
    """The README's recipe in small: the amazon file with data.rename, through training and evaluation;
    eval.json has its three tasks with their kinds' metrics and the rating task ranks 1-5."""
    from ftcore.train import train
    from ftcore.config import load_config
    from ftcore.parallel import shutdown
    setup = make_run_setup(tmp_path / "setup")
    overrides = run_overrides(setup, tmp_path / "run", data={
        "templates": f'["{AMAZON}"]', "rename": '{text="review_body", rating="star_rating", summary="review_headline"}'},
        eval={"base": "true", "final": "true", "max_examples": 4, "shots": 1, "heldout": "false", "max_new_tokens": 4},
        train={"max_steps": 2})
    try:
        train(load_config(ROOT / "configs" / "tiny_cpu.toml", overrides))
    finally:
        shutdown()
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    for section in ("baseline", "base", "base_kshot", "finetuned"):
        assert set(report[section]) == {"rating", "review", "summary"}, section
        assert report[section]["rating"]["label_set"] == ["1", "2", "3", "4", "5"]
    assert {"rank_macro_f1", "macro_f1"} <= set(report["base"]["rating"]) and "rougeL" in report["finetuned"]["summary"]
    assert "bleu" in report["finetuned"]["review"]


# ------------------------------------------------------------------------------------------------
# promptsource's own templates

def _promptsource_apply(template: dict, record: dict):
    """The reference: promptsource's Template.apply (jinja2 with its default settings, the
    answer_choices list, parts split at ||| and stripped), without its 2,048-character cut, which
    these records do not reach. (prompt, answer) or None when it renders no answer."""
    import jinja2
    env = jinja2.Environment()
    env.globals["zip"] = zip
    choices = None
    if template["answer_choices"] is not None:
        choices = [c.strip() for c in env.from_string(template["answer_choices"]).render(**record).split("|||")]
    parts = [p.strip() for p in env.from_string(template["jinja"]).render(**record, answer_choices=choices).split("|||")]
    return (parts[0], parts[1], tuple(choices or ())) if len(parts) == 2 and all(parts) else None


# real-looking records of a few datasets, with the fields the datasets have
AMAZON_US = {"marketplace": "US", "customer_id": "10349104", "review_id": "R2XLY6F4ZE0B7V", "product_id": "B00KCSGQOO",
             "product_parent": "893425812", "product_title": "Ankier Stylus Pen for Touch Screens", "product_category":
             "Wireless", "star_rating": 2, "helpful_votes": 0, "total_votes": 1, "vine": 0, "verified_purchase": 1,
             "review_headline": "Stopped working in a week", "review_body": "The tip wore through after a week of light "
             "use; it writes, but skips on every other stroke.", "review_date": "2015-08-31"}
RECORDS = {
    "amazon_us_reviews/Wireless_v1_00": [AMAZON_US, {**AMAZON_US, "star_rating": 5, "review_headline": "Great pen"}],
    "amazon_polarity": [{"label": 0, "title": "Broke fast", "content": "The hinge snapped on day two."},
                        {"label": 1, "title": "Lovely", "content": "Warm, soft and well made; I bought a second."}],
    "amazon_reviews_multi/en": [{"review_id": "en_0964290", "product_id": "product_en_0740675", "reviewer_id":
                                 "reviewer_en_0342986", "stars": 1, "review_body": "Arrived broken. Manufacturer "
                                 "defect.", "review_title": "I'll spend twice the amount", "language": "en",
                                 "product_category": "furniture"}],
    "yelp_review_full": [{"label": 3, "text": "Good tacos, slow service, loud music on a Tuesday night."}],
    "imdb": [{"label": 1, "text": "A quiet film that earns its ending."}, {"label": 0, "text": "Two hours I will not get back."}],
    "ag_news": [{"label": 2, "text": "Stocks rallied on Friday as oil prices fell for a third day."}],
    "super_glue/copa": [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
                         "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1}],
    "ncbi_disease": [{"id": "0", "tokens": ["Germline", "mutations", "in", "BRCA1", "cause", "breast", "cancer", "."],
                      "ner_tags": [0, 0, 0, 0, 0, 1, 2, 0]}],  # its templates build lists with .append
}


def test_every_promptsource_template_loads_with_its_kind():
    from ftcore.data.miniyaml import load_yaml
    kinds, n = {}, 0
    for name, text in promptsource_files().items():
        for t in read_template_file_from_text(name, text, load_yaml):
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
            n += 1
    assert n == 2085 and kinds == {"classification": 1332, "generation": 694, "summarization": 59}


def read_template_file_from_text(name, text, load_yaml) -> list[JinjaTemplate]:
    doc = load_yaml(text, name)
    return [template_from_spec(e["name"], e, f"{name}:{e.line}", e.lines) for e in doc["templates"].values()]


def test_promptsource_templates_render_as_promptsource_renders_them():
    """Every template of these datasets on real-looking records: ftcore's prompt, answer and choices
    equal the reference's, or ftcore skips the record where the reference renders no answer (the
    templates that build lists with .append included)."""
    from ftcore.data.miniyaml import load_yaml
    files = promptsource_files()
    compared = skipped = 0
    for dataset, records in RECORDS.items():
        (name,) = [n for n in files if n.endswith(f"/templates/{dataset}/templates.yaml")]
        raw = load_yaml(files[name], name)["templates"]
        for spec, ours in zip(raw.values(), read_template_file_from_text(name, files[name], load_yaml)):
            if "| choice" in spec["jinja"]:
                continue  # promptsource draws from the global random
            for i, record in enumerate(records):
                expected = _promptsource_apply(spec, record)
                try:
                    prompt, completion = ours.render({**record, "record_id": str(i)})
                except NoAnswer:
                    assert expected is None, (name, spec["name"])
                    skipped += 1
                    continue
                assert (prompt, completion[1:], ours.choices(record)) == expected, (name, spec["name"])
                assert completion[0] == " "
                compared += 1
    assert (compared, skipped) == (88, 2)


def test_pretraining_reads_the_fields_pretrain_text_fields_names(tmp_path, capsys):
    """A base pretrained here read `summary` and `text` by name: renamed fields were a KeyError."""
    from ftcore.cli import main
    from ftcore.data.reviews import pretraining_texts
    records = _reviews(20, [1, 2, 3, 4, 5] * 4)
    assert pretraining_texts(records[:1], ["review_headline", "review_body"]) == ["Awful\nThe kettle is awful and boils 0 cups."]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    rc = main(["train", str(ROOT / "configs" / "tiny_cpu.toml"), f"run.dir={run}", f"data.path={data}",
               f'data.templates=["{AMAZON}"]', 'pretrain.text_fields=["review_headline", "body"]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["ftcore train: error: pretrain.text_fields: no record has a field 'body' (after "
                               "data.rename; fields: id, review_body, review_headline, star_rating)"], err
    assert not (run / "base").exists()
