"""A model source: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a GGUF
file. The one place that tells the two apart for the config, the tokenizer and the dtype the
weights come in; the weights themselves: weights.checkpoint_tensors."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ftcore import hf
from ftcore.gguf import is_gguf, open_gguf
from ftcore.model import ModelConfig
from ftcore.tokenizer import Tokenizer


def check_source(path, what: str) -> Path:
    """`path` if it is an HF directory or a GGUF file, else a one-line error naming `what`."""
    from ftcore.config import ConfigError
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise ConfigError(f"{what}={str(path)!r}: no such file")
    elif not (path / "config.json").is_file():
        raise ConfigError(f"{what}={str(path)!r}: no config.json there (and not a .gguf file)")
    return path


def read_config(path) -> ModelConfig:
    """The model's shape: config.json, or a GGUF file's metadata."""
    if is_gguf(path):
        return copy.deepcopy(open_gguf(path).config)
    return hf.read_config(path)


def load_tokenizer(path) -> Tokenizer:
    """tokenizer.json and its companions, or the tokenizer a GGUF file's metadata describes."""
    if is_gguf(path):
        return open_gguf(path).tokenizer()
    return Tokenizer.from_dir(path)


def checkpoint_dtype(path) -> torch.dtype:
    """The dtype the weights are stored in as config.json says (fp32 where it says nothing); a GGUF
    file is dequantized to fp32."""
    import json
    if is_gguf(path):
        return torch.float32
    d = json.loads((Path(path) / "config.json").read_text())
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def pretrain_model_config(cfg, tokenizer: Tokenizer | None = None) -> ModelConfig:
    """The small base `ftcore train` pretrains when model.path is empty: the [pretrain] shape, with
    the trained tokenizer's vocabulary and special ids once there is one (it may end up a little
    smaller than pretrain.vocab_size). max_position_embeddings is the longest sequence it sees,
    pretraining or fine-tuning: evaluation fits k-shot prompts into it."""
    p = cfg.pretrain
    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                             pad_token_id=tokenizer.pad_id)
    return ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size if tokenizer else p.vocab_size,
                       hidden_size=p.hidden_size, intermediate_size=p.intermediate_size, num_layers=p.num_layers,
                       num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
                       max_position_embeddings=max(p.seq_len, cfg.data.max_seq_len), rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=True, **ids)


def model_config_for(cfg) -> ModelConfig:
    """The model shape a run config trains: model.path's, else the [pretrain] shape."""
    return read_config(cfg.model.path) if cfg.model.path else pretrain_model_config(cfg)
