"""A training checkpoint (DCP, possibly written by N ranks) as an HF directory, on one process."""
from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp

from ftcore.config import ConfigError, load_config
from ftcore.model import Transformer
from ftcore.weights import save_pretrained


def base_dir_of_run(run_dir: Path) -> Path:
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found; pass --base")
    cfg = load_config(cfg_path)
    return Path(cfg.model.path) if cfg.model.path else run_dir / "base"


def export_checkpoint(checkpoint: str, out: str, base: str | None = None) -> Path:
    from ftcore.checkpoint import verify_checkpoint
    ckpt = Path(checkpoint)
    if not (ckpt / "trainer_state.pt").is_file():
        raise ConfigError(f"{ckpt}: not a complete training checkpoint (no trainer_state.pt)")
    if (problem := verify_checkpoint(ckpt)) is not None:
        raise ConfigError(f"{ckpt}: damaged checkpoint: {problem}")
    base_dir = Path(base) if base else base_dir_of_run(ckpt.parent.parent)
    model = Transformer.from_pretrained(base_dir)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))  # DCP reshards whatever the world size was
    model.load_state_dict(state["model"])
    tokenizer = None
    if (base_dir / "tokenizer.json").is_file():
        from ftcore.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(base_dir)
    save_pretrained(model, Path(out), tokenizer=tokenizer)
    return Path(out)
