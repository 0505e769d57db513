"""Is a change between two checkpoints more than the luck of the held-out set? The exact sign test.

Two checkpoints answer the same held-out prompts, so their scores are paired. Prompts where both score the same
say nothing about which is better; only the others do: `won` (scored higher after) and `lost` (lower after). If
the two were equally good, each of those would be a fair coin, won ~ Binomial(won + lost, 1/2), and the
two-sided p-value is twice the smaller tail (capped at 1). With right/wrong (1/0) scores, as task pass@1 has,
this is the exact McNemar test (McNemar 1947); with graded scores (the gold judge) it is the sign test.

This answers "could this eval set have shown the change by chance?" for two fixed checkpoints. It says nothing
about training noise: a second seed of the same run answers that (issue 6 asks for both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedChange:
    won: int  # items scored higher after (for 0/1 scores: wrong before, right after)
    lost: int  # items scored lower after
    p_value: float  # exact two-sided p; small = the change is unlikely to be the eval set's luck

    def describe(self) -> str:
        return f"won {self.won}, lost {self.lost}, net {self.won - self.lost:+d}, exact p = {self.p_value:.3g}"


def binomial_two_sided_p(k: int, n: int) -> float:
    """P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2), by the doubled smaller tail."""
    if n == 0:
        return 1.0
    smaller = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(smaller + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_change(before: Sequence[float], after: Sequence[float]) -> PairedChange:
    """Compare per-item scores of two checkpoints on the same items (ties carry no information and are dropped)."""
    if len(before) != len(after):
        raise ValueError(f"paired scores need the same items: {len(before)} before, {len(after)} after")
    won = sum(1 for b, a in zip(before, after) if a > b)
    lost = sum(1 for b, a in zip(before, after) if a < b)
    return PairedChange(won, lost, binomial_two_sided_p(won, won + lost))
