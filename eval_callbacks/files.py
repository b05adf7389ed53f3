"""Files written whole: under a temporary name (this process's), synced and renamed, so a reader
(another cell, a resumed run) never sees half of one and a failed write leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_whole(path: Path, write: Callable[[BinaryIO], None], make_parent: bool = True) -> None:
    """`write(f)` into a temporary file beside `path`, then rename it to `path`. `make_parent`:
    create the folder it goes into (false: a missing folder is an error, not made up)."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
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
