"""`ftcore export` and `ftcore import-gguf`: a model from any source a run knows (a training
checkpoint written by N ranks, an HF directory such as a run's final/, a GGUF file) to an HF
directory or a GGUF file, on one process, one tensor at a time. The model is built on the meta
device (names and shapes only); each tensor is read from the source when the writer needs it, so
the peak is one safetensors file's tensors (an HF target) or one tensor (a GGUF target), never the
model twice."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ftcore.checkpoint import _dcp, verify_checkpoint
from ftcore.config import Config, ConfigError, load_config
from ftcore.files import publish_dir, staging_dir, staging_path
from ftcore.gguf import is_gguf, write_gguf
from ftcore.model import ModelConfig, Transformer
from ftcore.parallel import Process, barrier
from ftcore.source import checkpoint_dtype, load_tokenizer, read_config
from ftcore.weights import DEFAULT_MAX_SHARD_BYTES, checkpoint_tensors, save_pretrained


def _run_config(run_dir: Path) -> Config | None:
    cfg_path = run_dir / "config.toml"
    return load_config(cfg_path) if cfg_path.is_file() else None


def base_dir_of_run(run_dir: Path) -> Path:
    cfg = _run_config(run_dir)
    if cfg is None:
        raise ConfigError(f"{run_dir / 'config.toml'}: not found; pass --base")
    return Path(cfg.model.path) if cfg.model.path else run_dir / "base"


@dataclass
class Source:
    model: Transformer                           # on the meta device: the architecture only
    shapes: dict[str, torch.Tensor]              # {our name: meta tensor} (a tied lm_head is embed)
    fetch: Callable[[str], torch.Tensor]         # the full tensor of a name, read now
    tokenizer: object | None
    max_shard_bytes: int


def _meta_model(cfg: ModelConfig) -> tuple[Transformer, dict]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return model, model.state_dict()


def _checkpoint_source(ckpt: Path, base: str | None) -> Source:
    if (problem := verify_checkpoint(ckpt)) is not None:
        raise ConfigError(f"{ckpt}: damaged checkpoint: {problem}")
    base_dir = Path(base) if base else base_dir_of_run(ckpt.parent.parent)
    run_cfg = _run_config(ckpt.parent.parent)
    model, shapes = _meta_model(read_config(base_dir))
    dcp, _ = _dcp()

    def fetch(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name].shape, dtype=shapes[name].dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process", per tensor
            warnings.simplefilter("ignore", UserWarning)
            # DCP reads this one tensor, resharding whatever the world size of the run was
            dcp.load({"model": {name: t}}, checkpoint_id=str(ckpt), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        return t

    shard_mb = run_cfg.checkpoint.max_shard_mb if run_cfg else Config().checkpoint.max_shard_mb
    return Source(model, shapes, fetch, _tokenizer_of(base_dir), shard_mb * 2**20)


def _tokenizer_of(model_path: Path):
    if is_gguf(model_path) or (model_path / "tokenizer.json").is_file():
        return load_tokenizer(model_path)
    return None


def _model_source(path: Path) -> Source:
    """An HF directory or a GGUF file: every tensor read through checkpoint_tensors, on demand."""
    cfg = read_config(path)
    model, shapes = _meta_model(cfg)
    dtype = checkpoint_dtype(path)
    readers = dict(checkpoint_tensors(path, cfg, dict(model.named_parameters())))  # every tensor checked first

    def fetch(name: str) -> torch.Tensor:
        return readers[name](0, shapes[name].shape[0] if shapes[name].ndim else 1).to(dtype)

    return Source(model, {n: t.to(dtype) for n, t in shapes.items()}, fetch, _tokenizer_of(path),
                  DEFAULT_MAX_SHARD_BYTES)


def open_source(src: str, base: str | None = None) -> Source:
    path = Path(src)
    if (path / "trainer_state.pt").is_file():
        return _checkpoint_source(path, base)
    if is_gguf(path) and path.is_file() or (path / "config.json").is_file():
        return _model_source(path)
    raise ConfigError(f"{src}: not a training checkpoint (no trainer_state.pt), an HF directory (no config.json) "
                      "or a .gguf file")


def export(src: str, out: str, base: str | None = None, gguf_type: str | None = None,
           progress: bool = True) -> Path:
    """`ftcore export SRC --out OUT`: OUT ending in .gguf is a GGUF file of `gguf_type` (default
    f16), anything else an HF directory."""
    source = open_source(src, base)
    if is_gguf(out):
        return write_gguf(out, source.model.config, source.tokenizer,
                          {n: tuple(t.shape) for n, t in source.shapes.items()}, source.fetch,
                          gguf_type or "f16", progress=progress)
    if gguf_type:
        raise ConfigError(f"--gguf-type {gguf_type} needs --out FILE.gguf (got {out})")
    save_pretrained(source.model, Path(out), tokenizer=source.tokenizer, state_dict=source.shapes,
                    fetch=source.fetch, max_shard_bytes=source.max_shard_bytes)
    return Path(out)


def export_checkpoint(checkpoint: str, out: str, base: str | None = None) -> Path:
    """A training checkpoint as an HF directory (kept for scripts that call it by this name)."""
    if not (Path(checkpoint) / "trainer_state.pt").is_file():
        raise ConfigError(f"{checkpoint}: not a complete training checkpoint (no trainer_state.pt)")
    return export(checkpoint, out, base)


def export_hf(model, path: Path, proc: Process, tokenizer=None, max_shard_bytes: int | None = None) -> None:
    """Write an HF directory (tokenizer included) from a model that may be sharded: one tensor at a
    time is gathered (every rank takes part) and rank 0 writes it straight into its safetensors
    file, so rank 0 holds at most one gathered tensor beyond its own shards."""
    state = model.state_dict()  # under FSDP2: DTensors, this rank's shards; nothing is gathered yet

    @torch.no_grad()
    def fetch(name):
        t = state[name]
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor: a collective, every rank, same order
        return t if proc.is_main else None

    tmp = staging_dir(path) if proc.is_main else staging_path(path)
    save_pretrained(model, tmp, tokenizer=tokenizer, state_dict=state, fetch=fetch, write=proc.is_main,
                    max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    if proc.is_main:
        publish_dir(tmp, path)
    barrier(proc)
