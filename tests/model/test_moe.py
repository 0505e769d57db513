"""Mixture-of-Experts: one expert equals the dense MLP, grouped dispatch equals a per-token loop, the balance loss
has its known values, gradients reach the router, the loop trains it in any stage, KV-cache decoding still holds."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from scratchllm.config import ConfigError, LoopConfig, ModelConfig, OptimConfig, model_preset
from scratchllm.data.batches import LMWindows
from scratchllm.export.hf import export_hf
from scratchllm.model.cli import describe
from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import KVCache
from scratchllm.model.mlp import SwiGLU
from scratchllm.model.moe import MoE, load_balancing_loss, moe_aux_loss, router_z_loss
from scratchllm.train.loop import Stage, train
from scratchllm.train.losses import cross_entropy_loss

VOCAB = 48


def _cfg(**overrides) -> ModelConfig:
    return model_preset("tiny", vocab_size=VOCAB, **{"n_experts": 4, "n_experts_active": 2, **overrides})


def _naive_moe(moe: MoE, x: Tensor) -> Tensor:
    """Reference: route and mix one token at a time, straight from the definition."""
    flat = x.reshape(-1, x.shape[-1])
    out = []
    for token in flat:
        probs = moe.router(token).softmax(-1)
        top_p, top_i = probs.topk(moe.top_k)
        gates = top_p / top_p.sum() if moe.top_k > 1 else top_p
        y = sum(g * moe.experts[int(i)](token) for g, i in zip(gates, top_i))
        if moe.shared_expert is not None:
            y = y + moe.shared_expert(token)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize(("top_k", "n_shared"), [(1, 0), (2, 0), (3, 1)])
def test_grouped_dispatch_equals_per_token_reference(top_k: int, n_shared: int) -> None:
    moe = MoE(_cfg(n_experts_active=top_k, n_shared_experts=n_shared))
    nn.init.normal_(moe.router.weight, std=1.0)  # spread the routes so every expert gets tokens
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert torch.allclose(moe(x), _naive_moe(moe, x), atol=1e-6)
    assert (moe.expert_fraction > 0).all() and torch.isclose(moe.expert_fraction.sum(), torch.tensor(1.0))


def test_one_expert_top_1_equals_the_dense_model() -> None:
    dense = GPT(model_preset("tiny", vocab_size=VOCAB)).eval()
    moe = GPT(_cfg(n_experts=1, n_experts_active=1)).eval()
    # The dense MLP's weights become expert 0's; the router's value is irrelevant (softmax over one logit is 1).
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    for i in range(moe.config.n_layers):
        state[f"layers.{i}.mlp.router.weight"] = torch.randn(1, 32)
    moe.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.allclose(moe(ids), dense(ids), atol=1e-5)


def test_one_expert_module_equals_swiglu() -> None:
    moe, mlp = MoE(_cfg(n_experts=1, n_experts_active=1)), SwiGLU(32, 128)
    moe.experts[0].load_state_dict(mlp.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.allclose(moe(x), mlp(x), atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_reach_the_router_from_the_output_alone(top_k: int) -> None:
    # With the aux coefficients at 0, only the gates can carry gradient to the router: it must not be cut.
    moe = MoE(_cfg(n_experts_active=top_k, moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0))
    moe(torch.randn(2, 8, 32)).pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_balance_loss_known_values() -> None:
    E, N = 4, 64
    uniform = torch.full((N, E), 1 / E)
    any_routes = torch.randint(0, E, (N, 2))
    assert torch.isclose(load_balancing_loss(uniform, any_routes), torch.tensor(1.0))  # minimal: exactly 1
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1.0
    assert torch.isclose(load_balancing_loss(collapsed, torch.zeros(N, 1, dtype=torch.long)), torch.tensor(float(E)))
    # A router leaning towards one expert sits in between, and its gradient pushes P back towards uniform.
    logits = torch.zeros(N, E)
    logits[:, 0] = 2.0
    logits.requires_grad_(True)
    probs = logits.softmax(-1)
    loss = load_balancing_loss(probs, probs.topk(1).indices)
    assert 1.0 < float(loss.detach()) < E
    loss.backward()
    assert (logits.grad[:, 0] > 0).all()  # descending lowers the favoured expert's logit
    assert torch.isclose(router_z_loss(torch.zeros(3, E)), torch.tensor(float(np.log(E)) ** 2))


def test_uniform_router_module_reports_balance_one() -> None:
    moe = MoE(_cfg())
    nn.init.zeros_(moe.router.weight)
    moe(torch.randn(2, 8, 32))
    aux = moe.pop_aux()
    assert aux is not None and torch.isclose(aux[1]["balance"], torch.tensor(1.0))


def test_aux_loss_is_collected_once_and_only_from_training_forwards() -> None:
    model = GPT(_cfg())
    ids = torch.randint(0, VOCAB, (2, 12))
    model(ids)
    model(ids)  # two forwards in one loss (DPO: chosen, rejected) are averaged, not summed
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    expected = sum(m.aux_loss_coef * torch.stack([p[0] for p in m._pending]).mean()
                   + m.z_loss_coef * torch.stack([p[1] for p in m._pending]).mean() for m in layers)
    frozen = copy.deepcopy(model)  # a reference copy made mid-step must not choke on pending graphs
    aux, stats = moe_aux_loss(model)
    assert torch.isclose(aux, expected) and set(stats) >= {"moe_balance_loss", "moe_max_expert_fraction"}
    aux.backward()
    assert all(m.router.weight.grad is not None for m in layers)
    assert moe_aux_loss(model) == (0.0, {}) and moe_aux_loss(frozen) == (0.0, {})
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    assert moe_aux_loss(model) == (0.0, {})  # evaluation and generation add nothing
    assert moe_aux_loss(GPT(model_preset("tiny", vocab_size=VOCAB))) == (0.0, {})  # dense: nothing to add


def test_kv_cache_decoding_equals_full_recompute() -> None:
    cfg = _cfg(n_shared_experts=1)
    model = GPT(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    cache = KVCache(cfg, batch_size=2)
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(model(ids[:, :10], kv_cache=cache), full[:, :10], atol=1e-5)
        for t in range(10, 24):
            step = model(ids[:, t : t + 1], kv_cache=cache)
            assert torch.allclose(step[:, 0], full[:, t], atol=1e-5), t


def _tokens(n: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(12), n // 12 + 1)[:n]
    return np.where(rng.random(n) < 0.1, rng.integers(0, VOCAB, n), base).astype(np.uint16)


class ToyLM(Stage):
    """A stage that knows nothing about experts: plain next-token cross-entropy."""

    name = "toy"

    def __init__(self) -> None:
        self.windows = LMWindows(_tokens(), 16, 8, 0)
        self.val = LMWindows(_tokens(), 16, 8, seed=99).batch(0)

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]:
        return iter(self.windows)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return cross_entropy_loss(model(batch["ids"]), batch["targets"]), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": float(cross_entropy_loss(model(self.val["ids"]), self.val["targets"]).detach())}


LOOP = LoopConfig(max_steps=40, batch_size=8, seq_len=16, eval_every=0, checkpoint_every=0, log_every=5, device="cpu")
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2)


def test_moe_gpt_trains_through_the_loop_and_logs_utilisation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(_cfg())
    stage = ToyLM()
    start = stage.evaluate(model)["val_loss"]  # a grad-enabled forward before training: the loop must drop it
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    routers = [m.router.weight.detach().clone() for m in layers]
    metrics = train(model, stage, OPTIM, LOOP, tmp_path)
    assert metrics["val_loss"] < start - 0.5
    assert all(not torch.equal(before, m.router.weight) for before, m in zip(routers, layers))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["split"] == "train" and "moe_max_expert_fraction" in r]
    assert logged and all(0.25 <= r["moe_max_expert_fraction"] <= 1.0 and r["moe_balance_loss"] >= 1.0 - 1e-3
                          for r in logged)


def test_loop_adds_the_aux_loss(tmp_path: Path) -> None:
    # Same seed, same data, one step: only the aux coefficient differs, so the routers must end up different.
    routers = []
    for coef in (0.0, 10.0):
        torch.manual_seed(0)
        model = GPT(_cfg(moe_aux_loss_coef=coef))
        train(model, ToyLM(), OPTIM, dataclasses.replace(LOOP, max_steps=1), tmp_path / str(coef))
        routers.append(model.layers[0].mlp.router.weight.detach())
    assert not torch.allclose(routers[0], routers[1])


def test_export_refuses_moe(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--model.n_experts=4"):
        export_hf(GPT(_cfg()), None, tmp_path / "hf")  # type: ignore[arg-type]
    assert not (tmp_path / "hf").exists()


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--model.n_shared_experts"):
        model_preset("tiny", n_shared_experts=1)
    with pytest.raises(ConfigError, match="--model.moe_aux_loss_coef"):
        _cfg(moe_aux_loss_coef=-1.0)
    with pytest.raises(ConfigError, match="--model.n_experts_active"):
        _cfg(n_experts_active=5)


def test_model_info_reports_active_parameters() -> None:
    rows = dict(describe("tiny", VOCAB, overrides=["--model.n_experts=4", "--model.n_experts_active=1"]))
    dense = dict(describe("tiny", VOCAB))
    assert rows["active per token (total)"] < rows["total"]
    # top-1 of 4 same-width experts: active = dense + the router's E·d_model weights per layer
    assert rows["active per token (total)"] == dense["total"] + 2 * 4 * 32


def test_load_balancing_top2_and_router_z_loss() -> None:
    # E = 2, k = 2: every token uses both experts -> f = [½, ½]; P = [0.9, 0.1] -> 2·(0.45 + 0.05) = 1
    assert math.isclose(float(load_balancing_loss(torch.tensor([[0.9, 0.1]]), torch.tensor([[0, 1]]))), 1.0)
    # everything on expert 0 with P = [1, 0]: 2·1·1 = 2 = E, the maximum
    assert math.isclose(float(load_balancing_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0]]))), 2.0)
    # logits [0, 0]: logsumexp = ln 2; [ln 3, 0]: logsumexp = ln 4 -> mean((ln 2)², (ln 4)²)
    z = router_z_loss(torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]))
    assert math.isclose(float(z), (math.log(2) ** 2 + math.log(4) ** 2) / 2, rel_tol=1e-6)
