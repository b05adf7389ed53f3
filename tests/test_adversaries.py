"""The adversary suite's knobs: the optimizer, which weights move, a perturbation before the
attack, data mixtures, and the quantization kind."""

import json

import pytest
import torch

from attack.checkpoints import OPTIMIZER_RECORD
from attack.recipes import run_attack
from attack.records import read_curve

# The state each optimizer keeps per parameter: what tells its optimizer.pt apart from another's
STATE = {"adamw": "exp_avg", "adam": "exp_avg", "sgd": "momentum_buffer", "sgd_nesterov": "momentum_buffer",
         "adagrad": "sum", "adadelta": "acc_delta", "schedule_free_adamw": "z", "muon": "momentum_buffer"}
CLASS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "sgd_nesterov": "SGD", "adagrad": "Adagrad",
         "adadelta": "Adadelta", "schedule_free_adamw": "AdamWScheduleFree", "muon": "MuonWithAdamW"}


def _checkpoint(run):
    [ckpt] = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1:]
    return ckpt


def _state_keys(state_dict) -> set[str]:
    if "state" not in state_dict:  # Muon with AdamW: one state per inner optimizer
        return set().union(*(_state_keys(s) for s in state_dict.values()))
    return {k for s in state_dict["state"].values() for k in s}


@pytest.mark.parametrize("name", list(STATE))
def test_each_optimizer_trains_and_its_state_is_in_the_checkpoint(make_config, name):
    cfg = make_config(train={"optimizer": name, "max_steps": 2, "lr": 1e-2}, eval={"every": 2},
                      output={"run_id": name})
    run = run_attack(cfg, quiet=True)
    ckpt = _checkpoint(run)
    record = json.loads((ckpt / OPTIMIZER_RECORD).read_text())
    assert record["optimizer"] == name and record["class"].endswith(CLASS[name]), record
    assert STATE[name] in _state_keys(torch.load(ckpt / "optimizer.pt", weights_only=False))
    if name == "sgd_nesterov":
        assert record["defaults"]["nesterov"] is True and record["defaults"]["momentum"] == 0.9
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer"]["name"] == name and summary["status"] == "done"
    assert "optimizer: " + name in (run / "config.yaml").read_text()
    assert {r["step"] for r in read_curve(run / "curve.jsonl")} == {0, 2}


def test_an_unknown_optimizer_is_refused(make_config):
    from attack.errors import UserError

    with pytest.raises(UserError, match="train.optimizer"):
        make_config(train={"optimizer": "lion"})


def _final_full(run):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(str(run / "final")).named_parameters())


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_layer_subset_leaves_every_other_layer_bit_identical(make_config, llama_dir, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from attack.model import layer_of

    cfg = make_config(adapter={"kind": kind, "layers": [1]}, train={"max_steps": 2, "lr": 1e-2}, eval={"every": 2},
                      output={"run_id": f"layers-{kind}"})
    run = run_attack(cfg, quiet=True)
    base = dict(AutoModelForCausalLM.from_pretrained(str(llama_dir)).named_parameters())
    if kind == "full":
        after = _final_full(run)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_dir)), str(run / "final"))
        adapted = {layer_of(n) for n, _ in model.named_parameters() if "lora_" in n}
        assert adapted == {1}
        after = dict(model.merge_and_unload().named_parameters())
    changed = {layer_of(n) for n, p in base.items() if not torch.equal(p, after[n])}
    assert changed == {1}  # layer 1 moved; embeddings, head and every other layer did not


def test_full_fine_tuning_of_chosen_modules_only(make_config, llama_dir):
    from transformers import AutoModelForCausalLM

    cfg = make_config(adapter={"kind": "full", "target_modules": ["down_proj"]}, train={"max_steps": 2, "lr": 1e-2},
                      eval={"every": 2}, output={"run_id": "modules"})
    after = _final_full(run_attack(cfg, quiet=True))
    base = dict(AutoModelForCausalLM.from_pretrained(str(llama_dir)).named_parameters())
    changed = {n.rsplit(".", 2)[-2] for n, p in base.items() if not torch.equal(p, after[n])}
    assert changed == {"down_proj"}


def test_layers_the_model_lacks_are_refused(make_config):
    from attack.errors import UserError

    with pytest.raises(UserError, match="adapter.layers"):
        run_attack(make_config(adapter={"layers": [99]}), quiet=True)


@pytest.mark.slow
def test_the_simulated_quantization_equals_bitsandbytes_where_both_run():
    bnb = pytest.importorskip("bitsandbytes.functional")
    from attack.quantization import NF4, int8_round_trip, nf4_round_trip

    assert torch.equal(torch.tensor(NF4), bnb.get_4bit_type("nf4", device="cpu"))
    torch.manual_seed(0)
    for shape in [(64, 128), (33, 70), (5, 3)]:  # whole blocks, a short last block, one short block
        w = torch.randn(shape) * 0.02
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(nf4_round_trip(w), bnb.dequantize_4bit(packed, state))
        q, stats, _ = bnb.int8_vectorwise_quant(w.clone())
        assert torch.equal(int8_round_trip(w), bnb.int8_vectorwise_dequant(q, stats))


