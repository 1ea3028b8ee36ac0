"""Writing a GGUF file in llama.cpp's conventions: tensors (Q/K rows permuted back for llama-arch
files, names as its converter writes them), hyper-parameters, tokenizer and chat template; one
tensor in memory at a time, to FILE.tmp renamed at the end."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ftcore.gguf.format import (TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, WRITE_TYPES, GGUFError,
                                gguf_package, ours_to_gguf, permuted_heads, pre_tokenizer_name, rope_rows)
from ftcore.files import staging_path
from ftcore.model import ModelConfig, rope_inv_freq

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
    gguf = gguf_package()
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
    tmp = staging_path(out)
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
            if (heads := permuted_heads(cfg, ours or "")) is not None:
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
