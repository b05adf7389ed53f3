"""Which attack documents drove the recovery (opt-in: --attribution on a LoRA fine-tuning attack).

    collect.py         during the attack: one gradient per document piece (Bergson) and every
                       evaluated question's gradient at each evaluation point
    attribute.py       `python -m attack attribute RUN_DIR`: rankings per question and point
                       (gradient, TracIn, BM25, random) -> attribution.jsonl, attribution_summary.json

Its test, the attack rerun without the top-k documents and without k random ones, is a driver
beside the sweep (attack/counterfactual.py); the report's section is attack/report/attribution.py.
"""
