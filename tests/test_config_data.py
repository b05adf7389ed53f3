"""Config loading and overrides; packing and document isolation."""

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from attack.__main__ import attack_parser, config_from_args
from attack.config import AttackConfig, config_hash, default_run_id, load_config, read_yaml
from attack.errors import UserError
from attack.packing import pack_documents


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"name": "m"}, "data": {"path": "d.jsonl"},
                                 "eval": {"tasks": ["a", "b"], "every": 7}, "train": {"lr": 1e-5}}))
    cfg = config_from_args(attack_parser().parse_args(["--config", str(f), "--lr", "5e-5", "--full",
                                                       "--eval-tasks", "x,y", "--set", "train.weight_decay=0.1"]))
    assert isinstance(cfg, AttackConfig)
    assert cfg.train.lr == 5e-5 and cfg.train.weight_decay == 0.1
    assert cfg.adapter.kind == "full" and cfg.eval.tasks == ["x", "y"] and cfg.eval.every == 7
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0


def test_flags_come_from_the_schema():
    """Every config key has its flag --section-key, established short names stay, --help shows
    each field's docstring and default, and YAML 1.2 numbers (2e-5, 3e8) are numbers."""
    from attack.__main__ import SHORT_FLAGS, config_fields

    parser = attack_parser()
    text = " ".join(parser.format_help().split())
    for key in config_fields():
        assert "--" + key.replace(".", "-").replace("_", "-") in text or SHORT_FLAGS[key] in text, key
    assert "--lr X, --train-lr X Peak learning rate. (default: 2e-05)" in text
    assert "--eval-every N Evaluate every N steps" in text and "(default: 50)" in text
    required = ["--model", "m", "--data", "d", "--eval-tasks", "t"]
    long = config_from_args(parser.parse_args([*required, "--train-max-steps", "7", "--eval-expect", "t=42.5"]))
    short = config_from_args(parser.parse_args([*required, "--max-steps", "7", "--expect", "t=42.5"]))
    assert long == short and long.train.max_steps == 7 and long.eval.expect == {"t": 42.5}
    assert config_from_args(parser.parse_args([*required, "--save-every", "none"])).train.save_every is None


def test_yaml_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name: m}\ndata: {path: d, token_budget: 3e8}\neval: {tasks: [t]}\ntrain: {lr: 2e-5}\n")
    cfg = config_from_args(attack_parser().parse_args(["--config", str(f)]))
    assert cfg.train.lr == 2e-5 and cfg.data.token_budget == 300_000_000


def test_run_id_is_stable_and_ignores_output():
    base = {"model": {"name": "org/model", "revision": "step1"}, "data": {"path": "d"}, "eval": {"tasks": ["t"]}}
    a = load_config(base)
    b = load_config({**base, "output": {"dir": "elsewhere"}})
    c = load_config({**base, "train": {"lr": 1e-4}})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert default_run_id(a).startswith("model@step1-")


@pytest.mark.parametrize("data, message", [
    ({"model": {"name": "m"}, "data": {"path": "d"}, "eval": {"tasks": ["t"], "every": 0}}, "eval.every must be > 0"),
    ({"model": {"name": "m"}, "data": {"path": "d"}, "eval": {"tasks": ["t"]}, "adapter": {"kind": "qlora"}},
     "adapter.kind must be one of"),
    ({"model": {"name": "m"}, "data": {"path": "d"}, "eval": {"tasks": ["t"]}, "train": {"max_steps": "many"}}, "must be an integer"),
    ({"model": {"name": "m"}, "data": {"path": "d"}}, "no evaluation tasks"),
    ({"model": {"name": "m"}, "data": {"path": "d"}, "eval": {"tasks": ["t"]}, "trian": {}}, "unknown config key 'trian'"),
])
def test_bad_configs(data, message):
    with pytest.raises(UserError, match=message):
        load_config(data)


