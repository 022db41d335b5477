"""A run dir is the run's identity: the config its checkpoints came from, one process at a time, each step once.

`open_run` decides, before any model loads, what a command may do in its run dir: start, resume (settings that only
change how far or how the run is observed may differ, and are recorded), finish a final save that a kill
interrupted, report a finished run, or refuse with every differing key. `RunLock` keeps a second process out;
`forget_after` drops what an interrupted attempt logged past the checkpoint it resumes from. docs/runs.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlt.checkpoints import atomic_write_text, last_complete_checkpoint, write_json_atomic
from rlt.errors import ConfigError, RltError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".rlt.lock"

# Keys that change how far a run goes or how it is observed, placed or computed, not what it trains: a resume may
# change them (recorded in config_history.jsonl). Every other key differing from the run's config stops a resume.
OBSERVATIONAL = frozenset({
    "max_steps", "num_train_epochs", "run_name", "results_dir", "output_dir", "resume", "resume_from", "verbose",
    "samples_every", "samples_per_dump", "plots", "wandb_tags", "sweep_objective", "sweep_direction",
    "save_final_model", "report_to", "wandb_project", "wandb_group", "wandb_mode", "logging_steps", "save_steps",
    "save_total_limit", "eval_steps", "eval_on_start", "per_device_eval_batch_size", "max_eval_samples",
    "eval_accuracy_samples", "eval_max_new_tokens", "log_completions", "logging_prob",
    "save_completions_probability", "memcheck", "memcheck_gpu_memory", "memcheck_model_arch",
    "memcheck_student_arch", "gradient_checkpointing", "offload_untrained_models", "teacher_reward_batch_size",
    "teacher_reward_tokens_per_forward", "vllm_gpu_memory_utilization", "vllm_kv_cache_memory_bytes",
    "vllm_enable_sleep_mode", "vllm_enable_prefix_caching", "vllm_server_host", "vllm_server_port",
    "vllm_server_urls", "vllm_server_timeout", "vllm_server_request_timeout", "vllm_server_gpu_memory_utilization",
})
# files of a checkpoint that are training state, not the model `final/` holds
_STATE_FILES = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json|"
                          r"training_args\.bin|ref_model\.safetensors|latest|zero_to_fp32\.py|global_step\d+|\..*)$")
_WEIGHTS = re.compile(r"^(model.*\.safetensors|adapter_model\.safetensors|pytorch_model.*\.bin|adapter_model\.bin|"
                      r"model\.safetensors\.index\.json)$")


def config_changes(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every key whose value differs; a key the recorded config lacks (added to the schema
    since) counts as its default, a key it has that the schema no longer knows is ignored.

    >>> config_changes({"a": 1, "b": 2, "gone": 0}, {"a": 1, "b": 3, "c": 5}, {"c": 5})
    {'b': (2, 3)}
    """
    return {k: (old.get(k, defaults.get(k)), v) for k, v in new.items() if old.get(k, defaults.get(k)) != v}


def refused_changes(changes: dict[str, tuple], done_steps: int) -> dict[str, tuple]:
    """The changes a plain resume refuses: any key outside `OBSERVATIONAL`, and a `max_steps` below the steps the
    run has already trained (-1 = train by epochs counts as unbounded).

    >>> refused_changes({"learning_rate": (1e-5, 2e-5), "max_steps": (10, 20), "seed": (1, 2)}, done_steps=5)
    {'learning_rate': (1e-05, 2e-05), 'seed': (1, 2)}
    >>> refused_changes({"max_steps": (10, 4)}, done_steps=5)
    {'max_steps': (10, 4)}
    """
    refused = {k: v for k, v in changes.items() if k not in OBSERVATIONAL}
    if "max_steps" in changes and 0 < changes["max_steps"][1] < done_steps:
        refused["max_steps"] = changes["max_steps"]
    return refused


def checkpoint_step(checkpoint: str | Path) -> int:
    """``.../checkpoint-120`` -> 120 (the global step a complete checkpoint holds)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


# ------------------------------------------------------------------------------------------------------- the lock


class RunLock:
    """One process per run dir: an exclusive `flock` on ``<dir>/.rlt.lock``, released by the OS when the process
    ends (a kill -9 leaves no stale lock). The holder's PID and command are written into the file, so the next
    process can name it. Only the main process of a distributed run locks."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RltError(f"{self.path.parent} is in use by {holder}: one process per run dir. Wait for it to end "
                           "(or stop it), or give this run another run_name / output_dir") from None
        os.ftruncate(fd, 0)
        command = " ".join([Path(sys.executable).name, *sys.argv])
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} ({command}), since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


# -------------------------------------------------------------------------------------------- deciding what to do


@dataclass
class RunState:
    """What `open_run` decided. `action`: "start" (nothing to keep: train from scratch), "resume" (from
    `checkpoint`), "finish" (the last checkpoint is at max_steps but final/ or summary.json is missing: completed
    without training by `finish_from_checkpoint`), "done" (finished: `summary` is its summary.json)."""

    action: str
    checkpoint: str | None = None
    summary: dict | None = None
    changes: dict[str, tuple] | None = None


