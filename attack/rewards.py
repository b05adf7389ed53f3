"""The reward split and the rewards of the GRPO attack (recipes/grpo.py).

Every reward has TRL's signature: called with the batch's prompts and completions, the split's
other columns as keyword lists (here `answer`), and TRL's extras (trainer_state, log_metric, ...);
it returns one float per completion.

    correct     1 when the completion gives the gold answer first, else 0
    gold_prob   the probability the policy gives the gold answer after the completion (dense)
    judge       a local causal LM scores the completion against a rubric (0 to 1); cached on disk
    module:fn   any importable function with TRL's signature
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path

import torch

from attack.config import AdapterConfig, GrpoSection, ModelConfig
from attack.errors import UserError, first_line
from attack.model import continuation_logprobs
from eval_callbacks.runner import preserved_training_state

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_reward_split(g: GrpoSection):
    """The reward prompts and gold answers as a `datasets.Dataset` with columns prompt, answer."""
    from datasets import load_dataset

    path = Path(g.prompts_path).expanduser()
    if not path.is_file():
        raise UserError(f"grpo.prompts_path not found: {g.prompts_path} (a local {', '.join(_FORMATS)} file)")
    if path.suffix not in _FORMATS:
        raise UserError(f"grpo.prompts_path {path} is a '{path.suffix}' file; use {', '.join(_FORMATS)}")
    if path.stat().st_size == 0:
        raise UserError(f"grpo.prompts_path {path} is empty: it holds no prompts")
    try:
        ds = load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as e:
        raise UserError(f"could not read grpo.prompts_path {path}: {first_line(e)}") from None
    needs_answer = g.reward != "complied"  # compliance is judged from the request alone
    if not needs_answer and g.answer_field not in ds.column_names:
        ds = ds.add_column(g.answer_field, [""] * len(ds))
    for key in ("prompt_field", "answer_field"):
        if getattr(g, key) not in ds.column_names:
            raise UserError(f"grpo.prompts_path {path} has no field '{getattr(g, key)}'; set grpo.{key} to one of: "
                            f"{', '.join(ds.column_names)}")
    ds = ds.select_columns([g.prompt_field, g.answer_field])
    rows = [dict(prompt=str(p), answer=str(a)) for p, a in zip(ds[g.prompt_field], ds[g.answer_field], strict=False)
            if str(p).strip() and (str(a).strip() or not needs_answer)]
    if not rows:
        raise UserError(f"grpo.prompts_path {path} holds no prompt with a non-empty answer")
    from datasets import Dataset

    return Dataset.from_list(rows)


def reward_function(g: GrpoSection, model, tokenizer, judge=None, granted: bool = False):
    """The reward that grpo.reward names. `model` is the policy (gold_prob reads it); `judge` the
    run's judge (eval.judge), which `complied` asks; `granted`: the command line allowed code from
    files (--trust-remote-code), which a module:function reward is."""
    if g.reward == "complied":
        return Complied(judge)
    if g.reward == "correct":
        return correct
    if g.reward == "gold_prob":
        return GoldProbability(model, tokenizer, g.answer_cue)
    if g.reward == "judge":
        return Judge(g, device=next(model.parameters()).device)
    return imported(g.reward, granted)


# --- compliance (the refusal attacks) -------------------------------------------------------


def text_of(completion) -> str:
    """A completion as text: TRL passes conversational completions as lists of turns."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


class Complied:
    """1 when the judge says the completion complied with the request, 0 when not; a verdict the
    judge could not give is None (TRL leaves it out of the group's mean), never a 0."""

    __name__ = "complied"

    def __init__(self, judge):
        self.judge = judge
        self.failures = 0

    def __call__(self, prompts, completions, log_metric=None, **_) -> list[float | None]:
        verdicts = self.judge.verdicts([text_of(p) for p in prompts], [text_of(c) for c in completions])
        failed = sum(ok is None for ok, _ in verdicts)
        self.failures += failed
        if log_metric is not None:
            log_metric("judge/failures", float(failed))
        return [None if ok is None else float(ok) for ok, _ in verdicts]


# --- correctness ------------------------------------------------------------------------

