"""Experiment tracking: wandb that never prompts or fails, one wandb run per run dir (and per sweep job), and a local
metrics.jsonl in every run dir."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import netrc
import os
import re
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any

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


def configure_reporting(run, output_dir: str) -> list[str]:
    """Set up the integrations named in `run.report_to` and return the list to pass to TrainingArguments.

    wandb: one wandb run per run dir, started here (on the main process) and ended by `finish_reporting`; its id is
    kept in `<output_dir>/wandb_id`, so a resumed run continues its own wandb run (`resume="allow"`) and a new run
    dir gets a new one. `run.wandb_mode` null means online when credentials exist, else offline (written under
    `output_dir/wandb`, sync later with `wandb sync`); it never prompts. If the wandb package is missing or the run
    cannot start, wandb is dropped with a warning. transformers' WandbCallback then logs into this run.
    """
    targets = [r for r in run.report_to if r != "none"]
    if "wandb" in targets and not _start_wandb(run, output_dir):
        targets.remove("wandb")
    return targets or ["none"]


_started_run_id: str | None = None  # the wandb run `configure_reporting` started and `finish_reporting` ends


def _start_wandb(run, output_dir: str) -> bool:
    global _started_run_id
    if not is_available("wandb"):
        log.warning("report_to contains wandb but the wandb package is not importable: not logging to wandb")
        return False
    mode = run.wandb_mode or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    if mode == "disabled":
        log.info("wandb: mode=disabled, not logging to wandb")
        return False
    if int(os.environ.get("RANK", "0")) != 0:
        return True  # only the main process logs (transformers' WandbCallback does nothing on the others)
    import wandb

    if wandb.run is not None:
        if wandb.run.id != _started_run_id:  # started by the caller: transformers' WandbCallback logs into it
            log.info("wandb: logging into the run already started in this process (%s)", wandb.run.id)
            return True
        finish_reporting(1)  # ours, left open by a job that did not end through `finish_reporting`
    init = dict(project=run.wandb_project, id=wandb_run_id(output_dir), resume="allow", name=wandb_run_name(run),
                group=wandb_group(run), job_type=run.algorithm, tags=wandb_tags(run), config=project_config(run),
                dir=output_dir, mode=mode)
    silent = os.environ.get("WANDB_SILENT", "true").lower() not in ("false", "0", "no")
    try:
        started = wandb.init(**init, settings=wandb.Settings(silent=silent))
    except Exception as e:  # a network or server problem online: train without wandb rather than not at all
        log.warning("wandb could not start (%s): not logging to wandb", str(e).splitlines()[0] if str(e) else e)
        return False
    _started_run_id = started.id
    log.info("wandb: project=%s run=%r id=%s group=%s mode=%s dir=%s", run.wandb_project, init["name"], started.id,
             init["group"], mode, output_dir)
    return True


def finish_reporting(exit_code: int = 0) -> None:
    """End the wandb run `configure_reporting` started, if one is open: finished (`exit_code` 0) or failed (any
    other), so that the next job of a sweep (same process) starts its own. A run started by the caller is left."""
    global _started_run_id
    wandb = sys.modules.get("wandb")
    if wandb is None or _started_run_id is None:
        return
    try:
        if wandb.run is not None and wandb.run.id == _started_run_id:
            wandb.finish(exit_code=exit_code)
    except Exception as e:  # never let the logger turn a finished run into a failed one
        log.warning("wandb: could not finish the run (%s)", e)
    finally:
        _started_run_id = None


WANDB_ID_FILE = "wandb_id"


def wandb_run_id(output_dir: str | Path) -> str:
    """The wandb run id of the run dir: read from `<output_dir>/wandb_id`, else written there: the id of the latest
    wandb run under `<output_dir>/wandb/` (a run dir from before the id file), or a new one."""
    path = Path(output_dir) / WANDB_ID_FILE
    with contextlib.suppress(OSError, UnicodeDecodeError):
        existing = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", existing):
            return existing
    from rlt.checkpoints import atomic_write_text

    earlier = sorted((m.group(1), m.group(2)) for p in Path(output_dir, "wandb").glob("*run-*")
                     if (m := re.fullmatch(r"(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_]+)", p.name)))
    new = earlier[-1][1] if earlier else "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                 for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, new + "\n")
    return new


def swept_values() -> dict[str, Any]:
    """The keys this multirun job sweeps, with its values ({'learning_rate': 0.001}); {} outside a sweep.

    The swept keys are those whose values differ between the sweep's jobs (`rlt.train.swept_keys`); when they are not
    known (another sweeper plugin), every override of the job but results_dir / output_dir."""
    return {key: value for key, value, _ in _swept()}


def _swept() -> list[tuple[str, Any, str]]:
    from rlt.train import PLACEMENT_KEYS, current_sweep, parse_job_overrides

    hydra = _hydra_config()
    try:
        from hydra.types import RunMode

        if hydra is None or hydra.mode != RunMode.MULTIRUN:
            return []
        overrides = parse_job_overrides(list(hydra.overrides.task))
    except Exception:  # an unreadable Hydra config: no sweep to report
        return []
    keys = (current_sweep() or {}).get("keys")
    if keys is None:
        return [o for o in overrides if o[0] not in PLACEMENT_KEYS]
    return [o for o in overrides if o[0] in keys]


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_choices() -> dict[str, str | None]:
    """The config group options the run was composed from ({'model_cfg': 'tiny', 'run_cfg': 'tiny_sft', ...}) when
    Hydra runs it, Hydra's own groups left out; {} otherwise."""
    hydra = _hydra_config()
    try:
        choices = dict(hydra.runtime.choices) if hydra is not None else {}
    except Exception:
        return {}
    return {k: v for k, v in choices.items() if not k.startswith("hydra")}


