"""Hugging Face safetensors in and out: name mapping, sharded index, tied embeddings.

Loading builds the model on the meta device and materialises each parameter straight from the
file in its target dtype and device, so peak memory stays near one copy of the model.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ftcore.files import atomic_path, write_atomic
from ftcore.hf import IGNORED_TENSORS, config_to_hf, hf_to_ours, ours_to_hf, read_config  # noqa: F401 (name mapping re-exported)
from ftcore.model import ModelConfig, Transformer

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class WeightsError(ValueError):
    """A checkpoint that does not match the model: names the tensor and the file."""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _dtype_from_config(path: Path) -> torch.dtype:
    d = json.loads((path / "config.json").read_text())
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def load_pretrained(cls=Transformer, path=".", dtype=None, device=None, loss: str = "torch",
                    kernels: dict[str, str] | None = None) -> Transformer:
    path = Path(path)
    cfg = read_config(path)
    dtype = dtype or _dtype_from_config(path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg, loss=loss, kernels=kernels)
    expected = {n: p for n, p in model.named_parameters()}  # tied lm_head appears once, as embed
    loaded: set[str] = set()
    for file in _weight_files(path):
        if not file.is_file():
            raise WeightsError(f"{file}: listed in the index but missing")
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
        with f:
            for hf_name in f.keys():
                if IGNORED_TENSORS.match(hf_name):
                    continue
                name = hf_to_ours(hf_name)
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                if name is None or name not in expected:
                    raise WeightsError(f"{file}: unexpected tensor {hf_name!r}")
                target = expected[name]
                shape = tuple(f.get_slice(hf_name).get_shape())
                if shape != tuple(target.shape):
                    raise WeightsError(f"{file}: tensor {hf_name!r} has shape {list(shape)}, "
                                       f"expected {list(target.shape)}")
                try:
                    t = f.get_tensor(hf_name)
                except Exception as e:
                    raise WeightsError(f"{file}: tensor {hf_name!r} cannot be read ({e}); truncated file?") from None
                _set_param(model, name, t.to(device=device, dtype=dtype))
                del t
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise WeightsError(f"{path}: missing tensor {ours_to_hf(missing[0])!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_buffers(device)
    return model


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value, requires_grad=getattr(mod, attr).requires_grad))


def _readable(path: Path) -> None:
    """safetensors creates its files 0600; an export is readable like any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(model: Transformer, path, tokenizer=None, state_dict: dict | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json, generation_config.json and safetensors (sharded with an index above
    max_shard_bytes) that transformers loads. `state_dict`: a full (gathered) state dict in our
    names, for models that are sharded in memory; default: model.state_dict()."""
    cfg: ModelConfig = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach()
        t = t.to(dtype) if dtype is not None else t
        tensors[ours_to_hf(name)] = t.to("cpu").contiguous()
    out_dtype = next(iter(tensors.values())).dtype

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, fname in zip(shards, names):
        with atomic_path(path / fname) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
            _readable(tmp)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for shard, f in zip(shards, names) for n in shard}}
        write_atomic(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    elif (path / "model.safetensors.index.json").exists():
        (path / "model.safetensors.index.json").unlink()
    # weights of an earlier save into this directory are stale: transformers prefers a
    # model.safetensors over an index, so a leftover single file would shadow new shards
    for old in path.glob("model*.safetensors"):
        if old.name not in names and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old.name):
            old.unlink()

    hf = config_to_hf(cfg, out_dtype)
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    write_atomic(path / "config.json", json.dumps(hf, indent=2))
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    if tokenizer is not None and len(getattr(tokenizer, "eos_ids", [])) > 1:
        gen["eos_token_id"] = list(tokenizer.eos_ids)
    write_atomic(path / "generation_config.json", json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
