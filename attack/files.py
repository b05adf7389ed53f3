"""Small files written whole: atomically, so a reader never sees half of one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file (named for this process) and rename, so readers never see a
    half-written file and a failed write (a full disk) leaves nothing behind."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def save_array_atomic(path: Path, array) -> None:
    """np.save, written whole or not at all (as write_atomic)."""
    import numpy as np

    _atomic(Path(path), lambda f: np.save(f, array))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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
