"""Smoke tests of the benchmarks (bench/*.py --quick): each runs end to end and prints its table and a JSON file.
No performance assertions: the numbers depend on the machine and its load (docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *extra: str, timeout: int = 1200) -> tuple[str, dict]:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--json", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads(out.read_text())


def test_generation_quick(tmp_path):
    pytest.importorskip("vllm")
    stdout, result = _run("generation.py", tmp_path)
    assert "generation throughput, tokens/s" in stdout
    assert "vllm/hf wall" in stdout and "rlt:tiny" in stdout
    (model,) = result["results"]
    (case,) = model["cases"]
    assert case["runs"]["hf"][0]["tokens"] == case["runs"]["vllm"][0]["tokens"] == 8 * 16


def _model_that_stops(out: Path) -> Path:
    """rlt:tiny with its eos embedding (tied to the output head) set along the mean final hidden state of a chat
    prompt, scaled so that a sampled row ends at eos after a few tokens, but not always at once (on the benchmark's
    8 prompts at temperature 0.7, 16 tokens: scale 0.5 stopped 5 of 8 rows early, after 1-13 tokens; 1.0 all 8,
    after 1-6; 1.5 all at once)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlt.models import load_tokenizer, resolve_model_path

    path = resolve_model_path("rlt:tiny")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        mean = model.model(**ids).last_hidden_state[0].mean(0)
        model.get_input_embeddings().weight[tokenizer.eos_token_id] = 0.75 * mean / mean.norm()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_generation_stop_at_eos_quick(tmp_path):
    """--stop-at-eos: both backends end rows at eos (a model that samples it), lengths counted up to it."""
    pytest.importorskip("vllm")
    model = _model_that_stops(tmp_path / "stops")
    stdout, result = _run("generation.py", tmp_path, "--models", str(model), "--stop-at-eos", "--temperature", "0.7")
    assert "mean length hf/vllm" in stdout
    (case,) = result["results"][0]["cases"]
    for runs in case["runs"].values():
        (run,) = runs
        assert 1 <= run["mean_length"] < 16 and run["at_limit"] < 8  # rows ended early: eos stopped them
        assert run["tokens"] == round(run["mean_length"] * 8)
    _, fixed = _run("generation.py", tmp_path, "--models", str(model))  # without the flag: exactly 16 per row
    for runs in fixed["results"][0]["cases"][0]["runs"].values():
        assert runs[0]["mean_length"] == 16 and runs[0]["at_limit"] == 8


def test_grpo_step_quick(tmp_path):
    pytest.importorskip("vllm")
    stdout, result = _run("grpo_step.py", tmp_path)
    assert "GRPO optimizer step on CPU" in stdout
    for line in ("ours-hf / trl", "ours-vllm / trl", "where a steady step goes"):
        assert line in stdout
    assert set(result["summary"]["variants"]) == {"trl", "ours-hf", "ours-vllm"}
    assert result["summary"]["trl_and_ours_hf_same_losses"] == [True]
    for run in result["runs"]:
        assert len(run["prompt_length"]) == 3 and max(run["prompt_length"]) < 100, run["prompt_length"]


def test_grpo_step_gsm8k_warm_up_quick(tmp_path, gsm8k_dir):
    """GSM8K prompts and a (2-step) SFT warm-up, built once into the cache dir and reused by the next run."""
    pytest.importorskip("vllm")
    extra = ("--data", "gsm8k", "--gsm8k", str(gsm8k_dir), "--warm-up-steps", "2", "--max-prompt-length", "512",
             "--cache-dir", str(tmp_path / "cache"), "--variants", "trl,ours-hf")
    stdout, result = _run("grpo_step.py", tmp_path, *extra)
    assert "SFT warm-up done" in stdout and "gsm8k prompts" in stdout
    warmed = tmp_path / "cache" / "sft-rlt-tiny-gsm8k-2-528" / "final"
    assert result["args"]["model"] == str(warmed) and (warmed / "config.json").is_file()
    assert result["summary"]["trl_and_ours_hf_same_losses"] == [True]
    for run in result["runs"]:  # GSM8K questions (seen: 137-153), not the synthetic ones (52-73)
        assert min(run["prompt_length"]) > 100, run["prompt_length"]
    stdout, _ = _run("grpo_step.py", tmp_path, *extra)
    assert "SFT warm-up" not in stdout  # the cached model is reused


def test_learning_quick(tmp_path):
    stdout, result = _run("learning.py", tmp_path, "--out", str(tmp_path / "runs"), "--grpo",
                          "generation_backend=hf")
    assert "GRPO learning benchmark" in stdout and "accuracy:" in stdout
    assert set(result["phases"]) == {"sft", "eval_before", "grpo", "eval_after"}
    assert 0.0 <= result["before"]["accuracy"] <= 1.0 and 0.0 <= result["after"]["accuracy"] <= 1.0


def test_padding_quick(tmp_path, gsm8k_dir):
    """Same log-probs in every variant; ours forwards fewer completion positions (the cut, then the length groups)."""
    stdout, result = _run("padding.py", tmp_path, "--data", str(gsm8k_dir / "train.jsonl"))
    assert "GRPO round, training side" in stdout
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == {"trl", "cut", "cut+groups"}
    assert all(r["max_abs_delta_vs_trl"] < 1e-3 for r in rows.values())
    assert rows["cut+groups"]["forwarded_per_valid"] <= rows["cut"]["forwarded_per_valid"] \
        < rows["trl"]["forwarded_per_valid"]
    assert min(result["lengths"]) < max(result["lengths"])


@pytest.mark.vllm
def test_async_step_quick(tmp_path):
    """One sync/async pair of 4-step runs through launch_multi.sh 1 1 --cpu: both measured, the async one stale."""
    pytest.importorskip("vllm")
    stdout, result = _run("async_step.py", tmp_path, "--work", str(tmp_path / "runs"))
    assert "async/sync:" in stdout
    pair = result["step_time"]["tiny_grpo"]["pairs"][0]
    assert pair["sync"]["step_s"] > 0 and pair["async"]["step_s"] > 0 and pair["ratio"] > 0
    assert pair["async"]["async/staleness"][1] == 1.0 and "async/staleness" not in pair["sync"]
