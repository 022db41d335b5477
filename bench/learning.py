"""Does GRPO teach the tiny model arithmetic? SFT warm-up -> greedy accuracy -> GRPO -> greedy accuracy, on a CPU.

    python bench/learning.py --threads 1      # the measured pipeline (docs/benchmarks.md)
    python bench/learning.py --quick          # smoke test: a few SFT and GRPO steps, 20 eval problems
    python bench/learning.py --grpo learning_rate=3e-4 temperature=0.7 --sft-steps 300   # explore

Phases, each timed (wall seconds and this process's CPU seconds):

1. SFT warm-up: `run_cfg=tiny_sft_reasoning` (synthetic arithmetic in the <reasoning>/<answer> format) with
   `SFT_OVERRIDES`, `TASK_OVERRIDES`, `--sft-steps` steps and the `--sft` overrides: short on purpose, so the model
   knows the format but is still often wrong, leaving room for GRPO.
2. Accuracy before: greedy decoding (`rlt.evaluate.gsm8k_accuracy`, correct = the training reward gives credit) on
   the first `--eval-n` held-out problems of the data's `test` split (never trained on), same prompt format.
3. GRPO: `run_cfg=tiny_grpo` (`--grpo-run-cfg`) + `GRPO_OVERRIDES` + `TASK_OVERRIDES` (below) from the warm-up's
   `final/`, GSM8K rewards, and the `--grpo` overrides.
4. Accuracy after: as in 2, on the same problems, on GRPO's `final/`.

Every phase goes through `rlt.train.run_training` with a composed Hydra config (what `python -m rlt.train ...`
runs); run dirs go under `--out` (default results/bench_learning; the pipeline starts fresh there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, machine_info, use_offline_env, write_json

use_offline_env()

DEFAULT_GRPO_RUN_CFG = "tiny_grpo"
# The measured setting (docs/benchmarks.md §3). The task: sums of two numbers 1..9 in word and plain problems
# (`synthetic.ops=+`, `max_operand=9`), the same for warm-up, GRPO and evaluation. A SHORT warm-up at a constant
# learning rate leaves the model knowing the format and sampling the right sum often, but not greedily (pass@8 well
# above greedy accuracy): the regime in which GRPO's group-relative advantage has something to sharpen.
TASK_OVERRIDES = ["synthetic.ops=+", "synthetic.max_operand=9"]
SFT_STEPS = 180
SFT_OVERRIDES = ["lr_scheduler_type=constant", "warmup_ratio=0"]
GRPO_OVERRIDES = ["learning_rate=2e-4", "beta=0", "max_steps=150", "train_batch_size=64",
                  "per_device_train_batch_size=32", "num_generations=8", "max_completion_length=64", "temperature=1.0",
                  "generation_backend=hf"]


class Phase:
    """Times a block: wall seconds and this process's CPU seconds (user + sys, all threads)."""

    def __init__(self, name: str, phases: dict):
        self.name, self.phases = name, phases

    def __enter__(self):
        print(f"\n### {self.name} ...", flush=True)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.phases[self.name] = {"wall_seconds": time.perf_counter() - self.wall,
                                  "cpu_seconds": time.process_time() - self.cpu, "load_avg": os.getloadavg()[0]}
        return False


def held_out_problems(run, n: int) -> list[dict]:
    """The first `n` problems of the eval split of the run's data, in the run's prompt format."""
    from rlt.data.loading import prepare_gsm8k_eval

    problems = prepare_gsm8k_eval(dataset_id_or_path=run.dataset_id_or_path, dataset_subset=run.dataset_subset,
                                  split=run.eval_split or "test", data_columns=run.data_columns,
                                  system_prompt=run.system_prompt, synthetic=run.synthetic, seed=run.seed)
    return problems[:n]


