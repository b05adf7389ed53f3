"""Shared fixtures: a tiny toy world (tokenizer, tasks, attack corpus) and tiny random-init
GPT-NeoX and Llama models, all built locally. No network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One torch thread per process (subprocesses inherit it): the test models are too small to gain
# from a second thread, and on a shared 2-core machine extra threads only oversubscribe it.
os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from attack.config import load_config  # noqa: E402
from attack.toyworld.models import ModelSpec, build_model, pretrain, train_tokenizer  # noqa: E402
from attack.toyworld.world import WorldSpec, generate, write_jsonl, write_tasks  # noqa: E402

torch.set_num_threads(1)


class CrashAt(TrainerCallback):
    """Simulates a job killed mid-run: Ctrl-C at the end of optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def adapter_weights(run: Path) -> dict:
    """The LoRA adapter a run saved in final/, as tensors."""
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))

TINY = ModelSpec(hidden=64, layers=2, heads=2, intermediate=128, max_positions=256)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Facts, tasks and attack corpus of a small toy world, plus its tokenizer."""
    root = tmp_path_factory.mktemp("world")
    w = generate(WorldSpec(target_entities=8, general_entities=8, docs_per_entity=3))
    write_tasks(w["facts"], root / "tasks")
    attack_docs = [d for d in w["docs"] if d["domain"] == "target" and d["split"] == "seen"]
    write_jsonl(attack_docs, root / "attack.jsonl")
    tokenizer = train_tokenizer([d["text"] for d in w["docs"]], root / "tokenizer", vocab_size=512)
    return dict(root=root, tasks=root / "tasks", attack=root / "attack.jsonl", tokenizer=tokenizer,
                facts=w["facts"], docs=w["docs"])


def _save_model(world, arch: str, path: Path) -> Path:
    model = build_model(ModelSpec(**{**TINY.__dict__, "arch": arch}), world["tokenizer"], seed=0)
    model.save_pretrained(str(path))
    world["tokenizer"].save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def llama_dir(world, tmp_path_factory):
    return _save_model(world, "llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def neox_dir(world, tmp_path_factory):
    return _save_model(world, "gpt_neox", tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="session")
def naive_dir(world, tmp_path_factory):
    """A tiny Llama pretrained (3 s) on every document except those of the attack-seen facts:
    it knows the domain's words and phrasings, but not the facts the attack will teach."""
    path = tmp_path_factory.mktemp("naive")
    model = build_model(TINY, world["tokenizer"], seed=0)
    kept = [d for d in world["docs"] if d["split"] != "seen"]
    pretrain(model, world["tokenizer"], [d["text"] for d in kept], 200, lr=3e-3, seq_len=64, log=lambda _: None)
    model.save_pretrained(str(path))
    world["tokenizer"].save_pretrained(str(path))
    return path


@pytest.fixture
def make_config(world, llama_dir, tmp_path):
    """A small, fast attack config of `kind` (the sections that kind has; grpo with its reward);
    keyword sections override it, e.g. train={"lr": 1e-3}."""

    def make(model=None, kind="finetune", **sections):
        base = {
            "kind": kind,
            "model": {"name": str(model or llama_dir)},
            "adapter": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "data": {"path": str(world["attack"]), "seq_len": 64},
            "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 6, "log_every": 1},
            "eval": {"tasks": ["toy_target_seen", "toy_general"], "include_path": [str(world["tasks"])], "every": 3},
            "output": {"dir": str(tmp_path / "runs")},
        }
        if kind == "grpo":  # a reward on the attack-seen facts, 4 completions per prompt
            from attack.toyworld.world import reward_prompts

            prompts = tmp_path / "reward.jsonl"
            if not prompts.exists():
                write_jsonl(reward_prompts(world["facts"]), prompts)
            del base["data"]
            # a reward of the test's own module is code from a file: granted as --trust-remote-code grants it
            base["model"]["trust_remote_code"] = True
            base.update(grpo={"prompts_path": str(prompts), "reward": "test_grpo:vowels", "num_generations": 4,
                              "max_completion_length": 6},
                        adapter={"rank": 4, "alpha": 8, "dropout": 0.1},
                        train={"lr": 1e-2, "batch_size": 8, "max_steps": 6, "log_every": 1})
            base["eval"]["every"] = 2
        from attack.config import KINDS

        base = {k: v for k, v in base.items() if k in KINDS[kind].model_fields}  # the sections this kind has
        for section, values in sections.items():
            base[section] = {**base.get(section, {}), **values}
        return load_config(base)

    return make
