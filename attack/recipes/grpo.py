"""The reinforcement-learning attack (kind: grpo): GRPO (TRL's GRPOTrainer) with a reward on a
split of prompts kept apart from the evaluation; the recovery curve is read on the evaluated
tasks exactly as for fine-tuning (the same callback, schedule, resume and run directory).

    1. setup     the model, the reward split (no question shared with an evaluated task), the
                 reward and the evaluator; writes no run files
    2. open      the run directory
    3. train     GRPOTrainer, LoRA through peft_config; the recovery-curve callback evaluates at
                 the scheduled steps, rewards.jsonl records the reward signal beside it
    4. save      the attacked weights: the LoRA adapter (PEFT format) or the full model
    5. summary   steps, tokens (prompts and completions), the last reward -> summary.json

What RL tells that supervised fine-tuning does not: rewards.jsonl's frac_reward_zero_std is
the share of groups whose completions all scored the same. Such a group has no advantage and
gives no gradient: a filtered model that never knew an answer never samples it, so its
rewards stay flat and RL has nothing to elicit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed
from trl import GRPOConfig as TrlGrpoConfig
from trl import GRPOTrainer

from attack.config import GrpoConfig, default_run_id, steps_for
from attack.errors import UserError, first_line
from attack.evaluation import check_disjoint, check_texts_disjoint, eval_schedule, find_eval_tasks, open_evaluator, score_table
from attack.model import (
    apply_adapter,
    autocast_dtype,
    check_only_adapter_trains,
    four_bit_config,
    load_model,
    load_tokenizer,
    lora_config,
    no_lora_targets,
)
from attack.recipes.finetune import fit, open_run, trainer_settings, watch
from attack.rewards import load_reward_split, reward_function
from attack.rundir import RunDir, Status, read_curve, read_rewards
from attack.speed import per_device_batch
from attack.tracking import check_tracker
from eval_callbacks.callback import append_rows


def run(cfg: GrpoConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    g = cfg.grpo
    run = RunDir(Path(cfg.output.dir) / (cfg.output.run_id or default_run_id(cfg)))
    say = (lambda _: None) if quiet else print
    procs = PartialState(cpu=not torch.cuda.is_available())
    main = procs.is_main_process

    # 1. Setup: every input checked before the run directory is written.
    run.check_writable(cfg.output.resume)
    max_steps = steps_for(cfg)
    per_device = per_device_batch(cfg.train, procs.num_processes)
    micro = cfg.train.micro_batch_size or per_device
    if cfg.model.load_in_4bit:
        four_bit_config()
    check_tracker(cfg.logging)
    tokenizer = load_tokenizer(cfg.model)
    tasks = find_eval_tasks(cfg.eval)
    prompts = load_reward_split(g)
    set_seed(cfg.train.seed)
    model = load_model(cfg.model, cfg.adapter)
    checkpointing = bool(cfg.train.gradient_checkpointing)
    if cfg.adapter.kind == "full":
        model = apply_adapter(model, cfg.adapter, checkpointing)
    amp = autocast_dtype(cfg.model.precision)
    # The evaluator scores this model object; TRL's LoRA wraps it in place, so it scores the
    # adapted model as it trains.
    evaluator, task_info = open_evaluator(cfg.eval, model, tokenizer, amp, tasks)
    evaluated = evaluator.questions()
    check_disjoint("grpo.prompts_path", {g.prompts_path: list(prompts["prompt"])}, evaluated)
    check_texts_disjoint(f"grpo.prompts_path ({g.prompts_path})", list(prompts["prompt"]), evaluated)
    reward = reward_function(g, model, tokenizer)
    schedule = eval_schedule(cfg.eval, max_steps)

    try:  # TRL's own checks (the batch against the groups) before anything is written
        args = TrlGrpoConfig(
            **trainer_settings(cfg, run, max_steps, micro, per_device // micro, amp, checkpointing,
                               show_bar=main and not quiet),
            num_generations=g.num_generations,
            max_completion_length=g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            beta=g.beta,
            loss_type=g.loss_type,
            scale_rewards=g.scale_rewards,
            generation_kwargs={"use_cache": True},  # the base config turns the cache off for training
        )
    except ValueError as e:
        raise UserError(f"GRPO settings: {first_line(e)}") from None

    # 2. Open the run directory.
    adapter = "full" if cfg.adapter.kind == "full" else f"LoRA r={cfg.adapter.rank}"
    checkpoint = open_run(cfg, run, task_info, cell, procs, say,
                          f"{cfg.model.name}: GRPO ({g.reward} reward, {g.loss_type} loss, beta {g.beta:g}), {adapter}, "
                          f"lr {cfg.train.lr:g}, {max_steps} steps of {cfg.train.batch_size // g.num_generations} prompts x "
                          f"{g.num_generations} completions from {len(prompts)} prompts, evaluated at {len(schedule)} points")

    # 3. Train. The Trainer is built here, not in setup: it creates its output folder.
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tokenizer,
                              peft_config=lora_config(cfg.adapter) if cfg.adapter.kind == "lora" else None)
    except ValueError as e:  # PEFT: LoRA target modules that match nothing
        run.end(Status.FAILED, str(e))
        raise (no_lora_targets(model, cfg.adapter, e) if "target" in str(e) else UserError(first_line(e))) from None
    if cfg.adapter.kind == "lora":
        for p in trainer.model.parameters():  # TRL keeps QLoRA adapters in bf16; this tool trains fp32
            if p.requires_grad:
                p.data = p.data.float()
        check_only_adapter_trains(trainer.model)
    signal = RewardLog(run.rewards, main)
    curve = watch(trainer, cfg, run, evaluator, task_info, schedule, max_steps, main=main, quiet=quiet,
                  progress=progress, extra=[signal, *(extra_callbacks or [])])
    train_s = fit(trainer, cfg, run, checkpoint, max_steps, main)

    # 4. Save the attacked weights.
    trainer.save_model(str(run.final))
    if not main:
        return run.path
    tokenizer.save_pretrained(str(run.final))

    # 5. Summary.
    state = trainer.state
    last = (read_rewards(run.rewards) or [{}])[-1]
    run.write_summary(
        status=Status.DONE,
        steps=state.global_step,
        max_steps=max_steps,
        tokens_seen=int(state.num_input_tokens_seen),
        processes=procs.num_processes,
        micro_batch_size=micro,
        gradient_checkpointing=checkpointing,
        eval_steps=schedule,
        eval_s=round(curve.eval_seconds, 2),
        train_s=round(train_s, 2),
        wall_s=round(run.wall_so_far(), 2),
        grpo=dict(prompts=len(prompts), reward=g.reward, completions_per_step=cfg.train.batch_size,
                  last_reward=last.get("reward"), last_frac_reward_zero_std=last.get("frac_reward_zero_std"),
                  judge_parse_failures=getattr(reward, "failures", None)),
    )
    run.close()
    say(score_table(read_curve(run.curve), evaluator.requested))
    say(f"run directory: {run.path}")
    return run.path


class RewardLog(TrainerCallback):
    """Appends GRPO's reward signal to rewards.jsonl at every logged step: mean, spread, the
    share of zero-spread groups, the KL to the model under test (when beta > 0), and each
    reward's own mean (and the judge's parse failures)."""

    KEYS = ("reward", "reward_std", "frac_reward_zero_std", "kl")

    def __init__(self, path: Path, main: bool):
        self.path, self.main = Path(path), main

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.main or not logs or "reward" not in logs:
            return
        row = {"step": state.global_step, **{k: logs[k] for k in self.KEYS if k in logs}}
        row.update({k: v for k, v in logs.items() if k.startswith(("rewards/", "judge/"))})
        append_rows(self.path, [row])
