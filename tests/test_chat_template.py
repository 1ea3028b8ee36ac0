"""Chat templates, run (ftcore.data.chat): a model's Jinja chat template renders a conversation to
exactly the text of transformers' apply_chat_template, for every chat template TRL ships (read from
the installed trl package: `pip install --no-deps trl`, as .ci/run does; nothing is copied here),
and the loss covers each assistant's content and its end-of-turn marker, found in transformers'
text by this test. A template ftcore cannot follow is refused with one line naming it, before any
model work; k-shot prompts are earlier turns of the conversation; generation stops at the end of
the turn; `ftcore preview` shows what a model is trained on."""
from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from ftcore.config import DataConfig, load_config
from ftcore.data import chat_template, prepare_datasets, render_records, tokenize_examples
from ftcore.data.chat import ChatTemplate
from ftcore.data.records import DataError
from ftcore.data.templates import TemplateError
from ftcore.model import IGNORE_INDEX, ModelConfig, Transformer
from ftcore.tokenizer import Tokenizer
from helpers import make_run_setup, run_cli, run_overrides

# SmolLM2-135M-Instruct's template (its GGUF file's tokenizer.chat_template; Apache-2.0)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # make_run_setup's BPE has them
# what a template's text names as special tokens: <|im_end|>, <｜User｜>, <end_of_turn>, <turn|>, [INST]
SPECIAL = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜]+｜>|<[A-Za-z_][A-Za-z0-9_/\-]*>|<[a-z_]+\|>|<\|[a-z_]+>|\[/?[A-Z_]+\]")


def _trl_templates() -> dict[str, Path]:
    """Every chat template the installed TRL ships, found without importing trl (its imports need
    datasets, pandas, pyarrow; .ci/run installs it with --no-deps)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return {}
    return {p.stem: p for p in sorted(Path(spec.submodule_search_locations[0], "chat_templates").glob("*.jinja"))}


TRL = _trl_templates()

# TRL templates ftcore refuses, and why (docs/design.md lists them)
REFUSED = {
    # the generation prompt opens a think block (<｜Assistant｜><think>, <think>) that the rendered
    # turns do not have: a model would be asked in other words than it is trained on
    **dict.fromkeys(["deepseek_r1_distill", "deepseek_r1_distill_training", "deepseekv3", "deepseekv3_training"]
                    + [f"nemotron_3_{v}{t}" for v in ("5_lightning", "nano", "super", "ultra") for t in ("", "_training")],
                    "does not begin with its prompt"),
    # multimodal: they take content as lists of parts (text, image)
    **dict.fromkeys(["idefics3", "idefics3_training", "smolvlm", "smolvlm_training"], "does not write an assistant's text"),
    **dict.fromkeys(["llava_next", "llava_next_training"], "has no attribute 'text'"),
    # GLM-4.5 ends an assistant turn with nothing (its runtime stops at the next role token)
    "glm4moe": "writes nothing after an assistant's answer",
}
# what ends an assistant turn in each family (an earlier turn, the last turn), by name prefix; the
# longest prefix wins. Phi-3 writes eos after the last turn.
END_OF_TURN = {"cohere": "<|END_OF_TURN_TOKEN|>", "cohere2": "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
               "diffusion_gemma": "<turn|>", "gemma": "<end_of_turn>", "gemma4": "<turn|>", "glm4moe": "<|user|>",
               "gptoss": ("<|end|>", "<|return|>"), "lfm2": "<|im_end|>", "llama3": "<|eot_id|>",
               "muse_glimmer": "<|eot|>", "phi3": ("<|end|>", "<|end|>\n" + EOS), "qwen": "<|im_end|>",
               "smollm2": "<|im_end|>"}

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
TURNS = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."},
         {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "That makes six."},
         {"role": "user", "content": "Thanks! Which is larger?"}, {"role": "assistant", "content": "Six is larger."}]
CONVERSATIONS = {"one turn": TURNS[:2], "system": [SYSTEM] + TURNS[:2], "three turns": TURNS,
                 "system, two turns": [SYSTEM] + TURNS[:4]}


def end_of_turn(name: str, last: bool) -> str:
    family = max((k for k in END_OF_TURN if name.startswith(k)), key=len, default=None)
    if family is None:  # a template a newer trl ships: look at it, then say what ends its turns (or why it is refused)
        pytest.fail(f"{name}: a template this test does not know yet: add it to END_OF_TURN or REFUSED")
    end = END_OF_TURN[family]
    return end if isinstance(end, str) else end[last]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("chat"))


@pytest.fixture(autouse=True)
def pinned_clock(monkeypatch):
    """transformers' strftime_now reads the clock; ftcore's gives data.chat_date (default 2024-07-26)."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import chat_template_utils

    class Day(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 7, 26)
    monkeypatch.setattr(chat_template_utils, "datetime", Day)
    return transformers


