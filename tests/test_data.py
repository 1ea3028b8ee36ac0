"""Data: loaders, bad input, instruction formats, completion masks, truncation, the grouped split,
the step sampler, micro-batches in every batching mode, the synthetic reviews."""
import collections
import json
import re
import time

import pytest
import torch

from ftcore.config import Config, DataConfig, SyntheticConfig, TrainConfig
from ftcore.data import IGNORE_INDEX, DataError, Datasets, Example, Rendered, StepSampler, chat_template, collate, \
    format_stats, heldout_examples, load_records, micro_batches, pack_rows, prepare_datasets, \
    render_records, split_records, tokenize_examples
from ftcore.data.reviews import generate_reviews, pretraining_texts
from ftcore.data.templates import BUILTIN, TemplateError
from ftcore.tokenizer import Tokenizer

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = pretraining_texts(generate_reviews(400, seed=123)) + [t.prompt for t in BUILTIN.values()]
    return Tokenizer.train_bpe(texts, 1024, ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>") + CHAT_TOKENS)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def review_rows(n, seed=0):
    return [{k: r[k] for k in ("id", "product", "rating", "summary", "text")} for r in generate_reviews(n, seed)]


# ----------------------------------------------------------------------------------------------
# loading and bad input

def test_load_jsonl_json_csv(tmp_path):
    rows = [{"id": 7, "rating": 4, "text": "nice"}, {"rating": 2, "text": "meh, \"quoted\""}]
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # blank lines are fine
    got = load_records(p)
    assert [r["record_id"] for r in got] == ["7", "1"]  # the id field, else the position
    assert got[1]["_where"] == f"{p}:3" and got[1]["rating"] == 2
    j = tmp_path / "d.json"
    j.write_text(json.dumps(rows))
    assert [(r["rating"], r["text"]) for r in load_records(j)] == [(4, "nice"), (2, 'meh, "quoted"')]
    c = tmp_path / "d.csv"
    c.write_text('id,rating,text\n1,4,"a, b"\n2,5,"two\nlines"\n3,1,x\n')
    got = load_records(c)
    assert [r["rating"] for r in got] == ["4", "5", "1"]  # CSV values stay strings
    assert got[1]["text"] == "two\nlines" and got[2]["_where"] == f"{c}:5"
    x = tmp_path / "d.txt"
    x.write_text(json.dumps(rows[0]) + "\n")
    assert load_records(x, format="jsonl")[0]["text"] == "nice"


@pytest.mark.parametrize("name, content, msg", [
    ("bad.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3,\n', r"bad.jsonl:3: invalid JSON: .*\(column \d+\)$"),
    ("list.jsonl", '{"a": 1}\n[1, 2]\n', r"list.jsonl:2: expected a JSON object, got list$"),
    ("obj.json", '{"a": 1}', r"obj.json: expected a JSON array of objects, got dict"),
    ("items.json", '[{"a": 1}, 3]', r"items.json: item 1: expected a JSON object, got int$"),
    ("broken.json", '[{"a": 1},\n {"a": }]', r"broken.json:2: invalid JSON"),
    ("short.csv", "id,rating,text\n1,4,ok\n2,5\n", r"short.csv:3: row has 2 values, the header has 3 columns$"),
    ("long.csv", "id,rating,text\n1,4,ok,extra\n", r"long.csv:2: row has 4 values, the header has 3 columns$"),
    ("dup.csv", "id,text,text\n1,a,b\n", r"dup.csv:1: column 'text' appears twice in the header$"),
    ("data.parquet", "x", r"cannot tell the format from the suffix '.parquet'; set data.format"),
])
def test_malformed_files(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=msg) as e:
        load_records(p)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_csv_missing_column_names_the_column_and_file(tmp_path, tok):
    p = tmp_path / "reviews.csv"
    p.write_text("Id,Score,Summary,Text\n1,5,Great,Lovely stuff\n2,1,Bad,Awful stuff\n")
    cfg = DataConfig(path=str(p), rename={"score": "rating", "Summary": "summary", "Text": "text"})
    with pytest.raises(DataError) as e:
        prepare_datasets(cfg, tok)
    msg = str(e.value)
    assert msg == f"{p}: data.rename maps a column 'score' that no record has (columns found: Id, Score, Summary, Text)"
    cfg.rename["Score"] = cfg.rename.pop("score")  # the right column name: loads
    assert prepare_datasets(cfg, tok, seed=0).train


def test_template_naming_an_absent_field(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "score": 3, "text": "ok"} for i in range(5)])
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: no field 'summary', needed by template 'summary'; "
                                        r"fields found: id, score, text"):
        prepare_datasets(DataConfig(path=str(p), templates=["summary"]), tok)
    # a derived field names its source: sentiment needs rating
    with pytest.raises(DataError, match=r"no field 'rating', needed for 'sentiment' by template 'sentiment'"):
        prepare_datasets(DataConfig(path=str(p), templates=["sentiment"]), tok)
    # a user template with a typo'd field
    cfg = DataConfig(path=str(p), templates=["mine"],
                     user_templates={"mine": {"prompt": "{txt}", "completion": " {score}"}})
    with pytest.raises(DataError, match=r"no field 'txt', needed by template 'mine'"):
        prepare_datasets(cfg, tok)
    with pytest.raises(TemplateError, match=r"unknown template 'nope'; available: rating, "):
        prepare_datasets(DataConfig(path=str(p), templates=["nope"]), tok)


