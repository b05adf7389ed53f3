"""Faults: a run killed at any moment resumes to the uninterrupted result; one writer per run
directory; damaged checkpoints, diverged runs, incomplete models, SIGTERM and a full disk."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from attack.__main__ import main
from attack.config import load_config, read_yaml
from attack.recipes import run_attack
from attack.records import read_curve
from attack.rundir import RunDir
from attack.runlock import RunLock
from eval_callbacks import read_samples

SECTIONS = dict(train={"max_steps": 6}, eval={"every": 2}, adapter={"dropout": 0.1})


class Kill(TrainerCallback):
    """Stops the run at one moment; the test then leaves the run directory as kill -9 would."""

    def __init__(self, event, step):
        self.event, self.step = event, step

    def _maybe(self, state):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at {self.event} {self.step}")

    def on_step_end(self, args, state, control, **kw):
        if self.event == "step_end":
            self._maybe(state)

    def on_save(self, args, state, control, **kw):  # the checkpoint is on disk by now
        if self.event == "save":
            self._maybe(state)

    def on_train_end(self, args, state, control, **kw):  # before the final weights are saved
        if self.event == "train_end":
            self._maybe(state)


def _as_if_killed(run):
    """What kill -9 leaves: status running, the lock held by a process that no longer exists."""
    summary = json.loads((run / "summary.json").read_text())
    summary.update(status="running")
    (run / "summary.json").write_text(json.dumps(summary))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "since": 0}))


def _result(run):
    points = [{k: v for k, v in r.items() if k != "wall_s"} for r in read_curve(run / "curve.jsonl")]  # whole rows
    summary = json.loads((run / "summary.json").read_text())
    records = read_samples(run / "samples")
    return points, records, summary["status"], summary["steps"], summary["tokens_seen"], summary["rows_trained"]


def _damage_adapter(ckpt):
    f = ckpt / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])


def _empty_state(ckpt):
    (ckpt / "trainer_state.json").write_text("")


def _zeroed_adapter(ckpt):
    """The same size, other values: only the manifest's hash tells."""
    f = ckpt / "adapter_model.safetensors"
    tensors = {k: torch.zeros_like(v) for k, v in load_file(str(f)).items()}
    from safetensors.torch import save_file

    save_file(tensors, str(f), metadata={"format": "pt"})


def _without(name):
    def damage(ckpt):
        (ckpt / name).unlink()

    damage.__name__ = f"without_{name}"
    return damage


def _resealed(ckpt):
    """The manifest rewritten over whatever the checkpoint holds now (a copy or an edit that
    kept the manifest consistent): the checkpoint must prove itself by more than its own list."""
    from attack.checkpoints import MANIFEST, seal

    seal(ckpt, json.loads((ckpt / MANIFEST).read_text())["run"])


def _unlisted(name):
    def damage(ckpt):
        (ckpt / name).unlink()
        _resealed(ckpt)

    damage.__name__ = f"unlisted_{name}"
    return damage


def _stale_optimizer(ckpt):
    """checkpoint-6 holding the optimizer state of step 4, its manifest rewritten to match."""
    shutil.copy(ckpt.with_name("checkpoint-4") / "optimizer.pt", ckpt / "optimizer.pt")
    _resealed(ckpt)


def _linked_from_elsewhere(ckpt):
    """The checkpoint folder a link to a copy kept elsewhere (another run's, say)."""
    elsewhere = ckpt.parent.parent.parent / "elsewhere"
    shutil.move(str(ckpt), str(elsewhere))
    ckpt.symlink_to(elsewhere, target_is_directory=True)


def _object_rows(ckpt):
    import numpy as np

    np.save(ckpt / "rows_trained.npy", np.array([{"row": 1}], dtype=object), allow_pickle=True)
    _resealed(ckpt)


def _earlier_adapter(ckpt):
    """checkpoint-6 holding checkpoint-4's adapter, its manifest rewritten to match."""
    shutil.copy(ckpt.with_name("checkpoint-4") / "adapter_model.safetensors", ckpt / "adapter_model.safetensors")
    _resealed(ckpt)


