"""Build the toy world once: corpus, filter, tokenizer, the three models, tasks, and their
pre-attack scores. Cached under a folder named by the hash of its settings, so a second
build with the same settings is a no-op and any change rebuilds."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attack.errors import UserError
from attack.files import write_atomic
from attack.signals import worker_pool
from attack.toyworld.models import ModelSpec, answer_batches, build_model, packed_batches, pretrain, rmu, train_tokenizer, unlearn
from attack.toyworld.world import (
    CLOZE_PROMPTS,
    TASKS,
    WorldSpec,
    _question,
    blocklist_filter,
    generate,
    reward_prompts,
    write_jsonl,
    write_tasks,
)
from eval_callbacks import LiveEvaluator

VERSION = 4  # bump when the code that builds the world changes what it builds


@dataclass(frozen=True)
class BuildSpec:
    world: WorldSpec = field(default_factory=WorldSpec)
    # 3 layers: the fewest that learn the domain in 600 steps and leave RMU (layer 1, MLPs 0-1)
    # a layer above it to keep the knowledge in (measured: 2 layers fail RMU's general bound,
    # a 4th took the build 225 s against 140 to 165 s)
    model: ModelSpec = field(default_factory=lambda: ModelSpec(layers=3))
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    unlearn_max_steps: int = 300
    unlearn_lr: float = 3e-4
    rmu_layer: int = 1
    """The layer whose output RMU steers (counting from 0)."""
    rmu_steer: float = 8.0
    """Norm of RMU's steering vector, in units of that layer's mean output norm on general text."""
    rmu_lr: float = 1e-3
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    check: bool = True
    """Refuse a world whose models fail `world_problems` (off only for smoke-test worlds too
    small to learn the domain)."""

    def __post_init__(self):
        if not 0 <= self.rmu_layer < self.model.layers:
            raise ValueError(f"rmu_layer {self.rmu_layer} is not a layer of a {self.model.layers}-layer model")

    def key(self) -> str:
        blob = json.dumps(dict(version=VERSION, **dataclasses.asdict(self)), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def quick_spec() -> BuildSpec:
    """A world small enough to build in well under a minute (`demo --quick`): it checks that
    everything runs, not what the full world shows."""
    return BuildSpec(world=WorldSpec(target_entities=16, general_entities=16, docs_per_entity=3),
                     model=ModelSpec(hidden=64, layers=2, heads=2, intermediate=128, max_positions=256),
                     pretrain_steps=200, unlearn_max_steps=30, batch_size=8, seq_len=64, check=False)


def world_dir(root: Path, spec: BuildSpec) -> Path:
    return Path(root) / f"world-{spec.key()}"


def _evaluator(model, tokenizer, tasks_dir: Path) -> LiveEvaluator:
    return LiveEvaluator(model, tokenizer, TASKS, include_path=[str(tasks_dir)], batch_size=64)


def _accuracy(evaluator: LiveEvaluator) -> dict:
    return {r["task"]: r["value"] for r in evaluator.evaluate() if r["metric"] == "acc"}


@contextlib.contextmanager
def building(out: Path):
    """A fresh temporary folder to build a world in, moved to `out` (replacing an older build)
    when the block completes. A build that fails or is killed leaves only the temporary folder,
    which the next build clears: a world folder with world.json is always complete."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


class WorldBuildError(UserError):
    """A built toy world failed its own checks."""


def world_problems(scores: dict, spec: BuildSpec) -> list[str]:
    """The properties a toy world must have on every machine (the README states them): the
    unfiltered model knows the target domain, the filtered and unlearned ones are near chance on
    it, and all keep the general domain. Empty when they hold."""
    chance = 0.25
    out = []
    for name, s in scores.items():
        seen, heldout, cloze, general = (s[t] for t in TASKS)
        if general < 0.8:
            out.append(f"{name} general accuracy {general:.2f} < 0.80")
        if name == "unfiltered" and min(seen, heldout) < 0.8:
            out.append(f"unfiltered target accuracy {min(seen, heldout):.2f} < 0.80")
        if name == "filtered" and spec.world.leak_fraction == 0 and max(seen, heldout) > chance + 0.15:
            out.append(f"filtered target accuracy {max(seen, heldout):.2f} > {chance + 0.15:.2f}")
        if name in ("unlearned", "rmu") and ((seen + heldout) / 2 > 0.30 or cloze > 0.2):
            out.append(f"unlearned target accuracy {(seen + heldout) / 2:.2f} (cloze {cloze:.2f}) not near chance")
    return out


