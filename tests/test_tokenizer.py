"""Tokenizer: special tokens from the three config files, BOS quirks, save -> transformers parity,
byte-level BPE training. The tokenizer.json files are built here the way real checkpoints are."""
import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ftcore.tokenizer import Tokenizer, TokenizerError

CORPUS = [f"The kettle number {i} is pretty good, but the lid could be better. Ünïcödé {i % 7} ok!"
          for i in range(300)] + ["Review: the headphones are fantastic.\n\nRating: 5"] * 50
TEXTS = ["hello world", "  leading spaces\n\nand newlines\t tab", "Ünïcödé 😀 emoji, digits 12345",
         "<|begin_of_text|>already has bos", "a turn<|eot_id|>then more", ""]


def _bpe(specials, pre_tokenizer=None, decoder=None) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoder or decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre_tokenizer is None else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    return tok


def _write(d, tok, **files):
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    for name, obj in files.items():
        (d / f"{name}.json").write_text(json.dumps(obj))
    return d


def llama3_dir(d):
    """Llama 3.1 Instruct style: BOS added by a TemplateProcessing post-processor, eos_token
    <|eot_id|>, three eos ids in generation_config.json, header tokens added as special tokens."""
    tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>"])
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    return _write(d, tok,
                  tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                                    "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                                    "chat_template": "{{ messages }}"},
                  special_tokens_map={"bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
                                      "eos_token": {"content": "<|eot_id|>", "lstrip": False}},
                  generation_config={"bos_token_id": bos, "eos_token_id": ids})


def qwen_dir(d):
    """Qwen2 style: no BOS at all, eos <|im_end|>, pad <|endoftext|>, no post-processor."""
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return _write(d, tok,
                  tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                                    "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                  generation_config={"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]})


def gpt2_dir(d):
    """GPT-2 style: bos == eos == <|endoftext|>, but nothing ever adds it; no pad token."""
    tok = _bpe(["<|endoftext|>"])
    return _write(d, tok, special_tokens_map={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})


def mistral_dir(d):
    """SentencePiece-converted style: Metaspace pre-tokenizer, <s> added by the post-processor,
    add_bos_token in tokenizer_config.json, ids only in generation_config.json."""
    tok = _bpe(["<unk>", "<s>", "</s>"], pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
               decoders.Metaspace(replacement="▁", prepend_scheme="first"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return _write(d, tok, tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                                            "unk_token": "<unk>"},
                  generation_config={"bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>")})


MAKERS = {"llama3": llama3_dir, "qwen": qwen_dir, "gpt2": gpt2_dir, "mistral": mistral_dir}


