"""The Trainer pieces of every kind that trains (finetune, GRPO, the fine-tune after an ablation):

    fine_tune(a, ...)   supervised training on the corpus with the HF Trainer, the curve callback
                        on it, the attacked weights saved and the run closed
    trainer_settings    the TrainingArguments every attack shares; optimizer_kwargs builds train.optimizer
    watch / fit         the callbacks every Trainer carries (curve, checkpoints, published check,
                        progress, signals, weights moved) and the guarded trainer.train
    trainer_summary     summary.json's fields of a Trainer run; check_moved: a run that changed nothing fails
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)

from attack import signals
from attack.checkpoints import TRAINER_STATE, Checkpointing, checkpoint_step
from attack.data import MixedRows, RowsTrained
from attack.errors import UserError
from attack.optimizers import RecordOptimizer, describe, trainer_optimizer
from attack.published import PublishedScoreCheck
from attack.recipes.common import Attack, closing, finish
from attack.records import Status
from attack.speed import kernels_scoped_to, liger_available
from attack.tracking import Bar, ProgressLines, close_progress_bar, finish_tracker
from eval_callbacks import NonFiniteLossError, RecoveryCurveCallback
from eval_callbacks.callback import averaged_weights


def fine_tune(a: Attack, model, rows, evaluator, task_info: dict, checkpoint: str | None, *, micro: int,
              checkpointing: bool, attribution=None) -> Path:
    """Supervised training on the packed corpus with the HF Trainer, on an opened run directory:
    the curve scores training step 0 before the first update (curve step cfg.training_offset), then
    every scheduled step; the attacked weights are saved and the run closed. `attribution`: the
    config section when gradients are collected (attack/attribution/)."""
    cfg, run = a.cfg, a.run
    with kernels_scoped_to(model):  # a kernel patch the Trainer applies ends with the attack
        if attribution is not None:
            from attack.attribution.collect import IndexedRows, collection_callbacks
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                **trainer_settings(a, micro, checkpointing),
                include_num_input_tokens_seen="all",  # rows are fully packed: every token trains
                label_names=["labels"],
                # a mixture's plan is its data order (and already shuffled within each source)
                **({"train_sampling_strategy": "sequential"} if isinstance(rows, MixedRows) else {}),
            ),
            **optimizer_kwargs(a),
            train_dataset=IndexedRows(rows) if attribution is not None else rows,  # each row carries its index
            data_collator=default_data_collator,
        )
        trained = RowsTrained(rows, micro * (a.per_device // micro), checkpoint)
        collection = collection_callbacks(trainer, run.attribution, rows.segments(), evaluator, a.schedule,
                                          attribution.projection_dim) if attribution is not None else []
        curve, moved = watch(a, trainer, evaluator, task_info, extra=collection, parts=[trained])
        train_s = fit(a, trainer, checkpoint)
        check_moved(a, moved)

        with closing(a):
            with averaged_weights(trainer.optimizer):  # schedule-free: final/ is the model the last point scored
                trainer.save_model(str(run.final))
            coverage = trained.coverage(trainer.state.global_step)  # on every process: it gathers
            if not a.main:
                return run.path
            a.tokenizer.save_pretrained(str(run.final))
            if attribution is not None:
                from attack.attribution.attribute import attribute, describe_quality

                a.say(f"attribution: {attribute(run.path)}")
                a.say(describe_quality(json.loads(run.attribution_summary.read_text())["validation"]))
            return finish(a, evaluator, trainer_summary(a, trainer, curve, train_s, micro, checkpointing),
                          tokens_per_step=cfg.tokens_per_step(), train_rows=len(rows), **coverage)


def trainer_summary(a: Attack, trainer, curve: RecoveryCurveCallback, train_s: float, micro: int,
                    checkpointing: bool) -> dict:
    """summary.json's fields that every Trainer-based attack has."""
    state = trainer.state
    return dict(steps=state.global_step, max_steps=a.max_steps,
                optimizer={"name": a.cfg.train.optimizer, **describe(trainer.optimizer)}, tokens_seen=int(state.num_input_tokens_seen),
                processes=a.procs.num_processes, micro_batch_size=micro, gradient_checkpointing=checkpointing,
                eval_steps=a.schedule, eval_s=round(curve.eval_seconds, 2),
                eval_point_s=[round(s, 3) for s in curve.point_seconds], step0_reused=curve.step0_reused,
                train_s=round(train_s, 2),
                final_train_loss=curve.train_loss if curve.train_loss is not None else _last_loss(state))


def watch(a: Attack, trainer, evaluator, task_info: dict, extra=(), parts=()) -> tuple[RecoveryCurveCallback, WeightsMoved]:
    """The callbacks every attack's Trainer carries: the recovery curve (training step 0 before
    the first update, then every scheduled step), checkpoints with the optimizer's record and the
    recipe's `parts` in them, sealed, the published-score check on the step-0 points, a bar and a
    line per evaluation point in the terminal, the recipe's `extra` and the caller's. Returns the
    curve callback and the check that weights moved."""
    cfg, run = a.cfg, a.run
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if a.main and not a.quiet:
        trainer.add_callback(Bar())
    tracking = cfg.logging.report_to != "none"
    curve = RecoveryCurveCallback(evaluator, a.schedule, run.curve, wall_offset_s=run.wall_so_far(),
                                  log=trainer.log if tracking else None, samples_dir=run.samples,
                                  step_offset=cfg.training_offset, pre_attack=a.pre_attack(evaluator))
    saves = Checkpointing(None if cfg.train.save_every else a.schedule, run.identity(cfg),
                          parts=[RecordOptimizer(cfg.train.optimizer), *parts])
    published = [PublishedScoreCheck(cfg.eval.expect, run, task_info)] if cfg.eval.expect and a.main else []
    show = not a.quiet if a.progress is None else a.progress
    lines = [ProgressLines(curve, a.max_steps, task_info, show_loss=not a.quiet)] if show else []
    moved = WeightsMoved()
    for callback in [StopOnSignal(), curve, moved, saves, *published, *lines, *extra, *a.extra_callbacks]:
        trainer.add_callback(callback)
    return curve, moved


