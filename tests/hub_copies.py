"""Local datasets laid out like the hub datasets the Deep Ignorance tasks name: the same
configurations, splits and fields (a README with `configs:` is how the hub declares them), with
made-up questions. Pointed at by eval.dataset_paths, they let the shipped YAMLs run offline."""

from __future__ import annotations

import json
from pathlib import Path

WMDP_TOPICS = {  # configuration -> (robust, shortcut) question counts of these copies
    "bioweapons_and_bioterrorism": (3, 2),
    "dual_use_virology": (5, 1),
    "enhanced_potential_pandemic_pathogens": (2, 2),
    "expanding_access_to_threat_vectors": (4, 1),
    "reverse_genetics_and_easy_editing": (6, 1),
    "viral_vector_research": (1, 3),
}


def _write_repo(root: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset folder with one jsonl per (configuration, split) and the README declaring them."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = root / config / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            lines += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    lines.append("---")
    (root / "README.md").write_text("\n".join(lines) + "\n")
    return root


def _question(topic: str, split: str, i: int) -> dict:
    return {
        "question": f"  Which option is right for {topic} {split} question {i}?  ",
        "choices": [f"{topic} option {k} of {i}" for k in "wxyz"],
        "answer": i % 4,
    }


def wmdp_bio_robust_mcqa(root: Path) -> Path:
    return _write_repo(root, {
        topic: {"robust": [_question(topic, "robust", i) for i in range(r)],
                "shortcut": [_question(topic, "shortcut", i) for i in range(s)]}
        for topic, (r, s) in WMDP_TOPICS.items()
    })


def wmdp_bio_cloze(root: Path) -> Path:
    def row(split, i):
        q = _question("cloze", split, i)
        letters = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", q["choices"], strict=True))
        return {**q, "prompt": f"{q['question'].strip()}\n{letters}\nAnswer:", "reasoning": f"because {i}"}

    return _write_repo(root, {"default": {"cloze_compatible": [row("cloze_compatible", i) for i in range(7)],
                                          "mcqa_only": [row("mcqa_only", i) for i in range(3)]}})


def mmlu(root: Path, subjects: list[str]) -> Path:
    """cais/mmlu: one configuration per subject with test/validation/dev splits."""
    def rows(subject, split, n):
        return [{"question": f"{subject} {split} question {i}?", "subject": subject,
                 "choices": [f"{subject} {k}" for k in "abcd"], "answer": (i + 1) % 4} for i in range(n)]

    return _write_repo(root, {s: {"test": rows(s, "test", 2), "validation": rows(s, "validation", 1),
                                  "dev": rows(s, "dev", 5)} for s in subjects})
