"""The optimizers: Muon's orthogonalisation, its AdamW half equal to torch's AdamW, and Muon inside the loop
(learns, resumes bit for bit)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from scratchllm.config import ConfigError, OptimConfig
from scratchllm.train.loop import train
from scratchllm.train.optim import MuonAdamW, build_optimizer, newton_schulz_orthogonalize
from tests.train.test_loop import LOOP, OPTIM, Interrupt, StopAfter, ToyLM, _model


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (16, 16)])
def test_newton_schulz_pushes_every_singular_value_near_one(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    # badly conditioned on purpose: singular values spread over two orders of magnitude (five iterations lift
    # values down to ~1e-3 of the largest; smaller ones need more)
    u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=g), full_matrices=False)
    spread = torch.logspace(0, -2, min(shape))
    matrix = u @ torch.diag(spread) @ vh
    out = newton_schulz_orthogonalize(matrix)
    in_basis = u.T @ out @ vh.T  # an odd polynomial of M keeps M's singular vectors: diagonal in their basis
    singular = in_basis.diagonal()
    assert singular.min() > 0.5 and singular.max() < 1.3, singular
    assert (in_basis - torch.diag(singular)).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(8, 32), (32, 8)])
def test_newton_schulz_on_a_stack_orthogonalises_each_matrix_on_its_own(shape: tuple[int, int]) -> None:
    # Muon's step batches same-shaped matrices: each must come out as if orthogonalised alone (the norm too is
    # per matrix, or one large gradient would shrink the others' updates)
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(3, *shape, generator=g) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    alone = torch.stack([newton_schulz_orthogonalize(m) for m in stack])
    assert torch.allclose(newton_schulz_orthogonalize(stack), alone, atol=1e-5)


def test_adamw_groups_of_the_combined_optimizer_step_like_torch_adamw() -> None:
    torch.manual_seed(0)
    ours_model, torch_model = nn.Linear(6, 4), nn.Linear(6, 4)
    torch_model.load_state_dict(ours_model.state_dict())
    groups = lambda m: [{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias], "weight_decay": 0.0}]  # noqa: E731
    ours = MuonAdamW(groups(ours_model), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    reference = torch.optim.AdamW(groups(torch_model), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(5):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a, b)


def test_muon_takes_the_hidden_matrices_only() -> None:
    model = _model()
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(muon_lr=0.02), torch.device("cpu"))
    muon = {id(p) for group in optimizer.param_groups if group.get("muon") for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names and all(".layers." in f".{name}" for name in names)
    assert all(model.get_parameter(name).dim() == 2 for name in names)
    assert not any("embed_tokens" in name or "norm" in name for name in names)
    with pytest.raises(ConfigError, match="--optim.muon_lr=-1 is out of range: allowed >= 0"):
        OptimConfig(muon_lr=-1)


def test_muon_in_the_loop_learns_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    optim = dataclasses.replace(OPTIM, muon_lr=0.02)
    loop = dataclasses.replace(LOOP, max_steps=12, checkpoint_every=6)
    straight = _model()
    metrics = train(straight, ToyLM(8), optim, loop, tmp_path / "straight")
    first = [r for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines() if '"eval"' in r][0]
    assert metrics["val_loss"] < float(first.split('"val_loss": ')[1].split("}")[0].split(",")[0]) - 0.5
    with pytest.raises(Interrupt):
        train(_model(), StopAfter(8, after=6), optim, loop, tmp_path / "resumed")
    resumed = _model(seed=123)  # everything, Muon's momentum included, must come from the checkpoint
    train(resumed, ToyLM(8), optim, loop, tmp_path / "resumed", resume=True)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
