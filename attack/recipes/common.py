"""What every recipe shares, in the order a recipe uses it:

    setup(cfg)          every check of the user's input that needs no model (the run directory
                        can be written, the tracker, 4-bit support), the processes, tokenizer,
                        evaluation tasks, precision, steps and eval schedule; writes nothing
    corpus(a)           the packed attack corpus (the main process prepares it, the others map it)
    evaluator(a, m)     the evaluator on the live model and tasks.json's content
    open_run(a, ...)    the run directory opened (or reopened to resume) by the main process
    edit_run(a, ...)    the skeleton of the edit kinds (ablation, quantize, incontext): step 0,
                        the edit, step 1, the run marked failed or interrupted if it stops between
    finish(a, ...)      summary.json marked done, the lock released, the score table printed

The kinds that train take their Trainer pieces from training.py. A recipe keeps only what is its
own and reads top to bottom; it never imports another recipe.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import (
    set_seed,
)

from attack.checkpoints import required_parts
from attack.config import AttackConfig
from attack.data import load_attack_rows, load_mixed_rows
from attack.evaluation import find_eval_tasks, score_table
from attack.evaluation import open_evaluator as _open_evaluator
from attack.heldout import check_not_trained_on
from attack.judging import make_judge
from attack.model import autocast_dtype, check_vocabulary, four_bit_config, load_tokenizer
from attack.preattack import pre_attack_file
from attack.records import Status, read_curve
from attack.rundir import RunDir
from attack.speed import per_device_batch
from attack.tracking import check_tracker, finish_tracker, open_tracker
from eval_callbacks import RecoveryCurveCallback


@dataclass
class Attack:
    """One attack being set up and run: its config, run directory, processes and the pieces
    every recipe needs. Built by `setup`."""

    cfg: AttackConfig
    run: RunDir
    procs: PartialState
    say: Callable[[str], None]
    tokenizer: object
    tasks: object  # lm-eval's task manager for cfg.eval.tasks
    amp: torch.dtype | None  # autocast precision (None: plain fp32)
    max_steps: int  # optimizer steps of the attack (0: a one-shot edit)
    schedule: list[int]  # training steps at which the curve is evaluated
    per_device: int  # rows (or completions) per optimizer step on each process
    quiet: bool = False
    progress: bool | None = None
    cell: dict | None = None
    extra_callbacks: list = field(default_factory=list)
    share_step0: bool = True  # False when the caller built the model: cfg.model may not describe it
    reference_taken: bool = False  # the KL reference's file went to the run's first evaluator

    def pre_attack(self, evaluator) -> Path | None:
        """Where a cell of a sweep or search shares its step 0 with the other attacks on the same
        model (attack/preattack.py); an attack run alone has no one to share it with."""
        return self._shared(evaluator.model)

    def kl_reference(self, model) -> Path | None:
        """Where the KL guard's reference (the model under test on eval.kl_task's prompts) is
        shared, beside step 0 and under the same key: for the first evaluator of the run only, the
        one on the model as loaded (a later one, on a perturbed or ablated model, keeps its own)."""
        if self.cfg.eval.kl_task is None or self.reference_taken:
            return None
        self.reference_taken = True
        shared = self._shared(model)
        return shared.with_suffix(".kl.pt") if shared else None

    def _shared(self, model) -> Path | None:
        if self.cell is None or not self.share_step0:
            return None
        return pre_attack_file(self.cfg, model, self.amp)

    @property
    def main(self) -> bool:
        return self.procs.is_main_process


def setup(cfg: AttackConfig, extra_callbacks: list | None = None, quiet: bool = False, cell: dict | None = None,
          progress: bool | None = None) -> Attack:
    """Every check that needs no model, cheapest first; nothing is written to the run directory."""
    run = RunDir.for_config(cfg)
    # Under `accelerate launch` / torchrun this joins the process group; alone it is one process.
    procs = PartialState(cpu=not torch.cuda.is_available())
    run.check_writable(cfg.output.resume)
    per_device = per_device_batch(cfg.train, procs.num_processes) if cfg.trains() else 1
    if cfg.model.load_in_4bit:
        four_bit_config()  # says clearly when this machine cannot
    check_tracker(cfg.logging)
    tasks = find_eval_tasks(cfg.eval, cfg.model.trust_remote_code)  # a mistyped task name: said before any model file is read
    tokenizer = load_tokenizer(cfg.model)  # also says when the model is not where it was said to be
    set_seed(cfg.seed)
    return Attack(cfg=cfg, run=run, procs=procs, say=(lambda _: None) if quiet else print, tokenizer=tokenizer,
                  tasks=tasks, amp=autocast_dtype(cfg.model.precision), max_steps=cfg.training_steps(),
                  schedule=cfg.eval_schedule(), per_device=per_device, quiet=quiet, progress=progress, cell=cell,
                  extra_callbacks=list(extra_callbacks or []))


def device() -> torch.device:
    """Where a recipe that runs without a Trainer puts its model: this process's GPU, else the CPU."""
    return PartialState(cpu=not torch.cuda.is_available()).device


