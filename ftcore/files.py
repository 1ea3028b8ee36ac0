"""Files written whole or not at all: a reader (or a run killed mid-write) sees the old file or the
new one, never half of one."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields path.tmp to write to (by any writer: safetensors, tokenizers); renames it over
    `path` (atomic on POSIX) once the block ends without an error."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
