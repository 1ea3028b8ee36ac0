"""What Hugging Face calls things: config.json keys <-> ModelConfig, and tensor names <-> ours.

Everything a checkpoint written by transformers means is translated here, so model.py reads as the
maths alone and weights.py as file handling alone.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ftcore.model import ModelConfig, ModelConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ------------------------------------------------------------------------------------------------
# config.json

def config_from_hf(hf_config: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict (classic and transformers-5 forms); what this model
    cannot reproduce faithfully is refused, naming the key."""
    mt = hf_config.get("model_type")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf_config]
    if missing and mt in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(f"{where}: no {', '.join(missing)} (an HF config.json of a {mt} model has them)")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(f"{where}: model_type {mt!r} is not supported "
                               f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{where}: hidden_act {act!r} is not implemented (only 'silu')")
    rope = dict(hf_config.get("rope_parameters") or {})      # transformers 5
    theta = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    scaling = hf_config.get("rope_scaling") or (rope if rope else None)
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling.pop("type", None)
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
        elif kind not in ("llama3", "linear"):
            raise ModelConfigError(f"{where}: rope_scaling type {kind!r} is not implemented "
                                   "(supported: default, llama3, linear)")
    sliding = None
    layer_types = hf_config.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ModelConfigError(f"{where}: layer_types {sorted(set(layer_types))} includes sliding "
                               "attention, which is not implemented")
    if mt == "mistral" and hf_config.get("sliding_window"):
        sliding = int(hf_config["sliding_window"])
    if mt == "qwen2" and hf_config.get("use_sliding_window"):
        n_layers, mwl = hf_config["num_hidden_layers"], hf_config.get("max_window_layers", hf_config["num_hidden_layers"])
        if mwl < n_layers and hf_config.get("sliding_window"):
            sliding = int(hf_config["sliding_window"])
    qkv_bias = mt == "qwen2" or bool(hf_config.get("attention_bias", False))
    known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
             "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
             "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "layer_types",
             "max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
             "architectures", "torch_dtype", "dtype", "transformers_version"}
    return ModelConfig(
        model_type=mt,
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        head_dim=hf_config.get("head_dim") or 0,
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=mt != "qwen2" and bool(hf_config.get("attention_bias", False)),
        mlp_bias=bool(hf_config.get("mlp_bias", False)),
        sliding_window=sliding,
        bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=hf_config.get("eos_token_id"),
        pad_token_id=hf_config.get("pad_token_id"),
        extra={k: v for k, v in hf_config.items() if k not in known},
    )

def read_config(path: str | Path) -> ModelConfig:
    """config.json of a model directory (or the file itself); ftcore.source.read_config also reads
    a GGUF file's."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: not found")
    try:
        hf_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(hf_config).__name__}")
    return config_from_hf(hf_config, where=str(path))


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for cfg (HF fields kept in cfg.extra round-trip)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    hf: dict[str, Any] = dict(cfg.extra)
    hf.update(
        architectures=[arch[cfg.model_type]], model_type=cfg.model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if cfg.model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return hf


# ------------------------------------------------------------------------------------------------
# tensor names

# HF name <-> our name; {i} is a layer index, {p} weight or bias
_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "layers.{i}.attn.wq.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "layers.{i}.attn.wk.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "layers.{i}.attn.wv.{p}"),
    ("model.layers.{i}.self_attn.o_proj.{p}", "layers.{i}.attn.wo.{p}"),
    ("model.layers.{i}.mlp.gate_proj.{p}", "layers.{i}.mlp.w_gate.{p}"),
    ("model.layers.{i}.mlp.up_proj.{p}", "layers.{i}.mlp.w_up.{p}"),
    ("model.layers.{i}.mlp.down_proj.{p}", "layers.{i}.mlp.w_down.{p}"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
]


def name_pattern(template: str) -> re.Pattern:
    """A name template ({i} a layer index, {p} weight or bias) as a regex (also for ftcore/gguf's names)."""
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx)


_HF_TO_OURS = [(name_pattern(hf), ours) for hf, ours in _NAMES]
_OURS_TO_HF = [(name_pattern(ours), hf) for hf, ours in _NAMES]
# tensors some checkpoints carry that are derived, not learned
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def map_name(name: str, table) -> str | None:
    for pat, template in table:
        m = pat.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


def hf_to_ours(name: str) -> str | None:
    return map_name(name, _HF_TO_OURS)


def ours_to_hf(name: str) -> str:
    hf = map_name(name, _OURS_TO_HF)
    if hf is None:
        raise KeyError(name)
    return hf
