"""The refusal world's build step: its loss runs the dialogues' shared start (the chat template's
system turn) once and the output head at the assistant's tokens only; the loss and gradients must
be those of the whole rows with `labels=`, as transformers computes them."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attack.toyworld.refusal import dialogue_loss


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def _dialogues(shared: int):
    """Rows that begin with the same `shared` tokens, of different lengths, the assistant's tokens
    at the end of each (the loss mask), as chat_tokens gives them."""
    rng = random.Random(1)
    start = [rng.randrange(1, 97) for _ in range(shared)]
    rows = []
    for n, answer in ((9, 4), (14, 7), (6, 3), (11, 9)):
        ids = start + [rng.randrange(1, 97) for _ in range(n + answer)]
        rows.append((ids, [0] * (shared + n) + [1] * answer))
    return rows


def _stock_loss(model, batch, pad):
    width = max(len(i) for i, _ in batch)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([[t if m else -100 for t, m in zip(i, k, strict=True)] + [-100] * (width - len(i)) for i, k in batch])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
    return model(input_ids=ids, attention_mask=attention, labels=labels).loss


@pytest.mark.parametrize("shared", [0, 5])
def test_the_builds_loss_and_gradients_equal_whole_rows(shared):
    model = _model()
    batch = _dialogues(6)  # six tokens in common; the loss may share five of them, or none
    expected = _stock_loss(model, batch, pad=0)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = dialogue_loss(model, batch, shared, pad=0)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
