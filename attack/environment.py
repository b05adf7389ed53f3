"""env.json: the versions and hardware a run ran on, so a curve can be reproduced and compared."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and hardware, so a curve can be reproduced and compared."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "lm_eval": _version("lm_eval"),
        "datasets": _version("datasets"),
        "accelerate": _version("accelerate"),
        "git_sha": sha,
        "device": device,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "platform": platform.platform(),
    }