def _tokenizer(root: Path, template: str, eos: str = EOS) -> Tokenizer:
    """make_run_setup's BPE with every special token the template names added (as the model it was
    written for has them), `template` as its chat template and `eos` as its eos."""
    import tokenizers
    from tokenizers import AddedToken
    t = tokenizers.Tokenizer.from_file(str(root / "base" / "tokenizer.json"))
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(set(SPECIAL.findall(template)))])
    return Tokenizer(t, bos_token=BOS, eos_token=eos, add_bos=False, config={"chat_template": template})


def _hf(tok: Tokenizer):
    """The same tokenizer in transformers (the reference): bos, eos, chat template."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok.tok.to_str()),
                                   bos_token=tok.tok.id_to_token(tok.bos_id), eos_token=tok.tok.id_to_token(tok.eos_id),
                                   chat_template=tok.config.get("chat_template"))


@functools.lru_cache(maxsize=None)
def _trl(root: Path, name: str):
    text = TRL[name].read_text()
    tok = _tokenizer(root, text)
    return text, tok, _hf(tok)


def _labelled(ex) -> list[int]:
    return [t for t, x in enumerate(ex.labels) if x != IGNORE_INDEX]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TRL) or ["(trl not installed)"])
def test_every_trl_chat_template_renders_as_transformers_does(setup, name, conversation):
    """ftcore's text == apply_chat_template's; its tokens == transformers' tokens of that text; the
    labelled tokens == those of each assistant's content + end-of-turn marker, located in
    transformers' text after that turn's prompt (add_generation_prompt=True); evaluation's prompt is
    the text before the last answer; generation stops at the marker's special tokens. Where an
    earlier turn's prompt is not how the conversation goes on, training on that turn is refused
    (data.train_on="last_assistant" trains on the last)."""
    if not TRL:
        why = "trl is not installed: pip install --no-deps trl (.ci/run does)"
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    text, tok, hf = _trl(setup, name)
    messages = CONVERSATIONS[conversation]
    try:
        want = hf.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # the template refuses this conversation (Gemma: no system role): ftcore too
        with pytest.raises((TemplateError, DataError), match=re.escape(str(e))):
            render_records([{"messages": messages}], [], messages_chat=ChatTemplate(text, name, tok))
        return
    if name in REFUSED:
        with pytest.raises(TemplateError, match=rf"^{name}: .*{REFUSED[name]}"):
            ChatTemplate(text, name, tok)
        return
    chat = ChatTemplate(text, name, tok)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompts = {i: hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) for i in answers}
    assert want.startswith(prompts[answers[-1]])
    train_on = "all_assistant"
    if not all(want.startswith(prompts[i]) for i in answers):  # history written otherwise (Qwen3.5 drops the
        with pytest.raises(DataError, match=r"does not begin with its prompt.*data.train_on"):  # think block)
            render_records([{"messages": messages}], [], messages_chat=chat)
        train_on, answers = "last_assistant", answers[-1:]
    (r,) = render_records([{"messages": messages}], [], messages_chat=chat, train_on=train_on)
    (ex,) = tokenize_examples([r], tok, max_seq_len=4096)
    assert "".join(t for t, _ in r.segments) == want
    enc = hf(want, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]

    expected = []
    for i in answers:
        m, end = messages[i], end_of_turn(name, last=i == len(messages) - 1)
        start = want.index(m["content"] + end, len(prompts[i]))
        stop = start + len(m["content"] + end)
        expected += [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < stop and max(b, a + 1) > start]
    assert _labelled(ex) == expected
    assert all(ex.labels[t] == ex.input_ids[t] for t in expected)
    if re.search(r"\{%-?\s*generation\s*-?%\}", text):  # TRL's *_training: what TRL trains on holds it all
        mask = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
        assert all(mask[t] for t in expected)
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False) == want[:start]
    assert tok.decode(ex.answer_ids) == messages[-1]["content"]
    ends = {s for last in (False, True) for s in SPECIAL.findall(end_of_turn(name, last))}
    assert sorted(chat.stop_ids) == sorted(tok.token_to_id(s) for s in ends)


# --------------------------------------------------------------------------------------------------
# instruction prompts in a model's template: the datasets a run trains and evaluates on

def _templates() -> dict[str, str]:
    out = {"smollm2": SMOLLM2}
    out.update({n: TRL[n].read_text() for n in ("qwen2_5", "qwen3", "llama3_2", "phi3", "gemma3") if n in TRL})
    return out


@pytest.mark.parametrize("name", list(_templates()))
def test_instruction_prompts_are_user_turns_and_answers_assistant_turns(setup, name):
    """prepare_datasets puts each instruction in a user turn and its answer, without the plain
    prompts' leading space, in the assistant's: the same ids as transformers' rendering of that
    conversation, loss on the answer and its end-of-turn marker, and evaluation's prompt is the
    conversation rendered with add_generation_prompt=True (then whatever the template writes before
    an answer: Qwen3's empty think block)."""
    template = _templates()[name]
    tok = _tokenizer(setup, template)
    hf = _hf(tok)
    cfg = DataConfig(templates=["rating"], split=[0.5, 0.25, 0.25], max_seq_len=512)
    cfg.synthetic.num_records = 12
    ds = prepare_datasets(cfg, tok, seed=0)
    assert ds.stats["prompt_format"] == "chat" and ds.stats["chat_template"] == "the chat_template of the tokenizer"
    for ex in ds.test + ds.train[:3]:
        answer = ex.completion
        assert answer == answer.strip() and answer in "12345"
        user = [{"role": "user", "content": ex.prompt}]
        full = hf.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        prompt = hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert ex.input_ids == tok.encode(full)
        assert tok.decode(ex.prompt_ids, skip_special_tokens=False).startswith(prompt)
        labelled = _labelled(ex)
        assert labelled == list(range(ex.prompt_len, ex.prompt_len + len(labelled)))
        assert tok.decode([ex.input_ids[t] for t in labelled], skip_special_tokens=False) == \
            answer + end_of_turn(name, last=True)


def test_k_shot_prompts_are_earlier_turns_of_the_conversation(setup):
    """The shots are user/assistant turns before the question, rendered by the template: its system
    turn once, every turn ended as the template ends it and nothing else (no eos between them: this
    tokenizer's eos is not the turn's end), the same ids as transformers renders for that
    conversation; the loss is on the test answer only."""
    from ftcore.evaluate import _ShotBuilder
    for template in [SMOLLM2] + ([TRL["qwen2_5"].read_text()] if "qwen2_5" in TRL else []):
        tok = _tokenizer(setup, template)
        hf = _hf(tok)
        cfg = DataConfig(templates=["sentiment"], split=[0.6, 0.2, 0.2], max_seq_len=512)
        cfg.synthetic.num_records = 30
        ds = prepare_datasets(cfg, tok, seed=0)
        shots = _ShotBuilder(tok, ds.train, 2, 4096, seed=0, chat=chat_template(cfg, tok))
        ex = ds.test[0]
        ids, labels, prompt_len, used = shots(ex, 8)
        assert used == 2 and tok.eos_id not in ids
        text = tok.decode(ids[:prompt_len], skip_special_tokens=False)
        assert text.count("<|im_start|>system") == 1 and text.count("<|im_start|>user\n") == 3
        messages = []
        for turn in text.split("<|im_start|>")[2:-1]:
            role, content = turn.split("\n", 1)
            messages.append({"role": role, "content": content.removesuffix("\n").removesuffix("<|im_end|>")})
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
        assert ids[:prompt_len] == tok.encode(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        assert [i for i, x in zip(ids, labels) if x != IGNORE_INDEX] == tok.encode(ex.completion + "<|im_end|>")


def test_evaluation_stops_at_the_end_of_the_turn(setup):
    """Qwen2.5 base's case: eos <|endoftext|>, turns end with <|im_end|>. A model that answers "4",
    then <|im_end|>, then keeps talking: evaluation's answer is "4", not the made-up next turn."""
    from ftcore.config import EvalConfig
    from ftcore.evaluation.scoring import evaluate_model
    tok = _tokenizer(setup, SMOLLM2, eos="<|pad|>")
    cfg = DataConfig(templates=["rating"], split=[0.5, 0.25, 0.25], max_seq_len=512)
    cfg.synthetic.num_records = 12
    ds = prepare_datasets(cfg, tok, seed=0)
    four, end, on = tok.encode("4")[0], tok.token_to_id("<|im_end|>"), tok.encode(" on")[0]
    # every layer zeroed: the next token depends on the last one only; after the prompt "4", after
    # "4" <|im_end|>, after that " on" for ever
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, max_position_embeddings=1024)
    model = Transformer(mcfg)
    model.reset_buffers()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.embed.weight[:, 0] = 1.0
        for token, axis in ((four, 1), (end, 2), (on, 2)):
            model.embed.weight[token] = 0.0
            model.embed.weight[token, axis] = 1.0
        for token, axis in ((four, 0), (end, 1), (on, 2)):
            model.lm_head.weight[token, axis] = 10.0
    eval_cfg = EvalConfig(max_examples=2, max_new_tokens=6, batch_size=2)
    answers = {}
    for chat in (None, chat_template(cfg, tok)):
        outputs = {}
        evaluate_model(model, tok, ds.test, eval_cfg, "cpu", outputs=outputs, progress=False, chat=chat)
        answers[chat is not None] = {o["output"] for o in outputs["rating"]}
    assert answers[True] == {"4"}
    assert len(answers[False]) == 1 and answers[False].pop().startswith("4" + tok.decode([on]))  # the run-on


# --------------------------------------------------------------------------------------------------
# which template, and the ones that cannot run

def test_the_config_says_which(setup, tmp_path):
    tok = _tokenizer(setup, SMOLLM2)
    assert chat_template(DataConfig(prompt_format="plain"), tok) is None
    assert chat_template(DataConfig(), tok).source == "the chat_template of the tokenizer"
    plain = Tokenizer.from_dir(setup / "base")  # a base model: no template
    assert chat_template(DataConfig(), plain) is None
    assert chat_template(DataConfig(chat_format="llama3"), plain, messages=True).source == "data.chat_format='llama3'"
    with pytest.raises(DataError, match="has no chat_template"):
        chat_template(DataConfig(prompt_format="chat"), plain)
    # data.chat_template replaces the model's: a file, or the template itself
    llama = TRL["llama3"].read_text() if "llama3" in TRL else SMOLLM2.replace("im_", "x_")
    (tmp_path / "mine.jinja").write_text(llama)
    assert chat_template(DataConfig(chat_template=str(tmp_path / "mine.jinja")), tok).source == \
        f"data.chat_template ({tmp_path / 'mine.jinja'})"
    with pytest.raises(TemplateError, match=r"^data.chat_template: cannot read 'nope.jinja'"):
        chat_template(DataConfig(chat_template="nope.jinja"), tok)
    inline = chat_template(DataConfig(chat_template=llama), plain)
    assert inline.source == "data.chat_template (inline)" and inline.render(TURNS[:1]) == \
        _hf(plain).apply_chat_template(TURNS[:1], tokenize=False, chat_template=llama)
    # several named templates (tokenizer_config.json's list form): the default, as transformers takes it
    tok.config["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": SMOLLM2}]
    assert chat_template(DataConfig(), tok).source == "the chat_template of the tokenizer ('default')"
    tok.config["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"}]
    with pytest.raises(TemplateError, match="none named 'default'"):
        chat_template(DataConfig(), tok)