def test_nf4_and_int8_by_hand():
    """Round to nearest, by hand: one block of NF4 and one row of int8."""
    from attack.quantization import NF4, int8_round_trip, nf4_round_trip

    w = torch.tensor([[0.5, -0.2, 0.05, 0.0, -1.0, 0.3, 0.7, -0.6]])
    absmax = 1.0
    expected = torch.tensor([[min(NF4, key=lambda c: abs(c - x / absmax)) * absmax for x in w[0].tolist()]])
    assert torch.equal(nf4_round_trip(w), expected)
    row = torch.tensor([[0.5, -0.25, 0.1, 0.0]])
    assert torch.allclose(int8_round_trip(row), torch.round(row * 127 / 0.5) * 0.5 / 127, atol=1e-7)


@pytest.mark.parametrize("method", ["nf4", "int8", "bf16"])
def test_the_quantize_kind_scores_the_model_before_and_after(make_config, world, llama_dir, method):
    from attack.config import load_config
    from attack.quantization import quantized_linears

    cfg = load_config({"kind": "quantize", "quantize": {"method": method}, "model": {"name": str(llama_dir)},
                       "eval": {"tasks": ["toy_target_seen"], "include_path": [str(world["tasks"])]},
                       "output": {"dir": str(make_config().output.dir), "run_id": f"q-{method}"}})
    assert cfg.curve_steps() == [0, 1] and cfg.label() == f"quantize-{method}"
    run = run_attack(cfg, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    done = summary["quantize"]
    assert summary["status"] == "done" and done["method"] == method and 0 < done["relative_change"] < 0.5
    assert {r["step"] for r in read_curve(run / "curve.jsonl")} == {0, 1}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    saved = dict(AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype="auto").named_parameters())
    if method == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in saved.values())
        return
    layers = quantized_linears(base)
    assert done["weights"] == len(layers)  # every linear weight but the head
    for name, module in layers:
        w = module.weight.detach()
        assert torch.equal(saved[name + ".weight"], _by_hand(w, method)), name
    head = base.get_output_embeddings().weight
    assert torch.equal(saved["lm_head.weight"], head.detach())  # the head stays as it was