def corpus(a: Attack):
    """The packed attack corpus; prepared once into its own cache, shared by every run and rank."""
    if a.main:  # held-out text the attack trains on would measure memorisation
        mixed = [a.cfg.data.model_copy(update=dict(path=m.path, text_field=m.text_field, name=m.name, split=m.split,
                                                   template=None, mix=[])) for m in a.cfg.data.mix]
        check_not_trained_on(a.cfg.eval, [a.cfg.data, *mixed])
    with a.procs.main_process_first():  # the main process prepares the corpus, the others map it
        rows = load_attack_rows(a.cfg.data, a.tokenizer, a.cfg.train.batch_size, log=a.say)
        if a.cfg.data.mix:  # the run's whole data order, every source at its share
            rows = load_mixed_rows(a.cfg.data, a.tokenizer, rows, a.max_steps * a.cfg.train.batch_size,
                                   a.cfg.train.seed, log=a.say)
    passes = a.max_steps * a.cfg.train.batch_size / len(rows)
    if passes > 1000 and a.main:  # said, not refused: memorising a small corpus can be the point
        print(f"warning: {a.max_steps:,} steps of {a.cfg.train.batch_size} rows pass over the {len(rows):,} packed "
              f"rows of the corpus {passes:,.0f} times; lower train.max_steps unless that is meant", file=sys.stderr)
    return rows


def evaluator(a: Attack, model, cfg_eval=None, tasks=None):
    """The evaluator on `model` (the live object: it scores whatever the attack makes of it) and
    tasks.json's content. `cfg_eval`/`tasks`: another task set (an ablation's dev tasks)."""
    check_vocabulary(model, a.tokenizer)
    cfg_eval = cfg_eval or a.cfg.eval
    judge = make_judge(cfg_eval.judge, a.run.judge_cache, next(model.parameters()).device)
    return _open_evaluator(cfg_eval, model, a.tokenizer, a.amp, tasks or a.tasks, chat_template=a.cfg.model.chat_template,
                           judge=judge, kl_reference=a.kl_reference(model) if cfg_eval is a.cfg.eval else None)


def open_run(a: Attack, task_info: dict) -> str | None:
    """The main process opens the run directory (or reopens it to resume) and says what runs;
    the others wait, then find the checkpoint to resume from."""
    cfg, run = a.cfg, a.run
    checkpoint = None
    if a.main:
        checkpoint = run.open(cfg, task_info, a.cell, checkpoint_parts(cfg))
        if cfg.output.resume and checkpoint is None:
            a.say(f"no checkpoint in {run.checkpoints}; starting {run.path.name} from step 0")
        points = len(cfg.curve_steps())
        a.say(f"{cfg.model.name}: {cfg.describe()}, evaluated at {points} point{'s' * (points != 1)}"
              + (f", resuming from {Path(checkpoint).name}" if checkpoint else ""))
        a.say(f"run directory: {run.path} (resolved config: {run.config})")
        open_tracker(cfg, run.path)
    a.procs.wait_for_everyone()
    if not a.main:
        checkpoint = run.last_checkpoint(cfg, checkpoint_parts(cfg)) if cfg.output.resume else None
    return checkpoint


