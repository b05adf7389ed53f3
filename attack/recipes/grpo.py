"""The reinforcement-learning attack (kind: grpo): GRPO (TRL's GRPOTrainer) with a reward on a
split of prompts kept apart from the evaluation; the recovery curve is read on the evaluated
tasks exactly as for fine-tuning (the same callback, schedule, resume and run directory).

    1. setup     the model, the reward split (no question shared with an evaluated task), the
                 reward and the evaluator; writes no run files
    2. open      the run directory
    3. train     GRPOTrainer, LoRA through peft_config; the recovery-curve callback evaluates at
                 the scheduled steps, rewards.jsonl records the reward signal beside it
    4. save      the attacked weights (LoRA adapter in PEFT format, or the full model), and
                 summary.json: steps, tokens (prompts and completions), the last reward

What RL tells that supervised fine-tuning does not: rewards.jsonl's frac_reward_zero_std is
the share of groups whose completions all scored the same. Such a group has no advantage and
gives no gradient: a filtered model that never knew an answer never samples it, so its
rewards stay flat and RL has nothing to elicit.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from trl import GRPOConfig as TrlGrpoConfig
from trl import GRPOTrainer

from attack.config import GrpoConfig
from attack.errors import UserError, first_line
from attack.evaluation import attack_requests, check_requests_held_out
from attack.model import apply_adapter, check_only_adapter_trains, load_model, lora_config, no_lora_targets
from attack.recipes import common, training
from attack.records import Status, read_rewards
from attack.rewards import load_reward_split, reward_function
from attack.speed import kernels_scoped_to
from eval_callbacks.callback import append_rows, averaged_weights


def run(cfg: GrpoConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    g = cfg.grpo

    # 1. Setup: every input checked before the run directory is written.
    a = common.setup(cfg, extra_callbacks, quiet, cell, progress)
    micro = cfg.train.micro_batch_size or a.per_device
    prompts = load_reward_split(g)
    model = load_model(cfg.model, cfg.adapter)
    checkpointing = bool(cfg.train.gradient_checkpointing)
    if cfg.adapter.kind == "full":
        model = apply_adapter(model, cfg.adapter, checkpointing)
    # The evaluator scores this model object; TRL's LoRA wraps it in place, so it scores the
    # adapted model as it trains.
    evaluator, task_info = common.evaluator(a, model)
    evaluated = evaluator.questions()
    check_requests_held_out(attack_requests(cfg), evaluated)
    reward = reward_function(g, model, a.tokenizer, evaluator.judge, granted=cfg.model.trust_remote_code)
    if cfg.model.chat_template:  # conversational prompts: TRL puts them through the chat template
        prompts = prompts.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    try:  # TRL's own checks (the batch against the groups) before anything is written
        args = TrlGrpoConfig(
            **training.trainer_settings(a, micro, checkpointing),
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
    a.say(f"reward split: {len(prompts)} prompts")
    checkpoint = common.open_run(a, task_info)

    # 3. Train. The Trainer is built here, not in setup: it creates its output folder. A kernel
    #    patch it applies (Liger) is undone when the attack ends.
    with kernels_scoped_to(model):
        try:
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                                  **training.optimizer_kwargs(a),
                                  processing_class=a.tokenizer,
                                  peft_config=lora_config(cfg.adapter, model) if cfg.adapter.kind == "lora" else None)
        except ValueError as e:  # PEFT: LoRA target modules that match nothing
            a.run.end(Status.FAILED, str(e))
            raise (no_lora_targets(model, cfg.adapter, e) if "target" in str(e) else UserError(first_line(e))) from None
        if cfg.adapter.kind == "lora":
            for p in trainer.model.parameters():  # TRL keeps QLoRA adapters in bf16; this tool trains fp32
                if p.requires_grad:
                    p.data = p.data.float()
            check_only_adapter_trains(trainer.model)
        curve, moved = training.watch(a, trainer, evaluator, task_info, extra=[RewardLog(a.run.rewards, a.main)])
        train_s = training.fit(a, trainer, checkpoint)
        training.check_moved(a, moved, why="every group of completions scored alike at every step "
                                         "(rewards.jsonl: frac_reward_zero_std), so GRPO had no gradient: the model "
                                         "never sampled a rewarded answer")

        # 4. Save the attacked weights, and the summary with the last reward signal.
        with common.closing(a):
            with averaged_weights(trainer.optimizer):  # schedule-free: final/ is the model the last point scored
                trainer.save_model(str(a.run.final))
            if not a.main:
                return a.run.path
            a.tokenizer.save_pretrained(str(a.run.final))
            last = (read_rewards(a.run.rewards) or [{}])[-1]
            return common.finish(a, evaluator, training.trainer_summary(a, trainer, curve, train_s, micro, checkpointing),
                                 grpo=dict(prompts=len(prompts), reward=g.reward, completions_per_step=cfg.train.batch_size,
                                           last_reward=last.get("reward"),
                                           last_frac_reward_zero_std=last.get("frac_reward_zero_std"),
                                           judge_failures=getattr(reward, "failures", None)))


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
