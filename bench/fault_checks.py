"""bench/faults.py's reading of a run dir: what a kill left (checkpoints and their markers, metrics records, the
phase a kill landed in: `classify`) and the checks a finished run dir must pass (`check_run`: exit code, summary,
no checkpoint past max_steps, no partial save, every step logged once, `final/` loading and equal to the last
checkpoint). Imports nothing heavy until `check_final` loads a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
MARKER = ".rlt_complete"  # rlt.checkpoints.COMPLETE_MARKER (not imported: this process stays light until the checks)


# ------------------------------------------------------------------------------------------------ the run dir


def checkpoints(run_dir: Path) -> dict[int, Path]:
    with contextlib.suppress(FileNotFoundError):
        return {int(m.group(1)): run_dir / e.name for e in os.scandir(run_dir)
                if (m := _CKPT.match(e.name)) and e.is_dir()}
    return {}


def complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).exists()


def metric_records(run_dir: Path) -> tuple[list[dict], int]:
    """(records, unparsable lines) of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                bad += 1
    return records, bad


def snapshot_events(run_dir: Path) -> set[str]:
    """What exists now: ``metrics``, ``ckpt-N``, ``ckpt-N-complete``, ``final.tmp``, ``final``, ``summary``."""
    found = set()
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(run_dir):
            if m := _CKPT.match(e.name):
                found.add(f"ckpt-{m.group(1)}")
                if os.path.exists(os.path.join(e.path, MARKER)):
                    found.add(f"ckpt-{m.group(1)}-complete")
            elif e.name == "metrics.jsonl":
                found.add("metrics")
            elif e.name in ("final", "final.tmp"):
                found.add(e.name)
            elif e.name == "summary.json":
                found.add("summary")
    return found


class StepWatch:
    """Whether an attempt has logged a training step yet (a "loss" record written since `since`); metrics.jsonl is
    read again only when its size or mtime changed."""

    def __init__(self, run_dir: Path, since: float):
        self.path, self.since, self.stat, self.stepped = run_dir / "metrics.jsonl", since, None, False

    def __call__(self) -> bool:
        if not self.stepped:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.path)
                if (st.st_size, st.st_mtime_ns) != self.stat:
                    self.stat = (st.st_size, st.st_mtime_ns)
                    records, _ = metric_records(self.path.parent)
                    self.stepped = any("loss" in r and r.get("time", 0) >= self.since for r in records)
        return self.stepped


def classify(run_dir: Path, started: float, max_steps: int) -> str:
    """The phase a kill landed in, read from the run dir it left (see the module docstring)."""
    if (run_dir / "summary.json").exists():
        return "exiting"
    ckpts = checkpoints(run_dir)
    if (run_dir / "final.tmp").exists() or (run_dir / "final").exists() or (
            max_steps in ckpts and complete(ckpts[max_steps])):
        return "after last"
    for ckpt in ckpts.values():
        with contextlib.suppress(FileNotFoundError):
            if not complete(ckpt) and ckpt.stat().st_mtime >= started - 0.5:
                return "ckpt write"
    records, _ = metric_records(run_dir)
    if not any("loss" in r and r.get("time", 0) >= started for r in records):
        return "startup"
    return "between" if any(complete(c) for c in ckpts.values()) else "train<ckpt1"


def last_complete_step(run_dir: Path) -> int:
    return max((n for n, c in checkpoints(run_dir).items() if complete(c)), default=0)


# ---------------------------------------------------------------------------------------------- the checks


def check_run(run_dir: Path, max_steps: int, rc: int | None, log_path: Path) -> list[str]:
    """Every check a finished run dir must pass; the failures, one line each (empty: survived)."""
    failures = []
    if rc != 0:
        tail = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()][-3:]
        failures.append(f"exit code {rc}: {' | '.join(tail)[-400:]}")
    summary = None
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((run_dir / "summary.json").read_text())
    if summary is None or summary.get("global_step") != max_steps:
        failures.append(f"summary.json global_step {summary.get('global_step') if summary else 'missing'} != "
                        f"{max_steps}")
    ckpts = checkpoints(run_dir)
    beyond = sorted(n for n in ckpts if n > max_steps)
    beyond += sorted(int(p.name.rsplit("-", 1)[1]) for p in run_dir.glob("corrupt-checkpoint-*")
                     if int(p.name.rsplit("-", 1)[1]) > max_steps)
    if beyond:
        failures.append(f"checkpoints beyond max_steps={max_steps}: {beyond}")
    partial = [p.name for p in [run_dir / "final.tmp", *ckpts.values()] if p.exists() and not (
        p.name.startswith("checkpoint-") and complete(p))]
    if partial:
        failures.append(f"partial saves left: {partial}")
    records, bad = metric_records(run_dir)
    steps = [r.get("step") for r in records if "loss" in r]
    if bad or steps != list(range(1, max_steps + 1)):
        failures.append(f"metrics.jsonl loss steps {steps}" + (f", {bad} unparsable line(s)" if bad else "") +
                        f" != 1..{max_steps} once each")
    failures += check_final(run_dir, ckpts.get(max_steps))
    return failures


def check_final(run_dir: Path, last: Path | None) -> list[str]:
    final = run_dir / "final"
    if not final.is_dir():
        return ["final/ missing"]
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(final))
        assert model.num_parameters() > 0
    except Exception as e:  # noqa: BLE001 - any reason it does not load is the failure
        return [f"final/ does not load: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"]
    if last is None or not (last / "model.safetensors").is_file() or not (final / "model.safetensors").is_file():
        return ["no checkpoint-<max_steps>/model.safetensors (or final/model.safetensors) to compare final/ with"]
    a, b = load_file(str(final / "model.safetensors")), load_file(str(last / "model.safetensors"))
    differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    return [f"final/ weights differ from {last.name}: {differ[:3]}{' ...' if len(differ) > 3 else ''}"] if differ \
        else []
