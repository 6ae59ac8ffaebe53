"""Choosing a preference pair from a prompt's scored samples (the iterative stage).

The core's default when no plugin owns ``posttrain_select_pair``: the best-scored sample against the
worst, ties dropped. The ``best_vs_worst`` plugin is the same rule with a ``min_gap`` option.
"""

from __future__ import annotations


def best_and_worst(rewards: list, min_gap: float = 0.0):
    """(index of the best, index of the worst), the first of each in sampling order when several tie;
    None when the gap is not above ``min_gap``."""
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    worst = min(range(len(rewards)), key=lambda i: rewards[i])
    if rewards[best] - rewards[worst] <= min_gap:
        return None
    return best, worst
