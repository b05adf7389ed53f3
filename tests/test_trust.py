"""No code runs because a file names it: a GRPO reward module, or a task YAML's !function, runs
only with --trust-remote-code on the command line; without it the run stops in one line that
names the file and the flag, before anything is written and before the code is imported."""

from __future__ import annotations

import pytest
import yaml

from attack.__main__ import main
from attack.config.files import TRUST_ENV

SENTINEL_CODE = ("import pathlib\npathlib.Path({path!r}).write_text('ran')\n\n"
                 "def {fn}(*args, **kwargs):\n    return [0.0] * len(kwargs.get('completions') or [])\n")


@pytest.fixture(autouse=True)
def no_grant(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _config(world, llama_dir, tmp_path, **more) -> str:
    data = {"model": {"name": str(llama_dir)},
            "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])], "every": 2},
            "train": {"batch_size": 8, "max_steps": 2},
            "output": {"dir": str(tmp_path / "runs")}, **more}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "c.yaml")


def test_a_reward_module_named_by_a_config_does_not_run_without_the_flag(world, llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodule.py").write_text(SENTINEL_CODE.format(path=str(tmp_path / "ran.txt"), fn="fn"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The hide of the creature is", "answer": "green"}\n')
    config = _config(world, llama_dir, tmp_path, kind="grpo",
                     grpo={"prompts_path": str(prompts), "reward": "mymodule:fn", "num_generations": 2},
                     adapter={"rank": 2})
    for argv in (["--config", config], ["--config", config, "--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "mymodule.py" in err[0] and "--trust-remote-code" in err[0], err
    assert not (tmp_path / "ran.txt").exists() and not (tmp_path / "runs").exists()


def test_a_task_function_does_not_run_without_the_flag(world, llama_dir, tmp_path, monkeypatch, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(SENTINEL_CODE.format(path=str(tmp_path / "ran.txt"), fn="docs"))
    source = (world["tasks"] / "toy_target_seen.yaml").read_text()
    body = yaml.safe_load(source) if "!function" not in source else None
    assert body is not None
    body.update(task="coded_task", process_docs="PLACEHOLDER")
    if "dataset_kwargs" in body:  # the data files stay where the world wrote them
        files = body["dataset_kwargs"]["data_files"]
        body["dataset_kwargs"]["data_files"] = {k: str(world["tasks"] / v) for k, v in files.items()}
    (tasks / "coded_task.yaml").write_text(yaml.safe_dump(body).replace("PLACEHOLDER", "!function utils.docs"))
    config = _config(world, llama_dir, tmp_path, data={"path": str(world["attack"]), "seq_len": 64})
    for argv in (["--config", config, "--eval-tasks", "coded_task", "--eval-include", str(tasks)],
                 ["--config", config, "--eval-tasks", "coded_task", "--eval-include", str(tasks), "--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "coded_task.yaml" in err[0] and "--trust-remote-code" in err[0], err
    assert not (tmp_path / "ran.txt").exists() and not (tmp_path / "runs").exists()


def test_a_sweep_naming_reward_code_needs_the_flag(world, llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The hide of the creature is", "answer": "green"}\n')
    sweep = {"output": str(tmp_path / "runs"),
             "base": {"eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])]}},
             "models": [{"label": "m", "name": str(llama_dir)}],
             "attacks": [{"label": "g", "kind": "grpo", "grpo": {"prompts_path": str(prompts), "reward": "mymodule:fn",
                                                                  "num_generations": 2}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mymodule.py" in err[0] and "--trust-remote-code" in err[0], err
