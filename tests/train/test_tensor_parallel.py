"""Tensor parallelism (train/tensor_parallel.py) on 2 CPU processes with gloo: the sharded model computes what the
single-process model computes, in the forward pass and through training, alone and composed with FSDP2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchllm.config import ConfigError, model_preset
from scratchllm.train.loop import train
from scratchllm.train.tensor_parallel import check_tensor_parallel
from tests.train.test_loop import LOOP, OPTIM, ToyLM, _model
from tests.train.two_process import run_two_processes

TP_SCRIPT = """
import os, sys, dataclasses, torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_loop import ToyLM, _model, LOOP, OPTIM
from scratchllm.train import distributed
from scratchllm.train.loop import train
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo")
model = distributed.wrap(_model(), torch.device("cpu"), "ddp", tensor_parallel=2)
q = model.layers[0].self_attn.q_proj.weight
assert q.to_local().shape[0] * 2 == q.shape[0], "q_proj is not split by output features"
ids = ToyLM(4).windows.batch(0)["ids"]
with torch.no_grad():
    logits = model(ids)
from scratchllm.infer.engine import generate_batch
from test_tensor_parallel import _mha_model
prompts = [[5, 6, 7], [9, 3]]  # different lengths: left padding and the attention mask take part
# 4 K/V heads, 2 per process: a cache sized for all 4 cannot take a process's 2 (with 1 of 2 it would broadcast)
generator = distributed.wrap(_mha_model(), torch.device("cpu"), "ddp", tensor_parallel=2)
generated, _ = generate_batch(generator, prompts, max_new_tokens=6)  # greedy, KV cache of this process's heads
if rank == 0:
    torch.save({{"ids": ids, "logits": logits, "generated": torch.tensor(generated)}}, {out!r} + "/forward.pt")
loop = dataclasses.replace(LOOP, max_steps=4, batch_size=4, log_every=1, tensor_parallel=2)
train(_model(), ToyLM(4), OPTIM, loop, {out!r} + "/tp")
train(_model(), ToyLM(4), OPTIM, dataclasses.replace(loop, parallel="fsdp"), {out!r} + "/tp_fsdp")  # mesh (1, 2)
dist.barrier()  # no rank tears gloo down while another is still talking to it ("terminate called" at exit)
dist.destroy_process_group()
"""


def _mha_model() -> torch.nn.Module:
    from scratchllm.model.gpt import GPT
    from tests.train.test_loop import VOCAB

    torch.manual_seed(0)
    return GPT(model_preset("tiny", vocab_size=VOCAB, n_kv_heads=4))


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    run_two_processes(TP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    return out


def test_tensor_parallel_forward_equals_one_process(tp_run: Path) -> None:
    saved = torch.load(tp_run / "forward.pt", weights_only=True)
    with torch.no_grad():
        expected = _model()(saved["ids"])
    torch.testing.assert_close(saved["logits"], expected, rtol=0, atol=1e-5)


def test_tensor_parallel_generation_equals_one_process(tp_run: Path) -> None:
    # SFT and DPO evaluate by generating; under TP each process caches only its share of the K/V heads.
    from scratchllm.infer.engine import generate_batch

    saved = torch.load(tp_run / "forward.pt", weights_only=True)
    expected, _ = generate_batch(_mha_model(), [[5, 6, 7], [9, 3]], max_new_tokens=6)
    assert saved["generated"].tolist() == expected


@pytest.mark.parametrize("run", ["tp", "tp_fsdp"])
def test_tensor_parallel_training_equals_one_process(tp_run: Path, tmp_path: Path, run: str) -> None:
    # TP ranks share each batch, so 2 TP processes are one data-parallel replica: the same run as one process.
    single = _model()
    train(single, ToyLM(4), OPTIM, dataclasses.replace(LOOP, max_steps=4, batch_size=4, log_every=1), tmp_path)
    trained = load_file(str(tp_run / run / "final" / "model.safetensors"))  # gathered from the shards
    for name, param in single.state_dict().items():
        if name in trained:
            torch.testing.assert_close(trained[name], param, rtol=0, atol=1e-5, msg=name)
    logged, expected = _train_rows(tp_run / run), _train_rows(tmp_path)
    assert [r["step"] for r in logged] == [r["step"] for r in expected] and expected
    for got, want in zip(logged, expected):  # the loss and the (clipped-over) global gradient norm of each step
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train" and "loss" in r]


def test_shapes_that_do_not_split_evenly_are_refused() -> None:
    check_tensor_parallel(model_preset("tiny", vocab_size=48), 2)
    with pytest.raises(ConfigError, match="n_kv_heads=2"):
        check_tensor_parallel(model_preset("tiny", vocab_size=48), 4)
