"""Shared fixtures: seeded tiny configs and hermetic run directories."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from scratchllm.config import ModelConfig, model_preset

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """2 layers, d_model 32, vocab ~300: big enough to exercise every code path, fast on CPU."""
    return model_preset("tiny", vocab_size=300)