def test_the_evaluate_kind_scores_the_model_once_as_an_attack_scores_its_step_0(make_config, world, llama_dir):
    from attack.config import load_config

    def config(kind: str, **more):
        return load_config({"kind": kind, **more, "model": {"name": str(llama_dir)},
                            "eval": {"tasks": ["toy_target_seen", "toy_general"], "include_path": [str(world["tasks"])]},
                            "output": {"dir": str(make_config().output.dir), "run_id": kind}})

    cfg = config("evaluate")
    assert cfg.curve_steps() == [0] and cfg.training_steps() == 0 and not cfg.attacks
    run = run_attack(cfg, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["eval_steps"] == [0] and not (run / "final").exists()
    scored = {(r["task"], r["metric"]): r["value"] for r in read_curve(run / "curve.jsonl")}
    assert {r["step"] for r in read_curve(run / "curve.jsonl")} == {0} and len(scored) >= 2
    other = run_attack(config("quantize", quantize={"method": "int8", "save_weights": False}), quiet=True)
    before = {(r["task"], r["metric"]): r["value"] for r in read_curve(other / "curve.jsonl") if r["step"] == 0}
    assert before.keys() == scored.keys()
    assert all(abs(before[k] - v) < 1e-6 for k, v in scored.items())


def _by_hand(w: torch.Tensor, method: str) -> torch.Tensor:
    """Round to nearest, written out: NF4 per block of 64 consecutive weights, int8 per row."""
    from attack.quantization import NF4

    if method == "int8":
        scale = w.abs().max(dim=1, keepdim=True).values
        return torch.round(w * (127.0 / scale)).to(torch.int8) * scale * (1 / 127)
    flat, out = w.reshape(-1), torch.empty(w.numel())
    levels = torch.tensor(NF4)
    for start in range(0, flat.numel(), 64):
        block = flat[start:start + 64]
        scale = block.abs().max()
        nearest = (block[:, None] * (1.0 / scale) - levels[None, :]).abs().argmin(dim=1)
        out[start:start + 64] = levels[nearest] * scale
    return out.reshape(w.shape)


def test_shrink_and_perturb_is_curve_step_1_and_the_fine_tune_counts_on(make_config):
    cfg = make_config(perturb={"shrink": 0.5, "noise": 0.5}, train={"max_steps": 2}, eval={"every": 2},
                      output={"run_id": "perturbed"})
    assert cfg.curve_steps() == [0, 1, 3] and "shrink0.5" in cfg.label()
    run = run_attack(cfg, quiet=True)
    rows = read_curve(run / "curve.jsonl")
    assert sorted({r["step"] for r in rows}) == [0, 1, 3]
    at = {(r["step"], r["task"], r["metric"]): r["value"] for r in rows}
    # halving every weight and adding noise of half their spread changes what the model says
    assert abs(at[(1, "toy_general", "correct_prob")] - at[(0, "toy_general", "correct_prob")]) > 1e-3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["perturb"]["shrink"] == 0.5 and summary["perturb"]["relative_change"] > 0.3
    assert summary["status"] == "done"
    plain = make_config(perturb={"shrink": 1.0, "noise": 0.0})
    assert plain.curve_steps()[:2] == [0, 3] and plain.training_offset == 0


def test_the_same_seed_perturbs_the_same_way(llama_dir):
    from transformers import AutoModelForCausalLM

    from attack.model import shrink_perturb

    a, b = (AutoModelForCausalLM.from_pretrained(str(llama_dir)) for _ in range(2))
    base = dict(AutoModelForCausalLM.from_pretrained(str(llama_dir)).named_parameters())
    ra, rb = shrink_perturb(a, 0.8, 0.1, seed=3), shrink_perturb(b, 0.8, 0.1, seed=3)
    assert ra == rb and all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters())
    w = dict(a.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    w0 = base["model.layers.0.mlp.down_proj.weight"]
    residual = (w - 0.8 * w0).detach() / w0.std()  # the noise, in units of the weight's spread
    assert abs(float(residual.std()) - 0.1) < 0.01 and abs(float(residual.mean())) < 0.01


def _corpora(world, tmp_path):
    from attack.toyworld.world import write_jsonl

    general = [d for d in world["docs"] if d["domain"] == "general"]
    write_jsonl(general[::2], tmp_path / "retain_a.jsonl")
    write_jsonl(general[1::2], tmp_path / "retain_b.jsonl")
    return str(tmp_path / "retain_a.jsonl"), str(tmp_path / "retain_b.jsonl")


def test_a_three_source_mixture_trains_each_source_at_its_token_share(make_config, world, tmp_path):
    a, b = _corpora(world, tmp_path)
    cfg = make_config(data={"mix": [{"path": a, "share": 0.3}, {"path": b, "share": 0.2}]},
                      train={"max_steps": 25, "batch_size": 4}, eval={"every": 25}, output={"run_id": "mix"})
    run = run_attack(cfg, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    tokens = summary["tokens_by_source"]
    total = sum(tokens.values())
    assert total == 25 * 4 * 64 == summary["tokens_seen"]
    for path, share in ((a, 0.3), (b, 0.2), (str(world["attack"]), 0.5)):
        assert abs(tokens[path] / total - share) <= 0.01, (path, tokens)
    assert 0 < summary["distinct_rows_trained"] <= summary["rows_trained"] * 0.5 + 1  # attack rows only
    import numpy as np

    read = np.load(_checkpoint(run) / "rows_trained.npy")
    assert list(read) == list(range(100))  # the plan is read in its order: it is the data order


def test_mixture_plans_interleave_or_run_in_phases(world, tmp_path):
    from attack.data import MixedRows

    class Rows:  # a packed corpus of n rows, as MixedRows reads it
        def __init__(self, n):
            self.n, self.meta, self.folder = n, {"seq_len": 8, "documents": n}, tmp_path

        def __len__(self):
            return self.n

    attack, retain = Rows(10), Rows(7)
    mixed = MixedRows(attack, [("retain", retain, 0.25)], "attack", total_rows=40, order="interleaved", seed=0)
    assert all(list(mixed.source[i:i + 4]).count(0) == 1 for i in range(0, 40, 4))  # every step of 4: one retain row
    phases = MixedRows(attack, [("retain", retain, 0.25)], "attack", total_rows=40, order="phases", seed=0)
    assert list(phases.source) == [0] * 10 + [1] * 30  # retain first, then the attack corpus
    rows = phases.row[phases.source == 0]
    assert sorted(rows[:7]) == list(range(7)) and set(rows) <= set(range(7))  # each pass a permutation
    assert phases.tokens_by_source(range(40)) == {"retain": 80, "attack": 240}


def test_mixture_shares_must_leave_the_attack_corpus_a_share(make_config, world, tmp_path):
    from attack.errors import UserError

    a, b = _corpora(world, tmp_path)
    with pytest.raises(UserError, match="data.mix"):
        make_config(data={"mix": [{"path": a, "share": 0.6}, {"path": b, "share": 0.4}]})