def test_llama3_special_tokens(tmp_path):
    tok = Tokenizer.from_dir(llama3_dir(tmp_path))
    bos, eot = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    assert tok.bos_id == bos and tok.add_bos
    # eos_id: the tokenizer's own eos first (what transformers reports), then generation_config's
    assert tok.eos_id == eot
    assert tok.eos_ids[0] == eot and sorted(tok.eos_ids) == sorted(
        tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert tok.pad_id == tok.eos_id  # no pad token: fall back to eos
    assert tok.vocab_size == tok.tok.get_vocab_size(with_added_tokens=True) > tok.tok.get_vocab_size(False)
    # add_special_tokens=False never runs the post-processor; add_bos adds BOS exactly once
    plain = tok.encode("hello world")
    assert bos not in plain
    assert tok.encode("hello world", add_special_tokens=True) == [bos] + plain
    assert tok.encode("hello world", add_bos=True) == [bos] + plain
    assert tok.encode("<|begin_of_text|>hello world", add_bos=True) == [bos] + plain
    assert tok.encode("<|begin_of_text|>hello world", add_special_tokens=True, add_bos=True).count(bos) == 2  # HF does too
    # added special tokens are single ids inside text, and skipped on decode
    ids = tok.encode("a turn<|eot_id|>next")
    assert ids.count(eot) == 1
    assert tok.decode(ids) == "a turnnext"
    assert tok.decode(ids, skip_special_tokens=False) == "a turn<|eot_id|>next"


def test_no_bos_and_gpt2_style(tmp_path):
    qwen = Tokenizer.from_dir(qwen_dir(tmp_path / "qwen"))
    assert qwen.bos_id is None and not qwen.add_bos
    assert qwen.eos_id == qwen.token_to_id("<|im_end|>")
    assert qwen.eos_ids == [qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")]
    assert qwen.pad_id == qwen.token_to_id("<|endoftext|>")
    assert qwen.encode("hi", add_bos=True) == qwen.encode("hi")
    gpt2 = Tokenizer.from_dir(gpt2_dir(tmp_path / "gpt2"))
    eot = gpt2.token_to_id("<|endoftext|>")
    assert gpt2.bos_id == gpt2.eos_id == gpt2.pad_id == eot
    assert not gpt2.add_bos  # nothing in the tokenizer adds it, so neither do we
    mistral = Tokenizer.from_dir(mistral_dir(tmp_path / "mistral"))
    assert mistral.bos_id == mistral.token_to_id("<s>") and mistral.add_bos
    assert mistral.eos_ids == [mistral.token_to_id("</s>")]


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_save_loads_in_transformers_identically(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(MAKERS[kind](tmp_path / "src"))
    ours.save(tmp_path / "out")
    again = Tokenizer.from_dir(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for t in (ours, again):
        assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos, t.vocab_size) == \
               (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos, ours.vocab_size)
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert hf.pad_token_id in (None, ours.pad_id)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text) == again.encode(text), text
        assert hf(text)["input_ids"] == ours.encode(text, add_special_tokens=True), text
        ids = ours.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    if kind == "llama3":
        assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
        assert ours.generation_config()["eos_token_id"] == ours.eos_ids


def test_chat_template_files_win_over_the_config_entry(tmp_path):
    """As transformers reads them: chat_template.jinja before tokenizer_config.json's chat_template,
    additional_chat_templates/NAME.jinja as named templates beside it."""
    d = llama3_dir(tmp_path / "m")
    assert Tokenizer.from_dir(d).config["chat_template"] == "{{ messages }}"
    (d / "chat_template.jinja").write_text("{{ bos_token }}")
    tok = Tokenizer.from_dir(d)
    assert tok.config["chat_template"] == "{{ bos_token }}" and tok.chat_template_source == str(d / "chat_template.jinja")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    assert Tokenizer.from_dir(d).config["chat_template"] == {"default": "{{ bos_token }}", "tool_use": "{{ tools }}"}
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(d))
    assert hf.chat_template == Tokenizer.from_dir(d).config["chat_template"]


def test_encode_batch_matches_encode(tmp_path):
    tok = Tokenizer.from_dir(llama3_dir(tmp_path))
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, add_special_tokens=True) == [tok.encode(t, True) for t in TEXTS]
    assert tok.encode_batch([]) == []
    assert tok.decode_batch(tok.encode_batch(TEXTS[:3])) == TEXTS[:3]


def test_train_bpe(tmp_path):
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    assert tok.vocab_size <= 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2) and tok.eos_ids == [1]
    assert tok.add_bos and tok.encode("kettle", add_special_tokens=True)[0] == tok.bos_id
    unseen = "Zebras ☕ never seen before: ñ 42 \n\n tabs\t!"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: nothing is unknown
    assert len(tok.encode("the kettle is pretty good")) < len("the kettle is pretty good")  # merges learnt
    assert Tokenizer.train_bpe(CORPUS, vocab_size=300).tok.to_str() == tok.tok.to_str()  # deterministic
    tok.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(unseen, add_special_tokens=True) == tok.encode(unseen, True)


def test_bad_directories(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer.from_dir(tmp_path)
    tok = _bpe(["<|endoftext|>"])
    _write(tmp_path / "a", tok, tokenizer_config={"eos_token": "<|nope|>"})
    with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_dir(tmp_path / "a")
    _write(tmp_path / "b", tok)
    with pytest.raises(TokenizerError, match="tokenizer has no eos token"):
        Tokenizer.from_dir(tmp_path / "b")
    _write(tmp_path / "c", tok, tokenizer_config={"eos_token": "<|endoftext|>"})
    (tmp_path / "c" / "generation_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"generation_config.json:1: invalid JSON"):
        Tokenizer.from_dir(tmp_path / "c")
