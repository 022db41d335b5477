"""Does RLT help a student? The same student fine-tuned on the explanations of the warm-up teacher and of the RL
teacher, compared on held-out questions, on a CPU.

    python bench/rlt_learning.py --threads 2            # the measured pipeline (docs/benchmarks.md)
    python bench/rlt_learning.py --quick                # smoke test: a few steps of each phase, 16 eval questions
    python bench/rlt_learning.py --rlt-steps 60 --rlt learning_rate=3e-4 --student-seeds 0 1 2   # explore

Phases, each timed (wall seconds and this process's CPU seconds, all threads):

1. warm-up: `run_cfg=teacher_sft_tiny` (the demo's teacher SFT: the tiny model writes the worked answer as the
   explanation of question + solution) on `TASK_OVERRIDES`, `--warmup-steps` steps and the `--warmup` overrides.
   Cached under `--cache-dir`, keyed by its overrides: a rerun with the same settings reuses it (`--no-cache`: not).
2. rlt: `run_cfg=teacher_rlt_tiny` (the demo's RLT run: student = the warm-up teacher, the run's reference model)
   from the warm-up's `final/`, `--rlt-steps` steps, `RLT_OVERRIDES` and the `--rlt` overrides.
3. distill: `rlt.distill.distill` with the RL run's config (same data, format, sampling and reward, so the only
   difference is the teacher's weights): the first `--train-questions` training rows, best of `--num-samples` by
   the teacher reward, once with the warm-up teacher and once with the RL teacher, same sampling seed (a row none
   of whose explanations closed is dropped, as `rlt.distill` does; `--keep-unclosed` keeps it).
4. held-out reward: one explanation per row (`keep_unclosed`) of the first `--reward-n` rows of the test split by
   each teacher, the mean teacher reward and the closed fraction, and a paired bootstrap of the difference.
5. student: `run_cfg=student_sft_tiny` (fresh `rlt:tiny`) + `STUDENT_OVERRIDES` on each distilled set, the same
   `--student-steps` and seed, for every seed of `--student-seeds`; and, for scale, on a third set: the same
   questions with the data's own worked answers as the explanation (`reference`: what the warm-up imitated).
6. eval: greedy decoding of each student on the first `--eval-n` questions of the test split (never distilled),
   prompted as it trained (`rlt.evaluate.choose_prompt` follows the student run: the system turn of its data);
   correct = the number in the student's solution block equals the answer (`solution_accuracy`, the metric
   compared), and also `accuracy` by `rlt.evaluate`'s grading (any credit: the last number of the text counts).
   Per question, correctness is averaged over the seeds; the difference RL - warm-up gets a paired bootstrap over
   questions (95% interval, two-sided p).

Run dirs go under `--out` (default results/bench_rlt_learning; fresh each run except the cached warm-up).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, machine_info, machine_line, use_offline_env, write_json
from bench.learning import Phase

use_offline_env()

# The task: synthetic sums of two numbers 1..9 (word and plain problems), as bench/learning.py: small enough that a
# tiny student learns it from a few hundred distilled rows, so that the quality of the explanations can show.
# 1000 training rows (as the demo's), 300 held-out ones: the generator keeps the two disjoint.
TASK_OVERRIDES = ["synthetic.ops=+", "synthetic.max_operand=9", "synthetic.num_eval=300"]
QUIET = ["report_to=[none]", "resume=false", "save_steps=100000"]
WARMUP_STEPS = 300  # 100 (the demo's) left explanations such as "9 + 6 = 9." for "What is 9 plus 7?"
WARMUP_OVERRIDES = ["eval_steps=null", "eval_on_start=false"]
RLT_STEPS = 40
# 3x the tiny run's 1e-4: in its 10 steps the reward moved by less than its step-to-step noise
RLT_OVERRIDES = ["learning_rate=3e-4"]
STUDENT_STEPS = 300  # 50 (the demo's) left the student repeating the tags, never writing a solution block
STUDENT_SETS = ("warmup", "rl", "reference")  # the reference: the data's own worked answers as explanations
STUDENT_OVERRIDES = ["train_batch_size=16", "per_device_train_batch_size=16", "eval_fraction=0", "eval_steps=null",
                     "eval_on_start=false"]


# ------------------------------------------------------------------------------------------------- pure helpers


def cache_key(overrides: list[str]) -> str:
    """A short stable name for a warm-up's settings: 12 hex digits of the SHA-1 of its overrides, in order.

    cache_key(["a=1", "b=2"]) == cache_key(["a=1", "b=2"]) != cache_key(["b=2", "a=1"])
    """
    return hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:12]


def solution_block(text: str, open_tag: str, close_tag: str) -> str | None:
    """The stripped text of the last complete ``open_tag ... close_tag`` block of `text`, or None.

    solution_block("t<S> 7 </S>", "<S>", "</S>") == "7";  solution_block("t<S> 7", "<S>", "</S>") is None
    """
    start = text.rfind(open_tag)
    if start < 0:
        return None
    body, found, _ = text[start + len(open_tag):].partition(close_tag)
    return body.strip() if found else None


def paired_bootstrap(a: list[float], b: list[float], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean difference ``mean(b) - mean(a)`` of paired per-item values, with a paired bootstrap over the items: the
    2.5/97.5 percentiles (``low``, ``high``) and a two-sided p = 2 x the smaller share of resampled differences on
    either side of 0 (capped at 1).

    Example: a = [0, 0, 1, 0], b = [1, 0, 1, 1] -> diff 0.5; most resamples are > 0, so p is small but, with 4
    items, not tiny. Identical lists give diff 0, low = high = 0 and p = 1.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: need two non-empty lists of the same length, got {len(a)} and {len(b)}")
    d = [y - x for x, y in zip(a, b, strict=True)]
    n = len(d)
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    below = sum(m <= 0 for m in means) / resamples
    above = sum(m >= 0 for m in means) / resamples
    low, high = means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]
    return {"diff": sum(d) / n, "low": low, "high": high, "p": min(1.0, 2 * min(below, above)), "n": n,
            "resamples": resamples}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` items: sqrt(p (1 - p) / n); binomial_se(0.5, 100) == 0.05."""
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def p_text(p: float, resamples: int) -> str:
    """A bootstrap p as text: below its resolution 1/resamples it is a bound. p_text(0.0, 2000) == "p<0.0005"."""
    return f"p<{1 / resamples:.2g}" if p < 1 / resamples else f"p={p:.3f}"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------------ phases