def test_empty_dataset_after_filtering(tmp_path, tok):
    # every record lacks one of the fields 'sentiment' needs (text or rating): all skipped
    rows = [{"id": i, "text": "fine"} if i % 2 else {"id": i, "rating": 4} for i in range(10)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"no training examples left after filtering \(8 train records; skipped for "
                                        r"a missing field: sentiment 8; dropped as overlong: 0\); check data.templates"):
        prepare_datasets(DataConfig(path=str(p), templates=["sentiment"]), tok)
    # every completion too long for max_seq_len, overlong = drop
    p = write_jsonl(tmp_path / "e.jsonl", review_rows(10))
    cfg = DataConfig(path=str(p), templates=["review"], max_seq_len=24, max_completion_tokens=4, overlong="drop")
    with pytest.raises(DataError, match=r"dropped as overlong: 8\)"):
        prepare_datasets(cfg, tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no records$"):
        prepare_datasets(DataConfig(path=str(empty)), tok)


def test_missing_field_skip_or_error(tmp_path, tok):
    rows = review_rows(20)
    del rows[3]["summary"]
    rows[5]["summary"] = ""
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = prepare_datasets(DataConfig(path=str(p), split=[1, 0, 0]), tok)
    assert ds.stats["skipped_missing"] == {"summary": 2, "review": 2}
    assert collections.Counter(e.template for e in ds.train) == {"rating": 20, "sentiment": 20, "summary": 18, "review": 18}
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:4: no field 'summary', needed by template "
                                        r"'summary' \(data.missing_field=\"skip\" skips such records\)$"):
        prepare_datasets(DataConfig(path=str(p), split=[1, 0, 0], missing_field="error"), tok)
    rows[7]["rating"] = "eleven"
    write_jsonl(p, rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:8: field 'rating' must be an integer from 1 to 5, "
                                        r"got 'eleven', needed by template 'sentiment'"):
        prepare_datasets(DataConfig(path=str(p), split=[1, 0, 0]), tok)


def test_amazon_style_file_with_rename(tmp_path, tok):
    rows = [{"id": 100 + i, "score": 1 + i % 5, "summary": f"Title {i}", "text": f"Some food text {i}."}
            for i in range(30)]
    p = write_jsonl(tmp_path / "food.jsonl", rows)
    ds = prepare_datasets(DataConfig(path=str(p), rename={"score": "rating"}), tok, seed=1)
    ex = next(e for e in ds.train if e.template == "sentiment")
    score = next(r["score"] for r in rows if str(r["id"]) == ex.record_id)
    assert ex.completion == {1: " negative", 2: " negative", 3: " neutral"}.get(score, " positive")
    assert {e.record_id for e in ds.train} <= {str(r["id"]) for r in rows}


