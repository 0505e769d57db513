"""Is a pass@1 change more than the luck of the held-out set? The exact McNemar test (McNemar 1947).

Two checkpoints answer the same held-out tasks, so their scores are paired. Tasks both get right or both get
wrong say nothing about which is better; only the discordant ones do: `won` (wrong before, right after) and
`lost` (right before, wrong after). If the two were equally good, each discordant task would be a fair coin,
won ~ Binomial(won + lost, 1/2), and the two-sided p-value is twice the smaller tail (capped at 1).

This answers "could this eval set have shown the change by chance?" for two fixed checkpoints. It says nothing
about training noise: a second seed of the same run answers that (issue 6 asks for both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedChange:
    won: int  # tasks wrong before and right after
    lost: int  # tasks right before and wrong after
    p_value: float  # exact two-sided McNemar p; small = the change is unlikely to be the eval set's luck

    def describe(self) -> str:
        return f"won {self.won}, lost {self.lost}, net {self.won - self.lost:+d}, McNemar p = {self.p_value:.3g}"


def binomial_two_sided_p(k: int, n: int) -> float:
    """P(|X - n/2| >= |k - n/2|) for X ~ Binomial(n, 1/2), by the doubled smaller tail."""
    if n == 0:
        return 1.0
    smaller = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(smaller + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_change(before: Sequence[float], after: Sequence[float]) -> PairedChange:
    """Compare per-task scores (1 right, 0 wrong; > 0.5 counts as right) of two checkpoints on the same tasks."""
    if len(before) != len(after):
        raise ValueError(f"paired scores need the same tasks: {len(before)} before, {len(after)} after")
    won = sum(1 for b, a in zip(before, after) if b <= 0.5 < a)
    lost = sum(1 for b, a in zip(before, after) if a <= 0.5 < b)
    return PairedChange(won, lost, binomial_two_sided_p(won, won + lost))
