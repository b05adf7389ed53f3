"""Which attack documents drove the recovery (opt-in: --attribution on a LoRA fine-tuning attack).

    collect.py         during the attack: one gradient per document piece (Bergson) and every
                       evaluated question's gradient at each evaluation point
    attribute.py       `python -m attack attribute RUN_DIR`: rankings per question and point
                       (gradient, TracIn, BM25, random) -> attribution.jsonl, attribution_summary.json
    counterfactual.py  `python -m attack counterfactual RUN_DIR --task T --k 10`: the attack rerun
                       without the top-k documents and without k random ones

The report's section on it is attack/report/attribution.py.
"""
