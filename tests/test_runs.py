"""A run dir is the run's identity (rlt.run_dir, docs/runs.md): a resume may not change what is trained, a finished
run never trains past max_steps (also when killed during its final save), every step is logged once, one process
per run dir, and sweep jobs never share a dir."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from rlt.errors import ConfigError, RltError
from rlt.run_dir import HISTORY_FILE, RunLock, config_changes, forget_after, refused_changes
from rlt.tracking import read_metrics
from rlt.train import run_training

from .conftest import REPO

FAST = ["run_cfg=tiny_sft", "eval_steps=null", "max_eval_samples=8", "report_to=[none]"]


def _run(compose, out, *overrides):
    return run_training(compose([*FAST, f"output_dir={out}", *overrides]))


def _steps(out):
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_killed_during_the_final_save_finishes_without_training(compose, tmp_path, capsys):
    """The reproduction of the issue: final/ and summary.json gone (the kill landed while final.tmp existed); the same
    command completes the final save from checkpoint-3 and trains no step 4."""
    _run(compose, tmp_path, "max_steps=3", "save_steps=3")
    shutil.rmtree(tmp_path / "final")
    (tmp_path / "summary.json").unlink()
    (tmp_path / "final.tmp").mkdir()  # the half-written final save
    summary = _run(compose, tmp_path, "max_steps=3", "save_steps=3")
    assert summary["global_step"] == 3 and summary["completed_from"].endswith("checkpoint-3")
    assert "stopped during its final save" in capsys.readouterr().out
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "final.tmp").exists()
    assert _steps(tmp_path) == [1, 2, 3]
    from rlt.models import load_model

    assert load_model(str(tmp_path / "final")).num_parameters() > 0
    again = _run(compose, tmp_path, "max_steps=3", "save_steps=3")  # now finished: nothing to do
    assert again == json.loads((tmp_path / "summary.json").read_text())


def test_resume_refuses_changed_training_settings(compose, tmp_path):
    """Changed lr / schedule / model / a max_steps below the trained steps: one message naming every key old -> new
    and the two ways out; config.yaml keeps what the weights saw. Observational keys (max_steps up, logging) pass
    and are recorded; resume=force records a refused change too."""
    _run(compose, tmp_path, "max_steps=2", "save_steps=2")
    recorded = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        _run(compose, tmp_path, "max_steps=4", "save_steps=2", "learning_rate=1e-5", "lr_scheduler_type=constant")
    message = str(e.value)
    assert "learning_rate: 0.003 -> 1e-05" in message and "lr_scheduler_type: cosine -> constant" in message
    assert "another run_name / output_dir" in message and "resume=force" in message and "max_steps" not in message
    assert (tmp_path / "config.yaml").read_text() == recorded
    with pytest.raises(ConfigError, match=r"max_steps: 2 -> 1 \(the run already trained 2 steps\)"):
        _run(compose, tmp_path, "max_steps=1", "save_steps=2")
    with pytest.raises(ConfigError, match=r"model_name_or_path: rlt:tiny -> rlt:tiny-wide"):
        _run(compose, tmp_path, "max_steps=2", "save_steps=2", "model_name_or_path=rlt:tiny-wide")
    assert (tmp_path / "config.yaml").read_text() == recorded and not (tmp_path / HISTORY_FILE).exists()

    more = _run(compose, tmp_path, "max_steps=3", "save_steps=1", "logging_steps=1")  # how far / observed: allowed
    assert more["global_step"] == 3 and more["resumed_from"].endswith("checkpoint-2")
    (entry,) = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert entry["changes"]["max_steps"] == {"old": 2, "new": 3} and not entry["forced"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["max_steps"] == 3

    forced = _run(compose, tmp_path, "max_steps=4", "save_steps=1", "learning_rate=1e-3", "resume=force")
    assert forced["global_step"] == 4
    last = json.loads((tmp_path / HISTORY_FILE).read_text().splitlines()[-1])
    assert last["forced"] and last["changes"]["learning_rate"] == {"old": 0.003, "new": 0.001}
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_resume_false_in_a_dir_holding_a_run_is_refused(compose, tmp_path):
    _run(compose, tmp_path, "max_steps=1", "save_steps=1")
    with pytest.raises(ConfigError, match="resume=false, but .* holds a run"):
        _run(compose, tmp_path, "max_steps=1", "save_steps=1", "resume=false")


def test_each_step_once_in_metrics_after_a_resume(compose, tmp_path):
    """An attempt killed after logging steps 3-4 but before checkpoint-4 was complete: the resume from checkpoint-2
    drops those records before training them again."""
    _run(compose, tmp_path, "max_steps=4", "save_steps=2")
    shutil.rmtree(tmp_path / "final")
    shutil.rmtree(tmp_path / "checkpoint-4")
    (tmp_path / "summary.json").unlink()
    assert _steps(tmp_path) == [1, 2, 3, 4]
    summary = _run(compose, tmp_path, "max_steps=4", "save_steps=2")
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    assert _steps(tmp_path) == [1, 2, 3, 4]  # not [1, 2, 3, 4, 3, 4]


def test_forget_after_drops_later_records_and_samples(tmp_path):
    """Records of steps after the checkpoint go (metrics.jsonl, samples.jsonl); RLT rows scored at step count
    K >= the checkpoint's step go too (they were scored while training step K + 1)."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.5}) + "\n"
                                                    for s in (1, 1, 2, 2, 3, 3)))
    samples = tmp_path / "stored_completions"
    samples.mkdir()
    for k in (0, 1, 2):
        (samples / f"step_{k}.csv").write_text("step,prompt\n")
    (tmp_path / "teacher_chats").mkdir()
    (tmp_path / "teacher_chats" / "log.txt").write_text("=== step 0 reward 1\na\n=== step 1 reward 2\nb\n"
                                                        "=== step 2 reward 3\nc\n")
    assert forget_after(tmp_path, 2) == 1
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "samples.jsonl")] == [1, 1, 2, 2]  # rows of steps <= 2 kept
    assert sorted(p.name for p in samples.iterdir()) == ["step_0.csv", "step_1.csv"]
    assert (tmp_path / "teacher_chats" / "log.txt").read_text() == "=== step 0 reward 1\na\n=== step 1 reward 2\nb\n"


