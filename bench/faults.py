"""Fault injection: SIGKILL tiny training runs at random moments, re-run the same command, check the run dir.

    python bench/faults.py                    # GRPO (hf), GRPO (vllm_colocate), RLT: trials until >= 16 kills each
    python bench/faults.py --quick            # smoke test (tests/test_faults.py): 1 trial per config, 2 kills each
                                              # (within a step after the first, then in the final save)
    python bench/faults.py --configs grpo_hf --trials 3 --kills 2 --seed 1 --json /tmp/faults.json

For each config (`CONFIGS`) a first, uninterrupted run (the baseline) measures the run's timeline: time to the first
logged step, the steps, each checkpoint write (its directory appears -> its completion marker), the last checkpoint
to summary.json (the final save), exit. Then each trial, in a fresh run dir, runs
``python -m rlt.train <overrides> output_dir=<dir> max_steps=M save_steps=S report_to=[none]`` in its own session
and SIGKILLs its whole process group, then runs the same command again: killed again with probability
`--repeat-prob` (up to `--kills` kills per trial), and finally left to finish. A kill is

* uniform (probability 1 - `--targeted`): at a moment uniform over the attempt's expected run time (the baseline's,
  less the steps a resumed attempt skips, scaled by how long the runs since took against their expectation: the
  machine's load changes), so kills land during imports and model/engine loading, mid-step, and now and then in a
  save; one drawn past the attempt's end does not fire (`missed`: the run finished, the trial ends);
* targeted (probability `--targeted`): a checkpoint write (a random delay within the baseline's write time after a
  chosen checkpoint's directory appears) or the final save (a random delay within the baseline's time from the last
  checkpoint's completion to final/ renamed into place): windows of milliseconds that uniform kills seldom hit.

The phase each kill landed in is read from the run dir as the kill left it: `startup` (the attempt logged no step
yet: imports, loading, resume, its first step), `train<ckpt1` (training, no checkpoint yet), `ckpt write` (a
checkpoint this attempt started is unmarked), `between` (training after a complete checkpoint), `after last` (the
last checkpoint is complete: final save, summary, or an attempt completing them), `exiting` (summary.json written).

A trial survives if, after its last attempt: the exit code is 0; summary.json has global_step == max_steps; no
checkpoint lies beyond max_steps and no partial save is left (final.tmp, unmarked checkpoint dirs); metrics.jsonl
holds every step 1..max_steps once (records with "loss"); `final/` loads with `AutoModelForCausalLM` and holds the
weights of checkpoint-<max_steps>; and no process is left: none whose command line holds the run dir, none of the
attempts' descendants, nobody holding the run lock (checked after every kill, too). Exit status 1 if a trial (or a
baseline) failed; failed trials keep their run dirs and logs (`--keep`: all). The runs use a copy of rlt/ and cfgs/
taken at the start (`--live`: the working tree), so that edits made meanwhile do not break trials half-way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, machine_info, machine_line, use_offline_env, write_json
from bench.fault_checks import (
    StepWatch,
    check_run,
    classify,
    last_complete_step,
    snapshot_events,
)

use_offline_env()
os.environ.setdefault("PYTHONUNBUFFERED", "1")

# the tests' fast geometry (tests/test_grpo.py, tests/test_rlt.py): a step takes about a second on a CPU
_GRPO = ["run_cfg=tiny_grpo", "train_batch_size=8", "per_device_train_batch_size=4", "num_generations=4",
         "max_completion_length=16"]
CONFIGS = {
    "grpo_hf": [*_GRPO, "generation_backend=hf"],
    "grpo_vllm": [*_GRPO, "generation_backend=vllm_colocate"],
    "rlt": ["run_cfg=teacher_rlt_tiny", "train_batch_size=8", "per_device_train_batch_size=4", "num_generations=4",
            "max_completion_length=24"],
}
NEEDS_VLLM = {"grpo_vllm"}
PHASES = ("startup", "train<ckpt1", "ckpt write", "between", "after last", "exiting")
POLL_S = 0.003


# ---------------------------------------------------------------------------------------------- processes


def _descendants(pid: int) -> set[tuple[int, float]]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return {(c.pid, c.create_time()) for c in psutil.Process(pid).children(recursive=True)}
    return set()


def strays(run_dir: Path, pgid: int | None, seen: set[tuple[int, float]]) -> list[str]:
    """Live processes of a finished or killed attempt: in its process group, among the descendants seen while it
    ran, or with the run dir in their command line (zombies excluded: they hold nothing)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status", "create_time"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(p.info["cmdline"] or [])
        in_group = False
        if pgid is not None:
            with contextlib.suppress(OSError):
                in_group = os.getpgid(p.pid) == pgid
        if in_group or (p.pid, p.info["create_time"]) in seen or str(run_dir) in cmdline:
            found.append(f"pid {p.pid} ({p.info['status']}): {cmdline[:160]}")
    return found


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run dir's lock (rlt.run_dir.RunLock), or None when it is free."""
    path = run_dir / ".rlt.lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 4096).decode("utf-8", "replace").strip() or "someone"
    finally:
        os.close(fd)  # releases it if taken
    return None


