"""Resumable training state with torch.distributed.checkpoint (works sharded), written atomically.

RUN_DIR/checkpoints/step_XXXXXXXX/ holds the model and optimizer (DCP, one file per rank),
trainer_state.pt (step, scheduler, data position), rng_rank{R}.pt and, written last, manifest.json:
the size and SHA-256 of every other file. A checkpoint is written under a `.tmp` name and renamed
when every rank has finished, so a process killed mid-save leaves a directory that resume never
picks up; a checkpoint damaged later (a truncated or altered file) fails its manifest, and resume
says so in one line and takes the newest intact one. A save that fails (a full disk) removes its
partial directory and ends the run with one line; the earlier checkpoints are untouched.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch

from ftcore.files import publish_dir, remove_dir, staging_dir, staging_path, write_atomic
from ftcore.parallel import Process, any_rank, barrier

_STEP_DIR = re.compile(r"step_(\d{8})")
MANIFEST = "manifest.json"


def _dcp():
    """torch.distributed.checkpoint and its state-dict helpers, imported when a checkpoint is saved
    or loaded: the import takes ~0.7 s, which every `ftcore` command that never touches one
    (preview, a config error, a run without checkpoints) would otherwise pay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    return dcp, (get_state_dict, set_state_dict)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read: the message names the file."""


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# files up to this size get a checksum too; larger ones (the shards of a big model) only their
# size, which catches the common damage (a truncated copy, a full disk) without reading gigabytes
_CHECKSUM_MAX_BYTES = 64 * 2**20


def write_manifest(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            files[p.name] = {"bytes": size, **({"sha256": _sha256(p)} if size <= _CHECKSUM_MAX_BYTES else {})}
    write_atomic(ckpt / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file the manifest lists is there with its size (and checksum, for the small
    ones), else what is wrong, naming the file."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{ckpt / MANIFEST} is missing"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{ckpt / MANIFEST} is not a valid manifest"
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} is {size} bytes, the manifest says {want['bytes']}"
        if "sha256" in want and _sha256(path) != want["sha256"]:
            return f"{path} does not match its checksum"
    return None


def checkpoints(ckpt_root: Path) -> list[Path]:
    """The step_XXXXXXXX directories (never a .tmp one), newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()),
                  key=lambda p: p.name, reverse=True)


def latest_checkpoint(ckpt_root: Path, report=print) -> Path | None:
    """The newest intact checkpoint. A newer one that fails verification is skipped, with one line
    through `report` naming what is wrong."""
    for ckpt in checkpoints(ckpt_root):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        report(f"skipping checkpoint {ckpt.name}: {problem}")
    return None


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict, proc: Process, keep: int) -> Path:
    final = ckpt_root / f"step_{step:08d}"
    tmp = staging_path(final)
    if proc.is_main:
        staging_dir(final, create=True)
    barrier(proc)

    def agreed(step_of_save):
        """Runs this rank's part of the save; then every rank learns whether any rank's part failed
        (a rank that only raised would leave the others waiting at the next barrier)."""
        error = None
        try:
            step_of_save()
        except (OSError, RuntimeError) as e:  # a full disk: torch.save says "unexpected pos ..."
            error = e
        if any_rank(error is not None, proc):
            if proc.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(ckpt_root).free
            why = _first_line(error) if error is not None else "it failed on another rank"
            raise CheckpointError(f"saving checkpoint {final.name} in {ckpt_root} failed ({why}; "
                                  f"{free / 2**20:.0f} MiB free); the earlier checkpoints are intact")

    def every_rank():
        dcp, (get_state_dict, _) = _dcp()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{proc.rank}.pt")

    def main_rank():
        if proc.is_main:
            torch.save(trainer_state, tmp / "trainer_state.pt")
            write_manifest(tmp)
            publish_dir(tmp, final)  # over a checkpoint of this step from a run resumed before it
            _prune(ckpt_root, keep)

    agreed(every_rank)
    agreed(main_rank)
    return final


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_checkpoint(path: Path, model, optimizer, proc: Process) -> dict:
    dcp, (get_state_dict, set_state_dict) = _dcp()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # passed its manifest, yet unreadable: a checkpoint of another model
        raise CheckpointError(f"{path}: cannot load the model and optimizer ({_first_line(e)}); a checkpoint "
                              "of another model or run? Use a new run.dir, or train.resume=never in an empty one") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_rank{proc.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)


def cleanup_partial(ckpt_root: Path) -> None:
    """Remove what a killed save or prune left behind (rank 0 only, before training)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.endswith(".tmp") or p.name.endswith(".trash"):
                shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in ckpt_root.iterdir() if _STEP_DIR.fullmatch(p.name))
    for p in done[:-keep]:
        remove_dir(p)
