"""The run directory: the contract other tools (the report, the sweep) read. Its file names and
fields are the types below; writers and readers both use them.

    runs/<run-id>/config.yaml  env.json  curve.jsonl  tasks.json  cell.json  summary.json
                  checkpoints/  final/

The step axis. `step` counts the attack's optimizer steps, so curves of different kinds share
one x axis. Step 0 is always the unmodified model under test, evaluated before the attack
changes anything: it is the pre-attack score that recovery is measured from, for every kind.
A kind that spends no optimizer steps (directional ablation) puts its edited model at step 1
with tokens_seen 0 (one edit, no training data); a fine-tuning attack that starts from the
edited model continues from there, so its steps count from 1 as well.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import TypedDict

import torch

from attack.config import AttackConfig, dump_yaml
from attack.errors import UserError
from eval_callbacks.callback import CurveRow

__all__ = ["CellMeta", "CurveRow", "RunDir", "Status", "Summary", "read_curve", "read_json", "write_atomic"]


class Status(StrEnum):
    """summary.json's `status`, and the two states a sweep cell has before it has one."""

    PENDING = "pending"  # no run directory yet
    PARTIAL = "partial"  # a run directory without summary.json (killed while opening it)
    RUNNING = "running"  # started; a process may still be at work, or was killed (resumable)
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM; resumable


class CellMeta(TypedDict):
    """cell.json: where a run sits in a sweep."""

    cell_id: str
    sweep: str
    model: str  # the model's label in the sweep
    role: str  # filtered | unfiltered | unlearned | reference | other
    revision: str | None
    attack: str  # the attack setting's label
    kind: str  # the attack family: finetune, ...
    seed: int


class Summary(TypedDict, total=False):
    """summary.json: status, then what the run did. Written at the start (status, resumed_from),
    on failure (error, traceback) and at the end (the rest)."""

    status: Status
    error: str
    traceback: str
    resumed_from: str | None
    kind: str
    steps: int
    max_steps: int
    tokens_seen: int
    tokens_per_step: int
    processes: int
    micro_batch_size: int
    gradient_checkpointing: bool
    train_rows: int
    rows_trained: int
    distinct_rows_trained: int
    distinct_tokens_trained: int
    documents_seen: int
    documents: int
    corpus: str
    eval_steps: list[int]
    eval_s: float
    train_s: float
    wall_s: float
    final_train_loss: float | None
    published_checks: list[dict]
    warnings: list[str]


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
        self.tasks_path = self.path / "tasks.json"
        self.cell_path = self.path / "cell.json"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"

    @property
    def summary(self) -> Summary | None:
        return read_json(self.summary_path)

    @property
    def cell(self) -> CellMeta | None:
        return read_json(self.cell_path)

    @property
    def status(self) -> Status:
        if not self.path.exists():
            return Status.PENDING
        try:
            return Status((self.summary or {}).get("status", Status.PARTIAL))
        except ValueError:  # a summary.json from elsewhere; treat like one never finished
            return Status.PARTIAL

    def open(self, cfg: AttackConfig, tasks: dict, cell: CellMeta | None = None) -> str | None:
        """Create the run directory (or, with output.resume, reopen it) and write what the run
        is: config, environment, tasks, sweep cell. Recipes call this only after every check of
        the user's input passed, so a refused start leaves nothing behind.

        Returns the checkpoint to resume from, or None for a fresh start."""
        checkpoint = self._prepare(cfg, cfg.output.resume)
        write_atomic(self.tasks_path, json.dumps(tasks, indent=2))
        if cell is not None:
            self.write_cell(cell)
        return checkpoint

    def write_cell(self, cell: CellMeta) -> None:
        write_atomic(self.cell_path, json.dumps(cell, indent=2))

    def _prepare(self, cfg: AttackConfig, resume: bool) -> str | None:
        """Refuses to touch a directory that already holds a run unless resuming, so nothing
        written is clobbered."""
        summary = self.summary
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            state = (summary or {}).get("status", Status.PARTIAL)
            raise UserError(
                f"run directory {self.path} already exists (status: {state}); "
                "pass --resume to continue it, or --run-id/--output for a new run"
            )
        if resume and summary and summary.get("status") == Status.DONE:
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
        self.write_summary(status=Status.RUNNING, kind=cfg.kind, resumed_from=checkpoint)
        return checkpoint

    def last_checkpoint(self) -> str | None:
        if not self.checkpoints.is_dir():
            return None
        ckpts = [p for p in self.checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        if not ckpts:
            return None
        return str(max(ckpts, key=_checkpoint_step))

    def write_summary(self, **fields) -> None:
        """Update summary.json with fields of `Summary` (anything else is a bug, not data)."""
        unknown = set(fields) - set(Summary.__annotations__)
        if unknown:
            raise TypeError(f"not summary.json fields: {sorted(unknown)}; add them to rundir.Summary")
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

    from attack.config import identity, load_config, parse_yaml

    try:
        saved = load_config(parse_yaml(saved_yaml))
    except (UserError, yaml.YAMLError):
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