def wait_gone(run_dir: Path, pgid: int, seen: set, timeout: float = 15.0) -> list[str]:
    """Strays left after `timeout` seconds (the kernel tears a killed group down asynchronously)."""
    deadline = time.time() + timeout
    while True:
        left = strays(run_dir, pgid, seen)
        holder = lock_holder(run_dir)
        if not left and holder is None:
            return []
        if time.time() > deadline:
            return left + ([f"lock held by {holder}"] if holder else [])
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- one attempt


@dataclass
class Plan:
    """When to kill an attempt: ``uniform`` at `delay` s after its start; ``ckpt`` `delay` s after checkpoint-
    `step`'s dir appears; ``final`` `delay` s after the last checkpoint's marker appears; ``step`` `delay` s after
    the attempt's first logged step; ``none``: never."""

    kind: str = "none"
    delay: float = 0.0
    step: int | None = None

    def describe(self) -> str:
        return {"none": "no kill", "uniform": f"uniform at {self.delay:.2f}s",
                "ckpt": f"targeted: checkpoint-{self.step} write +{self.delay:.3f}s",
                "final": f"targeted: final save +{self.delay:.3f}s",
                "step": f"targeted: 1st step +{self.delay:.2f}s"}[self.kind]


@dataclass
class Attempt:
    plan: str
    resumed_from: int
    wall_s: float = 0.0
    rc: int | None = None
    killed: bool = False
    kill_at_s: float | None = None
    phase: str | None = None
    hung: bool = False
    strays: list[str] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    log: str = ""


