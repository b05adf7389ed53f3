"""Step 0 scored once per model: the cells of a sweep on the same model share their step-0 point
(attack/preattack.py), and what they read back is what they would have scored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from attack.cells import load_sweep
from attack.recipes import run_attack
from attack.records import read_curve
from attack.rundir import RunDir
from attack.sweep import run_sweep
from eval_callbacks.callback import read_samples


def step0(run) -> dict:
    return {(r["task"], r["metric"]): (r["value"], r["stderr"], r["n"]) for r in read_curve(RunDir(run).curve)
            if r["step"] == 0}


def reused(run) -> bool:
    return RunDir(run).summary["step0_reused"]


def _sweep(tmp_path, world, llama_dir, attacks, name="s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "output": str(tmp_path / "runs"),
        "base": {"data": {"path": str(world["attack"]), "seq_len": 32},
                 "train": {"batch_size": 2, "max_steps": 2, "log_every": 1},
                 "adapter": {"rank": 2, "alpha": 4},
                 "eval": {"tasks": ["toy_target_seen", "toy_general"], "include_path": [str(world["tasks"])], "every": 2,
                          "kl_task": "toy_general"}},
        "models": [{"label": "m", "name": str(llama_dir), "role": "unlearned"}],
        "attacks": attacks, "seeds": [0]}))
    return path


@pytest.mark.slow
def test_the_cells_on_one_model_score_step_0_once_and_read_back_what_they_would_have_scored(world, llama_dir, tmp_path):
    path = _sweep(tmp_path, world, llama_dir, [{"label": "lr-1e-3", "train": {"lr": 1e-3}},
                                               {"label": "lr-1e-2", "train": {"lr": 1e-2}},
                                               {"label": "fp16", "kind": "quantize", "quantize": {"method": "fp16"}}])
    run_sweep(path, quiet=True, log=lambda _: None)
    _, cells = load_sweep(path)
    first, second, quantized = (RunDir.for_config(c.config).path for c in cells)
    assert not reused(first) and reused(second)
    # the edit loads the model in fp32: where the LoRA's base is fp32 too (a CPU) it shares the point
    kept = list((tmp_path / "runs" / ".pre-attack").glob("*.json"))
    assert reused(quantized) == (len(kept) == 1) and len(kept) <= 2
    # the KL guard's reference is kept beside each step 0 (the other cells read it, not compute it)
    assert sorted(f.name for f in kept[0].parent.glob("*.kl.pt")) == sorted(f.stem + ".kl.pt" for f in kept)
    for key, (value, _, _) in step0(quantized).items():
        assert abs(value - step0(first)[key][0]) < 1e-6, key
    # the second cell reads the first one's point back, its per-question records too
    assert step0(second) == step0(first)
    assert [r for r in read_samples(RunDir(second).samples) if r["step"] == 0] == \
           [r for r in read_samples(RunDir(first).samples) if r["step"] == 0]
    assert any(r["step"] == 2 for r in read_curve(RunDir(second).curve))  # later points are its own
    # ... which is what it scores with nothing to read: the same attack run alone
    alone = run_attack(cells[1].config.model_copy(update={"output": cells[1].config.output.model_copy(
        update={"dir": str(tmp_path / "alone")})}), quiet=True)
    assert not reused(alone)
    for key, (value, _, n) in step0(alone).items():
        assert abs(value - step0(second)[key][0]) < 1e-6 and n == step0(second)[key][2], key

    # another evaluation (an added task) or a model rebuilt in place is scored again
    wider = _sweep(tmp_path, world, llama_dir, [{"label": "wider", "train": {"lr": 3e-3},
                                                  "eval": {"tasks": ["toy_target_seen", "toy_general", "toy_target_heldout"]}}],
                   name="wider")
    run_sweep(wider, quiet=True, log=lambda _: None)
    assert not reused(RunDir.for_config(load_sweep(wider)[1][0].config).path)
    weights = next(p for p in sorted(Path(llama_dir).iterdir()) if p.suffix == ".safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        rebuilt = _sweep(tmp_path, world, llama_dir, [{"label": "rebuilt", "train": {"lr": 5e-3}}], name="rebuilt")
        run_sweep(rebuilt, quiet=True, log=lambda _: None)
        assert not reused(RunDir.for_config(load_sweep(rebuilt)[1][0].config).path)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_model_built_by_the_caller_shares_nothing(make_config, tmp_path):
    """cfg.model may not describe a model the caller built (a benchmark's random init)."""
    from attack.config import AdapterConfig
    from attack.model import load_model

    cfg = make_config(train={"lr": 1e-3, "batch_size": 4, "max_steps": 2, "log_every": 1})
    run = run_attack(cfg, quiet=True, cell={"cell_id": "c", "sweep": "s"},
                     model=load_model(cfg.model, AdapterConfig(kind="lora")))
    assert not reused(run) and not (tmp_path / "runs" / ".pre-attack").exists()
