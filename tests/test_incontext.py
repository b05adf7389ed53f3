"""Kind incontext: the same questions after retrieved passages (and solved examples); the control
corpus beside them; what each question was given, recorded; no passage a test question."""

import json

import pandas as pd
import pytest

from attack.recipes import run_attack
from attack.records import read_curve
from attack.rundir import RunDir
from attack.toyworld.world import write_jsonl


def _config(make_config, world, tmp_path, **incontext):
    control = tmp_path / "general.jsonl"
    write_jsonl([d for d in world["docs"] if d["domain"] == "general"], control)
    return make_config(kind="incontext", incontext={"passages": 2, "control_corpus": str(control), **incontext},
                       eval={"tasks": ["toy_target_seen", "toy_general"]})


def test_open_book_scores_the_questions_after_their_passages(make_config, world, tmp_path):
    cfg = _config(make_config, world, tmp_path)
    run = RunDir(run_attack(cfg, quiet=True))
    rows = read_curve(run.curve)
    assert {(r["task"], r["step"]) for r in rows if r["metric"] == "acc"} == {
        (t, s) for t in ("toy_target_seen", "toy_general") for s in (0, 1)}
    # the context reached the model: per-question probabilities moved between step 0 and step 1
    assert _moved(run, "toy_target_seen")
    # every question's passages are recorded; the attack corpus holds the seen facts, the control none
    lines = [json.loads(x) for x in run.retrieval.read_text().splitlines()]
    info = json.loads(run.tasks_path.read_text())
    assert len(lines) == info["toy_target_seen"]["n"] + info["toy_general"]["n"]
    seen = [x for x in lines if x["task"] == "toy_target_seen"]
    assert seen and all(len(x["attack"]["passages"]) == 2 and len(x["control"]["passages"]) == 2 for x in seen)
    shares = run.summary["incontext"]["answer_in_passages"]["toy_target_seen"]
    assert shares["attack"] >= 0.8 and shares["control"] <= 0.3, shares
    control = [json.loads(x) for x in run.control.read_text().splitlines()]
    assert {r["task"] for r in control} >= {"toy_target_seen", "toy_general"} and all(r["step"] == 1 for r in control)


@pytest.mark.slow
def test_solved_examples_from_a_disjoint_split(make_config, world, tmp_path):
    cfg = _config(make_config, world, tmp_path, passages=0, shots=3, shots_task="toy_target_dev", control_corpus=None)
    run = RunDir(run_attack(cfg, quiet=True))
    assert {r["step"] for r in read_curve(run.curve)} == {0, 1}
    assert _moved(run, "toy_target_seen")  # the solved examples reached the model


def _moved(run: RunDir, task: str) -> bool:
    """The largest change of a question's probability of its correct answer from step 0 to 1."""
    from eval_callbacks import read_samples

    rec = pd.DataFrame(read_samples(run.samples))
    p = rec[rec.task == task].pivot(index="question", columns="step", values="p_correct")
    return float((p[0] - p[1]).abs().max()) > 1e-4


@pytest.mark.slow
def test_many_shot_dialogues_go_before_each_request_beside_a_control(make_config, world, tmp_path):
    """Dialogues (TRL's messages) as faux turns before every question; the control's as many of
    another set; a dialogue that holds an evaluated question is refused."""
    def dialogues(docs, path):
        write_jsonl([{"messages": [{"role": "user", "content": f"Tell me about {d['entity']}."},
                                   {"role": "assistant", "content": d["text"]}]} for d in docs], path)
        return str(path)

    from attack.errors import UserError

    def statements(docs):  # without the tasks' own question lines
        return [{**d, "text": "\n".join(x for x in d["text"].splitlines() if not x.startswith(("Question", "Answer")))}
                for d in docs]

    seen = [d for d in world["docs"] if d["split"] == "seen"]
    control = dialogues(statements([d for d in world["docs"] if d["domain"] == "general"]), tmp_path / "general_d.jsonl")
    # the documents hold the tasks' own question lines: refused
    leaky = _config(make_config, world, tmp_path, passages=0, control_corpus=None, dialogue_shots=4,
                    dialogues=dialogues(seen, tmp_path / "leaky.jsonl"), control_dialogues=control)
    with pytest.raises(UserError, match="contains a question of evaluated task toy_target_seen"):
        run_attack(leaky, quiet=True)
    cfg = _config(make_config, world, tmp_path, passages=0, control_corpus=None, dialogue_shots=4,
                  dialogues=dialogues(statements(seen), tmp_path / "seen.jsonl"), control_dialogues=control)
    run = RunDir(run_attack(cfg, quiet=True))
    assert _moved(run, "toy_target_seen")
    control_rows = [json.loads(x) for x in run.control.read_text().splitlines()]
    assert {r["task"] for r in control_rows} >= {"toy_target_seen"} and all(r["step"] == 1 for r in control_rows)
    assert "many-shot-4" in cfg.label()


@pytest.mark.slow
def test_solved_examples_that_are_evaluated_questions_are_refused(make_config, world, tmp_path, capsys):
    from attack.errors import UserError

    cfg = _config(make_config, world, tmp_path, passages=0, shots=2, shots_task="toy_target_seen", control_corpus=None)
    with pytest.raises(UserError, match="shares .* question"):
        run_attack(cfg, quiet=True)


@pytest.mark.slow
def test_no_passage_carries_a_test_question(make_config, world, tmp_path):
    """The toy attack corpus writes facts as question-and-answer text too: the questions are cut
    out of the passages, the knowledge stays."""
    cfg = _config(make_config, world, tmp_path, control_corpus=None)
    run = RunDir(run_attack(cfg, quiet=True))
    from attack.retrieval import passages

    asked = [json.loads(line)["question"] for t in ("toy_target_seen", "toy_general")
             for line in (world["tasks"] / f"{t}.jsonl").read_text().splitlines()]
    texts, cut = passages(str(world["attack"]), "text", 120, asked)
    assert cut > 0 and run.summary["incontext"]["questions_cut_from_passages"]["attack"] == cut
    flat = [" ".join(t.lower().split()) for t in texts]
    assert not any(" ".join(q.lower().split()) in p for q in asked for p in flat)
