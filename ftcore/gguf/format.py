"""What reading and writing share: the supported architectures and tensor types, GGUF's tensor
names and ours, the Q/K row permutation of llama-arch files, and llama.cpp's pre-tokenizers."""
from __future__ import annotations

import json

import numpy as np

from ftcore.hf import map_name, name_pattern
from ftcore.model import ModelConfig

ARCHITECTURES = ("llama", "qwen2")                     # Llama 2/3.x, SmolLM, Mistral-style; Qwen2
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
WRITE_TYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL = "pip install 'ftcore[gguf]'"


class GGUFError(ValueError):
    """A file ftcore cannot read or write as GGUF: names the file and what."""


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"GGUF files need the gguf package: {INSTALL}") from None
    return gguf


# ------------------------------------------------------------------------------------------------
# names: GGUF's <-> ours ({i} a layer, {p} weight or bias)

_NAMES = [
    ("token_embd.weight", "embed.weight"),
    ("output_norm.weight", "norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight"),
    ("blk.{i}.attn_q.{p}", "layers.{i}.attn.wq.{p}"),
    ("blk.{i}.attn_k.{p}", "layers.{i}.attn.wk.{p}"),
    ("blk.{i}.attn_v.{p}", "layers.{i}.attn.wv.{p}"),
    ("blk.{i}.attn_output.{p}", "layers.{i}.attn.wo.{p}"),
    ("blk.{i}.ffn_norm.weight", "layers.{i}.mlp_norm.weight"),
    ("blk.{i}.ffn_gate.{p}", "layers.{i}.mlp.w_gate.{p}"),
    ("blk.{i}.ffn_up.{p}", "layers.{i}.mlp.w_up.{p}"),
    ("blk.{i}.ffn_down.{p}", "layers.{i}.mlp.w_down.{p}"),
]


_GGUF_TO_OURS = [(name_pattern(g), o) for g, o in _NAMES]
_OURS_TO_GGUF = [(name_pattern(o), g) for g, o in _NAMES]


def gguf_to_ours(name: str) -> str | None:
    return map_name(name, _GGUF_TO_OURS)


def ours_to_gguf(name: str) -> str:
    out = map_name(name, _OURS_TO_GGUF)
    if out is None:
        raise KeyError(name)
    return out


def rope_rows(rows: int, n_heads: int) -> np.ndarray:
    """For each row of an HF Q or K matrix, the row llama.cpp's converter moved it to: within a
    head, the halves [x0..x(d/2-1) | y0..] become interleaved pairs (x0, y0, x1, y1, ...)."""
    d = rows // n_heads
    r = np.arange(rows)
    head, j = r // d, r % d
    return head * d + 2 * (j % (d // 2)) + j // (d // 2)


def permuted_heads(cfg: ModelConfig, ours: str) -> int | None:
    """Heads of a Q/K tensor that llama-arch files store permuted (None: stored as HF has it)."""
    if cfg.model_type == "qwen2":  # llama.cpp runs Qwen2 with the rotate-half (NEOX) rotary: no permutation
        return None
    if ".attn.wq." in ours:
        return cfg.num_heads
    if ".attn.wk." in ours:
        return cfg.num_kv_heads
    return None



# llama.cpp's token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the splits llama.cpp (llama-vocab.cpp) runs before the byte-level BPE
PRE_TOKENIZERS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT], "refact": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}


def pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def pre_tokenizer_name(tok) -> str | None:
    """The llama.cpp name of a tokenizers.Tokenizer's pre-tokenizer, if it is one of ours or the
    plain GPT-2 ByteLevel one (what ftcore's own BPE training uses), else None."""
    got = json.loads(tok.to_str()).get("pre_tokenizer")
    plain = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if got and all(got.get(k) == v for k, v in plain.items()):
        return "gpt2"
    for name in ("gpt2", "smollm", "llama-bpe", "qwen2"):
        want = json.loads(pre_tokenizer(name).__getstate__())
        if got == want:
            return name
    if got and got.get("type") == "Sequence":  # SmolLM / StarCoder's own tokenizer.json spelling
        parts = got.get("pretokenizers", [])
        if [p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") \
                and all(parts[1].get(k) == v for k, v in plain.items() if k != "trim_offsets"):
            return "smollm"
    return None