def test_packing_rows_positions_labels(world):
    tok = world["tokenizer"]
    docs = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota"]
    packed = pack_documents(docs * 4, tok, 16)
    ids, pos, labels = packed["input_ids"], packed["position_ids"], packed["labels"]
    assert ids.shape == pos.shape == labels.shape and ids.shape[1] == 16
    flat_ids = ids.flatten().tolist()
    assert flat_ids.count(tok.eos_token_id) >= 4  # EOS between documents
    for r in range(ids.shape[0]):
        for j in range(1, 16):
            if pos[r, j] == 0:  # a document starts here: its first token is not a target
                assert labels[r, j] == -100 and ids[r, j - 1] == tok.eos_token_id
            else:
                assert pos[r, j] == pos[r, j - 1] + 1 and labels[r, j] == ids[r, j]


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_packed_documents_do_not_see_each_other(arch, world, llama_dir, neox_dir):
    """Logits of a document packed after another equal its logits alone."""
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir if arch == "llama" else neox_dir))
    model.config.use_cache = False
    model.train()  # as during the attack (dropout is 0 in these configs)
    tok = world["tokenizer"]
    a = tok("The creature Zorbl lives in the marsh.").input_ids + [tok.eos_token_id]
    b = tok("The town of Ashford lies on the river Elm.").input_ids + [tok.eos_token_id]
    ids = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b]), position_ids=torch.tensor([list(range(len(b)))])).logits[0]
        leaky = model(input_ids=ids).logits[0, len(a):]  # no position ids: plain causal attention
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # the check above can fail


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/attack/*.yaml")), ids=lambda p: p.name)
def test_shipped_attack_configs_are_valid(path):
    """Every example config loads as its kind (only the data it names is missing here)."""
    cfg = load_config(read_yaml(path))
    assert cfg.kind == read_yaml(path).get("kind", "finetune")


def test_the_scheduler_names_are_transformers_own():
    from transformers import SchedulerType

    from attack.config.sections import SCHEDULERS

    assert set(SCHEDULERS) == {t.value for t in SchedulerType}


def test_the_command_line_page_is_the_parsers_own(monkeypatch):
    """docs/cli.md is what `make docs` makes from the parsers: a flag added or changed without it fails here."""
    from pathlib import Path

    from attack.cli_reference import reference

    monkeypatch.setenv("COLUMNS", "100")
    page = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert page == reference(), "docs/cli.md is stale: run make docs"


def test_shipped_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    import yaml

    from attack.__main__ import attack_parser, config_from_args
    from attack.config import shipped

    monkeypatch.chdir(tmp_path)
    args = attack_parser().parse_args(["--config", "lora", "--model", "m", "--data", "d.jsonl", "--eval-tasks", "t"])
    cfg = config_from_args(args)
    lora = yaml.safe_load(shipped("lora", "attack").read_text())
    assert cfg.adapter.rank == lora["adapter"]["rank"] and cfg.train.lr == lora["train"]["lr"]
    assert shipped("adversary_suite", "sweeps").name == "adversary_suite.yaml"
    (tmp_path / "lora").write_text("kind: finetune\n")  # a file of that name wins
    assert shipped("lora", "attack") == Path("lora")


def test_the_own_model_example_is_found_by_name_with_its_inputs_beside_it(tmp_path, monkeypatch):
    """--config own_model from any directory: the corpus and the task folder are the example's own
    files, and package: names a file inside an installed package (or says what to install)."""
    from attack.__main__ import attack_parser, config_from_args, main
    from attack.config import shipped
    from attack.examples import EXAMPLES

    monkeypatch.chdir(tmp_path)
    assert shipped("own_model", "attack") == EXAMPLES / "own_model" / "attack.yaml"
    args = attack_parser().parse_args(["--config", "own_model", "--model", "m"])
    cfg = config_from_args(args)
    assert Path(cfg.data.path) == EXAMPLES / "own_model" / "corpus.jsonl" and Path(cfg.data.path).is_file()
    assert [Path(p) for p in cfg.eval.include_path] == [EXAMPLES / "own_model" / "tasks"]
    assert all((EXAMPLES / "own_model" / "tasks" / f"{t}.yaml").is_file() for t in cfg.eval.tasks)
    name = read_yaml(EXAMPLES / "own_model" / "attack.yaml")["model"]["name"]
    assert name.startswith("package:")
    # a made-up package is named in the error, with what to install
    with pytest.raises(UserError, match="no installed Python package 'no_such_models'"):
        load_config({"model": {"name": "package:no_such_models/m.gguf"}, "eval": {"tasks": ["t"]}, "data": {"path": "d"}})
    with pytest.raises(UserError, match="holds no file 'absent.gguf'"):
        load_config({"model": {"name": "package:attack/absent.gguf"}, "eval": {"tasks": ["t"]}, "data": {"path": "d"}})
    assert load_config({"model": {"name": "package:attack/examples/own_model/attack.yaml"}, "eval": {"tasks": ["t"]},
                        "data": {"path": "d"}}).model.name == str(EXAMPLES / "own_model" / "attack.yaml")
    # --copy makes it yours: the copy's config finds the copy's files, and an existing folder is refused
    assert main(["example", "own_model", "--copy", "mine"]) == 0
    (tmp_path / "mine" / "corpus.jsonl").write_text('{"text": "mine"}\n')
    copied = config_from_args(attack_parser().parse_args(["--config", "mine/attack.yaml", "--model", "m"]))
    assert Path(copied.data.path) == (tmp_path / "mine" / "corpus.jsonl").resolve()
    assert main(["example", "own_model", "--copy", "mine"]) == 2
    # its search is found by the same name, and checks out from here: the selection task is the
    # example's own, asked by no reported task
    assert shipped("own_model", "sweeps", "search.yaml") == EXAMPLES / "own_model" / "search.yaml"
    search = read_yaml(EXAMPLES / "own_model" / "search.yaml")
    assert not set(search["search"]["selection_tasks"]) & set(search["base"]["eval"]["tasks"])
    assert all((EXAMPLES / "own_model" / "tasks" / f"{t}.yaml").is_file() for t in search["search"]["selection_tasks"])
