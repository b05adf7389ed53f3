"""The fine-tuning attack (kind: finetune): train the model under test on an attack corpus,
LoRA or full, and score the live model on held-out tasks at scheduled steps.

    1. setup     check every input and build the model, corpus and evaluator; writes no run files
    2. open      the run directory: config, environment, tasks (or reopen it to resume); with
                 perturb, step 0 is scored and the weights shrunk and perturbed first
    3. train     HF Trainer; the recovery-curve callback evaluates at the scheduled steps
    4. save      the attacked weights (LoRA adapter in PEFT format, or the full model), and
                 summary.json: steps, tokens, documents seen, timings
"""

from __future__ import annotations

from pathlib import Path

from attack.config import FinetuneConfig
from attack.evaluation import attack_requests, check_requests_held_out
from attack.model import apply_adapter, load_model, shrink_perturb
from attack.recipes import common, training
from attack.speed import micro_batch
from eval_callbacks import RecoveryCurveCallback


def run(cfg: FinetuneConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None, model=None) -> Path:
    # 1. Setup. Every check of the user's input, cheapest first. The prepared corpus goes to its
    #    own cache (shared by every run); nothing is written to the run directory yet.
    a = common.setup(cfg, extra_callbacks, quiet, cell, progress)
    a.share_step0 = model is None
    if cfg.attribution.enabled:
        from attack.attribution.collect import require_bergson

        require_bergson()
    rows = common.corpus(a)
    if model is None:  # (given: built by the caller in the precision the policy in model.py asks)
        model = load_model(cfg.model, cfg.adapter)
    if not cfg.model.load_in_4bit:  # (4-bit weights are placed on the GPU as they load)
        model = model.to(common.device())  # before the micro-batch is measured on it
    checkpoint, perturbed = None, None
    if cfg.perturb.active:
        # Shrink-and-perturb first: the unmodified model is curve step 0, the perturbed one step
        # 1 (scored by the fine-tune's first point), so the perturbation's own effect reads off
        # the curve. A resume perturbs again from the same seed, without scoring step 0 again.
        before, task_info = common.evaluator(a, model)
        checkpoint = common.open_run(a, task_info)
        if a.main and checkpoint is None:
            RecoveryCurveCallback(before, [0], a.run.curve, samples_dir=a.run.samples,
                                  pre_attack=a.pre_attack(before)).record(0, 0)
        perturbed = shrink_perturb(model, cfg.perturb.shrink, cfg.perturb.noise, cfg.train.seed)
    model = apply_adapter(model, cfg.adapter, bool(cfg.train.gradient_checkpointing))
    micro, checkpointing = micro_batch(cfg.train, model, a.per_device, cfg.data.seq_len, len(a.tokenizer), a.amp)
    evaluator, task_info = common.evaluator(a, model)
    check_requests_held_out(attack_requests(cfg), evaluator.questions())  # a conversational corpus's requests

    # 2. Open the run directory.
    if not cfg.perturb.active:
        checkpoint = common.open_run(a, task_info)
    elif a.main:
        a.run.write_summary(perturb=dict(shrink=cfg.perturb.shrink, noise=cfg.perturb.noise, seed=cfg.train.seed,
                                         relative_change=round(perturbed, 6)))

    # 3-4. Train, evaluating on schedule; save the attacked weights and the summary.
    return training.fine_tune(a, model, rows, evaluator, task_info, checkpoint, micro=micro, checkpointing=checkpointing,
                            attribution=cfg.attribution if cfg.attribution.enabled else None)
