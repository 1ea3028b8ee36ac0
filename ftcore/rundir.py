"""The run directory's rules: one run at a time, a fresh run never mixes with an old one, and
config.toml says what ran.

- `RunLock`: RUN_DIR/.lock held with flock(2) for the life of the run (rank 0). A second run in the
  same directory stops with one line naming the holder. The kernel drops the lock when its process
  dies, so the file a killed run leaves behind is simply taken over by the next run.
- `check_fresh_start`: train.resume=never in a directory that holds checkpoints is refused (a
  fresh run's checkpoints would be pruned in favour of the old run's higher steps, and a later
  resume would continue the old run).
- `MetricsLog`: metrics.jsonl, which a resume trims back to the checkpoint's step.
- `check_resume_config`: resuming may change only what does not change the run's trajectory
  (RESUMABLE_CHANGES: evaluation, logging, checkpointing, and how the same step is computed);
  any other difference from the recorded config.toml is refused, naming the keys. Accepted
  changes are printed, and config.toml is rewritten with them once the run is under way. A
  train.loss or train.precision of "auto" takes the value the run recorded when it began.
- `inputs_record` / `changed_input`: what a cached artefact of the run (the pretrained base/ with
  its tokenizer, the base model's evaluation eval_base.json) was made from: the config keys it
  depends on and the data file's SHA-256. It is reused only when they match; base/ that does not
  is refused with the key that differs (`check_cached_base`), the base evaluation is run again.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from ftcore.config import Config, ConfigError, load_config
from ftcore.files import write_atomic

LOCK = ".lock"
# keys whose change on resume keeps every step's examples, learning rate and maths
RESUMABLE_CHANGES = ("run.dir", "train.resume", "train.max_skipped_steps", "train.device", "train.plugins",
                     "train.activation_checkpointing", "train.compile", "train.kernels", "train.loss",
                     "train.fsdp", "train.reshard_after_forward", "train.micro_batch_size",
                     "eval.", "log.", "checkpoint.")


class RunLock:
    """flock on RUN_DIR/.lock; the file holds the holder's pid, host and start time."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace")
            os.close(self.fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (json.JSONDecodeError, KeyError, TypeError):
                who = "another process"
            raise ConfigError(f"run.dir {run_dir} is in use by another ftcore run ({who}); "
                              "wait for it to finish or choose another run.dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, harmless
            self.fd = None


def check_fresh_start(run_dir: Path, steps: list[Path]) -> None:
    """steps: the run directory's checkpoints, newest first."""
    if steps:
        raise ConfigError(f"train.resume=never, but {run_dir / 'checkpoints'} holds {len(steps)} checkpoint(s) of an "
                          f"earlier run (newest {steps[0].name}): continue it with train.resume=auto, or start "
                          "elsewhere with a new run.dir (or move that directory aside)")


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, patterns) -> bool:
    """key is one of patterns, or lies in a section named by a pattern ending in '.'."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    """{key: (old value, new value)} of every key that differs."""
    a, b = _flat(old), _flat(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def check_resume_config(run_dir: Path, cfg: Config, report=print) -> None:
    """Refuses a resume whose config differs from the recorded one in a key outside
    RESUMABLE_CHANGES; reports the accepted changes. Sets an "auto" train.loss / train.precision
    in cfg to the recorded choice."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return
    try:
        recorded = load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{path} (the config of the run being resumed) is not readable: {e}") from None
    for key in ("loss", "precision"):  # "auto" was resolved when the run began: keep that choice
        if getattr(cfg.train, key) == "auto":
            setattr(cfg.train, key, getattr(recorded.train, key))
    changes = config_changes(recorded, cfg)
    refused = [k for k in changes if not _matches(k, RESUMABLE_CHANGES)]
    if refused:
        what = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ConfigError(f"cannot resume the run in {run_dir} with a changed {what}: the steps already taken "
                          f"followed {path.name}; resume with its values, or start a new run.dir")
    for k, (a, b) in changes.items():
        if k not in ("run.dir", "train.resume"):
            report(f"resuming with {k} changed: {a!r} -> {b!r}")


# ------------------------------------------------------------------------------------------------
# cached artefacts: reused only when made from the same inputs

# what the pretrained base (and its tokenizer) depends on: the training split's raw text, the
# model's shape and its pretraining (train.precision: pretraining computes in it; train.loss is left
# out, as on resume: another loss implementation computes the same maths)
BASE_INPUTS = ("run.seed", "pretrain.", "data.path", "data.format", "data.max_records", "data.rename", "data.clean",
               "data.dedupe", "data.split", "data.synthetic.", "data.max_seq_len", "train.precision")
# what the base model's evaluation depends on, beside the base itself: the test examples (every
# data key renders or selects them), how they are scored, and the dtype the base is loaded in
BASE_EVAL_INPUTS = ("run.seed", "model.", "data.", "eval.base", "eval.max_examples", "eval.max_heldout_examples",
                    "eval.shots", "eval.heldout", "eval.max_new_tokens", "eval.batch_size")
INPUTS_FILE = "ftcore_inputs.json"  # in base/


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# keys that may name files whose content is an input (the data; a template file, `FILE.yaml#NAME`)
_FILE_KEYS = ("data.path", "data.templates", "data.chat_template")


def _named_files(value) -> list[str]:
    names = list(value) if isinstance(value, (list, dict)) else [value]
    return [n.split("#", 1)[0] for n in names if isinstance(n, str) and n and Path(n.split("#", 1)[0]).is_file()]


def inputs_record(cfg: Config, keys: tuple[str, ...]) -> dict:
    """{key: value} of the config keys matching `keys`, plus the SHA-256 of each file such a key
    names (data.path, a template file: the same path may hold other content next time); JSON
    values, sorted by key."""
    rec = {k: v for k, v in _flat(cfg).items() if _matches(k, keys)}
    for key in _FILE_KEYS:
        for name in _named_files(rec.get(key)):
            rec[f"{key} sha256 {name}" if key != "data.path" else "data.path sha256"] = file_sha256(name)
    return json.loads(json.dumps(dict(sorted(rec.items()))))


def changed_input(recorded: dict, wanted: dict) -> str | None:
    """'key recorded -> wanted' of the first input that differs, or None when they match."""
    for k in sorted(set(recorded) | set(wanted)):
        if recorded.get(k) != wanted.get(k):
            return f"{k} {recorded.get(k, '(not recorded)')!r} -> {wanted.get(k, '(not recorded)')!r}"
    return None


def check_cached_base(run_dir: Path, inputs: dict) -> bool:
    """Whether RUN_DIR/base/ (the pretrained base model and tokenizer) can be reused: True when it
    was made from `inputs` (this run's inputs_record of BASE_INPUTS), False when there is none; a base made from other
    inputs (another run.seed, other data or pretraining) is refused with the key that differs, so
    that one run directory never evaluates or fine-tunes another run's base."""
    base = run_dir / "base"
    if not (base / "config.json").is_file():
        return False
    path = base / INPUTS_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{base} holds a base model with no readable record of what it was pretrained from "
                          f"({path.name}): move it aside (ftcore pretrains a new one) or choose another run.dir") from None
    if (changed := changed_input(recorded, inputs)) is not None:
        raise ConfigError(f"{base} was pretrained by a run with other inputs ({changed}); reusing it would "
                          f"evaluate and fine-tune that run's base: choose another run.dir, or move {base} aside "
                          "to pretrain a new one")
    return True


# ------------------------------------------------------------------------------------------------
# metrics.jsonl

class MetricsLog:
    """One JSON object per line, rank 0 only. On resume, a torn last line and the records of steps
    after the checkpoint are dropped before appending."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn write of a killed run
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
            write_atomic(path, "".join(l + "\n" for l in kept))
        elif enabled and resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
