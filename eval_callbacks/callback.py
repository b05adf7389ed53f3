"""The TrainerCallback that turns a training run into a recovery curve."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch
from transformers import TrainerCallback

from eval_callbacks.files import write_whole
from eval_callbacks.runner import LiveEvaluator


class CurveRow(TypedDict):
    """One line of curve.jsonl: a score of one task at one evaluation point."""

    step: int  # optimizer steps taken when the model was evaluated
    tokens_seen: int  # training tokens consumed by then (all processes)
    task: str
    metric: str  # lm-eval's metric name (acc, acc_norm, ...) or correct_prob
    value: float
    stderr: float | None
    n: int  # questions scored
    train_loss: float | None  # the training loss the Trainer logged at this very step (None at step 0)
    learning_rate: float | None  # the learning rate logged at this step
    grad_norm: float | None  # the gradient norm logged at this step, where the Trainer records one
    wall_s: float  # seconds since the attack started, across resumes


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class NonFiniteLossError(RuntimeError):
    """Training loss became NaN or infinite."""


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append JSON lines and fsync, so a crash never loses or half-writes a point."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def samples_file(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:07d}.jsonl.gz"


def write_samples(folder: Path, step: int, records: list[dict]) -> None:
    """The per-question records of one evaluation point as one gzipped JSON-lines file, written
    under a temporary name and renamed, so a file that exists is complete."""
    def write(f):
        with gzip.open(f, "wt") as g:
            for r in records:
                g.write(json.dumps({"step": step, **r}, separators=(",", ":")) + "\n")

    write_whole(samples_file(folder, step), write)


def read_samples(folder: Path) -> list[dict]:
    """Every per-question record under `folder` (all evaluation points)."""
    out = []
    for f in sorted(Path(folder).glob("step-*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


@contextlib.contextmanager
def averaged_weights(optimizer):
    """A schedule-free optimizer trains at one point and is meant to be evaluated at another (its
    average): it swaps them in with eval() and back with train(). Other optimizers have no modes."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    switch = callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))
    if switch:
        inner.eval()
    try:
        yield
    finally:
        if switch:
            inner.train()