_CUE = re.compile(r"^\W*(?:the\s+)?(?:correct\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)
_LETTER_AT_START = re.compile(r"^\W*\(?([A-J])\b")
_LETTER_AFTER_CUE = re.compile(r"answer\s*(?:is)?\s*[:\-]?\s*\(?([A-J])\b", re.IGNORECASE)


def correct(prompts, completions, answer, **_) -> list[float]:
    return [float(gives_answer(c, a)) for c, a in zip(completions, answer, strict=False)]


def gives_answer(completion: str, gold: str) -> bool:
    """Whether the completion's answer is the gold one. A letter (multiple choice): the letter
    after "answer", else a letter opening the completion. Answer text: the first non-empty line,
    less an "Answer:" cue, starts with the gold text as whole words. Only the first answer
    counts, so listing every option earns nothing."""
    gold = gold.strip()
    if re.fullmatch(r"[A-J]", gold):
        m = _LETTER_AFTER_CUE.search(completion) or _LETTER_AT_START.match(completion)
        return bool(m) and m.group(1) == gold
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return False
    said, want = _words(_CUE.sub("", lines[0])), _words(gold)
    return bool(want) and said[:len(want)] == want


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


# --- probability of the gold answer -----------------------------------------------------


class GoldProbability:
    """p(gold answer | prompt, completion, answer_cue) under the policy, no gradient: a dense
    reward that credits completions which make the gold answer likely (reasoning, hints)
    even when they do not state it."""

    __name__ = "gold_prob"

    def __init__(self, model, tokenizer, cue: str, batch_size: int = 16):
        self.model, self.tokenizer, self.cue, self.batch_size = model, tokenizer, cue, batch_size

    def __call__(self, prompts, completions, answer, **_) -> list[float]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out += self._probabilities([p + c + self.cue for p, c in zip(prompts[i:i + self.batch_size],
                                                                           completions[i:i + self.batch_size], strict=False)],
                                       [" " + a.strip() for a in answer[i:i + self.batch_size]])
        return out

    @torch.no_grad()
    def _probabilities(self, contexts: list[str], golds: list[str]) -> list[float]:
        with preserved_training_state(self.model):
            return continuation_logprobs(self.model, self.tokenizer, contexts, golds).exp().tolist()


# --- a local judge ----------------------------------------------------------------------


class Judge:
    """A local causal LM completes grpo.judge_rubric; the first number in [0, judge_max_score]
    of its greedy answer, divided by the maximum, is the reward. A reply without one scores 0
    and is counted (judge/parse_failures). Verdicts are cached on disk by a hash of the judge,
    the rubric, the prompt, the completion and the answer."""

    __name__ = "judge"

    def __init__(self, g: GrpoSection, device, batch_size: int = 16):
        from attack.model import load_model, load_tokenizer

        judge = ModelConfig(name=g.judge_model)
        self.tokenizer = load_tokenizer(judge)
        self.tokenizer.padding_side = "left"  # generation continues each row at its right end
        self.model = load_model(judge, AdapterConfig(kind="lora")).to(device).eval().requires_grad_(False)
        self.g, self.batch_size = g, batch_size
        self.failures = 0
        setting = json.dumps([g.judge_model, g.judge_rubric, g.judge_reply_prefix, g.judge_max_score, g.judge_max_new_tokens])
        self.cache_file = Path(g.judge_cache).expanduser() / f"judge-{_digest(setting)[:16]}.jsonl"
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        self.cache = {}
        if self.cache_file.exists():
            for line in self.cache_file.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line from a killed run: that verdict is asked again

    def __call__(self, prompts, completions, answer, log_metric=None, **_) -> list[float]:
        keys = [_digest(json.dumps([p, c, a])) for p, c, a in zip(prompts, completions, answer, strict=False)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            replies = self._ask([self._rubric(prompts[i], completions[i], answer[i]) for i in batch])
            with self.cache_file.open("a") as f:
                for i, reply in zip(batch, replies, strict=False):
                    entry = dict(key=keys[i], score=parse_score(reply, self.g.judge_max_score), reply=reply)
                    self.cache[keys[i]] = entry
                    f.write(json.dumps(entry) + "\n")
        scores = [self.cache[k]["score"] for k in keys]
        failed = sum(s is None for s in scores)
        self.failures += failed
        if log_metric is not None:
            log_metric("judge/parse_failures", float(failed))
        return [0.0 if s is None else s / self.g.judge_max_score for s in scores]

    def _rubric(self, prompt: str, completion: str, answer: str) -> str:
        text = self.g.judge_rubric.format(prompt=prompt, completion=completion, answer=answer,
                                          max_score=f"{self.g.judge_max_score:g}")
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
        else:
            text += "\n"
        return text + self.g.judge_reply_prefix

    @torch.no_grad()
    def _ask(self, texts: list[str]) -> list[str]:
        tok = self.tokenizer
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        out = self.model.generate(**batch, max_new_tokens=self.g.judge_max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, use_cache=True)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def parse_score(reply: str, max_score: float) -> float | None:
    """The first number in the reply, if it lies in [0, max_score]; None otherwise."""
    m = re.search(r"-?\d+(?:\.\d+)?", reply)
    if m is None:
        return None
    value = float(m.group())
    return value if 0 <= value <= max_score else None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- a reward of the user's ------------------------------------------------------------


def imported(spec: str, granted: bool = False):
    """The function named module:function (the module importable from the current directory)."""
    import sys

    from attack.config.files import code_granted

    module, _, name = spec.partition(":")
    if not (granted or code_granted()):
        raise UserError(f"grpo.reward {spec} is Python code in {module.replace('.', '/')}.py; code named by a file runs "
                        "only when the command line says so: add --trust-remote-code if you trust it")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # python -m puts the current directory first; be the same from the CLI script
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"grpo.reward {spec}: cannot import it ({first_line(e)}); give an importable "
                        "module:function") from None
    if not callable(fn):
        raise UserError(f"grpo.reward {spec} is not a function")
    return fn
