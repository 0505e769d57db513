"""THE training loop. Every stage (pretrain, SFT, reward, DPO, PPO, GRPO, distill) runs through `train`.

A stage supplies data (`batches`), a loss and its held-out metric (`evaluate`); the loop owns everything
else: device and autocast, accumulation (DDP sync on the last micro-step only), clipping, the schedule,
skipping non-finite steps and loss spikes (train/spike_guard.py), progress bar, TensorBoard + metrics.jsonl,
evaluation, atomic checkpoints and exact resume. It never names a stage. `train` reads as the step of
docs/training-loop.md; `Run` holds its state and names each part (resume, OOM back-off, the compile fallback,
checkpoints under FSDP).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from scratchllm import runtime
from scratchllm.config import LoopConfig, OptimConfig
from scratchllm.errors import UserError
from scratchllm.model.io import unwrap
from scratchllm.model.lora import save_final_model
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


class Stage(ABC):
    """What the loop asks of a stage, and nothing else. A stage sets `name` and implements the first three methods
    (abstract: a stage missing one fails when it is built, not after its compute); the hooks below them have
    defaults that fit a stage training one plain model, and a stage overrides only what differs. Everything a stage needs (data, frozen models, the model it samples from) comes through its
    constructor, so a stage built in a test is the stage the pipeline runs."""

    name: str = ""
    # True when every step calls the whole model and evaluation agrees across ranks: FSDP2 / TP may shard it
    supports_fsdp: bool = False

    @abstractmethod
    def batches(self, split: str) -> Iterator[dict[str, Any]]:  # PPO/GRPO: rollouts happen here
        raise NotImplementedError

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:  # the stage's headline numbers, held out
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs the optimizer steps: by default every parameter that requires a gradient."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """Tokens a batch trains on, for tokens/s; 0 logs no rate."""
        return 0

    def state_dict(self) -> dict[str, Any] | None:
        """The data position (a new dict: the loop keeps the one taken when a step starts); None if stateless."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` written by any number of processes (rescaled by the loop)."""
        return None  # a stage without state has nothing to restore

    def save_final(self, model: nn.Module, directory: Path, tokenizer: Any, sections: dict[str, Any]) -> None:
        """final/: a plain model directory; LoRA adapters are saved beside it and merged in."""
        save_final_model(model, tokenizer, directory, sections)


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
        self.enabled = runtime.is_main()
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


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    for module in model.modules():  # the GPT inside any head or wrapper
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = on


def drain_moe_losses(model: nn.Module) -> None:
    """Drop the MoE auxiliary losses forwards left behind (made before training, or by a failed micro-step): their
    graphs may already be freed, and they must not reach the next backward."""
    moe_aux_loss(model)


