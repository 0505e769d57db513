"""The reward model learns to rank held-out preference pairs."""

from __future__ import annotations

from scratchllm.train.stages import reward
from tests.conftest import FAST
from tests.train.stages.conftest import first_and_last_eval


def test_reward_model_ranks_held_out_pairs(sft_model, tmp_path) -> None:
    root, data = sft_model
    reward.run(tmp_path, root / "sft" / "final", data, FAST + ["--loop.max_steps=60", "--loop.batch_size=16", "--optim.lr=1e-3"])
    before, after = first_and_last_eval(tmp_path / "reward")
    assert after["rm_accuracy"] >= 0.7 and after["rm_accuracy"] > before["rm_accuracy"] + 0.15
