"""GGUF (llama.cpp's format) as a model source and an export target, like an HF directory.

Reading: the header parsed here (read_header), each tensor's rows by a positioned read and
dequantized by the `gguf` package (the format's own library, an optional extra), the ModelConfig from the
`{arch}.*` keys, the tokenizer from `tokenizer.ggml.*`, and each tensor dequantized on its own -
only the rows asked for, so an FSDP rank touches only its shard (a quantized row is whole blocks
along the last dimension). What llama.cpp's converter did is undone: tensor names (blk.N.attn_q),
the row permutation of Q and K in llama-arch files (for its interleaved rotary kernel), the tied
output matrix it leaves out, and Llama 3.1's rope scaling stored as a `rope_freqs` tensor.
Writing: the same in reverse, one tensor in memory at a time, to FILE.tmp renamed at the end.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from ftcore.model import ModelConfig

ARCHITECTURES = ("llama", "qwen2")                     # Llama 2/3.x, SmolLM, Mistral-style; Qwen2
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
WRITE_TYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL = "pip install 'ftcore[gguf]'"


class GGUFError(ValueError):
    """A file ftcore cannot read or write as GGUF: names the file and what."""


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def _gguf():
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


def _tables():
    from ftcore.hf import name_pattern
    return ([(name_pattern(g), o) for g, o in _NAMES], [(name_pattern(o), g) for g, o in _NAMES])


def gguf_to_ours(name: str) -> str | None:
    from ftcore.hf import map_name
    return map_name(name, _tables()[0])


def ours_to_gguf(name: str) -> str:
    from ftcore.hf import map_name
    out = map_name(name, _tables()[1])
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


def _permuted_heads(cfg: ModelConfig, ours: str) -> int | None:
    """Heads of a Q/K tensor that llama-arch files store permuted (None: stored as HF has it)."""
    if cfg.model_type == "qwen2":  # llama.cpp runs Qwen2 with the rotate-half (NEOX) rotary: no permutation
        return None
    if ".attn.wq." in ours:
        return cfg.num_heads
    if ".attn.wk." in ours:
        return cfg.num_kv_heads
    return None


# ------------------------------------------------------------------------------------------------
# reading

def _f32(value) -> float:
    """A float GGUF stored as float32, as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


