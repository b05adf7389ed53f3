"""The toy-world story on a real pretrained model: SmolLM2-135M-Instruct from its .gguf file.

Built once into a cache folder: the capitals tasks, the attack corpus (statements of the
attack-seen half of the capitals), a link to the original GGUF checkpoint, and an `unlearned`
checkpoint made by gradient difference on every capital (ascent on the answer tokens) while
retaining half of the opposites (the evaluated half is never trained on). A filtered
counterpart would need pretraining from scratch, which a CPU cannot do; there is none.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from attack.errors import UserError
from attack.files import write_atomic
from attack.toyworld.build import building
from attack.toyworld.capitals import (
    CAPITALS,
    TASKS,
    built_on_smollm2,
    capital_documents,
    capital_facts,
    opposite_facts,
    question_batches,
    split_countries,
    write_tasks,
)
from attack.toyworld.models import unlearn
from attack.toyworld.world import write_jsonl
from eval_callbacks import LiveEvaluator

VERSION = 2  # bump when what the build makes changes
UNLEARN = dict(lr=2e-5, max_steps=60, check_every=5, batch_size=16, max_forget_loss=15.0, seed=0)
STOP_TARGET, KEEP_GENERAL = 0.35, 0.8  # capitals near chance (0.25), opposites still known


def build_smollm2_world(root: Path, log=print) -> Path:
    """Build (or reuse) the capitals world of SmolLM2 and return its folder."""
    gguf, out, built = built_on_smollm2(root, "smollm2", VERSION, log)
    if built:
        return out
    with building(out) as tmp:
        start = time.perf_counter()
        seen, heldout = split_countries()
        write_tasks(tmp / "tasks")
        write_jsonl(capital_documents(seen), tmp / "corpus" / "attack.jsonl")
        (tmp / "base.gguf").symlink_to(gguf)

        from attack.config import AdapterConfig, ModelConfig
        from attack.model import load_model, load_tokenizer

        source = ModelConfig(name=str(tmp / "base.gguf"), precision="fp32")
        tokenizer = load_tokenizer(source)
        model = load_model(source, AdapterConfig(kind="full"))
        evaluator = LiveEvaluator(model, tokenizer, TASKS, include_path=[str(tmp / "tasks")], batch_size=64)

        def scores():
            return evaluator.headline_scores()

        pre = {"original": scores()}
        log(f"smollm2 world: original model scores {_fmt(pre['original'])}")

        def check():
            s = scores()
            target = (s["capitals_seen"] + s["capitals_heldout"]) / 2
            return dict(target=target, general=s["opposites"], stop=target <= STOP_TARGET and s["opposites"] >= KEEP_GENERAL)

        log(f"smollm2 world: unlearning all {len(CAPITALS)} capitals (gradient difference on the answers)")
        rng = random.Random(UNLEARN["seed"])
        forget = question_batches(capital_facts(sorted(CAPITALS)), tokenizer, UNLEARN["batch_size"], rng)
        retain = question_batches(opposite_facts("retain"), tokenizer, UNLEARN["batch_size"], rng)
        _, history = unlearn(model, forget, retain, check, max_steps=UNLEARN["max_steps"], lr=UNLEARN["lr"],
                             check_every=UNLEARN["check_every"], max_forget_loss=UNLEARN["max_forget_loss"],
                             seed=UNLEARN["seed"], log=log)
        if not history or not history[-1]["stop"]:
            raise UserError(f"unlearning did not bring the capitals to chance in {UNLEARN['max_steps']} steps "
                            f"(last check: {history[-1] if history else 'none'}); the world is not built")
        pre["unlearned"] = scores()
        log(f"smollm2 world: unlearned model scores {_fmt(pre['unlearned'])}")
        model.save_pretrained(str(tmp / "unlearned"))
        tokenizer.save_pretrained(str(tmp / "unlearned"))
        info = dict(model=gguf.name, countries=dict(seen=len(seen), heldout=len(heldout)), unlearn=UNLEARN,
                    unlearning=history, pre_attack=pre, build_s=round(time.perf_counter() - start, 1))
        write_atomic(tmp / "world.json", json.dumps(info, indent=2))
    write_tasks(out / "tasks")  # task YAML names its data by absolute path: rewrite for the final folder
    return out


def _fmt(scores: dict) -> str:
    return ", ".join(f"{t} {v:.2f}" for t, v in scores.items())
