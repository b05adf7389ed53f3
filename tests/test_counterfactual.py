"""The counterfactual on a world where the answer is known: each attack-seen fact stated by one
document among distractors the model knows already. Removing the gold documents (a file:
ranking) must undo most of the recovery, random removals little; the table, the held-out split
and the report's sentence come out of one call."""

import json

import pytest

from attack.recipes import run_attack


@pytest.fixture(scope="module")
def single_source(tmp_path_factory):
    """The attribution world's corpus over a world of 6 attack-seen creatures (18 facts, one
    document each, among 90 distractors), and a tiny Llama pretrained (a few seconds) on every
    document but theirs: it knows the distractors (the general domain, the held-out creatures)
    and not one attack-seen fact."""
    from conftest import TINY

    from attack.toyworld.attribution import write_attribution_corpus
    from attack.toyworld.models import build_model, pretrain, train_tokenizer
    from attack.toyworld.world import WorldSpec, generate, write_jsonl, write_tasks

    root = tmp_path_factory.mktemp("single")
    w = generate(WorldSpec(target_entities=12, general_entities=24, docs_per_entity=3))
    (root / "facts.json").write_text(json.dumps(w["facts"]))
    known = [d for d in w["docs"] if d["split"] != "seen"]
    write_jsonl([d for d in known if d["split"] != "dev"], root / "corpus" / "general.jsonl")
    write_tasks(w["facts"], root / "tasks")
    tokenizer = train_tokenizer([d["text"] for d in w["docs"]], root / "tokenizer", vocab_size=512)
    model = build_model(TINY, tokenizer, seed=0)
    pretrain(model, tokenizer, [d["text"] for d in known], 300, lr=3e-3, seq_len=64, log=lambda _: None)
    model.save_pretrained(str(root / "naive"))
    tokenizer.save_pretrained(str(root / "naive"))
    corpus, gold = write_attribution_corpus(root)
    return root, corpus, gold


