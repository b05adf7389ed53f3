"""The types of the run directory's files (attack/rundir.py names them): summary.json's status
and fields, cell.json, curve.jsonl and rewards.jsonl rows and their readers, and the outcome words
a sweep, search or demo counts."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

from attack.errors import UserError

if TYPE_CHECKING:  # the evaluator's row type; importing it loads torch and transformers
    from eval_callbacks.callback import CurveRow


class Status(StrEnum):
    """summary.json's `status`, and the two states a sweep cell has before it has one."""

    PENDING = "pending"  # no run directory yet
    PARTIAL = "partial"  # a run directory without summary.json (killed while opening it)
    RUNNING = "running"  # started; a process may still be at work, or was killed (resumable)
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM; resumable
    PRUNED = "pruned"  # a search trial stopped early at an evaluation point: its curve up to there


class Outcome(StrEnum):
    """What became of a cell or trial in one sweep, search or demo invocation (counted and
    reported); beside Status, which is what its run directory says."""

    DONE = "done"  # ran to the end here
    SKIPPED = "skipped"  # finished already (here or by another process)
    BUSY = "busy"  # another process holds its run directory: not finished here
    FAILED = "failed"  # recorded in its summary.json
    PRUNED = "pruned"  # a search trial stopped early by the pruner
    INFEASIBLE = "infeasible"  # a finished trial every point of which broke the utility (or KL) bound

    @classmethod
    def counts(cls, *which: Outcome) -> dict[Outcome, int]:
        return dict.fromkeys(which, 0)


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
    trial: NotRequired[int]  # a search trial: its number in the study (attack/search.py)
    study: NotRequired[str]  # ... and the study's name
    selection_tasks: NotRequired[list[str]]  # ... the tasks that chose it, never reported
    params: NotRequired[dict]  # ... and its settings, {config key: value}


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
    tokens_by_source: dict  # data.mix: training tokens per corpus (its path), attack corpus included
    documents: int
    corpus: str
    eval_steps: list[int]
    optimizer: dict  # train.optimizer, the class built and its settings
    eval_s: float
    eval_point_s: list[float]  # each evaluation point's seconds (the first also builds the requests)
    step0_reused: bool  # step 0 read back from another attack's scoring of the same model (attack/preattack.py)
    train_s: float
    wall_s: float
    final_train_loss: float | None
    published_checks: list[dict]
    ablation: dict  # the direction an ablation chose: layer, position, dev score, KL, strength
    perturb: dict  # shrink-and-perturb before the fine-tune: shrink, noise, seed, relative weight change
    quantize: dict  # the method, who quantized (bitsandbytes or the simulation), the relative weight change
    grpo: dict  # the reward split's size, the reward, its last logged mean, judge parse failures
    incontext: dict  # passages and shots given, the share of questions whose passages held the answer, the control
    warnings: list[str]
    search: dict  # a search trial: its objective on the selection tasks, the point it was read at, feasibility


def read_curve(path: Path) -> list[CurveRow]:
    """Curve rows. A torn last line (a crash mid-write) is ignored; any other line that is not a
    curve row is damage the user must see."""
    if not Path(path).exists():
        return []
    if not Path(path).is_file():
        raise UserError(f"{path} is not a file of curve rows; remove it or leave that run out")
    lines = Path(path).read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"step", "task", "metric", "value"} <= set(row):
                raise ValueError("not a curve row")
            if not isinstance(row["step"], int) or isinstance(row["step"], bool) or not isinstance(row["task"], str):
                raise ValueError("step must be an integer and task a name")
            if isinstance(row["value"], bool) or not isinstance(row["value"], int | float | None):
                raise ValueError("value must be a number")
        except (ValueError, TypeError):
            if i == len(lines):
                continue
            raise UserError(f"{path} line {i} is not a curve row; remove or repair that line") from None
        rows.append(row)
    return rows


class RewardRow(TypedDict, total=False):
    """A row of rewards.jsonl: GRPO's training signal, averaged over the steps since the previous
    row. frac_reward_zero_std: share of groups whose completions all scored the same (no gradient:
    nothing left to elicit from those prompts)."""

    step: int
    reward: float
    reward_std: float
    frac_reward_zero_std: float


def read_rewards(path: Path) -> list[RewardRow]:
    """Rows of rewards.jsonl; a torn last line is ignored."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            int(row["step"])
        except (ValueError, TypeError, KeyError):
            continue
        rows.append(row)
    return rows