def snapshot_source(dest: Path) -> Path:
    """Copy rlt/ and cfgs/ to `dest`; run from there (`python -m` puts the cwd before the editable install), the
    trials all test the code as it was at the start, whatever is edited in the working tree meanwhile."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("rlt", "cfgs"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def run_attempt(cmd: list[str], run_dir: Path, log_path: Path, plan: Plan, max_steps: int, timeout: float,
                poll: float = POLL_S, cwd: Path = REPO) -> Attempt:
    """Run `cmd` in its own session; SIGKILL its process group as `plan` says (or at `timeout`); record first-seen
    times of run-dir events, the descendants, the phase of the kill and what survived it."""
    attempt = Attempt(plan=plan.describe(), resumed_from=last_complete_step(run_dir), log=str(log_path))
    before = snapshot_events(run_dir)
    trigger = {"ckpt": f"ckpt-{plan.step}", "final": f"ckpt-{max_steps}-complete", "step": "stepped"}.get(plan.kind)
    armed = trigger is not None and trigger not in before  # a stale dir must go (open_run removes it) first
    fire_at = plan.delay if plan.kind == "uniform" else None
    seen: set[tuple[int, float]] = set()
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stepped = StepWatch(run_dir, t0) if plan.kind == "step" else None
        next_scan = 0.0
        while True:
            rc = proc.poll()
            now = time.time() - t0
            if rc is not None:
                attempt.rc = rc
                break
            events = snapshot_events(run_dir) | ({"stepped"} if stepped is not None and stepped() else set())
            for e in events - attempt.events.keys() - before:
                attempt.events[e] = round(now, 3)
            if trigger is not None and fire_at is None:
                if not armed and trigger not in events:
                    armed = True
                elif armed and trigger in events:
                    fire_at = now + plan.delay
            if now >= next_scan:
                seen |= _descendants(proc.pid)
                next_scan = now + 0.25
            if (fire_at is not None and now >= fire_at) or now > timeout:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    attempt.rc = proc.wait()
                    break
                attempt.rc = proc.wait()
                attempt.killed, attempt.hung, attempt.kill_at_s = True, now > timeout, round(now, 3)
                break
            time.sleep(poll)
        attempt.wall_s = round(time.time() - t0, 3)
    if attempt.killed:
        attempt.phase = classify(run_dir, t0, max_steps)
    attempt.strays = wait_gone(run_dir, proc.pid, seen)
    return attempt


# ---------------------------------------------------------------------------------------------- trials


@dataclass
class Timeline:
    """The baseline's timeline (seconds from start), what the kill times are drawn from; `ratios`: the run times of
    the attempts that trained to the end since, each over its expectation (the machine's load changes)."""

    total: float
    first_step: float
    last_ckpt_complete: float
    final: float
    summary: float
    ckpt_write: float
    ratios: list[float] = field(default_factory=lambda: [1.0])

    @classmethod
    def of(cls, attempt: Attempt, max_steps: int, save_steps: int) -> Timeline:
        ev = attempt.events
        writes = [ev[f"ckpt-{n}-complete"] - ev[f"ckpt-{n}"] for n in range(save_steps, max_steps + 1, save_steps)
                  if f"ckpt-{n}-complete" in ev and f"ckpt-{n}" in ev]
        total = attempt.wall_s
        last = ev.get(f"ckpt-{max_steps}-complete", total)
        write = max(statistics.median(writes) if writes else 0.05, 0.005)
        return cls(total=total, first_step=ev.get("metrics", total / 2), last_ckpt_complete=last,
                   final=ev.get("final", total), summary=ev.get("summary", total), ckpt_write=write)

    def expected(self, resumed_from: int, max_steps: int, *, scaled: bool = True) -> float:
        """An attempt's expected run time: the baseline's, less the training a resume skips, times the median of
        the last 5 `ratios` (how much faster or slower than the baseline runs are now)."""
        train = max(self.last_ckpt_complete - self.first_step, 0.0)
        scale = statistics.median(self.ratios[-5:]) if scaled else 1.0
        return (self.total - train * resumed_from / max_steps) * scale

    def observe(self, attempt: Attempt, max_steps: int) -> None:
        if not attempt.killed and attempt.rc == 0 and attempt.resumed_from < max_steps:
            self.ratios.append(round(attempt.wall_s / self.expected(attempt.resumed_from, max_steps, scaled=False), 3))


def plan_kill(rng: random.Random, timeline: Timeline, run_dir: Path, max_steps: int, save_steps: int,
              targeted: float, force: str | None = None) -> Plan:
    done = last_complete_step(run_dir)
    if force == "step" and done < max_steps:  # mid-training, however fast or slow the machine is now
        step_s = (timeline.last_ckpt_complete - timeline.first_step) / max(max_steps - 1, 1)
        return Plan("step", rng.uniform(0, step_s))
    kind = force or ("targeted" if rng.random() < targeted else "uniform")
    if kind != "uniform" and done < max_steps:  # a finishing attempt has no save left to target
        steps = list(range(save_steps * (done // save_steps + 1), max_steps + 1, save_steps))
        if kind == "final" or (kind == "targeted" and (rng.random() < 0.5 or not steps)):
            return Plan("final", rng.uniform(0, max(timeline.final - timeline.last_ckpt_complete, 0.005)))
        if steps:
            return Plan("ckpt", rng.uniform(0, timeline.ckpt_write), rng.choice(steps))
    return Plan("uniform", rng.uniform(0, timeline.expected(done, max_steps)))


@dataclass
class Trial:
    index: int
    run_dir: str
    attempts: list[Attempt] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def kills(self) -> list[Attempt]:
        return [a for a in self.attempts if a.killed]


def run_trial(index: int, cmd_for, work: Path, rng: random.Random, timeline: Timeline, args, max_steps: int,
              save_steps: int) -> Trial:
    trial_dir = work / f"trial{index}"
    run_dir = trial_dir / "run"
    trial_dir.mkdir(parents=True)
    trial = Trial(index, str(run_dir))
    cmd = cmd_for(run_dir)
    start = time.time()
    for n in range(args.kills + 1):
        kill = n < args.kills and (n == 0 or rng.random() < args.repeat_prob)
        force = ("step" if n == 0 else "final") if args.quick else None
        plan = plan_kill(rng, timeline, run_dir, max_steps, save_steps, args.targeted, force) if kill else Plan()
        attempt = run_attempt(cmd, run_dir, trial_dir / f"attempt{n}.log", plan, max_steps,
                              timeout=3 * timeline.total + 180, cwd=args.source)
        trial.attempts.append(attempt)
        timeline.observe(attempt, max_steps)
        print(f"  trial {index} attempt {n}: {plan.describe():<42} -> "
              + (f"killed at {attempt.kill_at_s:.2f}s ({attempt.phase})" if attempt.killed else
                 f"exit {attempt.rc} after {attempt.wall_s:.1f}s") + f", resumed from step {attempt.resumed_from}",
              flush=True)
        if attempt.hung:
            trial.failures.append(f"attempt {n} still running after {attempt.kill_at_s:.0f}s: killed")
        if attempt.strays:
            trial.failures.append(f"attempt {n} left processes: {attempt.strays}")
        if not attempt.killed or attempt.hung or attempt.strays:
            break
    last = trial.attempts[-1]
    if not (last.hung or last.strays):
        trial.failures += check_run(run_dir, max_steps, last.rc, Path(last.log))
    trial.wall_s = round(time.time() - start, 1)
    return trial


def run_config(name: str, overrides: list[str], args, work: Path, rng: random.Random) -> dict:
    max_steps, save_steps = (4, 2) if args.quick else (args.max_steps, args.save_steps)

    def cmd_for(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "rlt.train", *overrides, f"output_dir={run_dir}", f"max_steps={max_steps}",
                f"save_steps={save_steps}", "report_to=[none]", *args.override]

    start = time.time()
    (work / "baseline").mkdir(parents=True)
    base_dir = work / "baseline" / "run"
    print(f"\n### {name}: baseline (uninterrupted) run, {' '.join(cmd_for(base_dir)[3:])}", flush=True)
    base = run_attempt(cmd_for(base_dir), base_dir, work / "baseline" / "attempt0.log", Plan(), max_steps,
                       timeout=1800, poll=0.002, cwd=args.source)
    base_failures = base.strays + check_run(base_dir, max_steps, base.rc, Path(base.log))
    result = {"overrides": overrides, "max_steps": max_steps, "save_steps": save_steps, "baseline": asdict(base),
              "baseline_failures": base_failures, "trials": []}
    if base_failures:
        print(f"  baseline FAILED: {base_failures}", flush=True)
        result["wall_s"] = round(time.time() - start, 1)
        return result
    timeline = Timeline.of(base, max_steps, save_steps)
    print(f"  baseline: {timeline.total:.1f}s, first step logged at {timeline.first_step:.1f}s, last checkpoint "
          f"complete at {timeline.last_ckpt_complete:.1f}s, final/ in place "
          f"{(timeline.final - timeline.last_ckpt_complete) * 1000:.0f}ms later, a checkpoint write "
          f"~{timeline.ckpt_write * 1000:.0f}ms", flush=True)
    if not args.keep:
        shutil.rmtree(work / "baseline", ignore_errors=True)
    trials = []
    while True:
        if args.trials is not None and len(trials) >= args.trials:
            break
        if args.trials is None and (sum(len(t.kills) for t in trials) >= args.min_kills or len(trials) >= 40):
            break
        trial = run_trial(len(trials), cmd_for, work, rng, timeline, args, max_steps, save_steps)
        trials.append(trial)
        verdict = "survived" if not trial.failures else "FAILED: " + "; ".join(trial.failures)
        print(f"  trial {trial.index}: {len(trial.kills)} kill(s), {trial.wall_s:.0f}s, {verdict}", flush=True)
        if not trial.failures and not args.keep:
            shutil.rmtree(Path(trial.run_dir).parent, ignore_errors=True)
    result["trials"] = [asdict(t) | {"kills": len(t.kills), "survived": not t.failures} for t in trials]
    result["timeline"] = asdict(timeline)  # with the run-time ratios observed
    result["wall_s"] = round(time.time() - start, 1)
    return result


# ---------------------------------------------------------------------------------------------- report


def summarize(name: str, result: dict) -> dict:
    kills = [a for t in result["trials"] for a in t["attempts"] if a["killed"]]
    by_phase = {p: sum(a["phase"] == p for a in kills) for p in PHASES}
    planned = [a for t in result["trials"] for a in t["attempts"] if a["plan"] != "no kill"]
    return {"config": name, "trials": len(result["trials"]), "kills": len(kills),
            "planned_not_fired": len(planned) - len(kills),
            "targeted": sum(a["plan"].startswith("targeted") for a in kills), "by_phase": by_phase,
            "survived": sum(t["survived"] for t in result["trials"]), "wall_s": result["wall_s"],
            "baseline_ok": not result["baseline_failures"]}


def print_table(rows: list[dict], results: dict) -> None:
    head = f"{'config':<10} {'trials':>6} {'kills':>5} {'missed':>6} {'targeted':>8} " + " ".join(
        f"{p:>11}" for p in PHASES)
    head += f" {'survived':>9} {'wall s':>7}"
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        survived = f"{r['survived']}/{r['trials']}" + ("" if r["baseline_ok"] else " (baseline failed)")
        print(f"{r['config']:<10} {r['trials']:>6} {r['kills']:>5} {r['planned_not_fired']:>6} {r['targeted']:>8} "
              + " ".join(f"{r['by_phase'][p]:>11}" for p in PHASES) + f" {survived:>9} {r['wall_s']:>7.0f}")
    failures = [(name, f"baseline: {f}") for name, res in results.items() for f in res["baseline_failures"]]
    failures += [(name, f"trial {t['index']} ({t['run_dir']}): {f}") for name, res in results.items()
                 for t in res["trials"] for f in t["failures"]]
    print("\nfailures: " + ("none" if not failures else ""))
    for name, f in failures:
        print(f"  {name}: {f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--trials", type=int, default=None, help="trials per config (default: until --min-kills kills)")
    p.add_argument("--min-kills", type=int, default=16, help="without --trials: run trials until this many kills")
    p.add_argument("--kills", type=int, default=3, help="at most this many kills per trial")
    p.add_argument("--repeat-prob", type=float, default=0.6, help="probability of killing a re-run again")
    p.add_argument("--targeted", type=float, default=0.35,
                   help="probability that a kill targets a checkpoint write or the final save (else uniform)")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--work-dir", default=None, help="run dirs and logs go here (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep every run dir (failed trials' are always kept)")
    p.add_argument("--live", action="store_true",
                   help="run the working tree's rlt (default: a copy of rlt/ and cfgs/ taken at the start, so that "
                        "edits made during the run do not break trials)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: max_steps=4, save_steps=2, 1 trial per config, 2 kills (within a step after "
                        "the first, then in the final save)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.kills, args.repeat_prob = 1, 2, 1.0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")

    import importlib.util

    no_vllm = importlib.util.find_spec("vllm") is None
    skipped = {n: "vllm is not installed" for n in names if n in NEEDS_VLLM and no_vllm}
    info = machine_info()
    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        p.error(f"--work-dir {args.work_dir} is not empty")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rlt-faults-")).resolve()
    args.source = REPO if args.live else snapshot_source(work / "src")
    print(machine_line(info))
    print(f"fault injection: configs {names}, work dir {work}, seed {args.seed}, code from {args.source}"
          + "".join(f"\n  {n} skipped: {why}" for n, why in skipped.items()), flush=True)
    start = time.time()
    results = {}
    for i, name in enumerate(n for n in names if n not in skipped):
        rng = random.Random(args.seed * 1000 + i)
        results[name] = run_config(name, CONFIGS[name], args, work / name, rng)
    rows = [summarize(name, r) for name, r in results.items()]
    print(f"\nfault injection: SIGKILL of the whole process group, re-run the same command; {time.time() - start:.0f}s"
          f" wall; phase = where each kill landed (bench/faults.py docstring)")
    print_table(rows, results)
    failed = any(r["survived"] < r["trials"] or not r["baseline_ok"] for r in rows)
    if not failed and not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "skipped": skipped, "summary": rows,
                               "wall_s": round(time.time() - start, 1), "configs": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
