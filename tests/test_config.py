import pytest

from scratchllm.config import (
    ConfigError,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    apply_overrides,
    from_dict,
    model_preset,
    to_dict,
)
from scratchllm.pipeline import parse_args


def test_overrides_are_coerced_to_field_types() -> None:
    out = apply_overrides(
        {"model": model_preset("mini"), "optim": OptimConfig(), "loop": LoopConfig()},
        ["--model.n_layers=4", "optim.lr=1e-3", "--loop.compile=true", "--model.rope_theta=500000"],
    )
    assert out["model"].n_layers == 4 and isinstance(out["model"].n_layers, int)
    assert out["optim"].lr == pytest.approx(1e-3)
    assert out["loop"].compile is True
    assert out["model"].rope_theta == 500000.0


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="valid keys of model: vocab_size, d_model"):
        apply_overrides({"model": ModelConfig()}, ["--model.n_layer=4"])
    with pytest.raises(ConfigError, match="valid sections"):
        apply_overrides({"model": ModelConfig()}, ["--modle.n_layers=4"])


def test_bad_value_names_flag() -> None:
    with pytest.raises(ConfigError, match="--model.n_layers"):
        apply_overrides({"model": ModelConfig()}, ["--model.n_layers=four"])
    with pytest.raises(ConfigError, match="--section.key=value"):
        apply_overrides({"model": ModelConfig()}, ["n_layers=4"])


def test_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--model.n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="--model.n_heads"):
        apply_overrides({"model": ModelConfig()}, ["--model.d_model=100"])
    with pytest.raises(ConfigError, match="--loop.device"):
        LoopConfig(device="tpu")


def test_auto_d_ff_follows_overridden_width() -> None:
    cfg = apply_overrides({"model": model_preset("mini")}, ["--model.d_model=576"])["model"]  # 12 heads of 48
    assert cfg.resolved_d_ff == 64 * -(-(8 * 576 // 3) // 64)
    assert cfg.resolved_d_ff % 64 == 0 and cfg.resolved_d_ff >= 8 * 576 // 3


def test_json_round_trip() -> None:
    cfg = model_preset("small")
    assert from_dict(ModelConfig, to_dict({"m": cfg})["m"]) == cfg


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        model_preset("huge")


def test_tokenizer_vocab_default_has_one_source() -> None:
    assert parse_args([])[0].vocab_size == TokenizerConfig().vocab_size


def test_grpo_config_validation_names_the_flag() -> None:
    from scratchllm.config import GRPOConfig

    for kwargs, flag in (({"group_size": 1}, "--grpo.group_size"), ({"curriculum_decay": 1.0}, "--grpo.curriculum_decay"),
                         ({"curriculum_floor": 0.0}, "--grpo.curriculum_floor"), ({"eval_samples": -1}, "--grpo.eval_samples")):
        with pytest.raises(ConfigError, match=flag):
            GRPOConfig(**kwargs)


def test_benchmark_distill_default_student_is_a_valid_shape_of_the_current_mini() -> None:
    # The benchmark's student is `mini` with overrides; when `mini` changed its head counts, the old overrides
    # (n_heads 4 against the preset's 6 KV heads) stopped the benchmark before it trained anything.
    import importlib.util
    from pathlib import Path

    from scratchllm.config import apply_overrides, model_preset

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distill.py"
    spec = importlib.util.spec_from_file_location("bench_distill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    student = apply_overrides({"model": model_preset("mini", vocab_size=4096)}, module.DEFAULT_STUDENT)["model"]
    assert (student.d_model, student.n_layers, student.n_heads, student.n_kv_heads) == (128, 4, 4, 2)