# ----------------------------------------------------------------------------------------------
# examples: completion masks, BOS/EOS, truncation

def check_example(e: Example, tok: Tokenizer):
    assert len(e.labels) == len(e.input_ids)
    assert e.input_ids[0] == tok.bos_id and e.input_ids.count(tok.bos_id) == 1
    assert all(x == IGNORE_INDEX for x in e.labels[:e.prompt_len])
    assert e.labels[e.prompt_len:] == e.input_ids[e.prompt_len:]  # completion (+ eos) all carry loss
    assert e.labels[e.prompt_len] != IGNORE_INDEX
    if not e.truncated:
        assert e.input_ids[-1] == tok.eos_id
        assert tok.decode(e.input_ids[e.prompt_len:]) == e.completion


def test_examples_have_completion_labels(tok):
    ds = prepare_datasets(DataConfig(synthetic=SyntheticConfig(num_records=50)), tok)
    for e in ds.train + ds.validation + ds.test:
        check_example(e, tok)
        assert tok.decode(e.prompt_ids) == e.prompt
        assert e.prompt.endswith(":") and e.completion.startswith(" ")


def test_bos_exactly_once(tok):
    r = [Rendered.simple("<|begin_of_text|>Plain:", " yes"), Rendered.simple("Plain:", " yes")]
    a, b = tokenize_examples(r, tok)
    assert a.input_ids == b.input_ids and a.input_ids.count(tok.bos_id) == 1
    no_bos = Tokenizer(tok.tok, None, "<|end_of_text|>", "<|pad|>")  # a Qwen-like tokenizer: no BOS
    (c,) = tokenize_examples(r[1:], no_bos)
    assert c.input_ids == b.input_ids[1:] and c.prompt_len == b.prompt_len - 1 and c.labels[0] == IGNORE_INDEX


def test_truncation_keeps_completion_and_cuts_prompt_middle(tok):
    head, tail = "Instruction at the start. ", " Answer cue at the end:"
    body = " ".join(f"word{i}" for i in range(200))
    r = Rendered.simple(head + body + tail, " the completion text")
    counts = {}
    (e,) = tokenize_examples([r], tok, max_seq_len=64, max_completion_tokens=16, counts=counts)
    assert len(e) == 64 and e.truncated
    assert counts == {"truncated_prompt": 1, "truncated_completion": 0, "dropped_overlong": 0}
    assert tok.decode(e.input_ids[e.prompt_len:]) == " the completion text"  # completion and eos intact
    check_example(e, tok)
    prompt = tok.decode(e.prompt_ids)
    assert prompt.startswith("Instruction at the start.") and prompt.endswith("Answer cue at the end:")
    assert "word0 " in prompt and "word199" in prompt and "word100 " not in prompt  # the middle went

    long = Rendered.simple("Short prompt:", " " + " ".join(f"w{i}" for i in range(100)))
    counts = {}
    (e,) = tokenize_examples([long], tok, max_seq_len=64, max_completion_tokens=16, counts=counts)
    assert counts["truncated_completion"] == 1 and len(e) - e.prompt_len == 16
    assert e.input_ids[-1] != tok.eos_id  # cut mid-sentence: no eos to learn
    assert all(x == IGNORE_INDEX for x in e.labels[:e.prompt_len]) and e.labels[e.prompt_len:] == e.input_ids[e.prompt_len:]
    counts = {}
    assert tokenize_examples([long, r], tok, max_seq_len=64, max_completion_tokens=16, overlong="drop", counts=counts)[0].completion == r.completion
    assert counts["dropped_overlong"] == 1
    # a completion that fits beside the whole prompt is kept whole, even above max_completion_tokens
    (e,) = tokenize_examples([long], tok, max_seq_len=512, max_completion_tokens=16)
    assert not e.truncated and e.input_ids[-1] == tok.eos_id


# ----------------------------------------------------------------------------------------------
# instruction formats: chat (ChatML, Llama 3), Alpaca, prompt/completion

