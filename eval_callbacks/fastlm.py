"""An evaluation point at the cost of its forward passes, with lm-eval's own numbers.

lm-eval's `evaluate()` still runs every point: its filters, metrics, aggregation, group scores
and stderr are what the curve records. Three costs that repeat at every point of a run are cut:

- requests: each task's requests are built once per run (`reuse_requests`), not re-rendered from
  the templates at every point; only their responses are reset;
- templates: lm-eval compiles a Jinja template again for every document it renders (each point's
  metrics render every question's choices); `compile_templates_once` compiles each template
  text once per process, and renders exactly as before;
- tokenization: each (context, continuation) pair is encoded once per run;
- the forward passes: HFLM runs one row per choice (context and choice) and computes the
  log-softmax over the whole vocabulary at every position. `FastHFLM` runs each context once,
  with the tokens all its choices begin with, and the head only at the positions after them
  (transformers' `logits_to_keep`): a letter-answer question costs one forward. Choices that go
  on further (cloze answers) then run after it on its cached keys and values, so the context is
  never recomputed. Rows of a batch are left-padded with their own position ids.

The log-likelihoods equal HFLM's up to float rounding (the same forward, other batch shapes);
tests/test_fast_eval.py holds every score and per-question record to stock lm-eval's.
Models whose forward takes no `logits_to_keep`, and seq2seq models, fall back to HFLM's path;
rolling log-likelihood tasks always use it.

Generation, multiple choice, and the last-token forwards of the KL guard and the refusal
direction's candidates run the tokens every prompt of a batch begins with (a chat template's system
turn: 24 of the 43 tokens of a short request to SmolLM2) once, not once per prompt
(`shared_prefix`): the batch
runs after that prefix's cached keys and values, each row's padding between the prefix and its
own tokens, masked, with its own position ids, so every token sees what it saw before. Greedy
completions equal HFLM's up to float rounding (tests/test_fast_eval.py). Attention that cannot
mask a gap (flash attention, sliding windows, linear attention) keeps the plain path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from transformers.cache_utils import DynamicCache, DynamicLayer


def keeps_logits(model) -> bool:
    """Whether the (possibly PEFT-wrapped) model's forward takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


MIN_PREFIX = 4  # shared tokens worth a forward of their own


def shared_prefix(model, ids: torch.Tensor, mask: torch.Tensor, pad_id: int | None = None, own: int = 1):
    """A left-padded batch with the tokens all its rows begin with moved to the front and run once:
    (ids, mask, cache), the rows as [prefix, padding, rest of the row] and the prefix's cache
    repeated for every row, ready for `generate` or a forward after it; each row keeps its last
    `own` tokens out of the prefix (the positions whose logits are read). None when the batch
    shares too little or the model's attention cannot mask a gap (then run it as it is)."""
    if len(ids) < 2 or _attention(model) not in ("sdpa", "eager"):
        return None
    lengths = mask.sum(1).tolist()
    width = ids.shape[1]
    if any(not bool(mask[r, width - n:].all()) for r, n in enumerate(lengths)):
        return None  # not left-padded
    rows = [ids[r, width - n:].tolist() for r, n in enumerate(lengths)]
    prefix = common_prefix(rows)[:max(min(lengths) - own, 0)]
    if len(prefix) < MIN_PREFIX:
        return None
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([prefix], device=ids.device), use_cache=True).past_key_values
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window or linear-attention layers keep other state
    cache.batch_repeat_interleave(len(ids))
    pad = pad_id if pad_id is not None else 0
    p = len(prefix)
    new_ids = torch.full_like(ids, pad)
    new_mask = torch.zeros_like(mask)
    new_ids[:, :p] = ids.new_tensor(prefix)
    new_mask[:, :p] = 1
    for r, n in enumerate(lengths):
        new_ids[r, width - n + p:] = ids[r, width - n + p:]
        new_mask[r, width - n + p:] = 1
    return new_ids, new_mask, cache


@torch.no_grad()
def last_token_logits(model, rows: list[list[int]], pad_id: int | None = None) -> torch.Tensor:
    """The logits after each row's last token, (rows, vocab): left-padded with their own position
    ids, the head at the last position only when the model allows, the shared prefix run once."""
    return forward_last_tokens(model, rows, 1, pad_id).logits[:, -1]


