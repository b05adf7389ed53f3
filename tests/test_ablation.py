"""Directional ablation: the weight edit equals hook ablation, the stream loses the direction."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from attack.directions import ablated, decoder_layers, mean_activations, orthogonalize, random_direction, text_batches


def _with_biases(model):
    """Random non-zero biases on every linear layer that has one (GPT-NeoX's writers do), and
    tied embeddings where the architecture allows: both are what the edit must get right."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def _residuals(model, ids):
    """The residual stream entering each layer, and leaving the last one (before the final norm)."""
    out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("arch", ["llama", "neox"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_weight_edit_equals_hook_ablation(arch, strength, llama_dir, neox_dir, world):
    path = llama_dir if arch == "llama" else neox_dir
    model = _with_biases(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)).eval()
    if arch == "llama":  # tied input/output embeddings: editing one must not edit the other
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    r = random_direction(model.config.hidden_size, seed=3).float()
    ids = torch.tensor([world["tokenizer"]("The creature Zorbl lives in the marsh. Question: what")["input_ids"]])
    with torch.no_grad(), ablated(model, r, strength):
        hooked = model(input_ids=ids).logits
    edited = copy.deepcopy(model)
    orthogonalize(edited, r, strength)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        after = edited(input_ids=ids).logits
    assert (after - plain).abs().max() > 1e-3  # the edit changed the model
    torch.testing.assert_close(after, hooked, atol=1e-4, rtol=0)
    if strength == 1.0:  # the stream holds nothing along r at any layer
        with torch.no_grad():
            if arch == "neox":  # the biases were edited too, not only the matrices
                bias = decoder_layers(edited)[0].attention.dense.bias
                assert abs(float(bias @ r)) < 1e-5 * float(bias.norm())
            for h in _residuals(edited, ids)[:-1]:
                assert float((h @ r).abs().max()) < 1e-4 * float(h.norm(dim=-1).max())
    # the original's unembedding is untouched: ablating nothing gives the original logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain)


def test_mean_activations_of_last_positions(llama_dir, world):
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    texts = ["The creature Zorbl lives in the marsh.", "Boats sail."]
    batches = text_batches(world["tokenizer"], texts, max_length=32)
    last = mean_activations(model, batches, positions=1)[0]  # (layers, hidden)
    # the same means, one text at a time, without padding
    by_hand = 0
    for t in texts:
        ids = torch.tensor([world["tokenizer"](t)["input_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        by_hand = by_hand + torch.stack([h[0, -1].double() for h in hs[:-1]])
    torch.testing.assert_close(last, by_hand / 2, atol=1e-5, rtol=1e-5)