def _edited_tokens_seen(ckpt):
    """The trainer state's count of tokens seen edited, the manifest rewritten to match."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["num_input_tokens_seen"] = int(state.get("num_input_tokens_seen") or 0) + 640
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    _resealed(ckpt)


def _unsealed(ckpt):
    """Killed after every file was written but before the manifest."""
    (ckpt / "manifest.json").unlink()


@pytest.mark.parametrize("event, step, damage", [
    pytest.param("step_end", 3, None, marks=pytest.mark.slow),  # between checkpoints
    pytest.param("save", 4, None, marks=pytest.mark.slow),  # right after a checkpoint
    ("save", 6, None),  # after the last checkpoint, before the final save and the summary
    pytest.param("train_end", 6, None, marks=pytest.mark.slow),  # training done, final weights not yet saved
    pytest.param("save", 6, _damage_adapter, marks=pytest.mark.slow),  # the newest checkpoint truncated
    pytest.param("save", 6, _empty_state, marks=pytest.mark.slow),  # the newest checkpoint's state empty
    # what resumed silently before checkpoints carried a manifest
    pytest.param("save", 6, _zeroed_adapter, marks=pytest.mark.slow),
    pytest.param("save", 6, _without("optimizer.pt"), marks=pytest.mark.slow),
    pytest.param("save", 6, _without("scheduler.pt"), marks=pytest.mark.slow),
    pytest.param("save", 6, _without("rng_state.pth"), marks=pytest.mark.slow),
    pytest.param("save", 6, _without("rows_trained.npy"), marks=pytest.mark.slow),  # the kill while it was written
    pytest.param("save", 6, _unsealed, marks=pytest.mark.slow),
    # what resumed silently, or crashed every resume, while the manifest's own list was trusted
    *(pytest.param("save", 6, _unlisted(f), marks=pytest.mark.slow)
      for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rows_trained.npy")),
    pytest.param("save", 6, _stale_optimizer, marks=pytest.mark.slow),
    pytest.param("save", 6, _linked_from_elsewhere, marks=pytest.mark.slow),
    pytest.param("save", 6, _object_rows, marks=pytest.mark.slow),
    # what resumed silently while a manifest vouched for itself: the run's own record of its seals decides
    pytest.param("save", 6, _earlier_adapter, marks=pytest.mark.slow),
    pytest.param("save", 6, _edited_tokens_seen, marks=pytest.mark.slow),
])
def test_killed_run_resumes_to_the_uninterrupted_result(make_config, tmp_path, capsys, event, step, damage):
    whole = run_attack(make_config(output={"dir": str(tmp_path / "a")}, **SECTIONS), quiet=True)
    with pytest.raises(KeyboardInterrupt):
        run_attack(make_config(output={"dir": str(tmp_path / "b")}, **SECTIONS), extra_callbacks=[Kill(event, step)],
                   quiet=True)
    run = next((tmp_path / "b").iterdir())
    _as_if_killed(run)
    if damage:
        damage(run / "checkpoints" / f"checkpoint-{step}")
    capsys.readouterr()
    resumed = run_attack(make_config(output={"dir": str(tmp_path / "b"), "resume": True}, **SECTIONS), quiet=True)
    err = capsys.readouterr().err
    assert _result(resumed) == _result(whole)
    a, b = load_file(str(whole / "final" / "adapter_model.safetensors")), load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "taking over" in err and "is gone" in err
    if damage:
        assert f"checkpoint checkpoint-{step} is damaged" in err
        assert (run / "checkpoints" / f"damaged-checkpoint-{step}").exists()
    assert not (resumed / ".lock").exists()


def test_one_writer_per_run_directory(make_config, tmp_path, capsys):
    cfg = make_config(output={"dir": str(tmp_path), "run_id": "r"})
    run = tmp_path / "r"
    run.mkdir()
    other = RunLock(run / ".lock")
    other.acquire()  # a live holder: another job on the same cell
    try:
        argv = ["--model", cfg.model.name, "--data", cfg.data.path, "--eval-tasks", "toy_target_seen",
                "--eval-include", cfg.eval.include_path[0], "--max-steps", "2", "--batch-size", "2",
                "--seq-len", "32", "--output", str(tmp_path), "--run-id", "r", "--resume"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run directory {run} is in use by pid {os.getpid()}" in err[0]
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        other.release()
    assert not (run / ".lock").exists()

    # A holder on another host that stopped touching the lock has lost it.
    (run / ".lock").write_text(json.dumps({"host": "node-that-died", "pid": 1, "since": 0}))
    old = time.time() - RunLock.LEASE_S - 5
    os.utime(run / ".lock", (old, old))
    assert main(argv) == 0
    assert "taking over" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["status"] == "done"


def test_a_second_shard_on_the_same_cell_skips_it(tmp_path, world, llama_dir):
    import yaml

    from attack.cells import load_sweep
    from attack.sweep import run_sweep

    doc = {"name": "t", "output": str(tmp_path / "runs"),
           "base": {"data": {"path": str(world["attack"]), "seq_len": 32},
                    "train": {"batch_size": 2, "max_steps": 2},
                    "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])], "every": 2}},
           "models": [{"label": "m", "name": str(llama_dir)}], "attacks": [{"label": "a"}], "seeds": [0]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    _, [cell] = load_sweep(path)
    cell.run_dir.path.mkdir(parents=True)
    busy = RunLock(cell.run_dir.path / ".lock")
    busy.acquire()
    try:
        assert run_sweep(path, quiet=True, log=lambda _: None) == {"done": 0, "skipped": 0, "busy": 1, "failed": 0}
        assert main(["sweep", str(path)]) == 75  # not finished here: a job array requeues it
        assert not (cell.run_dir.path / "summary.json").exists()  # the other job's directory untouched
    finally:
        busy.release()


@pytest.mark.slow
def test_diverged_run_fails_before_scoring_and_is_not_ranked(make_config, tmp_path, capsys):
    from attack.report import write_report

    run_attack(make_config(output={"dir": str(tmp_path / "runs"), "run_id": "ok"},
                                train={"max_steps": 4}, eval={"every": 2}), quiet=True)
    argv = ["--model", make_config().model.name, "--data", make_config().data.path, "--eval-tasks",
            "toy_target_seen,toy_general", "--eval-include", make_config().eval.include_path[0],
            "--max-steps", "4", "--eval-every", "2", "--batch-size", "4", "--seq-len", "64", "--lr", "10", "--lora-alpha", "10000",
            "--log-every", "10", "--output", str(tmp_path / "runs"), "--run-id", "diverged"]
    assert main(argv) == 2
    assert "became NaN or infinite by step 2" in capsys.readouterr().err
    bad = tmp_path / "runs" / "diverged"
    assert json.loads((bad / "summary.json").read_text())["status"] == "failed"
    assert {r["step"] for r in read_curve(bad / "curve.jsonl")} == {0}  # the pre-attack point only
    out = write_report([tmp_path / "runs"], tmp_path / "report")
    tables = (out / "recovery.csv").read_text() + (out / "worst_case.csv").read_text()
    assert "lr0.001" in tables and "lr10" not in tables  # the single runs' attack labels
    assert "## Failed runs" in (out / "recovery.md").read_text() and "diverged:" in (out / "recovery.md").read_text()


def test_checkpoint_with_missing_weights_is_refused(llama_dir, make_config, tmp_path, capsys):
    broken = tmp_path / "three-layers"
    shutil.copytree(llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1  # the weights are for one layer less
    (broken / "config.json").write_text(json.dumps(config))
    cfg = make_config(model=broken)
    argv = ["--model", str(broken), "--data", cfg.data.path, "--eval-tasks", "toy_target_seen",
            "--eval-include", cfg.eval.include_path[0], "--seq-len", "32", "--batch-size", "2",
            "--output", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weight(s) missing from the checkpoint (e.g. model.layers.2." in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("error", [
    lambda path: OSError(errno.ENOSPC, "No space left on device", path),
    # torch.save's own words for the same thing, inside the optimizer's archive
    pytest.param(lambda path: RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240: "
                                           "PytorchStreamWriter failed writing file data/3: file write failed"),
                 marks=pytest.mark.slow),
])
def test_full_disk_is_one_line_and_the_run_resumes(make_config, tmp_path, capsys, monkeypatch, error):
    import transformers

    cfg = make_config(output={"dir": str(tmp_path / "runs"), "run_id": "r"}, **SECTIONS)
    argv = ["--model", cfg.model.name, "--data", cfg.data.path, "--eval-tasks", "toy_target_seen,toy_general",
            "--eval-include", cfg.eval.include_path[0], "--max-steps", "6", "--eval-every", "2", "--batch-size", "4",
            "--seq-len", "64", "--lr", "1e-3", "--output", str(tmp_path / "runs"), "--run-id", "r"]
    real = transformers.Trainer._save_checkpoint

    def full(self, *a, **kw):
        if self.state.global_step == 4:
            raise error(str(tmp_path / "runs" / "r"))
        return real(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", full)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: disk full") and "--resume" in err[-1] and "Traceback" not in "\n".join(err)
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    assert not list(run.glob(".*.tmp"))
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_full_disk_while_preparing_the_corpus(make_config, tmp_path, capsys, monkeypatch):
    """The disk fills half-way through packing the corpus into --data-cache (datasets reports it
    inside its own error): one line, no half-written corpus left to be taken for a whole one, and
    the same command with --resume then runs."""
    import attack.packing

    cfg = make_config()
    cache = tmp_path / "cache"
    argv = ["--model", cfg.model.name, "--data", cfg.data.path, "--eval-tasks", "toy_target_seen",
            "--eval-include", cfg.eval.include_path[0], "--max-steps", "2", "--eval-every", "2", "--batch-size", "2",
            "--seq-len", "32", "--output", str(tmp_path / "runs"), "--run-id", "r", "--data-cache", str(cache)]
    real = attack.packing._tokenize_and_pack

    def full(ds, cfg, tokenizer, out, num_proc):
        out.mkdir(parents=True)
        (out / "data-00000-of-00001.arrow").write_bytes(b"half")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise ValueError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(attack.packing, "_tokenize_and_pack", full)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: disk full") and "Traceback" not in "\n".join(err)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(attack.packing, "_tokenize_and_pack", real)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["python -m attack", "finetune-attack"])
def test_sigterm_ends_as_interrupted_and_resumes(make_config, tmp_path, command):
    """Preemption: SIGTERM (what SLURM sends before requeueing) ends the run as interrupted with
    the resume hint, under `python -m attack` and the installed command alike; the requeued
    command with --resume finishes it."""
    from pathlib import Path

    cfg = make_config()
    program = [sys.executable, "-m", "attack"] if command == "python -m attack" else [
        str(Path(sys.executable).parent / "finetune-attack")]
    argv = [*program, "--model", cfg.model.name, "--data", cfg.data.path,
            "--eval-tasks", "toy_target_seen", "--eval-include", cfg.eval.include_path[0], "--max-steps", "400",
            "--eval-every", "2", "--batch-size", "4", "--seq-len", "64", "--output", str(tmp_path), "--run-id", "r"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    curve = tmp_path / "r" / "curve.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (curve.exists() and any(r["step"] >= 4 for r in read_curve(curve))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM): run the same command again with --resume")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "r" / ".lock").exists()
    run = RunDir(tmp_path / "r")
    assert run.last_checkpoint(load_config(read_yaml(run.config)), ("optimizer.json", "rows_trained.npy")) is not None


def test_set_aside_checkpoints_are_pruned_and_strange_folders_left_alone(make_config, tmp_path, capsys):
    """Set-aside checkpoints follow keep_checkpoints; a folder that is not a checkpoint (a copy a
    user made) is neither resumed from nor deleted."""
    cfg = make_config(output={"dir": str(tmp_path), "run_id": "r", "keep_checkpoints": 1}, **SECTIONS)
    with pytest.raises(KeyboardInterrupt):
        run_attack(cfg, extra_callbacks=[Kill("save", 4)], quiet=True)
    run = RunDir(tmp_path / "r")
    ckpts = run.checkpoints
    shutil.copytree(ckpts / "checkpoint-4", ckpts / "checkpoint-4.bak")
    for step in (1, 2, 3):  # older set-aside folders from earlier resumes
        shutil.copytree(ckpts / "checkpoint-4", ckpts / f"damaged-checkpoint-{step}")
    _without("optimizer.pt")(ckpts / "checkpoint-4")
    capsys.readouterr()
    assert run.last_checkpoint(cfg, say=print) is None  # checkpoint-2 was rotated away (keep 1)
    assert "checkpoint checkpoint-4 is damaged (optimizer.pt is missing)" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4.bak", "damaged-checkpoint-4"]


def test_an_attack_that_changed_nothing_fails(make_config, tmp_path):
    """Every update zero (what a LoRA scale of 0 or an infinite gradient norm at every step
    comes to): the run ends failed with one line, not done with a flat curve."""
    from attack.errors import UserError

    class NoUpdate(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    with pytest.raises(UserError, match="changed no trained weight"):
        run_attack(make_config(train={"max_steps": 2}, adapter={"dropout": 0.0}), extra_callbacks=[NoUpdate()], quiet=True)
    run = next((tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "changed no trained weight" in summary["error"]
    assert not (run / ".lock").exists()


def test_lock_takeover_judges_the_holders_start_time_and_admits_one_taker(tmp_path):
    """A pid that now belongs to another process (started at another time) does not hold the
    run; a live holder does; while one process takes a dead holder's lock over, a second is
    refused instead of writing too."""
    from attack.runlock import RunDirInUse, _start_time

    lock = RunLock(tmp_path / ".lock")
    host = os.uname().nodename
    (tmp_path / ".lock").write_text(json.dumps({"host": host, "pid": 1, "start": _start_time(1)}))
    with pytest.raises(RunDirInUse, match="in use by pid 1"):
        lock.acquire()
    (tmp_path / ".lock").write_text(json.dumps({"host": host, "pid": 1, "start": -5}))  # pid 1 reused since
    (tmp_path / ".lock.takeover").touch()  # another process is taking it over right now
    with pytest.raises(RunDirInUse, match="being taken over"):
        lock.acquire()
    old = time.time() - 120  # a taker that died mid-takeover leaves a stale gate: cleared
    os.utime(tmp_path / ".lock.takeover", (old, old))
    lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.takeover").exists()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_no_leftovers_from_a_kill_or_a_full_disk(make_config, tmp_path, monkeypatch):
    """A temporary file a killed process left in the run directory is cleared on resume; a lock
    whose holder could not write it (a full disk) is not left behind empty."""
    cfg = make_config(output={"dir": str(tmp_path), "run_id": "r"}, **SECTIONS)
    with pytest.raises(KeyboardInterrupt):
        run_attack(cfg, extra_callbacks=[Kill("save", 4)], quiet=True)
    _as_if_killed(tmp_path / "r")
    (tmp_path / "r" / ".tasks.json.12345.tmp").write_text("{")
    run_attack(make_config(output={"dir": str(tmp_path), "run_id": "r", "resume": True}, **SECTIONS), quiet=True)
    assert not list((tmp_path / "r").glob(".*.tmp"))

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = RunLock(tmp_path / "other.lock")
    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError):
        lock.acquire()
    assert not (tmp_path / "other.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lose", ["curve", "samples"])
def test_a_resume_never_lacks_the_points_before_its_checkpoint(make_config, tmp_path, lose):
    """curve.jsonl or the per-question records deleted after the kill: the checkpoints are whole,
    but a resume from them would lack the early points; the run starts again from step 0."""
    whole = run_attack(make_config(output={"dir": str(tmp_path / "a")}, **SECTIONS), quiet=True)
    with pytest.raises(KeyboardInterrupt):
        run_attack(make_config(output={"dir": str(tmp_path / "b")}, **SECTIONS), extra_callbacks=[Kill("save", 4)],
                   quiet=True)
    run = next((tmp_path / "b").iterdir())
    _as_if_killed(run)
    if lose == "curve":
        (run / "curve.jsonl").unlink()
    else:
        shutil.rmtree(run / "samples")
    resumed = run_attack(make_config(output={"dir": str(tmp_path / "b"), "resume": True}, **SECTIONS), quiet=True)
    assert _result(resumed) == _result(whole)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] is None


def _one_cell_sweep(cfg, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"output": str(tmp_path / "out"), "models": [{"label": "m", "name": cfg.model.name}],
                                 "base": {"data": {"path": cfg.data.path, "seq_len": 64},
                                          "eval": {"tasks": ["toy_general"], "include_path": cfg.eval.include_path}}}))
    return sweep


def test_a_signal_swallowed_by_a_finalizer_still_stops_the_sweep(monkeypatch, make_config, tmp_path):
    """SIGTERM raised inside a __del__ is only printed by Python; the sweep still stops at its next cell."""
    from attack import signals
    from attack.sweep import run_sweep

    monkeypatch.setattr(signals, "_pending", None)

    class Finalizer:
        def __del__(self):
            signals._handler(signal.SIGTERM, None)

    Finalizer()  # "Exception ignored in: ... Terminated": swallowed
    with pytest.raises(signals.Terminated):
        run_sweep(_one_cell_sweep(make_config(), tmp_path))
    assert not (tmp_path / "out").exists()  # stopped before its cell


def test_a_cell_another_sweep_finished_meanwhile_is_never_marked_failed(make_config, tmp_path, monkeypatch):
    """Two sweeps on one file: the one that loses the race is refused; the winner's summary stays done."""
    import attack.recipes
    from attack.cells import load_sweep
    from attack.errors import UserError
    from attack.sweep import run_cell

    _, [cell] = load_sweep(_one_cell_sweep(make_config(), tmp_path))

    def finished_by_another(cfg, **kw):
        run = cell.run_dir
        run.path.mkdir(parents=True)
        run.write_summary(status="done", steps=500)
        raise UserError(f"run directory {run.path} already exists and is finished (status: done)")

    monkeypatch.setattr(attack.recipes, "run_attack", finished_by_another)
    assert run_cell(cell, "s", quiet=True, log=lambda m: None) == "skipped"
    assert cell.run_dir.summary == {"status": "done", "steps": 500}


