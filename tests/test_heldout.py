"""Held-out text on the loss (eval.heldout_texts): bits per byte as lm-eval's loglikelihood_rolling
scores it, equal to a computation from the model's logits; documents the attack trains on are
refused; tokens to baseline on hand-made curves with known answers."""

import json
import math

import pandas as pd
import pytest
import torch

from attack.report.heldout import crossing, tokens_to_baseline

TEXTS = ["The creature zorbl lives in the marsh and eats moss every spring.",
         "Rivers of the north carry cold water past the old mills of the valley towns."]


def _heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _by_hand_bits_per_byte(model, tokenizer, texts) -> float:
    """-sum log2 p(token | the tokens before it, after the end-of-text token) / UTF-8 bytes."""
    total, nbytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([[tokenizer.eos_token_id, *ids[:-1]]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inputs).logits.double(), dim=-1)[0]
        total += float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
        nbytes += len(text.encode("utf-8"))
    return -total / nbytes / math.log(2)


def test_bits_per_byte_equal_a_computation_from_the_logits(make_config, world, tmp_path):
    from transformers import AutoModelForCausalLM

    from attack.evaluation import find_eval_tasks, open_evaluator

    cfg = make_config(eval={"tasks": ["toy_general"], "heldout_texts": {"bio_text": str(_heldout(tmp_path))}})
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name).eval()
    tokenizer = world["tokenizer"]
    evaluator, info = open_evaluator(cfg.eval, model, tokenizer, None, find_eval_tasks(cfg.eval))
    assert info["bio_text"]["metric"] == "bits_per_byte"
    rows = {(r["task"], r["metric"]): r["value"] for r in evaluator.evaluate()}
    assert rows[("bio_text", "bits_per_byte")] == pytest.approx(_by_hand_bits_per_byte(model, tokenizer, TEXTS), abs=1e-4)
    assert ("bio_text", "word_perplexity") in rows and ("toy_general", "acc") in rows


@pytest.mark.slow
def test_held_out_text_the_attack_trains_on_is_refused(make_config, world, tmp_path, capsys):
    from attack.__main__ import main

    trained = [json.loads(line)["text"] for line in world["attack"].read_text().splitlines()][:1]
    path = tmp_path / "leak.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*TEXTS, *trained]))
    cfg = make_config()
    argv = ["--model", cfg.model.name, "--data", cfg.data.path, "--eval-tasks", "toy_general", "--eval-include",
            cfg.eval.include_path[0], "--max-steps", "2", "--batch-size", "4", "--seq-len", "64",
            "--output", str(tmp_path / "runs"), "--set", f"eval.heldout_texts=leak={path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "document 2 shares a 13-word passage with the attack corpus" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_crossing_is_interpolated_between_the_points_around_it():
    assert crossing([0, 100, 200], [2.0, 1.6, 1.0], 1.3) == pytest.approx(150.0)  # 1.6 -> 1.0 crosses 1.3 halfway
    assert crossing([0, 100], [1.2, 1.0], 1.3) == 0.0  # at the baseline before the attack
    assert crossing([0, 100, 200], [2.0, 1.8, 1.5], 1.3) is None


def test_tokens_to_baseline_table_from_hand_made_curves():
    rows = []

    def curve(model, role, attack, points):
        for step, (tokens, value) in enumerate(points):
            rows.append(dict(model=model, role=role, attack=attack, task="bio_text", metric="bits_per_byte",
                             step=step, tokens_seen=tokens, value=value))

    curve("ref", "unfiltered", "lora", [(0, 1.0), (100, 0.9)])
    curve("filtered", "filtered", "lora", [(0, 2.0), (100, 1.5), (200, 0.8)])
    curve("filtered", "filtered", "sgd", [(0, 2.0), (100, 1.9), (200, 1.7)])
    t = tokens_to_baseline(pd.DataFrame(rows)).set_index("attack")
    assert t.loc["lora", "reached"] and t.loc["lora", "tokens"] == pytest.approx(100 + 0.5 / 0.7 * 100)
    assert not t.loc["sgd", "reached"] and pd.isna(t.loc["sgd", "tokens"]) and t.loc["sgd", "last_bpb"] == 1.7
    assert t.loc["lora", "reference_bpb"] == 1.0  # the reference's pre-attack value, not its attacked one
