"""Quantization as an attack (kind: quantize): what the weights become when the model under test
is stored in 4-bit NF4, 8-bit, fp16 or bf16. Zhang et al. 2024 and OpenUnlearning found that
quantization alone can bring back much "unlearned" knowledge: an unlearning update smaller than
the quantization step is rounded away.

nf4 and int8 replace every linear weight of the decoder (not the output head, which
bitsandbytes leaves in full precision too) by its round-to-nearest dequantized value:
- nf4: blocks of 64 consecutive weights, each scaled by its absolute maximum to [-1, 1] and
  rounded to the nearest of the 16 NF4 levels (QLoRA's normal-float code), without double
  quantization of the scales: bitsandbytes' quantize_4bit(blocksize=64, quant_type="nf4");
- int8: each output row scaled by its absolute maximum to [-127, 127] and rounded (the weight
  half of LLM.int8(): bitsandbytes' int8_vectorwise_quant).
On a GPU with bitsandbytes the library quantizes; elsewhere the simulation below does, and gives
the same dequantized weights (tests/test_adversaries.py compares them where both run).
fp16 and bf16 cast the whole model, so it also computes in that precision.
"""

from __future__ import annotations

import importlib.util

import torch

# QLoRA's NF4 levels (Dettmers et al. 2023): quantiles of a standard normal, rescaled to [-1, 1]
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
BLOCK = 64


def nf4_round_trip(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The weight after NF4 quantization and dequantization, in fp32 (the simulation)."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)  # zero padding: no block's maximum moves
    absmax = blocks.abs().max(dim=1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    code = torch.tensor(NF4, device=flat.device)
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)  # nearest level: between midpoints
    return (code[index] * absmax[:, None]).reshape(-1)[:n].reshape(weight.shape)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight after row-wise absmax int8 quantization and dequantization, in fp32."""
    w = weight.detach().float()
    absmax = w.abs().max(dim=1).values
    q = torch.round(w * (127.0 / absmax[:, None])).to(torch.int8)
    return q * absmax[:, None] * 7.874015718698502e-3  # x 1/127 as a float32 product, as bitsandbytes does


def _bitsandbytes_round_trip(weight: torch.Tensor, method: str) -> torch.Tensor:
    import bitsandbytes.functional as bnb

    if method == "nf4":
        packed, state = bnb.quantize_4bit(weight.detach().float(), blocksize=BLOCK, quant_type="nf4")
        return bnb.dequantize_4bit(packed, state).float()
    q, stats, _ = bnb.int8_vectorwise_quant(weight.detach().float())
    return bnb.int8_vectorwise_dequant(q, stats)


def round_trip(weight: torch.Tensor, method: str, library: bool) -> torch.Tensor:
    if library:
        return _bitsandbytes_round_trip(weight, method)
    return nf4_round_trip(weight) if method == "nf4" else int8_round_trip(weight)


def quantized_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers bitsandbytes would quantize: all but the output head."""
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


@torch.no_grad()
def quantize_model(model, method: str):
    """Quantize the model's weights in place (nf4, int8: dequantized values in the weights'
    dtype; fp16, bf16: the model cast). Returns the model and what was done, with the change's
    norm relative to the quantized weights' norm."""
    change = norm = 0.0
    if method in ("fp16", "bf16"):
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        for p in model.parameters():
            change += float((p.to(dtype).float() - p.float()).pow(2).sum())
            norm += float(p.float().pow(2).sum())
        model = model.to(dtype)
        count, backend = sum(1 for _ in model.parameters()), "torch cast"
    else:
        layers = quantized_linears(model)
        device = next(model.parameters()).device
        library = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
        for _, module in layers:
            new = round_trip(module.weight, method, library).to(module.weight.dtype)
            change += float((new.float() - module.weight.float()).pow(2).sum())
            norm += float(module.weight.float().pow(2).sum())
            module.weight.copy_(new)
        count, backend = len(layers), "bitsandbytes" if library else "torch simulation"
    return model, dict(method=method, backend=backend, block=BLOCK if method == "nf4" else None, weights=count,
                       relative_change=round((change / norm) ** 0.5, 6) if norm else None)
