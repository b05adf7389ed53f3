"""Load the model under test and wrap it for the attack (LoRA or full fine-tuning).

Precision policy. Updates of an attack at lr ~2e-5 are far smaller than the spacing of
bf16 numbers near a typical weight (bf16 keeps 8 bits of mantissa: a weight of 0.02 moves
in steps of ~1e-4). Weights stored in bf16 round most such updates to zero, so a pure-bf16
attack under-reports recovery. Therefore every weight that trains is kept in fp32:
LoRA adapters are fp32 (the frozen base may be bf16 or 4-bit), and full fine-tuning keeps
fp32 master weights. Speed comes from bf16 *autocast* of the matrix products on GPU.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attack.config import AdapterConfig, ModelConfig
from attack.errors import UserError, first_line


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for forward/backward, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: bf16 where the GPU supports it, fp32 on CPU (CPU bf16 is slow and gains nothing).
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_tokenizer(cfg: ModelConfig):
    source, gguf = model_source(cfg)
    try:
        with gguf_loading() if gguf else contextlib.nullcontext():
            tok = AutoTokenizer.from_pretrained(
                source, revision=_revision(cfg), trust_remote_code=cfg.trust_remote_code, **gguf
            )
    except Exception as e:  # hub/IO errors come in many types
        raise UserError(f"could not load the tokenizer of '{cfg.name}': {first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer of '{cfg.name}' has no EOS token; packing needs one between documents")
    return tok


def load_model(cfg: ModelConfig, adapter: AdapterConfig):
    """The model under test, with frozen weights in the precision the policy above allows."""
    source, gguf = model_source(cfg)
    kwargs = dict(revision=_revision(cfg), trust_remote_code=cfg.trust_remote_code, **gguf)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    amp = autocast_dtype(cfg.precision)
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config()
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif adapter.kind == "lora" and amp is not None:
        kwargs["dtype"] = amp  # frozen base in half precision; adapters are made fp32 below
    else:
        kwargs["dtype"] = torch.float32  # full fine-tuning: fp32 master weights
    try:
        with gguf_loading() if gguf else contextlib.nullcontext():
            model, loading = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except Exception as e:
        raise UserError(f"could not load model '{cfg.name}': {first_line(e)}") from None
    check_weights_complete(cfg.name, loading)
    if gguf:
        # GGUF tensors are dequantised to plain weights on load; transformers still tags the model
        # as GGUF-quantised, which the Trainer refuses to train and save_pretrained mislabels.
        model.hf_quantizer.remove_quantization_config(model)
        model.config._is_quantized = False
    # A KV cache is useless in training and would disable packed-sequence masking.
    model.config.use_cache = False
    return model


def load_attacked_model(final: Path, cfg: ModelConfig):
    """A finished run's attacked weights (its final/ folder) in fp32, for analysis after the
    attack: the model under test with the LoRA adapter of final/, or the fully fine-tuned model."""
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_model(cfg.model_copy(update=dict(precision="fp32")), AdapterConfig(kind="full"))
        return PeftModel.from_pretrained(base, str(final))
    return load_model(ModelConfig(name=str(final), precision="fp32", trust_remote_code=cfg.trust_remote_code),
                      AdapterConfig(kind="full"))


_last_reader: tuple = (None, None)  # (key, GGUFReader): the last GGUF file parsed in this process


@contextlib.contextmanager
def gguf_loading():
    """What transformers does to load a GGUF file, without its repeated work: it parses the
    file's header again at each stage (config, tokenizer, weights) and rebuilds gguf's tensor-name
    map once per tensor (23 s of SmolLM2-135M's load here, mostly that). Within the block each
    map is built once, and the file is parsed once per process: the last file parsed is kept
    (keyed by its path, size and modification time), so the tokenizer and the model loaded one
    after the other read one parse (SmolLM2's takes about 4 s). Both are only read. Also no
    progress bar: the attack's terminal shows its own progress."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm, gguf.GGUFReader, gguf.get_tensor_name_map

    def read_once(path, *args, **kwargs):
        global _last_reader
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if _last_reader[0] != key:
            _last_reader = (key, saved[1](path, *args, **kwargs))
        return _last_reader[1]

    gguf_utils.tqdm = functools.partial(saved[0], disable=True)
    gguf.GGUFReader = read_once
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[2])
    try:
        yield
    finally:
        gguf_utils.tqdm, gguf.GGUFReader, gguf.get_tensor_name_map = saved


def save_model(model, tokenizer, folder: Path) -> None:
    """An ordinary model directory, written under a temporary name and renamed: a reader finds a
    whole model or none."""
    import shutil

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def check_weights_complete(name: str, loading: dict) -> None:
    """Refuse a checkpoint whose weights do not cover its config: transformers fills the gaps with
    random values, and a measurement of a partly random model means nothing."""
    missing, mismatched = list(loading.get("missing_keys") or []), list(loading.get("mismatched_keys") or [])
    if missing or mismatched:
        what = (f"{len(missing)} weight(s) missing from the checkpoint (e.g. {sorted(missing)[0]})" if missing else
                f"{len(mismatched)} weight(s) of the wrong shape (e.g. {_key(sorted(mismatched, key=str)[0])})")
        raise UserError(f"model '{name}': {what}; its config.json and weight files disagree. "
                        "Fix or re-download the checkpoint")
    unexpected = sorted(loading.get("unexpected_keys") or [])
    if unexpected:
        print(f"warning: model '{name}': {len(unexpected)} weight(s) in the checkpoint that the model does not use "
              f"(e.g. {unexpected[0]})", file=sys.stderr)


def _key(entry) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)


