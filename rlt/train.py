"""Train from a Hydra config:  python -m rlt.train [run_cfg=NAME] [key=value ...] [--print-config]

    python -m rlt.train                                    # the embedded default (run_cfg=demo)
    python -m rlt.train run_cfg=tiny_sft max_steps=3       # any key by its short name
    python -m rlt.train -m run_cfg=tiny_sft learning_rate=1e-3,3e-3   # Hydra multirun sweep, one dir per job
                                                           # (multirun/learning_rate=0.001, ...: the swept keys)
    python -m rlt.train -m run_cfg=tiny_sft learning_rate=1e-3,3e-3 hydra/launcher=local   # jobs in parallel
    python -m rlt.train -m run_cfg=tiny_sft 'learning_rate=interval(1e-4,1e-2)' hydra/sweeper=optuna  # a search
    python -m rlt.train run_cfg=tiny_sft --print-config    # validate and print the resolved config, then exit

Config mistakes (unknown keys, wrong types, impossible values, missing data columns, ...) end the program with one
readable message and exit status 2; a traceback means a bug in rlt. Runs, run dirs and resuming: README.md; parallel
jobs, SLURM and searches: docs/sweeps.md (rlt.sweeps).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from rlt.compose import CONFIG_DIR, compose
from rlt.config import register_defaults, to_yaml, validate
from rlt.errors import RltError

PRINT_CONFIG_FLAG = "--print-config"


def resolve_output_dir(run) -> str:
    """`output_dir` if set, else the Hydra job dir (`results/<run_name>`, or the multirun job's own subdir). In a
    multirun sweep an explicit `output_dir` gets the job's subdir too: two jobs never share a run dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if run.output_dir:
        if hydra is not None and hydra.mode == RunMode.MULTIRUN:
            return os.path.join(run.output_dir, os.path.relpath(hydra.runtime.output_dir, hydra.sweep.dir))
        return run.output_dir
    if hydra is not None:
        return hydra.runtime.output_dir
    return os.path.join(run.results_dir, run.run_name)


def run_training(cfg: DictConfig, *, print_config: bool = False) -> dict | None:
    """Validate `cfg` (before anything heavy is imported or loaded), then run its algorithm's recipe."""
    run = validate(cfg)
    run.output_dir = resolve_output_dir(run)
    if print_config:
        sys.stdout.write(to_yaml(run))
        return None
    import contextlib
    import importlib

    from rlt.console import configure_noise
    from rlt.preflight import check as preflight

    configure_noise(run.verbose)  # before third-party code runs: what TRL, vLLM or DeepSpeed print at import stays
    preflight(run)  # CUDA-only settings on a machine without one, missing extras: before anything is fetched

    from rlt.memcheck import check_before_training
    from rlt.models import check_local_paths
    from rlt.run_dir import RunLock, check_free_space, ensure_writable, finish_from_checkpoint, open_run

    check_local_paths(run)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        ensure_writable(run.output_dir)
    with RunLock(run.output_dir) if is_main else contextlib.nullcontext():
        state = open_run(run, is_main=is_main)  # the run dir's config, checkpoints and logs agree with this run
        if state.action == "done":
            print(f"rlt: {run.output_dir} already finished {state.summary['global_step']} of max_steps="
                  f"{run.max_steps} steps; nothing to do (raise max_steps to train on, or use a new run_name / "
                  "output_dir)", flush=True)
            return state.summary
        if state.action == "finish":
            summary = finish_from_checkpoint(run, state, is_main=is_main)
            print(f"rlt: {run.output_dir} had trained all {summary['global_step']} steps but was stopped during its "
                  f"final save: final model and summary completed from {state.checkpoint}, nothing trained",
                  flush=True)
            return summary
        if is_main and state.action == "start":
            check_free_space(run)
        check_before_training(run)
        recipe = importlib.import_module(f"rlt.recipes.{run.algorithm}")  # sft | grpo | rlt, checked by validate()
        from rlt.tracking import finish_reporting

        exit_code = 1
        try:
            summary = recipe.train(run)
            exit_code = 0
            return summary
        except RltError as e:
            exit_code = getattr(e, "exit_code", 2)
            raise
        finally:  # the job's wandb run ends here, failed on an error: the next job of a sweep starts its own
            finish_reporting(exit_code)


MULTIRUN_FLAGS = ("-m", "--multirun")


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job Hydra's basic sweeper launches for these command-line overrides (in its order).

    ['a=1,2', 'b=x'] → [['a=1', 'b=x'], ['a=2', 'b=x']]. Raises `ConfigError` on unparsable overrides.
    """
    # Hydra's own basic sweeper does this expansion when it launches; its module is private (hydra-core is pinned)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rlt.errors import ConfigError

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    except Exception as e:  # hydra's OverrideParseException / HydraException
        raise ConfigError(f"cannot read the sweep: {str(e).splitlines()[0]}") from None


SWEEP_ENV = "RLT_SWEEP"  # set by main() in a multirun: {"keys": the swept keys, "hashed": bool} (JSON)
JOB_DIR_RESOLVER = "rlt_job_dir"  # cfgs/train.yaml: hydra.sweep.subdir: ${rlt_job_dir:${hydra.overrides.task}}
PLACEMENT_KEYS = ("results_dir", "output_dir")  # where a run goes is not part of its name


def parse_job_overrides(overrides) -> list[tuple[str, object, str]]:
    """(key, value, value as text) of each override of one job (no sweeps), Hydra's own overrides left out.

    ['learning_rate=0.001', "+x='a b'"] -> [('learning_rate', 0.001, '0.001'), ('x', 'a b', 'a b')]
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = []
    for o in OverridesParser.create().parse_overrides([str(x) for x in overrides]):
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        if key.split(".")[0].split("/")[0] == "hydra":
            continue
        value = None if o.is_delete() else o.value()
        parsed.append((key, value, value if isinstance(value, str) else o.get_value_element_as_str()))
    return parsed


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys whose values differ between the jobs of a sweep (`sweep_jobs`), in command-line order.

    [['lr=1', 'seed=0'], ['lr=2', 'seed=0']] -> ['lr']
    """
    values: dict[str, set[str]] = {}
    for job in jobs:
        for key, _, text in parse_job_overrides(job):
            values.setdefault(key, set()).add(text)
    return [key for key, texts in values.items() if len(texts) > 1]


def job_dir_name(overrides, keys: list[str] | None, *, hashed: bool = False) -> str:
    """The dir of one sweep job (under the sweep dir): `key=value` of its swept `keys`, joined by ','.

    Path-safe: brackets and quotes dropped, a leading '/' dropped, path separators and any other character outside
    [A-Za-z0-9._,=+@%-] replaced by '_' ('dataset_id_or_path=/data/x.jsonl' -> 'dataset_id_or_path=data_x.jsonl').
    `keys` None (another sweeper plugin: not known) or empty (a sweep of one job): every override of the job but
    results_dir / output_dir; none at all: 'default'. `hashed` (two jobs of the sweep would share a name) or a name
    over 120 characters: cut to 111 and a hash of the full `key=value` text appended.
    """
    pairs = [(key, text) for key, _, text in parse_job_overrides(overrides)]
    chosen = [(k, t) for k, t in pairs if k in keys] if keys else [(k, t) for k, t in pairs if k not in PLACEMENT_KEYS]
    name = ",".join(f"{_path_safe(k)}={_path_safe(t)}" for k, t in chosen) or "default"
    if hashed or len(name) > 120:
        text = ",".join(f"{k}={t}" for k, t in chosen)
        name = f"{name[:111]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def _path_safe(text: str) -> str:
    text = re.sub(r"[\[\]{}()'\"]", "", text).lstrip("/\\")
    return re.sub(r"[^A-Za-z0-9._,=+@%-]+", "_", text)


def current_sweep() -> dict | None:
    """{"keys": [...], "hashed": bool} of the running multirun, as `main()` set it (None: not known)."""
    raw = os.environ.get(SWEEP_ENV)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _job_dir(task_overrides) -> str:
    sweep = current_sweep() or {}
    return job_dir_name(list(task_overrides), sweep.get("keys"), hashed=bool(sweep.get("hashed")))


def register_resolvers() -> None:
    """`${rlt_job_dir:...}`, which names each sweep job's dir in cfgs/train.yaml (`job_dir_name`)."""
    OmegaConf.register_new_resolver(JOB_DIR_RESOLVER, _job_dir, replace=True)


def announce_sweep(overrides: list[str]) -> None:
    """Tell the jobs of this multirun which keys it sweeps (`SWEEP_ENV`): their dir names, wandb names and group.
    Unknown (left unset) for another sweeper plugin or overrides Hydra's basic sweeper cannot expand."""
    from rlt.sweeps import group_choice, search_points

    os.environ.pop(SWEEP_ENV, None)
    sweeper = group_choice(overrides, "hydra/sweeper")
    if sweeper == "optuna":  # its trials' dirs are named by the keys it searches
        try:
            _, keys = search_points(_search_space(overrides))
        except RltError:
            return
        os.environ[SWEEP_ENV] = json.dumps({"keys": keys, "hashed": False})
        return
    if sweeper not in (None, "basic"):
        return
    try:
        jobs = sweep_jobs([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    except RltError:
        return
    keys = swept_keys(jobs)
    distinct = {tuple(job) for job in jobs}
    hashed = len({job_dir_name(job, keys) for job in distinct}) < len(distinct)
    os.environ[SWEEP_ENV] = json.dumps({"keys": keys, "hashed": hashed})


def _is_hydra(o: str) -> bool:
    return o.lstrip("+~").startswith("hydra")


def _search_space(overrides: list[str]) -> list[str]:
    """The task overrides of an Optuna search, with its `hydra.sweeper.params.KEY=SPEC` overrides."""
    return [o for o in overrides if not _is_hydra(o) or o.startswith("hydra.sweeper.params.")]


def check_overrides(overrides: list[str], *, multirun: bool) -> list[tuple[list[str], object]]:
    """Compose and validate the run (or every job of a multirun sweep) before Hydra starts the first one; returns
    each job's overrides and validated run config.

    Hydra's launcher runs sweep jobs one after another: without this, a bad value in the last job of a sweep stops
    it only after the others have trained. Raises `ConfigError` naming each invalid job (its overrides) and what
    is wrong; an unknown key is named as such (with the closest known keys) instead of Hydra's advice to add it
    with `+`. An Optuna search (`hydra/sweeper=optuna`) is checked at every choice and both ends of every interval
    of its search space (`rlt.sweeps.search_points`); sweeps of another sweeper plugin are left to Hydra ([]).
    """
    from rlt.errors import ConfigError
    from rlt.sweeps import group_choice, search_points

    sweeper = group_choice(overrides, "hydra/sweeper") if multirun else None
    if sweeper not in (None, "basic", "optuna"):
        return []
    plain = [o for o in overrides if not _is_hydra(o)]
    if sweeper == "optuna":
        jobs, _ = search_points(_search_space(overrides))
    else:
        jobs = sweep_jobs(plain) if multirun else [plain]
    hydra_overrides = [o for o in overrides if _is_hydra(o) and not o.startswith("hydra.sweeper.params.")]
    from rlt.run_dir import check_creatable

    problems, runs = [], []
    for index, job in enumerate(jobs):
        try:
            run = compose(overrides=[*job, *hydra_overrides])
            check_creatable(run.output_dir or os.path.join(run.results_dir, run.run_name))  # Hydra creates it next
            runs.append((job, run))
        except RltError as e:
            problems.append((index, job, str(e)))
    if not problems:
        return runs
    if not multirun:
        raise ConfigError(problems[0][2])
    lines = [f"{len(problems)} of {len(jobs)} sweep jobs have an invalid config (no job was started):"]
    for index, job, message in problems:
        lines.append(f"  job #{index} ({' '.join(job)}):")
        lines += [f"    {line}" for line in message.splitlines() if line.strip()]
    raise ConfigError("\n".join(lines))


def main() -> None:
    if "--help-key" in sys.argv:  # python -m rlt.train --help-key KEY: one key's entry of docs/config.md
        from rlt.config.__main__ import main as config_main

        i = sys.argv.index("--help-key")
        sys.exit(config_main(["--key", *sys.argv[i + 1:i + 2]]))
    print_config = PRINT_CONFIG_FLAG in sys.argv
    if print_config:
        sys.argv.remove(PRINT_CONFIG_FLAG)

    register_defaults()
    register_resolvers()
    args = sys.argv[1:]
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    overrides = [a for a in args if a not in MULTIRUN_FLAGS]
    os.environ.pop(SWEEP_ENV, None)
    from rlt import sweeps

    sweep_dir = None
    try:
        sweeps.check_plugins(overrides)  # a launcher / sweeper plugin not installed: one line naming the extra
        # plain override lists only: other Hydra flags (--cfg, --config-name, --info, ...) are Hydra's to handle
        if all(a in MULTIRUN_FLAGS or (not a.startswith("-") and "=" in a) for a in args):
            jobs = check_overrides(overrides, multirun=multirun)
            if multirun:
                announce_sweep(overrides)
                os.environ[sweeps.MACHINE_GPUS_ENV] = sweeps.machine_gpus()  # what local parallel jobs spread over
                sys.argv += sweeps.sweeper_overrides(overrides, [run for _, run in jobs])
                if jobs and not print_config:
                    sweep_dir = sweeps.sweep_dir_of([*jobs[0][0], *filter(_is_hydra, overrides)])
    except RltError as e:
        sys.stderr.write(f"\nrlt: {e}\n")
        sys.exit(2)

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        """One run (or sweep job); returns its objective value (`sweep_objective`), which a search optimizes."""
        try:
            with sweeps.SweepJob(enabled=not print_config) as job:  # a sweep job's record; preemption under submitit
                return job.objective(cfg, run_training(cfg, print_config=print_config))
        except RltError as e:
            sys.stderr.write(f"\nrlt: {e}\n")
            sys.exit(getattr(e, "exit_code", 2))

    try:
        _main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, generation set-up): nothing to save
        sys.stderr.write("\nrlt: interrupted (Ctrl-C) before a step could be saved; the same command starts again "
                         "from the last complete checkpoint, if any\n")
        sys.exit(130)
    finally:
        if sweep_dir is not None:  # each job's status and objective value, the best job: sweep_summary.json
            sweeps.report(sweep_dir)


if __name__ == "__main__":
    main()
