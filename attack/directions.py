"""Directions in the residual stream: their means from plain forward hooks, their ablation by
hooks, and the same ablation baked into the weights (orthogonalization).

The residual stream is the sum of what its writers add: the input embedding, and per decoder
layer the attention output projection and the MLP down projection. Removing a unit direction r
from every writer's output, out <- out - a (out . r) r, scales the stream's component along r by
(1 - a) at every layer. The weight form does the same without hooks: W <- W - a r r^T W for each
writing matrix, b <- b - a (b . r) r for its bias (GPT-NeoX has them), E <- E - a E r r^T for
the embedding rows. Both are exact at any strength a, so the edited model equals the hooked one.
"""

from __future__ import annotations

import contextlib

import torch

from attack.errors import UserError

# The modules of each decoder layer that add to the residual stream, per architecture. Only
# architectures whose writers add their output to the stream unchanged: a norm after the
# writer (Gemma 2/3, OLMo 2) would rescale the stream along r again.
WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def residual_writers(model) -> list[torch.nn.Module]:
    """The input embedding, then every layer's writers, in order."""
    kind = model.config.model_type
    if kind not in WRITERS:
        raise UserError(f"directional ablation does not know the residual writers of '{kind}' models; "
                        f"supported: {', '.join(WRITERS)}")
    writers = [model.get_input_embeddings()]
    for layer in decoder_layers(model):
        writers += [layer.get_submodule(name) for name in WRITERS[kind]]
    return writers


def _project_out(x: torch.Tensor, r: torch.Tensor, strength: float) -> torch.Tensor:
    r = r.to(x.dtype)
    return x - strength * (x @ r).unsqueeze(-1) * r


