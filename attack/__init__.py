"""finetune-attack: fine-tuning attacks with recovery curves on held-out benchmarks."""

__version__ = "0.1.0"
