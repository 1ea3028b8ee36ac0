"""Files written whole or not at all: a reader (or a run killed mid-write) sees the old file or the
new one, never half of one."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to path.tmp, then renames it over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
