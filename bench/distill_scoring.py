"""Distillation scoring with and without the teacher's sampling log-probs (`rlt.distill`), side by side.

    python bench/distill_scoring.py --threads 1            # rlt:tiny and rlt:tiny-wide, 32 rows x 4 samples, 64 tokens
    python bench/distill_scoring.py --quick                 # rlt:tiny, 4 rows x 2 samples, 1 round (smoke test)

Each model is its own teacher (`--run-cfg teacher_rlt_tiny`, its student the same model, T = 0.7, HF generation).
Variants, interleaved over ``--rounds`` (same seed, so the same samples): ``reuse`` (the default: the sampling
log-probs recorded while generating stand in for the reward's teacher forward) and ``forward``
(``teacher_reuse_sampling_logprobs=false``: the teacher forward over every explanation). Timed: the scoring phase
(`rlt.distill.score_samples`: model loads + reward calls) and the whole `distill` call. Printed per model: seconds, the
forward/reuse ratio (median of the rounds' ratios, after an untimed warm-up call), the samples that reused log-probs,
and |mean reward difference| (must be ~0). Results: docs/rlt.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import use_offline_env, write_json

use_offline_env()
VARIANTS = {"reuse": [], "forward": ["teacher_reuse_sampling_logprobs=false"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="rlt:tiny,rlt:tiny-wide")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.rows, args.samples, args.max_tokens, args.rounds = "rlt:tiny", 4, 2, 16, 1
    import torch

    import rlt.distill as distill_mod

    torch.set_num_threads(args.threads)
    score, scoring = distill_mod.score_samples, []

    def timed_score(*a, **k):
        start = time.perf_counter()
        try:
            return score(*a, **k)
        finally:
            scoring.append(time.perf_counter() - start)

    distill_mod.score_samples = timed_score
    results = []
    print(f"distillation scoring: {args.rows} rows x {args.samples} samples, {args.max_tokens} tokens, HF, "
          f"{args.threads} thread(s), {args.rounds} round(s)")
    print(f"{'model':<16}{'variant':<9}{'score s':>22}{'distill s':>12}{'forward/reuse':>15}{'reused':>8}"
          f"{'mean reward':>13}")
    for model in args.models.split(","):
        runs = {v: [] for v in VARIANTS}
        warm = distill_mod.load_run_config(model, run_cfg="teacher_rlt_tiny", overrides=[
            f"model_name_or_path={model}", "max_completion_length=8"])
        distill_mod.distill(teacher=model, run=warm, limit=2, num_samples=2, keep_unclosed=True)  # warm-up, untimed
        for r in range(args.rounds):
            for v in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                run = distill_mod.load_run_config(model, run_cfg="teacher_rlt_tiny", overrides=[
                    f"model_name_or_path={model}", f"max_completion_length={args.max_tokens}", *VARIANTS[v]])
                start = time.perf_counter()
                _, summary = distill_mod.distill(teacher=model, run=run, limit=args.rows, num_samples=args.samples,
                                                 keep_unclosed=True)
                runs[v].append({"score_s": scoring[-1], "distill_s": time.perf_counter() - start,
                                "reused": summary["samples_reusing_sampling_logprobs"],
                                "mean_reward": summary["mean_reward_all_samples"]})
        ratio = statistics.median(f["score_s"] / u["score_s"] for f, u in zip(runs["forward"], runs["reuse"],
                                                                                strict=True))
        for v, rs in runs.items():
            s = [x["score_s"] for x in rs]
            print(f"{model:<16}{v:<9}{statistics.median(s):>10.2f} [{min(s):.2f}, {max(s):.2f}]"
                  f"{statistics.median(x['distill_s'] for x in rs):>12.2f}{ratio if v == 'reuse' else 1.0:>15.2f}"
                  f"{rs[0]['reused']:>8}{rs[0]['mean_reward']:>13.6f}")
        delta = abs(runs["reuse"][0]["mean_reward"] - runs["forward"][0]["mean_reward"])
        results.append({"model": model, "runs": runs, "scoring_speedup": ratio, "mean_reward_delta": delta})
        print(f"{model:<16}scoring {ratio:.2f}x faster with reuse; |mean reward delta| {delta:.1e}")
    if args.json:
        write_json(args.json, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