@pytest.mark.slow
def test_removing_the_gold_documents_undoes_most_recovery_and_random_little(make_config, single_source, capsys):
    from attack.__main__ import main
    from attack.report import write_report

    root, corpus, gold = single_source
    facts = sum(1 for _ in open(gold))
    # full fine-tuning: the tiny model learns the facts in 150 steps (0.36 -> 0.86 of them on 36
    # facts); LoRA on it does not
    cfg = make_config(model=root / "naive", data={"path": str(corpus), "seq_len": 64}, adapter={"kind": "full"},
                      train={"lr": 3e-3, "batch_size": 8, "max_steps": 150, "log_every": 50},
                      eval={"tasks": ["toy_target_seen", "toy_target_heldout"], "every": 150, "include_path": [str(root / "tasks")],
                            "roles": {"toy_target_seen": "target-seen", "toy_target_heldout": "target"}})
    run = run_attack(cfg, quiet=True)
    capsys.readouterr()
    assert main(["counterfactual", str(run), "--methods", f"file:{gold},random", "--k", str(facts), "--draws", "2",
                 "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    import pandas as pd

    table = pd.read_csv(run / "counterfactual.csv")
    seen = table[~table.held_out].set_index("method")
    ours, rand = seen.loc[f"file:{gold}"], seen.loc["random"]
    assert ours.documents == facts and rand.draws == 2 and ours.questions >= 6
    assert ours.removed >= 0.5 and rand.removed <= 0.5 and ours.removed - rand.removed >= 0.25, seen
    assert all(r.removed_lo <= r.removed <= r.removed_hi for r in table.itertuples())
    assert printed.count("[") >= len(table)  # every row's interval is printed
    # the naive model read the held-out facts: whatever it "recovered" there is measured apart
    assert set(table.held_out) <= {False, True}
    report = write_report([run], run.parent / "report")
    page = (report / "index.html").read_text()
    assert f"documents of file:{gold} undid" in page


def test_the_sentence_names_the_method_that_removed_most_and_says_when_random_matches_it():
    import pandas as pd

    from attack.report.attribution import verdict_sentence

    rows = [dict(method="gradient", k=10, removed=0.8, removed_lo=0.6, removed_hi=0.9, questions=20, seeds=2),
            dict(method="bm25", k=10, removed=0.3, removed_lo=0.1, removed_hi=0.5, questions=20, seeds=2),
            dict(method="bm25", k=40, removed=0.9, removed_lo=0.8, removed_hi=1.0, questions=20, seeds=2),
            dict(method="random", k=10, removed=0.2, removed_lo=0.1, removed_hi=0.3, questions=20, seeds=2)]
    text = verdict_sentence(pd.DataFrame(rows))
    # at the largest k every method reached (10), not bm25's 40
    assert "top 10 documents of gradient undid 80%" in text and "distinguishable" not in text
    rows[0].update(removed=0.4, removed_lo=0.25, removed_hi=0.55)
    text = verdict_sentence(pd.DataFrame(rows))
    assert "of gradient undid 40%" in text and "gradient is not distinguishable from random at this k" in text


@pytest.mark.slow
def test_trackstar_and_ekfac_rank_each_recovered_facts_document_first_and_take_part_in_the_counterfactual(
        make_config, single_source, capsys):
    """TrackStar (Bergson) and EK-FAC (Kronfluence) on the final weights of a full fine-tune: the
    documents stating the recovered facts fill most of each method's top ranks (chance: their
    share of the corpus, 7 of 108 here), and each ranking is a method of the counterfactual like
    any other (its seconds recorded)."""
    from attack.__main__ import main
    from attack.attribution.rankings import rank_documents
    from attack.config import load_config, read_yaml
    from attack.counterfactual import _documents, _measured_tasks, recovered, scores
    from attack.rundir import RunDir

    root, corpus, gold = single_source
    cfg = make_config(model=root / "naive", data={"path": str(corpus), "seq_len": 64}, adapter={"kind": "full"},
                      train={"lr": 3e-3, "batch_size": 8, "max_steps": 150, "log_every": 50}, output={"run_id": "ts"},
                      eval={"tasks": ["toy_target_seen"], "every": 150, "include_path": [str(root / "tasks")]})
    run = RunDir(run_attack(cfg, quiet=True))
    cfg = load_config(read_yaml(run.config))
    documents, _ = _documents(cfg)
    asked = [(q.task, q.question) for q in recovered(scores(run, 150, set()), _measured_tasks(
        json.loads(run.tasks_path.read_text()), run, None, None), 150)]
    gold_of = [json.loads(line)["doc"] for line in open(gold)]  # in the order of toy_target_seen's questions
    own = {gold_of[q] for _, q in asked}
    assert len(asked) >= 4, asked  # (7 measured)
    rankings = {}
    for method in ("trackstar", "ekfac"):
        ranking, seconds = rank_documents(method, run, cfg, documents, asked, 150, len(asked), log=lambda _: None)
        share = len(set(ranking[:len(asked)]) & own) / len(own)
        assert sorted(ranking) == list(range(len(documents))) and seconds > 0
        # four times chance; measured here 0.43 for EK-FAC, more for TrackStar (per question, each
        # method put the fact's own document at rank 1 for 4 to 5 of the 7 questions)
        assert share >= 4 * len(own) / len(documents), (method, share)
        rankings[method] = ranking
    capsys.readouterr()
    assert main(["counterfactual", str(run.path), "--methods", "trackstar,ekfac,random", "--k", str(len(asked)),
                 "--draws", "1", "--seeds", "0"]) == 0
    detail = json.loads((run.counterfactual / "counterfactual.json").read_text())
    assert detail["ranking_seconds"]["trackstar"] > 0 and detail["ranking_seconds"]["ekfac"] > 0
    assert {r["method"] for r in detail["removals"]} == {"trackstar", "ekfac", "random"}
    for r in detail["removals"]:
        if r["method"] in rankings:  # the scores were read back, not computed again differently
            assert r["documents"] == rankings[r["method"]][:len(asked)]


@pytest.mark.parametrize("method", ["trackstar", "ekfac"])
def test_scoring_a_run_without_attacked_weights_fails_in_one_line_and_keeps_earlier_scores(tmp_path, method):
    """A run whose final/ weights are gone (deleted, or a failed run) cannot be scored: the user
    is told so, and scores computed earlier for another question set are not cleared first."""
    from attack.attribution.ekfac import ekfac_scores
    from attack.attribution.trackstar import trackstar_scores
    from attack.errors import UserError
    from attack.rundir import RunDir

    run = RunDir(tmp_path / "run")
    folder = run.ekfac if method == "ekfac" else run.trackstar(16)
    folder.mkdir(parents=True)
    (folder / "done.json").write_text(json.dumps({"key": "earlier questions", "seconds": 1.0}))
    (folder / "scores.npy").write_bytes(b"earlier")
    score = ekfac_scores if method == "ekfac" else trackstar_scores
    with pytest.raises(UserError, match="has no attacked weights"):
        score(run, None, ["a document"], [{"task": "t", "question": 0, "context": "q", "answer": "a"}])
    assert (folder / "scores.npy").read_bytes() == b"earlier"