def build_world(root: Path, spec: BuildSpec = BuildSpec(), log=print, parallel: bool | None = None) -> Path:
    """Build (or reuse) the world and return its folder. One torch thread, whatever the
    machine's setting: results on CPU depend on the thread count, and these models are too
    small to gain from more."""
    out = world_dir(root, spec)
    if (out / "world.json").exists():
        log(f"toy world: reusing {out}")
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(out, spec, log, parallel)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, spec: BuildSpec, log, parallel: bool | None) -> Path:
    with building(out) as tmp:
        start = time.perf_counter()

        # 1. Facts, documents, filter, attack corpus, tasks.
        world = generate(spec.world)
        docs = world["docs"]
        filtered, filter_stats = blocklist_filter(docs)
        attack_docs = [d for d in docs if d["domain"] == "target" and d["split"] == "seen"]
        write_jsonl(docs, tmp / "corpus" / "unfiltered.jsonl")
        write_jsonl(filtered, tmp / "corpus" / "filtered.jsonl")
        write_jsonl(attack_docs, tmp / "corpus" / "attack.jsonl")
        # for directional ablation: text of the dev creatures (asked by no evaluated task), and general text
        write_jsonl([d for d in docs if d["split"] == "dev"], tmp / "corpus" / "dev.jsonl")
        write_jsonl([d for d in docs if d["domain"] == "general"], tmp / "corpus" / "general.jsonl")
        # for GRPO: the attack-seen facts as prompts with gold answers
        write_jsonl(reward_prompts(world["facts"]), tmp / "corpus" / "reward.jsonl")
        (tmp / "facts.json").write_text(json.dumps(world["facts"], indent=1))
        write_tasks(world["facts"], tmp / "tasks")
        log(f"toy world: {len(docs)} documents, filter removed {filter_stats['removed']} "
            f"({filter_stats['target_slipped_through']} target documents slipped through)")

        # 2. Tokenizer, then the models: the two pretrainings are independent, and so are the two
        #    unlearnings of the unfiltered model, so each pair runs in two processes at once (one
        #    torch thread each: the same weights as one after the other, in half the time).
        tokenizer = train_tokenizer([d["text"] for d in docs], tmp / "tokenizer")
        texts = {"unfiltered": [d["text"] for d in docs], "filtered": [d["text"] for d in filtered]}
        # A small world builds faster in this process than it takes two new ones to start.
        if parallel is None:
            parallel = spec.pretrain_steps * spec.batch_size * spec.seq_len >= 500_000
        with _two_at_a_time(parallel, log) as run:
            scores = dict(zip(texts, run([(_pretrained, (tmp, spec, n, texts[n])) for n in texts]), strict=True))
            (scores["unlearned"], history), (scores["rmu"], history_rmu) = run(
                [(_unlearned, (tmp, spec, world["facts"])), (_rmu, (tmp, spec, docs))])
        problems = world_problems(scores, spec) if spec.check else []
        if problems:
            raise WorldBuildError(f"the toy world's models are not what their names say ({'; '.join(problems)}); "
                                  "nothing was kept. Report this with world.json's settings")

        info = dict(
            spec=dataclasses.asdict(spec),
            properties="checked: unfiltered knows the target domain, filtered and unlearned are near chance on it, "
                       "all keep the general domain",
            filter=filter_stats,
            sizes=dict(documents=len(docs), facts=len(world["facts"]), attack_documents=len(attack_docs),
                       parameters=_parameters(tmp / "unfiltered"), vocab=len(tokenizer)),
            pre_attack=scores,
            unlearning=history,
            rmu=history_rmu,
            build_s=round(time.perf_counter() - start, 1),
        )
        write_atomic(tmp / "world.json", json.dumps(info, indent=2))
    # Task YAML points at its data by absolute path: rewrite for the final location.
    write_tasks(world["facts"], out / "tasks")
    return out


@contextlib.contextmanager
def _two_at_a_time(parallel: bool, log):
    """A runner of [(function, args), ...] that returns their results in order: two at a time,
    each in a process of its own on one torch thread (one pool for every stage: a process
    costs seconds to start), or one after the other here when not `parallel`. Each call
    writes its model into the build folder itself."""
    if not parallel:
        yield lambda calls: [function(*args, log=log) for function, args in calls]
        return
    with worker_pool(2) as run:
        yield lambda calls: run(_one_thread, calls)


def _one_thread(call):
    from attack.__main__ import quiet_libraries

    quiet_libraries()  # the build's own lines, not the libraries' progress bars and warnings
    function, args = call
    torch.set_num_threads(1)
    return function(*args, log=lambda m: print(m, file=sys.stderr, flush=True))


