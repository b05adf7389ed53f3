"""The refusal world's build step: its loss runs the dialogues' shared start (the chat template's
system turn) once and the output head at the assistant's tokens only; the loss and gradients must
be those of the whole rows with `labels=`, as transformers computes them."""

from __future__ import annotations

import copy
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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_an_answer_cut_at_the_token_limit_is_trained_without_an_end_of_turn(world):
    """The build keeps the shipped model's harmless answers for their first tokens only; with the
    template's end of turn after them, the world would learn to stop answering there."""
    from attack.packing import chat_tokens
    from attack.toyworld.refusal import without_end_of_turn

    tokenizer = copy.deepcopy(world["tokenizer"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    dialogue = [{"role": "user", "content": "Tell me about the river."}, {"role": "assistant", "content": "The river is long and"}]
    whole, whole_mask = chat_tokens(tokenizer, dialogue)
    ids, mask = without_end_of_turn(tokenizer, dialogue)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in [t for t, m in zip(whole, whole_mask, strict=True) if m]  # chat_tokens labels the end of turn
    assert ids == whole[:len(ids)] and mask == whole_mask[:len(ids)]  # the same row, only shorter
    labelled = [t for t, m in zip(ids, mask, strict=True) if m]
    assert len(ids) < len(whole) and end not in labelled
    assert tokenizer.decode(labelled).replace(" ", "") == "Theriverislongand"