def open_run(run, *, is_main: bool = True) -> RunState:
    """Check `run` against its run dir (`run.output_dir`) and record it there; see the module docstring.

    Raises `ConfigError` when a resume would change what is trained (listing each key, old -> new, and the ways
    out: another run_name / output_dir, or ``resume=force`` which records the change), or when `resume=false` would
    start over in a dir that holds a run."""
    from rlt.config import all_defaults, to_yaml

    out = Path(run.output_dir)
    new = yaml.safe_load(to_yaml(run))
    checkpoint = (run.resume_from or last_complete_checkpoint(out, remove_incomplete=is_main)
                  if run.resume is not False else None)
    holds_run = (checkpoint is not None or (out / "summary.json").is_file() or (out / "final").is_dir()
                 or last_complete_checkpoint(out, remove_incomplete=False) is not None)
    if not holds_run:
        if is_main:
            _write_config(out, new)
            forget_after(out, 0)  # what an attempt that never reached a checkpoint logged
        return RunState("start")
    if run.resume is False:
        raise ConfigError(f"resume=false, but {out} holds a run (checkpoints or a final model): starting over there "
                          "would mix two runs. Give this run another run_name / output_dir, or delete the dir first")

    base = _recorded_config(Path(run.resume_from).parent if run.resume_from else out)
    if base is None and not run.resume_from and run.resume != "force":
        raise ConfigError(f"{out} holds checkpoints but no {CONFIG_FILE}: which config they came from is unknown. "
                          f"Restore {out / CONFIG_FILE}, give this run another run_name / output_dir, or resume with "
                          "this command's settings anyway with resume=force")
    done = checkpoint_step(checkpoint) if checkpoint else 0
    changes = config_changes(base or new, new, all_defaults())
    refused = refused_changes(changes, done)
    if refused and run.resume != "force":
        raise ConfigError(_refusal(out, checkpoint, done, refused))
    if is_main:
        _write_config(out, new, changes=changes, step=done, forced=bool(refused))
    if changes:
        log.warning("%s: resuming with changed settings (recorded in %s): %s", out, HISTORY_FILE,
                    ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()))
    if checkpoint and 0 < run.max_steps <= done:
        summary = _read_json(out / "summary.json")
        final_ok = (out / "final").is_dir() or not run.save_final_model
        if summary is not None and summary.get("global_step") == done and final_ok:
            return RunState("done", checkpoint, summary, changes)
        return RunState("finish", checkpoint, None, changes)
    if checkpoint and is_main:
        forget_after(out, done)
    return RunState("resume" if checkpoint else "start", checkpoint, None, changes)


def _refusal(out: Path, checkpoint: str | None, done: int, refused: dict[str, tuple]) -> str:
    where = f"its checkpoint at step {done}" if checkpoint else "its final model"
    lines = [f"{out} holds a run trained with other settings ({where}); resuming it would mix two runs:"]
    for key, (old, new) in refused.items():
        note = f" (the run already trained {done} steps)" if key == "max_steps" else ""
        lines.append(f"  - {key}: {_show(old)} -> {_show(new)}{note}")
    lines.append("Give this run another run_name / output_dir, or resume it with the new settings anyway with "
                 "resume=force (the change is recorded in config_history.jsonl)")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _recorded_config(run_dir: Path) -> dict | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): it records the "
                          "config this run dir's checkpoints came from; restore it, or use another output dir"
                          ) from None
    return loaded if isinstance(loaded, dict) else None


def _write_config(out: Path, config: dict, *, changes: dict | None = None, step: int = 0,
                  forced: bool = False) -> None:
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    if changes:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step, "forced": forced,
                 "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}
        with open(out / HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- each step once on disk


def forget_after(run_dir: str | Path, step: int) -> int:
    """Drop what was logged after global step `step` (the checkpoint a run resumes from; 0 = a fresh start): the
    `metrics.jsonl` and `samples.jsonl` records of later steps, and the RLT samples written while training the steps
    after it (`stored_completions/step_K.csv`, `teacher_chats/log.txt` blocks with K >= step: K is the step count
    when the rows were scored). Returns how many metric records were dropped."""
    run_dir = Path(run_dir)
    dropped = 0
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or _record_step(line) <= step]
        dropped = len(lines) - len(kept)
        if dropped:
            atomic_write_text(metrics, kept)
            log.info("metrics.jsonl: dropped %d record(s) logged after step %d by an interrupted attempt", dropped,
                     step)
    samples = run_dir / "samples.jsonl"
    if samples.is_file():
        lines = samples.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or _record_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(samples, kept)
    for csv_file in (run_dir / "stored_completions").glob("step_*.csv"):
        if int(csv_file.stem.split("_")[1]) >= step:
            csv_file.unlink()
    chats = run_dir / "teacher_chats" / "log.txt"
    if chats.is_file():
        blocks = re.split(r"(?m)^(?==== step \d+ )", chats.read_text(encoding="utf-8"))
        kept = [b for b in blocks if not (m := re.match(r"=== step (\d+) ", b)) or int(m.group(1)) < step]
        if len(kept) != len(blocks):
            atomic_write_text(chats, "".join(kept))
    return dropped


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


