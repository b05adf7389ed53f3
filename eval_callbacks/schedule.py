"""When to evaluate during an attack."""

from __future__ import annotations


def linear_schedule(max_steps: int, every: int) -> list[int]:
    """Step 0, every `every` steps, and the last step."""
    if every <= 0:
        raise ValueError(f"evaluation interval must be > 0, got {every}")
    return sorted(set(range(0, max_steps + 1, every)) | {max_steps})


def log_schedule(max_steps: int, points: int) -> list[int]:
    """Step 0 plus `points` roughly log-spaced steps from 1 to max_steps.

    Recovery is usually fastest in the first few dozen steps, so a log schedule spends the
    evaluation budget where the curve moves.
    """
    if points <= 0:
        raise ValueError(f"number of log-spaced points must be > 0, got {points}")
    if points == 1:
        return sorted({0, max_steps})
    steps = {round(max_steps ** (i / (points - 1))) for i in range(points)}
    return sorted(steps | {0, max_steps})
