"""Input at the boundary, generated: every key of every kind's config replaced by values of the
wrong type or out of range, broken structures, broken sweeps. Each must either be a valid config
or end in one line; through the command line, exit 2 with one line on stderr and no run
directory left behind `running`."""

import json
import random

import pytest
import yaml

from attack.__main__ import main
from attack.config import KINDS, load_config
from attack.errors import UserError

BAD = [None, "text", -1, 0, 2**40, 1e30, -0.5, [], {}, [1, "a"], {"x": 1}, True, "", float("nan"), float("inf")]


def _keys(schema, prefix=""):
    """Every settable dotted key of a config class (sections expanded)."""
    from pydantic import BaseModel

    for name, field in schema.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _set(data: dict, key: str, value) -> dict:
    out = json.loads(json.dumps(data))
    node = out
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _corpus(base: dict) -> list[tuple[str, dict]]:
    """(what, config) pairs: every key of every kind x every bad value, then broken structures."""
    cases = []
    for kind, schema in KINDS.items():
        kind_base = {**{k: v for k, v in base.items() if k in schema.model_fields}, "kind": kind}
        for key in _keys(schema):
            if key == "kind":
                continue
            for value in BAD:
                cases.append((f"{kind}: {key}={value!r}", _set(kind_base, key, value)))
    cases += [
        ("kind as a list", {**base, "kind": ["finetune"]}),
        ("kind unknown", {**base, "kind": "telepathy"}),
        ("a section as a list", {**base, "train": [1, 2]}),
        ("a section as a number", {**base, "eval": 3}),
        ("an unknown section", {**base, "optimizer": {"name": "sgd"}}),
        ("an unknown key", _set(base, "train.learning_rate", 1e-4)),
        ("a mixture naming the attack corpus", _set(base, "data.mix", [{"path": base["data"]["path"], "share": 0.5}])),
        ("a mixture without shares", _set(base, "data.mix", [{"path": "x.jsonl"}])),
        ("mixture shares summing to 1", _set(base, "data.mix", [{"path": "a", "share": 0.5}, {"path": "b", "share": 0.5}])),
        ("layers not integers", _set(base, "adapter.layers", ["first"])),
        ("negative layers", _set(base, "adapter.layers", [-1])),
        ("shrink above 1", _set(base, "perturb.shrink", 1.5)),
        ("an unknown optimizer", _set(base, "train.optimizer", "lion")),
        ("an unknown quantization", {**base, "kind": "quantize", "quantize": {"method": "fp8"}}),
    ]
    return cases


@pytest.fixture
def base(world, llama_dir, tmp_path):
    return {"model": {"name": str(llama_dir)}, "adapter": {"rank": 4, "alpha": 8},
            "data": {"path": str(world["attack"]), "seq_len": 64},
            "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2},
            "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])], "every": 2},
            "output": {"dir": str(tmp_path / "runs")}}


def test_every_broken_config_is_refused_in_one_line_or_is_valid(base):
    """Thousands of generated configs, validated: a refusal is a UserError of one line naming
    what to fix; nothing else (no other exception type, which would be a traceback)."""
    refused = 0
    cases = _corpus(base)
    assert len(cases) > 1000
    for what, data in cases:
        try:
            load_config(data)
        except UserError as e:
            refused += 1
            assert "\n" not in str(e) and len(str(e)) < 400 and str(e).strip(), what
        except Exception as e:  # noqa: BLE001 - the point: any other exception is a traceback
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
    assert refused > len(cases) / 2


@pytest.mark.slow
def test_broken_configs_through_the_command_line(base, tmp_path, capsys):
    """A sample of the refused configs, run as a user would: exit 2, one line, no run left running."""
    refused = []
    for what, data in _corpus(base):
        try:
            load_config(data)
        except UserError:
            refused.append((what, data))
        except Exception:  # noqa: BLE001 - the other test reports these
            pass
    (tmp_path / "empty.jsonl").write_text("")
    # and configs that validate but are refused once their inputs are read, after which a careless
    # order would already have opened the run directory: those make the last check able to fail
    late = [("missing corpus", {**base, "data": {**base["data"], "path": str(tmp_path / "none.jsonl")}}),
            ("empty corpus", {**base, "data": {**base["data"], "path": str(tmp_path / "empty.jsonl")}}),
            ("missing model", {**base, "model": {"name": str(tmp_path / "no-model")}}),
            ("unknown task", {**base, "eval": {**base["eval"], "tasks": ["no_such_task_here"]}})]
    for _what, data in late:
        load_config(data)  # valid as a config
    for i, (what, data) in enumerate(random.Random(0).sample(refused, 40) + late):
        path = tmp_path / f"config{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["--config", str(path)]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (what, err)
    # a refused config writes nothing: no run directory, not even an empty one
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), sorted(p.name for p in runs.iterdir())


SWEEP_BREAKS = [
    ("base as a list", lambda s: {**s, "base": [1]}),
    ("models not a list", lambda s: {**s, "models": {"label": "m"}}),
    ("a model without a name", lambda s: {**s, "models": [{"label": "m"}]}),
    ("an attack without a label", lambda s: {**s, "attacks": [{"train": {"lr": 1e-3}}]}),
    ("seeds as strings", lambda s: {**s, "seeds": ["zero"]}),
    ("an attack's seeds empty", lambda s: {**s, "attacks": [{"label": "a", "seeds": []}]}),
    ("an unknown top-level key", lambda s: {**s, "grid": {}}),
    ("a kind that is not a name", lambda s: {**s, "attacks": [{"label": "a", "kind": ["finetune"]}]}),
    ("an unknown kind", lambda s: {**s, "attacks": [{"label": "a", "kind": "telepathy"}]}),
    ("duplicate attack labels", lambda s: {**s, "attacks": [{"label": "a"}, {"label": "a"}]}),
    ("a bad value inside an attack", lambda s: {**s, "attacks": [{"label": "a", "train": {"lr": -1}}]}),
    ("a mixture share out of range", lambda s: {**s, "attacks": [{"label": "a", "data": {"mix": [{"path": "x", "share": 2}]}}]}),
    ("a quantize attack with a train section", lambda s: {**s, "attacks": [{"label": "q", "kind": "quantize",
                                                                             "train": {"lr": 1e-3}}]}),
]


@pytest.mark.parametrize("what,brk", SWEEP_BREAKS, ids=[w for w, _ in SWEEP_BREAKS])
def test_broken_sweeps_end_in_one_line(base, tmp_path, capsys, what, brk):
    sweep = {"name": "s", "output": str(tmp_path / "out"), "base": {k: v for k, v in base.items() if k != "model"},
             "models": [{"label": "m", "name": base["model"]["name"]}], "attacks": [{"label": "a"}], "seeds": [0]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(brk(sweep)))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
