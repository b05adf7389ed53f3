"""The run directory: the contract other tools (the report, the sweep) read.

runs/<run-id>/config.yaml  env.json  curve.jsonl  summary.json  checkpoints/  final/
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from attack.config import AttackConfig, dump_yaml
from attack.errors import UserError


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_curve(path: Path) -> list[dict]:
    """Curve rows; a torn last line (a crash mid-write) is ignored."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.curve = self.path / "curve.jsonl"
        self.summary_path = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"

    @property
    def summary(self) -> dict | None:
        return read_json(self.summary_path)

    def prepare(self, cfg: AttackConfig, resume: bool) -> str | None:
        """Create (or, when resuming, reopen) the run directory.

        Returns the checkpoint to resume from, or None for a fresh start. Refuses to touch a
        directory that already holds a run unless resuming, so nothing written is clobbered.
        """
        summary = self.summary
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            state = (summary or {}).get("status", "unknown")
            raise UserError(
                f"run directory {self.path} already exists (status: {state}); "
                "pass --resume to continue it, or --run-id/--output for a new run"
            )
        if resume and summary and summary.get("status") == "done":
            raise UserError(f"run {self.path} already finished; nothing to resume")
        checkpoint = self.last_checkpoint() if resume else None
        self.path.mkdir(parents=True, exist_ok=True)
        if resume and (self.path / "config.yaml").exists():
            saved = (self.path / "config.yaml").read_text()
            if saved != dump_yaml(cfg) and _identity_changed(saved, cfg):
                raise UserError(
                    f"--resume with a different config than {self.path}/config.yaml; "
                    "resume with the same settings or start a new run"
                )
        write_atomic(self.path / "config.yaml", dump_yaml(cfg))
        write_atomic(self.path / "env.json", json.dumps(environment(), indent=2))
        # The resumed trajectory restarts at the checkpoint: points recorded after it
        # (before the interruption) are dropped, so the curve has each step exactly once.
        keep_until = _checkpoint_step(checkpoint) if checkpoint else -1
        rows = [r for r in read_curve(self.curve) if r["step"] <= keep_until]
        write_atomic(self.curve, "".join(json.dumps(r) + "\n" for r in rows))
        self.write_summary(status="running", resumed_from=checkpoint)
        return checkpoint

    def last_checkpoint(self) -> str | None:
        if not self.checkpoints.is_dir():
            return None
        ckpts = [p for p in self.checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        if not ckpts:
            return None
        return str(max(ckpts, key=_checkpoint_step))

    def write_summary(self, **fields) -> None:
        summary = self.summary or {}
        summary.update(fields)
        write_atomic(self.summary_path, json.dumps(summary, indent=2))

    def wall_so_far(self) -> float:
        rows = read_curve(self.curve)
        return max((r.get("wall_s") or 0.0 for r in rows), default=0.0)


def _checkpoint_step(path) -> int:
    return int(str(path).rsplit("-", 1)[-1])


def _identity_changed(saved_yaml: str, cfg: AttackConfig) -> bool:
    import yaml

    from attack.config import build, identity

    try:
        saved = build(AttackConfig, yaml.safe_load(saved_yaml))
    except UserError:
        return True
    return identity(saved) != identity(cfg)


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
