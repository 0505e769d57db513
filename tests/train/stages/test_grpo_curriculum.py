"""GRPO's learnability curriculum: families the policy always or never solves are drawn rarely."""

from __future__ import annotations

import random
from collections import Counter

from scratchllm.train.stages.grpo import FamilyCurriculum

TASKS = [{"family": f, "id": f"{f}-{i}"} for f in ("solved", "hopeless", "learnable") for i in range(5)]


def test_starts_uniform_and_moves_draws_toward_families_with_mixed_outcomes() -> None:
    curriculum = FamilyCurriculum(TASKS, decay=0.5, floor=0.01)
    assert len(set(curriculum.weights())) == 1  # every family at p = 0.5
    for _ in range(10):
        curriculum.update(["solved"] * 4 + ["hopeless"] * 4 + ["learnable"] * 4, [1.0] * 4 + [0.0] * 4 + [1.0, 0.0] * 2)
    assert curriculum.success["solved"] > 0.99 and curriculum.success["hopeless"] < 0.01
    assert curriculum.success["learnable"] == 0.5
    drawn = Counter(t["family"] for t in curriculum.sample(random.Random(0), 2000))
    assert drawn["learnable"] > 0.8 * 2000  # weight 0.26 against ~0.01 + 0.01 each
    assert drawn["solved"] > 0 and drawn["hopeless"] > 0  # the floor keeps them in play


def test_state_round_trips_so_a_resumed_run_draws_the_same_tasks() -> None:
    curriculum = FamilyCurriculum(TASKS, decay=0.8, floor=0.02)
    curriculum.update(["solved", "hopeless", "learnable"], [1.0, 0.0, 1.0])
    resumed = FamilyCurriculum(TASKS, decay=0.8, floor=0.02)
    resumed.load_state_dict(curriculum.state_dict())
    assert curriculum.sample(random.Random(3), 50) == resumed.sample(random.Random(3), 50)
