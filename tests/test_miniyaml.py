"""The YAML reader for template files (ftcore.data.miniyaml): what it reads equals what PyYAML reads,
on hand-written cases, on the repository's template files and on every templates.yaml promptsource
ships; what it does not read is one line naming file:line."""
import json
from pathlib import Path

import pytest

from ftcore.data.miniyaml import YamlError, YamlMap, load_yaml
from helpers import promptsource_files

yaml = pytest.importorskip("yaml")  # the reference (pyyaml, in the test extra)
ROOT = Path(__file__).resolve().parents[1]


def pyyaml(text: str):
    class Loader(yaml.SafeLoader):
        pass
    for tag in ("!Template", "!TemplateMetadata"):  # promptsource's objects, as plain mappings
        Loader.add_constructor(tag, lambda loader, node: loader.construct_mapping(node, deep=True))
    return yaml.load(text, Loader)


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # True != 1 and 1 != 1.0 here


CASES = [
    "a: 1\nb: -2\nc: 0.5\nd: null\ne: ~\nf:\ng: true\nh: False\ni: '0.5'\nj: \"x\"\nk: 1 ||| 2\n",
    "a: foo\n  bar\n\n  baz\n\n\nb: x\n",                              # plain, folded; blank lines are newlines
    "a: 'it''s\n   folded  \n\n\n   here '\n",                         # single quotes
    'a: "tab\\there \\u00e9\\x41\\U0001F600 \\\n   joined \\  \n  next\\\\"\n',  # escapes, \ continuation
    'a: "trail   \n  x"\nb: "l1\n\n  l2"\nc: "\\"q\\" \\/ \\0 \\N\\_"\n',
    "- a\n- b: 1\n  c: 2\n- - x\n  - y\n-\n  - z\n- \n",                 # sequences, compact items
    "k:\n- 1\n- 2\nl:\n    - 3\nm: 4\n",                                 # at the key's indentation or deeper
    "k: [a, 'b c', \"d,e\", 3, null]\nm: []\nn: {}\n",
    "x: &a !TemplateMetadata\n  p: 1\ny: *a\n",
    "t: !Template\n  name: n\n  jinja: 'x ||| y'\n",
    "---\na: 1\n",
    "a: b # comment\n# full line\nc: 'd' # c2\nd: e#f\n",
    "\"quoted key\": 1\n'single': 2\n",
    "a: http://x.y/z:8\nb: x:y\nc: 012x\nd: 1.5.6\ne: -x\nf: ?x\ng: :x\n",
    "a:\n  b:\n    c: deep\n  d: e\n",
    "list:\n  - one\n    two\n  - three\n",
    "top scalar\n",
    "",
    "a: 1\r\nb: 'x\r\n  y'\r\n",
]


@pytest.mark.parametrize("text", CASES)
def test_reads_what_pyyaml_reads(text):
    assert same(load_yaml(text, "t.yaml"), pyyaml(text))


def test_the_repositorys_template_files_read_as_pyyaml_reads_them():
    files = [ROOT / "configs" / "templates" / "amazon_reviews.yaml", ROOT / "tests" / "fixtures" / "review_templates.yaml"]
    for path in files:
        text = path.read_text()
        assert same(load_yaml(text, str(path)), pyyaml(text)), path


def test_mappings_know_their_lines():
    doc = load_yaml("# c\nouter:\n  first: 1\n\n  second:\n    - x\n", "t.yaml")
    assert isinstance(doc, YamlMap) and doc.line == 2 and doc.lines == {"outer": 2}
    assert doc["outer"].line == 3 and doc["outer"].lines == {"first": 3, "second": 5}


@pytest.mark.parametrize("text, line, message", [
    ("a: 1\nb: |\n  x\n", 2, "block scalars ('|') are not read here"),
    ("a: >\n  x\n", 1, "block scalars ('>')"),
    ("a: yes\n", 1, "'yes' reads as a bool, number or date in YAML 1.1 but not in 1.2: quote it"),
    ("a: off\n", 1, "'off' reads as"), ("a: 012\n", 1, "'012' reads as"), ("a: 1e5\n", 1, "'1e5' reads as"),
    ("a: 0x1F\n", 1, "'0x1F' reads as"), ("a: 1_000\n", 1, "'1_000' reads as"), ("a: .5\n", 1, "'.5' reads as"),
    ("a: 2024-01-02\n", 1, "'2024-01-02' reads as"),
    ("a:\n  b: !foo x\n", 2, "the tag !foo is not read here (only !Template, !TemplateMetadata)"),
    ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first at line 1)"),
    ("a: [1, [2]]\n", 1, "only [], {} and a one-line [a, b] list are read here"),
    ("a: [1,\n  2]\n", 1, "only [], {} and a one-line [a, b] list"),
    ("a: {b: 1}\n", 1, "only [], {} and a one-line [a, b] list"),
    ("a:\n\tb: 1\n", 2, "a tab in the indentation"),
    ("a: x\nb: 'open\n\nc: 1\n", 2, "the ' quote opened here is never closed"),
    ("a: b: c\n", 1, "':' followed by a space inside a plain value: quote the value"),
    ("a: foo\n  b: c\n", 1, "':' followed by a space inside a plain value"),
    ("a: 1\n---\nb: 2\n", 2, "several documents in one file"),
    ("a: 1\n  b: 2\n", 1, "':' followed by a space"),
    ("a:\n  b:\n    c: 2\n   d: 3\n", 4, "unexpected indentation"),
    ("a: *nope\n", 1, "alias *nope names no earlier anchor"),
    ("- a\nb: 1\n", 2, "unexpected text here"),
    ("a: @x\n", 1, "a plain value cannot start with '@': quote it"),
    ("a: - b\n", 1, "a plain value cannot start with '-'"), ("a: -\n", 1, "cannot start with '-'"),
    ("a: ? b\n", 1, "cannot start with '?'"),
    ('a: "\\q"\n', 1, "unknown escape \\q"), ('a: "\\x4"\n', 1, "bad escape \\x4"),
    ("a: 'x' y\n", 1, "text after the closing quote: 'y'"),
    ("%YAML 1.2\n---\na: 1\n", 1, "YAML directives are not read here"),
])
def test_what_it_does_not_read_is_one_line_naming_file_and_line(text, line, message):
    with pytest.raises(YamlError) as e:
        load_yaml(text, "dir/t.yaml")
    assert str(e.value).startswith(f"dir/t.yaml:{line}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_every_promptsource_templates_file_reads_as_pyyaml_reads_it():
    """promptsource 0.2.3's 279 templates.yaml files, nobody here wrote them: equal to PyYAML's
    reading, key order included (2,085 templates, anchors and aliases in squad_v2's)."""
    files = promptsource_files()
    assert len(files) == 279
    n = 0
    for name, text in files.items():
        ours = load_yaml(text, name)
        assert same(ours, pyyaml(text)), name
        assert list(ours["templates"]) == list(pyyaml(text)["templates"]), name
        n += len(ours["templates"])
    assert n == 2085