@torch.no_grad()
def forward_last_tokens(model, rows: list[list[int]], own: int = 1, pad_id: int | None = None):
    """The model's output on token rows whose last `own` tokens are what the caller reads (the
    last `own` columns of every layer's input; the head at the last position only, when the model
    allows): left-padded with their own position ids, the tokens every row begins with run once."""
    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_padded(rows, pad_id))
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    shared = shared_prefix(model, ids, mask, pad_id, own)
    if shared is None:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **keep)
    ids, mask, cache = shared
    p = cache.get_seq_length()
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, p:]
    return model(input_ids=ids[:, p:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=True, **keep)


def left_padded(rows: list[list[int]], pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows as a left-padded batch: ids, attention mask and per-row position ids (0 at each
    row's first token)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@contextlib.contextmanager
def _first_logits(model, wanted: bool):
    """The last-position logits of the model's first forward inside the block (a generation's
    prefill: the next-token logits after each prompt), in a list that holds them afterwards."""
    first: list[torch.Tensor] = []
    if not wanted:
        yield first
        return

    def keep(module, args, output):
        if not first and getattr(output, "logits", None) is not None:
            first.append(output.logits[:, -1].detach())

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = base.register_forward_hook(keep)
    try:
        yield first
    finally:
        handle.remove()


def _attention(model) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None)


class FastHFLM(HFLM):
    """HFLM whose loglikelihood runs each context once, with the head at the scored positions only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._fast = self.backend == "causal" and keeps_logits(self.model)
        self.watch(set())

    def _encode_pair(self, context: str, continuation: str):
        key = (context, continuation)
        if key not in self._pairs:
            self._pairs[key] = super()._encode_pair(context, continuation)
        return self._pairs[key]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._fast or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        size = int(override_bs or self.batch_size)
        # Requests that fit the model share their context: it runs once, its choices after it.
        # Longer ones are cut from the left as lm-eval cuts them, each its own row.
        contexts: dict[tuple[int, ...], list[int]] = {}
        long = []
        for i, (_, context, continuation) in enumerate(requests):
            if len(context) + len(continuation) <= self.max_length + 1:
                contexts.setdefault(tuple(context), []).append(i)
            else:
                long.append(i)
        batch, cost = [], 0
        for context in sorted(contexts, key=len, reverse=True):  # similar lengths share a batch
            batch.append(context)
            cost += len({tuple(requests[i][2][:-1]) for i in contexts[context]})  # about the rows it adds
            if cost >= size:
                self._score_contexts(batch, contexts, requests, results)
                batch, cost = [], 0
        if batch:
            self._score_contexts(batch, contexts, requests, results)
        self._score_rows(long, requests, results, size)
        for (strings, _, _), answer in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def watch(self, rows: set[tuple[int, ...]]) -> None:
        """Keep the next-token logits after each of these prompts (token rows) when a generation
        runs it (`first_logits`, emptied here): the first step of generation computes exactly what
        the KL guard's forward would, so the guard reads them instead of running the prompts again."""
        self.keep_first, self.first_logits = set(rows), {}

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generation, the prompts' shared prefix run once (`shared_prefix`); the logits of
        its first step kept for the watched prompts."""
        mask = generation_kwargs.get("attention_mask")
        if self.backend != "causal" or mask is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        watched = {r: row for r in range(len(context)) if self.keep_first
                   and (row := tuple(context[r][mask[r].bool()].tolist())) in self.keep_first}
        with self._precision():
            shared = shared_prefix(self.model, context, mask, self.tokenizer.pad_token_id)
        if shared is not None:
            context, generation_kwargs["attention_mask"], generation_kwargs["past_key_values"] = shared
        with _first_logits(self.model, bool(watched)) as first:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        for r, row in watched.items() if first else ():
            self.first_logits[row] = first[0][r].float().cpu()
        return out

    def _precision(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    def _forward(self, **inputs):
        with torch.no_grad(), self._precision():
            return self.model(**{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()})

    def _score_contexts(self, batch: list[tuple[int, ...]], contexts: dict, requests, results: list) -> None:
        """Each context once, with the tokens all its choices begin with (a letter answer's space):
        the head at the positions after them scores every choice's shared start and next token.
        Choices that go on further (cloze answers) run after it on its cached keys and values."""
        shared = [common_prefix([requests[i][2][:-1] for i in contexts[context]]) for context in batch]
        ids, mask, positions = left_padded([list(context) + p for context, p in zip(batch, shared, strict=True)],
                                         self.tokenizer.pad_token_id)
        keep = max(map(len, shared)) + 1
        later = [(b, i) for b, context in enumerate(batch) for i in contexts[context]
                 if len(requests[i][2]) > len(shared[b]) + 1]
        with self._precision():
            front = shared_prefix(self.model, ids.to(self.device), mask.to(self.device), self.tokenizer.pad_token_id, keep)
        if front is None:
            out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                                use_cache=bool(later))
        else:  # the questions' common start (a chat template's system turn, a task's preamble) ran once
            ids, mask, prefix_cache = front
            ids, mask, p = ids.cpu(), mask.cpu(), prefix_cache.get_seq_length()
            out = self._forward(input_ids=ids[:, p:], attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, p:],
                                past_key_values=prefix_cache, logits_to_keep=keep, use_cache=True)
        head = F.log_softmax(out.logits[:, -keep:], dim=-1, dtype=self.softmax_dtype)  # [contexts, keep, vocab]
        rest, cache = None, out.past_key_values if later else None
        if later and cache is None:  # a forward that returns no cache (custom or patched code): a row per choice
            self._score_rows([i for _, i in later], requests, results, len(later))
            later = []
        if later:
            rows = torch.tensor([b for b, _ in later])
            cache.reorder_cache(rows.to(self.device))  # one copy of its context's cache per choice
            tails = [requests[i][2][len(shared[b]):-1] for b, i in later]
            width = max(map(len, tails))
            tail_ids = torch.tensor([t + [0] * (width - len(t)) for t in tails])
            tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails])
            lengths = mask.sum(1)[rows]
            out = self._forward(input_ids=tail_ids, attention_mask=torch.cat([mask[rows], tail_mask], dim=1),
                                position_ids=lengths[:, None] + torch.arange(width)[None, :],
                                past_key_values=cache, use_cache=True)
            rest = F.log_softmax(out.logits, dim=-1, dtype=self.softmax_dtype)  # [choices, width, vocab]
        row_of = {i: j for j, (_, i) in enumerate(later)}
        for b, context in enumerate(batch):
            start = keep - 1 - len(shared[b])  # this row's first scored position among the kept ones
            for i in (i for i in contexts[context] if results[i] is None):  # (not scored as rows above)
                continuation = requests[i][2]
                first = min(len(continuation), len(shared[b]) + 1)
                scores = head[b, start:start + first]
                if len(continuation) > first:
                    scores = torch.cat([scores, rest[row_of[i], : len(continuation) - first]])
                results[i] = self._answer(scores, continuation)

    def _score_rows(self, indices: list[int], requests, results: list, size: int) -> None:
        """Requests longer than the model: lm-eval's row, the context cut from the left, the head
        at the continuation's positions."""
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            keep = max(len(requests[i][2]) for i in chunk)
            ids, mask, positions = left_padded(rows, self.tokenizer.pad_token_id)
            logits = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
            scores = F.log_softmax(logits[:, -keep:], dim=-1, dtype=self.softmax_dtype)
            for i, row_scores in zip(chunk, scores, strict=True):
                results[i] = self._answer(row_scores[keep - len(requests[i][2]):], requests[i][2])

    @staticmethod
    def _answer(scores: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """(log-likelihood, greedy) of the continuation from its positions' log-probabilities."""
        tokens = torch.tensor(continuation, device=scores.device)
        return float(scores.gather(1, tokens[:, None]).sum()), bool((scores.argmax(-1) == tokens).all())


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The tokens every sequence begins with."""
    first = sequences[0]
    n = 0
    while n < len(first) and all(len(s) > n and s[n] == first[n] for s in sequences):
        n += 1
    return first[:n]


def compile_templates_once() -> None:
    """Make lm-eval's `apply_template` compile each template text once: the compiled template
    is a pure function of its text (same environment, same filters), so rendering is unchanged."""
    from lm_eval import utils

    if getattr(utils.apply_template, "compiles_once", False):
        return
    compiled = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.compiles_once = True
    utils.apply_template = apply_template


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