@contextlib.contextmanager
def ablated(model, direction: torch.Tensor, strength: float = 1.0):
    """Inside this block, every residual writer's output loses `strength` of its component along
    the unit vector `direction`."""
    r = direction.to(next(model.parameters()).device)

    def hook(module, args, output):
        return _project_out(output, r, strength)

    handles = [m.register_forward_hook(hook) for m in residual_writers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def orthogonalize(model, direction: torch.Tensor, strength: float = 1.0) -> None:
    """Edit the weights in place so the model writes (1 - strength) of its former component along
    `direction` to the residual stream: the weight form of `ablated`. Computed in float64. Tied
    input and output embeddings are untied first, so the unembedding stays as it was."""
    untie_embeddings(model)
    r = direction.double()
    embedding, *linears = residual_writers(model)
    w = embedding.weight
    e = w.double()
    w.copy_(e - strength * torch.outer(e @ r.to(w.device), r.to(w.device)))
    for linear in linears:
        w = linear.weight  # (hidden, in): the output is W x + b
        rr = r.to(w.device)
        w.copy_(w.double() - strength * torch.outer(rr, rr @ w.double()))
        if linear.bias is not None:
            b = linear.bias.double()
            linear.bias.copy_(b - strength * (b @ rr) * rr)


def untie_embeddings(model) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config()
        if text is not model.config:
            text.tie_word_embeddings = False


@torch.no_grad()
def mean_activations(model, batches, positions: str | int = "all", upto: int | None = None) -> torch.Tensor:
    """Mean of the residual stream entering each decoder layer, (layers, hidden) or, for
    positions=k > 0, (k, layers, hidden) over the last k tokens of each sequence (the
    post-instruction tokens of a chat prompt). "all" averages every real token but the first
    (its attention-sink activations dwarf the rest in real models). Accumulated in float64.
    upto: the deepest layer wanted; the forward stops once it has entered that layer (the
    layers after it, the candidates never read them, are not run) and the means are of layers
    0 to upto.

    `batches` yields dicts with input_ids and attention_mask, right-padded."""
    from eval_callbacks.fastlm import forward_last_tokens, keeps_logits

    layers = decoder_layers(model)[:None if upto is None else upto + 1]
    captured: list[torch.Tensor | None] = [None] * len(layers)
    rows = 0  # the batch's own forward has this many rows (a shared prefix runs before it on one)

    def capture(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            # left-padded rows: their last k tokens are the last k columns; only those are kept
            captured[i] = h if positions == "all" else h[:, -positions:].detach().clone()
            if i == upto and h.shape[0] == rows:
                raise _Entered
        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    total, count = None, 0
    device = next(model.parameters()).device
    head = {"logits_to_keep": 1} if keeps_logits(model) else {}  # the means need no logits
    try:
        for batch in batches:
            mask = batch["attention_mask"].to(device)
            rows = len(mask)
            if positions == "all":
                with contextlib.suppress(_Entered):
                    model(input_ids=batch["input_ids"].to(device), attention_mask=mask, **head)
                h = torch.stack([c.double() for c in captured])  # (layers, batch, seq, hidden)
                keep = mask.clone().double()
                keep[:, 0] = 0
                part = torch.einsum("lbsh,bs->lh", h, keep)
                n = int(keep.sum())
            else:
                # the last k tokens only: left-padded, the prompts' shared start (a chat template's
                # system turn) run once, those tokens the last k columns of every layer's input
                with contextlib.suppress(_Entered):
                    forward_last_tokens(model, _rows(batch), positions)
                h = torch.stack([c.double() for c in captured])  # (layers, batch, k, hidden)
                part = h.sum(1).transpose(0, 1)  # (k, layers, hidden)
                n = h.shape[1]
            total = part if total is None else total + part
            count += n
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise UserError("no tokens to average: the texts given for the directions are empty")
    return total / count


class _Entered(Exception):
    """Raised in the deepest wanted layer's hook: the forward has given every mean it needs."""


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v / v.norm().clamp_min(1e-12)


def random_direction(hidden: int, seed: int) -> torch.Tensor:
    """A uniformly random unit direction: the control that no particular direction is needed."""
    g = torch.Generator().manual_seed(seed)
    return unit(torch.randn(hidden, generator=g, dtype=torch.float64))


@torch.no_grad()
def last_token_logits(model, batch: dict) -> torch.Tensor:
    """The logits after each text's last token, (batch, vocab), from a right-padded batch: the head
    at one position per text, the tokens every text begins with (a chat template's system turn)
    run once (eval_callbacks.fastlm.last_token_logits)."""
    from eval_callbacks.fastlm import last_token_logits as last_logits

    return last_logits(model, _rows(batch))


def _rows(batch: dict) -> list[list[int]]:
    """A right-padded batch's token rows without their padding."""
    return [ids[:int(n)].tolist() for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(1), strict=True)]


@torch.no_grad()
def next_token_logprobs(model, batches, last_only: bool = False) -> list[torch.Tensor]:
    """Per batch, float64 log-probabilities of the next token: at every position (batch, seq, vocab),
    or (last_only) at each text's last token only (batch, vocab). Right-padded batches."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        if last_only:
            logits = last_token_logits(model, batch)
        else:
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        out.append(torch.log_softmax(logits.double(), -1))
    return out


@torch.no_grad()
def next_token_kl(model, batches, direction: torch.Tensor, strength: float = 1.0, last_only: bool = False,
                  base: list[torch.Tensor] | None = None) -> float:
    """Mean KL(unmodified || ablated) of the next-token distributions over every real token, or
    (last_only) at the last token of each text only: the first answer token after a chat prompt,
    as the refusal-direction reference code measures it on harmless instructions. `base`: the
    unmodified model's `next_token_logprobs` on the same batches, when already at hand (it does not
    change from one candidate direction to the next)."""
    base = base if base is not None else next_token_logprobs(model, batches, last_only)
    with ablated(model, direction, strength):
        edited = next_token_logprobs(model, batches, last_only)
    total, count = 0.0, 0
    for batch, b, e in zip(batches, base, edited, strict=True):
        kl = (b.exp() * (b - e)).sum(-1)  # (batch, seq) or (batch,)
        keep = torch.ones_like(kl) if last_only else batch["attention_mask"].to(kl.device).double()
        total += float((kl * keep).sum())
        count += int(keep.sum())
    return total / max(count, 1)


def text_batches(tokenizer, texts: list[str], max_length: int, batch_size: int = 8, special: bool = True) -> list[dict]:
    """Right-padded batches of tokenized texts, cut at max_length tokens (the end is kept, where
    a prompt's post-instruction tokens are). `special`: let the tokenizer add its BOS/EOS
    (not for text a chat template already wrapped)."""
    side, cut = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    try:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=special)
            out.append(dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
        return out
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
