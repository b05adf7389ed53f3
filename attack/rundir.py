"""The run directory: the contract other tools (the report, the sweep) read. Its file names and
fields are the types below; writers and readers both use them, and every file name is spelled
once, as a `RunDir` attribute:

    runs/<run-id>/config.yaml  env.json  tasks.json  cell.json  summary.json  .lock
                  model_files.json                             a local model's files as the run found them
                  curve.jsonl  samples/step-NNNNNNN.jsonl.gz   the recovery curve, per-question records
                  checkpoints/  sealed.jsonl  final/           resumable trainer state (attack/checkpoints.py),
                                                               the run's record of each seal, attacked weights
                  rewards.jsonl                                (grpo) reward mean and spread per logged step
                  candidates.jsonl  direction.json  dose.jsonl  ablated/
                                                               (ablation) every candidate, the chosen
                                                               direction, the dose-response, the edited
                                                               model a fine-tune starts from
                  retrieval.jsonl  control.jsonl               (incontext) each question's passages, the
                                                               control corpus's scores
                  attribution/  attribution.jsonl  attribution_summary.json
                                                               (--attribution) see attack/attribution/
                  counterfactual.csv  counterfactual/          (python -m attack counterfactual) recovery
                                                               removed per method and k; the reruns,
                                                               trackstar-p<projection>/, ekfac/

The step axis. `step` counts the attack's optimizer steps, so curves of different kinds share
one x axis. Step 0 is always the unmodified model under test, evaluated before the attack
changes anything: it is the pre-attack score that recovery is measured from, for every kind.
A kind that spends no optimizer steps (directional ablation) puts its edited model at step 1
with tokens_seen 0 (one edit, no training data); a fine-tuning attack that starts from the
edited model continues from there, so its steps count from 1 as well.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from attack.config import AttackConfig, config_hash, default_run_id, dump_yaml
from attack.environment import environment
from attack.errors import UserError
from attack.files import model_files, read_json, write_atomic
from attack.records import CellMeta, Status, Summary, read_curve, read_rewards
from attack.runlock import RunLock
from eval_callbacks.callback import samples_file

COUNTERFACTUAL_RESULT = "counterfactual.json"  # in counterfactual/: the removals and reruns behind the table
# What is inside each checkpoints/checkpoint-<step>/ is attack/checkpoints.py's to name.


class AttributionFiles:
    """attribution/: what an --attribution run collects (Bergson's index, order.hf and train/,
    keeps its own layout inside)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.pieces = self.path / "pieces.npy"  # (row, document, offset, first token, tokens) per piece
        self.questions = self.path / "questions.json"  # the queried questions: task, index, context, answer
        self.step_epochs = self.path / "step_epochs.json"  # the epoch folder of each step's rows
        self.queries = self.path / "queries"  # step-N.npy: the questions' gradients at point N
        self.order = self.path / "order.hf"  # Bergson: which piece trained at which step
        self.train = self.path / "train"  # Bergson: epoch_E/, one projected gradient per piece

    def query(self, step: int) -> Path:
        return self.queries / f"step-{step}.npy"

    def query_steps(self) -> list[int]:
        """The evaluation points whose question gradients were stored."""
        return sorted(int(p.stem.split("-")[1]) for p in self.queries.glob("step-*.npy"))


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.env = self.path / "env.json"
        self.curve = self.path / "curve.jsonl"
        self.rewards = self.path / "rewards.jsonl"
        self.summary_path = self.path / "summary.json"
        self.tasks_path = self.path / "tasks.json"
        self.cell_path = self.path / "cell.json"
        self.samples = self.path / "samples"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.candidates = self.path / "candidates.jsonl"
        self.direction = self.path / "direction.json"
        self.dose = self.path / "dose.jsonl"
        self.ablated = self.path / "ablated"
        self.attribution = AttributionFiles(self.path / "attribution")
        self.attribution_rows = self.path / "attribution.jsonl"
        self.attribution_summary = self.path / "attribution_summary.json"
        self.counterfactual = self.path / "counterfactual"  # its reruns (runs/, corpora/) and COUNTERFACTUAL_RESULT
        self.counterfactual_table = self.path / "counterfactual.csv"  # recovery removed per method and k
        self.retrieval = self.path / "retrieval.jsonl"  # (incontext) each question's passages, answer held or not
        self.control = self.path / "control.jsonl"  # (incontext) curve rows of the control corpus's context
        self.judge_cache = self.path / "judge.jsonl"  # verdicts of a model or endpoint judge, by content hash
        self.model_files = self.path / "model_files.json"  # a local model's files (name, size, time) as the run found them
        self.lock = RunLock(self.path / ".lock")

    @property
    def ekfac(self) -> Path:
        """(counterfactual --methods ekfac) Kronfluence's factors and scores."""
        return self.counterfactual / "ekfac"

    def trackstar(self, projection: int) -> Path:
        """(counterfactual --methods trackstar) Bergson's TrackStar pipeline and its scores."""
        return self.counterfactual / f"trackstar-p{projection}"

    @classmethod
    def for_config(cls, cfg: AttackConfig) -> RunDir:
        """The run directory of a config: output.dir / (output.run_id, or the id derived from the config)."""
        return cls(Path(cfg.output.dir) / (cfg.output.run_id or default_run_id(cfg)))

    @property
    def summary(self) -> Summary | None:
        """summary.json, or None when it is missing or not a JSON object (damage, or another tool's file)."""
        return _mapping(read_json(self.summary_path))

    @property
    def cell(self) -> CellMeta | None:
        return _mapping(read_json(self.cell_path))

    @property
    def status(self) -> Status:
        if not self.path.exists():
            return Status.PENDING
        try:
            return Status((self.summary or {}).get("status", Status.PARTIAL))
        except ValueError:  # a summary.json from elsewhere; treat like one never finished
            return Status.PARTIAL

    def open(self, cfg: AttackConfig, tasks: dict, cell: CellMeta | None = None,
             required: tuple[str, ...] = ()) -> str | None:
        """Create the run directory (or, with output.resume, reopen it) and write what the run
        is: config, environment, tasks, sweep cell. Recipes call this only after every check of
        the user's input passed, so a refused start leaves nothing behind.

        Returns the checkpoint to resume from, or None for a fresh start. `required`: the files
        the recipe adds to each checkpoint, without which it cannot resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            checkpoint = self._prepare(cfg, cfg.output.resume, required)
            write_atomic(self.tasks_path, json.dumps(tasks, indent=2))
            if cell is not None:
                self.write_cell(cell)
        except BaseException:
            self.lock.release()
            raise
        return checkpoint

    def refuse_existing(self, resume: bool) -> None:
        """A finished run is never reopened, and a started one only to resume it."""
        if not self.path.is_dir():
            return
        summary = self.summary
        if (summary or {}).get("status") == Status.DONE:
            raise UserError(f"run directory {self.path} already exists and is finished (status: done), nothing to "
                            "resume; for another run of the same config give a new --run-id or --output")
        if any(p.name != ".lock" for p in self.path.iterdir()) and not resume:
            state = (summary or {}).get("status", Status.PARTIAL)
            raise UserError(
                f"run directory {self.path} already exists (status: {state}); "
                "pass --resume to continue it, or --run-id/--output for a new run"
            )

    def check_writable(self, resume: bool) -> None:
        """Checked in setup, before anything is created: the folder the run directory goes into
        can be written, and the run directory is not one that must not be reopened."""
        import tempfile

        parent = self.path.parent
        existing = next(p for p in [parent, *parent.parents] if p.exists())
        if not existing.is_dir():
            raise UserError(f"--output {parent}: {existing} is a file, not a folder; choose another --output")
        try:  # a probe file in the nearest existing folder, removed at once; nothing is created
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise UserError(f"--output {parent} cannot be written ({e.strerror}); choose another --output") from None
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file, not a run directory; choose another --run-id or --output")
        self.refuse_existing(resume)

    def close(self) -> None:
        """Give up the run directory at the end of the run."""
        self.lock.release()

    def end(self, status: Status, error: str) -> None:
        """A run that stops early: record why (if the disk still allows) and give up the directory."""
        with contextlib.suppress(OSError):
            self.write_summary(status=status, error=error)
        self.close()

    def write_cell(self, cell: CellMeta) -> None:
        write_atomic(self.cell_path, json.dumps(cell, indent=2))

    def _prepare(self, cfg: AttackConfig, resume: bool, required: tuple[str, ...] = ()) -> str | None:
        """Refuses to touch a directory that already holds a run unless resuming, so nothing
        written is clobbered."""
        self.refuse_existing(resume)
        for stale in self.path.glob(".*.tmp"):  # half-written files of a process killed mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        checkpoint = self.last_checkpoint(cfg, required) if resume else None
        self.path.mkdir(parents=True, exist_ok=True)
        if resume and self.config.exists():
            saved = self.config.read_text()
            if saved != dump_yaml(cfg) and _identity_changed(saved, cfg):
                raise UserError(
                    f"--resume with a different config than {self.config}; "
                    "resume with the same settings or start a new run"
                )
        if resume and self.model_changed(cfg):
            raise UserError(f"--resume: the model {cfg.model.name} changed since {self.path} started (its files' sizes "
                            "or times differ); resuming would join two models' curves: start a new run "
                            "(--run-id or --output)")
        write_atomic(self.config, dump_yaml(cfg))
        write_atomic(self.env, json.dumps(environment(), indent=2))
        write_atomic(self.model_files, json.dumps(model_files(cfg.model.name)))
        # The resumed trajectory restarts at the checkpoint: points recorded after it
        # (before the interruption) are dropped, so the curve has each step exactly once.
        from attack.checkpoints import checkpoint_step

        keep_until = checkpoint_step(checkpoint) + cfg.training_offset if checkpoint else -1
        rows = [r for r in read_curve(self.curve) if r["step"] <= keep_until]
        write_atomic(self.curve, "".join(json.dumps(r) + "\n" for r in rows))
        if self.rewards.exists():
            kept = [r for r in read_rewards(self.rewards) if r["step"] <= keep_until]
            write_atomic(self.rewards, "".join(json.dumps(r) + "\n" for r in kept))
        for f in self.samples.glob("*step-*"):  # records of dropped points, and torn temporary files
            if f.name.startswith(".") or int(f.name.split("-")[1].split(".")[0]) > keep_until:
                f.unlink()
        self.write_summary(status=Status.RUNNING, kind=cfg.kind, resumed_from=checkpoint)
        return checkpoint

    def model_changed(self, cfg: AttackConfig) -> bool:
        """The local model's files differ from those this run measured: rebuilt in place since."""
        saved = read_json(self.model_files)
        return saved is not None and saved != model_files(cfg.model.name)

    def last_checkpoint(self, cfg: AttackConfig, required: tuple[str, ...] = (),
                        say=lambda m: print(m, file=sys.stderr)) -> str | None:
        """The newest checkpoint of this run that proves itself whole (attack/checkpoints.py) and
        whose earlier curve points are all still recorded (a resume re-measures none of them)."""
        from attack.checkpoints import newest_valid

        return newest_valid(self.checkpoints, cfg.output.keep_checkpoints, self.identity(cfg), required,
                            usable=lambda step: self.points_recorded(cfg, step), say=say)

    def identity(self, cfg: AttackConfig) -> dict:
        """What a checkpoint records of the run that wrote it: the run directory's name and the
        hash of the config's result-deciding part."""
        return {"run_id": self.path.name, "config": config_hash(cfg)}

    def points_recorded(self, cfg: AttackConfig, step: int) -> bool:
        """Every curve point up to training step `step` is in curve.jsonl with its per-question records."""
        until = step + cfg.training_offset
        wanted = {s for s in cfg.curve_steps() if s <= until}
        have = {r["step"] for r in read_curve(self.curve)}
        return wanted <= have and all(samples_file(self.samples, s).exists() for s in wanted)

    def write_summary(self, **fields) -> None:
        """Update summary.json with fields of `Summary` (anything else is a bug, not data)."""
        unknown = set(fields) - set(Summary.__annotations__)
        if unknown:
            raise TypeError(f"not summary.json fields: {sorted(unknown)}; add them to records.Summary")
        summary = self.summary or {}
        summary.update(fields)
        write_atomic(self.summary_path, json.dumps(summary, indent=2))

    def wall_so_far(self) -> float:
        rows = read_curve(self.curve)
        return max((r.get("wall_s") or 0.0 for r in rows), default=0.0)


def _mapping(value) -> dict | None:
    return value if isinstance(value, dict) else None


def _identity_changed(saved_yaml: str, cfg: AttackConfig) -> bool:
    import yaml

    from attack.config import identity, load_config, parse_yaml

    try:
        saved = load_config(parse_yaml(saved_yaml))
    except (UserError, yaml.YAMLError):
        return True
    return identity(saved) != identity(cfg)
