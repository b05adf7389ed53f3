"""EK-FAC influence (Grosse et al. 2023) through Kronfluence, after the attack: the attacked
weights' curvature approximated per linear module by Kronecker factors with corrected eigenvalues
(fitted on the attack documents), and each document's influence on each recovered question's
loss, -log p(its correct answer | its context), through that inverse curvature.

Kronfluence tracks `nn.Linear` modules and knows nothing of PEFT; a LoRA adapter's A and B
matrices are `nn.Linear` modules, so on a LoRA run the tracked modules are exactly the adapter's
(what the attack trained), on a full fine-tune every linear layer but the output head. Everything
Kronfluence writes stays in counterfactual/ekfac/ of the run, with the seconds it took.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch

from attack.attribution import library_output_to, scores_once
from attack.errors import UserError
from attack.rundir import RunDir


def ekfac_scores(run: RunDir, cfg, documents: list[str], questions: list[dict], log=print) -> tuple[np.ndarray, float]:
    """Scores (documents x questions), higher = training on the document lowered the question's
    loss more, and the seconds they took; computed once per question set, then read back."""
    key = json.dumps([len(documents), [(q["task"], q["question"]) for q in questions]])

    def compute(folder) -> tuple[np.ndarray, float, dict]:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        from attack.model import load_attacked_model, load_tokenizer

        model, tokenizer = load_attacked_model(run.final, cfg.model), load_tokenizer(cfg.model)
        modules = dict(model.named_modules())
        lora = any("lora_" in name for name in modules)  # the adapter's A and B matrices, else every linear layer
        tracked = [name for name, m in modules.items() if isinstance(m, torch.nn.Linear)
                   and ("lora_" in name if lora else not name.endswith("lm_head"))]
        if not tracked:
            raise UserError(f"{run.final} has no linear module for EK-FAC to track")
        train = _examples(tokenizer, [(t, None) for t in documents], cfg.data.seq_len)
        query = _examples(tokenizer, [(q["context"], q["answer"]) for q in questions], cfg.data.seq_len)
        task = _task_class()(tracked)
        start = time.perf_counter()
        # the true Fisher samples labels from the model: seeded, so the same run ranks the same way
        with library_output_to(folder / "kronfluence.log"), torch.random.fork_rng():
            torch.manual_seed(0)
            model = prepare_model(model.float().eval(), task)
            analyzer = Analyzer(analysis_name="ekfac", model=model, task=task, cpu=not torch.cuda.is_available(),
                                output_dir=str(folder), disable_model_save=True, disable_tqdm=True,
                                log_level=logging.WARNING)
            analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=8,
                                     factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=query,
                                             train_dataset=train, per_device_query_batch_size=8,
                                             per_device_train_batch_size=8, overwrite_output_dir=True)
        pairwise = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # (questions, documents)
        seconds = time.perf_counter() - start
        log(f"  ekfac: {len(documents)} documents x {len(questions)} questions on {len(tracked)} modules "
            f"in {seconds:.0f} s")
        return pairwise.double().numpy().T, seconds, {"modules": len(tracked)}

    return scores_once(run, run.ekfac, key, "ekfac", compute)


def _examples(tokenizer, pairs: list[tuple[str, str | None]], seq_len: int) -> list[dict]:
    """Padded examples; the loss is on the answer alone where one is given, else on every token."""
    rows = []
    for text, answer in pairs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer is not None else []
        labels = [-100] * len(ids) + target if answer is not None else list(ids)
        ids = (ids + target)[:seq_len]
        rows.append((ids, labels[:seq_len]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [dict(input_ids=torch.tensor(ids + [pad] * (width - len(ids))),
                 attention_mask=torch.tensor([1] * len(ids) + [0] * (width - len(ids))),
                 labels=torch.tensor(labels + [-100] * (width - len(labels))))
            for ids, labels in rows]


def _task_class():
    """Kronfluence's Task for a causal language model (kronfluence is imported only when used)."""
    from kronfluence.task import Task

    def token_loss(batch, model, sample: bool) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits, labels = logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1)
        if sample:  # the true Fisher: labels drawn from the model's own distribution
            with torch.no_grad():
                drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            labels = torch.where(labels == -100, labels, drawn)
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    class CausalLM(Task):
        def __init__(self, tracked: list[str]):
            super().__init__()
            self.tracked = tracked

        def compute_train_loss(self, batch, model, sample=False):
            return token_loss(batch, model, sample)

        def compute_measurement(self, batch, model):
            return token_loss(batch, model, False)

        def get_influence_tracked_modules(self):
            return self.tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLM
