"""benchmarks/bench_mfu.py runs alone at toy scale on the CPU and reports all three models (issue 14 smoke check).

The GPU figures need a GPU; this keeps the script from breaking before a session with one gets to run it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_mfu_tiny_cpu_run_reports_three_models(tmp_path: Path) -> None:
    out = tmp_path / "mfu.json"
    cmd = [sys.executable, "benchmarks/bench_mfu.py", "--preset", "tiny", "--batch", "2", "--seq", "64",
           "--steps", "2", "--warmup", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["model"]: row for row in result["models"]}
    assert set(rows) == {"ours", "llama", "nanogpt"}
    assert math.isfinite(result["peak_flops"]) and result["peak_flops"] > 0
    for name, row in rows.items():
        assert "error" not in row, (name, row["error"])
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, name
        assert 0 < row["mfu"] < 1.5, (name, row["mfu"])  # measured peak is a median: a model may edge past it
        assert math.isfinite(row["last_loss"]), name
        assert row["label"] in proc.stdout, name
    assert rows["ours"]["ratio_to_ours"] == 1.0
    # 6N counts matmul weights only: the tied lm_head once, embedding lookups and position tables not at all.
    assert rows["nanogpt"]["matmul_params"] < rows["nanogpt"]["params"]
