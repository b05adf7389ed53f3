"""The toy world: a synthetic knowledge domain with tiny filtered, unfiltered and unlearned
models, so the whole attack-and-measure story runs offline on a laptop CPU."""
