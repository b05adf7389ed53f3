"""The attack, top to bottom: load, wrap, pack, train with evaluation, save, summarise."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from attack.config import AttackConfig, check_dataset_copies, default_run_id, steps_for
from attack.data import PackedCorpus, prepare_corpus
from attack.errors import UserError
from attack.model import apply_adapter, autocast_dtype, four_bit_config, load_model, load_tokenizer
from attack.published import as_fraction, check_published, mismatch_message
from attack.rundir import RunDir, read_curve, write_atomic
from attack.speed import fit_micro_batch, liger_available
from eval_callbacks import (
    LiveEvaluator,
    NonFiniteLossError,
    RecoveryCurveCallback,
    TaskDataError,
    UnknownTaskError,
    find_tasks,
    linear_schedule,
    log_schedule,
)


def run_attack(cfg: AttackConfig, extra_callbacks: list | None = None, quiet: bool = False,
               cell: dict | None = None) -> Path:
    """Run one attack and return its run directory. `cell` (sweep metadata) goes to cell.json."""
    run = RunDir(Path(cfg.output.dir) / (cfg.output.run_id or default_run_id(cfg)))
    max_steps = steps_for(cfg)
    # Under `accelerate launch` / torchrun this joins the process group; alone it is one process.
    procs = PartialState(cpu=not torch.cuda.is_available())
    world = procs.num_processes
    if cfg.train.batch_size % world:
        raise UserError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the {world} processes")
    per_device = cfg.train.batch_size // world
    if cfg.train.micro_batch_size and per_device % cfg.train.micro_batch_size:
        raise UserError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"micro_batch_size x processes ({cfg.train.micro_batch_size} x {world})"
        )

    # 1. Everything that can fail on user input happens before the run directory is touched,
    #    cheapest checks first.
    if cfg.model.load_in_4bit:
        four_bit_config()  # says clearly when this machine cannot
    check_dataset_copies(cfg.eval)
    tokenizer = load_tokenizer(cfg.model)
    try:
        tasks = find_tasks(cfg.eval.tasks, cfg.eval.include_path)
    except UnknownTaskError as e:
        raise UserError(str(e)) from None
    # The main process prepares the corpus (or finds it in the cache); the others then map it.
    with procs.main_process_first():
        rows = PackedCorpus(prepare_corpus(cfg.data, tokenizer, cfg.data.cache_dir, cfg.data.num_proc,
                                           log=(lambda _: None) if quiet else print))
    if len(rows) < cfg.train.batch_size:
        raise UserError(
            f"attack data packs into {len(rows)} rows of {cfg.data.seq_len} tokens, fewer than one "
            f"batch ({cfg.train.batch_size} rows); add data or lower --seq-len/--batch-size"
        )
    set_seed(cfg.train.seed)
    model = load_model(cfg.model, cfg.adapter)
    model = apply_adapter(model, cfg.adapter, bool(cfg.train.gradient_checkpointing))
    amp = autocast_dtype(cfg.model.precision)
    if cfg.train.micro_batch_size:
        micro, checkpointing = cfg.train.micro_batch_size, bool(cfg.train.gradient_checkpointing)
    else:
        micro, checkpointing = fit_micro_batch(model, per_device, cfg.data.seq_len, len(tokenizer), amp,
                                               cfg.train.gradient_checkpointing)
    accumulation = per_device // micro
    try:
        evaluator = LiveEvaluator(
            model,
            tokenizer,
            cfg.eval.tasks,
            batch_size=cfg.eval.batch_size,
            limit=cfg.eval.limit,
            autocast_dtype=amp,
            task_manager=tasks,
            dataset_paths=cfg.eval.dataset_paths,
        )
    except (UnknownTaskError, TaskDataError) as e:
        raise UserError(str(e)) from None
    task_info = evaluator.task_info()  # reads every question once: compute it once
    for task, value in cfg.eval.expect.items():
        if task not in task_info:
            raise UserError(f"--expect names task {task} that is not evaluated; evaluated: {', '.join(sorted(task_info))}")
        task_info[task]["published"] = as_fraction(value)  # the paper's reference score, when given
    if cfg.eval.schedule == "log":
        schedule = log_schedule(max_steps, cfg.eval.log_points)
    else:
        schedule = linear_schedule(max_steps, cfg.eval.every)
    if cfg.logging.report_to == "wandb":
        _require("wandb", "--report-to wandb needs wandb: pip install wandb")
        os.environ.setdefault("WANDB_PROJECT", cfg.logging.project)

    # 2. The run directory: config, environment, (on resume) the curve up to the checkpoint.
    #    The main process writes it; the others wait, then read the checkpoint to resume from.
    if procs.is_main_process:
        checkpoint = run.prepare(cfg, resume=cfg.output.resume)
        write_atomic(run.path / "tasks.json", json.dumps(task_info, indent=2))
        if cell is not None:
            write_atomic(run.path / "cell.json", json.dumps(cell, indent=2))
        if cfg.output.resume and checkpoint is None and not quiet:
            print(f"no checkpoint in {run.checkpoints}; starting {run.path.name} from step 0")
    procs.wait_for_everyone()
    if not procs.is_main_process:
        checkpoint = run.last_checkpoint() if cfg.output.resume else None

    args = TrainingArguments(
        output_dir=str(run.checkpoints),
        max_steps=max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        bf16=amp is torch.bfloat16,
        fp16=amp is torch.float16,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        logging_steps=cfg.train.log_every,
        logging_nan_inf_filter=False,  # a NaN loss must surface, not be averaged away
        save_strategy="steps",
        save_steps=cfg.train.save_every or cfg.eval.every,
        save_total_limit=cfg.output.keep_checkpoints,
        include_num_input_tokens_seen="all",  # rows are fully packed: every token trains
        report_to=[] if cfg.logging.report_to == "none" else [cfg.logging.report_to],
        run_name=run.path.name,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=quiet or not procs.is_main_process,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=liger_available(),
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # every step trains on exactly batch_size x seq_len tokens
        ddp_find_unused_parameters=False,
    )
    curve = RecoveryCurveCallback(evaluator, schedule, run.curve, wall_offset_s=run.wall_so_far())
    trained = RowsTrained(rows, micro * accumulation, checkpoint)
    callbacks = [curve, trained]
    if cfg.eval.expect and procs.is_main_process:
        callbacks.append(PublishedScoreCheck(cfg.eval.expect, run, task_info))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=[*callbacks, *(extra_callbacks or [])],
    )
    if quiet:  # with the progress bar off, the Trainer would print every log dict instead
        trainer.remove_callback(PrinterCallback)
    if cfg.logging.report_to != "none":
        curve.log_metrics = trainer.log  # eval scores reach wandb/tensorboard against the step

    # 3. Train; evaluation fires from the callback at the scheduled steps.
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as e:
        if procs.is_main_process:
            run.write_summary(status="failed", error=str(e))
        _close_progress_bar(trainer)
        raise UserError(str(e)) from None
    except BaseException as e:
        if procs.is_main_process:
            run.write_summary(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=repr(e))
        raise
    finally:
        if cfg.logging.report_to == "wandb":
            import wandb

            wandb.finish()  # one tracker run per attack, also when a sweep runs many in one process
    train_s = time.perf_counter() - start

    # 4. The attacked weights: the LoRA adapter (PEFT format) or the full model.
    trainer.save_model(str(run.final))
    coverage = trained.coverage(trainer.state.global_step)  # on every process: it gathers
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run.final))
        state = trainer.state
        run.write_summary(
            status="done",
            steps=state.global_step,
            max_steps=max_steps,
            tokens_seen=int(state.num_input_tokens_seen),
            tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
            processes=world,
            micro_batch_size=micro,
            gradient_checkpointing=checkpointing,
            train_rows=len(rows),
            **coverage,
            eval_steps=schedule,
            eval_s=round(curve.eval_seconds, 2),
            train_s=round(train_s, 2),
            wall_s=round(run.wall_so_far(), 2),
            final_train_loss=curve.train_loss,
        )
        if not quiet:
            print(score_table(read_curve(run.curve), evaluator.requested))
            print(f"run directory: {run.path}")
    return run.path


class RowsTrained(TrainerCallback):
    """Which packed rows, and so which source documents, the attack trained on within its budget.
    The list (all processes together) is saved with every checkpoint, so a resumed run counts
    what it trained on before the interruption."""

    FILE = "rows_trained.npy"

    def __init__(self, corpus: PackedCorpus, rows_per_step: int, checkpoint: str | None):
        self.corpus, self.rows_per_step = corpus, rows_per_step
        saved = Path(checkpoint) / self.FILE if checkpoint else None
        self.prior = np.load(saved) if saved is not None and saved.exists() else np.zeros(0, dtype=np.int64)
        self.start_step = int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0

    def trained(self, step: int) -> np.ndarray:
        # The data loader reads a batch ahead: keep only rows of steps taken since the start.
        mine = self.corpus.fetched[: (step - self.start_step) * self.rows_per_step]
        gathered = gather_object([mine])  # one list per process; every process must call this
        return np.concatenate([self.prior, np.asarray([r for rows in gathered for r in rows], dtype=np.int64)])

    def on_save(self, args, state, control, **kwargs):
        rows = self.trained(state.global_step)
        if state.is_world_process_zero:
            np.save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE, rows)

    def coverage(self, step: int) -> dict:
        trained = self.trained(step)
        rows = np.unique(trained)
        return dict(rows_trained=int(len(trained)), distinct_rows_trained=int(len(rows)),
                    distinct_tokens_trained=int(len(rows)) * self.corpus.meta["seq_len"],
                    documents_seen=int(len(self.corpus.documents_in(rows))), documents=self.corpus.meta["documents"],
                    corpus=str(self.corpus.folder))


class PublishedScoreCheck(TrainerCallback):
    """After the step-0 evaluation (the curve callback runs first), compare it with the published
    scores; a mismatch is a loud warning in the terminal and in summary.json."""

    def __init__(self, expect: dict[str, float], run: RunDir, tasks: dict):
        self.expect, self.run, self.tasks = expect, run, tasks

    def on_train_begin(self, args, state, control, **kwargs):
        step0 = [r for r in read_curve(self.run.curve) if r["step"] == 0]
        checks = check_published(self.expect, step0, self.tasks)
        warnings = [mismatch_message(c) for c in checks if not c["ok"]]
        self.run.write_summary(published_checks=checks, warnings=warnings)
        for w in warnings:
            print(f"\n*** WARNING: {w} ***", file=sys.stderr, flush=True)


def score_table(rows: list[dict], tasks: list[str] | None = None) -> str:
    """Each task's scores at the first and the last evaluated step; only `tasks` (the names asked
    for: a group's headline, not its subtasks) when given."""
    if not rows:
        return "(no evaluation points)"
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    lines = [f"{'task':<28} {'metric':<14} {'step ' + str(first):>10} {'step ' + str(last):>10}"]
    for task in tasks or sorted({r["task"] for r in rows}):
        for metric in ("acc", "acc_norm", "correct_prob", "exact_match"):
            at = {r["step"]: r["value"] for r in rows if r["task"] == task and r["metric"] == metric}
            if at:
                lines.append(
                    f"{task:<28} {metric:<14} {at.get(first, float('nan')):>10.4f} {at.get(last, float('nan')):>10.4f}"
                )
    return "\n".join(lines)


def _close_progress_bar(trainer) -> None:
    """Finish the training bar so an error message that follows gets a line of its own."""
    for cb in trainer.callback_handler.callbacks:
        bar = getattr(cb, "training_bar", None)
        if bar is not None:
            bar.close()
            cb.training_bar = None


def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(message)