@pytest.mark.parametrize("obstacle", ["file", pytest.param("dead-link", marks=pytest.mark.slow),
                                      pytest.param("checkpoints-file", marks=pytest.mark.slow)])
def test_a_non_folder_at_a_checkpoint_path_is_set_aside(make_config, tmp_path, capsys, obstacle):
    """A plain file or a dead link named like the next checkpoint, or a file where checkpoints/
    should be: the resume sets it aside in one line and finishes as the uninterrupted run did."""
    whole = run_attack(make_config(output={"dir": str(tmp_path / "a")}, **SECTIONS), quiet=True)
    with pytest.raises(KeyboardInterrupt):
        run_attack(make_config(output={"dir": str(tmp_path / "b")}, **SECTIONS), extra_callbacks=[Kill("step_end", 5)],
                   quiet=True)
    run = next((tmp_path / "b").iterdir())
    _as_if_killed(run)
    checkpoints = run / "checkpoints"
    if obstacle == "file":
        (checkpoints / "checkpoint-6").write_text("not a checkpoint")
    elif obstacle == "dead-link":
        (checkpoints / "checkpoint-6").symlink_to(tmp_path / "nowhere")
    else:
        shutil.rmtree(checkpoints)
        checkpoints.write_text("not a folder")
    capsys.readouterr()
    resumed = run_attack(make_config(output={"dir": str(tmp_path / "b"), "resume": True}, **SECTIONS), quiet=True)
    err = capsys.readouterr().err
    assert json.loads((resumed / "summary.json").read_text())["status"] == "done"
    assert _result(resumed)[0] == _result(whole)[0]
    assert "set aside" in err
    assert (run / "damaged-checkpoints").exists() if obstacle == "checkpoints-file" else \
        (checkpoints / "damaged-checkpoint-6").is_symlink() or (checkpoints / "damaged-checkpoint-6").is_file()


