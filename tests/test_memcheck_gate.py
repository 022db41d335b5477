"""The trainers refuse a run whose estimated peak GPU memory exceeds the budget, before any weights load."""

import subprocess

import pytest

from rlt.config import validate
from rlt.errors import ConfigError
from rlt.memcheck import check_before_training

from .conftest import REPO


def test_gate_passes_fails_and_skips(compose):
    assert check_before_training(validate(compose(["run_cfg=tiny_sft"]))) is None  # no GPU, no budget: skipped
    ok = check_before_training(validate(compose(["run_cfg=tiny_sft", "memcheck_gpu_memory=85GB"])))
    assert ok.startswith("memory check: peak") and ok.endswith("(PASS)")
    big = ["run_cfg=tiny_sft", "model_cfg=qwen2.5_7b_instruct", "max_length=4096", "memcheck_gpu_memory=80GiB"]
    with pytest.raises(ConfigError, match=r"\(FAIL\): this run would run out of GPU memory") as e:
        check_before_training(validate(compose(big)))
    assert "gradient_checkpointing=true" in str(e.value)  # a concrete suggestion
    assert check_before_training(validate(compose([*big, "memcheck=false"]))) is None


def test_launch_mono_refuses_a_run_that_does_not_fit():
    # attn_implementation=sdpa: the 7B model file asks for flash-attention, which the preflight refuses here first
    proc = subprocess.run(["./launch_mono.sh", "tiny_sft", "model_cfg=qwen2.5_7b_instruct", "max_length=4096",
                           "memcheck_gpu_memory=80GiB", "attn_implementation=sdpa"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "this run would run out of GPU memory" in proc.stderr and "Traceback" not in proc.stderr


def test_unitless_budget_is_a_config_error(compose):
    with pytest.raises(ConfigError, match=r"memcheck_gpu_memory: the size '85' has no unit"):
        validate(compose(["run_cfg=tiny_sft", "memcheck_gpu_memory=85"]))