def test_one_process_per_run_dir(compose, tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RltError, match=r"is in use by process \d+ on .* one process per run dir"):
            _run(compose, tmp_path, "max_steps=1")
    assert _run(compose, tmp_path, "max_steps=1", "save_steps=1")["global_step"] == 1  # released


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rlt.run_dir import RunLock\n"
                               f"with RunLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RltError, match=f"process {holder.pid} "):
        RunLock(tmp_path).__enter__()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):
        pass


def test_sweep_jobs_with_an_explicit_output_dir_get_their_own_dirs(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "rlt.train", "-m", *FAST, "max_steps=2", "save_steps=2",
                           "learning_rate=1e-3,3e-3", f"output_dir={out}", f"results_dir={tmp_path / 'results'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(out.glob("*/summary.json"))
    assert len(summaries) == 2, sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    rates = {yaml.safe_load((s.parent / "config.yaml").read_text())["learning_rate"] for s in summaries}
    assert rates == {1e-3, 3e-3} and all(json.loads(s.read_text())["global_step"] == 2 for s in summaries)


def test_config_changes_and_refusals_by_hand():
    assert config_changes({"lr": 1}, {"lr": 1, "new_key": 7}, {"new_key": 7}) == {}
    assert config_changes({"lr": 1}, {"lr": 2}, {}) == {"lr": (1, 2)}
    assert refused_changes({"logging_steps": (1, 5), "max_steps": (2, 9)}, done_steps=2) == {}
    assert refused_changes({"max_steps": (4, -1)}, done_steps=4) == {}  # epochs: unbounded
    assert refused_changes({"beta": (0.04, 0.0)}, done_steps=1) == {"beta": (0.04, 0.0)}


# ------------------------------------------------------------------------------------------------ signals and faults


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "rlt.train", *FAST, f"output_dir={out}", "max_steps=500", "save_steps=1000",
            *extra]