def test_a_run_trains_on_data_chat_template_and_exports_it(setup, tmp_path):
    """data.chat_template replaces the model's template for the whole run: the prompts are rendered
    in it, and final/ carries it, so the fine-tuned model is asked as it was trained."""
    template = TRL["llama3"].read_text() if "llama3" in TRL else SMOLLM2
    (tmp_path / "mine.jinja").write_text(template)
    run = tmp_path / "run"
    p = run_cli(["train", "configs/tiny_cpu.toml", *run_overrides(
        setup, run, train=dict(max_steps=1), checkpoint=dict(export_final="true"),
        data=dict(chat_template=str(tmp_path / "mine.jinja")))])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"prompts in data.chat_template ({tmp_path / 'mine.jinja'})" in p.stdout
    assert json.loads((run / "final" / "tokenizer_config.json").read_text())["chat_template"] == template


def test_strftime_now_gives_the_configured_day(setup, monkeypatch):
    """Llama 3.2 writes today's date: ftcore writes data.chat_date's, so a run renders the same
    tokens any day; with the clock set to that day transformers writes the same text."""
    if "llama3_2" not in TRL:
        pytest.skip("trl is not installed")
    from transformers.utils import chat_template_utils
    text = TRL["llama3_2"].read_text()
    tok = _tokenizer(setup, text)
    chat = chat_template(DataConfig(chat_date="2025-03-01"), tok)
    assert "Today Date: 01 Mar 2025" in chat.render(TURNS[:2])

    class Day(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 3, 1, 17, 45)
    monkeypatch.setattr(chat_template_utils, "datetime", Day)
    assert chat.render(TURNS[:2]) == _hf(tok).apply_chat_template(TURNS[:2], tokenize=False)
    with pytest.raises(Exception, match="data.chat_date must be a date"):
        load_config(None, ["data.chat_date=March"])


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }}", r"line 1: Unexpected end of template"),
    ("{{ raise_exception('no system turns here') }}", r"line 1: no system turns here"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}",
     "does not begin with its prompt"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "writes nothing after an assistant's answer"),
    ("{{ messages[0]['content'] }}", "does not write an assistant's text content"),
])
def test_a_template_ftcore_cannot_follow_is_one_line_exit_2(setup, tmp_path, template, message):
    """Through the CLI, before any model work: `ftcore preview` (what `ftcore train` runs first)."""
    (tmp_path / "bad.jinja").write_text(template)
    p = run_cli(["preview", "configs/tiny_cpu.toml", f"model.path={setup / 'base'}",
                 f"data.chat_template={tmp_path / 'bad.jinja'}", "data.synthetic.num_records=20"])
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert re.search(rf"^ftcore preview: error: data.chat_template \({re.escape(str(tmp_path))}/bad.jinja\): .*{message}",
                     p.stderr), p.stderr