def accuracy(model_dir: str, problems: list[dict], max_new_tokens: int) -> dict:
    from rlt.evaluate import gsm8k_accuracy
    from rlt.models import load_eval_model

    model, tokenizer = load_eval_model(model_dir, torch_dtype="float32")
    result = gsm8k_accuracy(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=50)
    strict = sum(p["correct"] and "<answer>" in p["completion"] for p in result["predictions"])
    return {"accuracy": result["accuracy"], "n": result["n"], "strict_accuracy": strict / max(result["n"], 1),
            "examples": [{k: p[k] for k in ("completion", "predicted", "answer", "correct")}
                         for p in result["predictions"][:3]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="SFT warm-up steps")
    p.add_argument("--sft", nargs="*", default=[], help="extra Hydra overrides of the SFT warm-up")
    p.add_argument("--grpo-run-cfg", default=DEFAULT_GRPO_RUN_CFG)
    p.add_argument("--grpo", nargs="*", default=[],
                   help=f"extra Hydra overrides of the GRPO phase, after {GRPO_OVERRIDES}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems for the accuracy")
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "results" / "bench_learning"), help="run dirs go here")
    p.add_argument("--skip-sft", default=None, help="reuse this warm-up final/ dir instead of running SFT")
    p.add_argument("--quick", action="store_true", help="smoke test: 10 SFT steps, 2 GRPO steps, 20 problems")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    import torch

    from rlt.compose import compose, compose_raw
    from rlt.config import validate
    from rlt.train import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    out = Path(args.out)
    sft_steps = args.sft_steps
    sft_over = ["run_cfg=tiny_sft_reasoning", *SFT_OVERRIDES, *TASK_OVERRIDES, f"max_steps={sft_steps}",
                "report_to=[none]", "eval_steps=null", "eval_accuracy_samples=0", "resume=false",
                f"save_steps={max(sft_steps, 1)}"]
    grpo_over = [f"run_cfg={args.grpo_run_cfg}",
                 *(GRPO_OVERRIDES if args.grpo_run_cfg == DEFAULT_GRPO_RUN_CFG else []),
                 *TASK_OVERRIDES, "report_to=[none]", "resume=false", "save_steps=100000"]
    if args.quick:
        sft_steps = 10
        sft_over += ["max_steps=10", "save_steps=10"]
        grpo_over += ["max_steps=2", "train_batch_size=16", "per_device_train_batch_size=16",
                      "max_completion_length=32"]
        args.eval_n = 20
    sft_over += args.sft
    grpo_over += args.grpo
    phases: dict = {}
    results: dict = {"machine": info, "sft_overrides": sft_over, "grpo_overrides": grpo_over, "phases": phases}

    if args.skip_sft:
        sft_final = str(Path(args.skip_sft).resolve())
        sft_run = compose(overrides=sft_over)
    else:
        shutil.rmtree(out / "sft", ignore_errors=True)
        sft_cfg = compose_raw([*sft_over, f"output_dir={out / 'sft'}"])
        sft_run = validate(sft_cfg)
        with Phase("sft", phases):
            run_training(sft_cfg)
        sft_final = str(out / "sft" / "final")
    problems = held_out_problems(sft_run, args.eval_n)
    with Phase("eval_before", phases):
        results["before"] = accuracy(sft_final, problems, args.eval_max_new_tokens)
    print(f"accuracy before GRPO: {results['before']['accuracy']:.1%}", flush=True)

    shutil.rmtree(out / "grpo", ignore_errors=True)
    grpo_cfg = compose_raw([*grpo_over, f"model_name_or_path={sft_final}", f"output_dir={out / 'grpo'}"])
    grpo_run = validate(grpo_cfg)
    assert held_out_problems(grpo_run, args.eval_n) == problems, "GRPO data differs from the warm-up's"
    with Phase("grpo", phases):
        summary = run_training(grpo_cfg)
    results["grpo_summary"] = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    with Phase("eval_after", phases):
        results["after"] = accuracy(str(out / "grpo" / "final"), problems, args.eval_max_new_tokens)
    info["load_avg_end"] = list(os.getloadavg())

    before, after = results["before"]["accuracy"], results["after"]["accuracy"]
    results["gain_points"] = 100 * (after - before)
    print()
    print(f"GRPO learning benchmark: {grpo_run.model_name_or_path} warm-up ({sft_steps} SFT steps) -> "
          f"{grpo_run.max_steps} GRPO steps ({args.grpo_run_cfg}, backend {grpo_run.generation_backend}); "
          f"{info['cpus']} CPUs, load avg {info['load_avg_start'][0]:.2f} at start, {info['load_avg_end'][0]:.2f} "
          f"at end")
    print(f"{'phase':<12} {'wall s':>8} {'CPU s':>8}  result")
    print("-" * 60)
    notes = {"sft": f"{sft_steps} steps", "eval_before": f"accuracy {before:.1%} on {len(problems)} held-out",
             "grpo": f"{grpo_run.max_steps} steps, reward {summary.get('reward_first', float('nan')):.3f} -> "
                     f"{summary.get('reward_last', float('nan')):.3f}",
             "eval_after": f"accuracy {after:.1%} on {len(problems)} held-out"}
    for name, ph in phases.items():
        print(f"{name:<12} {ph['wall_seconds']:>8.1f} {ph['cpu_seconds']:>8.1f}  {notes.get(name, '')}")
    print(f"\naccuracy: {before:.1%} -> {after:.1%} ({results['gain_points']:+.1f} points; target +15 within 600 s "
          f"of GRPO)")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
