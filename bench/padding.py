"""Training-side work of one GRPO round over completions of real, varied lengths: TRL's padded forwards vs ours.

    python bench/padding.py --threads 1                 # rlt:tiny-wide, 8 prompts x 4 completions, per-device 8
    python bench/padding.py --quick                      # rlt:tiny, 1 round, 1 repeat (smoke test)

A GRPO round is built from GSM8K train rows (``--data``, default ``../shared/data/gsm8k/train.jsonl``): each
prompt is a question in the chat template, each completion a worked answer (token lengths as a model's reasoning
varies; the content does not matter for the cost), ``--generations`` completions per prompt. What the trainer then
does with it, outside generation, is timed (`rlt.trainers.GRPOTrainer` on the same model, ``use_vllm=False``):

* the reference model's no-grad log-prob forward over the whole round, in chunks of ``--per-device`` rows;
* per micro-batch of ``--per-device`` rows, the loss forward (log-probs and entropies) and its backward.

Variants, on the same rounds, interleaved over ``--repeats``:

* ``trl``: TRL 1.16's `_get_per_token_logps_and_entropies` on TRL's micro-batches (the round shuffled, then split),
  every forward as wide as the round's longest completion.
* ``cut``: ours (`rlt.trainers`, addition 6) on the same shuffled micro-batches: each chunk cut after its longest
  completion; the reference forward's chunks take rows by length.
* ``cut+groups``: ours with addition 7: the round ordered by completion length before the split.

Printed (after one untimed warm-up round per variant): seconds per round (median [min, max] over repeats x rounds),
ratio to ``trl``, forwarded completion positions per valid token, and the max |difference| of the per-row summed
log-probs against ``trl`` (the values must agree: same tensors, float rounding only). Results: docs/benchmarks.md
(section 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: rlt, bench.common
from bench.common import REPO, use_offline_env, write_json

use_offline_env()
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS = ("trl", "cut", "cut+groups")


def build_trainer(model_name: str, per_device: int, generations: int, output_dir: str):
    from datasets import Dataset
    from trl import GRPOConfig

    from rlt.models import load_model, load_tokenizer
    from rlt.trainers import GRPOTrainer

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, torch_dtype="float32", tokenizer=tokenizer)
    args = GRPOConfig(output_dir=output_dir, use_vllm=False, per_device_train_batch_size=per_device,
                      gradient_accumulation_steps=1, num_generations=generations, beta=0.04, loss_type="grpo",
                      use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      disable_tqdm=True, max_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * per_device}), processing_class=tokenizer)
    return trainer, tokenizer


def make_round(tokenizer, rows: list[dict], n_prompts: int, generations: int, offset: int):
    """(input_ids, attention_mask, logits_to_keep) of one round: left-padded prompts, right-padded completions."""
    import torch

    prompts, completions = [], []
    for p in range(n_prompts):
        question = rows[offset + p]["question"]
        chat = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        for g in range(generations):
            answer = rows[offset + n_prompts + p * generations + g]["answer"]
            prompts.append(ids)
            completions.append(tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width_p - len(p)) + p + c + [pad] * (width_c - len(c))
                              for p, c in zip(prompts, completions, strict=True)])
    mask = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(c)) + [0] * (width_c - len(c))
                         for p, c in zip(prompts, completions, strict=True)])
    return input_ids, mask, width_c


def run_round(trainer, variant: str, input_ids, mask, width_c: int, per_device: int, seed: int):
    """Seconds for the reference forward + every micro-batch's loss forward and backward; per-row summed log-probs
    (in the round's order) and forwarded completion positions."""
    import torch
    from trl import GRPOTrainer as TRLGRPOTrainer
    from trl.trainer.utils import shuffle_sequence_dict

    from rlt.trainers import completion_columns, completion_ends, ordered_by_completion_length

    if variant == "trl":
        def compute(*a, **k):
            return TRLGRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)
    else:
        compute = trainer._get_per_token_logps_and_entropies
    model, ref = trainer.model, trainer.ref_model
    rows = {"input_ids": input_ids, "completion_mask": mask[:, -width_c:], "attention_mask": mask,
            "row": torch.arange(len(input_ids))}
    forwarded = 0
    start = time.perf_counter()
    with torch.no_grad():
        compute(ref, input_ids, mask, width_c, batch_size=per_device)
    ends = completion_ends(mask, width_c).sort(descending=True).values  # ours: reference chunks by length
    for s in range(0, len(input_ids), per_device):  # what the reference forward covered
        forwarded += (width_c if variant == "trl" else max(int(ends[s]), 1)) * len(ends[s:s + per_device])
    torch.manual_seed(seed)
    batch = shuffle_sequence_dict(rows)
    if variant == "cut+groups":
        batch = ordered_by_completion_length(batch)
    sums = torch.zeros(len(input_ids))
    for s in range(0, len(input_ids), per_device):
        ids, m = batch["input_ids"][s:s + per_device], batch["attention_mask"][s:s + per_device]
        logps, _, _ = compute(model, ids, m, width_c, compute_entropy=True)
        (logps * m[:, -width_c:]).sum().backward()
        sums[batch["row"][s:s + per_device]] = (logps.detach() * m[:, -width_c:]).sum(1)
        forwarded += (width_c if variant == "trl" else completion_columns(m, width_c)) * len(ids)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, sums, forwarded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="rlt:tiny-wide")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSONL (question, answer)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--per-device", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="different rounds (different rows) per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="rlt:tiny, 1 round, 1 repeat")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.repeats = "rlt:tiny", 1, 1
    if not args.data.is_file():
        print(f"no data at {args.data} (--data: a JSONL with question and answer)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.data.read_text().splitlines()[:5000]]
    per_round = args.prompts * (1 + args.generations)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, tokenizer = build_trainer(args.model, args.per_device, args.generations, tmp)
        rounds = [make_round(tokenizer, rows, args.prompts, args.generations, r * per_round)
                  for r in range(args.rounds)]
        times = {v: [] for v in VARIANTS}
        forwarded = dict.fromkeys(VARIANTS, 0)
        delta = dict.fromkeys(VARIANTS, 0.0)
        for v in VARIANTS:  # warm-up, untimed
            run_round(trainer, v, *rounds[0], args.per_device, seed=0)
        for rep in range(args.repeats):
            for r, (ids, mask, width_c) in enumerate(rounds):
                order = VARIANTS[(rep + r) % 3:] + VARIANTS[:(rep + r) % 3]  # rotated, back to back
                sums = {}
                for v in order:
                    seconds, sums[v], n = run_round(trainer, v, ids, mask, width_c, args.per_device, seed=r)
                    times[v].append(seconds)
                    if rep == 0:
                        forwarded[v] += n
                for v in VARIANTS:
                    delta[v] = max(delta[v], float((sums[v] - sums["trl"]).abs().max()))
    valid = sum(int(mask[:, -w:].sum()) for _, mask, w in rounds) * 2  # reference + loss forward
    lengths = [int(n) for _, mask, w in rounds for n in mask[:, -w:].sum(1)]
    print(f"GRPO round, training side: {args.model}, {args.prompts} prompts x {args.generations} completions "
          f"(GSM8K answers: {min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.0f}), per-device "
          f"{args.per_device}; {args.rounds} rounds x {args.repeats} repeats, {args.threads} thread(s)")
    print(f"{'variant':<12}{'s/round':>26}{'/ trl':>8}{'forwarded/valid':>18}{'max |dlogp| vs trl':>21}")
    base = statistics.median(times["trl"])
    results = []
    for v in VARIANTS:
        med = statistics.median(times[v])
        ratio = statistics.median([a / b for a, b in zip(times[v], times["trl"], strict=True)])
        results.append({"variant": v, "seconds_median": med, "seconds_min": min(times[v]),
                        "seconds_max": max(times[v]), "ratio_to_trl": ratio,
                        "forwarded_per_valid": forwarded[v] / valid, "max_abs_delta_vs_trl": delta[v]})
        print(f"{v:<12}{med:>10.3f} [{min(times[v]):.3f}, {max(times[v]):.3f}]{ratio:>8.3f}"
              f"{forwarded[v] / valid:>18.2f}{delta[v]:>21.2e}")
    print(f"(trl median {base:.3f} s; ratios are medians of back-to-back round ratios)")
    if args.json:
        write_json(args.json, {"model": args.model, "lengths": lengths, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
