"""Run lm-eval tasks on a live (training) model without disturbing the training run."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from eval_callbacks import refusal
from eval_callbacks.files import write_whole
from eval_callbacks.task_lookup import TaskDataError, UnknownTaskError, find_tasks, headline_metric, include_folders, local_datasets


@contextlib.contextmanager
def preserved_training_state(model: torch.nn.Module):
    """Evaluate inside this block: RNG states and train/eval mode are restored afterwards.

    We call lm-eval's `evaluate`, not `simple_evaluate` (which reseeds Python/NumPy/torch on
    every call), and still restore every generator: any sampling during evaluation advances
    them, which would silently change the attack's data order and dropout.
    """
    was_training = model.training
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        model.train(was_training)


@contextlib.contextmanager
def adapters_folded(lm):
    """Inside this block, lm-eval's model `lm` scores a copy of its model with the LoRA adapters
    folded into the weights (PEFT's merge_and_unload), where that is cheap: on the CPU, when the
    copy fits in the memory left. An unfolded adapter adds two small products, a scaling and a
    sum to every linear layer of every forward (a fifth of a refusal evaluation point on
    SmolLM2-135M, one CPU thread; the copy and the fold cost a twentieth); folded, the weights
    give the same function up to float rounding. The live
    model is not touched (merging into it and back would move its frozen weights by rounding at
    every point). On a GPU the copy would cost memory the attack needs, so it scores as it is."""
    model = lm._model
    if not _worth_folding(model):
        yield
        return
    folded = copy.deepcopy(model).merge_and_unload().eval()
    lm._model = folded
    try:
        yield
    finally:
        lm._model = model


def _worth_folding(model) -> bool:
    import psutil
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel) or any(c.peft_type != "LORA" for c in model.peft_config.values()):
        return False
    if any(m.disable_adapters or m.merged for m in model.modules() if isinstance(m, LoraLayer)):
        return False  # scored without its adapters (disable_adapter), or folded already: as it is
    parameters = list(model.parameters())
    size = sum(p.numel() * p.element_size() for p in parameters)
    return all(p.device.type == "cpu" for p in parameters) and size < psutil.virtual_memory().available / 2


@contextlib.contextmanager
def _no_progress_bars():
    """lm-eval draws several progress bars per evaluation; inside an attack's own bar they are noise."""
    import tqdm

    original = tqdm.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = original


"""Task sets that ship with the package, each a folder of lm-eval YAML named by its folder:
`include_path: [deep_ignorance]` finds it from any directory and from an installed package."""


class LiveEvaluator:
    """Evaluates lm-eval tasks on a model object that may be training.

    Tasks and the lm-eval model wrapper are built once; each call to `evaluate` reuses them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        tasks: list[str],
        include_path: list[str] | None = None,
        batch_size: int = 32,
        limit: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        subset_seed: int = 0,
        task_manager=None,
        dataset_paths: dict[str, str] | None = None,
        fast: bool = True,
        chat_template: bool = False,
        max_gen_toks: int = 64,
        judge=None,
        kl_task: str | None = None,
        kl_reference: str | Path | None = None,
    ):
        """chat_template: prompts go through the tokenizer's chat template (a chat model).
        max_gen_toks: tokens a generation task generates unless its YAML says otherwise (greedy,
        batched with left padding). judge: what `complied` asks (eval_callbacks/judges.py; the
        substring verdict when None). kl_task: a task whose prompts measure, at every point, the
        KL divergence of the next-token distribution at the end of the prompt from the model as it
        was when this evaluator was built (the model under test): the utility guard of refusal
        attacks (heretic's measure on harmless prompts), a row of metric `kl` under that task.
        kl_reference: a file that keeps the model under test's next-token log-probabilities on
        those prompts, read when it exists (another attack on the same model computed them), else
        written; the caller keys it by everything that decides them."""
        # lm-eval logs every request batch at INFO; during an attack that is noise.
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        refusal.register()
        self.chat_template = chat_template
        self.max_gen_toks = max_gen_toks
        self.judge = judge
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        manager = task_manager or find_tasks(tasks, include_path)
        try:
            with local_datasets(dataset_paths, include_folders(manager)):
                self.task_dict = manager.load(list(tasks))
        except Exception as e:  # datasets/hub errors come in many types
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if isinstance(e, StopIteration) or "StopIteration" in detail:  # lm-eval reading an empty split
                detail = "a data file holds no questions"
            raise TaskDataError(
                f"could not load the data of task(s) {', '.join(tasks)}: {detail}; without hub access, point "
                "eval.dataset_paths (--eval-dataset HUB_ID=FOLDER) at local copies"
            ) from None
        self.requested = list(tasks)
        self.tasks = dict(self.task_dict["tasks"])  # leaf tasks, groups flattened
        for name, task in self.tasks.items():
            if task.OUTPUT_TYPE == "multiple_choice" and task.config.doc_to_choice is None:
                raise UnknownTaskError(f"task {name} is multiple_choice but its YAML has no doc_to_choice: add the "
                                       "choices (e.g. doc_to_choice: \"{{choices}}\")")
        from lm_eval.config.task import default_gen_kwargs

        lengths = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
        for task in self.tasks.values():  # a YAML that sets no length generates max_gen_toks tokens (lm-eval: 256)
            kwargs = task.config.generation_kwargs
            if task.OUTPUT_TYPE == "generate_until" and isinstance(kwargs, dict) and (
                    kwargs == default_gen_kwargs(task.config.fewshot_delimiter) or not set(lengths) & set(kwargs)):
                kwargs["max_gen_toks"] = max_gen_toks
        self.fast = fast  # eval_callbacks/fastlm.py: same numbers, each point at its forward passes' cost
        if fast:
            from eval_callbacks.fastlm import compile_templates_once, reuse_requests

            compile_templates_once()
            for task in self.tasks.values():
                reuse_requests(task)
        self.groups = dict(self.task_dict.get("groups") or {})
        self.sizes = {name: len(task.eval_docs) for name, task in self.tasks.items()}
        empty = [name for name, n in self.sizes.items() if n == 0]
        if empty:
            raise UnknownTaskError(f"task(s) {', '.join(empty)} have no evaluation documents")
        # A fixed random subset (same questions at every point) for cheap intermediate points.
        self.subset = None
        if limit is not None:
            rng = random.Random(subset_seed)
            self.subset = {
                name: sorted(rng.sample(range(n), min(limit, n))) for name, n in self.sizes.items()
            }
        self._lm = None
        self._info = None
        self.last_records: list[dict] = []  # per-question outcomes of the latest evaluation
        self.kl_task = kl_task
        self._kl_reference = None
        self._kl_token_rows = None
        if kl_task is not None:
            if kl_task not in self.tasks:
                raise UnknownTaskError(f"the KL task {kl_task} is not among the evaluated tasks ({', '.join(self.tasks)})")
            self._kl_reference = self._reference_logprobs(Path(kl_reference) if kl_reference else None)

    def task_info(self) -> dict:
        """Per task and group: kind, output type, questions, chance accuracy, headline metric,
        few-shot count; groups also list their leaf tasks. `requested` marks the names asked for
        (a benchmark's headline), as opposed to the subtasks and subgroups lm-eval expands.
        Computed once (it reads every question)."""
        if self._info is not None:
            return self._info
        info = {}
        for name, task in self.tasks.items():
            chance = None
            if task.OUTPUT_TYPE == "multiple_choice":
                counts = [len(task.doc_to_choice(doc)) for doc in task.eval_docs]
                chance = float(np.mean([1 / c for c in counts if c]))
            metrics = [m["metric"] for m in (task.config.metric_list or []) if isinstance(m.get("metric"), str)]
            info[name] = dict(kind="task", output_type=task.OUTPUT_TYPE, n=self.sizes[name], chance=chance,
                              metric=metrics[0] if metrics else None, num_fewshot=task.config.num_fewshot or 0,
                              requested=name in self.requested)
        for name, group in self.groups.items():
            leaves = [t.task_name for t in group.get_all_tasks()]
            n = sum(info[t]["n"] for t in leaves)
            chances = [(info[t]["chance"], info[t]["n"]) for t in leaves if info[t]["chance"] is not None]
            chance = sum(c * k for c, k in chances) / sum(k for _, k in chances) if chances else None
            aggregates = group.aggregate_metric_list or []
            info[name] = dict(kind="group", members=leaves, n=n, chance=chance,
                              metric=aggregates[0].metric if aggregates else None,
                              requested=name in self.requested)
        self._info = info
        return info

    def questions(self) -> dict[str, list[str]]:
        """Each leaf task's questions as the model reads them (doc_to_text), so other splits (a
        dev split, reward questions) can be checked to share none of them."""
        return {name: [str(task.doc_to_text(doc)) for doc in task.eval_docs] for name, task in self.tasks.items()}

    def _lm_wrapper(self):
        if self._lm is None:
            from lm_eval.models.huggingface import HFLM

            from eval_callbacks.fastlm import FastHFLM

            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            was_training = self.model.training
            # lm-eval warns that a pre-built model ignores model_args: expected here.
            logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
            self._lm = (FastHFLM if self.fast else HFLM)(
                pretrained=self.model,
                tokenizer=self.tokenizer,
                batch_size=self.batch_size,
                mixed_precision_dtype=self.autocast_dtype,
            )
            self.model.train(was_training)  # HFLM switches the model to eval mode
            if self.judge is not None:
                self._judge_in_batches(self._lm)
        return self._lm

    def _judge_in_batches(self, lm) -> None:
        """After each batch of generations, ask the judge about all its completions at once (an
        endpoint answers them concurrently); the metric then reads the judge's cache."""
        generate = lm.generate_until

        def generate_then_judge(requests, *args, **kwargs):
            completions = generate(requests, *args, **kwargs)
            pairs = [(str(self.tasks[r.task_name].doc_to_target(r.doc)), c) for r, c in zip(requests, completions, strict=True)
                     if r.task_name in self.tasks and isinstance(c, str)
                     and refusal.names_refusal_metrics(self.tasks[r.task_name].config)]
            if pairs:
                self.judge.verdicts([p for p, _ in pairs], [c for _, c in pairs])
            return completions

        lm.generate_until = generate_then_judge

    def headline_scores(self) -> dict[str, float]:
        """Evaluate now: each task's headline metric, {task: value}."""
        info = self.task_info()
        return {r["task"]: r["value"] for r in self.evaluate() if r["metric"] == headline_metric(info.get(r["task"]))}

    def evaluate(self, subset: bool = False) -> list[dict]:
        """Evaluate all tasks now. Returns rows {task, metric, value, stderr, n}.

        subset=True uses the fixed subset chosen at construction (when a limit was given).
        """
        from lm_eval.evaluator import evaluate

        samples = self.subset if subset else None
        with preserved_training_state(self.model), _no_progress_bars(), refusal.judged_by(self.judge):
            lm = self._lm_wrapper()
            watching = self._kl_reference is not None and hasattr(lm, "watch")
            if watching:  # a generation over the KL task's prompts leaves their next-token logits
                lm.watch(set(self._kl_rows()))
            with adapters_folded(lm):
                out = evaluate(
                    lm=lm,
                    task_dict=self.task_dict,
                    samples=samples,
                    log_samples=True,
                    bootstrap_iters=1000,
                    apply_chat_template=self.chat_template,
                )
            rows = self._rows(out)
            if self._kl_reference is not None:
                rows.append(self._kl_row(lm.first_logits if watching else {}))
            if watching:
                lm.watch(set())
        return rows

    def prompts(self, task: str) -> list[str]:
        """A task's prompts as the model reads them: doc_to_text, through the chat template when set."""
        texts = [str(t) for t in self.questions()[task]]
        if not self.chat_template:
            return texts
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                   tokenize=False) for t in texts]

    def _kl_rows(self) -> list[tuple[int, ...]]:
        """The KL task's prompts as token rows, tokenized once (a generation's first-step logits
        stand in for a row only where its context holds exactly these tokens)."""
        if self._kl_token_rows is None:
            tok = self.tokenizer
            self._kl_token_rows = [tuple(tok(t, add_special_tokens=not self.chat_template)["input_ids"])
                                   for t in self.prompts(self.kl_task)]
        return self._kl_token_rows

    @torch.no_grad()
    def _last_token_logprobs(self, known: dict | None = None) -> torch.Tensor:
        """Log-probabilities of the next token after each of the KL task's prompts, (prompts, vocab).
        known: next-token logits already computed, by token row (this point's generation); the
        other prompts run here."""
        from eval_callbacks.fastlm import last_token_logits

        known = known or {}
        device = next(self.model.parameters()).device
        rows = self._kl_rows()
        logits = {row: known[row] for row in rows if row in known}
        missing = [list(row) for row in rows if row not in logits]
        with preserved_training_state(self.model):
            for start in range(0, len(missing), self.batch_size):
                batch = missing[start:start + self.batch_size]
                with torch.autocast(device_type=device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    out = last_token_logits(self.model, batch, self.tokenizer.pad_token_id)
                logits.update(zip(map(tuple, batch), out.float().cpu(), strict=True))
        return torch.log_softmax(torch.stack([logits[row] for row in rows]).double(), -1)

    def _reference_logprobs(self, kept: Path | None) -> torch.Tensor:
        """The model under test's next-token log-probabilities on the KL task's prompts (before
        any attack), in float32: read from `kept` when it holds them, else computed and kept."""
        if kept is not None and kept.exists():
            ref = torch.load(kept, weights_only=True)
            if ref.shape[0] == len(self._kl_rows()):
                return ref
        ref = self._last_token_logprobs().float()
        if kept is not None:  # a file that exists is complete
            write_whole(kept, lambda f: torch.save(ref, f))
        return ref

    def _kl_row(self, known: dict | None = None) -> dict:
        """KL(model under test || now) on the KL task's prompts; known: next-token logits this
        point's generation already computed (`_last_token_logprobs`)."""
        now = self._last_token_logprobs(known)
        ref = self._kl_reference.double()
        kl = (ref.exp() * (ref - now)).sum(-1)  # KL(model under test || attacked), per prompt
        se = float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else None
        return dict(task=self.kl_task, metric="kl", value=float(kl.mean()), stderr=se, n=len(kl))

    def _rows(self, out: dict) -> list[dict]:
        rows = []
        n_samples = out.get("n-samples", {})
        for task, metrics in out["results"].items():
            n = n_samples.get(task, {}).get("effective")
            if n is None and task in self.groups:
                n = sum(n_samples.get(t.task_name, {}).get("effective") or 0 for t in self.groups[task].get_all_tasks())
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                if not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                stderr = float(stderr) if isinstance(stderr, (int, float)) else None
                name = metric if filt == "none" else key
                rows.append(dict(task=task, metric=name, value=float(value), stderr=stderr, n=n))
        samples = out.get("samples") or {}
        # The probability of the correct choice, once per question of each multiple-choice task.
        p_correct = {task: [correct_probability(self.tasks[task], s) for s in found] for task, found in samples.items()
                     if task in self.tasks and self.tasks[task].OUTPUT_TYPE == "multiple_choice"}
        self.last_records = self._records(samples, p_correct)
        probs = {task: [x for x in p if x is not None] for task, p in p_correct.items() if p}
        # A group's correct_prob pools its leaf tasks' questions (weighted by size, like its acc).
        for name, group in self.groups.items():
            pooled = [x for t in group.get_all_tasks() for x in probs.get(t.task_name, [])]
            if pooled:
                probs[name] = pooled
        for task, p in probs.items():
            if p:
                mean = float(np.mean(p))
                se = float(np.std(p, ddof=1) / math.sqrt(len(p))) if len(p) > 1 else None
                rows.append(dict(task=task, metric="correct_prob", value=mean, stderr=se, n=len(p)))
        return rows


    def _records(self, samples: dict, p_correct: dict[str, list]) -> list[dict]:
        """One record per task (and group) and question: its index in the task's evaluation
        documents (a group numbers its members' questions one after another), whether it was
        answered correctly under the headline metric, and the probability of the correct choice.
        A task's mean `correct` is its score; a group's is its size-weighted score."""
        info = self.task_info()
        records = []
        for name, entry in info.items():
            leaves = entry["members"] if entry["kind"] == "group" else [name]
            metric, offset = headline_metric(entry), 0
            for leaf in leaves:
                found = samples.get(leaf) or []
                generated = self.tasks[leaf].OUTPUT_TYPE == "generate_until"
                for s, p in zip(found, p_correct.get(leaf) or [None] * len(found), strict=True):
                    value = s.get(metric)
                    if not isinstance(value, (int, float)):
                        continue
                    record = {"task": name, "question": offset + int(s["doc_id"]),
                              "correct": int(value) if value in (0, 1) else float(value),
                              "p_correct": None if p is None else round(p, 5)}
                    if generated:  # what was asked, what came back, and what the judge made of it
                        record.update(self._generation_record(leaf, s))
                    records.append(record)
                offset += self.sizes[leaf]
        return records


    def _generation_record(self, leaf: str, sample: dict) -> dict:
        task = self.tasks[leaf]
        prompt = str(task.doc_to_text(sample["doc"]))
        resps = sample.get("filtered_resps") or sample.get("resps") or [""]
        completion = resps[0] if isinstance(resps[0], str) else (resps[0] or [""])[0]
        out = dict(prompt=prompt, completion=str(completion))
        if isinstance(sample.get("doc"), dict) and isinstance(sample["doc"].get("category"), str):
            out["category"] = sample["doc"]["category"]  # refusal per category (a cross-category attack)
        if refusal.names_refusal_metrics(task.config):
            with refusal.judged_by(self.judge):
                complied, reason = refusal.verdict(str(task.doc_to_target(sample["doc"])), str(completion))
            out.update(refused=int(refusal.refusal_phrase(str(completion)) is not None), complied=complied,
                       reason=reason)
        return out


def correct_probability(task, sample: dict) -> float | None:
    """Probability of the correct choice, normalised over the choices (softmax of log-likelihoods).

    Smoother than accuracy: it moves before the argmax flips.
    """
    lls = [resp[0] if isinstance(resp, (tuple, list)) else resp for resp in sample["filtered_resps"]]
    target = sample["target"]
    if isinstance(target, str):
        choices = task.doc_to_choice(sample["doc"])
        if target not in choices:
            return None
        target = choices.index(target)
    if isinstance(target, list):  # several gold answers: take the first
        target = target[0]
    if not isinstance(target, int) or not 0 <= target < len(lls):
        return None
    lls = np.asarray(lls, dtype=np.float64)
    lls -= lls.max()
    p = np.exp(lls)
    return float(p[target] / p.sum())
