"""The model card reports the run's own held-out figures and says so when there are none."""

from __future__ import annotations

import json
from pathlib import Path

from scratchllm.export.model_card import model_card
from scratchllm.model.io import save_model


def test_card_takes_held_out_figures_from_the_stage_summary(tiny_model, tmp_path: Path) -> None:
    model, tok = tiny_model
    final = save_model(tmp_path / "run" / "sft" / "final", model, tok, {})
    summary = {"summary": {"val_loss": 1.2345, "end_rate": 0.875, "train_loss": 0.5, "time_s": 12.0}, "config": {}}
    (tmp_path / "run" / "sft" / "summary.json").write_text(json.dumps(summary))
    card = model_card(model, tok, final, {"model.safetensors": "weights"})
    assert "| val_loss | 1.234 |" in card and "| end_rate | 0.875 |" in card
    assert "train_loss" not in card and "time_s" not in card  # training-set and timing numbers are not held-out
    assert "Stage that wrote this checkpoint: `sft`" in card and f"{model.num_params():,}" in card


def test_card_without_a_run_says_there_are_no_figures(tiny_model, tmp_path: Path) -> None:
    model, tok = tiny_model
    final = save_model(tmp_path / "bare", model, tok, {"imported_from": "/somewhere/hf"})
    card = model_card(model, tok, final, {})
    assert "None recorded for this checkpoint." in card and "Imported from `/somewhere/hf`." in card
