"""Pair other checkpoints of one stage (second seeds, variants) with a run's SFT model, as the report does.

    python scripts/compare_to_sft.py runs/default ppo runs/seed2/ppo/final [more checkpoints ...]

For each checkpoint: task pass@1, learned reward and gold-judge score (greedy and sampled), KL to SFT, each
paired with the SFT model of `runs/default` on the same held-out prompts and random draws (exact McNemar / sign
test p). The reward model is the run's own (`<run>/reward/final`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

from scratchllm.eval.compare import compare_checkpoints  # noqa: E402

KEYS = ["pass_at_1", "pass_at_1_vs_sft", "learned_reward", "learned_reward_sampled", "gold_score", "gold_vs_sft",
        "gold_score_sampled", "gold_sampled_vs_sft", "sampled_pass_at_1", "sampled_pass_at_1_vs_sft", "kl_to_sft",
        "end_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder holding sft/final and reward/final")
    parser.add_argument("stage", help="the report column the checkpoints stand in (ppo, grpo, dpo)")
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--corpus", type=Path, default=Path("corpus"))
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        result = compare_checkpoints({"sft": args.run / "sft" / "final", args.stage: checkpoint},
                                     reward_model=args.run / "reward" / "final", data_dir=args.corpus)
        print(json.dumps({"checkpoint": str(checkpoint), **{k: result[args.stage].get(k) for k in KEYS}},
                         ensure_ascii=False))


if __name__ == "__main__":
    main()
