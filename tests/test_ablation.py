"""Directional ablation: the weight edit equals hook ablation, the stream loses the direction."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from attack.directions import ablated, decoder_layers, mean_activations, orthogonalize, random_direction, text_batches


def _with_biases(model):
    """Random non-zero biases on every linear layer that has one (GPT-NeoX's writers do), and
    tied embeddings where the architecture allows: both are what the edit must get right."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def _residuals(model, ids):
    """The residual stream entering each layer, and leaving the last one (before the final norm)."""
    out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_weight_edit_equals_hook_ablation(arch, strength, llama_dir, neox_dir, world):
    path = llama_dir if arch == "llama" else neox_dir
    model = _with_biases(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)).eval()
    if arch == "llama":  # tied input/output embeddings: editing one must not edit the other
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    r = random_direction(model.config.hidden_size, seed=3).float()
    ids = torch.tensor([world["tokenizer"]("The creature Zorbl lives in the marsh. Question: what")["input_ids"]])
    with torch.no_grad(), ablated(model, r, strength):
        hooked = model(input_ids=ids).logits
    edited = copy.deepcopy(model)
    orthogonalize(edited, r, strength)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        after = edited(input_ids=ids).logits
    assert (after - plain).abs().max() > 1e-3  # the edit changed the model
    torch.testing.assert_close(after, hooked, atol=1e-4, rtol=0)
    if strength == 1.0:  # the stream holds nothing along r at any layer
        with torch.no_grad():
            if arch == "neox":  # the biases were edited too, not only the matrices
                bias = decoder_layers(edited)[0].attention.dense.bias
                assert abs(float(bias @ r)) < 1e-5 * float(bias.norm())
            for h in _residuals(edited, ids)[:-1]:
                assert float((h @ r).abs().max()) < 1e-4 * float(h.norm(dim=-1).max())
    # the original's unembedding is untouched: ablating nothing gives the original logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain)