def warm_up(args, overrides: list[str], phases: dict) -> tuple[str, bool]:
    """The warm-up teacher's final/ dir, trained here or found in the cache; and whether it was cached."""
    from rlt.compose import compose_raw
    from rlt.train import run_training

    out = Path(args.cache_dir).resolve() / f"rlt-warmup-{cache_key(overrides)}"
    final = out / "final"
    if not args.no_cache and (final / "config.json").is_file():
        print(f"# warm-up teacher from the cache: {final}", flush=True)
        return str(final), True
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overrides.json").write_text(json.dumps(overrides, indent=1) + "\n")
    with Phase("warmup", phases):
        run_training(compose_raw([*overrides, f"output_dir={out}"]))
    return str(final), False


def reward_curve(run_dir: Path, window: int) -> dict:
    """Mean training reward of the RL run's first and last `window` logged steps (metrics.jsonl)."""
    rewards = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "reward" in record:
            rewards.append(float(record["reward"]))
    window = max(1, min(window, len(rewards) // 2 or 1))
    return {"steps_logged": len(rewards), "window": window, "first": mean(rewards[:window]),
            "last": mean(rewards[-window:])}


def distill_set(teacher: str, run, path: Path, **options) -> tuple[list[dict], dict]:
    from rlt.distill import distill, write_jsonl_atomic

    rows, summary = distill(teacher=teacher, run=run, **options)
    write_jsonl_atomic(path, rows)
    return rows, summary


def reference_set(run, questions: list[str], path: Path) -> dict:
    """A third training set, for scale: the same `questions` with the data's own worked answers as the explanation
    (what the warm-up teacher was trained to write), in the same student chat. Returns its size."""
    from rlt.data.loading import load_raw
    from rlt.data.teacher import get_teacher_format, parse_teacher_row, student_messages
    from rlt.distill import write_jsonl_atomic

    fmt = get_teacher_format(run.teacher_format)
    raw = load_raw(str(run.dataset_id_or_path), synthetic=run.synthetic, seed=run.seed,
                   subset=run.dataset_subset)[run.train_split]
    parsed = (parse_teacher_row(r, run.teacher_data_format, fmt, run.data_columns) for r in raw)
    by_question = {row.question: row for row in parsed if not isinstance(row, str)}
    pad = fmt.delimiters_padding
    rows = [{"question": q, "solution": by_question[q].solution, "reasoning_trace": by_question[q].trace,
             "messages": student_messages(q, pad + by_question[q].trace + pad, by_question[q].solution, fmt)}
            for q in questions]
    write_jsonl_atomic(path, rows)
    return {"rows": len(rows), "kept": len(rows)}


def held_out_rewards(teachers: dict[str, str], run, args, out: Path) -> dict:
    """One explanation per held-out row by each teacher (unclosed ones kept): mean reward, closed share, and the
    paired bootstrap of the difference over the rows both kept."""
    result: dict = {}
    per_row: dict[str, dict[int, float]] = {}
    for name, teacher in teachers.items():
        rows, summary = distill_set(teacher, run, out / f"heldout_{name}.jsonl", split=run.eval_split or "test",
                                    limit=args.reward_n, num_samples=1, keep_unclosed=True, seed=args.seed,
                                    batch_size=args.gen_batch_size)
        per_row[name] = {r["source_index"]: r["teacher_reward"] for r in rows if r["teacher_reward"] is not None}
        result[name] = {"mean_reward": mean(list(per_row[name].values())), "rows": summary["rows"],
                        "closed": sum(r["closed"] for r in rows) / max(summary["rows"], 1)}
    both = sorted(set(per_row["warmup"]) & set(per_row["rl"]))
    result["paired"] = paired_bootstrap([per_row["warmup"][i] for i in both], [per_row["rl"][i] for i in both],
                                        seed=args.seed)
    return result


def train_student(data: Path, out: Path, seed: int, args) -> str:
    from rlt.compose import compose_raw
    from rlt.train import run_training

    shutil.rmtree(out, ignore_errors=True)
    run_training(compose_raw(["run_cfg=student_sft_tiny", *STUDENT_OVERRIDES, *QUIET, f"dataset_id_or_path={data}",
                              f"max_steps={args.student_steps}", f"seed={seed}", *args.student,
                              f"output_dir={out}"]))
    return str(out)


def evaluate_student(run_dir: str, rl_run, args) -> dict:
    """Greedy held-out results of a student run, prompted as it trained; per question: correct (solution block),
    graded (rlt.evaluate's any-credit grading)."""
    from rlt.data.teacher import get_teacher_format
    from rlt.evaluate import DataChoice, choose_prompt, decode, grade_greedy, hf_generator, load_problems
    from rlt.generation.sampling import GREEDY, render_prompts
    from rlt.models import load_eval_model
    from rlt.rewards.gsm8k import answers_equivalent
    from rlt.run_info import locate

    located = locate(run_dir)
    prompt = choose_prompt(located, max_new_tokens=args.eval_max_new_tokens)
    choice = DataChoice(data=str(rl_run.dataset_id_or_path), split=rl_run.eval_split or "test",
                        synthetic=dict(rl_run.synthetic or {}) or None, seed=rl_run.seed)
    problems = load_problems(choice, system_prompt=prompt.system_prompt, limit=args.eval_n)
    model, tokenizer = load_eval_model(located.model_dir, torch_dtype="float32")
    texts = render_prompts(tokenizer, problems)
    ids = hf_generator(model, tokenizer)(texts, max_new_tokens=prompt.max_new_tokens, batch_size=args.eval_batch_size,
                                         num_samples=1, sampling=GREEDY, seed=0)
    completions = [row[0] for row in decode(tokenizer, ids)]
    entries = grade_greedy(problems, texts, completions, [len(row[0]) for row in ids])
    fmt = get_teacher_format(rl_run.teacher_format)
    solved = []
    for entry in entries:
        block = solution_block(entry["completions"][0], fmt.solution_open, fmt.solution_close)
        solved.append(float(block is not None and answers_equivalent(block, entry["answer"])))
    return {"solution_correct": solved, "graded_correct": [float(e["correct"]) for e in entries],
            "questions": [p["question"] for p in problems], "system_prompt": prompt.system_prompt,
            "examples": [{"completion": e["completions"][0], "answer": e["answer"]} for e in entries[:3]]}


# ------------------------------------------------------------------------------------------------------- report


def student_summary(evals: list[dict], key: str) -> dict:
    """Accuracy per seed, and per question averaged over the seeds (what the bootstrap pairs)."""
    per_seed = [mean(e[key]) for e in evals]
    per_question = [mean([e[key][i] for e in evals]) for i in range(len(evals[0][key]))]
    acc = mean(per_question)
    return {"accuracy": acc, "per_seed": per_seed, "se": binomial_se(acc, len(per_question) * len(evals)),
            "per_question": per_question}


def print_report(results: dict, args) -> None:
    info, phases = results["machine"], results["phases"]
    r, h, s = results["rlt_reward"], results["held_out_reward"], results["students"]
    print()
    print(f"RLT learning benchmark: rlt:tiny warm-up ({args.warmup_steps} SFT steps"
          f"{', cached' if results['warmup_cached'] else ''}) -> {args.rlt_steps} RLT steps; "
          f"{args.train_questions} train questions x best of {args.num_samples}; student {args.student_steps} SFT "
          f"steps x seeds {args.student_seeds}; {len(s['rl']['solution']['per_question'])} held-out questions")
    print(machine_line(info) + f" -> {info['load_avg_end'][0]:.2f} at end")
    print(f"\n{'phase':<22} {'wall s':>8} {'CPU s':>8} {'load':>5}")
    print("-" * 46)
    for name, ph in phases.items():
        print(f"{name:<22} {ph['wall_seconds']:>8.1f} {ph['cpu_seconds']:>8.1f} {ph['load_avg']:>5.2f}")
    total = sum(ph["wall_seconds"] for ph in phases.values())
    print(f"{'total':<22} {total:>8.1f} {sum(ph['cpu_seconds'] for ph in phases.values()):>8.1f}")
    print(f"\nteacher reward in RL training: {r['first']:.3f} (mean of the first {r['window']} steps) -> "
          f"{r['last']:.3f} (last {r['window']})")
    p = h["paired"]
    print(f"held-out teacher reward ({p['n']} rows, 1 explanation each): warm-up {h['warmup']['mean_reward']:.3f} "
          f"(closed {h['warmup']['closed']:.0%}), RL {h['rl']['mean_reward']:.3f} (closed {h['rl']['closed']:.0%}); "
          f"RL - warm-up {p['diff']:+.3f} [95% {p['low']:+.3f}, {p['high']:+.3f}], {p_text(p['p'], p['resamples'])}")
    d = results["distilled"]
    print(f"distilled train sets: warm-up kept {d['warmup']['kept']}/{d['warmup']['rows']} (mean reward "
          f"{d['warmup']['mean_reward_kept']:.3f}), RL kept {d['rl']['kept']}/{d['rl']['rows']} (mean reward "
          f"{d['rl']['mean_reward_kept']:.3f})")
    print(f"\n{'student on':<22} {'solution acc':>18} {'any-credit acc':>18}  per seed (solution)")
    for name, label in (("warmup", "warm-up teacher data"), ("rl", "RL teacher data"),
                        ("reference", "data's worked answers")):
        sol, graded = s[name]["solution"], s[name]["graded"]
        print(f"{label:<22} {sol['accuracy']:>10.1%} ± {sol['se']:.1%} {graded['accuracy']:>10.1%} ± "
              f"{graded['se']:.1%}  {', '.join(f'{v:.1%}' for v in sol['per_seed'])}")
    for key, label in (("solution", "RL - warm-up (solution)"), ("graded", "RL - warm-up (any-credit)"),
                       ("reference_solution", "worked answers - warm-up (solution)")):
        b = results["difference"][key]
        print(f"{label}: {100 * b['diff']:+.1f} points [95% {100 * b['low']:+.1f}, "
              f"{100 * b['high']:+.1f}], paired bootstrap over {b['n']} questions, {p_text(b['p'], b['resamples'])}")


# --------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="teacher SFT warm-up steps")
    p.add_argument("--warmup", nargs="*", default=[], help="extra Hydra overrides of the warm-up")
    p.add_argument("--rlt-steps", type=int, default=RLT_STEPS, help="RLT steps")
    p.add_argument("--rlt", nargs="*", default=[], help=f"extra Hydra overrides of the RLT run, after {RLT_OVERRIDES}")
    p.add_argument("--train-questions", type=int, default=512, help="training questions distilled by each teacher")
    p.add_argument("--num-samples", type=int, default=4, help="explanations per question; the best by reward kept")
    p.add_argument("--keep-unclosed", action="store_true",
                   help="keep a training row none of whose explanations closed (its best, cut where it stopped)")
    p.add_argument("--reward-n", type=int, default=64, help="held-out rows for the teacher reward")
    p.add_argument("--student-steps", type=int, default=STUDENT_STEPS, help="student SFT steps")
    p.add_argument("--student", nargs="*", default=[], help="extra Hydra overrides of the student SFT")
    p.add_argument("--student-seeds", type=int, nargs="+", default=[0], help="a student per seed and data set")
    p.add_argument("--eval-n", type=int, default=200, help="held-out questions for the students' accuracy")
    p.add_argument("--eval-max-new-tokens", type=int, default=96)
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--gen-batch-size", type=int, default=64, help="distillation: sequences per generate call")
    p.add_argument("--seed", type=int, default=42, help="distillation sampling seed (both teachers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=str(REPO / "results" / "bench_rlt_learning"), help="run dirs go here")
    p.add_argument("--cache-dir", default=str(REPO / "results" / "bench_cache"), help="where warm-ups are kept")
    p.add_argument("--no-cache", action="store_true", help="train the warm-up even when a cached one matches")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 10 warm-up, 2 RLT and 4 student steps, 16 questions, one seed, --keep-unclosed")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


def apply_quick(args) -> None:
    args.warmup_steps, args.rlt_steps, args.student_steps = 10, 2, 4
    args.train_questions, args.num_samples, args.reward_n, args.eval_n = 16, 2, 8, 16
    args.student_seeds, args.keep_unclosed = [0], True  # 10 warm-up steps: explanations rarely close yet


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    import torch

    from rlt.compose import compose_raw
    from rlt.distill import load_run_config
    from rlt.train import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    phases: dict = {}
    warm_over = ["run_cfg=teacher_sft_tiny", *TASK_OVERRIDES, *WARMUP_OVERRIDES, *QUIET,
                 f"max_steps={args.warmup_steps}", *args.warmup]
    rlt_over = ["run_cfg=teacher_rlt_tiny", *TASK_OVERRIDES, *RLT_OVERRIDES, *QUIET, f"max_steps={args.rlt_steps}",
                *args.rlt]
    results: dict = {"machine": info, "args": vars(args), "warmup_overrides": warm_over, "rlt_overrides": rlt_over,
                     "phases": phases}

    warm, results["warmup_cached"] = warm_up(args, warm_over, phases)
    with Phase("rlt", phases):
        run_training(compose_raw([*rlt_over, f"model_name_or_path={warm}", f"output_dir={out / 'rlt'}"]))
    rl = str(out / "rlt" / "final")
    results["rlt_reward"] = reward_curve(out / "rlt", window=max(1, args.rlt_steps // 5))
    run = load_run_config(rl)  # the same data, format, sampling and reward (student = the warm-up) for both teachers
    teachers = {"warmup": warm, "rl": rl}

    with Phase("distill", phases):
        sets = {name: distill_set(teacher, run, out / "distill" / f"{name}.jsonl", limit=args.train_questions,
                                  num_samples=args.num_samples, keep_unclosed=args.keep_unclosed, seed=args.seed,
                                  batch_size=args.gen_batch_size)
                for name, teacher in teachers.items()}
    results["distilled"] = {name: summary for name, (_, summary) in sets.items()}
    results["distilled"]["reference"] = reference_set(run, [r["question"] for r in sets["warmup"][0]],
                                                      out / "distill" / "reference.jsonl")
    with Phase("held_out_reward", phases):
        results["held_out_reward"] = held_out_rewards(teachers, run, args, out / "distill")

    evals: dict[str, list[dict]] = {name: [] for name in STUDENT_SETS}
    for seed in args.student_seeds:
        for name in STUDENT_SETS:
            with Phase(f"student_{name}_s{seed}", phases):
                student = train_student(out / "distill" / f"{name}.jsonl", out / f"student_{name}_s{seed}", seed,
                                        args)
            with Phase(f"eval_{name}_s{seed}", phases):
                evals[name].append(evaluate_student(student, run, args))
    assert evals["warmup"][0]["questions"] == evals["rl"][0]["questions"], "the students saw different questions"
    results["students"] = {name: {"solution": student_summary(e, "solution_correct"),
                                  "graded": student_summary(e, "graded_correct"),
                                  "system_prompt": e[0]["system_prompt"], "examples": e[0]["examples"]}
                           for name, e in evals.items()}
    results["difference"] = {key: paired_bootstrap(results["students"]["warmup"][key]["per_question"],
                                                   results["students"]["rl"][key]["per_question"], seed=args.seed)
                             for key in ("solution", "graded")}
    results["difference"]["reference_solution"] = paired_bootstrap(
        results["students"]["warmup"]["solution"]["per_question"],
        results["students"]["reference"]["solution"]["per_question"], seed=args.seed)
    info["load_avg_end"] = list(os.getloadavg())
    print_report(results, args)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
