"""Sweeps: cell expansion, stable ids, shards, skip/resume on re-run, failures recorded."""

import json
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

import attack.recipes
from attack.__main__ import main
from attack.cells import load_sweep, shard
from attack.errors import UserError
from attack.records import read_curve
from attack.sweep import run_sweep


def _sweep_file(tmp_path, world, models, attacks=None, seeds=(0, 1)):
    doc = {
        "name": "t",
        "output": str(tmp_path / "runs"),
        "base": {
            "data": {"path": str(world["attack"]), "seq_len": 32},
            "train": {"batch_size": 2, "max_steps": 4, "log_every": 1, "save_every": 2},
            "adapter": {"rank": 2, "alpha": 4},
            "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])], "every": 2},
        },
        "models": models,
        "attacks": attacks or [{"label": "lr-1e-3", "train": {"lr": 1e-3}}, {"label": "lr-1e-2", "train": {"lr": 1e-2}}],
        "seeds": list(seeds),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def two_models(llama_dir, neox_dir):
    return [{"label": "llama", "role": "unfiltered", "name": str(llama_dir)},
            {"label": "neox", "role": "filtered", "name": str(neox_dir)}]


def test_cells_ids_and_shards(tmp_path, world, two_models):
    path = _sweep_file(tmp_path, world, two_models)
    _, cells = load_sweep(path)
    assert len(cells) == 2 * 2 * 2
    ids = [c.id for c in cells]
    assert len(set(ids)) == 8
    assert ids == [c.id for c in load_sweep(path)[1]]  # same config, same ids
    assert {c.config.train.lr for c in cells} == {1e-3, 1e-2}
    halves = [shard(cells, "1/2"), shard(cells, "2/2")]
    assert sorted(c.id for h in halves for c in h) == sorted(ids)
    assert not {c.id for c in halves[0]} & {c.id for c in halves[1]}
    thirds = [shard(cells, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(c.id for h in thirds for c in h) == sorted(ids)


@pytest.mark.slow
def test_interrupted_sweep_reruns_to_every_cell_done_once(tmp_path, world, two_models, monkeypatch):
    path = _sweep_file(tmp_path, world, two_models)
    calls, killed = [], []
    real = attack.recipes.run_attack

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("node preempted")

    def counting(cfg, extra_callbacks=None, quiet=False, cell=None, **kw):
        calls.append((cell["cell_id"], cfg.output.resume))
        extra = [] if killed or len(calls) < 3 else [Kill()]
        killed.extend(extra)
        return real(cfg, extra_callbacks=extra, quiet=quiet, cell=cell, **kw)

    monkeypatch.setattr(attack.recipes, "run_attack", counting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, quiet=True, log=lambda _: None)
    assert len(calls) == 3
    interrupted = calls[2][0]

    calls.clear()
    outcome = run_sweep(path, quiet=True, log=lambda _: None)
    assert outcome == {"done": 6, "skipped": 2, "busy": 0, "failed": 0}
    assert (interrupted, True) in calls  # resumed, not restarted
    _, cells = load_sweep(path)
    for c in cells:
        run = tmp_path / "runs" / c.id
        assert json.loads((run / "summary.json").read_text())["status"] == "done"
        keys = [(r["step"], r["task"], r["metric"]) for r in read_curve(run / "curve.jsonl")]
        assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {0, 2, 4}
        assert json.loads((run / "cell.json").read_text())["cell_id"] == c.id

    calls.clear()
    assert run_sweep(path, quiet=True, log=lambda _: None) == {"done": 0, "skipped": 8, "busy": 0, "failed": 0}
    assert calls == []


def test_failed_cell_is_recorded_and_others_run(tmp_path, world, llama_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    models = [{"label": "broken", "name": str(broken)}, {"label": "ok", "name": str(llama_dir)}]
    path = _sweep_file(tmp_path, world, models, attacks=[{"label": "a"}], seeds=[0])
    outcome = run_sweep(path, quiet=True, log=lambda _: None)
    assert outcome == {"done": 1, "skipped": 0, "busy": 0, "failed": 1}
    _, cells = load_sweep(path)
    summaries = {c.model.label: json.loads((tmp_path / "runs" / c.id / "summary.json").read_text()) for c in cells}
    assert summaries["broken"]["status"] == "failed" and "could not load" in summaries["broken"]["error"]
    assert summaries["ok"]["status"] == "done"


@pytest.mark.slow
def test_dry_run_lists_cells_and_validates(tmp_path, world, two_models, capsys):
    path = _sweep_file(tmp_path, world, two_models)
    assert main(["sweep", str(path), "--dry-run", "--shard", "1/2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    _, cells = load_sweep(path)
    ids = [c.id for c in shard(cells, "1/2")]
    assert [line.split()[0] for line in lines[:-1]] == ids
    assert all("tokens=" in line and "[pending]" in line for line in lines[:-1])
    assert not (tmp_path / "runs").exists()

    bad = yaml.safe_load(path.read_text())
    bad["base"]["eval"]["tasks"] = ["no_such_task"]
    path.write_text(yaml.safe_dump(bad))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_sweeps_pass_dry_run(capsys, tmp_path, monkeypatch):
    """The Deep Ignorance sweep validates offline (hub models are not fetched in a dry run) from
    any directory (its task set is found by name): every model x learning rate x seed is a cell
    with the sweep's settings, and nothing is reported on stderr. Its attack corpus is a local
    file: until it exists, the dry run says so."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # not the checkout
    sweep = str(Path(__file__).parents[1] / "configs" / "sweeps" / "deep_ignorance.yaml")
    assert main(["sweep", sweep, "--dry-run"]) == 2
    assert "attack data not found: data/bio_attack_corpus.jsonl" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bio_attack_corpus.jsonl").write_text('{"text": "a document"}\n')

    assert main(["sweep", sweep, "--dry-run"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    cells, last = lines[:-1], lines[-1]
    assert last.startswith("54 of 54 cells in this shard")
    assert len(cells) == 54 and len({line.split()[0] for line in cells}) == 54
    strong = [line for line in cells if "model=EleutherAI/deep-ignorance-e2e-strong-filter " in line]
    assert len(strong) == 6 and all("role=filtered" in line for line in strong)
    assert {line.split(" lr ")[1].split(",")[0] for line in strong} == {"2e-05", "5e-05", "0.0001"}
    assert captured.err == ""


@pytest.mark.slow
def test_the_adversary_suite_lists_every_adversary(capsys, tmp_path, monkeypatch):
    """configs/sweeps/adversary_suite.yaml: every adversary against every model, one cell per
    model for the deterministic ones, every kind and every optimizer present."""
    import yaml

    monkeypatch.chdir(tmp_path)
    sweep = Path(__file__).parents[1] / "configs" / "sweeps" / "adversary_suite.yaml"
    (tmp_path / "data").mkdir()
    for name in ("bio_attack_corpus", "general_retain_corpus", "bio_dev_texts"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"text": "a document"}\n')
    (tmp_path / "data" / "bio_reward_prompts.jsonl").write_text('{"prompt": "Q?", "answer": "A"}\n')
    assert main(["sweep", str(sweep), "--dry-run"]) == 0
    cells = capsys.readouterr().out.strip().splitlines()[:-1]
    spec = yaml.safe_load(sweep.read_text())
    labels = [a["label"] for a in spec["attacks"]]
    assert len(labels) >= 20 and len(cells) == len(spec["models"]) * len(labels)
    for label in labels:
        assert sum(f"attack={label} " in line for line in cells) == len(spec["models"]), label
    kinds = {a.get("kind", "finetune") for a in spec["attacks"]}
    assert kinds == {"finetune", "quantize", "ablation", "grpo", "incontext"}
    optimizers = {a.get("train", {}).get("optimizer", "adamw") for a in spec["attacks"] if a.get("kind", "finetune") == "finetune"}
    assert optimizers == {"adamw", "adam", "sgd", "sgd_nesterov", "adagrad", "adadelta", "schedule_free_adamw", "muon"}
    assert any("mix" in a.get("data", {}) for a in spec["attacks"]) and any("perturb" in a for a in spec["attacks"])


def test_revisions_are_separate_cells(tmp_path, world, llama_dir, capsys):
    models = [{"label": "ckpt", "role": "filtered", "name": str(llama_dir), "revisions": ["global_step1192", "global_step119209"]}]
    path = _sweep_file(tmp_path, world, models, attacks=[{"label": "a"}], seeds=[0])
    _, cells = load_sweep(path)
    assert [c.revision for c in cells] == ["global_step1192", "global_step119209"]
    assert [c.config.model.revision for c in cells] == ["global_step1192", "global_step119209"]
    assert cells[0].id.startswith("ckpt@global_step1192--") and cells[0].id != cells[1].id
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "@global_step119209 role=filtered" in capsys.readouterr().out


def test_a_sweep_mixes_attack_kinds(tmp_path, world, llama_dir):
    """Each attack names its kind; the base's sections go to the attacks whose kind has them, so
    one sweep holds attacks of every kind, each a cell with its own config."""
    from attack.config import KINDS

    texts = {"target_path": str(world["attack"]), "contrast_path": str(world["attack"]), "dev_tasks": ["toy_target_dev"]}
    own = {"ablation": {"ablation": texts},
           "grpo": {"grpo": {"prompts_path": str(world["attack"]), "prompt_field": "text", "num_generations": 2}}}
    attacks = [{"label": f"{kind}-a", "kind": kind, **own.get(kind, {})} for kind in KINDS]
    attacks[list(KINDS).index("grpo")]["seeds"] = [7]  # an attack's own seeds replace the sweep's
    attacks[list(KINDS).index("quantize")]["seeds"] = [1, 2]  # a quantization draws nothing: one cell
    path = _sweep_file(tmp_path, world, [{"label": "m", "name": str(llama_dir)}], attacks=attacks, seeds=[0])
    _, cells = load_sweep(path)
    assert [c.config.kind for c in cells] == list(KINDS)
    assert {c.config.kind: c.seed for c in cells} == {"finetune": 0, "ablation": 0, "grpo": 7, "quantize": 0,
                                                      "incontext": 0, "evaluate": 0}
    assert all(json.dumps(c.meta("t")) and c.meta("t")["kind"] == c.config.kind for c in cells)

    doc = yaml.safe_load(path.read_text())
    doc["attacks"].append({"label": "odd", "kind": "telepathy"})
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="sweep attack kind must be one of .*got 'telepathy'"):
        load_sweep(path)


@pytest.mark.slow
def test_demo_runs_from_any_directory(tmp_path):
    """The demo needs no repository checkout around it: run from an unrelated folder, it builds
    its world, writes a sweep naming that world by absolute path, runs it and reports."""
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "attack", "demo", "--quick"], cwd=elsewhere,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = elsewhere / "runs" / "demo-quick"
    assert (out / "report" / "index.html").exists() and (out / "report" / "recovery.md").exists()
    sweep = yaml.safe_load((out / "sweep.yaml").read_text())
    world = (elsewhere / ".cache" / "toyworld").resolve()
    assert all(m["name"].startswith(str(world)) for m in sweep["models"])
    _, cells = load_sweep(out / "sweep.yaml")
    assert all(json.loads((out / c.id / "summary.json").read_text())["status"] == "done" for c in cells)
    assert f"recovery curves and report: {out / 'report' / 'index.html'}" in proc.stdout


def test_sweep_cells_show_progress(tmp_path, world, llama_dir, capsys):
    """Each cell prints a line per evaluation point (step, time, ETA, the asked-for scores) and
    its duration; no raw Trainer dicts."""
    path = _sweep_file(tmp_path, world, [{"label": "m", "name": str(llama_dir)}], attacks=[{"label": "a"}], seeds=[0])
    run_sweep(path, quiet=True, progress=True, log=print)
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    points = [line for line in lines if line.startswith("step ") and "toy_target_seen" in line]
    assert [p.split()[1] for p in points] == ["0/4", "2/4", "4/4"]
    assert "eta" in points[1] and any(line.startswith("done in ") for line in lines)
    assert "{'loss'" not in out and "'loss':" not in out


def test_relative_paths_in_a_file_are_found_from_its_folder(tmp_path, world, llama_dir, monkeypatch, capsys):
    """A config or sweep file names its inputs relative to its own folder and works from any
    directory; a shipped task set is found by name, and an unknown one is one line."""
    import shutil

    from attack.__main__ import main

    folder = tmp_path / "project"
    shutil.copytree(world["tasks"], folder / "tasks")
    shutil.copy(world["attack"], folder / "attack.jsonl")
    (folder / "sweep.yaml").write_text(yaml.safe_dump({
        "base": {"data": {"path": "attack.jsonl", "seq_len": 32},
                 "eval": {"tasks": ["toy_target_seen"], "include_path": ["tasks"]}},
        "models": [{"label": "m", "name": str(llama_dir)}]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, [cell] = load_sweep(folder / "sweep.yaml")
    assert cell.config.data.path == str((folder / "attack.jsonl").resolve())
    assert cell.config.eval.include_path == [str((folder / "tasks").resolve())]
    assert main(["sweep", str(folder / "sweep.yaml"), "--dry-run"]) == 0
    from eval_callbacks import UnknownTaskError, find_tasks

    assert "wmdp_bio_robust" in find_tasks(["wmdp_bio_robust"], ["deep_ignorance"]).all_tasks
    with pytest.raises(UnknownTaskError, match="shipped task set: deep_ignorance"):
        find_tasks(["x"], ["no_such_set"])


@pytest.mark.slow
def test_the_refusal_sweep_and_example_pass_dry_run(capsys, tmp_path, monkeypatch):
    """The shipped refusal sweep for a hub chat model and the refusal example check out offline
    from any directory: the public request sets' tasks found by name, the refusal world's request
    files found from the package, the reference base model scored, not attacked."""
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "refusal_chat", "--dry-run"]) == 0
    captured = capsys.readouterr()
    cells = captured.out.strip().splitlines()[:-1]
    assert len(cells) == 8 and sum("model=Qwen/Qwen2.5-1.5B " in line for line in cells) == 1
    assert captured.err == ""
    assert main(["--config", "refusal", "--dry-run"]) == 0


def test_a_model_rebuilt_in_place_is_not_read_as_the_one_its_runs_measured(tmp_path, world, llama_dir, capsys):
    """Cells are found by config: a local model rebuilt at the same path would have its finished
    runs skipped as done and its started ones resumed onto the new weights. Both are refused in
    one line, and nothing the runs wrote is touched."""
    import shutil

    from attack.config import updated
    from attack.recipes import run_attack

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    path = _sweep_file(tmp_path, world, [{"label": "m", "name": str(model)}], attacks=[{"label": "a"}], seeds=[0])
    doc = yaml.safe_load(path.read_text())
    doc["base"]["train"]["max_steps"] = 1
    path.write_text(yaml.safe_dump(doc))
    assert main(["sweep", str(path)]) == 0
    assert main(["sweep", str(path)]) == 0 and "done already, skipped" in capsys.readouterr().out
    _, (cell,) = load_sweep(path)
    run = cell.run_dir.path
    written = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"}

    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # the same bytes written again: a rebuild, as far as files tell
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"the model {model} changed" in err and "Traceback" not in err
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))  # a started run, resumed
    written[run / "summary.json"] = (run / "summary.json").read_bytes()
    with pytest.raises(UserError, match="changed since .* started"):
        run_attack(updated(cell.config, {"output.resume": True}), quiet=True)
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"} == written
