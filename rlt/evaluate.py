"""GSM8K-style evaluation: greedy accuracy (pass@1) and sampled pass@k, with an HF or vLLM generation backend.

    python -m rlt.evaluate --model results/demo/final --data ../shared/data/gsm8k --limit 200
    python -m rlt.evaluate --model rlt:tiny --data synthetic:arithmetic --k 8 --temperature 0.7
    python -m rlt.evaluate --model results/lora_run/final --data ../shared/data/gsm8k --backend vllm

What is measured and how (the training prompts, the training reward's answer checker, LoRA adapters, the results
JSON, exit status 2 on bad input) is in docs/grpo.md (Evaluation). Here: grading (`gsm8k_accuracy`, used by the SFT
recipe; `pass_at_k`), the run (`evaluate`, the whole run as a dict) and its CLI (`main`). Decoding is
`rlt.generation.sampling`; loading the model, `rlt.models.load_eval_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rlt.cli import default_output_path, parse_cli, shorten
from rlt.errors import ConfigError, RltError
from rlt.generation.sampling import (
    BACKENDS,
    DEFAULT_VLLM_KV_CACHE_BYTES,
    GREEDY,
    Sampling,
    generate_hf,
    generate_vllm,
    render_prompts,
    vllm_engine_for,
)

logger = logging.getLogger(__name__)

REASONING_PROMPT_ALIAS = "@reasoning"  # --system-prompt @reasoning = rlt.data.formats.REASONING_SYSTEM_PROMPT
STUDENT_PROMPT_ALIAS = "@student"  # the RLT student prompt: @student (stratos) or @student:<distilled .jsonl>


# ------------------------------------------------------------------------------------------------------ scoring


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from `n` samples of which `c` are correct: ``1 - C(n-c, k) / C(n, k)``, the
    probability that at least one of `k` samples drawn without replacement from the `n` is correct.

    Needs ``0 <= c <= n`` and ``1 <= k <= n``. ``pass_at_k(5, 2, 1) == 0.4``; ``pass_at_k(5, 2, 2) == 0.7``;
    1.0 whenever ``n - c < k`` (every draw of k includes a correct sample).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _grade(completion: str, answer: str) -> tuple[float, str | None]:
    from rlt.rewards.gsm8k import grade_completion

    return grade_completion(completion, answer)


def gsm8k_accuracy(model, tokenizer, problems: list[dict], *, max_new_tokens: int = 64,
                   batch_size: int = 16) -> dict:
    """Greedy accuracy of `model` on `problems` = [{"prompt": chat messages, "answer": final answer}, ...].

    A completion is correct when the training reward gives it any credit (`rlt.rewards.gsm8k.grade_completion`).
    Returns {"accuracy": float, "n": int, "predictions": [{"prompt", "completion", "predicted", "answer",
    "correct"}, ...]}.
    """
    texts = render_prompts(tokenizer, problems)
    completions = generate_hf(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = []
    for p, text, (completion,) in zip(problems, texts, completions, strict=True):
        score, predicted = _grade(completion, p["answer"])
        predictions.append({"prompt": text, "completion": completion, "predicted": predicted,
                            "answer": p["answer"], "correct": score > 0})
    n = len(predictions)
    return {"accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0, "n": n, "predictions": predictions}


# --------------------------------------------------------------------------------------------------- evaluation


def _check_options(*, split: str, limit: int | None, k: int, num_samples: int, sampling: Sampling,
                   max_new_tokens: int, batch_size: int, backend: str) -> None:
    problems = sampling.problems()
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not split:
        problems.append("split must be a non-empty split name")
    for name, value, low in (("limit", limit, 1), ("k", k, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("num_samples", num_samples, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(k, int) and isinstance(num_samples, int) and num_samples < k:
        problems.append(f"num_samples ({num_samples}) must be >= k ({k})")
    if k > 1 and not problems and sampling.greedy:
        problems.append(f"pass@k with k={k} samples needs temperature > 0, got {sampling.temperature!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def resolve_system_prompt(value: str | None) -> str | None:
    """The system prompt a ``--system-prompt`` value names: ``@reasoning`` (the ``<reasoning>``/``<answer>`` format
    prompt), ``@student`` (the RLT student prompt of the stratos format, what ``student_sft`` trains with),
    ``@student:<file.jsonl>`` (the system turn of the first row of a `rlt.distill` output: the prompt a student was
    trained on); any other text is the prompt itself. Raises `ConfigError` for an unreadable distilled file."""
    if value == REASONING_PROMPT_ALIAS:
        from rlt.data.formats import REASONING_SYSTEM_PROMPT

        return REASONING_SYSTEM_PROMPT
    if value == STUDENT_PROMPT_ALIAS:
        from rlt.data.teacher import get_teacher_format

        return get_teacher_format("stratos").student_system_prompt
    if value is not None and value.startswith(STUDENT_PROMPT_ALIAS + ":"):
        path = Path(value[len(STUDENT_PROMPT_ALIAS) + 1:]).expanduser()
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline())
            return next(m["content"] for m in first["messages"] if m["role"] == "system")
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
            raise ConfigError(f"--system-prompt {value}: cannot read the system turn of the first row of {path} "
                              f"(a python -m rlt.distill output): {type(e).__name__}: {e}") from None
    return value


def _hf_backend(model: str, torch_dtype: str, stack: ExitStack):
    from rlt.models import load_eval_model

    loaded, tokenizer = load_eval_model(model, torch_dtype=torch_dtype)

    def generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed):
        return generate_hf(loaded, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           num_samples=num_samples, sampling=sampling, seed=seed)

    return tokenizer, generate


def evaluate(*, model: str, data: str, split: str = "test", limit: int | None = None,
             system_prompt: str | None = None, k: int = 1, num_samples: int | None = None, temperature: float = 0.7,
             top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None, max_new_tokens: int = 256,
             batch_size: int = 16, backend: str = "hf", seed: int = 0,
             torch_dtype: str = "auto", data_columns: dict[str, str] | None = None,
             kv_cache_memory_bytes: int = DEFAULT_VLLM_KV_CACHE_BYTES) -> dict:
    """Evaluate `model` on the GSM8K-format `split` of `data` and return the results dict (see `main`).

    Greedy decoding gives ``accuracy`` (pass@1) and ``strict_accuracy`` (answer inside ``<answer>`` tags). With
    ``k > 1``, `num_samples` (default k) completions per problem are also sampled at `temperature` (after the
    `top_p` / `top_k` / `min_p` filters, off by default), and
    ``pass_at_k`` is the mean of `pass_at_k(num_samples, correct, k)` over problems. `limit` keeps the first N
    problems of the split, in file order. Raises `RltError` subclasses for bad options, data or models.
    """
    from rlt.data.loading import prepare_gsm8k_eval

    num_samples = k if num_samples is None else num_samples
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    _check_options(split=split, limit=limit, k=k, num_samples=num_samples, sampling=sampling,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend)
    system_prompt = resolve_system_prompt(system_prompt)
    problems = prepare_gsm8k_eval(dataset_id_or_path=data, split=split, data_columns=data_columns,
                                  system_prompt=system_prompt)
    if limit is not None:
        problems = problems[:limit]

    with ExitStack() as stack:
        if backend == "hf":
            tokenizer, generate = _hf_backend(model, torch_dtype, stack)
        else:
            tokenizer, llm = vllm_engine_for(model, torch_dtype, stack, seed=seed,
                                             kv_cache_memory_bytes=kv_cache_memory_bytes)

            def generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed):
                return generate_vllm(llm, tokenizer, texts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                     sampling=sampling, seed=seed)
        texts = render_prompts(tokenizer, problems)
        options = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        logger.info("Generating greedy completions for %d problems (%s backend)", len(problems), backend)
        greedy = generate(texts, num_samples=1, sampling=GREEDY, **options)
        sampled: list[list[str]] | None = None
        if k > 1:
            logger.info("Sampling %d completions per problem (%s) for pass@%d", num_samples, sampling.describe(), k)
            sampled = generate(texts, num_samples=num_samples, sampling=sampling, **options)

    predictions = []
    strict = 0
    pass_values = []
    for i, (problem, text) in enumerate(zip(problems, texts, strict=True)):
        completion = greedy[i][0]
        score, predicted = _grade(completion, problem["answer"])
        strict += score >= 2.0
        entry = {"question": problem["question"], "prompt": text, "completions": [completion],
                 "predicted": predicted, "answer": problem["answer"], "correct": score > 0, "score": score}
        if sampled is not None:
            sample_correct = [_grade(c, problem["answer"])[0] > 0 for c in sampled[i]]
            entry["completions"] += sampled[i]
            entry["samples_correct"] = sum(sample_correct)
            pass_values.append(pass_at_k(num_samples, sum(sample_correct), k))
        predictions.append(entry)

    n = len(predictions)
    results: dict[str, Any] = {
        "model": str(model), "data": str(data), "split": split, "n": n,
        "accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0,
        "strict_accuracy": strict / n if n else 0.0,
    }
    if sampled is not None:
        results.update(pass_at_k=sum(pass_values) / n if n else 0.0, k=k, num_samples=num_samples,
                       temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    results.update(backend=backend, max_new_tokens=max_new_tokens, system_prompt=system_prompt, seed=seed,
                   predictions=predictions)
    return results


# ----------------------------------------------------------------------------------------------------------- CLI


def _print_summary(results: dict, output: Path, out: Callable[[str], None] = print) -> None:
    line = f"accuracy {results['accuracy']:.4f} (strict, in <answer> tags: {results['strict_accuracy']:.4f})"
    if "pass_at_k" in results:
        sampled = Sampling(**{k: results[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in results})
        line += f", pass@{results['k']} {results['pass_at_k']:.4f} ({results['num_samples']} samples, " \
                f"{sampled.describe()})"
    out(f"{results['model']} on {results['data']} [{results['split']}], n={results['n']}: {line}")
    for p in results["predictions"][:3]:
        out(f"- question: {shorten(p['question'])}\n  completion: {shorten(p['completions'][0])}\n"
            f"  predicted: {p['predicted']!r}  answer: {p['answer']!r}  correct: {p['correct']}")
    out(f"results: {output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model dir / hub id / rlt: name, checkpoint, or LoRA adapter dir")
    parser.add_argument("--data", required=True, help="GSM8K-format data: dir, file, hub id or synthetic:arithmetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument("--system-prompt", default=None,
                        help=f"system prompt, as in training (default none); {REASONING_PROMPT_ALIAS} = the "
                             f"<reasoning>/<answer> format prompt; {STUDENT_PROMPT_ALIAS} = the RLT student prompt, "
                             f"{STUDENT_PROMPT_ALIAS}:FILE.jsonl = the one of a distilled file (rlt.distill)")
    parser.add_argument("--k", type=int, default=1, help="pass@k: with k > 1, also sample completions per problem")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per problem for pass@k (default k)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for pass@k")
    parser.add_argument("--top-p", type=float, default=1.0, help="pass@k sampling: nucleus filter (1.0 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="pass@k sampling: top-k filter (default off)")
    parser.add_argument("--min-p", type=float, default=None, help="pass@k sampling: min-p filter (default off)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DEFAULT_VLLM_KV_CACHE_BYTES,
                        help="vLLM on CPU: KV cache size")
    parser.add_argument("--output", default=None,
                        help="results JSON path (default results/eval/<model>__<data>__<split>.json)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, with a one-line error on stderr)."""
    args = parse_cli(build_parser(), argv)
    try:
        results = evaluate(model=args.model, data=args.data, split=args.split, limit=args.limit,
                           system_prompt=args.system_prompt, k=args.k, num_samples=args.num_samples,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                           max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, backend=args.backend, seed=args.seed, torch_dtype=args.dtype,
                           kv_cache_memory_bytes=args.kv_cache_memory_bytes)
        output = args.output or default_output_path(args.model, args.data, args.split)
        from rlt.checkpoints import write_json_atomic

        try:
            path = write_json_atomic(output, results)
        except OSError as e:
            raise ConfigError(f"cannot write the results to {output}: {e}") from e
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    _print_summary(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