def checkpoint_parts(cfg: AttackConfig) -> tuple[str, ...]:
    """The files the recipes add to every checkpoint (`watch`, `fine_tune`), without which a resume
    would not be the same attack: the optimizer's record, and the rows trained where a corpus is read."""
    return required_parts(cfg.uses_data)


class Edit:
    """A kind without optimizer steps (ablation, quantization, the context): step 0 the model as
    it is, step 1 the edited one, on the run's wall clock; the seconds between them are the edit's."""

    def __init__(self, a: Attack, evaluator):
        self.a, self.seconds = a, 0.0
        self.curve = RecoveryCurveCallback(evaluator, [0, 1], a.run.curve, wall_offset_s=a.run.wall_so_far(),
                                           samples_dir=a.run.samples, pre_attack=a.pre_attack(evaluator))

    def before(self) -> None:
        """Step 0: the unmodified model; the edit's clock starts."""
        self.curve.record(0, 0)
        self._start = time.perf_counter()

    def after(self) -> None:
        """Step 1: the edited model; the edit's clock stops."""
        self.seconds = time.perf_counter() - self._start
        self.curve.record(1, 0)

    def summary(self) -> dict:
        """summary.json's fields of a kind without optimizer steps."""
        return dict(steps=0, max_steps=0, tokens_seen=0, eval_steps=self.a.cfg.curve_steps(),
                    eval_s=round(self.curve.eval_seconds, 2), train_s=round(self.seconds, 2),
                    step0_reused=self.curve.step0_reused)


@contextlib.contextmanager
def edit_run(a: Attack, evaluator, then_training: bool = False):
    """The skeleton every edit kind shares, around its own steps (`Edit.before`, the edit,
    `Edit.after`, on the main process): an error or signal there marks the run failed or
    interrupted; at the end the tracker is closed (unless a fine-tune follows) and every process
    waits for the main one."""
    edit = Edit(a, evaluator)
    try:
        yield edit
    except BaseException as e:
        if a.main:
            ended_early(a, e)
        raise
    finally:
        if not then_training:
            finish_tracker(a.cfg.logging)
        a.procs.wait_for_everyone()


def finish(a: Attack, evaluator, summary: dict, **more) -> Path:
    """The closing of every recipe: summary.json marked done, the run directory given up, the
    table of each task's first and last score."""
    a.run.write_summary(status=Status.DONE, **summary, **more, wall_s=round(a.run.wall_so_far(), 2))
    a.run.close()
    a.say(score_table(read_curve(a.run.curve), evaluator.requested))
    a.say(f"run directory: {a.run.path}")
    if a.cell is None:  # a single attack: how to read it against a reference (a sweep's report comes by itself)
        a.say(f"report: python -m attack report {a.run.path.parent} [--reference LABEL: the reference model's run "
              "there, attacked with the same config]")
    return a.run.path


@contextlib.contextmanager
def closing(a: Attack):
    """The save and summary after training: a signal or error there (SIGTERM during the final
    save, a full disk) still marks the run interrupted or failed, never leaves it running."""
    try:
        yield
    except BaseException as e:
        if a.main and a.run.status == Status.RUNNING:
            ended_early(a, e)
        raise


def ended_early(a: Attack, error: BaseException) -> None:
    """A recipe's own steps (outside the Trainer) stopped: record why and give up the run."""
    status = Status.INTERRUPTED if isinstance(error, KeyboardInterrupt) else Status.FAILED
    a.run.end(status, str(error) or repr(error))
    finish_tracker(a.cfg.logging)