def project_config(run) -> dict[str, Any]:
    """The wandb config: every key of the validated run config (`rlt.config.to_yaml`), plus the group options."""
    import yaml

    from rlt.config import to_yaml

    config = yaml.safe_load(to_yaml(run))
    for group, option in hydra_choices().items():
        config.setdefault(group, option)
    return config


def wandb_run_name(run) -> str:
    """`run_name`, then the swept values of a multirun job: 'tiny_sft learning_rate=0.001'."""
    return " ".join([run.run_name, *(f"{key}={text}" for key, _, text in _swept())])


def wandb_group(run) -> str | None:
    """`wandb_group` if set; else in a multirun one group per sweep, named by its run and swept keys
    ('tiny_sft-sweep-learning_rate+seed'); else none."""
    if run.wandb_group:
        return run.wandb_group
    from rlt.train import current_sweep

    hydra = _hydra_config()
    try:
        from hydra.types import RunMode

        if hydra is None or hydra.mode != RunMode.MULTIRUN:
            return None
    except Exception:
        return None
    keys = (current_sweep() or {}).get("keys")
    return f"{run.run_name}-sweep" + (f"-{'+'.join(keys)}" if keys else "")


def wandb_tags(run) -> list[str]:
    """The algorithm, the run file, the model, then `wandb_tags`; each at most 64 characters (wandb's limit)."""
    tags = [run.algorithm, hydra_choices().get("run_cfg"), run.model_name_or_path, *run.wandb_tags]
    out: list[str] = []
    for tag in tags:
        tag = str(tag) if tag is not None else ""
        tag = tag if len(tag) <= 64 else "..." + tag[-61:]
        if tag and tag not in out:
            out.append(tag)
    return out


class WandbConfigCallback(TrainerCallback):
    """Once transformers' WandbCallback has set up the run (and added TrainingArguments and the model config to its
    config, which share some keys with ours: `torch_dtype`, `gradient_accumulation_steps`, ...): the project's
    config on top, and `train/global_step` the x-axis of every panel from the first row (rows logged without it,
    such as TRL's profiling timings, carry the last step: `step_sync`)."""

    def __init__(self, run):
        self.config = project_config(run)

    def on_train_begin(self, args, state, control, **kwargs):
        wandb = sys.modules.get("wandb")
        if not state.is_world_process_zero or "wandb" not in (args.report_to or []) or wandb is None:
            return control
        if wandb.run is None:
            return control
        wandb.config.update(self.config, allow_val_change=True)
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        wandb.log({"train/global_step": state.global_step})  # rows logged before the first train log get a step
        return control


def tracking_callbacks(run) -> list[TrainerCallback]:
    """The callbacks `rlt.recipes.common.callbacks_for` adds for the integrations of `run.report_to`."""
    return [WandbConfigCallback(run)] if "wandb" in run.report_to else []


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


def log_to_existing_run(run_dir: str | Path, metrics: dict[str, float], *, config: dict[str, Any] | None = None,
                        step: int | None = None) -> str | None:
    """Log `metrics` (``{"eval/gsm8k_test/accuracy": 0.41}``) into the wandb run of the run dir `run_dir`, after
    training (`rlt.evaluate`): resumed by the id in `<run_dir>/wandb_id` (``resume="allow"``) and ended again; with
    `step` (the evaluated model's training step), the row also carries ``train/global_step`` and the values go to
    the run summary. The mode is the one training used (the run `config`'s ``wandb_mode``, else WANDB_MODE, else
    online with credentials, offline without; offline writes under `<run_dir>/wandb`, for ``wandb sync``).

    Never fails: returns the wandb run id it logged to, or None (no id file: the run did not log to wandb; mode
    disabled; wandb missing or not starting, with a warning)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if not path.is_file() or not metrics:
        return None
    config = config or {}
    mode = config.get("wandb_mode") or os.environ.get("WANDB_MODE") or (
        "online" if wandb_has_credentials() else "offline")
    if mode == "disabled":
        log.info("wandb: mode=disabled, not logging the results to the run's wandb run")
        return None
    if not is_available("wandb"):
        log.warning("the run logged to wandb but the wandb package is not importable: results not logged there")
        return None
    import wandb

    run_id = wandb_run_id(run_dir)
    row = {**metrics, **({"train/global_step": step} if step is not None else {})}
    silent = os.environ.get("WANDB_SILENT", "true").lower() not in ("false", "0", "no")
    try:
        if wandb.run is not None and wandb.run.id == run_id:  # already open in this process: log, leave it open
            wandb.run.log(row)
            wandb.run.summary.update(metrics)
            return run_id
        started = wandb.init(project=config.get("wandb_project") or "rlt", id=run_id, resume="allow",
                             dir=str(run_dir), mode=mode, reinit="create_new", settings=wandb.Settings(silent=silent))
        try:
            started.log(row)
            started.summary.update(metrics)
        finally:
            started.finish()
    except Exception as e:  # offline disk problems, network or server errors: the results are in the JSON anyway
        log.warning("wandb: could not log the results to run %s (%s)", run_id,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    log.info("wandb: logged %s to run %s (mode %s)", ", ".join(metrics), run_id, mode)
    return run_id
