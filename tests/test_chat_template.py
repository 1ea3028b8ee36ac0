"""Instruction prompts in the model's own chat template (data.prompt_format): ftcore recognises the
template and renders it without Jinja; transformers' apply_chat_template, which runs the template,
is the reference, string for string and token for token. Loss only on the assistant's answer and
its end-of-turn token; k-shot prompts as earlier turns of the conversation."""
from __future__ import annotations

import pytest

from ftcore.config import DataConfig
from ftcore.data import chat_template, prepare_datasets
from ftcore.model import IGNORE_INDEX
from ftcore.data.rendering import ChatTemplate
from ftcore.data.templates import TemplateError
from ftcore.tokenizer import Tokenizer
from helpers import make_run_setup, needs_transformers

# SmolLM2-135M-Instruct's template (its GGUF file's tokenizer.chat_template; Apache-2.0)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a Qwen2.5-style one: a tools branch first, then the default system turn in the else branch
QWEN_STYLE = ("{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}"
              "{{- messages[0]['content'] }}{%- endif %}{{- '<|im_end|>\n' }}{%- else %}"
              "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
              "{%- else %}{{- '<|im_start|>system\nYou are a careful assistant.<|im_end|>\n' }}{%- endif %}{%- endif %}"
              "{%- for message in messages %}{%- if message.role != 'system' %}"
              "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_setup(tmp_path_factory.mktemp("chat"))


def _tokenizer(setup, template: str, eos: str) -> Tokenizer:
    """make_run_setup's BPE with the chat specials added, `template` as its chat template and the
    template's end-of-turn token as eos (as an instruct model's tokenizer has it)."""
    from tokenizers import AddedToken
    t = Tokenizer.from_dir(setup / "base")
    t.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return Tokenizer(t.tok, bos_token="<|begin_of_text|>", eos_token=eos, pad_token=eos,
                     add_bos=False, config={"chat_template": template})


def _hf(tok: Tokenizer, tmp_path):
    transformers = needs_transformers()
    tok.save(tmp_path)
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name, template, eos", [("smollm2", SMOLLM2, "<|im_end|>"), ("qwen", QWEN_STYLE, "<|im_end|>"),
                                                 ("chatml", PLAIN_CHATML, "<|im_end|>"), ("llama3", LLAMA3, "<|eot_id|>")])
def test_prompts_render_as_transformers_renders_the_template(setup, tmp_path, name, template, eos):
    tok = _tokenizer(setup, template, eos)
    hf = _hf(tok, tmp_path)
    chat = ChatTemplate.recognise(template)
    assert chat.system == {"smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                           "qwen": "You are a careful assistant.", "chatml": None, "llama3": None}[name]
    prompt, answer = "Predict the rating of this review:\n\nGreat coffee, 5 stars.\n\nRating:", "5"
    user = [{"role": "user", "content": prompt}]
    want_prompt = hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    got = "".join(text for text, _ in chat.segments(prompt, answer)[:-1])
    assert got == want_prompt
    full = hf.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(got + chat.segments(prompt, answer)[-1][0])

    # the tokenised example: the same ids as the rendered string; loss on the answer and end token only
    cfg = DataConfig(templates=["rating"], split=[0.5, 0.25, 0.25], max_seq_len=256)
    cfg.synthetic.num_records = 12
    ds = prepare_datasets(cfg, tok, seed=0)
    assert ds.stats["prompt_format"] == chat.name
    ex = ds.test[0]
    rendered = hf.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tok.encode(rendered)
    assert ex.input_ids[ex.prompt_len:] == tok.encode(ex.completion) + [tok.eos_id]
    assert all(l == IGNORE_INDEX for l in ex.labels[:ex.prompt_len])
    assert ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
    assert ex.context_len == (len(tok.encode(chat.context())) if chat.context() else 0)


def test_k_shot_prompts_are_earlier_turns_of_the_conversation(setup, tmp_path):
    from ftcore.evaluate import _ShotBuilder
    tok = _tokenizer(setup, SMOLLM2, "<|im_end|>")
    hf = _hf(tok, tmp_path)
    cfg = DataConfig(templates=["sentiment"], split=[0.6, 0.2, 0.2], max_seq_len=512)
    cfg.synthetic.num_records = 30
    ds = prepare_datasets(cfg, tok, seed=0)
    shots = _ShotBuilder(tok, ds.train, 2, 4096, seed=0, chat=ChatTemplate.recognise(SMOLLM2))
    ex = ds.test[0]
    ids, labels, prompt_len, used = shots(ex, 8)
    assert used == 2
    # one system turn, two solved examples as user/assistant turns, then the question: the same ids
    # as transformers renders for that conversation
    text = tok.decode(ids[:prompt_len], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.count("<|im_start|>system") == 1 and text.count("<|im_start|>user\n") == 3
    assert text.count("<|im_start|>assistant\n") == 3 and text.endswith("<|im_start|>assistant\n")
    messages = []
    for turn in text.split("<|im_start|>")[2:-1]:
        role, content = turn.split("\n", 1)
        messages.append({"role": role, "content": content.removesuffix("\n").removesuffix("<|im_end|>")})
    assert tok.encode(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)) == ids[:prompt_len]
    assert labels[prompt_len:] == ids[prompt_len:] and all(l == IGNORE_INDEX for l in labels[:prompt_len])


def test_the_config_says_which(setup):
    tok = _tokenizer(setup, SMOLLM2, "<|im_end|>")
    assert chat_template(DataConfig(prompt_format="plain"), tok) is None
    assert chat_template(DataConfig(), tok).name == "chatml"
    plain = Tokenizer.from_dir(setup / "base")  # a base model: no template
    assert chat_template(DataConfig(), plain) is None
    from ftcore.data.records import DataError
    with pytest.raises(DataError, match="has no chat_template"):
        chat_template(DataConfig(prompt_format="chat"), plain)
    tok.config["chat_template"] = "{{ messages[0]['content'] }}"
    with pytest.raises(TemplateError, match="does not recognise"):
        chat_template(DataConfig(), tok)
    tok.config["chat_template"] = LLAMA3.replace("{% set loop", "Cutting Knowledge Date: {% set loop")
    with pytest.raises(TemplateError, match="Llama 3.1"):
        chat_template(DataConfig(), tok)
