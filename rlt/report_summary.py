"""What summary.json says about a run beyond the recipe's own results (`run_summary`): the swept keys, the main
hyperparameters, first / last / best / mean-of-last values of the loss, the reward and its terms, the last
evaluation, wall time, steps, tokens, and the best checkpoint (`best_checkpoint_step`). Read from the run dir's
metrics.jsonl, config.yaml and checkpoints with the helpers of `rlt.report`; written by `rlt.recipes.common.finish`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from rlt.report import (
    DEFAULT_LAST,
    HYPERPARAMETERS,
    METRICS_FILE,
    NOT_RESULTS,
    SUMMARY_TERMS,
    _number,
    flatten,
    group_keys,
    higher_is_better,
    numeric_keys,
    read_config,
    read_records,
    series,
    summarize,
)

log = logging.getLogger(__name__)


def _swept_values() -> dict:
    """The current sweep job's swept keys from `rlt.tracking.swept_values()` when it exists, else {}."""
    try:
        from rlt.tracking import swept_values
    except ImportError:
        return {}
    try:
        values = swept_values()
    except Exception as e:  # noqa: BLE001 - a summary field, not worth failing a finished run for
        log.debug("swept_values() failed: %s", e)
        return {}
    return dict(values) if isinstance(values, dict) else {}


def best_checkpoint_step(run_dir: str | Path, records: Sequence[dict] | None = None) -> int | None:
    """The best checkpoint's step: the trainer's own pick (`best_global_step` / `best_model_checkpoint` in the
    last checkpoint's trainer_state.json, set when a best metric is tracked, as with early stopping), else the
    saved checkpoint with the best eval_reward (max) or, without one, eval_loss (min) logged at its step; else
    None."""
    run_dir = Path(run_dir)
    checkpoints = {}
    for d in run_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            checkpoints[int(m.group(1))] = d
    if not checkpoints:
        return None
    try:
        state = json.loads((checkpoints[max(checkpoints)] / "trainer_state.json").read_text())
    except (OSError, ValueError):
        state = {}
    if isinstance(state.get("best_global_step"), int):
        return state["best_global_step"]
    m = re.search(r"checkpoint-(\d+)$", str(state.get("best_model_checkpoint") or "").rstrip("/"))
    if m:
        return int(m.group(1))
    records = read_records(run_dir / METRICS_FILE) if records is None else records
    for key in ("eval_reward", "eval_loss"):
        scored = [(v, int(s)) for s, v in zip(*series(records, key), strict=True) if int(s) in checkpoints]
        if scored:
            pick = max if higher_is_better(key) else min
            return pick(scored, key=lambda sv: sv[0])[1]
    return None


def run_summary(run_dir: str | Path, last: int = DEFAULT_LAST) -> dict:
    """What summary.json adds about a run: the swept keys, the main hyperparameters, first / last / best / mean of
    the last `last` values of the loss, the reward and each reward term, the last evaluation results, wall time
    (first to last logged record), steps, tokens (`num_tokens`, when logged) and the best checkpoint's step."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / METRICS_FILE)
    config = flatten(read_config(run_dir))
    available = numeric_keys(records)
    metrics = {k: summarize(records, k, last) for k in group_keys(available, SUMMARY_TERMS)}
    evaluation = {}
    for record in records:
        for k, v in record.items():
            if k.startswith("eval_") and k not in NOT_RESULTS and _number(v) is not None:
                evaluation[k] = v
    times = [t for t in (_number(r.get("time")) for r in records) if t is not None]
    steps = [s for s in (_number(r.get("step")) for r in records) if s is not None]
    tokens = series(records, "num_tokens")[1]
    return {
        "swept": _swept_values(),
        "hyperparameters": {k: config[k] for k in HYPERPARAMETERS if k in config},
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "last_n": last,
        "eval": evaluation,
        "wall_time_s": round(max(times) - min(times), 3) if len(times) > 1 else None,
        "steps": int(max(steps)) if steps else 0,
        "num_tokens": int(tokens[-1]) if tokens else None,
        "best_checkpoint_step": best_checkpoint_step(run_dir, records),
    }
