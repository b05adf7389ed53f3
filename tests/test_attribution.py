"""Attribution (--attribution): each document piece of a packed row gets its own gradient,
collection changes no trained weight, attribution.jsonl has its columns, and misuse ends in
one line."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapter_weights
from test_errors import _args, _one_line_error

from attack.recipes import run_attack

COLUMNS = {"method", "task", "question", "step", "rank", "document", "score"}


def test_each_piece_of_a_packed_row_gets_its_own_documents_gradient(world, llama_dir, make_config, tmp_path):
    """One Trainer step over packed rows that hold several documents each: the gradient stored for
    every piece equals the gradient of that piece's tokens run alone (same positions), up to the
    one constant the batch mean divides by. A row-level gradient, or a piece seeing its row's
    other documents, fails this."""
    from bergson import GradientProcessor
    from bergson.collector.gradient_collectors import TraceCollector
    from bergson.data import load_gradients
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from attack.attribution.collect import DocumentGradients, IndexedRows
    from attack.data import load_attack_rows
    from attack.rundir import AttributionFiles

    cfg = make_config(data={"seq_len": 48, "cache_dir": str(tmp_path / "cache")})
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    rows = load_attack_rows(cfg.data, tokenizer, 4, log=lambda _: None)
    pieces = rows.segments()
    assert (np.bincount(pieces[:, 0]) > 1).any(), "the fixture must pack several documents into a row"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():  # B starts at zero, which zeroes every lora_A gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    before = copy.deepcopy(model)
    trainer = Trainer(model=model, train_dataset=IndexedRows(rows), data_collator=default_data_collator,
                      args=TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=1, per_device_train_batch_size=4,
                                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                             remove_unused_columns=False))
    trainer.args.__gradient_collection_enabled__ = True
    collector = DocumentGradients(AttributionFiles(tmp_path / "attr"), pieces, projection_dim=8)
    trainer.add_callback(collector)
    trainer.train()

    trained = load_from_disk(str(tmp_path / "attr" / "order.hf"))["_idx"]
    stored = np.asarray(load_gradients(tmp_path / "attr" / "train" / "epoch_0"))[trained]
    assert len({int(pieces[i, 0]) for i in trained}) == 4  # the pieces of the batch's 4 rows
    base = before.base_model
    processor = GradientProcessor({}, projection_dim=8, reshape_to_square=True)
    alone = []
    for i in trained:
        row, _doc, offset, _first, tokens = (int(x) for x in pieces[i])
        r = rows[row]
        span = slice(offset, offset + tokens)
        ids, labels, pos = r["input_ids"][span][None], r["labels"][span][None], r["position_ids"][span][None]
        modules = list(collector.grad_sizes)  # the stored layout
        tracer = TraceCollector(model=base, processor=processor, target_modules=set(modules), device="cpu",
                                dtype=torch.float32)
        with tracer:
            logits = before(input_ids=ids, position_ids=pos).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
            nll.backward()
        before.zero_grad(set_to_none=True)
        alone.append(torch.cat([torch.cat(tracer.mod_grads[n], dim=1) for n in modules], dim=1)[0].numpy())
    alone = np.stack(alone)
    for s, a in zip(stored, alone, strict=True):
        if np.linalg.norm(a) == 0:  # a one-token piece predicts nothing
            assert np.linalg.norm(s) == 0
            continue
        assert np.dot(s, a) / (np.linalg.norm(s) * np.linalg.norm(a)) > 0.9999
    scale = [np.linalg.norm(s) / np.linalg.norm(a) for s, a in zip(stored, alone, strict=True) if np.linalg.norm(a) > 0]
    assert np.allclose(scale, scale[0], rtol=1e-3)  # the batch's one token count



@pytest.mark.slow
def test_collection_changes_no_weight_and_attribution_jsonl_has_its_columns(make_config, world):
    # a high rate: some answers of the untrained model change, so some questions count as recovered
    settings = dict(train={"max_steps": 6, "batch_size": 4, "lr": 1e-2},
                    eval={"every": 3, "tasks": ["toy_target_seen", "toy_general"]}, data={"seq_len": 32})
    plain = run_attack(make_config(**settings, output={"run_id": "plain"}), quiet=True)
    run = run_attack(make_config(**settings, output={"run_id": "attributed"}, attribution={"enabled": True}), quiet=True)
    a, b = adapter_weights(plain), adapter_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(plain) == _curve(run)

    rows = [json.loads(line) for line in open(run / "attribution.jsonl")]
    assert rows and all(set(r) == COLUMNS for r in rows)
    assert {r["method"] for r in rows} == {"gradient", "tracin", "bm25", "random"}
    assert {r["step"] for r in rows} == {3, 6}
    documents = sum(1 for _ in open(world["attack"]))
    questions = {t: sum(1 for _ in open(world["tasks"] / f"{t}.jsonl")) for t in ("toy_target_seen", "toy_general")}
    for ranks in _group(rows).values():
        assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= 10
    assert all(0 <= r["document"] < documents and 0 <= r["question"] < questions[r["task"]] for r in rows)
    # a ranking is sorted by its score
    for key, group in _group(rows, values="score").items():
        assert group == sorted(group, reverse=True), key
    summary = json.loads((run / "attribution_summary.json").read_text())
    assert summary["gold_field"] == "entity" and set(summary["validation"]) == {"gradient", "tracin", "bm25", "random"}

    # the counterfactual reruns the attack to the last point without each method's chosen documents
    from attack.counterfactual import counterfactual

    table = counterfactual(run, ["gradient", "bm25"], [2], tasks=["toy_target_seen", "toy_general"], draws=2, seeds=[0],
                           log=lambda _: None)
    assert set(table.method) == {"gradient", "bm25", "random"} and set(table.k) == {2}
    detail = json.loads((run / "counterfactual" / "counterfactual.json").read_text())
    texts = [json.loads(line)["text"] for line in open(world["attack"])]
    drawn = {r["method"] + str(r["draw"]): r["documents"] for r in detail["removals"]}
    assert set(drawn) == {"gradient0", "bm250", "random0", "random1"} and all(len(d) == 2 for d in drawn.values())
    for name, path in detail["runs"].items():
        if name.endswith("original"):
            assert path == str(run)  # the run's own seed is its own original
            continue
        method, k, draw = name.split(":")[1].split("/")
        kept = [json.loads(line)["text"] for line in open(run / "counterfactual" / "corpora" / f"{Path(path).name}.jsonl")]
        assert len(kept) == documents - 2 and not {texts[d] for d in drawn[method + draw]} & set(kept)
        assert max(r["step"] for r in _curve(Path(path))) == 6
    assert (run / "counterfactual.csv").read_text().splitlines()[0] == \
        "method,k,documents,removed,removed_lo,removed_hi,questions,seeds,draws,held_out"


def _curve(run):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in open(run / "curve.jsonl")]


def _group(rows, values="rank"):
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["task"], r["question"], r["step"]), []).append(r[values])
    return {k: v for k, v in out.items()}


def test_counterfactual_removes_the_documents_ranked_best_over_the_question_set(tmp_path):
    from attack.attribution.rankings import top_documents
    from attack.rundir import RunDir

    run = RunDir(tmp_path)
    rows = [dict(method="gradient", task="t", question=q, step=s, rank=r, document=d, score=0.0)
            for q, s, ranked in [(0, 5, [7, 3, 9]), (1, 5, [3, 7, 8]), (2, 5, [1, 2, 4]), (0, 10, [3, 9, 7])]
            for r, d in enumerate(ranked, start=1)]
    run.attribution_rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # question 2 is outside the set, and step 10 after the point asked about
    asked = [("t", 0), ("t", 1)]
    assert top_documents(run, asked, 5, "gradient", 3) == [3, 7, 8]
    assert top_documents(run, asked, 10, "gradient", 2) == [3, 7]


def test_recovery_removed_is_the_mean_with_a_bootstrap_interval_over_questions_within_seeds():
    from attack.counterfactual import removal_measure

    rng = np.random.default_rng(0)
    # every question fully undone on one seed, none on the other: the mean is the share of units
    mean, lo, hi = removal_measure({0: np.ones(30), 1: np.zeros(10)}, rng)
    assert mean == 0.75 and lo == hi == 0.75  # within-seed resampling of constant values cannot move it
    mean, lo, hi = removal_measure({0: np.array([0.0, 1.0] * 20)}, rng)
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7


def test_a_file_ranking_is_read_in_rank_order_and_misuse_is_one_line(tmp_path):
    from attack.attribution.rankings import file_ranking
    from attack.errors import UserError

    good = tmp_path / "gold.jsonl"
    good.write_text('{"doc": 4}\n{"doc": 1}\n\n{"doc": 4}\n{"doc": 0}\n')
    assert file_ranking(str(good), 5) == [4, 1, 0]  # a repeat keeps its first rank
    for text, expected in [('{"doc": 5}', "not a row of the attack corpus"), ('{"row": 1}', "is not a {\"doc\": N} row"),
                           ('{"doc": "1"}', "not a row"), ("", "ranks no document")]:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(UserError, match=re.escape(expected)):
            file_ranking(str(tmp_path / "bad.jsonl"), 5)
    with pytest.raises(UserError, match="no such file"):
        file_ranking(str(tmp_path / "missing.jsonl"), 5)


def test_bm25_ranks_a_documents_own_words_first(tmp_path):
    from attack.attribution.attribute import _bm25

    texts = ["The creature Zorbl eats moss.", "The creature Rylbl lives in the dune.", "Ships sail at dawn."]
    score = _bm25(texts)
    assert int(np.argmax(score("Where does the creature Rylbl live? dune"))) == 1
    assert not score("nothing known here").any()


@pytest.mark.parametrize("over, expected", [
    ({"--attribution": "", "--adapter-kind": "full"}, "attribution collects LoRA gradients"),
    ({"--attribution": "", "--resume": ""}, "attribution is collected in one uninterrupted run"),
])
def test_attribution_misuse_is_one_line(capsys, world, llama_dir, tmp_path, over, expected):
    _one_line_error(capsys, _args(world, llama_dir, tmp_path, **over), expected)
    assert not (tmp_path / "runs").exists()


def test_attribute_on_a_run_without_attribution_is_one_line(capsys, make_config, tmp_path):
    run = run_attack(make_config(train={"max_steps": 2}, eval={"every": 2, "tasks": ["toy_target_seen"]}), quiet=True)
    capsys.readouterr()  # the attack's own output (a weight-loading bar) is not the command's
    _one_line_error(capsys, ["attribute", str(run)], "holds no attribution data; run the attack with --attribution")
    _one_line_error(capsys, ["counterfactual", str(run), "--task", "toy_target_seen", "--methods", "gradient"],
                    "has no attribution.jsonl")


def test_retrieval_metrics_are_named_as_the_field_names_them():
    """recall@k: the share of the gold documents in the top k; hit@k: any of them; MRR: the first's
    reciprocal rank."""
    from attack.attribution.attribute import _recall_mrr

    order = np.array([5, 3, 9, 1, 42, 7])
    hit, recall, rr = _recall_mrr(order, {3, 1, 42}, k=2)
    assert (hit, rr) == (1.0, 0.5) and recall == pytest.approx(1 / 3)
    assert _recall_mrr(order, {3, 1, 42}, k=5)[1] == 1.0
    hit, recall, rr = _recall_mrr(order, {7}, k=2)
    assert (hit, recall, rr) == (0.0, 0.0, 1 / 6)
