"""The paired significance test behind "beyond the noise of the eval set": exact sign test (McNemar for 0/1)."""

from __future__ import annotations

import itertools
import math

import pytest

from scratchllm.eval.significance import binomial_two_sided_p, paired_change


def test_counts_only_the_tasks_that_changed_and_scores_them_by_hand() -> None:
    before = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    after = [1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0]  # 7 won, 1 lost, 4 unchanged
    change = paired_change(before, after)
    assert (change.won, change.lost) == (7, 1)
    # Two-sided: 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * (1 + 8) / 256
    assert change.p_value == pytest.approx(18 / 256)
    assert "won 7, lost 1, net +6" in change.describe()


def test_graded_scores_count_which_side_scored_higher_and_drop_ties() -> None:
    before = [0.8, 0.5, 1.0, 0.2, 0.6]
    after = [0.9, 0.5, 0.7, 0.3, 0.6]  # higher twice, lower once, two ties
    change = paired_change(before, after)
    assert (change.won, change.lost) == (2, 1)
    assert change.p_value == 1.0  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8


@pytest.mark.parametrize(("k", "n", "expected"), [(0, 0, 1.0), (4, 8, 1.0), (8, 8, 2 / 256), (0, 10, 2 / 1024), (3, 10, 2 * 176 / 1024)])
def test_binomial_p_matches_hand_computed_tails(k: int, n: int, expected: float) -> None:
    assert binomial_two_sided_p(k, n) == pytest.approx(expected)


def test_p_value_equals_enumerating_every_outcome_as_extreme_or_more() -> None:
    # The definition, by brute force over all 2^n sign patterns of n discordant tasks.
    n = 9
    for k in range(n + 1):
        extreme = sum(1 for signs in itertools.product((0, 1), repeat=n) if abs(sum(signs) - n / 2) >= abs(k - n / 2))
        assert binomial_two_sided_p(k, n) == pytest.approx(min(1.0, extreme / 2**n))
        assert binomial_two_sided_p(k, n) == binomial_two_sided_p(n - k, n)  # symmetric in won and lost


def test_identical_scores_are_no_evidence_and_mismatched_lengths_are_refused() -> None:
    same = paired_change([1, 0, 1], [1, 0, 1])
    assert (same.won, same.lost, same.p_value) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same items"):
        paired_change([1, 0], [1])
    assert math.isclose(paired_change([0.0] * 20, [1.0] * 20).p_value, 2 / 2**20)
