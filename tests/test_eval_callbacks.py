"""eval_callbacks alone: schedules, an evaluator that leaves training untouched, correct_prob."""

import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eval_callbacks import LiveEvaluator, linear_schedule, log_schedule
from eval_callbacks.runner import correct_probability


def test_schedules():
    assert linear_schedule(10, 4) == [0, 4, 8, 10]
    assert linear_schedule(8, 4) == [0, 4, 8]
    assert log_schedule(1000, 4) == [0, 1, 10, 100, 1000]
    with pytest.raises(ValueError):
        linear_schedule(10, 0)


def test_evaluation_restores_mode_and_rngs_and_builds_tasks_once(world, llama_dir, monkeypatch):
    import lm_eval.tasks

    built = []
    original = lm_eval.tasks.TaskManager.__init__

    def counting(self, *a, **kw):
        built.append(1)
        original(self, *a, **kw)

    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__", counting)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    ev = LiveEvaluator(model, world["tokenizer"], ["toy_target_seen", "toy_general"], include_path=[str(world["tasks"])])
    model.train()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    first = ev.evaluate()
    for _ in range(2):
        assert ev.evaluate() == first  # same weights, same scores
    assert model.training
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert len(built) == 1 and ev._lm is not None


def test_correct_probability_is_softmax_of_choice_loglikelihoods():
    sample = {"filtered_resps": [(-1.0, False), (-2.0, False), (-3.0, False)], "target": 1, "doc": {}}
    p = math.exp(-2) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert correct_probability(None, sample) == pytest.approx(p)


def test_a_task_yaml_beside_its_data_runs_from_any_directory(world, llama_dir, tmp_path, monkeypatch):
    """data_files: my_task.jsonl (relative) is found from the task's folder, not only the current one."""
    from transformers import AutoModelForCausalLM

    from eval_callbacks import LiveEvaluator

    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_task.jsonl").write_text('{"question": "Is the sky blue?", "choices": ["yes", "no"], "answer": 0}\n')
    (folder / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: my_task.jsonl\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    evaluator = LiveEvaluator(model, world["tokenizer"], ["my_task"], include_path=[str(folder)])
    assert {(r["task"], r["metric"]) for r in evaluator.evaluate()} >= {("my_task", "acc")}
