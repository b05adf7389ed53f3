"""Step 0 scored once per model: the attacks of a sweep on the same model share their step-0 point
(attack/preattack.py), and what they read back is what they would have scored."""

from __future__ import annotations

import os
from pathlib import Path

from attack.recipes import run_attack
from attack.records import read_curve
from attack.rundir import RunDir
from eval_callbacks.callback import read_samples


def step0(run) -> dict:
    return {(r["task"], r["metric"]): (r["value"], r["stderr"], r["n"]) for r in read_curve(RunDir(run).curve)
            if r["step"] == 0}


def reused(run) -> bool:
    return RunDir(run).summary["step0_reused"]


def test_attacks_on_one_model_score_step_0_once_and_read_back_what_they_would_have_scored(make_config, tmp_path):
    cfg = make_config(train={"lr": 1e-3, "batch_size": 4, "max_steps": 3, "log_every": 1})
    first = run_attack(cfg, quiet=True)
    assert not reused(first)
    kept = list((tmp_path / "runs" / ".pre-attack").glob("*.json"))
    assert len(kept) == 1

    # another attack on the same model and evaluation reads step 0 back, records included
    other = make_config(train={"lr": 5e-3, "batch_size": 4, "max_steps": 3, "log_every": 1, "seed": 1})
    second = run_attack(other, quiet=True)
    assert reused(second) and step0(second) == step0(first)
    assert [r for r in read_samples(RunDir(second).samples) if r["step"] == 0] == \
           [r for r in read_samples(RunDir(first).samples) if r["step"] == 0]
    # ... which is what it scores itself with nothing to read (another output folder)
    alone = run_attack(other.model_copy(update={"output": other.output.model_copy(update={"dir": str(tmp_path / "alone")})}),
                       quiet=True)
    assert not reused(alone)
    for key, (value, _, n) in step0(alone).items():
        assert abs(value - step0(second)[key][0]) < 1e-6 and n == step0(second)[key][2], key
    # later points are the attack's own
    assert any(r["step"] == 3 for r in read_curve(RunDir(second).curve))

    # another evaluation (an added task) or a model rebuilt in place is scored again
    wider = make_config(train={"lr": 5e-3, "batch_size": 4, "max_steps": 3, "log_every": 1, "seed": 2},
                        eval={**cfg.eval.model_dump(), "tasks": [*cfg.eval.tasks, "toy_target_heldout"]})
    assert not reused(run_attack(wider, quiet=True))
    weights = next(p for p in sorted(Path(cfg.model.name).iterdir()) if p.suffix == ".safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        rebuilt = make_config(train={"lr": 5e-3, "batch_size": 4, "max_steps": 3, "log_every": 1, "seed": 3})
        assert not reused(run_attack(rebuilt, quiet=True))
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_model_built_by_the_caller_shares_nothing(make_config, tmp_path, llama_dir):
    """cfg.model may not describe a model the caller built (a benchmark's random init)."""
    from attack.config import AdapterConfig
    from attack.model import load_model

    cfg = make_config(train={"lr": 1e-3, "batch_size": 4, "max_steps": 3, "log_every": 1})
    run = run_attack(cfg, quiet=True, model=load_model(cfg.model, AdapterConfig(kind="lora")))
    assert not reused(run) and not (tmp_path / "runs" / ".pre-attack").exists()
