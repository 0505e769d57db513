"""Activation checkpointing (--loop.activation_checkpointing): the same loss and gradients as storing every
activation, with fewer activations kept between forward and backward."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import set_checkpoint_early_stop

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.moe import moe_aux_loss
from scratchllm.train.loop import train
from scratchllm.train.losses import cross_entropy_loss
from tests.train.test_loop import LOOP, OPTIM, VOCAB, ToyLM, _model


def _loss_and_grads(model: GPT, batch: dict[str, torch.Tensor], seed: int = 7) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # dropout masks: the recomputation must draw the same ones
    loss = cross_entropy_loss(model(batch["ids"]), batch["targets"])
    aux, _ = moe_aux_loss(model)
    (loss + aux).backward()
    return float(loss + aux), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model: GPT, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return total


def _check_equal_with_and_without(config) -> None:
    torch.manual_seed(0)
    plain = GPT(config).train()
    recomputed = copy.deepcopy(plain)
    recomputed.activation_checkpointing = True
    batch = ToyLM(4).windows.batch(0)
    loss, grads = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(recomputed, batch)
    assert loss_ckpt == loss
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-7, msg=name)
    assert _saved_bytes(recomputed, batch["ids"]) < _saved_bytes(plain, batch["ids"]) / 2


def test_loss_and_gradients_equal_without_checkpointing_with_dropout() -> None:
    _check_equal_with_and_without(model_preset("tiny", vocab_size=VOCAB, dropout=0.1))


@pytest.mark.parametrize("early_stop", [True, False])  # without early stop the recomputation reaches the router
def test_moe_aux_loss_is_counted_once_under_recomputation(early_stop: bool) -> None:
    config = model_preset("tiny", vocab_size=VOCAB, n_experts=4, n_experts_active=2)
    _check_equal_with_and_without(config)
    model = GPT(config).train()
    model.activation_checkpointing = True
    ids = ToyLM(4).windows.batch(0)["ids"]
    with set_checkpoint_early_stop(early_stop):
        logits = model(ids)
        moe_aux_loss(model)  # as the loop does: the step's aux loss is taken before backward ...
        logits.sum().backward()  # ... which recomputes every block
    aux, _ = moe_aux_loss(model)
    assert aux == 0.0  # nothing left over from the recomputation for the next step


def test_training_with_checkpointing_equals_training_without(tmp_path: Path) -> None:
    loop = dataclasses.replace(LOOP, max_steps=4, batch_size=4)
    train(_model(), ToyLM(4), OPTIM, loop, tmp_path / "plain")
    model = _model()
    train(model, ToyLM(4), OPTIM, dataclasses.replace(loop, activation_checkpointing=True), tmp_path / "ckpt")
    assert model.activation_checkpointing  # the loop switched it on: the run above recomputed its blocks
    plain = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    ckpt = load_file(str(tmp_path / "ckpt" / "final" / "model.safetensors"))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)
