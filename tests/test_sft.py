"""SFT recipe end to end on the tiny model: learning, checkpoints, resume after SIGKILL, launcher, multirun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlt.checkpoints import COMPLETE_MARKER, last_complete_checkpoint
from rlt.config import validate
from rlt.tracking import read_metrics
from rlt.train import run_training

from .conftest import REPO

FAST = ["run_cfg=tiny_sft", "report_to=[none]"]


def _run(compose, tmp_path, *overrides):
    return run_training(compose([*FAST, f"output_dir={tmp_path}", *overrides]))


def test_sft_lowers_eval_loss_and_writes_run_dir(compose, tmp_path):
    summary = _run(compose, tmp_path, "max_steps=30", "eval_on_start=true", "eval_steps=15", "save_steps=15",
                   "eval_accuracy_samples=4", "eval_max_new_tokens=8")
    assert summary["global_step"] == 30
    assert summary["eval_loss"] < summary["eval_loss_at_start"] - 1.0, summary  # random init starts near ln(vocab)
    assert summary["eval_perplexity"] == pytest.approx(2.718281828 ** summary["eval_loss"], rel=1e-6)
    assert 0.0 <= summary["accuracy_after"] <= 1.0 and "accuracy_before" in summary
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert any("eval_perplexity" in r for r in records)
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 30
    for step in (15, 30):
        assert (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).exists()
    assert validate(compose([*FAST, "max_steps=30"])).max_steps == 30
    assert "max_steps: 30" in (tmp_path / "config.yaml").read_text()
    from rlt.models import load_model

    assert load_model(str(tmp_path / "final")).num_parameters() > 0


def test_sft_lora_saves_adapter(compose, tmp_path):
    summary = _run(compose, tmp_path, "max_steps=3", "use_peft=true", "lora_r=4", "eval_steps=null")
    assert summary["global_step"] == 3
    assert (tmp_path / "final" / "adapter_config.json").exists()


def test_sft_text_corpus_full_text_loss(compose, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"part{i}.txt").write_text("\n\n".join(f"Paragraph {i}.{j}: the cat sat on mat number {j}."
                                                          for j in range(40)))
    summary = _run(compose, tmp_path / "run", "data_cfg=text_corpus", f"dataset_id_or_path={corpus}",
                   "max_steps=3", "packing=true", "eval_fraction=0.1")
    assert summary["global_step"] == 3 and summary["eval_loss"] > 0


def test_last_complete_checkpoint_skips_and_removes_incomplete(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / COMPLETE_MARKER).write_text("ok\n")
            (d / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert not (tmp_path / "checkpoint-30").exists()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_rerunning_a_finished_run_trains_nothing(compose, tmp_path, capsys):
    """The HF Trainer resumed at max_steps would take one more step (max_steps=2 → 3); a finished run is reported
    as such instead, and raising max_steps continues it."""
    first = _run(compose, tmp_path, "max_steps=2", "save_steps=1")
    again = _run(compose, tmp_path, "max_steps=2", "save_steps=1")
    assert again == json.loads((tmp_path / "summary.json").read_text()) and again["global_step"] == 2
    assert first["global_step"] == 2 and not (tmp_path / "checkpoint-3").exists()
    assert "already finished 2 of max_steps=2 steps; nothing to do" in capsys.readouterr().out
    more = _run(compose, tmp_path, "max_steps=3", "save_steps=1")
    assert more["global_step"] == 3 and more["resumed_from"].endswith("checkpoint-2")


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlt.train", *FAST, f"output_dir={out}", "max_steps=120", "save_steps=10",
            "eval_steps=null", "save_total_limit=2", "max_eval_samples=8", *extra]


def _final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_killed_run_resumes_and_matches_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and last_complete_checkpoint(killed, remove_incomplete=False) is None:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = last_complete_checkpoint(killed, remove_incomplete=False)
    assert killed_at is not None and not (killed / "final").exists(), "killed after the run finished"

    resumed = subprocess.run(_train_cmd(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["global_step"] == 120

    straight = tmp_path / "straight"
    done = subprocess.run(_train_cmd(straight), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((straight / "summary.json").read_text())["global_step"] == 120
    a, b = _final_weights(killed), _final_weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_launch_mono_runs_a_run_file_with_overrides(tmp_path):
    proc = subprocess.run(["./launch_mono.sh", "tiny_sft.yaml", "max_steps=3", "report_to=[none]",
                           f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 3


def test_launch_mono_accepts_path_and_rejects_unknown_run(tmp_path):
    proc = subprocess.run(["./launch_mono.sh", "cfgs/run_cfg/tiny_sft.yaml", "max_steps=1", "--print-config"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "run_name: tiny_sft" in proc.stdout
    bad = subprocess.run(["./launch_mono.sh", "nope.yaml"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "no run config 'nope'" in bad.stderr and "tiny_sft" in bad.stderr


def test_multirun_sweep_gives_one_dir_per_job(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlt.train", "-m", "run_cfg=tiny_sft", "max_steps=2",
                           "report_to=[none]", "learning_rate=1e-3,3e-3", f"results_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "tiny_sft" / "multirun").glob("*/summary.json"))
    assert len(summaries) == 2, list((tmp_path / "tiny_sft").rglob("*"))
    assert {"learning_rate=0.001" in str(s) or "learning_rate=1e-3" in str(s) for s in summaries} == {True, False}
    for s in summaries:
        assert json.loads(s.read_text())["global_step"] == 2