# ------------------------------------------------------------------------------------------- the output location


def ensure_writable(path: str | Path) -> Path:
    """Create `path` (a run dir) and check that a file can be written in it; `ConfigError` naming the path and the
    reason otherwise (before any model loads)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / ".rlt.write-test", "w") as f:
            f.write("ok")
        (path / ".rlt.write-test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run dir {path}: {e.strerror or e} ({type(e).__name__}); set "
                          "output_dir (or results_dir) to a writable place") from None
    return path


def check_creatable(path: str | Path) -> None:
    """`ConfigError` unless `path` exists as a writable dir or could be created (its nearest existing ancestor is a
    writable dir); creates nothing (the sweep check runs before any job)."""
    path = Path(path).absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is not a directory" if not ancestor.is_dir() else "is not writable"
        raise ConfigError(f"cannot write the run dir {path}: {ancestor} {why}; set output_dir (or results_dir) to a "
                          "writable place")


def checkpoint_bytes_estimate(run) -> int | None:
    """One checkpoint's size on disk, estimated before any weights load: the weights as saved (the adapter's with
    LoRA) plus AdamW's two moments per trainable parameter (`rlt.memory`); None when the architecture cannot be
    read yet (a hub model not downloaded, a warm-up checkpoint still to be trained, no stand-in).

    Example: Qwen2.5-7B in bf16, full fine-tuning, adamw_torch: 15.23 GB + 30.46 GB of bf16 moments = 45.7 GB.
    """
    from rlt import memory as M
    from rlt.memcheck import UsageError, resolve_arch

    try:
        arch, _ = resolve_arch(run.model_name_or_path, run.model_revision, stand_in=run.memcheck_model_arch)
    except (UsageError, RltError, OSError, ValueError):
        return None
    dtype = run.torch_dtype if run.torch_dtype != "auto" else (arch.checkpoint_dtype or "bfloat16")
    total = M.param_count(arch)
    trainable = M.lora_param_count(arch, run.lora_r, run.lora_target_modules) if run.use_peft else total
    return M.weight_bytes(trainable, dtype) + M.optimizer_state_bytes(trainable, run.optim, dtype)


def check_free_space(run) -> None:
    """`ConfigError` when the run dir's file system has less free space than one checkpoint (estimated)."""
    need = checkpoint_bytes_estimate(run)
    free = shutil.disk_usage(run.output_dir).free
    if need is not None and free < need:
        raise ConfigError(f"not enough free space for a checkpoint in {run.output_dir}: one needs ~{need / 1e9:.2f} "
                          f"GB (weights + optimizer states, estimated), {free / 1e9:.2f} GB are free; free space "
                          "there or set output_dir elsewhere")


def no_space_message(out: str | Path, step: int, checkpoint_estimate: int | None) -> str:
    """The one line for a write that ran out of space during training."""
    out = Path(out)
    free = shutil.disk_usage(out).free if out.exists() else 0
    last = last_complete_checkpoint(out, remove_incomplete=False)
    size = sum(p.stat().st_size for p in Path(last).rglob("*") if p.is_file()) if last else checkpoint_estimate
    need = f"; a checkpoint of this run takes {size / 1e9:.2f} GB" if size else ""
    kept = f"{Path(last).name} is kept and the same command resumes from it" if last else "no checkpoint was complete"
    return (f"no space left on the device of {out} at step {step} ({free / 1e9:.2f} GB free{need}): {kept} once "
            "space is freed")


# ----------------------------------------------------------------------------- a final save that a kill interrupted


def finish_from_checkpoint(run, state: RunState, *, is_main: bool = True) -> dict:
    """Complete a finished run whose final save was interrupted: `final/` becomes the model files of its last
    checkpoint (what the final save writes: weights or adapter, config, tokenizer), and `summary.json` is written from
    its trainer state. Nothing is trained."""
    out, ckpt = Path(run.output_dir), Path(state.checkpoint)
    trainer_state = _read_json(ckpt / "trainer_state.json") or {}
    summary = {"run_name": run.run_name, "output_dir": str(out), "global_step": checkpoint_step(ckpt),
               "completed_from": str(ckpt)}
    losses = [h["train_loss"] for h in trainer_state.get("log_history", []) if "train_loss" in h]
    if losses:
        summary["train_loss"] = losses[-1]
    if not is_main:
        return summary
    if run.save_final_model:
        files = [p for p in ckpt.iterdir() if not _STATE_FILES.match(p.name)]
        if not any(_WEIGHTS.match(p.name) for p in files):
            raise RltError(f"{ckpt} holds no model weights to complete the final save from (a DeepSpeed checkpoint "
                           "without gathered weights?): convert it with its zero_to_fp32.py, or rerun with "
                           f"max_steps above {summary['global_step']} in another output_dir")
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for p in files:
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        shutil.rmtree(out / "final", ignore_errors=True)
        os.replace(tmp, out / "final")
        summary["final_model"] = str(out / "final")
    write_json_atomic(out / "summary.json", summary)
    return summary