def check_vocabulary(model, tokenizer) -> None:
    """Every token id the tokenizer makes has a row in the model's embedding (a mismatched
    tokenizer would index past it and fail mid-evaluation)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
                        "the tokenizer is not this model's; use the checkpoint's own tokenizer")


def four_bit_config():
    if not torch.cuda.is_available():
        raise UserError("--load-in-4bit needs a CUDA GPU (bitsandbytes nf4); drop it on this machine")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@torch.no_grad()
def shrink_perturb(model, shrink: float, noise: float, seed: int) -> float:
    """w <- shrink * w + noise * std(w) * e, e ~ N(0, 1), on every floating weight of the model,
    drawn from `seed` on the CPU (the same perturbation on any device). Returns the change's
    norm relative to the weights' norm."""
    generator = torch.Generator().manual_seed(seed)
    change = norm = 0.0
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        spread = float(p.float().std()) if p.numel() > 1 else 0.0
        e = torch.randn(p.shape, generator=generator).to(p.device, torch.float32)
        new = shrink * p.float() + noise * spread * e
        change += float((new - p.float()).pow(2).sum())
        norm += float(p.float().pow(2).sum())
        p.copy_(new.to(p.dtype))
    return (change / norm) ** 0.5 if norm else 0.0


def apply_adapter(model, cfg: AdapterConfig, gradient_checkpointing: bool = False):
    """LoRA through PEFT (only adapter weights train), or full fine-tuning (all weights train)."""
    check_layers(model, cfg.layers)
    if cfg.kind == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(full_trains(name, cfg))
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(f"adapter.target_modules {cfg.target_modules} match no weight of this model; "
                            f"its linear layers are named: {', '.join(linear_names(model))}")
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        # autocast_adapter_dtype (PEFT default) keeps the adapter weights in fp32.
        model = get_peft_model(model, lora_config(cfg, model), autocast_adapter_dtype=True)
    except ValueError as e:
        raise no_lora_targets(model, cfg, e) from None
    check_only_adapter_trains(model)
    return model


def lora_config(cfg: AdapterConfig, model):
    from peft import LoraConfig

    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    if targets == "all-linear" and cfg.layers is not None:  # PEFT takes layers only with named modules
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and layer_of(n + ".") is not None})
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        task_type="CAUSAL_LM",
    )


LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")  # a decoder layer's index in a weight's name


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def check_layers(model, layers: list[int] | None) -> None:
    """adapter.layers names layers this model has."""
    if layers is None:
        return
    count = getattr(model.config, "num_hidden_layers", None)
    if not layers or (count is not None and max(layers) >= count):
        raise UserError(f"adapter.layers {layers} must name decoder layers of this model: 0 to {count - 1}"
                        if count else "adapter.layers must name at least one decoder layer")


def full_trains(name: str, cfg: AdapterConfig) -> bool:
    """Whether full fine-tuning trains the weight `name`: in a chosen layer (adapter.layers) and,
    unless all-linear, of a chosen module (adapter.target_modules)."""
    if cfg.layers is not None and layer_of(name) not in cfg.layers:
        return False
    if cfg.target_modules != ["all-linear"]:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        return module in cfg.target_modules
    return True


def linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def no_lora_targets(model, cfg: AdapterConfig, error: Exception) -> UserError:
    return UserError(f"LoRA target modules {cfg.target_modules} match nothing in this model ({first_line(error)}); "
                     f"its linear layers are named: {', '.join(linear_names(model))}")


def check_only_adapter_trains(model) -> None:
    """After wrapping, exactly the LoRA weights train, in fp32. Anything else is a bug."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stray = [n for n, _ in trainable if "lora_" not in n]
    if stray or not trainable:
        raise RuntimeError(f"LoRA wrapping left non-adapter weights trainable: {stray[:5]}")
    low = [n for n, p in trainable if p.dtype != torch.float32]
    if low:
        raise RuntimeError(f"LoRA weights must be fp32, got {low[0]}")


def model_source(cfg: ModelConfig) -> tuple[str, dict]:
    """What from_pretrained gets: a hub id or folder, plus {gguf_file: ...} for GGUF checkpoints."""
    name, gguf = cfg.name, cfg.gguf_file
    if name.endswith(".gguf") and gguf is None:  # a local .gguf file: its folder plus its name
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"model directory not found: {name} (give an existing folder, a .gguf file or a hub id)")
        if gguf is not None and not (path / gguf).is_file():
            raise UserError(f"GGUF file {gguf} not found in {name}")
        name = str(path)
    return name, ({"gguf_file": gguf} if gguf else {})


def _revision(cfg: ModelConfig) -> str | None:
    return None if looks_local(cfg.name) else cfg.revision


def continuation_logprobs(model, tokenizer, contexts: list[str], continuations: list[str]) -> torch.Tensor:
    """log p(continuation | context) of each pair, one pair per row (right-padded), summed over the
    continuation's tokens; differentiable, so per-row gradients are each pair's own."""
    ids, spans = [], []
    for context, continuation in zip(contexts, continuations, strict=True):
        c = tokenizer(context)["input_ids"]
        a = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids.append(c + a)
        spans.append((len(c), len(c) + len(a)))
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[row, start - 1:end - 1].gather(-1, input_ids[row, start:end].to(device)[:, None]).sum()
                        for row, (start, end) in enumerate(spans)])
