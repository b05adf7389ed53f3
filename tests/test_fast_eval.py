"""The fast evaluation path (eval_callbacks/fastlm.py) against stock lm-eval (HFLM + evaluate) on
the same live model: every score, stderr, per-question record and group aggregate, at the first
point and at later points after the weights changed (requests are reused, responses are not)."""

from pathlib import Path

import hub_copies  # tests/hub_copies.py
import pytest
import torch
from transformers import AutoModelForCausalLM

from eval_callbacks import LiveEvaluator, find_tasks
from eval_callbacks.fastlm import FastHFLM

DI_TASKS = str(Path(__file__).resolve().parents[1] / "eval_callbacks" / "tasks" / "deep_ignorance")
TOY = ["toy_target_seen", "toy_target_cloze", "toy_general"]


def _pair(model, tokenizer, tasks, include, copies=None, batch_size=8, limit=None):
    manager = find_tasks(tasks, include)
    return [LiveEvaluator(model, tokenizer, tasks, batch_size=batch_size, task_manager=manager, dataset_paths=copies,
                          limit=limit, fast=fast) for fast in (True, False)]


def _same(fast: LiveEvaluator, stock: LiveEvaluator, subset: bool = False) -> int:
    """Both evaluators score the model now; returns how many rows were compared."""
    ours, theirs = fast.evaluate(subset=subset), stock.evaluate(subset=subset)
    key = lambda r: (r["task"], r["metric"])  # noqa: E731
    ours, theirs = {key(r): r for r in ours}, {key(r): r for r in theirs}
    assert ours.keys() == theirs.keys()
    assert theirs, "nothing was scored: an empty comparison proves nothing"
    for k, row in theirs.items():
        assert ours[k]["n"] == row["n"], k
        assert ours[k]["value"] == pytest.approx(row["value"], abs=1e-6), k
        if row["stderr"] is not None:
            assert ours[k]["stderr"] == pytest.approx(row["stderr"], abs=1e-6), k
    assert [(r["task"], r["question"], r["correct"]) for r in fast.last_records] == \
        [(r["task"], r["question"], r["correct"]) for r in stock.last_records]
    for a, b in zip(fast.last_records, stock.last_records, strict=True):
        assert a["p_correct"] == pytest.approx(b["p_correct"], abs=2e-5)  # both rounded to 5 decimals
    return len(theirs)


def _perturb(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p) * p.std().clamp(min=1e-3))


def _gpt2(tokenizer):
    """Learned absolute positions: left padding scores right only with each row's own position ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2))


@pytest.mark.parametrize("arch", ["llama_dir", "neox_dir", "gpt2"])
def test_toy_tasks_equal_stock_at_every_point(world, arch, request):
    model = _gpt2(world["tokenizer"]) if arch == "gpt2" else \
        AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(arch)))
    fast, stock = _pair(model, world["tokenizer"], TOY, [str(world["tasks"])], limit=5)
    assert isinstance(fast._lm_wrapper(), FastHFLM) and fast._lm._fast
    assert _same(fast, stock) >= 3 * 3
    assert _same(fast, stock, subset=True) >= 3 * 3  # the fixed subset of intermediate points
    for seed in (1, 2):  # the weights move between points, as during an attack
        _perturb(model, seed)
        _same(fast, stock)


def _spy_shared_prefix(monkeypatch) -> list:
    """What every call of eval_callbacks.fastlm.shared_prefix returned (None: the plain path)."""
    import eval_callbacks.fastlm as fastlm

    returned = []
    plain = fastlm.shared_prefix
    monkeypatch.setattr(fastlm, "shared_prefix", lambda *a, **k: (returned.append(out := plain(*a, **k)), out)[1])
    return returned


def test_deep_ignorance_groups_equal_stock(world, llama_dir, tmp_path, monkeypatch):
    shared = _spy_shared_prefix(monkeypatch)
    root = tmp_path / "hub"
    copies = {"EleutherAI/wmdp_bio_robust_mcqa": str(hub_copies.wmdp_bio_robust_mcqa(root / "mcqa")),
              "EleutherAI/wmdp_bio_cloze": str(hub_copies.wmdp_bio_cloze(root / "cloze"))}
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    fast, stock = _pair(model, world["tokenizer"], ["wmdp_bio_robust", "wmdp_bio_cloze_verified"], [DI_TASKS],
                        copies=copies, batch_size=5)
    _same(fast, stock)
    _perturb(model, 3)
    _same(fast, stock)
    groups = {r["task"] for r in fast.evaluate() if r["task"] in ("wmdp_bio_robust", "wmdp_bio_cloze_verified")}
    assert groups == {"wmdp_bio_robust", "wmdp_bio_cloze_verified"}
    # the questions' shared preamble ran once per batch, cloze answers after it included
    assert any(s is not None for s in shared)


@pytest.mark.slow
def test_mmlu_group_equals_stock(world, llama_dir, tmp_path):
    subjects = ["anatomy", "astronomy", "virology", "college_biology", "high_school_physics"]
    mmlu = hub_copies.mmlu(tmp_path / "mmlu", subjects)
    tasks = [f"mmlu_{s}" for s in subjects]
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    fast, stock = _pair(model, world["tokenizer"], tasks, None, copies={"cais/mmlu": str(mmlu)})
    _same(fast, stock)


def test_generation_tasks_fall_back_to_stock(world, llama_dir, tmp_path):
    (tmp_path / "gen.jsonl").write_text('{"q": "The first creature is", "a": "a"}\n{"q": "Its colour is", "a": "b"}\n')
    (tmp_path / "toy_gen.yaml").write_text(
        f"task: toy_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1\n")
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    fast, stock = _pair(model, world["tokenizer"], ["toy_gen", "toy_general"], [str(tmp_path), str(world["tasks"])])
    _same(fast, stock)
    # the generation task was scored (through lm-eval's own generate_until), not silently dropped
    assert ("toy_gen", "exact_match") in {(r["task"], r["metric"]) for r in fast.evaluate()}


def test_questions_longer_than_the_model_are_cut_as_stock_cuts_them(world, tmp_path):
    """A context longer than the model's positions: both paths keep its last tokens."""
    import json as _json
    import random as _random

    rng = _random.Random(0)
    words = " ".join(d["text"] for d in world["docs"][:40]).split()
    rows = [{"question": " ".join(rng.choice(words) for _ in range(n)), "choices": ["red cat", "blue dog", "a", "b"],
             "answer": i % 4} for i, n in enumerate([20, 300, 400, 500])]
    (tmp_path / "long.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy_long.yaml").write_text(
        f"task: toy_long\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'long.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1\n")
    model = _gpt2(world["tokenizer"])  # 256 positions
    fast, stock = _pair(model, world["tokenizer"], ["toy_long"], [str(tmp_path)])
    lengths = [len(world["tokenizer"](r["question"])["input_ids"]) for r in rows]
    assert max(lengths) > 256 > min(lengths)  # both paths of the fast evaluator run
    _same(fast, stock)


