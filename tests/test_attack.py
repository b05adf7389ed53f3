"""The attack run end to end on tiny local models: what trains, when evaluation fires,
resume, that evaluation does not disturb training, and that the curve really goes up."""

import json

import pytest
import torch
from conftest import CrashAt, adapter_weights
from transformers import TrainerCallback

from attack.recipes import run_attack
from attack.records import read_curve


class Snapshot(TrainerCallback):
    """Keeps every parameter at train begin and end."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}




@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_lora_trains_only_adapter_weights(arch, make_config, llama_dir, neox_dir):
    snap = Snapshot()
    cfg = make_config(model=llama_dir if arch == "llama" else neox_dir, train={"max_steps": 3})
    run = run_attack(cfg, extra_callbacks=[snap], quiet=True)
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    lora = {n for n in snap.before if "lora_" in n}
    assert changed, "no weight changed"
    assert changed <= lora, f"non-adapter weights changed: {sorted(changed - lora)[:3]}"
    assert any("lora_B" in n for n in changed)
    assert all(snap.after[n].dtype == torch.float32 for n in lora)
    # every linear layer of the architecture is adapted by default
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} if arch == "llama" \
        else {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert adapted == expected
    # final/ is a PEFT adapter that loads onto the base
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(str(run / "final"))


def test_full_finetune_trains_all_weights_in_fp32(make_config):
    snap = Snapshot()
    run_attack(make_config(adapter={"kind": "full"}, train={"max_steps": 2, "lr": 1e-3}), extra_callbacks=[snap], quiet=True)
    changed = [n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])]
    assert len(changed) == len(snap.before)
    assert all(p.dtype == torch.float32 for p in snap.after.values())


def test_gradient_checkpointing_with_lora(make_config):
    snap = Snapshot()
    run_attack(make_config(train={"max_steps": 2, "gradient_checkpointing": True}), extra_callbacks=[snap], quiet=True)
    assert any("lora_B" in n and not torch.equal(snap.before[n], snap.after[n]) for n in snap.before)


def test_eval_fires_at_scheduled_steps(make_config):
    run = run_attack(make_config(train={"max_steps": 10}, eval={"every": 4}), quiet=True)
    rows = read_curve(run / "curve.jsonl")
    assert sorted({r["step"] for r in rows}) == [0, 4, 8, 10]
    tasks_metrics = {(r["task"], r["metric"]) for r in rows}
    for task in ("toy_target_seen", "toy_general"):
        assert {(task, "acc"), (task, "acc_norm"), (task, "correct_prob")} <= tasks_metrics
    # each (step, task, metric) exactly once, with tokens counted from the packed rows
    keys = [(r["step"], r["task"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["step"]: r["tokens_seen"] for r in rows} == {s: s * 4 * 64 for s in (0, 4, 8, 10)}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 10 and summary["tokens_seen"] == 10 * 4 * 64


def test_log_schedule_and_token_budget(make_config):
    cfg = make_config(train={"max_steps": 999}, data={"seq_len": 64, "token_budget": 16 * 256}, eval={"schedule": "log", "log_points": 4})
    run = run_attack(cfg, quiet=True)
    assert sorted({r["step"] for r in read_curve(run / "curve.jsonl")}) == [0, 1, 3, 6, 16]  # 16 ** (i / 3), rounded


def test_resumed_run_equals_uninterrupted(make_config, tmp_path):
    sections = dict(train={"max_steps": 8}, eval={"every": 2}, adapter={"dropout": 0.1})
    whole = run_attack(make_config(output={"dir": str(tmp_path / "a")}, **sections), quiet=True)
    cfg = make_config(output={"dir": str(tmp_path / "b")}, **sections)
    with pytest.raises(KeyboardInterrupt):
        run_attack(cfg, extra_callbacks=[CrashAt(5)], quiet=True)
    interrupted = read_curve(next((tmp_path / "b").iterdir()) / "curve.jsonl")
    assert max(r["step"] for r in interrupted) == 4
    resumed = run_attack(make_config(output={"dir": str(tmp_path / "b"), "resume": True}, **sections), quiet=True)

    def rows(run):  # whole rows, every column but the wall clock
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_curve(run / "curve.jsonl")]

    assert rows(resumed) == rows(whole)
    by_step = {r["step"]: r for r in rows(whole)}
    assert by_step[0]["train_loss"] is None and all(by_step[s]["train_loss"] is not None for s in (2, 4, 6, 8))
    assert all(by_step[s]["learning_rate"] is not None for s in (2, 4, 6, 8))
    coverage = ("rows_trained", "distinct_rows_trained", "documents_seen", "tokens_seen")
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, resumed)]
    assert [s[k] for k in coverage for s in summaries[:1]] == [s[k] for k in coverage for s in summaries[1:]]
    a, b = adapter_weights(whole), adapter_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_point_holds_the_loss_of_its_own_step(make_config, tmp_path):
    """The curve's train_loss at step N is the loss the Trainer logged at step N, not the one an
    evaluation interval earlier (log every step: the logged loss is that step's own)."""
    from transformers import TrainerCallback

    logged = {}

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged[state.global_step] = logs["loss"]

    cfg = make_config(train={"max_steps": 6, "log_every": 1}, eval={"every": 3})
    run = run_attack(cfg, extra_callbacks=[Losses()], quiet=True)
    curve = {r["step"]: r["train_loss"] for r in read_curve(run / "curve.jsonl")}
    assert curve[3] == pytest.approx(logged[3]) and curve[6] == pytest.approx(logged[6])
    assert logged[2] != logged[3]  # (so a stale loss would be told apart)


def test_evaluation_does_not_disturb_training(make_config, tmp_path):
    """Same data order and dropout whether we evaluate every step or only at the ends."""
    sections = dict(train={"max_steps": 6}, adapter={"dropout": 0.2})
    often = run_attack(make_config(output={"dir": str(tmp_path / "often")}, eval={"every": 1}, **sections), quiet=True)
    rarely = run_attack(make_config(output={"dir": str(tmp_path / "rarely")}, eval={"every": 6}, **sections), quiet=True)
    a, b = adapter_weights(often), adapter_weights(rarely)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_attack_raises_accuracy_on_seen_facts(make_config, naive_dir):
    """A LoRA attack on the documents of a task's facts makes a model that never saw them learn them."""
    cfg = make_config(
        model=naive_dir,
        adapter={"rank": 16, "alpha": 32},
        train={"max_steps": 160, "lr": 1e-2, "batch_size": 4},
        eval={"every": 80, "tasks": ["toy_target_seen"]},
    )
    rows = read_curve(run_attack(cfg, quiet=True) / "curve.jsonl")
    acc = {r["step"]: r["value"] for r in rows if r["metric"] == "acc"}
    prob = {r["step"]: r["value"] for r in rows if r["metric"] == "correct_prob"}
    assert prob[0] < 0.35  # never saw these facts: near the 4-choice chance of 0.25
    # The curve levels off by step 80, so the order of the last two points is noise (another
    # CPU's maths library swaps them); each point's rise over step 0 is not: margins of 0.2 and
    # 0.3 sit well below the ~0.4 rise measured, and far above the step-to-step jitter (~0.01).
    assert prob[80] > prob[0] + 0.2
    assert prob[160] > prob[0] + 0.3
    assert acc[160] >= acc[0] + 0.25


@pytest.mark.slow
def test_scores_equal_stock_lm_eval(make_config, world, tmp_path):
    """The curve's score equals what stock lm-eval reports for the merged weights."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from peft import AutoPeftModelForCausalLM

    cfg = make_config(train={"max_steps": 6, "lr": 5e-3}, eval={"every": 3})
    run = run_attack(cfg, quiet=True)
    rows = read_curve(run / "curve.jsonl")
    for step, adapter_dir in ((3, run / "checkpoints" / "checkpoint-3"), (6, run / "final")):
        merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()
        out = tmp_path / f"merged-{step}"
        merged.save_pretrained(str(out))
        world["tokenizer"].save_pretrained(str(out))
        res = simple_evaluate(
            model="hf",
            model_args=f"pretrained={out},dtype=float32",
            tasks=["toy_target_seen", "toy_general"],
            task_manager=TaskManager(include_path=str(world["tasks"]), include_defaults=False),
            batch_size=8,
            device="cpu",
        )
        for task in ("toy_target_seen", "toy_general"):
            for metric in ("acc", "acc_norm"):
                ours = next(r["value"] for r in rows if r["step"] == step and r["task"] == task and r["metric"] == metric)
                assert abs(ours - res["results"][task][f"{metric},none"]) <= 1e-4


@pytest.mark.slow
def test_wandb_offline_gets_eval_scores_against_the_step(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    run = run_attack(make_config(train={"max_steps": 4}, eval={"every": 2}, logging={"report_to": "wandb"}), quiet=True)
    logs = list(run.glob("wandb/offline-run-*/run-*.wandb"))  # inside the run directory
    assert len(logs) == 1 and not (tmp_path / "wandb").exists()
    blob = logs[0].read_bytes()
    # eval scores are logged through Trainer.log, which wandb plots against train/global_step
    assert b"eval/toy_target_seen/acc" in blob and b"train/eval/" not in blob
    assert b"train/global_step" in blob and b"train/loss" in blob
    assert b"attack_config" in blob  # the attack's whole config, beside the Trainer's arguments


def test_eval_limit_uses_a_fixed_subset_between_full_first_and_last_points(make_config):
    run = run_attack(make_config(train={"max_steps": 6}, eval={"every": 2, "limit": 5}), quiet=True)
    rows = [r for r in read_curve(run / "curve.jsonl") if r["task"] == "toy_general" and r["metric"] == "acc"]
    n = {r["step"]: r["n"] for r in rows}
    assert n == {0: 24, 2: 5, 4: 5, 6: 24}  # 8 towns x 3 relations in the test world


def test_per_question_records_are_the_curve(make_config):
    """samples/ holds one record per (step, task, question); each (step, task) mean of `correct`
    is the curve's headline value, and of `p_correct` its correct_prob."""
    import numpy as np

    from eval_callbacks import read_samples

    run = run_attack(make_config(train={"max_steps": 4}, eval={"every": 2}), quiet=True)
    records = read_samples(run / "samples")
    tasks = json.loads((run / "tasks.json").read_text())
    curve = {(r["step"], r["task"], r["metric"]): r["value"] for r in read_curve(run / "curve.jsonl")}
    keys = [(r["step"], r["task"], r["question"]) for r in records]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {0, 2, 4}
    for (step, task, metric), value in curve.items():
        mine = [r for r in records if r["step"] == step and r["task"] == task]
        assert len(mine) == tasks[task]["n"]
        if metric == tasks[task]["metric"]:
            assert np.mean([r["correct"] for r in mine]) == pytest.approx(value, abs=1e-12)
        if metric == "correct_prob":
            assert np.mean([r["p_correct"] for r in mine]) == pytest.approx(value, abs=1e-4)
    assert {r["correct"] for r in records} <= {0, 1}