def test_a_signal_in_a_finalizer_prints_no_traceback_and_the_command_ends_in_one_line(tmp_path):
    """The swallowed signal is said once, by the command's exit ("terminated (SIGTERM): ..."),
    not as Python's "Exception ignored ... Traceback"; other finalizer errors are still shown."""
    program = ("import signal, sys\n"
               "from attack import signals\n"
               "signals.install()\n"
               "class Finalizer:\n"
               "    def __del__(self):\n"
               "        signals._handler(signal.SIGTERM, None)\n"
               "class Broken:\n"
               "    def __del__(self):\n"
               "        raise ValueError('a finalizer bug')\n"
               "Finalizer()\n"
               "Broken()\n"
               "try:\n"
               "    signals.raise_pending()\n"
               "except signals.Terminated:\n"
               "    print('stopped', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert "Terminated" not in proc.stderr and proc.stderr.count("Exception ignored") == 1, proc.stderr
    assert "a finalizer bug" in proc.stderr and proc.stderr.strip().endswith("stopped")


@pytest.mark.parametrize("forked", [False, True])
def test_sigterm_to_the_parent_alone_stops_its_workers_and_drops_the_jobs_not_begun(tmp_path, forked):
    """The demo's cells, the toy world's build and the counterfactual reruns run in worker
    processes: a SIGTERM sent to the parent alone (`kill PID`) ends the running jobs as
    interrupted (each worker gets one SIGTERM) and starts no other; no worker outlives it.
    Spawned workers, and workers forked from the server that imported their modules
    (`preload_workers`, as the demo starts its pools)."""
    (tmp_path / "jobs.py").write_text(
        "import os, time\n"
        "from pathlib import Path\n"
        "def job(arg):\n"
        "    folder, i = arg\n"
        "    Path(folder, f'started-{i}').write_text(f'{os.getpid()} {os.getppid()}')\n"
        "    try:\n"
        "        time.sleep(120)\n"
        "    except KeyboardInterrupt as e:\n"
        "        Path(folder, f'interrupted-{i}-{type(e).__name__}').touch()\n"
        "        raise\n"
        "    Path(folder, f'finished-{i}').touch()\n")
    program = ("import sys\n"
               f"sys.path.insert(0, {str(tmp_path)!r})\n"
               "from attack import signals\n"
               "import jobs\n"
               "signals.install()\n"
               + ("signals.preload_workers(['jobs'])\n" if forked else "") +
               "try:\n"
               "    with signals.worker_pool(2) as run:\n"
               f"        run(jobs.job, [({str(tmp_path)!r}, i) for i in range(4)])\n"
               "except signals.Terminated:\n"
               "    print('stopped', file=sys.stderr)\n"
               "    sys.exit(143)\n")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob("started-*"))) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "stopped", err[-2000:]
    assert sorted(p.name for p in tmp_path.glob("interrupted-*")) == ["interrupted-0-Terminated", "interrupted-1-Terminated"]
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0", "started-1"]  # the others never began
    assert not list(tmp_path.glob("finished-*"))
    workers, parents = zip(*[map(int, (tmp_path / f"started-{i}").read_text().split()) for i in (0, 1)], strict=True)
    assert all((parent != proc.pid) == forked for parent in parents)  # forked workers are the server's children
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
