"""Seconds per optimizer step: the RLT recipe vs plain GRPO at the same geometry, in one process.

    python bench/rlt_step.py [--quick] [--models tiny,smollm2] [--steps N] [--repeats R] [--json PATH]

Cases per model, each a full `rlt.train.run_training(compose_raw([...]))` in a temp output dir (`report_to=[none]`, no
checkpoints, no final save), interleaved over the repeats (ABAB..., the order flipped every repeat):

* ``rlt``: ``run_cfg=teacher_rlt_tiny`` (or ``teacher_rlt_smollm2``) as is: the teacher reward (`TeacherKLReward`,
  student = the reference model) scores every completion with one student and one teacher forward per micro-batch.
* ``grpo``: the same run file, prompts, model, geometry (train_batch_size, per-device batch, num_generations,
  max_completion_length, beta, temperature, seed) and recipe, with the reward replaced by a trivial one
  (`rlt.rewards.gsm8k.format_reward`, a regex): only the reward differs.

One untimed 2-step run of the ``rlt`` case comes first (one-time process costs); step 1 of every run is skipped; a
step's time is the wall time between consecutive ``on_step_end`` callbacks. Its split comes from TRL's own profiling
contexts (recorded in-process; TRL only sends them to wandb / mlflow / trackio): ``generate``
(``transformers.generate``), ``reward`` (``_calculate_rewards``), ``prep other`` (the rest of ``_prepare_inputs``: the
reference model's log-probs, advantages, padding), ``loss fwd`` (``compute_loss``), ``backward``
(``Accelerator.backward``, timed here) and ``other`` (optimizer step, logging, data loading); ``cpu s`` is this
process's CPU time per step (user + sys). Printed: medians per case, the RLT / GRPO ratio (wall, CPU, and per repeat),
mean completion length. Results: docs/benchmarks.md (section 4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import machine_info, machine_line, use_offline_env, write_json

use_offline_env()

RUN_FILES = {"tiny": "teacher_rlt_tiny", "smollm2": "teacher_rlt_smollm2"}
TRIVIAL_REWARD = "reward_funcs=[{_target_: rlt.rewards.gsm8k.format_reward}]"
PHASES = ("generate", "reward", "prep other", "loss fwd", "backward", "other")


class StepRecorder:
    """Collects, per optimizer step, the wall time and the TRL profiling blocks that ended in it (in-process)."""

    def __init__(self):
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.blocks: list[dict[str, float]] = [defaultdict(float)]
        self.lengths: list[float] = []

    def block(self, name: str, seconds: float) -> None:
        self.blocks[-1][name] += seconds

    def step_end(self) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.blocks.append(defaultdict(float))

    def steps(self) -> list[dict[str, float]]:
        """Steps 2.. as {"step_s", phase: seconds}."""
        out = []
        for k in range(1, len(self.step_ends)):
            b = self.blocks[k]
            gen = sum(v for n, v in b.items() if n.endswith("generate") or n.endswith("generate_batch"))
            reward = sum(v for n, v in b.items() if n.endswith("_calculate_rewards"))
            prep = sum(v for n, v in b.items() if n.endswith("_prepare_inputs"))
            loss = sum(v for n, v in b.items() if n.endswith("compute_loss"))
            step = self.step_ends[k] - self.step_ends[k - 1]
            row = {"step_s": step, "cpu_s": self.step_cpu[k] - self.step_cpu[k - 1], "generate": gen, "reward": reward,
                   "prep other": max(prep - gen - reward, 0.0), "loss fwd": loss, "backward": b["backward"]}
            row["other"] = step - sum(row[p] for p in PHASES[:-1])
            out.append(row)
        return out


_ACTIVE: list[StepRecorder] = []


def _install_hooks() -> None:
    """Route TRL's profiling blocks, Accelerator.backward and step ends to the active recorder (once)."""
    import accelerate
    from transformers import TrainerCallback
    from trl.extras import profiling

    import rlt.recipes.common as common

    if getattr(_install_hooks, "done", False):
        return
    original_log = profiling.ProfilingContext._log_metrics

    def log_metrics(self, duration):
        if _ACTIVE:
            _ACTIVE[-1].block(self.name, duration)
        return original_log(self, duration)

    original_backward = accelerate.Accelerator.backward

    def backward(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original_backward(self, *args, **kwargs)
        finally:
            if _ACTIVE:
                _ACTIVE[-1].block("backward", time.perf_counter() - t)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _ACTIVE:
                _ACTIVE[-1].step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if _ACTIVE and logs and "completions/mean_length" in logs:
                _ACTIVE[-1].lengths.append(logs["completions/mean_length"])

    original_callbacks = common.callbacks_for

    def callbacks_for(run, out):
        return [*original_callbacks(run, out), StepEnd()]

    profiling.ProfilingContext._log_metrics = log_metrics
    accelerate.Accelerator.backward = backward
    common.callbacks_for = callbacks_for
    _install_hooks.done = True


def run_case(run_file: str, trivial: bool, steps: int, extra: list[str]) -> StepRecorder:
    from rlt.compose import compose_raw
    from rlt.train import run_training

    _install_hooks()
    rec = StepRecorder()
    with tempfile.TemporaryDirectory(prefix="rlt-bench-step-") as tmp:
        overrides = [f"run_cfg={run_file}", f"output_dir={tmp}", "report_to=[none]", f"max_steps={steps}",
                     "save_steps=100000", "save_final_model=false", "logging_steps=1", *extra]
        if trivial:
            overrides.append(TRIVIAL_REWARD)
        _ACTIVE.append(rec)
        try:
            run_training(compose_raw(overrides))
        finally:
            _ACTIVE.pop()
    return rec


def bench_model(name: str, *, steps: int, repeats: int, extra: list[str]) -> dict:
    run_file = RUN_FILES[name]
    cases = {"rlt": False, "grpo": True}
    per_case: dict[str, list[dict]] = {c: [] for c in cases}
    runs: list[dict] = []
    lengths: dict[str, list[float]] = {c: [] for c in cases}
    print(f"\n== {run_file}: {steps} steps per run (step 1 skipped), {repeats} run(s) per case", flush=True)
    # The first run in a process pays one-time costs (lazy imports, the first vLLM engine, allocator growth): up to
    # 1.7x slower steps for SmolLM2 with vllm_colocate. An untimed 2-step run takes them before the timed ones.
    t = time.perf_counter()
    run_case(run_file, False, 2, extra)
    print(f"   warm-up run (untimed): {time.perf_counter() - t:.1f}s", flush=True)
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(cases)[::-1]
        for case in order:
            t = time.perf_counter()
            rec = run_case(run_file, cases[case], steps, extra)
            per_case[case] += rec.steps()
            runs.append({"repeat": r, "case": case, "step_s": statistics.median(s["step_s"] for s in rec.steps()),
                         "cpu_s": statistics.median(s["cpu_s"] for s in rec.steps())})
            lengths[case] += rec.lengths[1:]
            print(f"   repeat {r + 1} {case:>4}: {time.perf_counter() - t:6.1f}s total, steps 2..: "
                  + " ".join(f"{s['step_s']:.2f}" for s in rec.steps()), flush=True)
    med = {c: {k: statistics.median(s[k] for s in per_case[c]) for k in ("step_s", "cpu_s", *PHASES)} for c in cases}
    ratio = med["rlt"]["step_s"] / med["grpo"]["step_s"]
    cpu_ratio = med["rlt"]["cpu_s"] / med["grpo"]["cpu_s"]
    paired = [a["step_s"] / b["step_s"] for a in runs if a["case"] == "rlt" for b in runs
              if b["case"] == "grpo" and b["repeat"] == a["repeat"]]
    print(f"{'case':>5} {'s/step':>7} {'cpu s':>7} " + " ".join(f"{p:>10}" for p in PHASES) + f" {'len':>5}")
    for c in cases:
        print(f"{c:>5} {med[c]['step_s']:7.2f} {med[c]['cpu_s']:7.2f} "
              + " ".join(f"{med[c][p]:10.2f}" for p in PHASES)
              + f" {statistics.mean(lengths[c]) if lengths[c] else float('nan'):5.1f}")
    print(f"RLT / GRPO = {ratio:.2f} wall, {cpu_ratio:.2f} cpu, per repeat {[round(x, 2) for x in paired]} (target "
          f"<= 1.3); reward share of the RLT step: {med['rlt']['reward'] / med['rlt']['step_s']:.0%}", flush=True)
    return {"run_file": run_file, "steps_per_run": steps, "repeats": repeats, "overrides": extra,
            "median": med, "ratio_rlt_over_grpo": ratio, "cpu_ratio_rlt_over_grpo": cpu_ratio,
            "ratio_per_repeat": paired, "runs": runs, "steps": per_case,
            "mean_completion_length": {c: statistics.mean(v) if v else None for c, v in lengths.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models",
                    help="comma-separated subset of: " + ",".join(RUN_FILES) + " (default all; quick tiny)")
    ap.add_argument("--quick", action="store_true", help="tiny only unless --models, 3 steps, 1 run per case")
    ap.add_argument("--steps", type=int, help="optimizer steps per run, the first skipped (default 6, quick 3)")
    ap.add_argument("--repeats", type=int, help="runs per case, interleaved (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. max_completion_length=32)")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info))
    models = args.models or ("tiny" if args.quick else ",".join(RUN_FILES))
    results = []
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        if name not in RUN_FILES:
            ap.error(f"unknown model {name!r}; choose from {list(RUN_FILES)}")
        results.append(bench_model(name, steps=args.steps or (3 if args.quick else 6),
                                   repeats=args.repeats or (1 if args.quick else 2), extra=list(args.overrides)))
    info["load_avg_end"] = list(os.getloadavg())
    if args.json:
        write_json(args.json, {"machine": info, "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
