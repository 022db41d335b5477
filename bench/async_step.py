"""Asynchronous generation vs synchronous server mode: step time, and whether learning suffers.

    python bench/async_step.py                       # step time, GRPO and RLT, 2 pairs of runs each
    python bench/async_step.py --learning            # + bench/learning.py's task trained both ways (~20 min)
    python bench/async_step.py --quick               # smoke test: one pair of 4-step GRPO runs

Every run is `./launch_multi.sh 1 1 RUN_CFG ... --cpu`: one vLLM-CPU server process and one training process, each
pinned to its own cores when there are enough (on a 2-core machine: one each). Runs alternate synchronous /
asynchronous (`async_generation=true`, `max_staleness=1`), so that a change of machine load hits both.

1. Step time: `--steps` steps of each `--run-cfgs` config at its `GEOMETRY` (tiny_grpo: generation and training take
   about the same time in the synchronous step); the steady state is the median `timing/step_s` after the first
   `--warmup` steps, with its split: the trainer's time in generation (async: waiting for a round read ahead, plus
   copying the weights), in rewards, and in training. Printed: the async / sync ratio of each pair and their median
   (target ≤ 0.65).
2. `--learning`: bench/learning.py's task (SFT warm-up, then GRPO with its settings through the server, the same
   steps and seed both ways), held-out greedy accuracy of each (target: async within 3 points of sync).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import OFFLINE_ENV, REPO, machine_info, machine_line, spread, write_json

SPLIT = (("gen", "timing/generation_s"), ("reward", "timing/reward_s"), ("train", "timing/train_s"))
# Each config's geometry for the step time: tiny_grpo with 64-token completions, where the synchronous step splits
# into about equal generation and training (0.31 s / 0.30 s measured); teacher_rlt_tiny as it is (training and the
# teacher reward take about twice the generation time: the ratio is bounded by that)
GEOMETRY = {"tiny_grpo": ["max_completion_length=64"], "teacher_rlt_tiny": []}


def launch(run_cfg: str, out: Path, overrides: list[str], *, asynchronous: bool, timeout: float = 3600) -> dict:
    """One `launch_multi.sh 1 1` run into `out` (fresh); its wall seconds and metrics records."""
    shutil.rmtree(out, ignore_errors=True)
    logs = out.with_name(out.name + "_logs")
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [str(REPO / "launch_multi.sh"), "1", "1", run_cfg, *overrides, f"output_dir={out}", "report_to=[none]",
           "plots=false", f"async_generation={'true' if asynchronous else 'false'}", "--cpu", "--log-dir", str(logs)]
    env = {**OFFLINE_ENV, **os.environ, "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_seconds": wall, "records": [m for m in records if "timing/step_s" in m]}


def steady(run: dict, warmup: int) -> dict:
    """Median step time and split over the steps after `warmup`, and the async metrics where logged."""
    rows = [m for m in run["records"] if m["step"] > warmup] or run["records"]
    out = {"step_s": statistics.median(m["timing/step_s"] for m in rows), "steps": len(rows)}
    for label, key in SPLIT:
        if all(key in m for m in rows):
            out[label] = statistics.median(m[key] for m in rows)
    for key in ("async/staleness", "async/wait_seconds", "sampling/importance_sampling_ratio/min",
                "sampling/importance_sampling_ratio/max"):
        values = [m[key] for m in rows if key in m]
        if values:
            out[key] = [min(values), max(values)] if "ratio" in key or "staleness" in key else statistics.median(
                values)
    return out


def step_times(args, work: Path) -> dict:
    results = {}
    for run_cfg in args.run_cfgs:
        overrides = [f"max_steps={args.steps}", f"save_steps={args.steps}", "logging_steps=1",
                     *GEOMETRY.get(run_cfg, []), *args.overrides]
        pairs = []
        for i in range(args.pairs):
            pair = {}
            for mode in ("sync", "async"):
                run = launch(run_cfg, work / f"{run_cfg}_{mode}_{i}", overrides, asynchronous=mode == "async")
                pair[mode] = steady(run, args.warmup) | {"wall_seconds": run["wall_seconds"]}
                print(f"{run_cfg} pair {i + 1} {mode:<5}: {pair[mode]['step_s']:.3f} s/step "
                      f"({', '.join(f'{k} {pair[mode][k]:.3f}' for k, _ in SPLIT if k in pair[mode])})", flush=True)
            pair["ratio"] = pair["async"]["step_s"] / pair["sync"]["step_s"]
            pairs.append(pair)
        results[run_cfg] = {"overrides": overrides, "pairs": pairs,
                            "ratio_median": statistics.median(p["ratio"] for p in pairs)}
    return results


def learning(args, work: Path) -> dict:
    """bench/learning.py's warm-up, then its GRPO phase through the server, synchronous and asynchronous."""
    from bench import learning as task
    from rlt.compose import compose_raw
    from rlt.config import validate
    from rlt.train import run_training

    sft_dir = work / "learning_sft"
    sft_over = ["run_cfg=tiny_sft_reasoning", *task.SFT_OVERRIDES, *task.TASK_OVERRIDES, f"max_steps={args.sft_steps}",
                "report_to=[none]", "eval_steps=null", "eval_accuracy_samples=0", "resume=false",
                f"save_steps={args.sft_steps}", f"output_dir={sft_dir}", "plots=false"]
    if args.reuse_sft and (sft_dir / "final").is_dir():
        print(f"reusing the warm-up in {sft_dir}", flush=True)
    else:
        shutil.rmtree(sft_dir, ignore_errors=True)
        run_training(compose_raw(sft_over))
    sft_run = validate(compose_raw(sft_over))
    problems = task.held_out_problems(sft_run, args.eval_n)
    grpo_over = [*[o for o in task.GRPO_OVERRIDES if not o.startswith("generation_backend=")], *task.TASK_OVERRIDES,
                 f"model_name_or_path={sft_dir / 'final'}", "save_steps=100000", "logging_steps=10",
                 *([f"max_steps={args.learning_steps}"] if args.learning_steps else []), *args.grpo]
    out: dict = {"grpo_overrides": grpo_over, "before": task.accuracy(str(sft_dir / "final"), problems, 64),
                 "seeds": {}}
    print(f"held-out accuracy after the warm-up: {out['before']['accuracy']:.1%}", flush=True)
    for seed in args.learning_seeds:
        runs = out["seeds"][seed] = {}
        for mode in ("sync", "async"):
            run_dir = work / f"learning_{mode}_seed{seed}"
            run = launch("tiny_grpo", run_dir, [*grpo_over, f"seed={seed}"], asynchronous=mode == "async")
            acc = task.accuracy(str(run_dir / "final"), problems, 64)
            rewards = [m["reward"] for m in run["records"] if "reward" in m]
            runs[mode] = {"wall_seconds": run["wall_seconds"], "accuracy": acc["accuracy"], "n": acc["n"],
                          "step_s": statistics.median(m["timing/step_s"] for m in run["records"]),
                          "reward_last_30": statistics.mean(rewards[-3:]) if rewards else float("nan")}
            print(f"seed {seed} GRPO {mode:<5}: accuracy {acc['accuracy']:.1%}, training reward "
                  f"{runs[mode]['reward_last_30']:.3f} (last 3 records), {run['wall_seconds']:.0f} s", flush=True)
        runs["async_minus_sync_points"] = 100 * (runs["async"]["accuracy"] - runs["sync"]["accuracy"])
    for mode in ("sync", "async"):
        out[mode] = {"accuracy": statistics.mean(r[mode]["accuracy"] for r in out["seeds"].values()),
                     "wall_seconds": statistics.mean(r[mode]["wall_seconds"] for r in out["seeds"].values()),
                     "n": len(problems)}
    out["async_minus_sync_points"] = 100 * (out["async"]["accuracy"] - out["sync"]["accuracy"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-cfgs", type=lambda s: s.split(","), default=["tiny_grpo", "teacher_rlt_tiny"])
    p.add_argument("--steps", type=int, default=14, help="steps of each timing run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady state")
    p.add_argument("--pairs", type=int, default=2, help="sync/async pairs of runs per config")
    p.add_argument("--learning", action="store_true", help="also train bench/learning.py's task both ways")
    p.add_argument("--learning-only", action="store_true", help="only the learning comparison")
    p.add_argument("--learning-steps", type=int, default=0, help="GRPO steps (0: bench/learning.py's)")
    p.add_argument("--learning-seeds", type=int, nargs="+", default=[42, 1, 2],
                   help="run seeds: a sync and an async GRPO run each (the accuracies are averaged)")
    p.add_argument("--grpo", nargs="*", default=[], help="extra Hydra overrides of the learning runs' GRPO, e.g. "
                   "learning_rate=1e-4")
    p.add_argument("--sft-steps", type=int, default=180)
    p.add_argument("--reuse-sft", action="store_true", help="reuse a warm-up left in --work")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--work", default=str(REPO / "results" / "bench_async"), help="run dirs go here")
    p.add_argument("--quick", action="store_true", help="smoke test: one pair of 4-step GRPO runs")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the timing runs")
    args = p.parse_args(argv)
    if args.quick:
        args.run_cfgs, args.steps, args.warmup, args.pairs = ["tiny_grpo"], 4, 1, 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    results: dict = {"machine": info}
    print(machine_line(info), flush=True)
    if not args.learning_only:
        results["step_time"] = step_times(args, work)
    if args.learning or args.learning_only:
        results["learning"] = learning(args, work)
    info["load_avg_end"] = list(os.getloadavg())

    print("\nasync_generation=true vs synchronous server mode, launch_multi.sh 1 1 --cpu (one server, one trainer)")
    for run_cfg, r in results.get("step_time", {}).items():
        print(f"\n{run_cfg}: {args.steps} steps, steady state after step {args.warmup}, s/step")
        print(f"{'pair':<6} {'sync':>7} {'(gen/reward/train)':>20} {'async':>7} {'(gen/reward/train)':>20} "
              f"{'async/sync':>10} {'stale':>6}")
        for i, pair in enumerate(r["pairs"]):
            parts = {m: "/".join(f"{pair[m].get(k, float('nan')):.2f}" for k, _ in SPLIT) for m in ("sync", "async")}
            stale = pair["async"].get("async/staleness", [float("nan")] * 2)
            print(f"{i + 1:<6} {pair['sync']['step_s']:>7.3f} {parts['sync']:>20} {pair['async']['step_s']:>7.3f} "
                  f"{parts['async']:>20} {pair['ratio']:>9.2f}x {stale[1]:>6.0f}")
        print(f"async/sync: {spread([p['ratio'] for p in r['pairs']], '.2f')} (median [min, max]; target <= 0.65)")
    if "learning" in results:
        lr = results["learning"]
        print(f"\nlearning (bench/learning.py's task, {lr['sync']['n']} held-out, warm-up "
              f"{lr['before']['accuracy']:.1%})")
        for seed, r in lr["seeds"].items():
            print(f"seed {seed}: sync {r['sync']['accuracy']:.1%}, async {r['async']['accuracy']:.1%} "
                  f"({r['async_minus_sync_points']:+.1f} points); GRPO wall {r['sync']['wall_seconds']:.0f} s vs "
                  f"{r['async']['wall_seconds']:.0f} s")
        print(f"mean over {len(lr['seeds'])} seed(s): sync {lr['sync']['accuracy']:.1%}, async "
              f"{lr['async']['accuracy']:.1%} ({lr['async_minus_sync_points']:+.1f} points; target within 3)")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