def _pretrained(tmp: Path, spec: BuildSpec, name: str, texts: list[str], log) -> dict:
    """A model pretrained from scratch on `texts`, saved as tmp/name; returns its scores."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    log(f"toy world: pretraining '{name}' on {len(texts)} documents")
    model = build_model(spec.model, tokenizer, seed=spec.seed)
    pretrain(model, tokenizer, texts, spec.pretrain_steps, lr=spec.pretrain_lr, batch_size=spec.batch_size,
             seq_len=spec.seq_len, seed=spec.seed, log=lambda m: log(f"{name}: {m.strip()}"))
    model.save_pretrained(str(tmp / name))
    tokenizer.save_pretrained(str(tmp / name))
    scores = _accuracy(_evaluator(model, tokenizer, tmp / "tasks"))
    log(f"toy world: '{name}' scores {_fmt(scores)}")
    return scores


def _unlearned(tmp: Path, spec: BuildSpec, facts: list[dict], log) -> tuple[dict, list]:
    """Gradient difference on the target facts' answers (forget) and the general facts' answers
    (retain), in the tasks' own formats, from the unfiltered model; saved as tmp/unlearned. On
    whole documents it stalls on some machines: the forget loss saturates while the ranking of
    the answers survives. A stalled attempt is repaired by a gentler, longer one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    # Both forms the tasks ask in: the question, and the statement the cloze task completes.
    forget_pairs = [(_question(f), f["value"]) for f in facts if f["domain"] == "target"]
    forget_pairs += [(CLOZE_PROMPTS[f["relation"]].format(e=f["entity"]), f["value"])
                     for f in facts if f["domain"] == "target"]
    retain_pairs = [(_question(f), f["value"]) for f in facts if f["domain"] == "general"]
    for attempt, lr in enumerate((spec.unlearn_lr, spec.unlearn_lr / 2), 1):
        log(f"toy world: unlearning target knowledge from 'unfiltered' (attempt {attempt}, lr {lr:g})")
        model = AutoModelForCausalLM.from_pretrained(str(tmp / "unfiltered"))
        evaluator = _evaluator(model, tokenizer, tmp / "tasks")

        def check(evaluator=evaluator):
            s = _accuracy(evaluator)
            target = (s["toy_target_seen"] + s["toy_target_heldout"]) / 2
            return dict(target=target, general=s["toy_general"],
                        stop=target <= 0.30 and s["toy_target_cloze"] <= 0.2)

        rng = random.Random(spec.seed + attempt)
        forget = answer_batches(forget_pairs, tokenizer, 8, rng)
        retain = answer_batches(retain_pairs, tokenizer, 8, rng)
        _, history = unlearn(model, forget, retain, check, max_steps=spec.unlearn_max_steps * attempt, lr=lr,
                             max_forget_loss=math.log(len(tokenizer)), seed=spec.seed,
                             log=lambda m: log(f"unlearned: {m.strip()}"))
        scores = _accuracy(evaluator)
        log(f"toy world: 'unlearned' scores {_fmt(scores)}")
        if not spec.check or not world_problems({"unlearned": scores}, spec):
            break
    model.save_pretrained(str(tmp / "unlearned"))
    tokenizer.save_pretrained(str(tmp / "unlearned"))
    return scores, history


def _parameters(folder: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder))).parameters())


def _rmu(tmp: Path, spec: BuildSpec, docs: list[dict], log) -> tuple[dict, list]:
    """The second unlearned model: RMU on the target documents from the unfiltered model. An
    attempt that costs the general domain more than the world allows is repaired by one with a
    4x retain term (measured on a world with 15% leaked documents, whose unfiltered model keeps
    only 0.85 of the general domain: RMU left 0.74, the heavier retain term 0.82)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    frozen = AutoModelForCausalLM.from_pretrained(str(tmp / "unfiltered")).eval()
    texts = {domain: [d["text"] for d in docs if d["domain"] == domain] for domain in ("target", "general")}
    with torch.no_grad():  # the steering norm in units of the layer's typical output norm
        sample = next(packed_batches(texts["general"], tokenizer, spec.seq_len, 8, random.Random(spec.seed)))
        norm = frozen(input_ids=sample["input_ids"], output_hidden_states=True).hidden_states[spec.rmu_layer + 1]
        norm = float(norm.norm(dim=-1).mean())

    for attempt, retain_weight in enumerate((1.0, 4.0), 1):
        log(f"toy world: RMU on the target documents of 'unfiltered' (layer {spec.rmu_layer}"
            + (f", attempt {attempt}, retain weight {retain_weight:g})" if attempt > 1 else ")"))
        model = AutoModelForCausalLM.from_pretrained(str(tmp / "unfiltered"))
        evaluator = _evaluator(model, tokenizer, tmp / "tasks")
        rng = random.Random(spec.seed)
        target = packed_batches(texts["target"], tokenizer, spec.seq_len, 8, rng)
        general = packed_batches(texts["general"], tokenizer, spec.seq_len, 8, rng)

        def check(evaluator=evaluator):
            s = _accuracy(evaluator)
            target = (s["toy_target_seen"] + s["toy_target_heldout"]) / 2
            # RMU costs general accuracy early on; the retain loss wins it back, so stop only once it has
            return dict(target=target, general=s["toy_general"],
                        stop=target <= 0.30 and s["toy_target_cloze"] <= 0.2 and s["toy_general"] >= 0.85)

        _, history = rmu(model, frozen, target, general, check, spec.rmu_layer, spec.rmu_steer * norm,
                         max_steps=spec.unlearn_max_steps, lr=spec.rmu_lr, retain_weight=retain_weight, seed=spec.seed,
                         log=lambda m: log(f"rmu: {m.strip()}"))
        scores = _accuracy(evaluator)
        log(f"toy world: 'rmu' scores {_fmt(scores)}")
        if not spec.check or not world_problems({"rmu": scores}, spec):
            break
    model.save_pretrained(str(tmp / "rmu"))
    tokenizer.save_pretrained(str(tmp / "rmu"))
    return scores, history


def _fmt(scores: dict) -> str:
    return ", ".join(f"{t.removeprefix('toy_')} {v:.2f}" for t, v in scores.items())