@pytest.mark.parametrize("shared", [False, True])
def test_mean_activations_of_last_positions(llama_dir, world, shared, monkeypatch):
    """The means over each text's last k tokens equal those of one text at a time without padding,
    also when the texts' shared start (a chat template's system turn) runs once."""
    import eval_callbacks.fastlm as fastlm

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    start = "The creature Zorbl lives in the marsh and boats sail by it. " if shared else ""
    texts = [start + "The creature Zorbl lives in the marsh.", start + "Boats sail."]
    if shared:  # one text the start of the other: what the rows share must stop k tokens before its end
        texts[0] = texts[1] + " The creature Zorbl lives in the marsh."
    real, seen = fastlm.shared_prefix, []

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(fastlm, "shared_prefix", spy)
    batches = text_batches(world["tokenizer"], texts, max_length=64)
    k = 2
    means = mean_activations(model, batches, positions=k)  # (k, layers, hidden)
    assert (seen[0] is not None) == shared  # the shared start ran once where there was one
    # the same means, one text at a time, without padding
    by_hand = 0
    for t in texts:
        ids = torch.tensor([world["tokenizer"](t)["input_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        by_hand = by_hand + torch.stack([torch.stack([h[0, -k + j].double() for h in hs[:-1]]) for j in range(k)])
    torch.testing.assert_close(means, by_hand / 2, atol=1e-5, rtol=1e-5)
    # upto: the same means of the layers up to it, and the layers after it never run on the texts
    after, last = [], len(decoder_layers(model)) - 1

    def entered(module, args, kwargs):
        after.append(len(args[0] if args else kwargs["hidden_states"]))

    decoder_layers(model)[last].register_forward_pre_hook(entered, with_kwargs=True)
    torch.testing.assert_close(mean_activations(model, batches, positions=k, upto=last - 1), means[:, :last])
    assert len(texts) not in after


def _ablation_config(world, model, tmp_path, **ablation):
    from attack.config import load_config
    from attack.toyworld.world import write_jsonl

    dev = tmp_path / "dev.jsonl"
    general = tmp_path / "general.jsonl"
    write_jsonl([d for d in world["docs"] if d["split"] == "dev"], dev)
    write_jsonl([d for d in world["docs"] if d["domain"] == "general"], general)
    return load_config({
        "kind": "ablation",
        "model": {"name": str(model)},
        "eval": {"tasks": ["toy_target_heldout", "toy_general"], "include_path": [str(world["tasks"])]},
        "output": {"dir": str(tmp_path / "runs")},
        "ablation": {"target_path": str(dev), "contrast_path": str(general), "dev_tasks": ["toy_target_dev"],
                     "fit_examples": 16, "kl_examples": 8, "max_length": 64, "kl_bound": 10.0,
                     "doses": [0.0, 0.5, 1.0], **ablation},
        "data": {"path": str(world["attack"]), "seq_len": 64},
        "adapter": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 4, "log_every": 1},
    })


def test_ablation_run_directory(world, naive_dir, tmp_path):
    """Step 0 is the unmodified model, step 1 the edited one saved as an ordinary model; every
    candidate layer is recorded with its dev score and KL; the dose-response ends where step 1 is."""
    import json

    from attack.recipes import run_attack
    from attack.records import read_curve

    cfg = _ablation_config(world, naive_dir, tmp_path)
    path = run_attack(cfg, quiet=True)
    curve = read_curve(path / "curve.jsonl")
    assert sorted({r["step"] for r in curve}) == [0, 1]
    assert all(r["tokens_seen"] == 0 for r in curve)
    candidates = [json.loads(line) for line in (path / "candidates.jsonl").read_text().splitlines()]
    assert [c["layer"] for c in candidates] == [0]  # 2 layers, the last 20% skipped
    assert all(0 <= c["dev_score"] <= 1 and c["kl"] >= 0 for c in candidates)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "done" and summary["ablation"]["layer"] == 0
    dose = [json.loads(line) for line in (path / "dose.jsonl").read_text().splitlines()]
    assert sorted({d["strength"] for d in dose}) == [0.0, 0.5, 1.0]

    def score(rows, task, metric):
        return next(r for r in rows if r["task"] == task and r["metric"] == metric)

    at = {s: [d for d in dose if d["strength"] == s] for s in (0.0, 1.0)}
    step = {s: [r for r in curve if r["step"] == s] for s in (0, 1)}
    for task in ("toy_target_heldout", "toy_general"):
        # dose 0 is the unmodified model, and the hooks at strength 1 give the saved edit. The
        # two paths' logits agree to ~1e-5, not bit for bit, so the mean probability of the right
        # answer agrees to a tolerance, and accuracy to at most one question sitting on a tie.
        for dose_rows, curve_rows in ((at[0.0], step[0]), (at[1.0], step[1])):
            p_dose, p_curve = score(dose_rows, task, "correct_prob"), score(curve_rows, task, "correct_prob")
            assert abs(p_dose["value"] - p_curve["value"]) < 1e-4
            a_dose, a_curve = score(dose_rows, task, "acc"), score(curve_rows, task, "acc")
            assert abs(a_dose["value"] - a_curve["value"]) <= 1 / a_curve["n"] + 1e-9
    # the saved model is the edited one: the direction is gone from its embeddings
    direction = torch.tensor(json.loads((path / "direction.json").read_text())["vector"])
    edited = AutoModelForCausalLM.from_pretrained(str(path / "final"))
    with torch.no_grad():
        assert float((edited.get_input_embeddings().weight @ direction.float()).abs().max()) < 1e-5


@pytest.mark.slow
def test_ablation_then_finetune_continues_from_step_1(world, naive_dir, tmp_path):
    import json

    from attack.recipes import run_attack
    from attack.records import read_curve

    cfg = _ablation_config(world, naive_dir, tmp_path, then_finetune=True)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": 2})})
    path = run_attack(cfg, quiet=True)
    steps = sorted({r["step"] for r in read_curve(path / "curve.jsonl")})
    assert steps == [0, 1, 3, 5]  # unmodified, ablated (= fine-tune step 0), fine-tune steps 2 and 4
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 4 and "ablation" in summary
    assert (path / "ablated" / "config.json").exists() and (path / "final").is_dir()

    # the report reads both kinds side by side, with the ablation's dose-response and direction
    import pandas as pd

    from attack.report import write_report

    alone = run_attack(_ablation_config(world, naive_dir, tmp_path), quiet=True)
    report = write_report([path, alone], tmp_path / "report")
    side = pd.read_csv(report / "attacks_side_by_side.csv")
    assert {"ablation-knowledge-selected", "ablation-knowledge-selected-then-lora-r4-lr0.001"} <= set(side.columns)
    assert set(pd.read_csv(report / "dose_response.csv").strength) == {0.0, 0.5, 1.0}
    assert len(pd.read_csv(report / "ablation_directions.csv")) == 2
    assert "Dose-response" in (report / "index.html").read_text()


def test_ablation_refuses_dev_split_that_overlaps_evaluation(world, naive_dir, tmp_path, capsys):
    from attack.__main__ import main
    from attack.config import dump_yaml, updated

    cfg = _ablation_config(world, naive_dir, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(dump_yaml(updated(cfg, {"ablation.dev_tasks": ["toy_target_heldout"]})))
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shares" in err and "toy_target_heldout" in err, err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    tight = tmp_path / "tight.yaml"
    tight.write_text(dump_yaml(updated(cfg, {"ablation.kl_bound": 1e-12})))
    assert main(["--config", str(tight)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no candidate direction" in err, err
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "candidates.jsonl").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_ablation_then_finetune_under_two_processes(world, naive_dir, tmp_path):
    """accelerate launch with 2 processes (gloo on CPU): the main process chooses and saves the
    direction, both make the same edit and fine-tune it; one curve with every point once, the
    batch split across the processes, the rows of both counted."""
    import subprocess
    import sys

    from attack.config import dump_yaml, updated
    from attack.records import read_curve

    cfg = _ablation_config(world, naive_dir, tmp_path, then_finetune=True)
    cfg = updated(cfg, {"eval.every": 2, "output.run_id": "ddp", "data.cache_dir": str(tmp_path / "corpus")})
    config = tmp_path / "ablate.yaml"
    config.write_text(dump_yaml(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "attack", "--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["processes"] == 2 and "ablation" in summary
    assert summary["micro_batch_size"] == 2  # batch 4 split over 2 processes, not 4 rows each
    assert summary["rows_trained"] == 4 * 4 and summary["steps"] == 4
    keys = [(r["step"], r["task"], r["metric"]) for r in read_curve(run / "curve.jsonl")]
    assert len(keys) == len(set(keys))  # every point once
    assert sorted({k[0] for k in keys}) == [0, 1, 3, 5]
    assert len(list((run / "samples").glob("step-*.jsonl.gz"))) == 4
    # Both processes made the same edit and trained in step: the two-process attack's weights are
    # the one-process attack's (DDP averages the two halves' gradients of each batch of 4 rows).
    from attack.recipes import run_attack

    single = run_attack(updated(cfg, {"output.run_id": "single"}), quiet=True)
    assert json.loads((single / "summary.json").read_text())["ablation"]["layer"] == summary["ablation"]["layer"]
    mine, theirs = (_adapter_weights(path / "final") for path in (run, single))
    assert mine.keys() == theirs.keys() and mine
    for name in mine:  # relative: a few near-zero gradients may round apart on another CPU, a rank out of step cannot
        gap = float((mine[name] - theirs[name]).norm() / theirs[name].norm().clamp_min(1e-12))
        assert gap < 1e-3, (name, gap)


def _adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_last_token_logits_equal_the_full_forward(arch, llama_dir, neox_dir, world):
    """The candidates' refusal score and KL read the head at each text's last token only (rows
    moved to the right end): the same logits as the full right-padded forward."""
    from attack.directions import last_token_logits

    model = AutoModelForCausalLM.from_pretrained(llama_dir if arch == "llama" else neox_dir).eval()
    texts = [d["text"] for d in world["docs"][:5]]
    texts[1] = texts[1][:12]  # rows of different lengths: padding to move
    batch = text_batches(world["tokenizer"], texts, 64)[0]
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]
    with torch.no_grad():
        full = model(**batch).logits[torch.arange(len(texts)), batch["attention_mask"].sum(1) - 1]
    assert torch.allclose(last_token_logits(model, batch), full, atol=1e-4)


def test_refusal_candidates_at_chosen_positions(llama_dir, world):
    """ablation.positions keeps the candidates at those post-instruction positions (counted back
    from the prompt's last token), the same directions as in the full set; one outside the
    tokens after the instruction is a user error."""
    from types import SimpleNamespace

    from attack.config.ablation import AblationSection
    from attack.errors import UserError
    from attack.recipes.ablation import _candidates, _prompts

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    tokenizer = world["tokenizer"]
    prompts = _prompts(tokenizer, "refusal")
    assert prompts["post"] >= 2
    target, contrast = ["Tell me where Zorbl lives.", "Name the marsh."], ["Boats sail.", "Say hello to the sea."]

    def candidates(**more):
        layers = list(range(len(decoder_layers(model))))
        cfg = SimpleNamespace(ablation=AblationSection(mode="refusal", max_length=32, layers=layers, **more))
        return _candidates(cfg, model, None, tokenizer, prompts, target, contrast)

    every = candidates()
    assert sorted({c["position"] for c in every}) == list(range(-prompts["post"], 0))
    last = candidates(positions=[-1])
    assert [c["position"] for c in last] == [-1] * (len(every) // prompts["post"])
    # -1 is each prompt's last token: the difference of the means read there alone
    from attack.recipes.ablation import _batches

    at_last = [mean_activations(model, _batches(tokenizer, texts, prompts, 32, "refusal"), positions=1)[0]
               for texts in (target, contrast)]
    for c in last:
        same = next(e for e in every if (e["layer"], e["position"]) == (c["layer"], -1))
        torch.testing.assert_close(c["direction"], same["direction"])
        expected = at_last[0][c["layer"]] - at_last[1][c["layer"]]
        if c["layer"] > 0:  # entering layer 0, the last token (the same template token) has one embedding
            torch.testing.assert_close(c["direction"], expected / expected.norm())
    assert max(c["layer"] for c in last) > 0
    with pytest.raises(UserError, match="ablation.positions"):
        candidates(positions=[-prompts["post"] - 1])
    with pytest.raises(UserError, match="ablation.max_length"):  # texts cut to their template's end alone
        _candidates(SimpleNamespace(ablation=AblationSection(mode="refusal", max_length=prompts["post"])), model, None,
                    tokenizer, prompts, target, contrast)
