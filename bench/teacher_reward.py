"""Throughput of the RLT teacher reward (`TeacherKLReward`), batched vs one completion at a time, at equal values.

    python bench/teacher_reward.py [--quick] [--models tiny,smollm2] [--json PATH]

For each model (`rlt:tiny`, `rlt:smollm2-135m`): teacher = the model, student = a copy with slightly perturbed
weights (fp32, CPU). Completions are generated once by the model (sampling at 0.7) from RL prompts of synthetic
arithmetic (`prepare_teacher_datasets("synthetic:arithmetic", mode="rl")`, `num_generations` per prompt as GRPO
does), with lengths mixed over 16..128 tokens; every other completion is closed (the sampled body is cut, then the
closing tag and eos are appended), the others stop mid-explanation. The reward is called like TRL calls it (prompts,
completions, completion_ids, the dataset columns) with the `teacher_rlt` coefficients (a = [1, 0.01],
b = [3, 0.03], tau_S = tau_T = 0.7).

Variants, each timed on the same completions, interleaved (every repeat runs every variant, in a rotated order):

* ``batch16`` / ``batch8``: `TeacherKLReward(teacher_reward_batch_size=16 / 8)`: micro-batches of whole prompt
  groups, each group's common prefix (teacher prompt; student system prompt + question) run once and shared through
  the KV cache.
* ``batch16w``: the same batch size scoring whole sequences (``share_prefixes=False``: length-sorted, left-padded).
* ``batch1``: `TeacherKLReward(teacher_reward_batch_size=1)`, one forward per completion and model (the reference's
  scoring granularity, with our span finding and ``logits_to_keep``).
* ``batch16lp``: batch 16 called as the trainer calls it (vLLM or HF generation): with each completion's
  sampling log-probs (``sampling_logprobs``, ``sampling_temperature``), which the reward takes as the teacher's
  q_k instead of running the teacher forward (``teacher_reuse_sampling_logprobs``). The generator returns them with
  the sample; here they are computed once, untimed, by the teacher (log_softmax(logits / 0.7) of each sampled token
  after its prompt), which is what vLLM's processed log-probs equal (within 1e-4, tests/test_vllm_colocate.py). Its
  values are checked against ``batch1``'s (teacher forward) like the others'.
* ``reference``: written from rlt-spec §1.5-§2: per completion, decode the ids (special tokens skipped), close an
  unclosed explanation, re-tokenise the full student chat and teacher text, two full-vocabulary forwards with a full
  ``log_softmax``, spans by token-subsequence search with the reference's boundary trims, then ``gc.collect()``. Its
  rewards differ slightly (re-tokenisation), so its delta is reported, not asserted.

Printed: completions/s (median wall time over repeats), speed-up over ``batch1`` on the wall clock and on this
process's CPU time (user + sys: with 1 thread, close to the work done and less sensitive to other jobs), the max
|reward delta| against ``batch1`` (batched variants must be within ``--tolerance``, default 1e-4), and the time split
of the `TeacherKLReward` variants into forwards (``_run``) and everything else (ids -> spans, tokenisation,
reductions).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import machine_info, machine_line, use_offline_env, write_json

use_offline_env()

MODELS = {"tiny": "rlt:tiny", "smollm2": "rlt:smollm2-135m"}
LENGTHS = (16, 128, 32, 96, 48, 64, 24, 112)  # completion tokens, cycled over the completions
SYNTHETIC = {"num_train": 200, "num_eval": 10, "max_operand": 20, "max_terms": 2, "ops": "+-"}
REWARD_KW = dict(temperature=0.7, teacher_format="stratos")  # the teacher_rlt run: its reward keys are the defaults


# ---------------------------------------------------------------------------------------------------- workload


def perturbed_copy(model, scale: float = 0.05, seed: int = 1234):
    """A copy of `model` with every weight matrix moved by `scale` x its own std of Gaussian noise."""
    import torch

    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim >= 2:
                p.add_(scale * p.float().std() * torch.randn(p.shape, generator=gen).to(p.dtype))
    return student


def make_workload(model, tok, fmt, n_prompts: int, n_generations: int, seed: int = 0) -> dict:
    """TRL-style reward kwargs for n_prompts x n_generations completions sampled from `model`."""
    import torch

    from rlt.data.teacher import prepare_teacher_datasets

    rows, _ = prepare_teacher_datasets("synthetic:arithmetic", mode="rl", tokenizer=tok, fmt=fmt,
                                       data_format="gsm8k", synthetic=SYNTHETIC, max_samples=n_prompts, seed=seed)
    close_ids = tok(fmt.explanation_close, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    torch.manual_seed(seed)
    kw = {k: [] for k in ("prompts", "completions", "completion_ids", "question", "solution", "teacher_format")}
    enc = tok([row["prompt"] for row in rows], return_tensors="pt", padding=True)  # left padding
    n_new = max(LENGTHS)
    with torch.no_grad():  # one sampling round for every prompt, eos suppressed until n_new tokens
        out = model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=n_new,
                             min_new_tokens=n_new, num_return_sequences=n_generations, pad_token_id=tok.pad_token_id)
    for k, ids in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
        row, length = rows[k // n_generations], LENGTHS[k % len(LENGTHS)]
        ids = ids[: length - len(close_ids)] + close_ids if k % 2 == 0 else ids[:length]
        kw["completion_ids"].append(ids)
        kw["completions"].append(tok.decode(ids, skip_special_tokens=True))
        for col in ("question", "solution", "teacher_format"):
            kw[col].append(row[col])
        kw["prompts"].append(row["prompt"])
    return kw


# ------------------------------------------------------------------------------ reference-style scoring (§1.5-§2)


def sampling_logprobs(model, tok, kw: dict, tau: float = 0.7) -> list[list[float]]:
    """log_softmax(logits / tau) of each completion token after its prompt under `model`: what a vLLM sampler
    returns with the sample (processed log-probs at the sampling temperature)."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, ids in zip(kw["prompts"], kw["completion_ids"], strict=True):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([p + ids])).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits / tau, dim=-1)
            out.append(lp.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist())
    return out