def test_a_model_that_returns_no_cache_is_scored_row_by_row(world, llama_dir, monkeypatch, tmp_path):
    """Custom or patched model code may return no past_key_values: the choices after a context
    (cloze answers of several tokens) are then scored as lm-eval's rows, with the same numbers."""
    copies = {"EleutherAI/wmdp_bio_cloze": str(hub_copies.wmdp_bio_cloze(tmp_path / "cloze"))}
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    fast, stock = _pair(model, world["tokenizer"], ["wmdp_bio_cloze_verified"], [DI_TASKS], copies=copies)
    assert fast._lm_wrapper()._fast  # decided on the model's own forward, before it loses its cache
    forward = type(model).forward

    def without_cache(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.past_key_values = None
        return out

    monkeypatch.setattr(type(model), "forward", without_cache)
    from eval_callbacks.fastlm import FastHFLM

    rows = []
    score_rows = FastHFLM._score_rows
    monkeypatch.setattr(FastHFLM, "_score_rows", lambda self, idx, *a, **k: (rows.extend(idx), score_rows(self, idx, *a, **k))[1])
    _same(fast, stock)
    assert rows  # the row path ran: the choices after a context, scored without a cache


PREFIX = "Here is a question about the toy world. Answer it in a few words. "


def _prefixed_generation_task(folder: Path) -> str:
    """A generation task whose prompts all begin with the same words (as a chat template's system
    turn makes them), of different lengths so rows are padded."""
    questions = ["The first creature is", "Its colour is", "The creature that lives in the north eats",
                 "What", "The second creature of the world and its colour are"]
    (folder / "gen.jsonl").write_text("".join(f'{{"q": "{PREFIX}{q}", "a": "a"}}\n' for q in questions))
    (folder / "toy_prefixed.yaml").write_text(
        f"task: toy_prefixed\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1\n")
    return "toy_prefixed"


@pytest.mark.parametrize("arch", ["llama_dir", "neox_dir", "gpt2"])
def test_generation_runs_the_shared_prefix_once_and_equals_stock(world, arch, request, tmp_path, monkeypatch):
    """The prompts' common start runs once, the rows after its cache with a masked gap: the same
    completions as stock lm-eval's generation (rotary and learned absolute positions alike)."""
    model = _gpt2(world["tokenizer"]) if arch == "gpt2" else \
        AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(arch)))
    task = _prefixed_generation_task(tmp_path)
    shared = _spy_shared_prefix(monkeypatch)
    fast, stock = _pair(model, world["tokenizer"], [task], [str(tmp_path)])
    _same(fast, stock)
    assert [r["completion"] for r in fast.last_records] == [r["completion"] for r in stock.last_records]
    assert any(s is not None for s in shared), "the shared prefix was never used: nothing was compared"


