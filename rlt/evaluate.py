"""GSM8K-style evaluation: greedy accuracy (pass@1) and sampled pass@k, with an HF or vLLM generation backend.

    python -m rlt.evaluate results/tiny_grpo                     # follows the run: its data, prompt, length
    python -m rlt.evaluate results/demo/final --data ../shared/data/gsm8k --limit 200
    python -m rlt.evaluate --model rlt:tiny --data synthetic:arithmetic --k 8 --temperature 0.7
    python -m rlt.evaluate results/lora_run/checkpoint-50 --backend vllm

A run dir, its ``final/`` or a ``checkpoint-N`` (`rlt.run_info.locate`) is evaluated as it trained: the run's system
prompt, its ``max_completion_length`` as ``--max-new-tokens``, its data and eval split (flags override each); results
go to ``<run_dir>/eval/<data>_<split>.json`` and, when the run logged to wandb, into its wandb run as
``eval/<data>_<split>/accuracy`` and so on. What is measured and how is in docs/grpo.md (Evaluation). Here: grading
(`gsm8k_accuracy`, used by the SFT recipe; `pass_at_k`), what follows the run (`choose_data`, `choose_prompt`), the
pieces `rlt.compare` shares (`load_problems`, `hf_generator`, `decode`, `grade_greedy`, `scores`), the run
(`evaluate`, the whole run as a dict) and its CLI (`main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlt.cli import HelpFormatter, data_slug, model_slug, parse_cli, shorten, slug
from rlt.errors import ConfigError, RltError
from rlt.generation.sampling import (
    BACKENDS,
    DEFAULT_VLLM_KV_CACHE_BYTES,
    GREEDY,
    Sampling,
    generate_hf,
    generate_hf_ids,
    generate_vllm_ids,
    render_prompts,
    vllm_engine_for,
)
from rlt.run_info import FINAL_DIR, Located, locate

logger = logging.getLogger(__name__)

REASONING_PROMPT_ALIAS = "@reasoning"  # --system-prompt @reasoning = rlt.data.formats.REASONING_SYSTEM_PROMPT
STUDENT_PROMPT_ALIAS = "@student"  # the RLT student prompt: @student (stratos) or @student:<distilled .jsonl>
DEFAULT_MAX_NEW_TOKENS = 256  # a model without a run (or an SFT run) to take the completion length from
DEFAULT_SPLIT = "test"
EVAL_DIR = "eval"  # <run_dir>/eval/<data>_<split>.json
GSM8K_LIKE_FORMATS = ("gsm8k", "teacher")  # run data formats whose rows have a question and a '#### n' answer


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


def grade_greedy(problems: Sequence[dict], texts: Sequence[str], completions: Sequence[str],
                 lengths: Sequence[int]) -> list[dict]:
    """One entry per problem for its greedy completion, graded by the training reward's checker: ``score`` 2 =
    correct inside ``<answer>`` tags (strict), 1 = correct elsewhere (after ``####``, the last number), 0 = wrong;
    ``correct`` = any credit; ``completion_tokens`` = generated tokens, end-of-sequence included."""
    entries = []
    for problem, text, completion, length in zip(problems, texts, completions, lengths, strict=True):
        score, predicted = _grade(completion, problem["answer"])
        entries.append({"question": problem["question"], "prompt": text, "completions": [completion],
                        "predicted": predicted, "answer": problem["answer"], "correct": score > 0, "score": score,
                        "completion_tokens": length})
    return entries


def scores(entries: Sequence[dict]) -> dict[str, Any]:
    """``n``, ``accuracy`` (any credit), ``strict_accuracy`` (score 2: in the tags) and ``mean_completion_tokens``
    of `grade_greedy` entries.

    >>> scores([{"correct": True, "score": 2.0, "completion_tokens": 10},
    ...         {"correct": True, "score": 1.0, "completion_tokens": 4},
    ...         {"correct": False, "score": 0.0, "completion_tokens": 16}])
    {'n': 3, 'accuracy': 0.6666666666666666, 'strict_accuracy': 0.3333333333333333, 'mean_completion_tokens': 10.0}
    """
    n = len(entries)
    return {"n": n, "accuracy": sum(e["correct"] for e in entries) / n if n else 0.0,
            "strict_accuracy": sum(e["score"] >= 2.0 for e in entries) / n if n else 0.0,
            "mean_completion_tokens": sum(e["completion_tokens"] for e in entries) / n if n else 0.0}


# ------------------------------------------------------------------------------------------- following the run


@dataclass(frozen=True)
class DataChoice:
    """The problems to evaluate on: `data` / `split` and how to read them (`data_columns`, and for the run's own
    data its `dataset_subset`, `synthetic` parameters and `seed`); `notes` say what came from the run."""

    data: str
    split: str
    data_columns: dict[str, str] | None = None
    dataset_subset: str | None = None
    synthetic: dict[str, Any] | None = None
    seed: int = 42
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptChoice:
    """How a model is asked: its `system_prompt` (None: no system turn) and `max_new_tokens`; `notes` say what came
    from the run."""

    system_prompt: str | None
    max_new_tokens: int
    notes: tuple[str, ...] = field(default=())


def choose_data(located: Located, *, data: str | None = None, split: str | None = None,
                data_columns: dict[str, str] | None = None) -> DataChoice:
    """The data `located` is evaluated on: `data` / `split` when given, else the run's ``dataset_id_or_path`` and
    ``eval_split`` (``test`` when the run had none). The run's own data is read as the run read it (its
    ``data_columns`` for GSM8K-format data, ``dataset_subset``, ``synthetic`` parameters and seed). Raises
    `ConfigError` when there is no data to take: a plain model without `data`, a run whose data is not GSM8K-format.
    """
    run_data = located.get("dataset_id_or_path") if located.has_run else None
    notes = []
    if data is None:
        if run_data is None:
            raise ConfigError(f"--data is required: {located.given} is not a run dir (no config.yaml to take the "
                              "data from)")
        if located.get("data_format") not in GSM8K_LIKE_FORMATS:
            raise ConfigError(f"--data is required: run {located.run_dir} trained on "
                              f"{located.get('data_format')}-format data ({run_data}), not GSM8K-format problems")
        data = str(run_data)
        notes.append(f"data {data} (dataset_id_or_path)")
    same = run_data is not None and str(data) == str(run_data)
    if split is None:
        split = (located.get("eval_split") if same else None) or DEFAULT_SPLIT
        if same:
            notes.append(f"split {split}" + (" (eval_split)" if located.get("eval_split") else
                                              " (the run had no eval_split)"))
    if not same:
        return DataChoice(data=str(data), split=split, data_columns=data_columns, notes=tuple(notes))
    seed = located.get("seed")
    columns = data_columns
    if columns is None and located.get("data_format") == "gsm8k" and located.get("data_columns"):
        columns = dict(located.get("data_columns"))
        notes.append(f"data_columns {columns}")
    return DataChoice(data=str(data), split=split, data_columns=columns, dataset_subset=located.get("dataset_subset"),
                      synthetic=located.get("synthetic") or None, seed=42 if seed is None else int(seed),
                      notes=tuple(notes))


def run_system_prompt(located: Located) -> tuple[str | None, str | None]:
    """The system prompt `located` was trained with, and a note saying where it came from (None without a run).

    An RLT teacher run trained on teacher prompts (question + solution): no evaluation prompt, so none. A run on
    distilled data (``data_format: messages`` from a ``.jsonl``) has its student prompt in the data: the system turn
    of its first row. Otherwise the run's ``system_prompt``.
    """
    if not located.has_run:
        return None, None
    if located.algorithm == "rlt":
        return None, ("no system prompt: an RLT teacher's training prompt (question + solution) is not an evaluation "
                      "prompt (pass --system-prompt, e.g. @student, to set one)")
    dataset = str(located.get("dataset_id_or_path") or "")
    if located.get("data_format") == "messages" and dataset.endswith(".jsonl") and Path(dataset).is_file():
        try:
            return resolve_system_prompt(f"{STUDENT_PROMPT_ALIAS}:{dataset}"), f"system prompt of {dataset}"
        except ConfigError:
            pass
    prompt = located.system_prompt
    return prompt, (f"system prompt {shorten(prompt, 60)!r} (system_prompt)" if prompt else
                    "no system prompt (the run had none)")


def choose_prompt(located: Located, *, system_prompt: str | None = None,
                  max_new_tokens: int | None = None) -> PromptChoice:
    """How `located` is asked: `system_prompt` (resolved: `resolve_system_prompt`; ``""`` = none) and
    `max_new_tokens` when given, else as its run trained (`run_system_prompt`; ``max_completion_length``), else
    no system prompt and `DEFAULT_MAX_NEW_TOKENS`."""
    notes = []
    if system_prompt is None:
        system_prompt, note = run_system_prompt(located)
        notes += [note] if note else []
    else:
        system_prompt = resolve_system_prompt(system_prompt)
    if max_new_tokens is None:
        max_new_tokens = located.max_new_tokens if located.has_run else None
        if max_new_tokens is not None:
            notes.append(f"max_new_tokens {max_new_tokens} (max_completion_length)")
        else:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    return PromptChoice(system_prompt=system_prompt or None, max_new_tokens=max_new_tokens, notes=tuple(notes))


def log_followed(located: Located, notes: Sequence[str]) -> None:
    if located.has_run:
        logger.info("Following run %s (%s, algorithm %s): %s; flags override these", located.run_dir,
                    located.label, located.algorithm, "; ".join(notes) if notes else "nothing taken from it")


def load_problems(choice: DataChoice, *, system_prompt: str | None, limit: int | None = None) -> list[dict]:
    """The first `limit` GSM8K-format problems of `choice` (file order), prompted with `system_prompt`:
    ``[{"prompt": chat messages, "answer": final answer, "question": text}, ...]``. Raises `DataError`."""
    from rlt.data.loading import prepare_gsm8k_eval

    problems = prepare_gsm8k_eval(dataset_id_or_path=choice.data, dataset_subset=choice.dataset_subset,
                                  split=choice.split, data_columns=choice.data_columns, system_prompt=system_prompt,
                                  synthetic=choice.synthetic, seed=choice.seed)
    return problems[:limit] if limit is not None else problems


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


Generate = Callable[..., list[list[list[int]]]]  # (texts, *, max_new_tokens, batch_size, num_samples, sampling, seed)


def hf_generator(model, tokenizer) -> Generate:
    """`generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed)` -> the token ids of
    `num_samples` completions per prompt text, with ``model.generate`` (`generate_hf_ids`)."""
    def generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed):
        return generate_hf_ids(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               num_samples=num_samples, sampling=sampling, seed=seed)

    return generate


def decode(tokenizer, ids: Sequence[Sequence[Sequence[int]]]) -> list[list[str]]:
    """The text of each completion's token ids (special tokens left out), as the ids are nested."""
    return [tokenizer.batch_decode(row, skip_special_tokens=True) for row in ids]


