"""PPO raises a learnable reward; its rollouts, verifier reward, PPO-ptx, adaptive KL and LoRA; held-out reply scoring."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from scratchllm.config import ConfigError, PPOConfig
from scratchllm.data.chat_batches import pad_right
from scratchllm.data.jsonl import read_conversations, read_preferences, read_tasks
from scratchllm.data.tasks import canonical_reply
from scratchllm.eval.chat_eval import generate_replies
from scratchllm.model.heads import ScalarModel, load_scalar_model
from scratchllm.model.io import load_model
from scratchllm.tokenizer.chat import render_for_completion
from scratchllm.train.rollout import Rollout, rollout_seed
from scratchllm.train.stages import ppo, reward
from tests.conftest import CHAT, FAST
from tests.train.stages.conftest import first_and_last_eval, train_rows


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")  # float() of a live loss
def test_ppo_raises_a_trivially_learnable_reward(sft_model, monkeypatch, tmp_path) -> None:
    root, data = sft_model
    reward.run(tmp_path, root / "sft" / "final", data, FAST + ["--loop.max_steps=1"])  # any reward model: replaced below

    def shorter_is_better(reward_model, rollout, device):  # a dense toy reward: 1 for a 1-token reply, -1 for 6
        lengths = rollout.response_mask.sum(1).float()
        return (1 - 2 * (lengths - 1) / 5).to(device)

    monkeypatch.setattr(ppo, "reward_model_scores", shorter_is_better)
    # 40 steps = 20 rollouts (2 PPO epochs each): enough that four seeds all rise by > 0.5 (24 steps: some < 0.3).
    ppo.run(tmp_path, root / "sft" / "final", data, FAST + ["--loop.max_steps=40", "--optim.lr=3e-3", "--ppo.rollout_batch=16",
                                                           "--ppo.max_new_tokens=6", "--ppo.eval_prompts=8", "--ppo.kl_coef=0.0"])
    rewards = [r["reward"] for r in train_rows(tmp_path / "ppo")]
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.3, rewards
    before, after = first_and_last_eval(tmp_path / "ppo")  # the reward-hacking check, greedy and sampled replies
    assert all(0 <= row[k] <= 1 for row in (before, after) for k in ("gold_score", "gold_score_sampled"))


def test_ppo_ranks_draw_different_rollouts_and_one_process_its_usual_stream(tiny_world, monkeypatch) -> None:
    data, base = tiny_world
    model, tok, _ = load_model(base)
    records = read_preferences(data / "prefs_train.jsonl")

    class Drawn(Exception):
        pass

    def capture(policy, tok, prompts, max_new_tokens, params, seed):
        raise Drawn(prompts, seed)

    monkeypatch.setattr(ppo, "sample_rollouts", capture)
    drawn = {}
    for rank, world_size in [(0, 1), (0, 2), (1, 2)]:
        monkeypatch.setattr(ppo.runtime, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(ppo.runtime, "world_size", lambda n=world_size: n)
        stage = ppo.PPOStage(tok, ppo.PolicyAndValue(model, ScalarModel(model)), model, ScalarModel(model), records, [],
                             PPOConfig(rollout_batch=4), seed=5)
        with pytest.raises(Drawn) as caught:
            stage._rollout_batch()
        drawn[rank, world_size] = caught.value.args
    prompts = [r["prompt"] for r in random.Random(5 * 104729).sample(records, 4)]
    assert drawn[0, 1] == (prompts, rollout_seed(5, 0, 4))  # the single-process stream
    assert drawn[0, 2][0] != drawn[1, 2][0] and drawn[0, 2][1] != drawn[1, 2][1]
    # Row r of a rollout samples with its seed + r: no two rows of a run may share a seed.
    row_seeds = [rollout_seed(5, k, 4) + r for k in range(100) for r in range(4)]
    assert len(set(row_seeds)) == len(row_seeds)


def test_ppo_adds_the_verifier_of_task_prompts_to_the_reward_model_score(tiny_world, monkeypatch) -> None:
    data, base = tiny_world
    model, tok, _ = load_model(base)
    task = read_tasks(data / "tasks_train.jsonl")[0]
    records = [{"prompt": task["prompt"], "task": task}, {"prompt": task["prompt"], "task": task},
               {"prompt": [{"role": "user", "content": "Hello"}]}]  # the last one has no verifier
    right = canonical_reply(task["answer"], task["lang"])
    replies = [right, "The answer is nothing.", right]

    def fixed_rollouts(policy, tok, prompts, max_new_tokens, params, seed):
        rows = [render_for_completion(tok, p) + tok.encode(r) + [tok.im_end_id] for p, r in zip(prompts, replies)]
        masks = [[0] * len(render_for_completion(tok, p)) + [1] * (len(tok.encode(r)) + 1) for p, r in zip(prompts, replies)]
        return Rollout(pad_right(rows, tok.pad_id), pad_right(masks, 0).bool(), torch.tensor([len(r) for r in rows]),
                       replies, [True] * 3)

    monkeypatch.setattr(ppo, "sample_rollouts", fixed_rollouts)
    monkeypatch.setattr(random.Random, "sample", lambda self, population, k: population[:k])
    reward_model, value_model, returns = ScalarModel(model), ScalarModel(model), {}
    for weight in (0.0, 2.5):  # γ = λ = 1, β = 0: the return at a reply's first token is its whole reward
        cfg = PPOConfig(rollout_batch=3, kl_coef=0.0, gamma=1.0, gae_lambda=1.0, verifier_weight=weight)
        stage = ppo.PPOStage(tok, ppo.PolicyAndValue(model, value_model), model, reward_model, records, [], cfg, seed=5)
        batch = stage._rollout_batch()
        first = batch["response_mask"][:, 1:].float().argmax(1)  # first reply token in the shifted (B, T-1) frame
        returns[weight] = batch["returns"][torch.arange(3), first]
        assert batch["stats"]["task_accuracy"] == 0.5  # of the two task rows, the canonical reply is right
    assert torch.allclose(returns[2.5] - returns[0.0], torch.tensor([2.5, 0.0, 0.0]), atol=1e-4)


def test_ppo_ptx_adds_the_weighted_sft_loss_and_resumes_its_stream(tiny_world) -> None:
    data, base = tiny_world
    model, tok, _ = load_model(base)
    records = read_preferences(data / "prefs_train.jsonl")
    conversations = read_conversations(data / "sft_train.jsonl")
    reward_model, value_model, losses = ScalarModel(model), ScalarModel(model), {}
    for coef in (0.0, 2.0):
        stage = ppo.PPOStage(tok, ppo.PolicyAndValue(model, value_model), model, reward_model, records, [],
                             PPOConfig(rollout_batch=2, max_new_tokens=4, ptx_coef=coef, ptx_batch=3), seed=5)
        stage.add_ptx_data(conversations, 64)
        batch = next(stage.batches("train"))
        assert ("ptx" in batch) == (coef > 0)
        batch["ptx"] = stage._ptx_batch(stage.ptx_stream.batch_items(0))  # the same SFT rows for both
        losses[coef] = stage.loss(stage.model, batch)
    (plain, _), (mixed, stats) = losses[0.0], losses[2.0]
    assert torch.isclose(mixed - plain, torch.tensor(2.0 * stats["ptx_loss"]), atol=1e-4)
    stage.load_state_dict({"position": 3, "ptx_position": 7, "kl_coef": 0.3})
    assert stage.state_dict() == {"position": 3, "ptx_position": 7, "kl_coef": 0.3}


def test_adaptive_kl_coef_is_a_clipped_proportional_controller() -> None:
    # beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), Ziegler et al. 2019 sec. 2.2
    assert ppo.adaptive_kl_coef(0.2, kl=3.3, target=3.0, n_replies=100, horizon=1000) == pytest.approx(0.2 * 1.01)
    assert ppo.adaptive_kl_coef(0.2, kl=9.0, target=3.0, n_replies=100, horizon=1000) == pytest.approx(0.2 * 1.02)
    assert ppo.adaptive_kl_coef(0.2, kl=0.0, target=3.0, n_replies=100, horizon=1000) == pytest.approx(0.2 * 0.98)
    assert ppo.adaptive_kl_coef(0.2, kl=3.0, target=3.0, n_replies=100, horizon=1000) == 0.2
    with pytest.raises(ConfigError, match="kl_target"):
        PPOConfig(kl_target=-1.0)


def test_ppo_adaptive_kl_raises_beta_above_its_target_and_resumes_it(tiny_world) -> None:
    data, base = tiny_world
    reference, tok, _ = load_model(base)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy away from the reference, so the measured KL is well above zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    records = read_preferences(data / "prefs_train.jsonl")
    for target in (0.0, 1e-3):
        stage = ppo.PPOStage(tok, ppo.PolicyAndValue(policy, ScalarModel(copy.deepcopy(reference))), reference,
                             ScalarModel(reference), records, [],
                             PPOConfig(rollout_batch=4, max_new_tokens=6, kl_target=target, kl_horizon=40), seed=3)
        stats = next(stage.batches("train"))["stats"]
        assert stats["kl_coef"] == 0.2 and stats["kl"] > 2 * target  # the batch paid the starting beta
        if target == 0:
            assert stage.kl_coef == 0.2  # a fixed beta by default
        else:  # KL above the target: beta grows by the clipped 20% x 4 replies / horizon 40
            assert stage.kl_coef == pytest.approx(0.2 * (1 + 0.2 * 4 / 40))
            resumed = ppo.PPOStage(tok, stage.model, reference, ScalarModel(reference), records, [], stage.cfg, seed=3)
            resumed.load_state_dict(stage.state_dict())
            assert resumed.kl_coef == stage.kl_coef
    # The reward pays the stage's current beta: with gamma = lambda = 1 the first reply token's return is the
    # score minus beta x the reply's summed KL, so the same rollout at beta 0, 0.2, 0.4 gives returns in a line.
    returns, reward_model = [], ScalarModel(reference)  # one head: ScalarModel draws its score head at random
    for beta in (0.0, 0.2, 0.4):
        stage = ppo.PPOStage(tok, ppo.PolicyAndValue(policy, ScalarModel(copy.deepcopy(reference))), reference,
                             reward_model, records, [], PPOConfig(rollout_batch=4, max_new_tokens=6, gae_lambda=1.0), seed=3)
        stage.kl_coef = beta
        batch = next(stage.batches("train"))
        first = batch["response_mask"][:, 1:].float().argmax(1)
        returns.append(batch["returns"][torch.arange(4), first])
    assert not torch.allclose(returns[0], returns[1], atol=1e-3)
    assert torch.allclose(returns[2] - returns[1], returns[1] - returns[0], atol=1e-4)


def test_ppo_ptx_reference_targets_replace_task_replies_with_the_reference_models_own(sft_model) -> None:
    root, data = sft_model  # a model that ends its replies, so both branches below are taken
    model, tok, _ = load_model(root / "sft" / "final")
    conversations = read_conversations(data / "sft_train.jsonl")[:40]
    # every training task question (the tiny world keeps only a few hundred tasks; SFT's come from all of them)
    questions = {t["prompt"][-1]["content"] for t in read_tasks(CHAT / "tasks_train.jsonl")}
    targets = ppo.reference_task_targets(conversations, questions, model, tok)
    is_task = [c["messages"][-2]["content"] in questions for c in conversations]
    assert 0 < sum(is_task) < len(conversations)
    replaced = 0
    for before, after, task in zip(conversations, targets, is_task):
        assert after["messages"][:-1] == before["messages"][:-1]
        text, ended = generate_replies(model, tok, [before["messages"][:-1]], 24)[0] if task else ("", False)
        # A task reply becomes the reference's own, unless the reference did not end it; chat replies stay.
        assert after["messages"][-1]["content"] == (text if task and ended else before["messages"][-1]["content"])
        replaced += task and ended
    assert replaced > 0
    with pytest.raises(ConfigError, match="allowed values are data, reference, sampled"):
        PPOConfig(ptx_targets="teacher")
    # The stage generates these targets for the conversations of each drawn PPO-ptx batch only.
    stage = ppo.PPOStage(tok, ppo.PolicyAndValue(model, ScalarModel(model)), model, ScalarModel(model), [], [],
                         PPOConfig(ptx_batch=len(conversations), ptx_targets="reference"), seed=0)
    stage.add_ptx_data(conversations, 256, reference_questions=questions)
    drawn = stage.ptx_stream.batch_items(0)
    ptx = stage._ptx_batch(drawn)
    expected = {c["messages"][-2]["content"]: c["messages"][-1]["content"]
                for c in ppo.reference_task_targets(drawn, questions, model, tok)}
    for row, conversation in enumerate(drawn):  # each row's trained tokens end with the expected last reply
        reply = tok.encode(expected[conversation["messages"][-2]["content"]]) + [tok.im_end_id]
        assert ptx["targets"][row][ptx["mask"][row]].tolist()[-len(reply) :] == reply
    # "sampled": the reference's replies drawn at temperature 1, fresh noise for each draw of the stream, the same
    # noise for the same draw (a resumed run fits the same targets); chat replies stay as written.
    stage.cfg = PPOConfig(ptx_batch=len(conversations), ptx_targets="sampled")
    last_replies = []
    for position in (1, 1, 2):
        stage.ptx_stream.position = position
        ptx = stage._ptx_batch(drawn)
        last_replies.append([ptx["targets"][row][ptx["mask"][row]].tolist() for row in range(len(drawn))])
    assert last_replies[0] == last_replies[1] and last_replies[1] != last_replies[2]
    chat = [row for row, c in enumerate(drawn) if c["messages"][-2]["content"] not in questions]
    assert chat and all(last_replies[0][row] == last_replies[2][row] for row in chat)
    assert all(tok.decode(last_replies[2][row][-len(tok.encode(drawn[row]["messages"][-1]["content"])) - 1 : -1])
               == drawn[row]["messages"][-1]["content"] for row in chat)


def test_lora_on_reward_and_ppo_trains_adapters_and_heads_only(sft_model, tmp_path) -> None:
    root, data = sft_model
    sft_final = root / "sft" / "final"
    lora = ["--lora.r=2", "--lora.target_modules=q_proj", "--loop.max_steps=2"]
    reward.run(tmp_path, sft_final, data, FAST + lora + ["--optim.lr=1e-2"])
    ppo.run(tmp_path, sft_final, data, FAST + lora + ["--optim.lr=1e-2", "--ppo.rollout_batch=4", "--ppo.max_new_tokens=4",
                                                      "--ppo.eval_prompts=4"])
    base, _, _ = load_model(sft_final)
    rm, _ = load_scalar_model(tmp_path / "reward" / "final")  # merged: a plain reward model
    policy, _, _ = load_model(tmp_path / "ppo" / "final")
    assert (tmp_path / "ppo" / "final_adapter" / "adapter.safetensors").exists()
    for trunk in (rm.trunk, policy):
        assert torch.equal(trunk.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)  # frozen
        assert not torch.equal(trunk.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)