def _find(hay: list[int], needle: list[int], last: bool = False) -> tuple[int, int] | None:
    """(start, length) of `needle` in `hay`, else of it without its first, last, or both boundary tokens."""
    for cand in (needle, needle[1:], needle[:-1], needle[1:-1]):
        if cand:
            starts = range(len(hay) - len(cand), -1, -1) if last else range(len(hay) - len(cand) + 1)
            for s in starts:
                if hay[s: s + len(cand)] == cand:
                    return s, len(cand)
    return None


def _full_logprobs(model, ids: list[int], tau: float):
    """A full forward and a full-vocabulary log_softmax: the log-prob of every next token,
    ``lp[j] = log p(ids[j+1])``."""
    import torch

    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float() / tau, dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def _take(lp, span):
    """The log-probs of the tokens ``ids[start:start + n]`` (empty without a span)."""
    import torch

    return lp[span[0] - 1: span[0] - 1 + span[1]] if span and span[0] > 0 else torch.empty(0)


def reference_style(reward, prompts, completion_ids, question, solution, timer=None, **_) -> list[float]:
    """Reference-granularity scoring, written from rlt-spec §1.5-§2 (see the module docstring). `timer` (a dict)
    accumulates the seconds spent in forwards (``forward``) and in ``gc.collect`` (``gc``)."""
    import torch

    from rlt.data.teacher import student_chat

    tok, fmt, p, close = reward.tokenizer, reward.fmt, reward.not_matched_penalty, reward.fmt.explanation_close
    out = []
    with torch.no_grad():
        for prompt, ids, q, sol in zip(prompts, completion_ids, question, solution, strict=True):
            text = tok.decode(ids, skip_special_tokens=True)
            match = 0.0 if close in text else p
            body = text.split(close)[0]
            s_text = student_chat(q, fmt.delimiters_padding + body, sol, fmt, tok)
            s_ids = tok(s_text, add_special_tokens=False)["input_ids"]
            t_ids = tok(text=prompt + body + close)["input_ids"]
            think = tok(fmt.delimiters_padding + body, add_special_tokens=False)["input_ids"]  # thought content
            t0 = time.perf_counter()
            s_lp = _full_logprobs(reward.student_model, s_ids, reward.student_temperature)
            t_lp = _full_logprobs(reward.teacher_model, t_ids, reward.teacher_temperature)
            t1 = time.perf_counter()
            s_k, q_k = _take(s_lp, _find(s_ids, think)), _take(t_lp, _find(t_ids, think, last=True))
            ell = _take(s_lp, _find(s_ids, tok(fmt.pad(sol), add_special_tokens=False)["input_ids"], last=True))
            n = min(len(s_k), len(q_k))
            lp_term = reward._reduced(reward._lp_values(ell), reward.reduction_log_prob_fn, reward.lp_coeffs, p)[1]
            kl_term = reward._reduced(reward._kl_values(q_k[:n] - s_k[:n]), reward.reduction_kl_fn,
                                      reward.kl_coeffs, -p)[1]
            out.append(lp_term - kl_term + match)
            t2 = time.perf_counter()
            gc.collect()
            if timer is not None:
                timer["forward"] = timer.get("forward", 0.0) + t1 - t0
                timer["gc"] = timer.get("gc", 0.0) + time.perf_counter() - t2
    return out