class RecoveryCurveCallback(TrainerCallback):
    """Evaluates at the scheduled steps (0, every N, last) and appends curve rows.

    Rows: step, tokens_seen, task, metric, value, stderr, n, train_loss, wall_s.
    Only the main process evaluates and writes; the others wait at a barrier.
    """

    def __init__(
        self,
        evaluator: LiveEvaluator,
        schedule: list[int],
        curve_path: str | Path,
        wall_offset_s: float = 0.0,
        log: Callable[[dict], None] | None = None,
        samples_dir: str | Path | None = None,
        step_offset: int = 0,
        pre_attack: str | Path | None = None,
    ):
        self.evaluator = evaluator
        self.schedule = set(schedule)
        self.first, self.last = min(schedule), max(schedule)
        self.curve_path = Path(curve_path)
        self.wall_offset_s = wall_offset_s
        self.log = log  # e.g. Trainer.log, so trackers plot scores against the step
        self.samples_dir = Path(samples_dir) if samples_dir else None
        # Curve step of training step 0: 1 when training starts from an edited model that the
        # curve already holds at step 1 (an ablation), so the steps of both share one axis.
        self.step_offset = step_offset
        # Curve step 0 (the model before the attack) read from, or kept in, this file: the other
        # attacks on the same model score the same numbers there (attack/preattack.py).
        self.pre_attack = Path(pre_attack) if pre_attack else None
        self.step0_reused = False
        self.train_loss = None
        self._pending: list[dict] | None = None  # an evaluated point's rows, waiting for its step's log
        self.eval_seconds = 0.0
        self.point_seconds: list[float] = []  # each point's; the first also builds the requests
        self.last_rows: list[CurveRow] = []  # the latest point's rows, for progress displays
        self._start = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._start = time.perf_counter()
        if state.global_step == 0 and 0 in self.schedule:
            self._evaluate(state, optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step in self.schedule and state.global_step != 0:
            self._evaluate(state, optimizer, defer=True)
            # The Trainer logs after this call: make it log at this step, and write the point's rows
            # then, with the loss, learning rate and gradient norm of this step (not the last log's,
            # which would be an interval stale, or none at all after a resume).
            control.should_log = True
        return control

    def _check_weights_finite(self, step: int) -> None:
        """A diverged attack must not score: its points would be noise, ranked as recovery. The
        loss is logged only every few steps, so look at the trained weights themselves."""
        trained = (p for p in self.evaluator.model.parameters() if p.requires_grad)
        if not all(bool(torch.isfinite(p).all()) for p in trained):
            raise NonFiniteLossError(
                f"the trained weights became NaN or infinite by step {step}; "
                "lower the learning rate or check the model's weights"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss} at step {state.global_step}; "
                "lower the learning rate or check the model's weights"
            )
        self.train_loss = float(loss)
        if self._pending is not None:
            self._write(self._pending, {"train_loss": float(loss), "learning_rate": _number(logs.get("learning_rate")),
                                        "grad_norm": _number(logs.get("grad_norm"))})

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:  # a Trainer that never logged the point's step
            self._write(self._pending, {})

    def _evaluate(self, state, optimizer=None, defer: bool = False) -> None:
        step = state.global_step
        if step != 0:
            self._check_weights_finite(step)
        with averaged_weights(optimizer):
            if state.is_world_process_zero:
                full = step in (self.first, self.last) or self.evaluator.subset is None
                self.record(self.step_offset + step, int(getattr(state, "num_input_tokens_seen", 0) or 0), full,
                            defer=defer)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def record(self, step: int, tokens_seen: int, full: bool = True, defer: bool = False) -> list[CurveRow]:
        """Score the model now and append its rows at curve step `step` (also for attacks that
        evaluate without a Trainer: an ablation's steps 0 and 1). `defer`: the rows wait for the
        Trainer's log of this step (on_log), which gives them its loss."""
        if self._start is None:
            self._start = time.perf_counter()
        start = time.perf_counter()
        rows, records = self._score(step, full)
        self.point_seconds.append(time.perf_counter() - start)
        self.eval_seconds += self.point_seconds[-1]
        wall = self.wall_offset_s + (time.perf_counter() - self._start)
        for row in rows:
            row.update(step=step, tokens_seen=tokens_seen, train_loss=None, learning_rate=None, grad_norm=None,
                       wall_s=round(wall, 3))
        self.last_rows = [CurveRow(**{k: r[k] for k in CurveRow.__annotations__}) for r in rows]  # (progress displays)
        if self.samples_dir is not None:  # before the curve row: a curve point always has its records
            write_samples(self.samples_dir, step, records)
        if defer:
            self._pending = rows
        else:
            self._write(rows, {})
        if self.log is not None:
            # "eval_" is the Trainer's prefix for evaluation metrics: trackers file them under eval/
            self.log({f"eval_{r['task']}/{r['metric']}": r["value"] for r in rows})
        return self.last_rows

    def _score(self, step: int, full: bool) -> tuple[list[dict], list[dict]]:
        """The point's rows and per-question records: scored now, or at step 0 read back from
        the file another attack on the same model kept them in (kept there when scored here)."""
        shared = self.pre_attack if step == 0 and full else None
        if shared is not None and shared.exists():
            kept = json.loads(shared.read_text())
            self.step0_reused = True
            return kept["rows"], kept["records"]
        rows = self.evaluator.evaluate(subset=not full)
        if shared is not None:  # a file that exists is complete
            kept = json.dumps({"rows": rows, "records": self.evaluator.last_records})
            write_whole(shared, lambda f: f.write(kept.encode()))
        return rows, self.evaluator.last_records

    def _write(self, rows: list[dict], logged: dict) -> None:
        """Append a point's rows, with what the Trainer logged at its step."""
        self._pending = None
        self.last_rows = [CurveRow(**{k: {**r, **logged}[k] for k in CurveRow.__annotations__}) for r in rows]
        append_rows(self.curve_path, self.last_rows)
