"""Sweeps that scale: Hydra's submitit launcher (jobs in parallel on this machine, or on SLURM) and Optuna sweeper
(a search that optimizes a declared objective) for `python -m rlt.train -m ...`. docs/sweeps.md.

    python -m rlt.train -m run_cfg=tiny_sft learning_rate=1e-3,3e-3 hydra/launcher=local      # parallel, here
    python -m rlt.train -m run_cfg=NAME learning_rate=1e-5,3e-5 hydra/launcher=slurm_gpu hydra.launcher.partition=gpu
    python -m rlt.train -m run_cfg=tiny_sft 'learning_rate=tag(log,interval(1e-4,1e-2))' hydra/sweeper=optuna
    python -m rlt.sweeps results/tiny_sft/multirun      # the sweep's jobs, their objective values and the best

Every job records itself in `<job dir>/sweep_job.json`: its overrides and swept values, each attempt's PID, host and
scheduler job id, its run dir, status, objective and value. `write_summary` gathers the records of a sweep dir into
`<sweep dir>/sweep_summary.json` (what `rlt.train` prints at the end of a sweep, and `python -m rlt.sweeps` any time).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlt.errors import ConfigError, MissingExtraError, RltError

JOB_FILE = "sweep_job.json"
SUMMARY_FILE = "sweep_summary.json"
OPTUNA_RESULTS = "optimization_results.yaml"  # what Hydra's Optuna sweeper writes into the sweep dir

# ------------------------------------------------------------------------------------------------ plugins

SUBMITIT = ("hydra-submitit-launcher", ("hydra_plugins.hydra_submitit_launcher", "submitit"))
OPTUNA = ("hydra-optuna-sweeper", ("hydra_plugins.hydra_optuna_sweeper", "optuna"))
PLUGIN_OPTIONS = {  # (group, option) -> (pip package, modules it needs): the options Hydra's plugins register
    ("hydra/launcher", "submitit_local"): SUBMITIT,
    ("hydra/launcher", "submitit_slurm"): SUBMITIT,
    ("hydra/sweeper", "optuna"): OPTUNA,
}


def group_choice(overrides: Sequence[str], group: str) -> str | None:
    """The option chosen for a config group on the command line (the last one wins); None if not chosen.

    >>> group_choice(["lr=1", "hydra/launcher=local", "+hydra/sweeper=optuna"], "hydra/sweeper")
    'optuna'
    """
    choice = None
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+") == group:
            choice = value
    return choice


def plugin_of(group: str, option: str, config_dir: Path | None = None) -> tuple[str, tuple[str, ...]] | None:
    """The (pip package, modules) a group option needs: Hydra's plugin options themselves, and our presets in
    cfgs/<group>/ through their defaults list (cfgs/hydra/launcher/slurm_gpu.yaml extends submitit_slurm). None for
    an option no plugin provides (basic, or a name Hydra will report as unknown)."""
    if (group, option) in PLUGIN_OPTIONS:
        return PLUGIN_OPTIONS[(group, option)]
    if config_dir is None:
        from rlt.compose import CONFIG_DIR as config_dir
    path = Path(config_dir, group, f"{option}.yaml")
    if not path.is_file():
        return None
    import yaml

    try:
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_" and entry != option:
            found = plugin_of(group, entry.removeprefix("/" + group + "/"), config_dir)
            if found:
                return found
    return None


def check_plugins(overrides: Sequence[str]) -> None:
    """`MissingExtraError` (one line, naming the `sweeps` extra) when the launcher or sweeper chosen on the command
    line comes from a Hydra plugin that is not installed; Hydra's own message for that lists the options it knows."""
    for group in ("hydra/launcher", "hydra/sweeper"):
        option = group_choice(overrides, group)
        needs = plugin_of(group, option) if option else None
        if needs is None:
            continue
        package, modules = needs
        missing = [m for m in modules if not _importable(m)]
        if missing:
            raise MissingExtraError(f"{group}={option} needs Hydra's {package} plugin, which is not installed "
                                    f"({missing[0]} cannot be imported): pip install -e '.[sweeps]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ the search space


def search_points(overrides: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """The jobs to validate before an Optuna search starts, and its swept keys: a job with every swept key at its
    first choice (or lower bound), then one job per other choice (or upper bound) of each key, the other keys at
    their first. Every value the search can try lies in a checked range (intervals are checked at both ends).
    `hydra.sweeper.params.KEY=SPEC` overrides count as `KEY=SPEC`. Raises `ConfigError` on unparsable overrides.

    >>> search_points(["lr=interval(0.1,0.3)", "seed=1,2", "x=5"])
    ([['lr=0.1', 'seed=1', 'x=5'], ['lr=0.3', 'seed=1', 'x=5'], ['lr=0.1', 'seed=2', 'x=5']], ['lr', 'seed'])
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    prefix = "hydra.sweeper.params."
    lines = [o.removeprefix(prefix) if o.startswith(prefix) else o for o in overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(list(lines))
    except Exception as e:  # hydra's OverrideParseException
        raise ConfigError(f"cannot read the search space: {str(e).splitlines()[0]}") from None
    options: list[tuple[str, list[str]]] = []  # (key as written, its values to check)
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            options.append((key, [o.get_value_element_as_str()]))
        elif o.is_interval_sweep():
            options.append((key, [_number_text(o.value().start), _number_text(o.value().end)]))
        else:
            options.append((key, list(o.sweep_string_iterator())))
    base = [f"{k}={values[0]}" for k, values in options]
    jobs = [base]
    for index, (key, values) in enumerate(options):
        jobs += [[*base[:index], f"{key}={v}", *base[index + 1:]] for v in values[1:]]
    return jobs, [k.lstrip("+~") for k, values in options if _is_swept(k, parsed)]


def _is_swept(key: str, parsed) -> bool:
    return any(o.get_key_element() == key and o.is_sweep_override() for o in parsed)


def _number_text(x: float | int) -> str:
    return repr(x) if isinstance(x, float) else str(x)


# ------------------------------------------------------------------------------------------------ the objective

DEFAULT_OBJECTIVES = {"sft": "eval_loss", "grpo": "eval_reward", "rlt": "eval_reward"}
NOT_RESULTS = frozenset({"step", "epoch", "time", "global_step", "steps", "last_n", "best_checkpoint_step"})


def objective_of(run) -> tuple[str, str]:
    """(objective, direction) of a validated run: `sweep_objective` (null: eval_loss for SFT, eval_reward for GRPO
    and RLT) and `sweep_direction` (null: maximize for rewards and accuracies, minimize for losses, perplexity, KL...:
    `rlt.report.higher_is_better`)."""
    name = run.sweep_objective or DEFAULT_OBJECTIVES[run.algorithm]
    return name, run.sweep_direction or default_direction(name)


def default_direction(name: str) -> str:
    """The direction that improves a result, by its name (`rlt.report.higher_is_better`).

    >>> default_direction("eval/loss"), default_direction("eval_reward"), default_direction("eval/accuracy")
    ('minimize', 'maximize', 'maximize')
    """
    from rlt.report import higher_is_better

    return "maximize" if higher_is_better(result_names(name)[-1]) else "minimize"


def result_names(name: str) -> list[str]:
    """The names a result may have in the run dir: as given, then as rlt logs a wandb-style name (transformers'
    wandb panel names: `eval/loss` is `eval_loss`, `train/loss` is `loss`).

    >>> result_names("eval/accuracy"), result_names("train/loss"), result_names("eval_loss")
    (['eval/accuracy', 'eval_accuracy'], ['train/loss', 'loss'], ['eval_loss'])
    """
    for prefix, replacement in (("eval/", "eval_"), ("train/", "")):
        if name.startswith(prefix):
            return [name, replacement + name.removeprefix(prefix)]
    return [name]


def run_results(run_dir: str | Path) -> dict[str, float]:
    """Every numeric result of a run: the last logged value of each key of metrics.jsonl, overridden by what
    summary.json holds: the mean of the last N values of the main training metrics (loss, reward, their terms), the
    last evaluation, and the top-level results (eval_loss, train_loss, accuracy_after, ...)."""
    run_dir = Path(run_dir)
    results: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                results.update(_numbers(json.loads(line)))
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if isinstance(summary, dict):
        metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
        results.update(_numbers({k: v.get("mean_last") for k, v in metrics.items() if isinstance(v, dict)}))
        results.update(_numbers(summary.get("eval") if isinstance(summary.get("eval"), dict) else {}))
        results.update(_numbers(summary))
    return results


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in NOT_RESULTS and isinstance(v, int | float)
            and not isinstance(v, bool) and math.isfinite(v)}


def objective_value(run_dir: str | Path, name: str, algorithm: str | None = None) -> float:
    """The value of result `name` (or its wandb-style alias) in the run dir; `RltError` naming the results the run
    has when it has none of that name."""
    results = run_results(run_dir)
    for candidate in result_names(name):
        if candidate in results:
            return results[candidate]
    hint = ""
    if algorithm and name == DEFAULT_OBJECTIVES.get(algorithm):
        hint = (f" ({name} is the default objective of {algorithm}: the run needs validation, see eval_steps / "
                "eval_split)")
    have = ", ".join(sorted(results)) or "none (no summary.json or metrics.jsonl)"
    raise RltError(f"sweep_objective={name}: {run_dir} has no such result{hint}; its results: {have}. Set "
                   "sweep_objective to one of them")


def sweeper_overrides(overrides: Sequence[str], runs: Sequence) -> list[str]:
    """What `rlt.train` adds to the command line of a sweep: for hydra/sweeper=optuna, the direction of the runs'
    objective (`objective_of`), ['hydra.sweeper.direction=minimize']; [] for other sweepers. `ConfigError` when the
    search's points have different objectives (a swept run_cfg of another algorithm) or the command line sets
    hydra.sweeper.direction against it."""
    if group_choice(overrides, "hydra/sweeper") != "optuna" or not runs:
        return []
    goals = {objective_of(run) for run in runs}
    if len(goals) > 1:
        shown = ", ".join(f"{name} ({direction})" for name, direction in sorted(goals))
        raise ConfigError(f"an Optuna search optimizes one objective, but its points have several: {shown}; set "
                          "sweep_objective (and sweep_direction)")
    ((name, direction),) = goals
    given = group_choice(overrides, "hydra.sweeper.direction")
    if given is not None and given != direction:
        raise ConfigError(f"hydra.sweeper.direction={given}, but the objective {name} is to {direction}: set "
                          f"sweep_direction={given} (and sweep_objective) instead")
    return [] if given is not None else [f"hydra.sweeper.direction={direction}"]


# ------------------------------------------------------------------------------------------------ one job


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    from hydra.types import RunMode

    hydra = _hydra()
    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def is_search() -> bool:
    """Whether this job is a trial of a search whose sweeper reads the objective (hydra/sweeper=optuna)."""
    hydra = _hydra()
    return hydra is not None and "optuna" in str(hydra.sweeper.get("_target_", "")).lower()


def _scheduler_job_id() -> str | None:
    """SLURM's job id (array job_task), or the local launcher's (its controller's PID); None outside submitit."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")


class SweepJob:
    """One job of a multirun: its `sweep_job.json` in the Hydra job dir (one entry per attempt: a requeued job runs
    again), and under submitit the preemption signal (USR2: SLURM's `--signal`, sent before the time limit and, where
    the cluster signals preemption, on preemption) made a graceful stop: the step ends, a checkpoint is saved, then
    submitit requeues the job, which resumes from that checkpoint in the same run dir. Outside a multirun it does
    nothing. Use as a context manager around the training."""

    def __init__(self, enabled: bool = True):
        hydra = _hydra() if enabled and in_multirun() else None
        self.path = Path(hydra.runtime.output_dir) / JOB_FILE if hydra is not None else None
        self.record: dict[str, Any] = {}
        self._submitit_handler = None  # submitit's handler of the preemption signal, while ours replaces it
        self.preempted: int | None = None
        if hydra is not None:
            self._start(hydra)

    def _start(self, hydra) -> None:
        from rlt.train import current_sweep, parse_job_overrides

        previous = _read_json(self.path) if self.path.is_file() else {}
        keys = (current_sweep() or {}).get("keys")
        overrides = list(hydra.overrides.task)
        params = {k: v for k, v, _ in parse_job_overrides(overrides) if keys is None or k in keys}
        attempts = previous.get("attempts", []) if previous.get("overrides") == overrides else []
        attempts.append({"pid": os.getpid(), "host": socket.gethostname(), "scheduler_job_id": _scheduler_job_id(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "running"})
        self.record = {"job": int(hydra.job.num), "overrides": overrides, "params": params, "status": "running",
                       "attempts": attempts}
        self._save()

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.record)

    def __enter__(self) -> SweepJob:
        if self.path is not None and os.environ.get("SUBMITIT_EXECUTOR"):
            assign_local_gpus()
            handler = signal.getsignal(_preempt_signal())
            if callable(handler):  # submitit's: checkpoint (resubmit the same job) and requeue
                self._submitit_handler = handler
                signal.signal(_preempt_signal(), self._on_preempt)
        return self

    def _on_preempt(self, signum, frame) -> None:
        """While training (rlt.stop.GracefulStop holds SIGTERM): stop at the end of the step with a checkpoint, and
        requeue once the run has stopped (`__exit__`); before or after training: submitit's own requeue, now."""
        self.preempted = signum
        term = signal.getsignal(signal.SIGTERM)
        stop = getattr(term, "__self__", None)
        if type(stop).__name__ != "GracefulStop":
            self._submitit_handler(signum, frame)  # requeues, then exits (SystemExit)
        elif stop.signum is None:
            term(signum, frame)

    def objective(self, cfg, summary: dict | None) -> float | None:
        """The value the sweeper compares (the task function's return value): the run's `sweep_objective` result.
        None outside a multirun or with --print-config; in a search (Optuna) a missing result is an error, in a
        grid sweep only not recorded."""
        if self.path is None or summary is None:
            return None
        from rlt.config import validate

        run = validate(cfg)
        name, direction = objective_of(run)
        run_dir = summary.get("output_dir") or self.path.parent
        self.record.update(run_dir=str(run_dir), objective=name, direction=direction)
        try:
            value = objective_value(run_dir, name, run.algorithm)
        except RltError as e:
            if is_search():
                raise
            self.record["objective_error"] = str(e)
            return None
        self.record["value"] = value
        return value

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._submitit_handler is not None:
            signal.signal(_preempt_signal(), self._submitit_handler)
        if self.path is None:
            return
        status = "completed" if exc is None else "stopped" if getattr(exc, "exit_code", 0) > 128 else "failed"
        if self.preempted is not None and exc is not None:  # stopped with a checkpoint, or requeued already
            status = "requeued"
        self.record["status"] = status
        if exc is not None:
            self.record["error"] = " ".join(str(exc).split())[:2000] or type(exc).__name__
        self.record["attempts"][-1].update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._save()
        if status == "requeued" and not isinstance(exc, SystemExit):  # submitit requeues the job; this process exits
            sys.stderr.write(f"\nrlt: {exc}\nrlt: preempted: submitit requeues this job, which resumes from that "
                             "checkpoint\n")
            self._submitit_handler(self.preempted, None)


def _preempt_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


MACHINE_GPUS_ENV = "RLT_MACHINE_GPUS"  # set by rlt.train for hydra/launcher=local: the GPUs the sweep may use


def machine_gpus() -> str:
    """The GPUs of this machine a local sweep spreads its jobs over: CUDA_VISIBLE_DEVICES if set, else every GPU the
    NVIDIA driver lists ('0,1,...'); '' for none."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return os.environ["CUDA_VISIBLE_DEVICES"]
    with contextlib.suppress(OSError):
        return ",".join(str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus"))))
    return ""


def assign_local_gpus() -> None:
    """In a job of submitit's local launcher, which makes GPUs 0..gpus_per_node-1 visible to every job: job k gets
    its own `gpus_per_node` GPUs of the machine's (k-th block, wrapping around), so that the jobs running at once
    (`hydra.sweeper.max_batch_size`) do not share a GPU while the machine has enough."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or MACHINE_GPUS_ENV not in os.environ:
        return
    gpus = [g for g in os.environ[MACHINE_GPUS_ENV].split(",") if g.strip()]
    per_job = len([g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()])
    block = gpu_block(gpus, per_job, int(_hydra().job.num))
    if block:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(block)


def gpu_block(gpus: list[str], per_job: int, job: int) -> list[str]:
    """The GPUs of job number `job` when each job gets `per_job` of `gpus`: the job-th block, wrapping around; []
    when there are no GPUs, none per job or fewer than a job needs.

    >>> gpu_block(["0", "1", "2", "3"], 2, 0), gpu_block(["0", "1", "2", "3"], 2, 1), gpu_block(["0", "1", "2"], 2, 1)
    (['0', '1'], ['2', '3'], ['2', '0'])
    """
    if not gpus or per_job <= 0 or per_job > len(gpus):
        return []
    start = (job * per_job) % len(gpus)
    return (gpus * 2)[start:start + per_job]


# ------------------------------------------------------------------------------------------------ the sweep


def sweep_dir_of(overrides: Sequence[str]) -> str:
    """`hydra.sweep.dir` of a multirun of these (non-sweep) overrides, as Hydra resolves it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlt.compose import CONFIG_DIR
    from rlt.config import register_defaults

    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return str(cfg.hydra.sweep.dir)


def summarize(sweep_dir: str | Path) -> dict:
    """The jobs of a sweep dir (their `sweep_job.json`, by job number), the objective, and the best completed job
    by the objective's direction (None when no job has a value, or the jobs' objectives differ)."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for path in sweep_dir.glob(f"*/{JOB_FILE}"):
        if record := _read_json(path):
            record.setdefault("run_dir", str(path.parent))
            jobs.append(record)
    jobs.sort(key=lambda r: (r.get("job", 0), str(r.get("params"))))
    goals = {(r.get("objective"), r.get("direction")) for r in jobs if r.get("objective")}
    objective, direction = next(iter(goals)) if len(goals) == 1 else (None, None)
    scored = [r for r in jobs if r.get("status") == "completed" and isinstance(r.get("value"), int | float)]
    best = None
    if objective and scored:
        pick = max if direction == "maximize" else min
        top = pick(scored, key=lambda r: r["value"])
        best = {"job": top.get("job"), "params": top.get("params"), "value": top["value"], "run_dir": top["run_dir"]}
    summary = {"sweep_dir": str(sweep_dir), "objective": objective, "direction": direction, "best": best,
               "jobs": [{k: r.get(k) for k in ("job", "params", "status", "value", "run_dir", "error", "attempts")
                         if r.get(k) is not None} for r in jobs]}
    if (sweep_dir / OPTUNA_RESULTS).is_file():
        summary["optuna_results"] = str(sweep_dir / OPTUNA_RESULTS)
    return summary


def write_summary(sweep_dir: str | Path) -> dict:
    """`summarize` the sweep dir into `<sweep dir>/sweep_summary.json`; returns the summary."""
    summary = summarize(sweep_dir)
    write_json(Path(sweep_dir) / SUMMARY_FILE, summary)
    return summary


def format_summary(summary: dict) -> str:
    """The summary as the lines `rlt.train` prints at the end of a sweep."""
    objective, jobs = summary["objective"], summary["jobs"]
    goal = f" (objective {objective}, {summary['direction']})" if objective else ""
    lines = [f"rlt: sweep of {len(jobs)} job(s) in {summary['sweep_dir']}{goal}"]
    for job in jobs:
        value = job.get("value")
        shown = f"{value:.6g}" if isinstance(value, int | float) else "-"
        params = " ".join(f"{k}={v}" for k, v in (job.get("params") or {}).items()) or "(no swept keys)"
        tries = len(job.get("attempts") or [])
        lines.append(f"  #{job.get('job')}  {job.get('status', '?'):<9}  {objective or 'value'}={shown}  {params}"
                     + (f"  ({tries} attempts)" if tries > 1 else ""))
    best = summary.get("best")
    if best:
        params = " ".join(f"{k}={v}" for k, v in (best.get("params") or {}).items())
        lines.append(f"  best: #{best['job']} {params}: {objective}={best['value']:.6g} ({best['run_dir']})")
    lines.append(f"  written: {Path(summary['sweep_dir']) / SUMMARY_FILE}; compare the runs: python -m rlt.report "
                 f"{summary['sweep_dir']}")
    return "\n".join(lines)


def report(sweep_dir: str | Path) -> None:
    """Write and print the summary of a sweep that has job records; a problem doing so is only a warning."""
    try:
        if any(Path(sweep_dir).glob(f"*/{JOB_FILE}")):
            print(format_summary(write_summary(sweep_dir)), flush=True)
    except Exception as e:  # noqa: BLE001 - the jobs' results are on disk whatever happens here
        sys.stderr.write(f"rlt: warning: could not summarize the sweep {sweep_dir}: {e}\n")


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON at `path`, atomically (a temp file beside it, then `os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    from rlt.cli import parse_cli

    parser = argparse.ArgumentParser(prog="python -m rlt.sweeps", description="Summarize a sweep: each job's "
                                     "status and objective value, and the best job; writes sweep_summary.json.")
    parser.add_argument("sweep_dir", help="the sweep dir (results/<run_name>/multirun, or hydra.sweep.dir)")
    args = parse_cli(parser, argv, quiet=False)
    if not any(Path(args.sweep_dir).glob(f"*/{JOB_FILE}")):
        print(f"error: {args.sweep_dir} holds no sweep job ({JOB_FILE} in its job dirs)", file=sys.stderr)
        return 2
    print(format_summary(write_summary(args.sweep_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