def _hf_backend(model: str, torch_dtype: str, stack: ExitStack):
    from rlt.models import load_eval_model

    loaded, tokenizer = load_eval_model(model, torch_dtype=torch_dtype)
    return tokenizer, hf_generator(loaded, tokenizer)


def _vllm_backend(model: str, torch_dtype: str, stack: ExitStack, *, seed: int, kv_cache_memory_bytes: int):
    tokenizer, llm = vllm_engine_for(model, torch_dtype, stack, seed=seed, kv_cache_memory_bytes=kv_cache_memory_bytes)

    def generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed):
        return generate_vllm_ids(llm, tokenizer, texts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                 sampling=sampling, seed=seed)

    return tokenizer, generate


def evaluate(*, model: str, data: str | None = None, split: str | None = None, limit: int | None = None,
             system_prompt: str | None = None, k: int = 1, num_samples: int | None = None, temperature: float = 0.7,
             top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None,
             max_new_tokens: int | None = None, batch_size: int = 16, backend: str = "hf", seed: int = 0,
             torch_dtype: str = "auto", data_columns: dict[str, str] | None = None,
             kv_cache_memory_bytes: int = DEFAULT_VLLM_KV_CACHE_BYTES) -> dict:
    """Evaluate `model` on the GSM8K-format `split` of `data` and return the results dict (see `main`).

    `model` is a run dir, its ``final/`` or ``checkpoint-N``, or a plain model (`rlt.run_info.locate`); for a run,
    `data`, `split`, `system_prompt` and `max_new_tokens` left None follow it (`choose_data`, `choose_prompt`),
    else they are required (`data`) or default (split ``test``, no system prompt, 256 tokens).

    Greedy decoding gives ``accuracy`` (pass@1) and ``strict_accuracy`` (answer inside ``<answer>`` tags). With
    ``k > 1``, `num_samples` (default k) completions per problem are also sampled at `temperature` (after the
    `top_p` / `top_k` / `min_p` filters, off by default), and
    ``pass_at_k`` is the mean of `pass_at_k(num_samples, correct, k)` over problems. `limit` keeps the first N
    problems of the split, in file order. Raises `RltError` subclasses for bad options, data or models.
    """
    located = locate(model)
    choice = choose_data(located, data=data, split=split, data_columns=data_columns)
    prompt = choose_prompt(located, system_prompt=system_prompt, max_new_tokens=max_new_tokens)
    num_samples = k if num_samples is None else num_samples
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    _check_options(split=choice.split, limit=limit, k=k, num_samples=num_samples, sampling=sampling,
                   max_new_tokens=prompt.max_new_tokens, batch_size=batch_size, backend=backend)
    log_followed(located, [*choice.notes, *prompt.notes])
    problems = load_problems(choice, system_prompt=prompt.system_prompt, limit=limit)

    with ExitStack() as stack:
        if backend == "hf":
            tokenizer, generate = _hf_backend(located.model_dir, torch_dtype, stack)
        else:
            tokenizer, generate = _vllm_backend(located.model_dir, torch_dtype, stack, seed=seed,
                                                kv_cache_memory_bytes=kv_cache_memory_bytes)
        texts = render_prompts(tokenizer, problems)
        options = dict(max_new_tokens=prompt.max_new_tokens, batch_size=batch_size, seed=seed)
        logger.info("Generating greedy completions for %d problems (%s backend)", len(problems), backend)
        greedy_ids = generate(texts, num_samples=1, sampling=GREEDY, **options)
        sampled: list[list[str]] | None = None
        if k > 1:
            logger.info("Sampling %d completions per problem (%s) for pass@%d", num_samples, sampling.describe(), k)
            sampled = decode(tokenizer, generate(texts, num_samples=num_samples, sampling=sampling, **options))
        greedy = [row[0] for row in decode(tokenizer, greedy_ids)]

    predictions = grade_greedy(problems, texts, greedy, [len(row[0]) for row in greedy_ids])
    pass_values = []
    for entry, samples in zip(predictions, sampled or [], strict=False):
        sample_correct = [_grade(c, entry["answer"])[0] > 0 for c in samples]
        entry["completions"] += samples
        entry["samples_correct"] = sum(sample_correct)
        pass_values.append(pass_at_k(num_samples, sum(sample_correct), k))

    summary = scores(predictions)
    n = summary["n"]
    results: dict[str, Any] = {"model": str(model), "data": choice.data, "split": choice.split, "n": n,
                               "accuracy": summary["accuracy"], "strict_accuracy": summary["strict_accuracy"]}
    if sampled is not None:
        results.update(pass_at_k=sum(pass_values) / n if n else 0.0, k=k, num_samples=num_samples,
                       temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    results.update(mean_completion_tokens=summary["mean_completion_tokens"], backend=backend,
                   max_new_tokens=prompt.max_new_tokens, system_prompt=prompt.system_prompt, seed=seed,
                   model_dir=located.model_dir, run_dir=str(located.run_dir) if located.has_run else None,
                   from_run=[*choice.notes, *prompt.notes], predictions=predictions)
    return results


# -------------------------------------------------------------------------------------------- where results go


def results_name(data: str, split: str) -> str:
    """``<data>_<split>``: the results file's stem in a run dir and the wandb metric prefix.

    >>> results_name("../shared/data/gsm8k", "test"), results_name("synthetic:arithmetic", "test")
    ('gsm8k_test', 'synthetic-arithmetic_test')
    """
    return f"{data_slug(data)}_{slug(split, 30)}"


def default_results_path(located: Located, data: str, split: str) -> Path:
    """``<run_dir>/eval/<data>_<split>.json`` for a run's ``final/`` (``..._checkpoint-N.json`` for a checkpoint);
    ``results/eval/<model>__<data>_<split>.json`` for a plain model (short readable names: `rlt.cli.model_slug`)."""
    name = results_name(data, split)
    if located.has_run:
        model_part = Path(located.model_dir).name
        return located.run_dir / EVAL_DIR / (name + ("" if model_part == FINAL_DIR else f"_{model_part}") + ".json")
    return Path("results") / EVAL_DIR / f"{model_slug(located.given)}__{name}.json"


def model_step(located: Located) -> int | None:
    """The training step of the evaluated model: N of ``checkpoint-N``; for ``final/``, the run's ``global_step``
    (summary.json); None when unknown or without a run."""
    if not located.has_run:
        return None
    name = Path(located.model_dir).name
    if name.startswith("checkpoint-") and name.removeprefix("checkpoint-").isdigit():
        return int(name.removeprefix("checkpoint-"))
    try:
        step = json.loads((located.run_dir / "summary.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def wandb_metrics(results: dict) -> dict[str, float]:
    """The results as wandb metrics: ``eval/<data>_<split>/<metric>`` (`results_name`).

    >>> wandb_metrics({"data": "synthetic:arithmetic", "split": "test", "n": 4, "accuracy": 0.5,
    ...                "strict_accuracy": 0.25, "mean_completion_tokens": 12.0})  # doctest: +NORMALIZE_WHITESPACE
    {'eval/synthetic-arithmetic_test/accuracy': 0.5, 'eval/synthetic-arithmetic_test/strict_accuracy': 0.25,
     'eval/synthetic-arithmetic_test/mean_completion_tokens': 12.0, 'eval/synthetic-arithmetic_test/n': 4}
    """
    prefix = f"eval/{results_name(results['data'], results['split'])}"
    metrics = {f"{prefix}/{key}": results[key] for key in ("accuracy", "strict_accuracy", "mean_completion_tokens",
                                                           "n") if key in results}
    if "pass_at_k" in results:
        metrics[f"{prefix}/pass@{results['k']}"] = results["pass_at_k"]
    return metrics


def log_to_wandb(results: dict) -> str | None:
    """Log `results` into the wandb run of the evaluated model's run, when it logged to one
    (`rlt.tracking.log_to_existing_run`); the wandb run id, or None."""
    located = locate(results["model"])
    if not located.has_run:
        return None
    from rlt.tracking import log_to_existing_run

    return log_to_existing_run(located.run_dir, wandb_metrics(results), config=located.config,
                               step=model_step(located))


# ----------------------------------------------------------------------------------------------------------- CLI


def _print_summary(results: dict, output: Path, out: Callable[[str], None] = print) -> None:
    line = f"accuracy {results['accuracy']:.4f} (strict, in <answer> tags: {results['strict_accuracy']:.4f})"
    if "pass_at_k" in results:
        sampled = Sampling(**{k: results[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in results})
        line += f", pass@{results['k']} {results['pass_at_k']:.4f} ({results['num_samples']} samples, " \
                f"{sampled.describe()})"
    line += f", mean completion {results['mean_completion_tokens']:.1f} of {results['max_new_tokens']} tokens"
    out(f"{results['model']} on {results['data']} [{results['split']}], n={results['n']}: {line}")
    for p in results["predictions"][:3]:
        out(f"- question: {shorten(p['question'])}\n  completion: {shorten(p['completions'][0])}\n"
            f"  predicted: {p['predicted']!r}  answer: {p['answer']!r}  correct: {p['correct']}")
    out(f"results: {output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", default=None,
                        help="what to evaluate (or --model): a run dir (its final/), checkpoint-N, model dir, hub id, "
                             "rlt: name or LoRA adapter dir")
    parser.add_argument("--model", default=None, help="the same as MODEL")
    parser.add_argument("--data", default=None,
                        help="GSM8K-format data: dir, file, hub id or synthetic:arithmetic (default: the run's)")
    parser.add_argument("--split", default=None, help=f"default: the run's eval_split, else {DEFAULT_SPLIT}")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument("--system-prompt", default=None,
                        help=f"system prompt (default: the run's, else none; '' = none); {REASONING_PROMPT_ALIAS} = "
                             f"the <reasoning>/<answer> format prompt; {STUDENT_PROMPT_ALIAS} = the RLT student "
                             f"prompt, {STUDENT_PROMPT_ALIAS}:FILE.jsonl = the one of a distilled file (rlt.distill)")
    parser.add_argument("--k", type=int, default=1, help="pass@k: with k > 1, also sample completions per problem")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per problem for pass@k (default k)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for pass@k")
    parser.add_argument("--top-p", type=float, default=1.0, help="pass@k sampling: nucleus filter (1.0 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="pass@k sampling: top-k filter (default off)")
    parser.add_argument("--min-p", type=float, default=None, help="pass@k sampling: min-p filter (default off)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: the run's max_completion_length, else {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DEFAULT_VLLM_KV_CACHE_BYTES,
                        help="vLLM on CPU: KV cache size")
    parser.add_argument("--output", default=None,
                        help="results JSON path (default <run_dir>/eval/<data>_<split>.json for a run, "
                             "results/eval/<model>__<data>_<split>.json for a plain model)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_cli(parser, argv)
    if args.model_arg and args.model and args.model_arg != args.model:
        parser.error(f"two models given ({args.model_arg} and --model {args.model}): evaluate one at a time")
    args.model = args.model or args.model_arg
    if not args.model:
        parser.error("the model to evaluate is required: python -m rlt.evaluate MODEL (or --model MODEL)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, with a one-line error on stderr)."""
    args = _parse(argv)
    try:
        results = evaluate(model=args.model, data=args.data, split=args.split, limit=args.limit,
                           system_prompt=args.system_prompt, k=args.k, num_samples=args.num_samples,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                           max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, backend=args.backend, seed=args.seed, torch_dtype=args.dtype,
                           kv_cache_memory_bytes=args.kv_cache_memory_bytes)
        output = args.output or default_results_path(locate(args.model), results["data"], results["split"])
        from rlt.checkpoints import write_json_atomic

        try:
            path = write_json_atomic(output, results)
        except OSError as e:
            raise ConfigError(f"cannot write the results to {output}: {e}") from e
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    log_to_wandb(results)
    _print_summary(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
