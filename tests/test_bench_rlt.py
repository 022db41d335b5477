"""The RLT benchmarks run end to end with --quick (bench/teacher_reward.py, bench/rlt_step.py,
bench/distill_scoring.py) and write their JSON.

No performance assertions: CPU timings on a shared machine are noise. The one value check is that batched teacher
rewards equal the batch-1 rewards within 1e-4 (also when the teacher's log-probs are the sampling log-probs, as
with vLLM).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _bench(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_teacher_reward_bench_quick(tmp_path):
    (result,) = _bench("teacher_reward", tmp_path)["results"]
    rows = {(r["variant"], r["threads"]): r for r in result["rows"]}
    assert {v for v, _ in rows} == {"batch16", "batch16lp", "batch16w", "batch8", "batch1", "reference"}
    for (variant, _), row in rows.items():
        assert row["completions_per_s"] > 0
        if variant.startswith("batch"):
            assert row["max_abs_delta_vs_batch1"] <= 1e-4, row
    assert result["equal_within_tolerance"]
    assert result["closed"] and result["closed"] < result["completions"]  # closed and unclosed explanations
    assert result["lengths"]["min"] < result["lengths"]["max"]


def test_rlt_step_bench_quick(tmp_path):
    (result,) = _bench("rlt_step", tmp_path)["results"]
    med = result["median"]
    assert med["rlt"]["step_s"] > 0 and med["grpo"]["step_s"] > 0
    assert med["rlt"]["reward"] > 0  # the teacher reward ran, and was timed
    assert result["ratio_rlt_over_grpo"] > 0


def test_distill_scoring_bench_quick(tmp_path):
    (result,) = _bench("distill_scoring", tmp_path)["results"]
    assert result["runs"]["reuse"][0]["reused"] > 0 and result["runs"]["forward"][0]["reused"] == 0
    assert result["mean_reward_delta"] < 1e-4 and result["scoring_speedup"] > 0
