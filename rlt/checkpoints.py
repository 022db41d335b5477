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
    return str(max(steps)[1]) if steps else None


class CompleteCheckpointCallback(TrainerCallback):
    """Marks `checkpoint-<global_step>` complete once the Trainer has saved it (on_save runs after the save)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                mark_complete(ckpt)
        return control


def completed_summary(output_dir: str | Path, max_steps: int, *, needs_final: bool) -> dict | None:
    """The `summary.json` of a run that already finished: its last complete checkpoint is at `max_steps` (> 0) and
    the summary (and, when `needs_final`, `final/`) were written after it. None otherwise.

    Why: the HF Trainer, resumed from a checkpoint at `max_steps`, trains one more step before it checks the step
    count (it enters the unfinished epoch first), so re-running a finished command would change its result.
    """
    output_dir = Path(output_dir)
    summary_file = output_dir / "summary.json"
    if max_steps <= 0 or not summary_file.is_file() or (needs_final and not (output_dir / "final").is_dir()):
        return None
    ckpt = last_complete_checkpoint(output_dir, remove_incomplete=False)
    if ckpt is None:
        return None
    try:
        step = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError, KeyError):
        return None
    if step < max_steps or summary.get("global_step") != step:
        return None
    return summary
