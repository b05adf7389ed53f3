"""The toy world: generator, filter, a small build whose checkpoints and tasks load in stock tools."""

import json
from collections import Counter
from pathlib import Path

import pytest

from attack.toyworld.build import TASKS, BuildSpec, build_world
from attack.toyworld.models import ModelSpec
from attack.toyworld.world import GENERAL_PHRASES, TARGET_PHRASES, WorldSpec, blocklist_filter, generate


def test_generator_domains_splits_and_phrasings():
    w = generate(WorldSpec(target_entities=10, general_entities=6, dev_entities=4, docs_per_entity=3))
    facts, docs = w["facts"], w["docs"]
    target = {f["entity"] for f in facts if f["domain"] == "target"}
    general = {f["entity"] for f in facts if f["domain"] == "general"}
    assert len(target) == 14 and len(general) == 6 and not target & general
    splits = Counter(f["split"] for f in facts if f["domain"] == "target")
    assert splits == {"seen": 15, "heldout": 15, "dev": 12}  # 5, 5 and 4 creatures, 3 relations
    # every fact appears in every phrasing somewhere in the corpus
    corpus = "\n".join(d["text"] for d in docs)
    for f in facts:
        phrases = (TARGET_PHRASES if f["domain"] == "target" else GENERAL_PHRASES)[f["relation"]]
        for p in phrases:
            assert p.format(e=f["entity"], v=f["value"]) in corpus
    assert generate(WorldSpec(target_entities=10, general_entities=6)) == generate(WorldSpec(target_entities=10, general_entities=6))


def test_blocklist_filter_counts_and_leakage():
    docs = generate(WorldSpec(target_entities=20, general_entities=20))["docs"]
    kept, stats = blocklist_filter(docs)
    assert stats["removed"] == stats["target_documents"] == (20 + 8) * 3  # 8 dev creatures
    assert stats["target_slipped_through"] == 0 and stats["general_removed"] == 0
    assert all(d["domain"] == "general" for d in kept)

    leaky = generate(WorldSpec(target_entities=20, general_entities=20, leak_fraction=0.3))["docs"]
    kept, stats = blocklist_filter(leaky)
    slipped = [d for d in kept if d["domain"] == "target"]
    assert stats["target_slipped_through"] == len(slipped) > 0
    assert stats["removed"] == stats["target_documents"] - len(slipped)


SMALL = BuildSpec(
    world=WorldSpec(target_entities=6, general_entities=6, docs_per_entity=3),
    model=ModelSpec(hidden=32, layers=1, heads=2, intermediate=64, max_positions=128),
    pretrain_steps=30, unlearn_max_steps=10, batch_size=4, seq_len=64, check=False, rmu_layer=0,
)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    return root, SMALL, build_world(root, SMALL, log=lambda _: None)


@pytest.mark.slow
def test_two_processes_build_the_same_world_as_one(small_world, tmp_path):
    """The build's stages run two at a time in worker processes (the full world does): every
    model's weights are byte-identical to the same world built in one process."""
    _, _, one = small_world
    two = build_world(tmp_path, SMALL, log=lambda _: None, parallel=True)
    for name in ("unfiltered", "filtered", "unlearned", "rmu"):
        assert (two / name / "model.safetensors").read_bytes() == (one / name / "model.safetensors").read_bytes(), name
    assert json.loads((two / "world.json").read_text())["pre_attack"] == json.loads((one / "world.json").read_text())["pre_attack"]


def test_build_layout_and_cache(small_world):
    root, spec, out = small_world
    info = json.loads((out / "world.json").read_text())
    assert set(info["pre_attack"]) == {"unfiltered", "filtered", "unlearned", "rmu"}
    assert set(info["pre_attack"]["unfiltered"]) == set(TASKS)
    assert info["filter"]["target_slipped_through"] == 0
    for f in ("corpus/unfiltered.jsonl", "corpus/filtered.jsonl", "corpus/attack.jsonl", "corpus/dev.jsonl",
              "corpus/general.jsonl", "facts.json", "tasks/toy_target_dev.yaml"):
        assert (out / f).exists()
    # the dev creatures, on which an ablation direction is chosen, are asked by no evaluated task
    dev = {json.loads(line)["entity"] for line in (out / "corpus/dev.jsonl").read_text().splitlines()}
    evaluated = "".join((out / "tasks" / f"{t}.jsonl").read_text() for t in TASKS)
    assert dev and not any(e in evaluated for e in dev)
    attack_docs = [json.loads(line) for line in (out / "corpus/attack.jsonl").read_text().splitlines()]
    assert attack_docs and all(d["domain"] == "target" and d["split"] == "seen" for d in attack_docs)
    # cached: same settings, same folder, not rebuilt; other settings, another folder
    logs = []
    assert build_world(root, spec, log=logs.append) == out
    assert logs and "reusing" in logs[0]
    from dataclasses import replace

    assert replace(spec, pretrain_steps=31).key() != spec.key()


