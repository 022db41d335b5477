"""Several models on the same problems, side by side: accuracy, completion length, perplexity of the reference.

    python -m rlt.compare rlt:tiny results/tiny_grpo --limit 20
    python -m rlt.compare results/run_a results/run_b/checkpoint-50 --data ../shared/data/gsm8k --samples 5
    python -m rlt.compare Qwen/Qwen2.5-1.5B-Instruct results/grpo_gsm8k --same-prompt --output-dir cmp

Each model is a run dir (its ``final/``), a ``checkpoint-N`` or a plain model (`rlt.run_info.locate`) and is asked
as its run trained (`rlt.evaluate.choose_prompt`: the run's system prompt, ``max_completion_length`` as
``--max-new-tokens``); a plain model has no run and is asked as the first run in the list (it is usually that run's
base model). ``--same-prompt`` gives every model the first model's system prompt, ``--system-prompt`` a given one.
The problems are the first ``--limit`` of ``--data`` / ``--split`` (default: the first run's data and eval split).

Per model, with greedy decoding and the HF backend: accuracy and strict accuracy by the training reward's grader,
mean completion length in tokens (end-of-sequence included), and the perplexity of the reference solution (the
dataset's worked answer, e.g. GSM8K's ``answer`` text, as the completion of the model's own prompt:
``exp(mean token NLL)`` over all reference tokens); then ``--samples`` problems with each model's completion. Printed,
and written as ``compare.md`` and ``compare.json`` to ``--output-dir`` (default ``<run_dir>/compare/`` of the first
model when it is from a run, where the run's report.html shows it; else ``results/compare/<models>/``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlt.cli import HelpFormatter, model_slug, parse_cli, shorten, slug
from rlt.errors import ConfigError, RltError
from rlt.evaluate import (
    DataChoice,
    PromptChoice,
    choose_data,
    choose_prompt,
    decode,
    grade_greedy,
    hf_generator,
    load_problems,
    log_followed,
    scores,
)
from rlt.generation.sampling import GREEDY, render_prompts
from rlt.run_info import Located, locate

logger = logging.getLogger(__name__)

COMPARE_DIR = "compare"  # <run_dir>/compare/compare.md, .json
DEFAULT_LIMIT = 50
DEFAULT_SAMPLES = 3
SAMPLE_WIDTH = 160  # characters of each completion shown side by side


# ------------------------------------------------------------------------------------------------- perplexity


def reference_nll(model, tokenizer, prompts: Sequence[str], references: Sequence[str], *,
                  batch_size: int = 4) -> list[tuple[float, int]]:
    """For each rendered prompt text and its reference completion: (the summed negative log-likelihood of the
    reference's tokens given the prompt, their number). Prompt and reference are tokenized apart (no special tokens
    added) and joined, so the reference's tokens are its own; batches are right-padded."""
    import torch

    pairs = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"])
             for p, r in zip(prompts, references, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, (p, r) in enumerate(batch):
                ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
                mask[i, :len(p) + len(r)] = 1
                labels[i, len(p):len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
            with torch.no_grad():
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            targets = labels[:, 1:].to(logits.device)
            valid = targets != -100
            nll = torch.zeros(targets.shape, device=logits.device)
            nll[valid] = torch.nn.functional.cross_entropy(logits[:, :-1][valid].float(), targets[valid],
                                                           reduction="none")
            out += [(float(nll[i].sum()), int(valid[i].sum())) for i in range(len(batch))]
    finally:
        model.train(was_training)
    return out


def perplexity(nlls: Sequence[tuple[float, int]]) -> tuple[float | None, float | None]:
    """(mean token NLL, its exp) over all tokens of `nlls` ((summed NLL, tokens) pairs); (None, None) without tokens.

    >>> perplexity([(2.0, 2), (4.0, 2)])   # 6 nats over 4 tokens
    (1.5, 4.4816890703380645)
    >>> perplexity([(0.0, 0)])
    (None, None)
    """
    tokens = sum(n for _, n in nlls)
    if not tokens:
        return None, None
    mean = math.fsum(s for s, _ in nlls) / tokens
    return mean, math.exp(mean)


def reference_solutions(choice: DataChoice) -> dict[str, str]:
    """The worked solution of each question of `choice` (the GSM8K ``answer`` column, mapped by `data_columns`),
    keyed by the stripped question text as `rlt.evaluate.load_problems` gives it."""
    from rlt.data.formats import DEFAULT_COLUMNS
    from rlt.data.loading import load_raw

    columns = {**DEFAULT_COLUMNS["gsm8k"], **(choice.data_columns or {})}
    ds = load_raw(choice.data, synthetic=choice.synthetic, seed=choice.seed, subset=choice.dataset_subset)
    split = ds[choice.split]
    return {q.strip(): a for q, a in zip(split[columns["question"]], split[columns["answer"]], strict=True)
            if isinstance(q, str) and isinstance(a, str) and a.strip()}


# ---------------------------------------------------------------------------------------------------- compare


def _prompted(problems: Sequence[dict], system_prompt: str | None) -> list[dict]:
    from rlt.data.formats import gsm8k_prompt

    return [{**p, "prompt": gsm8k_prompt(p["question"], system_prompt)} for p in problems]


def _labels(located: Sequence[Located]) -> list[str]:
    """Each model's `Located.label`, numbered where two are the same."""
    labels = [loc.label for loc in located]
    return [f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _prompts(located: Sequence[Located], *, system_prompt: str | None, same_prompt: bool,
             max_new_tokens: int | None) -> list[PromptChoice]:
    """How each model is asked: as its run trained; a plain model as the first run in the list; with
    `same_prompt`, every model with the first one's system prompt (or `system_prompt` when given)."""
    first_run = next((loc for loc in located if loc.has_run), None)

    def choose(loc: Located, system: str | None) -> PromptChoice:
        source = loc if loc.has_run or first_run is None else first_run
        chosen = choose_prompt(source, system_prompt=system, max_new_tokens=max_new_tokens)
        if source is not loc and chosen.notes:
            note = f"asked as run {first_run.label} (a plain model has no run of its own): "
            chosen = PromptChoice(chosen.system_prompt, chosen.max_new_tokens, (note + "; ".join(chosen.notes),))
        return chosen

    if same_prompt and system_prompt is None:
        system_prompt = choose(located[0], None).system_prompt or ""  # "" = no system prompt, for all
    return [choose(loc, system_prompt) for loc in located]


def _run_model(located: Located, problems: list[dict], prompt: PromptChoice, references: list[str | None], *,
               batch_size: int, torch_dtype: str, seed: int) -> dict[str, Any]:
    """One model's greedy completions, graded, and its reference perplexity."""
    import torch

    from rlt.models import load_eval_model

    model, tokenizer = load_eval_model(located.model_dir, torch_dtype=torch_dtype)
    try:
        texts = render_prompts(tokenizer, problems)
        ids = hf_generator(model, tokenizer)(texts, max_new_tokens=prompt.max_new_tokens, batch_size=batch_size,
                                             num_samples=1, sampling=GREEDY, seed=seed)
        entries = grade_greedy(problems, texts, [row[0] for row in decode(tokenizer, ids)],
                               [len(row[0]) for row in ids])
        have = [i for i, ref in enumerate(references) if ref is not None]
        nlls = reference_nll(model, tokenizer, [texts[i] for i in have], [references[i] for i in have],
                             batch_size=max(1, batch_size // 4))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    mean_nll, ppl = perplexity(nlls)
    return {**scores(entries), "reference_nll": mean_nll, "perplexity": ppl,
            "reference_tokens": sum(n for _, n in nlls),
            "completions": [{"prompt": e["prompt"], "completion": e["completions"][0], "predicted": e["predicted"],
                             "correct": e["correct"], "score": e["score"],
                             "completion_tokens": e["completion_tokens"]} for e in entries]}


def compare(models: Sequence[str], *, data: str | None = None, split: str | None = None,
            limit: int = DEFAULT_LIMIT, samples: int = DEFAULT_SAMPLES, system_prompt: str | None = None,
            same_prompt: bool = False, max_new_tokens: int | None = None, batch_size: int = 16,
            torch_dtype: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Run every model of `models` greedily on the same first `limit` problems and return the comparison (see the
    module doc; `render_markdown` / `render_text` show it). Raises `RltError` subclasses for bad options, models or
    data (models are all located before any is loaded)."""
    _check(models, limit=limit, samples=samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    located = [locate(m) for m in models]
    first_run = next((loc for loc in located if loc.has_run), None)
    choice = choose_data(first_run or located[0], data=data, split=split)
    prompts = _prompts(located, system_prompt=system_prompt, same_prompt=same_prompt, max_new_tokens=max_new_tokens)
    if first_run is not None:
        log_followed(first_run, choice.notes)
    problems = load_problems(choice, system_prompt=None, limit=limit)
    solutions = reference_solutions(choice)
    references = [solutions.get(p["question"]) for p in problems]

    results = []
    for loc, label, prompt in zip(located, _labels(located), prompts, strict=True):
        log_followed(loc, prompt.notes)
        logger.info("%s: %d problems, max_new_tokens %d", label, len(problems), prompt.max_new_tokens)
        scored = _run_model(loc, _prompted(problems, prompt.system_prompt), prompt, references,
                            batch_size=batch_size, torch_dtype=torch_dtype, seed=seed)
        results.append({"label": label, "model": loc.given, "model_dir": loc.model_dir,
                        "run_dir": str(loc.run_dir) if loc.has_run else None,
                        "system_prompt": prompt.system_prompt, "max_new_tokens": prompt.max_new_tokens,
                        "from_run": list(prompt.notes), **scored})
    return {"data": choice.data, "split": choice.split, "n": len(problems), "limit": limit,
            "same_prompt": same_prompt or system_prompt is not None, "samples": min(samples, len(problems)),
            "problems": [{"question": p["question"], "answer": p["answer"], "reference": ref}
                         for p, ref in zip(problems, references, strict=True)],
            "models": results}


def _check(models: Sequence[str], *, limit: int, samples: int, max_new_tokens: int | None, batch_size: int) -> None:
    problems = []
    if len(models) < 2:
        problems.append(f"compare needs at least two models, got {len(models)}")
    for name, value, low, optional in (("limit", limit, 1, False), ("samples", samples, 0, False),
                                       ("max_new_tokens", max_new_tokens, 1, True),
                                       ("batch_size", batch_size, 1, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def default_output_dir(models: Sequence[str]) -> Path:
    """``<run_dir>/compare`` of the first model when it is from a run (its report shows it), else
    ``results/compare/<model>_vs_<model>...`` (`rlt.cli.model_slug` names, cut to 100 characters)."""
    first = locate(models[0])
    if first.has_run:
        return first.run_dir / COMPARE_DIR
    return Path("results") / COMPARE_DIR / slug("_vs_".join(model_slug(m) for m in models), 100)


# ------------------------------------------------------------------------------------------------------ output


TABLE_HEADER = ("model", "system prompt", "max new", "accuracy", "strict", "mean tokens", "ref ppl")


def table_rows(results: dict) -> list[list[str]]:
    """One row of `TABLE_HEADER` cells per model."""
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    return [[m["label"], shorten(m["system_prompt"], 40) if m["system_prompt"] else "(none)",
             str(m["max_new_tokens"]), number(m["accuracy"], ".3f"), number(m["strict_accuracy"], ".3f"),
             number(m["mean_completion_tokens"], ".1f"), number(m["perplexity"], ".2f")] for m in results["models"]]


def _sample_lines(results: dict, quote: Callable[[str], str]) -> list[tuple[int, dict, list[tuple[str, str]]]]:
    out = []
    for i, problem in enumerate(results["problems"][:results["samples"]]):
        per_model = []
        for m in results["models"]:
            c = m["completions"][i]
            mark = "correct" if c["correct"] else f"wrong (predicted {c['predicted']!r})"
            text = shorten(c["completion"], SAMPLE_WIDTH)
            per_model.append((f"{m['label']}: {mark}, {c['completion_tokens']} tokens",
                              quote(text) if text else "(empty)"))
        out.append((i + 1, problem, per_model))
    return out


def _heading(results: dict) -> str:
    return (f"{len(results['models'])} models on {results['data']} [{results['split']}], the first {results['n']} "
            f"problems, greedy; " + ("one system prompt for all" if results["same_prompt"] else
                                     "each model asked as its run trained"))


def render_text(results: dict) -> str:
    """The comparison as printed: an aligned table, then the samples."""
    rows = [list(TABLE_HEADER), *table_rows(results)]
    widths = [max(len(row[j]) for row in rows) for j in range(len(TABLE_HEADER))]
    lines = [_heading(results), ""]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w)
                               for j, (cell, w) in enumerate(zip(row, widths, strict=True))))
    for number, problem, per_model in _sample_lines(results, lambda s: s):
        lines += ["", f"[{number}] {shorten(problem['question'], 300)}", f"    answer: {problem['answer']}"]
        for head, completion in per_model:
            lines += [f"    {head}", f"      {completion}"]
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """The comparison as compare.md: the table, the models' prompts and dirs, the samples."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def code(text: str) -> str:
        return "`" + text.replace("`", "'") + "`"

    lines = ["# Model comparison", "", _heading(results) + ".", "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(results)]
    lines += ["", "accuracy: any credit from the training reward's grader; strict: the answer inside <answer> tags; "
              "mean tokens: generated, end-of-sequence included; ref ppl: perplexity of the reference solution "
              "given the model's prompt.", "", "## Models", ""]
    for m in results["models"]:
        lines.append(f"- **{m['label']}**: `{m['model_dir']}`" + (f" ({'; '.join(m['from_run'])})"
                                                                   if m["from_run"] else ""))
    if results["samples"]:
        lines += ["", "## Samples"]
    for number, problem, per_model in _sample_lines(results, code):
        lines += ["", f"### {number}. {shorten(problem['question'], 300)}", "", f"answer: **{problem['answer']}**",
                  ""]
        lines += [f"- {head}: {completion}" for head, completion in per_model]
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """compare.md and compare.json in `output_dir`. Raises `ConfigError` when they cannot be written."""
    from rlt.checkpoints import atomic_write_text, write_json_atomic

    out = Path(output_dir)
    try:
        return (atomic_write_text(out / "compare.md", render_markdown(results)),
                write_json_atomic(out / "compare.json", results))
    except OSError as e:
        raise ConfigError(f"cannot write the comparison to {out}: {e}") from e


# --------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="two or more: run dirs (their final/), checkpoint-N dirs, model dirs, hub ids, rlt: "
                             "names")
    parser.add_argument("--data", default=None, help="GSM8K-format data (default: the first run's)")
    parser.add_argument("--split", default=None, help="default: the first run's eval_split, else test")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="the first N problems of the split")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="problems shown with every model's completion")
    parser.add_argument("--same-prompt", action="store_true",
                        help="ask every model with the first model's system prompt (default: each as its run trained)")
    parser.add_argument("--system-prompt", default=None,
                        help="ask every model with this system prompt ('' = none; @reasoning, @student as in "
                             "rlt.evaluate)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="for every model (default: each run's max_completion_length, else 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--output-dir", default=None,
                        help="where compare.md / compare.json go (default <run_dir>/compare/ of the first model "
                             "when it is from a run, else results/compare/<models>/)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, with a one-line error on stderr)."""
    args = parse_cli(build_parser(), argv)
    try:
        results = compare(args.models, data=args.data, split=args.split, limit=args.limit, samples=args.samples,
                          system_prompt=args.system_prompt, same_prompt=args.same_prompt,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, torch_dtype=args.dtype,
                          seed=args.seed)
        md, js = write_results(results, args.output_dir or default_output_dir(args.models))
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(render_text(results))
    print(f"\nwritten: {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