def _wait_for_steps(proc, out, n, timeout=240):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if len(_steps(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} steps logged in {timeout} s")


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes(tmp_path, signum):
    """SIGTERM (a scheduler's preemption) or one Ctrl-C: a complete checkpoint at the next step boundary, one line,
    exit 128 + signal, no final model; the same command resumes from it and logs every step once."""
    import os
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, out, 3)
    os.kill(proc.pid, getattr(signal, signum))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, signum), stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("rlt: stopped by")]
    step = int(line.split("after step ")[1].split()[0])
    assert f"checkpoint-{step} saved; the same command resumes from it" in line
    assert (out / f"checkpoint-{step}" / ".rlt_complete").exists()
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    done = subprocess.run(_train_cmd(out, f"max_steps={step + 2}"), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith(f"checkpoint-{step}")
    assert _steps(out) == list(range(1, step + 3))


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    import os
    import signal

    from rlt.stop import GracefulStop

    stop = GracefulStop()
    stop._handle(signal.SIGINT, None)  # the first: marks the stop
    assert stop.signum == signal.SIGINT
    child = subprocess.run([sys.executable, "-c", "import signal; from rlt.stop import GracefulStop\n"
                            "s = GracefulStop(); s._handle(signal.SIGINT, None); s._handle(signal.SIGINT, None)\n"
                            "print('not reached')"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 130 and "not reached" not in child.stdout
    assert "stopped at once (second Ctrl-C)" in child.stderr and "Traceback" not in child.stderr
    assert os.getpid()  # this process got no signal


def test_a_corrupt_last_checkpoint_is_skipped(compose, tmp_path, caplog):
    _run(compose, tmp_path, "max_steps=4", "save_steps=2")
    shutil.rmtree(tmp_path / "final")
    (tmp_path / "summary.json").unlink()
    weights = tmp_path / "checkpoint-4" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8 + int.from_bytes(data[:8], "little") + 100])  # a copy cut short after its header
    with caplog.at_level("WARNING"):
        summary = _run(compose, tmp_path, "max_steps=4", "save_steps=2")
    assert "checkpoint-4 is corrupt (model.safetensors is truncated" in caplog.text
    assert "the previous complete checkpoint, checkpoint-2, is used instead" in caplog.text
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    assert (tmp_path / "corrupt-checkpoint-4").is_dir() and _steps(tmp_path) == [1, 2, 3, 4]


def test_output_location_problems_are_one_line_before_loading(compose, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "rlt.train", *FAST, "max_steps=1", f"output_dir={blocker}/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write the run dir {blocker}/run" in lines[0] and "output_dir" in lines[0]

    import shutil as shutil_module

    import rlt.run_dir as run_dir

    real = shutil_module.disk_usage
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(ConfigError, match=r"not enough free space for a checkpoint in .*: one needs ~0\.\d+ GB"):
        _run(compose, tmp_path / "full", "max_steps=1")


def test_a_full_disk_during_training_is_one_line(compose, tmp_path, monkeypatch):
    import errno

    from transformers import Trainer

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    _run(compose, tmp_path, "max_steps=2", "save_steps=2")
    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    with pytest.raises(RltError, match=r"no space left on the device of .* at step \d \(.* GB free; a checkpoint of "
                                       r"this run takes .* GB\): checkpoint-2 is kept"):
        _run(compose, tmp_path, "max_steps=4", "save_steps=1")


def test_a_checkpoint_is_marked_complete_before_older_ones_are_rotated_away(compose, tmp_path, monkeypatch):
    """transformers deletes older checkpoints inside its save, before `on_save` callbacks run; with
    save_total_limit=1 a kill in between left no complete checkpoint. Now the rotation sees the new one marked."""
    import transformers.trainer_utils as trainer_utils

    rotate = trainer_utils.rotate_checkpoints
    seen = []

    def watching(output_dir, save_total_limit=None, **kwargs):
        if save_total_limit:  # the real rotation (the one held back during the save passes None)
            seen.append(sorted(p.parent.name for p in (tmp_path).glob("checkpoint-*/.rlt_complete")))
        return rotate(output_dir, save_total_limit=save_total_limit, **kwargs)

    monkeypatch.setattr(trainer_utils, "rotate_checkpoints", watching)
    _run(compose, tmp_path, "max_steps=3", "save_steps=1", "save_total_limit=1")
    assert seen == [["checkpoint-1"], ["checkpoint-1", "checkpoint-2"], ["checkpoint-2", "checkpoint-3"]]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


def test_a_full_disk_is_recognised_without_its_errno(tmp_path, monkeypatch):
    """torch 2.13's zip writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos ...`` without ENOSPC: counted as a full disk only when the run dir's disk is (nearly) full."""
    import errno
    import shutil
    from collections import namedtuple

    from rlt.recipes.common import disk_full

    usage = namedtuple("usage", "total used free")
    writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    assert disk_full(writer, tmp_path)
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert not disk_full(RuntimeError("CUDA out of memory"), tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    assert not disk_full(writer, tmp_path)  # the same message with space left is another fault: re-raised


def test_checkpoint_state_loads_with_an_indexed_cpu_map_location():
    """Resuming several CPU processes: transformers loads the optimizer state with map_location=args.device, which
    is cpu:<local rank> there (torch could not load it: "don't know how to restore data location ... cpu:0")."""
    import io

    import torch

    import rlt.checkpoints  # noqa: F401 - registers the loader

    buffer = io.BytesIO()
    torch.save({"state": {0: {"exp_avg": torch.arange(3.0)}}}, buffer)
    for location in ("cpu:0", torch.device("cpu", 1), "cpu"):
        buffer.seek(0)
        loaded = torch.load(buffer, map_location=location, weights_only=True)
        assert torch.equal(loaded["state"][0]["exp_avg"], torch.arange(3.0))