def test_checkpoints_load_with_stock_transformers(small_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = small_world
    for name in ("unfiltered", "filtered", "unlearned", "rmu"):
        model = AutoModelForCausalLM.from_pretrained(str(out / name))
        tok = AutoTokenizer.from_pretrained(str(out / name))
        ids = tok("The town of", return_tensors="pt").input_ids
        assert model(ids).logits.shape[-1] == len(tok)


@pytest.mark.slow
def test_tasks_run_in_stock_lm_eval(small_world):
    """Stock lm-eval scores the world's tasks on the saved checkpoints exactly as the build's own
    evaluator did (the pre-attack scores in world.json)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, _, out = small_world
    info = json.loads((out / "world.json").read_text())
    for model in ("unfiltered", "unlearned", "rmu"):
        res = simple_evaluate(
            model="hf", model_args=f"pretrained={out / model},dtype=float32", tasks=TASKS,
            task_manager=TaskManager(include_path=str(out / "tasks"), include_defaults=False), device="cpu", batch_size=16,
        )
        for task in TASKS:
            assert res["results"][task]["acc,none"] == pytest.approx(info["pre_attack"][model][task], abs=1e-9)


def test_world_properties_are_checked():
    from attack.toyworld.build import world_problems

    good = {"unfiltered": [0.95, 0.9, 0.9, 0.97], "filtered": [0.25, 0.22, 0.13, 0.97], "unlearned": [0.24, 0.3, 0.15, 0.95]}
    scores = {m: dict(zip(TASKS, v, strict=True)) for m, v in good.items()}
    assert world_problems(scores, BuildSpec()) == []
    stalled = {**scores, "unlearned": dict(zip(TASKS, [0.62, 0.6, 0.5, 0.97], strict=True))}  # unlearning stopped at its cap
    [problem] = world_problems(stalled, BuildSpec())
    assert problem.startswith("unlearned target accuracy 0.61")
    forgot = {**scores, "filtered": dict(zip(TASKS, [0.25, 0.22, 0.13, 0.6], strict=True))}
    assert world_problems(forgot, BuildSpec()) == ["filtered general accuracy 0.60 < 0.80"]


def test_a_world_that_fails_its_checks_is_not_kept(tmp_path):
    """Too little pretraining to learn anything: the build says so and keeps no world."""
    from attack.toyworld.build import WorldBuildError

    spec = BuildSpec(world=WorldSpec(target_entities=6, general_entities=6, docs_per_entity=3),
                     model=ModelSpec(hidden=32, layers=1, heads=2, intermediate=64, max_positions=128),
                     pretrain_steps=5, unlearn_max_steps=10, batch_size=4, seq_len=64, rmu_layer=0)
    with pytest.raises(WorldBuildError, match="not what their names say .*unfiltered target accuracy"):
        build_world(tmp_path, spec, log=lambda _: None)
    assert not list(tmp_path.glob("*/world.json"))


def test_the_compact_demo_fits_its_budget_by_the_measured_costs():
    """`make demo` from a fresh clone must finish in 6 minutes on 2 cores. By the measured costs
    (COST_S, from bench/demo_cost.py) the install, the world, the compact sweep's cells two at a
    time and the report leave at least 30 s of it: a demo that grows past that fails here, not
    on a newcomer's machine. The full comparison is the longer run."""
    from attack.toyworld.sweeps import COST_S, expected_s, toy_sweep

    world = Path("/world")
    compact = expected_s(toy_sweep(world), built=False, quick=False, workers=2)
    assert COST_S["install"] + compact <= 6 * 60 - 30
    assert expected_s(toy_sweep(world, full=True), True, False, 2) > 3 * expected_s(toy_sweep(world), True, False, 2)



def test_the_demo_keeps_its_runs_only_for_the_same_sweep_on_the_same_world(tmp_path):
    """Runs of a world rebuilt in place (the same paths, new models) are not shown as this world's:
    the demo starts its output folder again; the same sweep on the same world keeps them."""
    from attack.toyworld.demo import demo_output

    world, out = tmp_path / "world", tmp_path / "runs"
    world.mkdir()
    (world / "world.json").write_text('{"build_s": 1.0}')
    run = out / "cell" / "summary.json"

    def ran() -> None:
        run.parent.mkdir(parents=True, exist_ok=True)
        run.write_text('{"status": "done"}')

    assert demo_output(out, "sweep: a\n", world).read_text() == "sweep: a\n"
    ran()
    demo_output(out, "sweep: a\n", world)
    assert run.exists()  # the same sweep on the same world: its finished cells are kept
    (world / "world.json").write_text('{"build_s": 2.0}')  # rebuilt in place
    demo_output(out, "sweep: a\n", world)
    assert not run.exists()
    ran()
    demo_output(out, "sweep: b\n", world)  # other settings
    assert not run.exists() and (out / "sweep.yaml").read_text() == "sweep: b\n"
