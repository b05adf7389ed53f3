"""An evaluation point at the cost of its forward passes, with lm-eval's own numbers.

lm-eval's `evaluate()` still runs every point: its filters, metrics, aggregation, group scores
and stderr are what the curve records. Three costs that repeat at every point of a run are cut:

- requests: each task's requests are built once per run (`reuse_requests`), not re-rendered from
  the templates at every point; only their responses are reset;
- tokenization: each (context, continuation) pair is encoded once per run;
- the output head: HFLM computes the log-softmax over the whole vocabulary at every position of
  every row and keeps the continuation's few. `FastHFLM` runs each distinct input row once (the
  choices of a letter-answer question share one row, as lm-eval's one-token cache does), left-pads
  rows of a batch and applies the head only at the last K positions (transformers'
  `logits_to_keep`), where every row's continuation is scored.

The log-likelihoods equal HFLM's up to float rounding (the same forward, other batch shapes);
tests/test_fast_eval.py holds every score and per-question record to stock lm-eval's.
Models whose forward takes no `logits_to_keep`, and seq2seq models, fall back to HFLM's path;
generation and rolling log-likelihood tasks always use it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM


def keeps_logits(model) -> bool:
    """Whether the (possibly PEFT-wrapped) model's forward takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class FastHFLM(HFLM):
    """HFLM whose loglikelihood runs each distinct input once, with the head at the scored positions only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._fast = self.backend == "causal" and keeps_logits(self.model)

    def _encode_pair(self, context: str, continuation: str):
        key = (context, continuation)
        if key not in self._pairs:
            self._pairs[key] = super()._encode_pair(context, continuation)
        return self._pairs[key]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._fast or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # lm-eval's input row of a request: context + continuation without its last token, cut
        # from the left to the model's length; the continuation is scored at the row's last positions.
        rows: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            row = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            rows.setdefault(row, []).append(i)
        order = sorted(rows, key=len, reverse=True)  # similar lengths share a batch: little padding
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        size = int(override_bs or self.batch_size)
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            keep = max(len(requests[i][2]) for row in batch for i in rows[row])
            logprobs = self._scored_logprobs(batch, keep)  # [batch, keep, vocab]
            for row, scores in zip(batch, logprobs, strict=True):
                for i in rows[row]:
                    (strings, _, continuation) = requests[i]
                    tokens = torch.tensor(continuation, device=scores.device)
                    scored = scores[keep - len(continuation):]
                    answer = (float(scored.gather(1, tokens[:, None]).sum()),
                              bool((scored.argmax(-1) == tokens).all()))
                    results[i] = answer
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def _scored_logprobs(self, batch: list[tuple[int, ...]], keep: int) -> torch.Tensor:
        """Log-probabilities at the last `keep` positions of each row of a left-padded batch."""
        width = len(batch[0])
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts from 0 at its first token
        with (torch.no_grad(),
              torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                             enabled=self.mixed_precision_dtype is not None)):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), logits_to_keep=keep).logits
        return F.log_softmax(logits[:, -keep:], dim=-1, dtype=self.softmax_dtype)


def reuse_requests(task) -> None:
    """Make `task.build_all_requests` build once per set of arguments and hand back the same
    requests afterwards with their responses reset, so each evaluation point skips rendering
    every prompt again."""
    build = task.build_all_requests
    built: dict[str, list] = {}

    def build_once(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in built:
            build(**kwargs)
            built[key] = list(task._instances)
        for instance in built[key]:
            instance.resps, instance.filtered_resps = [], {}
        task._instances = list(built[key])

    task.build_all_requests = build_once