@pytest.mark.parametrize("arch", ["llama_dir", "gpt2"])
def test_last_token_logits_with_the_shared_prefix_equal_each_row_alone(world, arch, request):
    """The KL guard's and the refusal direction's forward: each row's next-token logits as the row
    alone (no padding, no prefix cache) gives them."""
    from eval_callbacks.fastlm import last_token_logits, shared_prefix

    model = _gpt2(world["tokenizer"]) if arch == "gpt2" else \
        AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(arch)))
    model.eval()
    tok = world["tokenizer"]
    rows = [tok(PREFIX + q)["input_ids"] for q in ("The first creature is", "What", "Its colour and its home are")]
    ids = torch.zeros((3, max(map(len, rows))), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, ids.shape[1] - len(row):], mask[r, ids.shape[1] - len(row):] = torch.tensor(row), 1
    assert shared_prefix(model, ids, mask) is not None  # the path under test is taken
    ours = last_token_logits(model, rows, tok.pad_token_id)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([row])).logits[0, -1] for row in rows])
    assert torch.allclose(ours, alone, atol=1e-4), (ours - alone).abs().max()


def test_the_kl_guard_reads_the_next_token_logits_the_generation_computed(world, llama_dir, tmp_path, monkeypatch):
    """KL on the harmless prompts at every point: the first step of that task's generation already
    computed each prompt's next-token logits, so the guard runs only the prompts it did not
    generate (here a subset point generates 2 of 5), with the value the guard's own forward gives."""
    import eval_callbacks.fastlm as fastlm

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    task = _prefixed_generation_task(tmp_path)
    evaluator = LiveEvaluator(model, world["tokenizer"], [task], batch_size=8, task_manager=find_tasks([task], [str(tmp_path)]),
                              kl_task=task, limit=2)
    _perturb(model, 0)
    rows_run = []
    forward = fastlm.last_token_logits
    monkeypatch.setattr(fastlm, "last_token_logits", lambda m, rows, pad=None: rows_run.extend(rows) or forward(m, rows, pad))
    for subset, generated in ((False, 5), (True, 2)):
        rows_run.clear()
        kl = next(r for r in evaluator.evaluate(subset=subset) if r["metric"] == "kl")
        assert len(rows_run) == 5 - generated, "the guard ran prompts the generation had already run"
        rows_run.clear()
        alone = evaluator._kl_row()["value"]  # every prompt through the guard's own forward
        assert len(rows_run) == 5
        assert kl["value"] > 1e-6 and kl["value"] == pytest.approx(alone, rel=1e-4, abs=1e-9)


def test_the_kl_reference_is_kept_and_read_back_not_computed_again(world, llama_dir, tmp_path, monkeypatch):
    """A sweep's attacks on the same model share the KL guard's reference: the first evaluator
    computes it and keeps it in the file; a later one on the same file reads it, and does not run
    the prompts again (here on weights changed since, so computing would give other numbers)."""
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    task = _prefixed_generation_task(tmp_path)
    kept = tmp_path / "pre" / "key.kl.pt"

    def build():
        return LiveEvaluator(model, world["tokenizer"], [task], task_manager=find_tasks([task], [str(tmp_path)]),
                             kl_task=task, kl_reference=kept)

    first = build()
    assert kept.exists() and torch.equal(torch.load(kept), first._kl_reference)
    assert torch.allclose(first._kl_reference.double(), first._last_token_logprobs(), atol=1e-6)
    _perturb(model, 0)
    calls = []
    monkeypatch.setattr(LiveEvaluator, "_last_token_logprobs", lambda self, known=None: calls.append(1))
    assert torch.equal(build()._kl_reference, first._kl_reference) and not calls


def test_lora_adapters_are_scored_folded_into_a_copy(world, llama_dir, monkeypatch):
    """On the CPU a LoRA model is scored as a copy with its adapters folded into the weights: the
    same scores and records as with the adapters unfolded (up to rounding), what ran had no LoRA
    layer, and the live model is left bit for bit as it was."""
    import lm_eval.evaluator
    from peft import LoraConfig, get_peft_model

    import eval_callbacks.runner as runner

    torch.manual_seed(0)  # init_lora_weights=False: both factors random, so the adapter changes the scores
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evaluator = LiveEvaluator(model, world["tokenizer"], TOY, batch_size=8, task_manager=find_tasks(TOY, [str(world["tasks"])]))
    ran, real = [], lm_eval.evaluator.evaluate

    def spy(lm, **kwargs):
        ran.append(any("lora_" in n for n, _ in lm.model.named_parameters()))
        return real(lm=lm, **kwargs)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    folded = (evaluator.evaluate(), evaluator.last_records)
    with model.disable_adapter():
        base = evaluator.evaluate()
    monkeypatch.setattr(runner, "_worth_folding", lambda model: False)
    unfolded = (evaluator.evaluate(), evaluator.last_records)
    assert ran == [False, True, True]  # the folded copy; with its adapter disabled, and unfolded: as it is
    assert [r["value"] for r in folded[0]] == pytest.approx([r["value"] for r in unfolded[0]], abs=1e-5)
    assert [r["correct"] for r in folded[1]] == [r["correct"] for r in unfolded[1]]
    assert [r["p_correct"] for r in folded[1]] == pytest.approx([r["p_correct"] for r in unfolded[1]], abs=2e-5)
    assert max(abs(a["value"] - b["value"]) for a, b in zip(folded[0], base, strict=True)) > 1e-3  # the adapter counted
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