# ----------------------------------------------------------------------------------------------------- benchmark


def bench_model(name: str, *, n_prompts: int, n_generations: int, repeats: int, batch_sizes: list[str],
                threads: list[int], reference: bool, tolerance: float) -> dict:
    import torch

    from rlt.data.teacher import get_teacher_format
    from rlt.models import load_model, load_tokenizer
    from rlt.rewards.teacher import TeacherKLReward

    path = MODELS[name]
    tok = load_tokenizer(path)
    teacher = load_model(path, torch_dtype="float32", tokenizer=tok).eval()
    student = perturbed_copy(teacher)
    fmt = get_teacher_format("stratos")
    t0 = time.perf_counter()
    kw = make_workload(teacher, tok, fmt, n_prompts, n_generations)
    gen_s = time.perf_counter() - t0
    n = len(kw["completion_ids"])
    lengths = [len(c) for c in kw["completion_ids"]]
    closed = sum(fmt.explanation_close in c for c in kw["completions"])
    print(f"\n== {path}: {n} completions ({n_prompts} prompts x {n_generations}), {min(lengths)}-{max(lengths)} "
          f"tokens (mean {statistics.mean(lengths):.0f}), {closed} closed; generated in {gen_s:.1f}s", flush=True)

    rewards: dict[str, object] = {}
    extra_kw: dict[str, dict] = {}  # per variant: more reward kwargs (the sampling log-probs of "lp")
    for spec in batch_sizes:  # "16": shared prompt prefixes (the default); "16w": whole sequences; "16lp": + q_k
        whole, lp = spec.endswith("w"), spec.endswith("lp")
        rewards[f"batch{spec}"] = TeacherKLReward(
            student, tok, teacher, teacher_reward_batch_size=int(spec.rstrip("wlp")), share_prefixes=not whole,
            **REWARD_KW)
        if lp:
            extra_kw[f"batch{spec}"] = dict(sampling_logprobs=sampling_logprobs(teacher, tok, kw),
                                            sampling_temperature=REWARD_KW["temperature"])
    if reference:
        # config + reductions only
        ref_reward = TeacherKLReward(student, tok, teacher, teacher_reward_batch_size=1, **REWARD_KW)
        ref_timer: dict[str, float] = {}
        rewards["reference"] = lambda **k: reference_style(ref_reward, timer=ref_timer, **k)

    forward_s = dict.fromkeys(rewards, 0.0)
    gc_s: dict[tuple, list[float]] = {}

    def timed_run(label, run):  # wraps TeacherKLReward._run: the forward time of a call
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return run(*a, **k)
            finally:
                forward_s[label] += time.perf_counter() - t
        return wrapped

    for label, fn in rewards.items():
        if isinstance(fn, TeacherKLReward):
            fn._run = timed_run(label, fn._run)

    call_kw = dict(kw, trainer_state=None, log_extra=None, log_metric=None)
    cases = [(label, th) for th in threads for label in rewards]
    values, times, fwd, cpu = {}, {c: [] for c in cases}, {c: [] for c in cases}, {c: [] for c in cases}
    for th in threads:  # warm-up calls, also the compared values
        torch.set_num_threads(th)
        for label, fn in rewards.items():
            values[label, th] = fn(**call_kw, **extra_kw.get(label, {}))
            if label in extra_kw:
                assert fn.last_reused_sampling_logprobs == n, "the reward did not take the sampling log-probs"
    for r in range(repeats):  # interleaved: every repeat runs every case, in a rotated order
        for label, th in cases[r % len(cases):] + cases[: r % len(cases)]:
            torch.set_num_threads(th)
            forward_s[label] = 0.0
            if label == "reference":
                ref_timer.clear()
            t, c = time.perf_counter(), time.process_time()
            rewards[label](**call_kw, **extra_kw.get(label, {}))
            times[label, th].append(time.perf_counter() - t)
            cpu[label, th].append(time.process_time() - c)
            if label == "reference":
                fwd[label, th].append(ref_timer["forward"])
                gc_s.setdefault((label, th), []).append(ref_timer["gc"])
            else:
                fwd[label, th].append(forward_s[label])

    rows, ok = [], True
    print(f"{'threads':>7} {'variant':>10} {'median s':>9} {'compl/s':>8} {'x batch1':>8} {'cpu s':>8} {'x (cpu)':>7} "
          f"{'max|dR|':>9} "
          f"{'forward s':>9} {'other s':>8}  (reference: other s includes gc.collect)")
    for th in threads:
        base = ("batch1", th) if "batch1" in rewards else (next(iter(rewards)), th)
        base_s, base_cpu = statistics.median(times[base]), statistics.median(cpu[base])
        for label in rewards:
            med, med_cpu = statistics.median(times[label, th]), statistics.median(cpu[label, th])
            delta = max(abs(a - b) for a, b in zip(values[label, th], values[base], strict=True))
            row = {"variant": label, "threads": th, "median_s": med, "completions_per_s": n / med,
                   "speedup_vs_batch1": base_s / med, "cpu_s": med_cpu, "cpu_speedup_vs_batch1": base_cpu / med_cpu,
                   "max_abs_delta_vs_batch1": delta, "times_s": times[label, th], "cpu_times_s": cpu[label, th]}
            f = statistics.median(fwd[label, th])
            row.update(forward_s=f, other_s=med - f)
            if (label, th) in gc_s:
                row["gc_s"] = statistics.median(gc_s[label, th])
            if isinstance(rewards[label], TeacherKLReward):
                ok = ok and delta <= tolerance
            rows.append(row)
            print(f"{th:>7} {label:>10} {med:9.3f} {n / med:8.1f} {base_s / med:8.2f} {med_cpu:8.3f} "
                  f"{base_cpu / med_cpu:7.2f} {delta:9.2e} "
                  f"{row['forward_s']:9.3f} {row['other_s']:8.3f}"
                  + (f"  gc {row['gc_s']:.3f}" if "gc_s" in row else ""))
    print(f"batched == batch1 within {tolerance:g}: {'yes' if ok else 'NO'}", flush=True)
    return {"model": path, "completions": n, "prompts": n_prompts, "generations": n_generations,
            "lengths": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
            "closed": closed, "repeats": repeats, "generation_s": gen_s, "rows": rows,
            "equal_within_tolerance": ok, "mean_reward": statistics.mean(values[base])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset of: " + ",".join(MODELS) + " (default all; quick tiny)")
    ap.add_argument("--quick", action="store_true", help="tiny only, 8 completions, 2 repeats, 1 thread (a smoke run)")
    ap.add_argument("--prompts", type=int, help="prompts per model (default tiny 8, smollm2 4; quick 2)")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPO num_generations)")
    ap.add_argument("--repeats", type=int, help="timed calls per variant (default tiny 5, smollm2 3; quick 2)")
    ap.add_argument("--threads",
                    help="torch intra-op thread counts, each measured, interleaved (default 1,2; quick 1)")
    ap.add_argument("--batch-sizes", default="16,16lp,16w,8,1",
                    help="TeacherKLReward batch sizes (1 = the baseline; a trailing w = whole sequences, no shared "
                         "prompt prefix; a trailing lp = given the sampling log-probs, as the trainer gives them: no "
                         "teacher forward)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-style variant")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max |reward delta| batched vs batch1")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    info = machine_info()
    print(machine_line(info))
    results = []
    models = args.models or ("tiny" if args.quick else ",".join(MODELS))
    threads = args.threads or ("1" if args.quick else "1,2")
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; choose from {list(MODELS)}")
        prompts = args.prompts or (2 if args.quick else 8 if name == "tiny" else 4)
        results.append(bench_model(name, n_prompts=prompts, n_generations=args.generations,
                                   repeats=args.repeats or (2 if args.quick else 5 if name == "tiny" else 3),
                                   batch_sizes=[b.strip() for b in args.batch_sizes.split(",") if b.strip()],
                                   threads=[int(t) for t in threads.split(",")],
                                   reference=not args.no_reference, tolerance=args.tolerance))
    info["load_avg_end"] = list(os.getloadavg())
    if args.json:
        write_json(args.json, {"machine": info, "quick": args.quick, "results": results})
    return 0 if all(r["equal_within_tolerance"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
