"""Small files written whole: atomically, so a reader never sees half of one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from eval_callbacks.files import write_whole


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file (named for this process) and rename, so readers never see a
    half-written file and a failed write (a full disk) leaves nothing behind."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def save_array_atomic(path: Path, array) -> None:
    """np.save, written whole or not at all (as write_atomic)."""
    import numpy as np

    _atomic(Path(path), lambda f: np.save(f, array))


def _atomic(path: Path, write) -> None:
    write_whole(path, write, make_parent=False)  # the evaluator's own way, into folders that exist


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_files(path: Path) -> list:
    """A local model's files by name, size and modification time: what tells a model rebuilt in
    place from the one a run measured (a hub model's revision is in its config); [] for a hub id."""
    path = Path(path)
    if path.is_file():
        return [[path.name, path.stat().st_size, path.stat().st_mtime_ns]]
    if path.is_dir():
        return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                for f in sorted(path.rglob("*")) if f.is_file()]
    return []
