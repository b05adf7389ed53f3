"""The fast path computes the same thing as the plain one; multi-process runs write once."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from attack.__main__ import main
from attack.packing import pack_documents
from attack.records import read_curve

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _packed_and_plain_loss(model, tok, docs, seq_len, device="cpu", amp=None):
    """Mean token loss of documents packed into one row with per-document positions,
    and of the same documents run one by one (the plain path), over the same targets."""
    packed = pack_documents(docs, tok, seq_len)
    batch = {k: v[:1].to(device) for k, v in packed.items()}
    with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
        fast = model(**batch).loss.float()
        # plain: each segment of the row alone, summing token losses over the same targets
        pos, ids, labels = batch["position_ids"][0], batch["input_ids"][0], batch["labels"][0]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        total, count = 0.0, 0
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            logits = model(input_ids=ids[a:b][None]).logits[0].float()
            target = labels[a:b][1:]
            mask = target != -100
            total += F.cross_entropy(logits[:-1][mask], target[mask], reduction="sum")
            count += int(mask.sum())
    return fast, total / count


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_packed_loss_equals_per_document_loss(arch, world, llama_dir, neox_dir):
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir if arch == "llama" else neox_dir))
    model.config.use_cache = False
    docs = [d["text"] for d in world["docs"][:12]]
    fast, plain = _packed_and_plain_loss(model, world["tokenizer"], docs, 64)
    assert torch.allclose(fast, plain, rtol=1e-5), (fast, plain)  # fp32: equal to rounding


@gpu
def test_packed_loss_bf16_on_gpu(world, llama_dir):
    """bf16 autocast + document mask on GPU vs the fp32 plain path: within 1e-2 relative."""
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).cuda()
    model.config.use_cache = False
    docs = [d["text"] for d in world["docs"][:12]]
    fast, _ = _packed_and_plain_loss(model, world["tokenizer"], docs, 64, "cuda", torch.bfloat16)
    _, plain = _packed_and_plain_loss(model, world["tokenizer"], docs, 64, "cuda", None)
    assert abs(fast.item() - plain.item()) / plain.item() < 1e-2


def test_4bit_needs_a_gpu(capsys, world, llama_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--model", str(llama_dir), "--data", str(world["attack"]), "--eval-tasks", "toy_target_seen",
            "--eval-include", str(world["tasks"]), "--load-in-4bit", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_data_parallel_two_processes_write_once(world, llama_dir, tmp_path):
    """accelerate launch with 2 processes (gloo on CPU): one curve, every point once, global token count."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "attack", "--model", str(llama_dir), "--data", str(world["attack"]),
           "--eval-tasks", "toy_target_seen", "--eval-include", str(world["tasks"]), "--eval-every", "2",
           "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--output", str(tmp_path), "--run-id", "ddp",
           "--data-cache", str(tmp_path / "corpus")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the main process prepared the corpus; the other waited and mapped it
    assert proc.stdout.count("prepared ") == 1, proc.stdout
    assert len([p for p in (tmp_path / "corpus").iterdir() if p.is_dir()]) == 1
    run = tmp_path / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rows_trained"] == 16  # 4 steps x 4 rows, both processes' rows counted
    assert summary["distinct_rows_trained"] == min(16, summary["train_rows"])
    assert summary["status"] == "done" and summary["processes"] == 2 and summary["micro_batch_size"] == 2
    assert summary["tokens_seen"] == 4 * 4 * 32
    keys = [(r["step"], r["task"], r["metric"]) for r in read_curve(run / "curve.jsonl")]
    assert len(keys) == len(set(keys)) == 3 * 3  # steps 0, 2, 4 x acc, acc_norm, correct_prob


def test_micro_batch_choice_fills_memory_and_checkpoints_only_when_needed():
    from attack.speed import choose_micro_batch

    # memory for 3 rows without checkpointing: the largest divisor of 16 that fits is 2
    assert choose_micro_batch(16, lambda rows, ckpt: rows <= (12 if ckpt else 3), None) == (2, False)
    # not even one row without checkpointing: turn it on, then fill memory again
    assert choose_micro_batch(16, lambda rows, ckpt: ckpt and rows <= 8, None) == (8, True)
    # an explicit choice is respected
    assert choose_micro_batch(16, lambda rows, ckpt: rows <= (12 if ckpt else 3), True) == (8, True)
    assert choose_micro_batch(12, lambda rows, ckpt: True, None) == (12, False)


def test_a_kernel_patch_ends_with_the_attack(make_config, llama_dir):
    """What Liger does when the Trainer applies it (the architecture's modeling module: a
    function, a class, a class method, a new name) lasts while the attack trains and is undone
    after it: a Llama built later in the process runs stock transformers."""
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.models.llama import modeling_llama

    from attack.recipes import run_attack

    rope, norm, forward = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaForCausalLM.forward
    calls = []

    class PatchLikeLiger(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            def patched_forward(self, *a, **k):
                calls.append(1)
                return forward(self, *a, **k)

            modeling_llama.apply_rotary_pos_emb = lambda *a, **k: rope(*a, **k)
            modeling_llama.LlamaRMSNorm = type("FusedNorm", (norm,), {})
            modeling_llama.LlamaForCausalLM.forward = patched_forward
            modeling_llama.fused_loss = object()

    run_attack(make_config(train={"max_steps": 2}), extra_callbacks=[PatchLikeLiger()], quiet=True)
    assert calls, "the patch was not in force while the attack trained"
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm
    assert modeling_llama.LlamaForCausalLM.forward is forward and not hasattr(modeling_llama, "fused_loss")
    later = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    assert type(later.model.norm) is norm


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_steps_at_toy_size(tmp_path):
    """bench/gpu_check.sh --model tiny: every step runs and leaves its JSON lines and log. Its
    steps are the two benchmarks at tiny settings, so their output is checked here too (one run):
    bench/attack_speed.py prints a line per recipe (the attack and full fine-tuning through
    run_attack with a model object, the baseline recipe) and bench/eval_speed.py the fast path
    against stock lm-eval."""
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path), "--model", "tiny"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]  # JSON lines only
    steps = {r["step"]: r for r in lines if "rc" in r}
    assert set(steps) == {"tiny-attack", "eval-tiny", "tests"} and all(r["rc"] == 0 for r in steps.values())
    assert lines[-1] == {"step": "all", "failed": 0, "s": lines[-1]["s"]}
    assert all((tmp_path / f"{name}.log").exists() for name in steps)

    recipes = [r for r in lines if "recipe" in r]
    assert [r["recipe"] for r in recipes] == ["attack", "baseline", "full"]
    for r in recipes:
        assert {"recipe", "model", "device", "tokens_per_s", "mfu", "peak_mem_gb", "eval_s", "eval_share",
                "micro_batch", "checkpointing"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["eval_s"] > 0 and 0 < r["eval_share"] < 1
    assert recipes[1]["checkpointing"] and recipes[1]["micro_batch"] == 1  # the Deep Ignorance recipe's settings

    fast, stock = [r for r in lines if "path" in r]
    assert (fast["path"], stock["path"]) == ("fast", "stock")
    assert fast["max_score_diff"] < 1e-6 and fast["speedup"] > 0 and stock["eval_s"] > 0
