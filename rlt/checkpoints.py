"""Checkpoints that count only once complete, and finding the one to resume from.

HF Trainer writes `checkpoint-N/` file by file; a run killed mid-save leaves a directory that looks like a
checkpoint but cannot be loaded. `CompleteCheckpointCallback` marks a checkpoint complete (an atomically written
marker file) after the Trainer has finished saving it; `last_complete_checkpoint` only ever returns marked ones and
removes unmarked leftovers, so a killed run always resumes from a loadable state (README.md, Running). The same
atomic writers (`atomic_write_text`, `write_json_atomic`) write run configs and summaries, evaluation results and
distillation output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".rlt_complete"


def _cpu_index_location(storage, location: str):
    """torch.load's restore of a `map_location` like "cpu:0" (None for any other): on CPU storages already are."""
    return storage if re.fullmatch(r"cpu:\d+", location) else None


def allow_indexed_cpu_map_location() -> None:
    """Let torch.load take ``map_location="cpu:N"``. Resuming a run of several CPU processes (gloo) failed with
    "don't know how to restore data location ... (tagged with cpu:0)": transformers loads the optimizer state with
    ``map_location=args.device`` when the world size is > 1, and that device is ``cpu:<local rank>`` there, which
    torch has no loader for. Registering one more loader changes nothing else (its tagger tags nothing)."""
    import torch.serialization

    if not getattr(allow_indexed_cpu_map_location, "done", False):
        torch.serialization.register_package(30, lambda obj: None, _cpu_index_location)
        allow_indexed_cpu_map_location.done = True


allow_indexed_cpu_map_location()
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: str | Path, text: str | Iterable[str]) -> Path:
    """Write `text` (a string, or pieces written in turn) to `path`, creating its directory, so that readers see
    either the old file or the whole new one: a temp file beside it, fsync, ``os.replace``; the temp file is removed
    if anything fails."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for piece in [text] if isinstance(text, str) else text:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (non-ASCII kept) to `path` atomically (`atomic_write_text`): the file is either
    the old one or complete, never half-written."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def mark_complete(checkpoint_dir: str | Path) -> None:
    atomic_write_text(Path(checkpoint_dir) / COMPLETE_MARKER, "ok\n")


def last_complete_checkpoint(output_dir: str | Path, *, remove_incomplete: bool = True) -> str | None:
    """The highest-step `checkpoint-N` in `output_dir` that carries the completion marker, or None.

    Unmarked checkpoint dirs (a save interrupted by a kill) are removed when `remove_incomplete` is set, so that
    neither we nor the Trainer's rotation ever load them.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for d in output_dir.iterdir():
        m = _CHECKPOINT_RE.match(d.name)
        if not (m and d.is_dir()):
            continue
        if (d / COMPLETE_MARKER).exists():
            steps.append((int(m.group(1)), d))
        elif remove_incomplete:
            log.warning("removing incomplete checkpoint %s (the run was stopped while saving it)", d)
            shutil.rmtree(d, ignore_errors=True)
    for step, d in sorted(steps, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return str(d)
        earlier = [str(e.name) for s, e in steps if s < step]
        log.warning("%s is corrupt (%s): %s", d, problem,
                    f"the previous complete checkpoint, {max(earlier)}, is used instead" if earlier else
                    "no earlier complete checkpoint: the run starts over")
        if remove_incomplete:  # out of the Trainer's sight (its rotation and resume look for checkpoint-N)
            os.replace(d, d.with_name(f"corrupt-{d.name}"))
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What makes a checkpoint marked complete unloadable (None: nothing found): its trainer_state.json does not
    parse, or a safetensors file is shorter than its header says (a disk that filled up, a bad copy)."""
    d = Path(checkpoint)
    try:
        json.loads((d / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json: {type(e).__name__}"
    for f in d.glob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + n + end:
                return f"{f.name} is truncated ({f.stat().st_size} of {8 + n + end} bytes)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{f.name}: {type(e).__name__}"
    return None


def save_marked_then_rotated(trainer, save, trial) -> None:
    """Run `save()` (the trainer's `_save_checkpoint`) with the rotation of older checkpoints held back until the new
    one is marked complete. transformers rotates inside `_save_checkpoint`, before `on_save` callbacks run: a kill
    in between left no complete checkpoint at all with ``save_total_limit=1`` (found by bench/faults.py's review)."""
    from transformers.trainer_utils import rotate_checkpoints

    limit = trainer.args.save_total_limit
    trainer.args.save_total_limit = None  # our own args: rotation off for the save, on again below
    try:
        save()
    finally:
        trainer.args.save_total_limit = limit
    if trainer.args.should_save:
        run_dir = trainer._get_output_dir(trial=trial)
        mark_complete(Path(run_dir) / f"checkpoint-{trainer.state.global_step}")
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)


class CompleteCheckpointCallback(TrainerCallback):
    """Marks `checkpoint-<global_step>` complete once the Trainer has saved it (on_save runs after the save)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                mark_complete(ckpt)
        return control