class Run:
    """The state one `train` call works on (device, wrapped model, optimizer, step counters, metrics log), and the
    parts of a step that `train` reads as one line each."""

    def __init__(self, model: nn.Module, stage: Stage, optim: OptimConfig, loop: LoopConfig, run_dir: Path,
                 tokenizer: Any, sections: dict[str, Any]) -> None:
        self.stage, self.optim, self.loop, self.tokenizer, self.sections = stage, optim, loop, tokenizer, sections
        self.run_dir, self.checkpoints = run_dir, run_dir / "checkpoints"
        self.device = runtime.resolve_device(loop.device)
        dist.init_from_env(self.device.type)
        torch.manual_seed(loop.seed)
        dist.check_layout(loop, stage)
        self.fsdp = (loop.parallel == "fsdp" or loop.tensor_parallel > 1) and runtime.is_distributed()  # sharded
        # FSDP2 and TP shard the parameters in place, so rank 0 keeps an unsharded copy to write checkpoints and final/ from
        self.unsharded = copy.deepcopy(model).cpu() if self.fsdp and runtime.is_main() else None
        model.to(self.device)
        set_activation_checkpointing(model, loop.activation_checkpointing)
        drain_moe_losses(model)
        self.model = model
        # before the optimizer: FSDP2 and TP swap the parameters
        self.engine = self.eager = dist.wrap(model, self.device, loop.parallel, loop.tensor_parallel)
        named = list(stage.trainable_parameters(model))
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(named, optim, self.device)
        self.log: MetricsLog  # opened by `start`, once resume has said from which step
        self.step, self.skipped, self.train_seconds, self.bad_streak = 0, 0, 0.0, 0
        self.guard = SpikeGuard(loop.spike_factor)
        self.splits = 1  # each drawn batch runs as this many micro-batches; doubles on CUDA out-of-memory
        self.compile_errors: tuple[type[Exception], ...] = ()  # answered by eager mode until a compiled step works
        # subtle: batches are drawn before the step they feed is taken, so mid-step the data position and RNG are
        # ahead of the weights. `step_start` holds them as they were when the unfinished step began (None between
        # steps); a checkpoint written then (Ctrl-C) records those, and the resumed run redraws the same batches.
        self.step_start: tuple[dict[str, Any] | None, Any] | None = None

    def start(self, resume: bool) -> None:
        """Continue from the newest checkpoint that verifies (`resume`), or start over with the earlier run's files
        moved aside; then open the metrics log (a resumed one drops the rows logged after its checkpoint)."""
        if not resume and runtime.is_main() and (moved := set_aside_earlier_run(self.run_dir)) is not None:
            print(f"[{self.stage.name}] starting over: moved the earlier run's files to {moved} (--resume continues a run)")
        dist.barrier()  # no rank looks for checkpoints while rank 0 is still writing or moving them
        if resume:
            self.resume()
        self.log = MetricsLog(self.run_dir, resumed_at=self.step if resume else None)

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies; refuses (CheckpointError) when there is none, rather
        than silently start over."""
        ckpt, notes = resume_point(self.checkpoints)
        for note in notes:
            print(f"[{self.stage.name}] {note}")
        if is_sharded_checkpoint(ckpt):  # written by any number of processes; read as this run is sharded
            state = load_sharded_checkpoint(ckpt, self.model, self.optimizer)
        elif self.fsdp:
            weights, optimizer_state, state = read_training_checkpoint(ckpt)
            dist.load_full_state(self.model, self.optimizer, weights, optimizer_state)
        else:
            state = load_training_checkpoint(ckpt, self.model, self.optimizer)
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        if "spike_guard" in state:
            self.guard.load_state_dict(state["spike_guard"])
        if "stage" in state:  # from any number of processes
            saved_world_size = state.get("data_world_size", runtime.world_size())
            self.stage.load_state_dict(dist.rescale_position(state["stage"], saved_world_size))
        print(f"[{self.stage.name}] resumed from {ckpt} at step {self.step}"
              + (" (the newest checkpoint that verifies)" if notes else ""))

    def try_compile(self) -> None:
        """torch.compile the engine when asked; where it cannot compile, eager mode trains the same model."""
        if not self.loop.compile:
            return
        try:
            self.engine = torch.compile(self.engine)
            from torch._dynamo.exc import TorchDynamoException  # inductor's errors derive from it too

            self.compile_errors = (TorchDynamoException,)
        except Exception as err:  # e.g. Windows without a compiler: eager still trains correctly
            print(f"[{self.stage.name}] torch.compile unavailable ({err}); continuing in eager mode")

    def snapshot(self) -> tuple[dict[str, Any] | None, Any]:
        return self.stage.state_dict(), rng_state()

    def set_lr(self) -> float:
        progress = self.step / self.loop.max_steps
        if self.loop.max_time_s > 0:  # the cosine ends at the time budget when that comes first
            progress = max(progress, self.train_seconds / self.loop.max_time_s)
        lr = lr_at(progress, self.step, self.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def forward_backward(self, batch: dict[str, Any], sync: bool, n_micro: int) -> tuple[float, dict[str, float]]:
        with dist.no_sync_unless(self.engine, sync), autocast_for(self.device, self.loop.dtype):
            loss, stats = self.stage.loss(self.engine, batch)
            aux, aux_stats = moe_aux_loss(self.engine)  # MoE balance + z-loss reach every stage; 0 if dense
        ((loss + aux) / n_micro).backward()
        return loss.item(), {**stats, **aux_stats}

    def eager_after_compile_error(self, err: Exception) -> None:
        """torch.compile compiles lazily, so its errors surface at the first call: fall back to eager mode."""
        cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the real one
        reason = (str(cause).strip().splitlines() or [""])[0][:200]
        print(f"[{self.stage.name}] torch.compile failed at the first step ({type(cause).__name__}: {reason}); "
              "continuing in eager mode")
        self.engine = self.eager
        self.optimizer.zero_grad(set_to_none=True)  # anything the failed call accumulated
        drain_moe_losses(self.eager)

    def accumulate(self, batches: Iterator[dict[str, Any]], drawn: list[dict[str, Any]]) -> tuple[float, dict[str, float], int]:
        """Forward + backward over the step's batches, each split in `splits`; (mean loss, mean stats, tokens).

        Batches are drawn when first needed (PPO/GRPO sample rollouts then) and kept in `drawn` for a retry."""
        n = self.loop.grad_accum_steps * self.splits
        loss_sum, stats_sum, step_tokens = 0.0, {}, 0
        for i in range(n):
            if i // self.splits == len(drawn):
                drawn.append(next(batches))
            batch, sync = _to(_split(drawn[i // self.splits], self.splits)[i % self.splits], self.device), i == n - 1
            try:
                loss, stats = self.forward_backward(batch, sync, n)
            except self.compile_errors as err:
                self.eager_after_compile_error(err)
                loss, stats = self.forward_backward(batch, sync, n)
            self.compile_errors = ()  # it compiled: any later error is a real one
            loss_sum += loss / n
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / n
            step_tokens += self.stage.tokens_in(batch)
        return loss_sum, stats_sum, step_tokens

    def accumulate_with_oom_backoff(self, batches: Iterator[dict[str, Any]]) -> tuple[float, dict[str, float], int]:
        """`accumulate`, redone with the micro-batch halved on CUDA out-of-memory (the same rows per step); the
        loss is the global mean, so every rank logs and decides alike."""
        drawn: list[dict[str, Any]] = []
        while True:
            try:
                loss, stats, step_tokens = self.accumulate(batches, drawn)
                return dist.all_reduce_mean(loss, self.device), stats, step_tokens
            except torch.OutOfMemoryError:
                rows = _rows(drawn[-1])
                if runtime.is_distributed() or 2 * self.splits > rows:
                    raise  # ranks cannot agree on a new split without a collective; one row cannot be halved
                self.optimizer.zero_grad(set_to_none=True)  # redo the whole step: a backward may have half-finished
                drain_moe_losses(self.eager)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.splits *= 2
                accum = self.loop.grad_accum_steps * self.splits
                print(f"[{self.stage.name}] CUDA out of memory at step {self.step}: micro-batch {rows // self.splits} "
                      f"x {accum} accumulation steps from now on (same batch per step)")
                self.log.write(self.step, "train", {"micro_batch_size": rows // self.splits, "grad_accum_steps": accum})

    def clip_gradients(self) -> float:
        return dist.clip_grad_norm(self.params, self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf"))

    def bad_step(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must not reach the weights (non-finite, or a loss spike), or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite step (loss={loss}, grad_norm={grad_norm})"
        spike = self.guard.check(loss, grad_norm)
        return f"loss spike ({spike}; --loop.spike_factor={self.loop.spike_factor:g}, 0 turns the guard off)" if spike else None

    def skip_bad_step(self, why: str) -> None:
        """Drop a bad step's gradients (they never reach the weights); stop after too many in a row, or at the first
        spike with --loop.spike_action=stop, moving aside a checkpoint that holds the diverged weights."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.bad_streak += 1
        spike = why.startswith("loss spike")
        self.log.write(self.step, "train", {"skipped_spike" if spike else "skipped_nonfinite": self.skipped})
        if self.bad_streak >= self.loop.max_bad_steps or (spike and self.loop.spike_action == "stop"):
            moved = reject_checkpoint(self.checkpoints, self.step) if runtime.is_main() else None
            rejected = f" The checkpoint of step {self.step} holds these weights: moved to {moved}." if moved else ""
            raise TrainingDiverged(f"[{self.stage.name}] {self.bad_streak} bad step(s) in a row at step {self.step}, the "
                                   f"last a {why}. Try a lower --optim.lr, a longer --optim.warmup_steps, "
                                   f"--loop.dtype=float32, or check the data.{rejected}")

    def optimizer_step(self, loss: float, grad_norm: float) -> None:
        self.bad_streak = 0
        self.guard.accept(loss, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.step_start = self.step + 1, None

    def log_step(self, bar: tqdm, row: dict[str, float], elapsed: float, step_tokens: int) -> None:
        if step_tokens:
            row["tokens_per_s"] = step_tokens * runtime.world_size() / max(elapsed, 1e-9)
        if self.step % self.loop.log_every == 0 or self.step == 1:
            self.log.write(self.step, "train", row)
        rate = {"tok/s": f"{row['tokens_per_s']:.0f}"} if step_tokens else {}
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", **rate)
        bar.update(1)

    def evaluate(self) -> dict[str, float]:
        unwrap(self.engine).eval()
        with torch.no_grad(), autocast_for(self.device, self.loop.dtype):
            metrics = self.stage.evaluate(unwrap(self.engine))
        unwrap(self.engine).train()
        self.log.write(self.step, "eval", metrics)
        return metrics

    def periodic(self) -> bool:
        """Evaluate and checkpoint when due; True when the time budget is spent."""
        loop, step = self.loop, self.step
        if loop.eval_every and step % loop.eval_every == 0 and step < loop.max_steps:
            self.evaluate()
        if loop.checkpoint_every and step % loop.checkpoint_every == 0:
            self.checkpoint()
        if loop.max_time_s > 0 and self.train_seconds >= loop.max_time_s:
            print(f"\n[{self.stage.name}] time budget of {loop.max_time_s:.0f}s reached at step {step}")
            return True
        return False

    def checkpoint(self, final: bool = False) -> None:
        stage_state, rng = self.step_start or self.snapshot()
        loop_state = {"skipped": self.skipped, "train_seconds": self.train_seconds,
                      "data_world_size": runtime.world_size(), "spike_guard": self.guard.state_dict()}
        if stage_state is not None:
            loop_state["stage"] = stage_state
        if self.loop.sharded_checkpoint:  # every rank writes its own shards; final/ below still needs the gather
            save_sharded_checkpoint(self.checkpoints, self.step, self.model, self.optimizer, loop_state, self.tokenizer,
                                    self.sections, self.loop.keep_checkpoints, rng=rng)
            if not (self.fsdp and final):
                return
        saved, optimizer_state = self.gathered_for_saving()
        if runtime.is_main() and not self.loop.sharded_checkpoint:
            save_training_checkpoint(self.checkpoints, self.step, saved, optimizer_state, loop_state, self.tokenizer,
                                     self.sections, self.loop.keep_checkpoints, rng=rng)

    def gathered_for_saving(self) -> tuple[nn.Module, Any]:
        """(model, optimizer state) to write: under FSDP every rank joins the gather and rank 0 loads the full
        weights into its unsharded copy; otherwise the model and optimizer as they are."""
        if not self.fsdp:
            return self.model, self.optimizer
        weights, optimizer_state = dist.full_state(self.model, self.optimizer)
        if self.unsharded is not None:
            self.unsharded.load_state_dict(weights)
        return self.unsharded, optimizer_state

    def save_final(self) -> None:
        if runtime.is_main():
            final = self.unsharded if self.fsdp else unwrap(self.engine)  # under FSDP, checkpoint() just loaded it
            self.stage.save_final(final, self.run_dir / "final", self.tokenizer, self.sections)


def train(
    model: nn.Module,
    stage: Stage,
    optim: OptimConfig,
    loop: LoopConfig,
    run_dir: Path,
    resume: bool = False,
    tokenizer: Any = None,
    config_sections: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train `model` on `stage` in `run_dir` (= runs/<name>/<stage>); return the final held-out metrics."""
    run = Run(model, stage, optim, loop, Path(run_dir), tokenizer, config_sections or {})
    run.start(resume)
    run.try_compile()
    if run.step == 0:
        run.evaluate()  # the "before" number every stage is judged against
    batches = stage.batches("train")
    bar = tqdm(total=loop.max_steps, initial=run.step, desc=stage.name, disable=not runtime.is_main(), dynamic_ncols=True)
    run.engine.train()
    try:
        while run.step < loop.max_steps:
            run.step_start = run.snapshot()
            tick = time.perf_counter()
            lr = run.set_lr()
            loss, stats, step_tokens = run.accumulate_with_oom_backoff(batches)
            grad_norm = run.clip_gradients()
            if why := run.bad_step(loss, grad_norm):
                run.skip_bad_step(why)
                continue
            run.optimizer_step(loss, grad_norm)
            elapsed = time.perf_counter() - tick
            run.train_seconds += elapsed
            run.log_step(bar, {"loss": loss, "lr": lr, "grad_norm": grad_norm, **stats}, elapsed, step_tokens)
            if run.periodic():
                break
    except KeyboardInterrupt:
        print(f"\n[{stage.name}] interrupted: saving a checkpoint at step {run.step} (resume with --resume)")
        run.checkpoint()
        raise
    finally:
        bar.close()
    metrics = run.evaluate()
    run.checkpoint(final=True)
    run.save_final()
    return {**metrics, "steps": run.step, "skipped_steps": run.skipped, "train_seconds": round(run.train_seconds, 1)}
