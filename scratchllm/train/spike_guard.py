"""Loss-spike guard, beside the loop's non-finite guard: a step that blows up but stays finite is caught too.

The loop asks `check` before every optimizer step and calls `accept` for the steps it takes. Running statistics
are exponential moving averages over accepted steps only, so a run of bad steps never becomes the new normal.
A step is a spike when its loss lies more than `factor` running standard deviations above the running mean, or
its gradient norm is more than `factor` times its running mean. Worked example (factor 10): losses 3.0, 3.1, 2.9
give mean ~3.0, deviation ~0.04, floored at 0.3 (10% of the mean), so only a loss above 3.0 + 10 * 0.3 = 6.0 is
a spike. The statistics go into every checkpoint, so a resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any

# subtle: a fresh history has no spread (one accepted step), and RL losses sit near 0 where 10% of the mean is
# no floor either; the deviation is floored at 10% of |mean| and at 0.1 nats, so neither case makes a wiggle a spike
RELATIVE_FLOOR, ABSOLUTE_FLOOR = 0.1, 0.1
DECAY = 0.9  # EMA weight of the past: about the last ten accepted steps


class SpikeGuard:
    def __init__(self, factor: float) -> None:
        self.factor = factor  # 0 = off
        self.loss_mean: float | None = None
        self.loss_var = 0.0
        self.grad_mean: float | None = None

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this step is a spike (for the message), or None when it is not (or the guard is off / unarmed)."""
        if not self.factor or self.loss_mean is None or self.grad_mean is None:
            return None
        spread = max(math.sqrt(self.loss_var), RELATIVE_FLOOR * abs(self.loss_mean), ABSOLUTE_FLOOR)
        if loss > self.loss_mean + self.factor * spread:
            return (f"loss {loss:.4g} is more than {self.factor:g} deviations above its running mean "
                    f"{self.loss_mean:.4g} (deviation {spread:.3g})")
        if self.grad_mean > 0 and grad_norm > self.factor * self.grad_mean:
            return f"grad_norm {grad_norm:.4g} is more than {self.factor:g}x its running mean {self.grad_mean:.4g}"
        return None

    def accept(self, loss: float, grad_norm: float) -> None:
        if self.loss_mean is None or self.grad_mean is None:
            self.loss_mean, self.grad_mean = loss, grad_norm
            return
        delta = loss - self.loss_mean
        self.loss_mean += (1 - DECAY) * delta
        self.loss_var = DECAY * (self.loss_var + (1 - DECAY) * delta * delta)  # EW variance (West 1979)
        self.grad_mean += (1 - DECAY) * (grad_norm - self.grad_mean)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_mean": self.loss_mean, "loss_var": self.loss_var, "grad_mean": self.grad_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_mean, self.loss_var, self.grad_mean = state["loss_mean"], state["loss_var"], state["grad_mean"]
