"""The fine-tuning attack (kind: finetune): train the model under test on an attack corpus,
LoRA or full, and score the live model on held-out tasks at scheduled steps.

    1. setup     check every input and build the model, corpus and evaluator; writes no run files
    2. open      the run directory: config, environment, tasks (or reopen it to resume)
    3. train     HF Trainer; the recovery-curve callback evaluates at the scheduled steps
    4. save      the attacked weights: the LoRA adapter (PEFT format) or the full model
    5. summary   steps, tokens, documents seen, timings -> summary.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerState, TrainingArguments, default_data_collator, set_seed

from attack.attribution import IndexedRows, collection_callbacks, require_bergson
from attack.config import FinetuneConfig, default_run_id, steps_for
from attack.data import RowsTrained, load_attack_rows
from attack.errors import UserError
from attack.evaluation import eval_schedule, find_eval_tasks, open_evaluator, score_table
from attack.model import apply_adapter, autocast_dtype, four_bit_config, load_model, load_tokenizer
from attack.published import PublishedScoreCheck
from attack.rundir import RunDir, Status, checkpoint_step, read_curve
from attack.speed import liger_available, micro_batch, per_device_batch
from attack.tracking import Bar, ProgressLines, check_tracker, close_progress_bar, finish_tracker, open_tracker
from eval_callbacks import NonFiniteLossError, RecoveryCurveCallback


def run(cfg: FinetuneConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    run = RunDir(Path(cfg.output.dir) / (cfg.output.run_id or default_run_id(cfg)))
    say = (lambda _: None) if quiet else print
    # Under `accelerate launch` / torchrun this joins the process group; alone it is one process.
    procs = PartialState(cpu=not torch.cuda.is_available())

    # 1. Setup. Every check of the user's input, cheapest first. The prepared corpus goes to its
    #    own cache (shared by every run); nothing is written to the run directory yet.
    run.check_writable(cfg.output.resume)
    max_steps = steps_for(cfg)
    per_device = per_device_batch(cfg.train, procs.num_processes)
    if cfg.model.load_in_4bit:
        four_bit_config()  # says clearly when this machine cannot
    check_tracker(cfg.logging)
    if cfg.attribution.enabled:
        require_bergson()
    tokenizer = load_tokenizer(cfg.model)  # also says when the model is not where it was said to be
    tasks = find_eval_tasks(cfg.eval)
    with procs.main_process_first():  # the main process prepares the corpus, the others map it
        rows = load_attack_rows(cfg.data, tokenizer, cfg.train.batch_size, log=say)
    set_seed(cfg.train.seed)
    model = load_model(cfg.model, cfg.adapter)
    model = apply_adapter(model, cfg.adapter, bool(cfg.train.gradient_checkpointing))
    amp = autocast_dtype(cfg.model.precision)
    micro, checkpointing = micro_batch(cfg.train, model, per_device, cfg.data.seq_len, len(tokenizer), amp)
    evaluator, task_info = open_evaluator(cfg.eval, model, tokenizer, amp, tasks)
    schedule = eval_schedule(cfg.eval, max_steps)

    # 2. Open the run directory.
    adapter = "full" if cfg.adapter.kind == "full" else f"LoRA r={cfg.adapter.rank}"
    checkpoint = open_run(cfg, run, task_info, cell, procs, say,
                          f"{cfg.model.name}: {adapter}, lr {cfg.train.lr:g}, {max_steps} steps of "
                          f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens, evaluated at {len(schedule)} points")

    return train(cfg, run, model, tokenizer, rows, evaluator, task_info, checkpoint, procs=procs, micro=micro,
                 checkpointing=checkpointing, amp=amp, extra_callbacks=extra_callbacks, quiet=quiet, progress=progress)


def open_run(cfg, run: RunDir, task_info: dict, cell: dict | None, procs, say, headline: str) -> str | None:
    """Step 2 of a training recipe: the main process opens the run directory (or reopens it to
    resume) and says what runs; the others wait, then find the checkpoint to resume from."""
    checkpoint = None
    if procs.is_main_process:
        checkpoint = run.open(cfg, task_info, cell)
        if cfg.output.resume and checkpoint is None:
            say(f"no checkpoint in {run.checkpoints}; starting {run.path.name} from step 0")
        say(headline + (f", resuming from {Path(checkpoint).name}" if checkpoint else ""))
        say(f"run directory: {run.path} (resolved config: {run.path / 'config.yaml'})")
        open_tracker(cfg, run.path)
    procs.wait_for_everyone()
    if not procs.is_main_process:
        checkpoint = run.last_checkpoint() if cfg.output.resume else None
    return checkpoint


def train(cfg, run: RunDir, model, tokenizer, rows, evaluator, task_info: dict, checkpoint: str | None, *, procs,
          micro: int, checkpointing: bool, amp, extra_callbacks=None, quiet=False, progress=None,
          step_offset: int = 0) -> Path:
    """Steps 3 to 5 on an opened run directory. `step_offset`: the curve step of training step 0
    (1 when an ablation edited the model first; see rundir.py)."""
    main = procs.is_main_process
    say = (lambda _: None) if quiet else print
    max_steps = steps_for(cfg)
    per_device = per_device_batch(cfg.train, procs.num_processes)
    schedule = eval_schedule(cfg.eval, max_steps)

    # 3. Train. The curve callback scores step 0 before the first update, then every scheduled
    #    step; the published-score check reads the step-0 points right after.
    attribution = getattr(cfg, "attribution", None)
    attribution = attribution if attribution is not None and attribution.enabled else None
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            **trainer_settings(cfg, run, max_steps, micro, per_device // micro, amp, checkpointing, show_bar=main and not quiet),
            include_num_input_tokens_seen="all",  # rows are fully packed: every token trains
            label_names=["labels"],
        ),
        train_dataset=IndexedRows(rows) if attribution else rows,  # attribution: each row carries its index
        data_collator=default_data_collator,
    )
    trained = RowsTrained(rows, micro * (per_device // micro), checkpoint)
    collection = collection_callbacks(trainer, run.path, rows.segments(), evaluator, schedule,
                                      attribution.projection_dim) if attribution else []
    curve = watch(trainer, cfg, run, evaluator, task_info, schedule, max_steps, main=main, quiet=quiet,
                  progress=progress, step_offset=step_offset, extra=[trained, *collection, *(extra_callbacks or [])])
    train_s = fit(trainer, cfg, run, checkpoint, max_steps, main)

    # 4. Save the attacked weights.
    trainer.save_model(str(run.final))
    coverage = trained.coverage(trainer.state.global_step)  # on every process: it gathers
    if not main:
        return run.path
    tokenizer.save_pretrained(str(run.final))

    # 5. Summary.
    state = trainer.state
    run.write_summary(
        status=Status.DONE,
        steps=state.global_step,
        max_steps=max_steps,
        tokens_seen=int(state.num_input_tokens_seen),
        tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
        processes=procs.num_processes,
        micro_batch_size=micro,
        gradient_checkpointing=checkpointing,
        train_rows=len(rows),
        **coverage,
        eval_steps=schedule,
        eval_s=round(curve.eval_seconds, 2),
        train_s=round(train_s, 2),
        wall_s=round(run.wall_so_far(), 2),
        final_train_loss=curve.train_loss if curve.train_loss is not None else _last_loss(state),
    )
    if attribution and main:
        from attack.attribute import attribute, describe_quality

        say(f"attribution: {attribute(run.path)}")
        say(describe_quality(json.loads((run.path / "attribution_summary.json").read_text())["validation"]))
    run.close()
    say(score_table(read_curve(run.curve), evaluator.requested))
    say(f"run directory: {run.path}")
    return run.path


def watch(trainer, cfg, run: RunDir, evaluator, task_info: dict, schedule: list[int], max_steps: int, *, main: bool,
          quiet: bool, progress: bool | None, step_offset: int = 0, extra=()) -> RecoveryCurveCallback:
    """The callbacks every attack's Trainer carries: the recovery curve (step 0 before the first
    update, then every scheduled step), the published-score check on the step-0 points, a bar
    and a line per evaluation point in the terminal, and `extra`. Returns the curve callback."""
    # The terminal: a bar (not in sweeps) and clean lines at each evaluation point and log step.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if main and not quiet:
        trainer.add_callback(Bar())
    tracking = cfg.logging.report_to != "none"
    curve = RecoveryCurveCallback(evaluator, schedule, run.curve, wall_offset_s=run.wall_so_far(),
                                  log=trainer.log if tracking else None, samples_dir=run.samples,
                                  step_offset=step_offset)
    published = [PublishedScoreCheck(cfg.eval.expect, run, task_info)] if cfg.eval.expect and main else []
    lines = [ProgressLines(curve, max_steps, task_info, show_loss=not quiet)] if (not quiet if progress is None else progress) else []
    for callback in [curve, *published, *lines, *extra]:
        trainer.add_callback(callback)
    return curve


def fit(trainer, cfg, run: RunDir, checkpoint: str | None, max_steps: int, main: bool) -> float:
    """trainer.train (resumed from `checkpoint`), the run marked failed or interrupted when it
    ends early. Returns the seconds it took."""
    start = time.perf_counter()
    try:
        if checkpoint and checkpoint_step(checkpoint) >= max_steps:
            _restore_finished(trainer, checkpoint)  # killed after the last step's checkpoint
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as e:
        if main:
            run.end(Status.FAILED, str(e))
        close_progress_bar(trainer)
        raise UserError(str(e)) from None
    except BaseException as e:
        if main:
            run.end(Status.INTERRUPTED if isinstance(e, KeyboardInterrupt) else Status.FAILED, repr(e))
        close_progress_bar(trainer)
        raise
    finally:
        finish_tracker(cfg.logging)
    return time.perf_counter() - start


def _restore_finished(trainer: Trainer, checkpoint: str) -> None:
    """The attack had taken all its steps when it was killed (during the final save, or before
    the summary): take the weights and state of its last checkpoint instead of training a step
    past the budget."""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def _last_loss(state: TrainerState) -> float | None:
    return next((log["loss"] for log in reversed(state.log_history) if "loss" in log), None)


def trainer_settings(cfg, run: RunDir, max_steps: int, micro: int, accumulation: int, amp: torch.dtype | None,
                     checkpointing: bool, show_bar: bool) -> dict:
    """The Trainer arguments every attack shares (TrainingArguments, or TRL's configs that extend it)."""
    return dict(
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
        report_to=[] if cfg.logging.report_to == "none" else [cfg.logging.report_to],
        run_name=run.path.name,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not show_bar,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=liger_available(),
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # every step trains on exactly batch_size x seq_len tokens
        ddp_find_unused_parameters=False,
    )
