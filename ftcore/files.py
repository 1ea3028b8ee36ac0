"""Files written whole or not at all: a reader (or a run killed mid-write) sees the old file or the
new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def staging_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: path.tmp beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields path.tmp to write to (by any writer: safetensors, tokenizers); renames it over
    `path` (atomic on POSIX) once the block ends without an error."""
    tmp = staging_path(path)
    yield tmp
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# Directories (a checkpoint, an exported model) are written under DIR.tmp and renamed over DIR when
# complete; an existing DIR is renamed to DIR.trash before it is deleted, so that a run killed
# half-way never leaves a DIR that looks complete but is not.

def staging_dir(path: Path, create: bool = False) -> Path:
    """path.tmp, emptied of whatever a killed run left there (and made, with create)."""
    tmp = staging_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    if create:
        tmp.mkdir(parents=True)
    return tmp


def remove_dir(path: Path) -> None:
    trash = path.with_name(path.name + ".trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename the finished tmp over path, replacing an older path."""
    if path.exists():
        remove_dir(path)
    os.replace(tmp, path)
