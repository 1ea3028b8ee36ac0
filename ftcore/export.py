"""A training checkpoint (DCP, possibly written by N ranks) as an HF directory, on one process,
one tensor at a time: the model is built on the meta device (shapes only), each tensor is read from
the checkpoint when its safetensors file is written, so the peak is one file's tensors, not the
model."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from ftcore.config import Config, ConfigError, load_config
from ftcore.hf import read_config
from ftcore.model import Transformer
from ftcore.weights import save_pretrained


def _run_config(run_dir: Path) -> Config | None:
    cfg_path = run_dir / "config.toml"
    return load_config(cfg_path) if cfg_path.is_file() else None


def base_dir_of_run(run_dir: Path) -> Path:
    cfg = _run_config(run_dir)
    if cfg is None:
        raise ConfigError(f"{run_dir / 'config.toml'}: not found; pass --base")
    return Path(cfg.model.path) if cfg.model.path else run_dir / "base"


def export_checkpoint(checkpoint: str, out: str, base: str | None = None) -> Path:
    from ftcore.checkpoint import verify_checkpoint
    ckpt = Path(checkpoint)
    if not (ckpt / "trainer_state.pt").is_file():
        raise ConfigError(f"{ckpt}: not a complete training checkpoint (no trainer_state.pt)")
    if (problem := verify_checkpoint(ckpt)) is not None:
        raise ConfigError(f"{ckpt}: damaged checkpoint: {problem}")
    base_dir = Path(base) if base else base_dir_of_run(ckpt.parent.parent)
    run_cfg = _run_config(ckpt.parent.parent)
    with torch.device("meta"):
        model = Transformer(read_config(base_dir))
    shapes = model.state_dict()  # meta tensors: names, shapes, dtypes (a tied lm_head is embed)

    def fetch(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name].shape, dtype=shapes[name].dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process", per tensor
            warnings.simplefilter("ignore", UserWarning)
            # DCP reads this one tensor, resharding whatever the world size of the run was
            dcp.load({"model": {name: t}}, checkpoint_id=str(ckpt), planner=DefaultLoadPlanner(allow_partial_load=True))
        return t

    tokenizer = None
    if (base_dir / "tokenizer.json").is_file():
        from ftcore.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(base_dir)
    shard_mb = run_cfg.checkpoint.max_shard_mb if run_cfg else Config().checkpoint.max_shard_mb
    save_pretrained(model, Path(out), tokenizer=tokenizer, state_dict=shapes, fetch=fetch,
                    max_shard_bytes=shard_mb * 2**20)
    return Path(out)
