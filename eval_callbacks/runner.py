"""Run lm-eval tasks on a live (training) model without disturbing the training run."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time

import numpy as np
import torch


class UnknownTaskError(ValueError):
    """A requested task name is neither a stock lm-eval task nor found under the include path."""


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


def find_tasks(tasks: list[str], include_path: list[str] | None = None):
    """A TaskManager that knows every task in `tasks`, or UnknownTaskError naming the missing ones."""
    from lm_eval.tasks import TaskManager

    include = list(include_path or []) or None
    # Indexing lm-eval's ~15k stock task files takes seconds: skip it when the include
    # path alone holds every requested task.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include)
    missing = [t for t in tasks if t not in set(manager.all_tasks)]
    if missing:
        where = f" or under {', '.join(include)}" if include else ""
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {', '.join(missing)}: not a stock task{where}; "
            "check the name or add the folder holding its YAML with --eval-include"
        )
    return manager


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
    ):
        # lm-eval logs every request batch at INFO; during an attack that is noise.
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        manager = task_manager or find_tasks(tasks, include_path)
        self.task_dict = manager.load(list(tasks))
        self.tasks = dict(self.task_dict["tasks"])  # leaf tasks, groups flattened
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

    def task_info(self) -> dict:
        """Per task: output type, number of questions and the chance score of accuracy."""
        info = {}
        for name, task in self.tasks.items():
            chance = None
            if task.OUTPUT_TYPE == "multiple_choice":
                counts = [len(task.doc_to_choice(doc)) for doc in task.eval_docs]
                chance = float(np.mean([1 / c for c in counts if c]))
            info[name] = dict(output_type=task.OUTPUT_TYPE, n=self.sizes[name], chance=chance)
        return info

    def _lm_wrapper(self):
        if self._lm is None:
            from lm_eval.models.huggingface import HFLM

            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            was_training = self.model.training
            # lm-eval warns that a pre-built model ignores model_args: expected here.
            logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
            self._lm = HFLM(
                pretrained=self.model,
                tokenizer=self.tokenizer,
                batch_size=self.batch_size,
                mixed_precision_dtype=self.autocast_dtype,
            )
            self.model.train(was_training)  # HFLM switches the model to eval mode
        return self._lm

    def evaluate(self, subset: bool = False) -> list[dict]:
        """Evaluate all tasks now. Returns rows {task, metric, value, stderr, n}.

        subset=True uses the fixed subset chosen at construction (when a limit was given).
        """
        from lm_eval.evaluator import evaluate

        samples = self.subset if subset else None
        with preserved_training_state(self.model), _no_progress_bars():
            lm = self._lm_wrapper()
            start = time.perf_counter()
            out = evaluate(
                lm=lm,
                task_dict=self.task_dict,
                samples=samples,
                log_samples=True,
                bootstrap_iters=1000,
            )
            self.last_eval_s = time.perf_counter() - start
        return self._rows(out)

    def _rows(self, out: dict) -> list[dict]:
        rows = []
        n_samples = out.get("n-samples", {})
        for task, metrics in out["results"].items():
            n = n_samples.get(task, {}).get("effective")
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
        for task, samples in (out.get("samples") or {}).items():
            task_obj = self.tasks.get(task)
            if task_obj is None or task_obj.OUTPUT_TYPE != "multiple_choice" or not samples:
                continue
            probs = [correct_probability(task_obj, s) for s in samples]
            probs = [p for p in probs if p is not None]
            if probs:
                mean = float(np.mean(probs))
                se = float(np.std(probs, ddof=1) / math.sqrt(len(probs))) if len(probs) > 1 else None
                rows.append(dict(task=task, metric="correct_prob", value=mean, stderr=se, n=len(probs)))
        return rows


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