LLAMA3_CANDIDATES = [(lo, hi, old) for lo in (1.0, 2.0) for hi in (4.0, 8.0)
                     for old in (8192, 4096, 2048, 16384, 32768)]


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """The llama3 rope_scaling whose per-frequency divisors are `factors` (what llama.cpp's converter
    writes as rope_freqs), among the published settings; None if none reproduces them."""
    from ftcore.model import rope_inv_freq
    factor = float(factors.max())
    for lo, hi, old in LLAMA3_CANDIDATES:
        s = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
             "original_max_position_embeddings": old}
        plain = rope_inv_freq(ModelConfig(hidden_size=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta))
        scaled = rope_inv_freq(ModelConfig(hidden_size=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta,
                                           rope_scaling=s))
        if np.allclose((plain / scaled).numpy(), factors, rtol=1e-4):
            return s
    return None


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]   # as GGUF lists it: innermost (columns) first
    tensor_type: Any         # gguf.GGMLQuantizationType
    data_offset: int         # from the start of the file
    n_bytes: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path, gguf) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata and tensor table of a GGUF file (version 2 or 3), parsed from the header's
    bytes: a 49k-token vocabulary takes milliseconds (the gguf package's reader builds a numpy
    object per string: seconds and ~150 MB). Raises ValueError/struct.error on a malformed header."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            (v,) = struct.unpack_from(fmt, m, pos)
            pos += struct.calcsize(fmt)
            return v

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > len(m):
                raise ValueError("a string runs past the end of the file")
            pos += n
            return m[pos - n:pos].decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype in _SCALARS:
                return take(_SCALARS[vtype])
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                sub, n = take("<I"), take("<Q")
                return [value(sub) for _ in range(n)]
            raise ValueError(f"unknown metadata value type {vtype}")

        if m[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version = take("<4xI")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (ftcore reads 2 and 3)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        table = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(take("<Q") for _ in range(take("<I")))
            table.append((name, dims, take("<I"), take("<Q")))
        align = int(meta.get("general.alignment", 32))
        start = -(-pos // align) * align
    tensors = []
    for name, dims, kind, offset in table:
        qtype = gguf.GGMLQuantizationType(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        tensors.append(TensorInfo(name, dims, qtype, start + offset, math.prod(dims[1:]) * (dims[0] // block) * size))
    return meta, tensors


class GGUFModel:
    """A GGUF file opened for reading: `.config`, `.tokenizer()`, `.tensors` ({our name: the
    file's tensor}), `.read(name, first, rows)`. Every check that can fail is done here, before
    any weight is read."""

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise GGUFError(f"{where}: cannot open ({e.strerror})") from None
        if magic != b"GGUF":
            raise GGUFError(f"{where}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
        gguf = _gguf()
        try:
            self.meta, table = read_header(self.path, gguf)
        except (ValueError, OSError, IndexError, struct.error) as e:
            raise GGUFError(f"{where}: cannot read the GGUF header ({type(e).__name__}: {e}); truncated file?") from None
        self._gguf = gguf
        by_name = {t.name: t for t in table}
        for t in by_name.values():
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{where}: tensor {t.name!r} ends past the end of the file; truncated file?")
        arch = self.value("general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        self.arch = arch
        self._check_tokenizer()  # before any weight is read
        self.config = self._config(by_name)
        self.tensors: dict[str, Any] = {}
        for name, t in by_name.items():
            if name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            ours = gguf_to_ours(name)
            if ours is None:
                raise GGUFError(f"{where}: tensor {name!r} has no place in a {arch} model ftcore builds")
            if t.tensor_type.name not in READ_TYPES:
                raise GGUFError(f"{where}: tensor {name!r} is {t.tensor_type.name}, which ftcore does not read "
                                f"(it reads {', '.join(READ_TYPES)})")
            self.tensors[ours] = t

    # metadata ---------------------------------------------------------------------------------

    def value(self, key: str, default: Any = KeyError) -> Any:
        if key not in self.meta:
            if default is KeyError:
                raise GGUFError(f"{self.path}: no {key!r} in the metadata")
            return default
        return self.meta[key]

    def _config(self, tensors: dict) -> ModelConfig:
        a, where = self.arch, str(self.path)
        if self.value(f"{a}.expert_count", 0):
            raise GGUFError(f"{where}: {a}.expert_count is set: mixture-of-experts models are not implemented")
        if self.value(f"{a}.attention.sliding_window", 0):
            raise GGUFError(f"{where}: {a}.attention.sliding_window is set: sliding-window attention is not implemented")
        hidden, heads = self.value(f"{a}.embedding_length"), self.value(f"{a}.attention.head_count")
        head_dim = self.value(f"{a}.attention.key_length", hidden // heads)
        rot = self.value(f"{a}.rope.dimension_count", head_dim)
        if rot != head_dim:
            raise GGUFError(f"{where}: {a}.rope.dimension_count={rot} rotates part of a head of {head_dim}: "
                            "partial rotary embeddings are not implemented")
        theta = _f32(self.value(f"{a}.rope.freq_base", 10000.0))
        scaling = None
        kind = self.value(f"{a}.rope.scaling.type", "none")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(self.value(f"{a}.rope.scaling.factor"))}
        elif kind != "none":
            raise GGUFError(f"{where}: {a}.rope.scaling.type={kind!r} is not implemented (supported: none, linear, "
                            "and Llama 3.1's rope_freqs)")
        if "rope_freqs.weight" in tensors:
            t = tensors["rope_freqs.weight"]
            factors = self._dequantize(t, self._raw(t, 0, 1, t.n_bytes)).astype(np.float64).ravel()
            if not np.allclose(factors, 1.0):
                scaling = _llama3_scaling(factors, theta, head_dim)
                if scaling is None:
                    raise GGUFError(f"{where}: tensor 'rope_freqs.weight' holds rope factors no llama3 scaling "
                                    "reproduces: that rope scaling is not implemented")
        embd = tensors.get("token_embd.weight")
        if embd is None:
            raise GGUFError(f"{where}: no tensor 'token_embd.weight'")
        tok = lambda k: self.value(f"tokenizer.ggml.{k}", None)  # noqa: E731
        return ModelConfig(
            model_type=a, vocab_size=int(embd.shape[1]), hidden_size=hidden,
            intermediate_size=self.value(f"{a}.feed_forward_length"), num_layers=self.value(f"{a}.block_count"),
            num_heads=heads, num_kv_heads=self.value(f"{a}.attention.head_count_kv", heads), head_dim=head_dim,
            max_position_embeddings=self.value(f"{a}.context_length", 2048),
            rms_norm_eps=_f32(self.value(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, tie_word_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("padding_token_id"))

    # tensors ----------------------------------------------------------------------------------

    def shape(self, ours: str) -> tuple[int, ...]:
        """The tensor's shape as HF and ftcore lay it out (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[ours].shape))

    def read(self, ours: str, first: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows [first, first + rows) of tensor `ours`, dequantized to float32, in HF's layout. The
        rows' bytes come by a positioned read, not through a memory map: faulting pages in from
        a map counted most of the file in the process's resident memory when reading half its rows."""
        t = self.tensors[ours]
        shape = self.shape(ours)
        rows = shape[0] - first if rows is None else rows
        row_bytes = int(t.n_bytes) // shape[0]
        heads = _permuted_heads(self.config, ours)
        src = rope_rows(shape[0], heads)[first:first + rows] if heads else np.arange(first, first + rows)
        lo, hi = (int(src.min()), int(src.max()) + 1) if rows else (first, first)
        raw = self._raw(t, lo, hi - lo, row_bytes)
        out = self._dequantize(t, raw if heads is None else raw[src - lo])
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape((rows, *shape[1:]))

    def _raw(self, t: TensorInfo, first_row: int, rows: int, row_bytes: int) -> np.ndarray:
        buf = np.empty((rows, row_bytes), dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.data_offset + first_row * row_bytes)
            if f.readinto(buf) != buf.size:
                raise GGUFError(f"{self.path}: tensor {t.name!r} cannot be read; truncated file?")
        return buf

    def _dequantize(self, t: TensorInfo, raw: np.ndarray) -> np.ndarray:
        try:
            return self._gguf.quants.dequantize(raw, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"{self.path}: tensor {t.name!r} cannot be read ({type(e).__name__}: {e})") from None

    # tokenizer --------------------------------------------------------------------------------

    def _check_tokenizer(self) -> None:
        kind = self.value("tokenizer.ggml.model", None)
        if kind is None:
            raise GGUFError(f"{self.path}: no tokenizer in the metadata (tokenizer.ggml.model)")
        if kind != "gpt2":
            raise GGUFError(f"{self.path}: tokenizer.ggml.model={kind!r} is not supported "
                            "(ftcore reads byte-level BPE, 'gpt2')")
        pre = self.value("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise GGUFError(f"{self.path}: tokenizer.ggml.pre={pre!r} is not supported "
                            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        if "tokenizer.ggml.merges" not in self.meta:
            raise GGUFError(f"{self.path}: a BPE tokenizer without tokenizer.ggml.merges")

    def tokenizer(self):
        """The ftcore Tokenizer the metadata describes: vocabulary, merges, the pre-tokenizer llama.cpp
        runs for `tokenizer.ggml.pre`, control tokens as special tokens, the chat template."""
        from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models

        from ftcore.tokenizer import Tokenizer
        tokens = [str(t) for t in self.value("tokenizer.ggml.tokens")]
        types = list(self.value("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in self.value("tokenizer.ggml.merges")]
        tok = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                       fuse_unk=False, ignore_merges=False))
        tok.pre_tokenizer = pre_tokenizer(self.value("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])
        name = lambda key: tokens[i] if (i := self.value(f"tokenizer.ggml.{key}", None)) is not None else None  # noqa: E731
        config = {}
        if (template := self.value("tokenizer.chat_template", None)) is not None:
            config["chat_template"] = template
        add_bos = bool(self.value("tokenizer.ggml.add_bos_token", False))
        config["add_bos_token"] = add_bos
        if (unk := name("unknown_token_id")) is not None:
            config["unk_token"] = unk
        return Tokenizer(tok, name("bos_token_id"), name("eos_token_id"), name("padding_token_id"),
                         add_bos=add_bos, config=config)


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


# ------------------------------------------------------------------------------------------------
# writing

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType


def _tokenizer_metadata(tokenizer, vocab_size: int, where: str) -> dict[str, Any]:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, the vocabulary padded to the model's rows."""
    spec = json.loads(tokenizer.tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{where}: the tokenizer is {model.get('type')!r}; GGUF export writes byte-level BPE only")
    pre = pre_tokenizer_name(tokenizer.tok)
    if pre is None:
        raise GGUFError(f"{where}: the tokenizer's pre-tokenizer has no llama.cpp name (tokenizer.ggml.pre); "
                        "GGUF export knows gpt2, smollm, llama-bpe and qwen2")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise GGUFError(f"{where}: the tokenizer has {len(vocab)} tokens, the model's embedding {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for t, i in vocab.items():
        tokens[i] = t
    types = [TOKEN_UNUSED] * vocab_size
    for t, i in vocab.items():
        types[i] = TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": tokenizer.eos_id, "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
            "tokenizer.ggml.add_bos_token": tokenizer.add_bos, "tokenizer.ggml.add_eos_token": False}
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    if (unk := tokenizer.config.get("unk_token")) and tokenizer.token_to_id(unk) is not None:
        meta["tokenizer.ggml.unknown_token_id"] = tokenizer.token_to_id(unk)
    if template := tokenizer.config.get("chat_template"):
        meta["tokenizer.chat_template"] = template
    return meta


def _model_metadata(cfg: ModelConfig, where: str) -> tuple[str, dict[str, Any]]:
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise GGUFError(f"{where}: model_type {cfg.model_type!r} has no GGUF architecture here")
    if cfg.sliding_window:
        raise GGUFError(f"{where}: a sliding window of {cfg.sliding_window}: llama.cpp's {cfg.model_type} has none")
    a = "qwen2" if cfg.model_type == "qwen2" else "llama"
    meta = {f"{a}.block_count": cfg.num_layers, f"{a}.context_length": cfg.max_position_embeddings,
            f"{a}.embedding_length": cfg.hidden_size, f"{a}.feed_forward_length": cfg.intermediate_size,
            f"{a}.attention.head_count": cfg.num_heads, f"{a}.attention.head_count_kv": cfg.num_kv_heads,
            f"{a}.rope.freq_base": float(cfg.rope_theta), f"{a}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            f"{a}.rope.dimension_count": cfg.head_dim, f"{a}.vocab_size": cfg.vocab_size}
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        meta[f"{a}.attention.key_length"] = meta[f"{a}.attention.value_length"] = cfg.head_dim
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = float(s["factor"])
    elif s and s["rope_type"] != "llama3":  # llama3 goes in as the rope_freqs tensor
        raise GGUFError(f"{where}: rope_scaling {s['rope_type']!r} has no GGUF form here")
    return a, meta


def check_exportable(cfg: ModelConfig, tokenizer, where: str) -> None:
    """Raise now what write_gguf would raise at the end of a run (a model or tokenizer GGUF cannot hold)."""
    _model_metadata(cfg, where)
    if tokenizer is None:
        raise GGUFError(f"{where}: a GGUF file carries its tokenizer, and this model has none")
    _tokenizer_metadata(tokenizer, cfg.vocab_size, where)


def _tensor_type(gguf, name: str, shape: tuple[int, ...], want: str):
    """Norms, biases and the rope factors stay F32 (as llama.cpp keeps them); a matrix whose rows do
    not split into Q8_0 blocks falls back to F16."""
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32
    if want == "q8_0" and shape[-1] % 32:
        return Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[want]


def write_gguf(out, cfg: ModelConfig, tokenizer, shapes: dict[str, tuple[int, ...]],
               fetch: Callable[[str], torch.Tensor], gguf_type: str = "f16", name: str | None = None,
               progress: bool = True) -> Path:
    """Write `out` (a .gguf file): `shapes` is {our name: shape} (a tied lm_head left out), `fetch(name)`
    the full tensor, called once per tensor in file order and dropped after it is written."""
    from tqdm import tqdm
    gguf = _gguf()
    out = Path(out)
    where = str(out)
    if gguf_type not in WRITE_TYPES:
        raise GGUFError(f"--gguf-type {gguf_type!r}: one of {', '.join(WRITE_TYPES)}")
    if tokenizer is None:
        raise GGUFError(f"{where}: a GGUF file carries its tokenizer, and this model has none (no tokenizer.json)")
    arch, meta = _model_metadata(cfg, where)
    meta.update(_tokenizer_metadata(tokenizer, cfg.vocab_size, where))
    meta["general.name"] = name or out.stem
    meta["general.file_type"] = _FILE_TYPES[gguf_type]
    if gguf_type == "q8_0":
        meta["general.quantization_version"] = gguf.GGML_QUANT_VERSION

    names = [n for n in shapes if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    plan = []  # (our name or None for rope_freqs, gguf name, shape, type)
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3":
        plan.append((None, "rope_freqs.weight", (cfg.head_dim // 2,), gguf.GGMLQuantizationType.F32))
    for n in names:
        plan.append((n, ours_to_gguf(n), tuple(shapes[n]), _tensor_type(gguf, n, tuple(shapes[n]), gguf_type)))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, value in meta.items():
            _add(writer, gguf, key, value)
        for _, gname, shape, qtype in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, gname, shape, qtype in tqdm(plan, desc=f"writing {out.name}", unit="tensor", disable=not progress):
            t = _rope_factors(cfg) if ours is None else fetch(ours)
            data = t.detach().to("cpu", torch.float32).numpy()
            if (heads := _permuted_heads(cfg, ours or "")) is not None:
                stored = np.empty_like(data)
                stored[rope_rows(data.shape[0], heads)] = data
                data = stored
            writer.write_tensor_data(_encode(gguf, data.reshape(shape), qtype))
            del t, data
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama3 scaling as llama.cpp stores it: the divisor of each rotary frequency."""
    from ftcore.model import rope_inv_freq
    import dataclasses
    return rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)) / rope_inv_freq(cfg)


def _encode(gguf, data: np.ndarray, qtype) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16).view(np.uint8)
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)).view(np.uint8)


def _add(writer, gguf, key: str, value: Any) -> None:
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if 0 <= value < 2**32 else writer.add_int64)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], int):
        writer.add_key_value(key, value, T.ARRAY, sub_type=T.INT32)
    else:
        writer.add_array(key, value)


# ------------------------------------------------------------------------------------------------
# ftcore's entry points (read_config, Tokenizer.from_dir and the two loaders dispatch here)

@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFModel:
    return GGUFModel(path)


def open_gguf(path) -> GGUFModel:
    """The file opened once per process (parsing a 49k-token vocabulary takes seconds), again if it changed."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open ({e.strerror})") from None
    return _open(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def _check_shapes(g: GGUFModel, expected: dict[str, tuple[int, ...]]) -> None:
    for ours, t in g.tensors.items():
        if ours not in expected:
            raise GGUFError(f"{g.path}: unexpected tensor {t.name!r}")
        if g.shape(ours) != expected[ours]:
            raise GGUFError(f"{g.path}: tensor {t.name!r} has shape {list(g.shape(ours))}, "
                            f"expected {list(expected[ours])}")
    missing = sorted(set(expected) - set(g.tensors))
    if missing:
        raise GGUFError(f"{g.path}: missing tensor {ours_to_gguf(missing[0])!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def tensor_entries(path, expected: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, Callable[[int, int], torch.Tensor]]]:
    """(our name, read(first, rows)) for each tensor of a GGUF file, all checked against `expected` first."""
    g = open_gguf(path)
    _check_shapes(g, expected)
    for ours in g.tensors:
        yield ours, (lambda first, rows, _n=ours: g.read(_n, first, rows))
