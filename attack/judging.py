"""The judge a run's config names (eval.judge), for the `complied` metric and the GRPO reward of
that name; its verdicts are cached in the run directory (judge.jsonl)."""

from __future__ import annotations

from pathlib import Path

from attack.config.sections import JudgeConfig
from attack.errors import UserError
from eval_callbacks.judges import EndpointJudge, ModelJudge, SubstringJudge


def make_judge(cfg: JudgeConfig, cache_file: Path | None, device=None):
    if cfg.kind == "substring":
        return SubstringJudge()
    if cfg.kind == "endpoint":
        if not cfg.base_url or not cfg.model:
            raise UserError("eval.judge.kind endpoint needs eval.judge.base_url (e.g. http://localhost:8000/v1) and "
                            "eval.judge.model (the name the server serves)")
        return EndpointJudge(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                             cache_file=cache_file, retries=cfg.retries,
                             classifier=cfg.classifier)
    if not cfg.model:
        raise UserError("eval.judge.kind model needs eval.judge.model: a local folder or hub id of a causal LM")
    from attack.config import AdapterConfig, ModelConfig
    from attack.model import load_model, load_tokenizer

    source = ModelConfig(name=cfg.model)
    model = load_model(source, AdapterConfig(kind="lora")).eval().requires_grad_(False)
    if device is not None:
        model = model.to(device)
    return ModelJudge(model, load_tokenizer(source), cfg.model, cache_file=cache_file, retries=cfg.retries,
                             classifier=cfg.classifier)
