"""Reading a GGUF file: the header parsed here (read_header), the ModelConfig from the `{arch}.*`
keys, the tokenizer from `tokenizer.ggml.*`, and each tensor's rows by a positioned read,
dequantized by the `gguf` package (only the rows asked for: an FSDP rank touches only its shard)."""
from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from ftcore.gguf.format import (ARCHITECTURES, READ_TYPES, TOKEN_CONTROL, TOKEN_USER_DEFINED, PRE_TOKENIZERS, GGUFError, gguf_package,
                                gguf_to_ours, ours_to_gguf, permuted_heads, pre_tokenizer, rope_rows)
from ftcore.model import ModelConfig, rope_inv_freq
from ftcore.tokenizer import Tokenizer

def _f32(value) -> float:
    """A float GGUF stored as float32, as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


LLAMA3_CANDIDATES = [(lo, hi, old) for lo in (1.0, 2.0) for hi in (4.0, 8.0)
                     for old in (8192, 4096, 2048, 16384, 32768)]


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """The llama3 rope_scaling whose per-frequency divisors are `factors` (what llama.cpp's converter
    writes as rope_freqs), among the published settings; None if none reproduces them."""
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
        gguf = gguf_package()
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
        heads = permuted_heads(self.config, ours)
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
        out = Tokenizer(tok, name("bos_token_id"), name("eos_token_id"), name("padding_token_id"),
                        add_bos=add_bos, config=config)
        out.chat_template_source = f"{self.path} (tokenizer.chat_template)"
        return out


# ------------------------------------------------------------------------------------------------
# ftcore's entry points (ftcore.source and weights.checkpoint_tensors dispatch here)

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