# --------------------------------------------------------------------------------------------------
# ftcore preview

def test_preview_shows_the_rendered_examples_without_a_model(setup, tmp_path):
    """--json: text, input_ids, labels of the first examples, the text as transformers renders the
    conversation; the model directory needs no weights (preview never loads them); the plain form
    marks the loss-carrying text."""
    model_dir = tmp_path / "model"
    shutil.copytree(setup / "base", model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    tok = _tokenizer(setup, SMOLLM2, eos="<|im_end|>")
    tok.save(model_dir)  # its tokenizer: ChatML tokens, SmolLM2's template
    args = ["preview", "configs/tiny_cpu.toml", f"model.path={model_dir}", "data.synthetic.num_records=40",
            "data.templates=[\"rating\"]"]
    p = run_cli(args + ["--json", "--n", "3", "--split", "test"])
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 3
    hf = _hf(tok)
    for row in rows:
        assert row["input_ids"] == tok.encode(row["text"]) and len(row["labels"]) == len(row["input_ids"])
        answer = [i for i, x in zip(row["input_ids"], row["labels"]) if x != IGNORE_INDEX]
        assert tok.decode(answer, skip_special_tokens=False) in [f"{n}<|im_end|>" for n in "12345"]
        user = row["text"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": tok.decode(answer[:-1])}]
        assert row["text"] == hf.apply_chat_template(messages, tokenize=False)
    p = run_cli(args + ["--n", "2"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("<|im_start|>assistant\n⟦") == 2 and p.stdout.count("<|im_end|>⟧") == 2


def test_preview_of_the_quickstart_trains_only_the_tokenizer(tmp_path):
    """No model.path: the tokenizer pretraining would train, trained here, and no base model."""
    run = tmp_path / "run"
    p = run_cli(["preview", "configs/tiny_cpu.toml", f"run.dir={run}", "--json", "--n", "2"])
    assert p.returncode == 0, p.stderr
    assert "training the tokenizer pretraining would train" in p.stderr and not (run / "base").exists()
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 2 and all(r["text"].startswith(BOS) and r["text"].endswith(EOS) for r in rows)
