"""Experiment tracking: wandb that never prompts or fails, and a local metrics.jsonl in every run dir."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from rlt.utils.imports import is_available

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True if wandb could log in without prompting: WANDB_API_KEY or an api.wandb.ai entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_reporting(report_to: list[str], *, output_dir: str, project: str, group: str | None,
                        run_name: str, mode: str | None) -> list[str]:
    """Set up the integrations named in `report_to` and return the list to pass to TrainingArguments.

    wandb: `mode` null means online when credentials exist, else offline (written under `output_dir/wandb`, sync
    later with `wandb sync`); it never prompts. If the wandb package is missing it is dropped with a warning.
    """
    targets = [r for r in report_to if r != "none"]
    if "wandb" in targets:
        if not is_available("wandb"):
            log.warning("report_to contains wandb but the wandb package is not importable: not logging to wandb")
            targets.remove("wandb")
        else:
            chosen = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
            os.environ["WANDB_MODE"] = chosen
            os.environ["WANDB_PROJECT"] = project
            os.environ["WANDB_DIR"] = output_dir
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_RUN_ID", _stable_run_id(output_dir))  # same run id after a resume
            os.environ.setdefault("WANDB_RESUME", "allow")
            if group:
                os.environ["WANDB_RUN_GROUP"] = group
            log.info("wandb: project=%s run=%s mode=%s dir=%s", project, run_name, chosen, output_dir)
    return targets or ["none"]


def _stable_run_id(output_dir: str) -> str:
    import hashlib

    return hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:12]


class JsonlMetricsCallback(TrainerCallback):
    """Appends every logged metrics dict, with step and wall time, as one JSON line to `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time()}
        record.update({k: _jsonable(v) for k, v in logs.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return control


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, str | int | float | bool | type(None) | list | dict) else str(v)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (for summaries and tests)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
