"""finetune-attack: fine-tuning attacks with recovery curves on held-out benchmarks."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns when it is imported on a CPU without its optional kernels package; set
# here, before anything imports it (worker processes included), so the terminal keeps our lines.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