def fit(a: Attack, trainer, checkpoint: str | None) -> float:
    """trainer.train (resumed from `checkpoint`), the run marked failed or interrupted when it
    ends early. Returns the seconds it took."""
    start = time.perf_counter()
    try:
        if checkpoint and checkpoint_step(checkpoint) >= a.max_steps:
            _restore_finished(trainer, checkpoint)  # killed after the last step's checkpoint
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as e:
        if a.main:
            a.run.end(Status.FAILED, str(e))
        close_progress_bar(trainer)
        raise UserError(str(e)) from None
    except BaseException as e:
        if a.main:
            a.run.end(Status.INTERRUPTED if isinstance(e, KeyboardInterrupt) else Status.FAILED, repr(e))
        close_progress_bar(trainer)
        raise
    finally:
        finish_tracker(a.cfg.logging)
    return time.perf_counter() - start


def _restore_finished(trainer: Trainer, checkpoint: str) -> None:
    """The attack had taken all its steps when it was killed (during the final save, or before
    the summary): take the weights and state of its last checkpoint instead of training a step
    past the budget."""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))


def _last_loss(state: TrainerState) -> float | None:
    return next((log["loss"] for log in reversed(state.log_history) if "loss" in log), None)


def optimizer_kwargs(a: Attack) -> dict:
    """The Trainer's keyword arguments that build train.optimizer (attack/optimizers.py)."""
    return trainer_optimizer(a.cfg.train)[1]


def trainer_settings(a: Attack, micro: int, checkpointing: bool) -> dict:
    """The Trainer arguments every attack shares (TrainingArguments, or TRL's configs that extend it)."""
    cfg = a.cfg
    return dict(
        **trainer_optimizer(cfg.train)[0],
        output_dir=str(a.run.checkpoints),
        max_steps=a.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.per_device // micro,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        bf16=a.amp is torch.bfloat16,
        fp16=a.amp is torch.float16,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        logging_steps=cfg.train.log_every,
        logging_nan_inf_filter=False,  # a NaN loss must surface, not be averaged away
        save_strategy="steps",
        # save_every, or only the last step here: Checkpointing adds every evaluation point
        save_steps=cfg.train.save_every or max(1, a.max_steps),
        save_total_limit=cfg.output.keep_checkpoints,
        report_to=[] if cfg.logging.report_to == "none" else [cfg.logging.report_to],
        run_name=a.run.path.name,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not (a.main and not a.quiet),
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=liger_available(),
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # every step trains on exactly batch_size x seq_len tokens
        ddp_find_unused_parameters=False,
    )


class WeightsMoved(TrainerCallback):
    """Whether training moved any trained weight: a fingerprint of each (float64 sum and norm)
    when training begins, compared when it ends. An attack whose every update was zero
    or not finite (a LoRA scale of 0, an infinite gradient norm at every step) leaves a flat
    curve that would read as robustness."""

    def __init__(self):
        self.moved: bool | None = None  # None: no step was trained here (a resume after the last step)

    @staticmethod
    def _fingerprint(model) -> list[tuple[float, float]]:
        with torch.no_grad():
            return [(float(torch.sum(p, dtype=torch.float64)), float(torch.linalg.vector_norm(p, dtype=torch.float64)))
                    for p in model.parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step, self.before = state.global_step, self._fingerprint(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step > self.start_step:
            self.moved = self._fingerprint(model) != self.before


def check_moved(a: Attack, moved: WeightsMoved, why: str | None = None) -> None:
    """A run that changed nothing ends failed, said in one line, never counted as robustness;
    where that can be the finding itself (`why`: RL whose every group of completions scored
    alike has no gradient), it finishes with a warning in summary.json that the report shows."""
    if moved.moved is not False:
        return
    if why is not None:
        if a.main:
            warning = f"the attack changed no trained weight: {why}"
            a.say(f"warning: {warning}")
            a.run.write_summary(warnings=[*((a.run.summary or {}).get("warnings") or []), warning])
        return
    message = ("the attack changed no trained weight: every update was zero or not finite (check adapter.alpha, "
               "train.lr and the data); a flat curve from it would read as robustness")
    if a.main:
        a.run.end(Status.FAILED, message)
    raise UserError(message)


class StopOnSignal(TrainerCallback):
    """A SIGTERM or Ctrl-C whose exception a finalizer swallowed still stops the attack, at the
    next optimizer step (attack/signals.py)."""

    def on_step_end(self, args, state, control, **kwargs):
        signals.raise_pending()

    on_substep_end = on_step_end
