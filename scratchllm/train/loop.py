"""THE training loop. Every stage (pretrain, SFT, reward, DPO, PPO, GRPO, distill) runs through `train`.

A stage supplies data (`batches`), a loss and its held-out metric (`evaluate`); the loop owns everything
else: device and autocast, accumulation (DDP sync on the last micro-step only), clipping, the schedule,
skipping non-finite steps and loss spikes (train/spike_guard.py), progress bar, TensorBoard + metrics.jsonl,
evaluation, atomic checkpoints and exact resume. It never names a stage.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from scratchllm import runtime
from scratchllm.config import LoopConfig, OptimConfig
from scratchllm.errors import UserError
from scratchllm.model.io import unwrap
from scratchllm.model.moe import moe_aux_loss
from scratchllm.train import distributed as dist
from scratchllm.train.checkpoint import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    load_training_checkpoint,
    read_training_checkpoint,
    reject_checkpoint,
    resume_point,
    rng_state,
    save_sharded_checkpoint,
    save_training_checkpoint,
    set_aside_earlier_run,
)
from scratchllm.train.optim import build_optimizer, lr_at
from scratchllm.train.spike_guard import SpikeGuard


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite or spiking steps in a row: the run stops instead of writing them into the weights."""


@runtime_checkable
class Stage(Protocol):
    name: str

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]: ...  # PPO/GRPO: rollouts happen here
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...  # the stage's headline numbers, held out


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default (float32 master weights); float32 elsewhere unless asked."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _rows(batch: dict[str, Any]) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def _split(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """`batch` as n micro-batches of its rows (tensors whose first dimension is the batch; anything else is shared).

    Equal chunks of a per-row mean loss average to the whole batch's loss, as accumulation does."""
    if n == 1:
        return [batch]
    rows = _rows(batch)
    parts = {k: v.tensor_split(n) for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows}
    return [{k: parts[k][i] if k in parts else v for k, v in batch.items()} for i in range(n)]


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by rank 0 only.

    `resumed_at`: the step a resumed run continues from; rows logged after it by the interrupted run are dropped,
    since the resumed run logs those steps again (no duplicate rows)."""

    def __init__(self, stage_dir: Path, resumed_at: int | None = None) -> None:
        self.enabled = dist.is_main()
        self.path = stage_dir / "metrics.jsonl"
        self.writer = None
        if self.enabled:
            stage_dir.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None and self.path.exists():
                self._truncate(resumed_at)
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resumed_at is None else resumed_at + 1  # TensorBoard's own truncation
                self.writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=purge)
            except ImportError:  # TensorBoard is optional; metrics.jsonl is always written
                self.writer = None

    def _truncate(self, step: int) -> None:
        lines = self.path.read_text().splitlines()
        # subtle: a line cut short by a kill is dropped too; it is the last one and belongs to a replayed step
        kept = [line for line in lines if line.endswith("}") and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)
            self.writer.flush()


def _rejected(checkpoints: Path, step: int) -> str:
    """Move aside a checkpoint holding the weights that just diverged (written at this very step); say so."""
    moved = reject_checkpoint(checkpoints, step) if dist.is_main() else None
    return f" The checkpoint of step {step} holds these weights: moved to {moved}." if moved else ""


def train(
    model: nn.Module,
    stage: Stage,
    optim: OptimConfig,
    loop: LoopConfig,
    run_dir: Path,
    resume: bool = False,
    tokenizer: Any = None,
    config_sections: dict[str, Any] | None = None,
    sample_prompts: list[str] | None = None,
) -> dict[str, float]:
    """Train `model` on `stage` in `run_dir` (= runs/<name>/<stage>); return the final held-out metrics."""
    run_dir = Path(run_dir)
    device = runtime.resolve_device(loop.device)
    dist.init_from_env(device.type)
    torch.manual_seed(loop.seed)
    dist.check_layout(loop, stage)
    fsdp = (loop.parallel == "fsdp" or loop.tensor_parallel > 1) and dist.is_distributed()  # parameters sharded
    # FSDP2 and TP shard the parameters in place, so rank 0 keeps an unsharded copy to write checkpoints and final/ from
    unsharded = copy.deepcopy(model).cpu() if fsdp and dist.is_main() else None
    model.to(device)
    for module in model.modules():  # the GPT inside any head or wrapper
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = loop.activation_checkpointing
    moe_aux_loss(model)  # drop aux losses of forwards made before training: their graphs may already be freed
    # before the optimizer: FSDP2 and TP swap the parameters
    engine = eager = dist.wrap(model, device, loop.parallel, loop.tensor_parallel)
    named = list(stage.trainable_parameters(model)) if hasattr(stage, "trainable_parameters") else [
        (n, p) for n, p in model.named_parameters() if p.requires_grad
    ]
    params = [p for _, p in named]
    optimizer = build_optimizer(named, optim, device)
    sections = config_sections or {}
    checkpoints = run_dir / "checkpoints"
    step, skipped, train_seconds = 0, 0, 0.0
    guard = SpikeGuard(loop.spike_factor)
    if not resume and dist.is_main() and (moved := set_aside_earlier_run(run_dir)) is not None:
        print(f"[{stage.name}] starting over: moved the earlier run's files to {moved} (--resume continues a run)")
    dist.barrier()  # no rank looks for checkpoints while rank 0 is still writing or moving them
    if resume:  # refuses (CheckpointError) when nothing verifies, rather than silently start over
        ckpt, notes = resume_point(checkpoints)
        for note in notes:
            print(f"[{stage.name}] {note}")
        if is_sharded_checkpoint(ckpt):  # written by any number of processes; read as this run is sharded
            state = load_sharded_checkpoint(ckpt, model, optimizer)
        elif fsdp:
            weights, optimizer_state, state = read_training_checkpoint(ckpt)
            dist.load_full_state(model, optimizer, weights, optimizer_state)
        else:
            state = load_training_checkpoint(ckpt, model, optimizer)
        step, skipped, train_seconds = state["step"], state.get("skipped", 0), state.get("train_seconds", 0.0)
        if "spike_guard" in state:
            guard.load_state_dict(state["spike_guard"])
        if hasattr(stage, "load_state_dict") and "stage" in state:  # from any number of processes
            stage.load_state_dict(dist.rescale_position(state["stage"], state.get("data_world_size", dist.world_size())))
        print(f"[{stage.name}] resumed from {ckpt} at step {step}"
              + (" (the newest checkpoint that verifies)" if notes else ""))
    log = MetricsLog(run_dir, resumed_at=step if resume else None)
    compile_errors: tuple[type[Exception], ...] = ()  # answered by eager mode until a compiled micro-step succeeds
    if loop.compile:
        try:
            engine = torch.compile(engine)
            from torch._dynamo.exc import TorchDynamoException  # inductor's errors derive from it too

            compile_errors = (TorchDynamoException,)
        except Exception as err:  # e.g. Windows without a compiler: eager still trains correctly
            print(f"[{stage.name}] torch.compile unavailable ({err}); continuing in eager mode")

    # subtle: batches are drawn before the step they feed is taken, so mid-step the data position and RNG are
    # ahead of the weights. `step_start` holds them as they were when the unfinished step began (None between
    # steps); a checkpoint written then (Ctrl-C) records those, and the resumed run redraws the same batches.
    step_start: tuple[dict[str, Any] | None, Any] | None = None

    def snapshot() -> tuple[dict[str, Any] | None, Any]:
        return (stage.state_dict() if hasattr(stage, "state_dict") else None), rng_state()

    def checkpoint(final: bool = False) -> None:
        stage_state, rng = step_start or snapshot()
        loop_state = {"skipped": skipped, "train_seconds": train_seconds, "data_world_size": dist.world_size(),
                      "spike_guard": guard.state_dict()}
        if stage_state is not None:
            loop_state["stage"] = stage_state
        if loop.sharded_checkpoint:  # every rank writes its own shards; final/ below still needs the gather
            save_sharded_checkpoint(checkpoints, step, model, optimizer, loop_state, tokenizer, sections,
                                    loop.keep_checkpoints, rng=rng)
            if not (fsdp and final):
                return
        saved, optimizer_state = model, optimizer
        if fsdp:  # every rank joins the gather; rank 0 loads the full weights into its unsharded copy
            weights, optimizer_state = dist.full_state(model, optimizer)
            if unsharded is not None:
                unsharded.load_state_dict(weights)
            saved = unsharded
        if dist.is_main() and not loop.sharded_checkpoint:
            save_training_checkpoint(checkpoints, step, saved, optimizer_state, loop_state, tokenizer, sections,
                                     loop.keep_checkpoints, rng=rng)

    def forward_backward(batch: dict[str, Any], sync: bool, n_micro: int) -> tuple[float, dict[str, float]]:
        with dist.no_sync_unless(engine, sync), autocast_for(device, loop.dtype):
            loss, stats = stage.loss(engine, batch)
            aux, aux_stats = moe_aux_loss(engine)  # MoE balance + z-loss reach every stage; 0 if dense
        ((loss + aux) / n_micro).backward()
        return loss.item(), {**stats, **aux_stats}

    splits = 1  # each drawn batch runs as this many micro-batches; doubles on CUDA out-of-memory

    def accumulate(drawn: list[dict[str, Any]]) -> tuple[float, dict[str, float], int]:
        """Forward + backward over the step's batches, each split in `splits`; (mean loss, mean stats, tokens).

        Batches are drawn when first needed (PPO/GRPO sample rollouts then) and kept in `drawn` for a retry."""
        nonlocal engine, compile_errors
        n = loop.grad_accum_steps * splits
        loss_sum, stats_sum, step_tokens = 0.0, {}, 0
        for i in range(n):
            if i // splits == len(drawn):
                drawn.append(next(train_iter))
            batch, sync = _to(_split(drawn[i // splits], splits)[i % splits], device), i == n - 1
            try:
                loss, stats = forward_backward(batch, sync, n)
            except compile_errors as err:  # torch.compile compiles lazily: its errors surface at the first call
                cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the real one
                reason = (str(cause).strip().splitlines() or [""])[0][:200]
                print(f"[{stage.name}] torch.compile failed at the first step ({type(cause).__name__}: {reason}); "
                      "continuing in eager mode")
                engine = eager
                optimizer.zero_grad(set_to_none=True)  # anything the failed call accumulated
                moe_aux_loss(eager)
                loss, stats = forward_backward(batch, sync, n)
            compile_errors = ()  # it compiled: any later error is a real one
            loss_sum += loss / n
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / n
            step_tokens += stage.tokens_in(batch) if hasattr(stage, "tokens_in") else 0
        return loss_sum, stats_sum, step_tokens

    def evaluate() -> dict[str, float]:
        unwrap(engine).eval()
        with torch.no_grad(), autocast_for(device, loop.dtype):
            metrics = stage.evaluate(unwrap(engine))
        unwrap(engine).train()
        log.write(step, "eval", metrics)
        return metrics

    if step == 0:
        evaluate()  # the "before" number every stage is judged against
    train_iter = stage.batches("train")
    bar = tqdm(total=loop.max_steps, initial=step, desc=stage.name, disable=not dist.is_main(), dynamic_ncols=True)
    bad_streak, tokens_seen = 0, 0
    engine.train()
    try:
        while step < loop.max_steps:
            step_start = snapshot()
            tick = time.perf_counter()
            progress = step / loop.max_steps
            if loop.max_time_s > 0:  # the cosine ends at the time budget when that comes first
                progress = max(progress, train_seconds / loop.max_time_s)
            lr = lr_at(progress, step, optim)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            drawn: list[dict[str, Any]] = []
            while True:
                try:
                    loss_sum, stats_sum, step_tokens = accumulate(drawn)
                    break
                except torch.OutOfMemoryError:
                    rows = _rows(drawn[-1])
                    if dist.is_distributed() or 2 * splits > rows:
                        raise  # ranks cannot agree on a new split without a collective; one row cannot be halved
                    optimizer.zero_grad(set_to_none=True)  # redo the whole step: a backward may have half-finished
                    moe_aux_loss(eager)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    splits *= 2
                    print(f"[{stage.name}] CUDA out of memory at step {step}: micro-batch {rows // splits} x "
                          f"{loop.grad_accum_steps * splits} accumulation steps from now on (same batch per step)")
                    log.write(step, "train", {"micro_batch_size": rows // splits,
                                              "grad_accum_steps": loop.grad_accum_steps * splits})
            loss_sum = dist.all_reduce_mean(loss_sum, device)  # the global mean: every rank logs and decides alike
            clip = optim.grad_clip if optim.grad_clip > 0 else float("inf")
            grad_norm = dist.clip_grad_norm(params, clip)
            finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
            spike = guard.check(loss_sum, grad_norm) if finite else None
            if not finite or spike:
                optimizer.zero_grad(set_to_none=True)  # the bad step never reaches the weights
                skipped += 1
                bad_streak += 1
                log.write(step, "train", {"skipped_spike" if spike else "skipped_nonfinite": skipped})
                if bad_streak >= loop.max_bad_steps or (spike and loop.spike_action == "stop"):
                    why = (f"loss spike ({spike}; --loop.spike_factor={loop.spike_factor:g}, 0 turns the guard off)"
                           if spike else f"non-finite step (loss={loss_sum}, grad_norm={grad_norm})")
                    raise TrainingDiverged(f"[{stage.name}] {bad_streak} bad step(s) in a row at step {step}, the last a "
                                           f"{why}. Try a lower --optim.lr, a longer --optim.warmup_steps, "
                                           f"--loop.dtype=float32, or check the data.{_rejected(checkpoints, step)}")
                continue
            bad_streak = 0
            guard.accept(loss_sum, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, step_start = step + 1, None
            elapsed = time.perf_counter() - tick
            train_seconds += elapsed
            tokens_seen += step_tokens
            row = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, **stats_sum}
            if step_tokens:
                row["tokens_per_s"] = step_tokens * dist.world_size() / max(elapsed, 1e-9)
            if step % loop.log_every == 0 or step == 1:
                log.write(step, "train", row)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}", **({"tok/s": f"{row['tokens_per_s']:.0f}"} if step_tokens else {}))
            bar.update(1)
            if loop.eval_every and step % loop.eval_every == 0 and step < loop.max_steps:
                evaluate()
            if loop.checkpoint_every and step % loop.checkpoint_every == 0:
                checkpoint()
            if loop.max_time_s > 0 and train_seconds >= loop.max_time_s:
                print(f"\n[{stage.name}] time budget of {loop.max_time_s:.0f}s reached at step {step}")
                break
    except KeyboardInterrupt:
        print(f"\n[{stage.name}] interrupted: saving a checkpoint at step {step} (resume with --resume)")
        checkpoint()
        raise
    finally:
        bar.close()
    metrics = evaluate()
    checkpoint(final=True)
    if dist.is_main():
        final_dir = run_dir / "final"
        final = unsharded if fsdp else unwrap(engine)  # under FSDP, checkpoint() has just loaded the last weights
        if hasattr(stage, "save_final"):
            stage.save_final(final, final_dir)
        else:
            from scratchllm.model.io import save_model

            save_model(final_dir, final, tokenizer, sections)
    return {**metrics, "steps": step, "skipped_steps": skipped, "train_seconds": round(train_seconds, 1)}
