"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` (the Rust library behind HF fast tokenizers).

A checkpoint directory gives tokenizer.json plus the special tokens, which real checkpoints spread
over three files: tokenizer_config.json and special_tokens_map.json name bos/eos/pad (as strings
or as AddedToken dicts), generation_config.json lists the ids generation stops on (Llama 3.1
Instruct has three). We read them all and expose plain ids.

BOS: some tokenizer.json files add it in a post-processor (Llama 3's TemplateProcessing), others
never (Qwen2 has no BOS at all). `encode(..., add_special_tokens=False)` never runs the
post-processor, so the data pipeline encodes without special tokens and puts BOS in front
explicitly (`add_bos`), once, when this tokenizer uses one.

`train_bpe` builds a byte-level BPE tokenizer from text, Llama 3 style, for the from-scratch
quickstart model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ftcore.files import atomic_path, write_atomic


class TokenizerError(ValueError):
    """A missing or inconsistent tokenizer file: the message names the file and the token."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """bos_id may be None (Qwen2); pad_id falls back to eos_id; eos_ids are every id that ends a
    generation, eos_id (= eos_ids[0]) the one appended after a completion."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 extra_eos_ids: Iterable[int] = (), add_bos: bool | None = None,
                 config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})  # the tokenizer_config.json we were loaded from, kept on save
        self.chat_template_source = ""  # the file config["chat_template"] came from, for messages about it
        self.bos_id = self._id_of(bos_token, "bos_token")
        eos_id = self._id_of(eos_token, "eos_token")
        ids = ([eos_id] if eos_id is not None else []) + [int(i) for i in extra_eos_ids]
        self.eos_ids: list[int] = list(dict.fromkeys(ids))  # ordered, no duplicates
        if not self.eos_ids:
            raise TokenizerError("tokenizer has no eos token: set eos_token in tokenizer_config.json "
                                 "or eos_token_id in generation_config.json")
        self.eos_id: int = self.eos_ids[0]
        pad_id = self._id_of(pad_token, "pad_token")
        self.pad_id: int = pad_id if pad_id is not None else self.eos_id
        if add_bos is None:  # does the post-processor put BOS in front? (Llama 3: yes, GPT-2: no)
            with_special = tok.encode("a", add_special_tokens=True).ids
            add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id]
        self.add_bos: bool = bool(add_bos) and self.bos_id is not None

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self.tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return i

    # ------------------------------------------------------------------------------------------
    # loading and saving HF-style directories

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """From an HF model directory (ftcore.source.load_tokenizer also reads a GGUF file's)."""
        path = Path(path)
        if path.suffix.lower() == ".gguf":  # reading it is ftcore.gguf's job, which depends on this module
            raise TokenizerError(f"{path}: a GGUF file, not a directory (ftcore.source.load_tokenizer reads either)")
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: not found (ftcore needs a fast tokenizer's tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # the Rust error is one line already
            raise TokenizerError(f"{tj}: cannot load: {e}") from None
        config = _read_json(path / "tokenizer_config.json")
        template_source = path / "tokenizer_config.json"
        # transformers >= 4.43 saves chat templates apart, and reads those files before the config's entry
        files = {"default": path / "chat_template.jinja"} if (path / "chat_template.jinja").is_file() else {}
        files.update({f.stem: f for f in sorted((path / "additional_chat_templates").glob("*.jinja"))})
        if files:
            templates = {name: f.read_text(encoding="utf-8") for name, f in files.items()}
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
            template_source = files["default"] if len(files) == 1 and "default" in files else path
        special = _read_json(path / "special_tokens_map.json")
        gen = _read_json(path / "generation_config.json")

        def token(name: str) -> str | None:  # tokenizer_config wins, as in transformers
            return _token_content(config.get(name)) or _token_content(special.get(name))

        def token_of_id(name: str) -> str | None:  # generation_config gives ids, not strings
            ids = _id_list(gen.get(name))
            return tok.id_to_token(ids[0]) if ids else None

        bos = token("bos_token")
        if bos is None and "bos_token" not in config:
            bos = token_of_id("bos_token_id")
        eos = token("eos_token") or token_of_id("eos_token_id")
        pad = token("pad_token") or token_of_id("pad_token_id")
        add_bos = config.get("add_bos_token") if isinstance(config.get("add_bos_token"), bool) else None
        out = cls(tok, bos, eos, pad, extra_eos_ids=_id_list(gen.get("eos_token_id")), add_bos=add_bos, config=config)
        out.chat_template_source = str(template_source)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
        `transformers.AutoTokenizer`. The extra eos ids belong to generation_config.json, which
        the model's save_pretrained writes (see `generation_config`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        special = {k: self.tok.id_to_token(i) for k, i in names.items() if i is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1 << 30, **self.config, **special}
        if self.bos_id is None:
            config["bos_token"] = None
        with atomic_path(path / "tokenizer.json") as tmp:
            self.tok.save(str(tmp))
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            write_atomic(path / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def generation_config(self) -> dict[str, Any]:
        """The token ids for generation_config.json (eos_token_id a list when there are several)."""
        out: dict[str, Any] = {"eos_token_id": self.eos_ids if len(self.eos_ids) > 1 else self.eos_id,
                               "pad_token_id": self.pad_id}
        if self.bos_id is not None:
            out["bos_token_id"] = self.bos_id
        return out

    # ------------------------------------------------------------------------------------------
    # encoding and decoding

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False, add_bos: bool = False) -> list[int]:
        """add_special_tokens runs the tokenizer.json post-processor (what HF does by default);
        add_bos puts this tokenizer's BOS in front unless it is already there."""
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self.with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Many texts at once, in parallel in Rust; without offsets (encode_batch_fast)."""
        if not texts:
            return []
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character span of each token) per text, without special tokens added."""
        return [(e.ids, e.offsets) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def added_tokens(self) -> dict[str, int]:
        """{text: id} of the tokens added to the vocabulary (special and control tokens), which the
        tokenizer never splits."""
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

    def with_bos(self, ids: list[int]) -> list[int]:
        """BOS once: added when this tokenizer uses one and `ids` does not start with it already."""
        if self.add_bos and ids[:1] != [self.bos_id]:
            return [self.bos_id] + ids
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------
    # training a byte-level BPE from text (the quickstart's from-scratch model)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int,
                  special_tokens: tuple[str, ...] = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"),
                  min_frequency: int = 2) -> "Tokenizer":
        """special_tokens = (bos, eos[, pad, ...]); ids 0, 1, 2... Byte-level, so any text encodes
        (no unknown token) and decodes back exactly; a post-processor adds BOS as Llama 3 does."""
        if len(special_tokens) < 2:
            raise TokenizerError("train_bpe needs at least (bos, eos) special tokens")
        tok = tokenizers.Tokenizer(models.BPE())
        # GPT-2/Llama-style split into words, digits and punctuation before merging bytes
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        bos, eos = special_tokens[0], special_tokens[1]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))]),
        ])
        pad = special_tokens[2] if len(special_tokens) > 2 else None
        return cls(tok, bos, eos, pad, add_bos=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
                f"pad_id={self.pad_id}, add_bos={self.add_bos})")
