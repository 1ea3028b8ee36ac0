"""Resumable training state with torch.distributed.checkpoint (works sharded), written atomically.

RUN_DIR/checkpoints/step_XXXXXXXX/ holds the model and optimizer (DCP, one file per rank),
trainer_state.pt (step, scheduler, data position) and rng_rank{R}.pt. A checkpoint is written under
a `.tmp` name and renamed when every rank has finished, so a process killed mid-save leaves a
directory that resume never picks up.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ftcore.parallel import Dist, barrier

_STEP_DIR = re.compile(r"step_(\d{8})")
# crash tests widen the window in which a checkpoint is half-written, to kill a run inside it
_TEST_SAVE_DELAY_S = float(os.environ.get("FTCORE_TEST_SAVE_DELAY_S", "0"))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: a step_XXXXXXXX directory (never a .tmp one) with its
    trainer state present."""
    if not ckpt_root.is_dir():
        return None
    done = [p for p in ckpt_root.iterdir()
            if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.pt").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict, d: Dist, keep: int) -> Path:
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    if d.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if _TEST_SAVE_DELAY_S:
        time.sleep(_TEST_SAVE_DELAY_S)
    barrier(d)
    if d.is_main:
        torch.save(trainer_state, tmp / "trainer_state.pt")
        if final.exists():  # a checkpoint of this step from a run that was resumed before it
            _remove(final)
        os.replace(tmp, final)
        _prune(ckpt_root, keep)
    barrier(d)
    return final


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_rank{d.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)


def cleanup_partial(ckpt_root: Path) -> None:
    """Remove what a killed save or prune left behind (rank 0 only, before training)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.endswith(".tmp") or p.name.endswith(".trash"):
                shutil.rmtree(p, ignore_errors=True)


def _remove(path: Path) -> None:
    # rename first: a prune killed half-way must not leave a step_ directory that looks complete
    trash = path.with_name(path.name + ".trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in ckpt_root.iterdir() if _STEP_DIR.fullmatch(p.name))
    for p in done[:-keep]:
        _remove(p)


def export_hf(model, path: Path, d: Dist, tokenizer=None) -> None:
    """Gather the full weights on rank 0 and write an HF directory (tokenizer included)."""
    from ftcore.weights import save_pretrained

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_pretrained(model, tmp, tokenizer=tokenizer, state_dict=full)
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    barrier(d)