CHAT = {"id": "c1", "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Rate it"},
    {"role": "assistant", "content": "Four, I think."},
    {"role": "user", "content": "trailing question nobody answered"},
]}


@pytest.mark.parametrize("fmt, end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
@pytest.mark.parametrize("eos_is_end", [False, True])
def test_chat_loss_on_every_assistant_turn_only(tok, fmt, end, eos_is_end):
    """A model with no chat template: ftcore's own (data.chat_format). Loss on each assistant's
    content and its end-of-turn token, and nowhere else: no eos after it, whether or not the
    tokenizer's eos is that token (the template's turns end with it)."""
    if eos_is_end:  # an instruct tokenizer whose eos is the turn-end token
        tok = Tokenizer(tok.tok, "<|begin_of_text|>", end, "<|pad|>", extra_eos_ids=[1])
    chat = chat_template(DataConfig(chat_format=fmt), tok, messages=True)
    (r,) = render_records([CHAT], [], messages_chat=chat)
    assert r.template == "chat" and r.completion == "Four, I think."
    assert "trailing question" not in "".join(t for t, _ in r.segments)
    (e,) = tokenize_examples([r], tok)
    assert e.input_ids.count(tok.bos_id) == 1 and e.input_ids[0] == tok.bos_id
    assert e.input_ids == tok.encode("".join(t for t, _ in r.segments))  # the rendered text, as one text
    assert chat.stop_ids == [tok.token_to_id(end)]
    # the labelled tokens are exactly the two assistant contents with their end tokens
    assert tok_runs(e, tok) == [f"Hello.{end}", f"Four, I think.{end}"]
    assert all(x in (IGNORE_INDEX, i) for x, i in zip(e.labels, e.input_ids))
    assert tok.eos_id not in e.input_ids or eos_is_end
    text = tok.decode(e.input_ids, skip_special_tokens=False)
    for content in ("You are terse.", "Hi there", "Rate it"):
        assert content in text
    header = "<|im_start|>assistant\n" if fmt == "chatml" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(e.prompt_ids, skip_special_tokens=False).endswith(header)
    assert tok.decode(e.answer_ids) == "Four, I think."
    # data.train_on = "last_assistant": the earlier answer is context only
    (last,) = tokenize_examples(render_records([CHAT], [], messages_chat=chat, train_on="last_assistant"), tok)
    assert last.input_ids == e.input_ids and tok_runs(last, tok) == [f"Four, I think.{end}"]
    # collated and shifted, the chat mask survives every batching mode
    for mode in ("pad", "bucket", "pack"):
        check_batch(collate([e, e], mode=mode, pad_id=tok.pad_id, max_seq_len=512), [e, e], mode)


def test_chat_format_without_the_tokens_ends_turns_with_eos():
    """ftcore's own ChatML on a tokenizer that lacks its tokens (a base model pretrained here): the
    markers are plain text, so the answer's turn is followed by eos, the one token a model can
    learn to stop on."""
    plain = Tokenizer.train_bpe(pretraining_texts(generate_reviews(200, seed=1)), 512)
    chat = chat_template(DataConfig(), plain, messages=True)
    assert chat.stop_ids == []
    (e,) = tokenize_examples(render_records([CHAT], [], messages_chat=chat), plain)
    assert tok_runs(e, plain) == ["Hello.<|im_end|>", "Four, I think.<|im_end|><|end_of_text|>"]


def tok_runs(e, tok) -> list[str]:
    """The decoded runs of consecutive labelled tokens of an example."""
    runs, run = [], []
    for x in e.labels + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            run.append(x)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return runs


def test_chat_bad_records(tok):
    chat = chat_template(DataConfig(), tok, messages=True)
    skipped = {}
    assert render_records([{"messages": [{"role": "user", "content": "hi"}]}], [], messages_chat=chat,
                          skipped=skipped) == []
    assert skipped == {"chat": 1}
    with pytest.raises(DataError, match=r"x.jsonl:2: no assistant turn in 'messages', needed by template 'chat'"):
        render_records([{"_where": "x.jsonl:2", "messages": [{"role": "user", "content": "hi"}]}], [],
                       messages_chat=chat, missing_field="error")
    with pytest.raises(DataError, match=r"x.jsonl:5: messages\[1\]: unknown role 'robot'"):
        render_records([{"_where": "x.jsonl:5", "messages": [{"role": "user", "content": "a"},
                                                             {"role": "robot", "content": "b"}]}], [], messages_chat=chat)
    with pytest.raises(DataError, match=r"messages\[0\]: content must be a string, got int"):
        render_records([{"messages": [{"role": "user", "content": 3}]}], [], messages_chat=chat)
    # ShareGPT-style keys are understood
    (r,) = render_records([{"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], [],
                          messages_chat=chat)
    assert r.completion == "a" and "<|im_start|>user\nq<|im_end|>" in r.prompt


def test_instruction_formats_are_detected_per_record(tmp_path, tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
            {**CHAT, "id": "chat-1"}]
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = prepare_datasets(DataConfig(path=str(p), split=[1, 0, 0]), tok)  # default review templates: unused
    by = {e.record_id: e for e in ds.train}
    assert sorted(e.template for e in ds.train) == ["chat", "instruction", "instruction", "prompt_completion"]
    assert "### Input:\n2 and 3\n\n### Response:\n" in by["0"].prompt and by["0"].completion == "5"
    assert "### Input" not in by["1"].prompt
    assert by["2"].prompt == "Q: capital of France?\nA:" and by["2"].completion == " Paris"
    for rid in ("0", "1", "2"):
        check_example(by[rid], tok)
    assert by["chat-1"].completion == "Four, I think."


# ----------------------------------------------------------------------------------------------
# collate and micro-batches: shifted labels, padding, packing

def check_batch(batch, examples, mode):
    """Every example appears once; labels[t] is the example's own next token, -100 on its prompt,
    its last position and all padding; the first completion token is a target (no off-by-one)."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.dtype == labels.dtype == pos.dtype == torch.long and ids.shape == labels.shape == pos.shape
    remaining = list(examples)
    for row in range(ids.shape[0]):
        if mode == "pack":
            doc = batch["doc_ids"][row].tolist()
            starts = [t for t in range(len(doc)) if doc[t] >= 0 and (t == 0 or doc[t] != doc[t - 1])]
        else:
            starts = [0]
        end = 0
        for k, s in enumerate(starts):
            e = next(x for x in remaining if ids[row, s:s + len(x)].tolist() == x.input_ids)
            remaining.remove(e)
            L = len(e)
            # the example's own labels shifted by one (so -100 on its prompt, see check_example)
            assert labels[row, s:s + L - 1].tolist() == e.labels[1:]
            assert labels[row, s + L - 1] == IGNORE_INDEX
            assert labels[row, s + e.prompt_len - 1] == e.input_ids[e.prompt_len]  # first completion token
            if e.template != "chat":  # (chat prompts hold earlier assistant turns, which carry loss)
                assert (labels[row, s:s + e.prompt_len - 1] == IGNORE_INDEX).all()
            if mode == "pack":
                assert pos[row, s:s + L].tolist() == list(range(L))
                assert batch["doc_ids"][row, s:s + L].tolist() == [k] * L
            end = s + L
        assert (labels[row, end:] == IGNORE_INDEX).all()  # padding
        if mode == "pack":
            assert (batch["doc_ids"][row, end:] == -1).all()
        else:
            assert pos[row].tolist() == list(range(ids.shape[1]))
    assert not remaining
    assert int((labels != IGNORE_INDEX).sum()) == sum(e.num_targets for e in examples)  # no target lost by the shift
    assert ("doc_ids" in batch) == (mode == "pack")


def make_examples(tok, n=24, seed=0):
    recs = review_rows(n, seed)
    rendered = render_records(recs, [(BUILTIN["sentiment"], 1.0), (BUILTIN["summary"], 1.0)])
    return tokenize_examples(rendered, tok, max_seq_len=160)


@pytest.mark.parametrize("mode", ["pad", "bucket", "pack"])
def test_collate_masks_every_mode(tok, mode):
    ex = make_examples(tok)[:8]
    batch = collate(ex, mode=mode, pad_id=tok.pad_id, max_seq_len=320)
    check_batch(batch, ex, mode)
    if mode != "pack":
        assert batch["input_ids"].shape == (8, max(len(e) for e in ex))
        for row, e in enumerate(ex):
            assert (batch["input_ids"][row, len(e):] == tok.pad_id).all()
    else:
        assert batch["input_ids"].shape[1] <= 320 and batch["input_ids"].shape[0] < 8


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([6, 5, 4, 3, 2], capacity=10)
    assert rows == [[0, 2], [1, 3, 4]]
    assert pack_rows([4, 4, 4], capacity=4) == [[0], [1], [2]]
    with pytest.raises(DataError, match="example of 5 tokens does not fit max_seq_len=4"):
        pack_rows([5], 4)


def test_pack_doc_ids_and_positions_by_hand():
    def ex(n, p):
        ids = list(range(10 * n, 10 * n + n))
        return Example("r", "t", "generation", "", "", ids, [IGNORE_INDEX] * p + ids[p:], p)
    a, b, c = ex(5, 2), ex(3, 1), ex(4, 3)
    batch = collate([a, b, c], mode="pack", pad_id=0, max_seq_len=8)
    # FFD: a (5) + b (3) fill row 0; c (4) goes alone in row 1, padded to 8
    assert batch["doc_ids"].tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [-1] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["input_ids"].tolist() == [[50, 51, 52, 53, 54, 30, 31, 32], [40, 41, 42, 43, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 52, 53, 54, -100, 31, 32, -100], [-100, -100, 43, -100, -100, -100, -100, -100]]
    padded = collate([a, b], mode="pad", pad_id=9)
    assert padded["labels"].tolist() == [[-100, 52, 53, 54, -100], [31, 32, -100, -100, -100]]
    assert padded["input_ids"][1].tolist() == [30, 31, 32, 9, 9]


def test_bucket_groups_similar_lengths(tok):
    ex = make_examples(tok, 32)[:32]
    pad = micro_batches(ex, 4, accum_steps=8, mode="pad", pad_id=tok.pad_id)
    bucket = micro_batches(ex, 4, accum_steps=8, mode="bucket", pad_id=tok.pad_id)
    cells = lambda mbs: sum(b["input_ids"].numel() for b in mbs)
    assert cells(bucket) < cells(pad)
    lengths = [max(len(e) for e in ex[g * 4:(g + 1) * 4]) for g in range(8)]
    assert [b["input_ids"].shape[1] for b in bucket] == sorted(lengths, reverse=True) or \
           [b["input_ids"].shape[1] for b in bucket] == sorted([b["input_ids"].shape[1] for b in bucket], reverse=True)


@pytest.mark.parametrize("mode", ["pad", "bucket", "pack"])
def test_micro_batches_do_not_depend_on_world_size(tok, mode):
    ex = make_examples(tok)[:16]
    one = micro_batches(ex, 4, accum_steps=4, rank=0, world_size=1, mode=mode, pad_id=tok.pad_id, max_seq_len=160)
    two = [mb for rank in range(2)
           for mb in micro_batches(ex, 4, accum_steps=2, rank=rank, world_size=2, mode=mode, pad_id=tok.pad_id,
                                   max_seq_len=160)]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for g, mb in enumerate(one):
        if mode == "pad":
            check_batch(mb, ex[g * 4:(g + 1) * 4], mode)
    with pytest.raises(DataError, match="global batch of 16 examples != micro_batch_size 4 x accumulation steps 2 x world size 1"):
        micro_batches(ex, 4, accum_steps=2, world_size=1)


# ----------------------------------------------------------------------------------------------
# the step sampler

def test_step_sampler_is_a_function_of_seed_and_step():
    s = StepSampler(num_examples=10, global_batch_size=4, seed=3)
    first = [next(s) for _ in range(6)]  # 24 indices: two full epochs and a bit
    assert first == [StepSampler(10, 4, 3).indices(step) for step in range(6)]
    assert StepSampler(10, 4, 3).indices(5) == first[5]  # random access, no history needed
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs are permutations
    assert flat[:10] != flat[10:20]  # a fresh permutation per epoch
    assert StepSampler(10, 4, 4).indices(0) != first[0]
    # resume: the state is the step counter
    state = s.state_dict()
    resumed = StepSampler(10, 4, 3)
    resumed.load_state_dict(state)
    assert next(resumed) == next(s) == StepSampler(10, 4, 3).indices(6)
    assert s.epoch() == pytest.approx(7 * 4 / 10)
    with pytest.raises(DataError, match="checkpoint data position is for num_examples=10, this run has 11"):
        StepSampler(11, 4, 3).load_state_dict(state)


def test_split_is_deterministic_grouped_and_follows_ratios():
    records = [{"record_id": str(i), "v": i} for i in range(1000)]
    records += [{"record_id": "7", "v": "dup"}, {"record_id": "8", "v": "dup"}]  # same review twice
    a = split_records(records, [0.8, 0.1, 0.1], seed=5)
    b = split_records(list(records), [0.8, 0.1, 0.1], seed=5)
    assert a == b
    ids = [{r["record_id"] for r in part} for part in a]
    assert [len(x) for x in ids] == [800, 100, 100]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for part in a:
        if any(r["record_id"] == "7" for r in part):
            assert sum(r["record_id"] == "7" for r in part) == 2
    assert split_records(records, [0.8, 0.1, 0.1], seed=6) != a
    assert [len(x) for x in split_records(records[:1000], [3, 1, 0], seed=0)] == [750, 250, 0]
    assert [len(x) for x in split_records(records[:5], [0.8, 0.1, 0.1], seed=0)] == [3, 1, 1]
    with pytest.raises(DataError, match="data.split must be three non-negative ratios"):
        split_records(records, [0.5, 0.5], 0)


# ----------------------------------------------------------------------------------------------
# prepare_datasets end to end on the synthetic reviews

def test_prepare_datasets_synthetic(tok):
    cfg = Config(data=DataConfig(synthetic=SyntheticConfig(num_records=200, seed=1)),
                 train=TrainConfig(global_batch_size=8, micro_batch_size=2))
    ds = prepare_datasets(cfg.data, tok, seed=cfg.run.seed, train_cfg=cfg.train)
    assert isinstance(ds, Datasets)
    ids = [{e.record_id for e in part} for part in (ds.train, ds.validation, ds.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # grouped by record
    assert [len(x) for x in ids] == [160, 20, 20]
    names = ["rating", "sentiment", "summary", "review"]
    for part in (ds.train, ds.validation, ds.test):
        assert sorted({e.template for e in part}) == sorted(names)
    assert len(ds.test) == 4 * 20 and ds.stats["splits"]["test"]["records"] == 20
    again = prepare_datasets(cfg.data, tok, seed=cfg.run.seed, train_cfg=cfg.train)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in ds.train]
    text = format_stats(ds.stats)
    for needle in ("synthetic reviews (200 records, seed 1)", "train", "validation", "test", "padding share",
                   "truncated prompts 0", "skipped for a missing field: 0", "completion"):
        assert needle in text, needle
    assert 0 <= ds.stats["padding_share"] < 0.5
    held = heldout_examples(ds, tok, cfg.data)
    assert {e.record_id for e in held} == ids[2]
    assert sorted({e.template for e in held}) == sorted(f"{n}@heldout{i}" for n in names for i in (1, 2))
    for e in held:
        check_example(e, tok)


def test_template_weights(tok):
    cfg = DataConfig(templates={"rating": 2, "summary": 0.5}, split=[1, 0, 0],
                     synthetic=SyntheticConfig(num_records=400))
    ds = prepare_datasets(cfg, tok, seed=0)
    counts = collections.Counter(e.template for e in ds.train)
    assert counts["rating"] == 800 and 150 < counts["summary"] < 250
    assert [e.record_id for e in prepare_datasets(cfg, tok, seed=0).train] == [e.record_id for e in ds.train]
    cfg.split = [0.5, 0, 0.5]
    ds = prepare_datasets(cfg, tok, seed=0)
    assert collections.Counter(e.template for e in ds.test) == {"rating": 200, "summary": 200}  # each once


@pytest.mark.slow
def test_tokenize_100k_examples_takes_seconds(tok):
    recs = review_rows(20_000, seed=9)
    templates = [(BUILTIN[n], 1.0) for n in ("rating", "sentiment", "summary", "review")] + \
                [(BUILTIN["rating"].__class__("short", "{summary}:", " {rating}", "classification"), 1.0)]
    t0 = time.perf_counter()
    rendered = render_records(recs, templates)
    t1 = time.perf_counter()
    examples = tokenize_examples(rendered, tok, max_seq_len=256)
    t2 = time.perf_counter()
    tokens = sum(len(e) for e in examples)
    print(f"\n100k examples: render {t1 - t0:.2f}s, tokenize {t2 - t1:.2f}s "
          f"({len(examples):,} examples, {tokens:,} tokens, {tokens / (t2 - t1):,.0f} tokens/s)")
    assert len(examples) == 100_000
    assert t2 - t0 < 60


# ----------------------------------------------------------------------------------------------
# the embedded review generator

def test_reviews_never_leak_the_label():
    records = generate_reviews(3000, seed=0)
    leak = re.compile(r"\d|\bstars?\b|\b(one|two|three|four|five)\b|positiv|negativ|neutral", re.I)
    for r in records:
        assert set(r) == {"id", "product", "rating", "summary", "text"}
        assert not leak.search(r["text"]), r["text"]
        assert not leak.search(r["summary"]), r["summary"]
        assert 8 <= len(r["text"].split()) <= 70
    assert collections.Counter(r["rating"] for r in records) == {k: 600 for k in range(1, 6)}
    assert len({r["text"] for r in records}) > 2900  # varied
    assert generate_reviews(50, seed=0) == generate_reviews(50, seed=0)
    assert generate_reviews(50, seed=1) != generate_reviews(50, seed=0)
    texts = pretraining_texts(records[:10])
    assert texts[0] == f"{records[0]['summary']}\n{records[0]['text']}"
    assert not any("Rating" in t or "Review:" in t for t in texts)


def test_review_rating_follows_the_wording():
    """The register of the sentences decides the rating: strong praise only in 5s, lukewarm remarks
    only in 3s, strong criticism only in 1s; mixed 2s and 4s exist."""
    from ftcore.data import reviews

    def has(text, pool):
        def pattern(s):
            return re.escape(s).replace(r"\{a\}", "[a-z ]+").replace(r"\{b\}", "[a-z ]+").replace(r"\{p\}", "[a-z ]+")
        return any(re.search(pattern(s), text, re.I) for s in pool)

    records = generate_reviews(1000, seed=2)
    for r in records:
        t, rating = r["text"], r["rating"]
        assert has(t, reviews.STRONG_POS) == (rating == 5), t
        assert has(t, reviews.STRONG_NEG) == (rating == 1), t
        assert has(t, reviews.LUKEWARM) == (rating == 3) or (rating == 3 and has(t, reviews.MIXED)), t
    assert sum(r["rating"] == 4 and has(r["text"], reviews.SMALL_GRIPE) for r in records) > 40
    assert sum(r["rating"] == 2 and has(r["text"], reviews.SMALL_UPSIDE) for r in records) > 40


def test_num_targets_counts_what_the_loss_sees():
    """One definition of an example's target count, the one the loss normalises by: labels are
    shifted in collate, so a label on the first token (no BOS, empty prompt) is never a target."""
    no_prompt = Example("r0", "t", "generation", "", "ab", [5, 6, 7], [5, 6, 7], prompt_len=0)
    with_prompt = Example("r1", "t", "generation", "p", "b", [0, 4, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7],
                          prompt_len=2)
    for mode in ("pad", "pack"):
        batch = collate([no_prompt, with_prompt], mode=mode, pad_id=2, max_seq_len=8)
        assert int((batch["labels"] != IGNORE_INDEX).sum()) == no_prompt.num_targets + with_prompt.num_targets == 4
