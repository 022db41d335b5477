"""Distillation data from an RLT teacher: its explanations of (question, solution) rows, as a student's SFT data.

    python -m rlt.distill --teacher results/teacher_rlt_tiny/final --limit 200
    python -m rlt.distill --teacher results/teacher_rlt/final --num-samples 4 --backend vllm     # best of 4
    python -m rlt.distill --teacher rlt:tiny --run-cfg teacher_rlt_tiny dataset_id_or_path=data.jsonl
    ./launch_mono.sh student_sft_tiny.yaml dataset_id_or_path=results/distill/<file>.jsonl      # then train a student

Everything that shapes the data (dataset, tags and prompts, sampling, the reward and its student) comes from the
teacher's run config, ``key=value`` arguments override it; each row's best closed explanation by the run's reward is
kept; output, resume and errors: docs/rlt.md "Distillation data".
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from rlt.errors import ConfigError, RltError
from rlt.generation.sampling import BACKENDS, DEFAULT_VLLM_KV_CACHE_BYTES

logger = logging.getLogger(__name__)

SELECTIONS = ("best", "first")


# ------------------------------------------------------------------------------------------------- pure helpers


class Explanation(NamedTuple):
    text: str  # between the explanation tags, with the leading padding the prompt ended with (rlt-spec §1.5)
    closed: bool  # the close tag was generated
    blank: bool  # nothing but whitespace


def parse_explanation(completion: str, fmt) -> Explanation:
    """The explanation a teacher completion holds: the prompt ended with ``explanation_open + padding``, so the
    explanation is that padding + the completion up to the first close tag (everything after it is dropped).

    Example (stratos, padding ``"\\n\\n"``): ``"Add 2 and 2.\\n\\n<|end_of_explanation|><|im_end|>"`` ->
    ``Explanation("\\n\\nAdd 2 and 2.\\n\\n", closed=True, blank=False)``; ``"Add"`` (stopped at the length limit)
    -> ``("\\n\\nAdd", False, False)``; ``"  <|end_of_explanation|>"`` -> ``("\\n\\n  ", True, True)``.
    """
    body, found, _ = completion.partition(fmt.explanation_close)
    return Explanation(fmt.delimiters_padding + body, bool(found), not body.strip())


def pick_sample(explanations: Sequence[Explanation], rewards: Sequence[float | None], *, select: str = "best",
                keep_unclosed: bool = False) -> int | None:
    """Index of the sample to keep, or None. Candidates: the closed, non-blank explanations (or, with
    `keep_unclosed` and none of those, the non-blank ones). ``best``: the highest finite reward among them (ties
    and missing rewards: the earliest); ``first``: the earliest.

    Example: closed = [False, True, True], rewards = [9.0, -2.0, -1.5] -> 2 (sample 0 scores higher but never closed
    its explanation); closed = [False, False] -> None, or with keep_unclosed the better of the two.
    """
    candidates = [i for i, e in enumerate(explanations) if e.closed and not e.blank]
    if not candidates and keep_unclosed:
        candidates = [i for i, e in enumerate(explanations) if not e.blank]
    if not candidates:
        return None
    if select == "first":
        return candidates[0]
    scored = [i for i in candidates if rewards[i] is not None and math.isfinite(rewards[i])]
    return max(scored, key=lambda i: (rewards[i], -i)) if scored else candidates[0]


def find_run_config(teacher: str) -> Path | None:
    """The run config of a trained teacher: ``config.yaml`` in the teacher dir (a run dir) or its parent (for
    ``results/<run>/final`` and ``results/<run>/checkpoint-N``); None for a base model."""
    path = Path(teacher).expanduser()
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def teacher_model_dir(teacher: str) -> str:
    """A run dir given as the teacher means its ``final/`` model."""
    path = Path(teacher).expanduser()
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        return str(path / "final")
    return teacher


def default_output_path(teacher: str, data: str, split: str) -> Path:
    """``results/distill/<teacher>__<data>__<split>.jsonl``, every name flattened to ``[A-Za-z0-9._-]``."""
    from rlt.cli import default_output_path as cli_output_path

    return cli_output_path(teacher, data, split, kind="distill", suffix=".jsonl")


# ------------------------------------------------------------------------------------------------------ config


def load_run_config(teacher: str, *, run_cfg: str | None = None, overrides: Sequence[str] = ()):
    """The teacher's `RLTRunConfig`: its saved run config (or, with `run_cfg`, ``cfgs/run_cfg/<run_cfg>``) with the
    ``key=value`` `overrides`, validated like a training run's. Raises `ConfigError`."""
    from omegaconf import OmegaConf

    from rlt.config import validate

    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ConfigError(f"expected key=value overrides, got {bad}")
    if run_cfg is not None:
        from rlt.compose import compose

        run = compose(run_cfg, overrides)  # as `python -m rlt.train run_cfg=... overrides` would
        source = f"run_cfg={run_cfg}"
    else:
        path = find_run_config(teacher)
        if path is None:
            raise ConfigError(f"--teacher {teacher} has no run config (no config.yaml in it or its parent): it is not "
                              "the output of an RLT run. Give the config to take the data, tags and reward from, "
                              "e.g. --run-cfg teacher_rlt_tiny")
        cfg = OmegaConf.load(path)
        try:
            cfg.merge_with(OmegaConf.from_dotlist(list(overrides)))
        except Exception as e:  # noqa: BLE001 - omegaconf parse errors of an override
            raise ConfigError(f"cannot apply the overrides {list(overrides)}: {str(e).splitlines()[0]}") from None
        source = str(path)
        run = validate(cfg)
    if run.algorithm != "rlt":
        raise ConfigError(f"{source} is an algorithm={run.algorithm} run: distillation needs an RLT teacher's config "
                          "(trainer_cfg=teacher_grpo), e.g. --run-cfg teacher_rlt_tiny")
    return run


def _check_options(*, limit, num_samples, max_student_tokens, batch_size, max_new_tokens, temperature, select, backend,
                   score, chunk_rows) -> None:
    problems = []
    for name, value in (("limit", limit), ("num_samples", num_samples), ("max_student_tokens", max_student_tokens),
                        ("batch_size", batch_size), ("chunk_rows", chunk_rows),
                        ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{name} must be an integer >= 1, got {value!r}")
    if temperature is not None and not (isinstance(temperature, int | float) and temperature >= 0):
        problems.append(f"temperature must be a number >= 0, got {temperature!r}")
    if num_samples > 1 and temperature is not None and temperature == 0:
        problems.append(f"num_samples={num_samples} needs temperature > 0 (greedy decoding gives one sample)")
    if select not in SELECTIONS:
        problems.append(f"select must be one of {list(SELECTIONS)}, got {select!r}")
    if select == "best" and num_samples > 1 and not score:
        problems.append("select=best among several samples needs the teacher reward (drop --no-score, or "
                        "use --select first)")
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if problems:
        raise ConfigError("; ".join(problems))


# ------------------------------------------------------------------------------------------------------ phases


def reuses_sampling_logprobs(run, sampling, backend: str) -> bool:
    """Whether the teacher's sampling log-probs can stand in for the reward's teacher forward, as in the run's
    training (`rlt.recipes.rlt`): reuse on, the teacher scored by itself (not the reference), plain tempered
    sampling, and with vLLM an explicit ``torch_dtype`` (with ``auto`` vLLM picks its own: bfloat16 on CPU, where
    the scoring model loads the checkpoint's float32). The reward still checks each row (temperature, missing
    values) and scores the others by a forward."""
    return bool(run.teacher_reuse_sampling_logprobs and not run.use_reference_teacher_model and sampling.plain
                and not (backend == "vllm" and run.torch_dtype == "auto"))


class _Samples(NamedTuple):
    tokenizer: object
    ids: list[list[list[int]]]  # per prompt, per sample: the sampled token ids
    logprobs: list[list[list[float] | None]] | None  # the same shape: their sampling log-probs, or None
    model: object  # the HF teacher that sampled, kept for scoring (`keep_model`), else None


def _generate(teacher: str, run, prompts: list[str], *, backend: str, num_samples: int, temperature: float,
              max_new_tokens: int, batch_size: int, seed: int, kv_cache_memory_bytes: int, keep_model: bool = False,
              logprobs: bool = False) -> _Samples:
    """Sample `num_samples` completions per prompt (with their sampling log-probs when `logprobs`). The vLLM engine
    is freed before returning; the HF model too, unless `keep_model` (scoring comes next and needs the same
    teacher)."""
    from rlt.generation.sampling import Sampling, generate_hf_ids, generate_vllm_ids, vllm_engine_for
    from rlt.models import load_eval_model

    options = dict(max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed, return_logprobs=logprobs,
                   sampling=Sampling.from_run(run, temperature))  # the run's top_p/top_k/min_p/repetition_penalty
    model = None
    with ExitStack() as stack:
        if backend == "vllm":
            tokenizer, llm = vllm_engine_for(teacher, run.torch_dtype, stack, seed=seed,
                                             kv_cache_memory_bytes=kv_cache_memory_bytes)
            out = generate_vllm_ids(llm, tokenizer, prompts, **options)
            del llm
        else:
            model, tokenizer = load_eval_model(teacher, torch_dtype=run.torch_dtype)
            out = generate_hf_ids(model, tokenizer, prompts, batch_size=batch_size, **options)
            if not keep_model:
                model = None
    ids, lps = out if logprobs else (out, None)
    _free_memory()
    return _Samples(tokenizer, ids, lps, model)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_samples(teacher: str, run, tokenizer, rows: list[dict], ids: list[list[list[int]]], teacher_model=None,
                  *, logprobs: list[list[list[float] | None]] | None = None,
                  temperature: float | None = None) -> tuple[list[list[float]], int]:
    """The run's teacher reward of every sample, and how many samples took their teacher log-probs from
    `logprobs` (sampled at `temperature`) instead of a teacher forward. The teacher = `teacher` (already loaded as
    `teacher_model` when given), or with ``use_reference_teacher_model`` the run's initial model, as in training;
    the student = the run's."""
    import torch

    from rlt.models import check_shared_tokenizer, load_eval_model, load_model, load_tokenizer
    from rlt.rewards.teacher import TeacherKLReward

    student_name = run.student_model or run.model_name_or_path  # null: the run's reference = its initial policy
    check_shared_tokenizer(tokenizer, load_tokenizer(student_name, revision=run.model_revision,
                                                     trust_remote_code=run.trust_remote_code,
                                                     pad_token=run.pad_token), student_name)
    if run.use_reference_teacher_model:  # training scored q_k with the reference model: the run's initial model
        teacher_model = load_model(run.model_name_or_path, torch_dtype=run.torch_dtype,
                                   attn_implementation=run.attn_implementation, revision=run.model_revision,
                                   trust_remote_code=run.trust_remote_code, tokenizer=tokenizer)
    elif teacher_model is None:
        teacher_model, _ = load_eval_model(teacher, torch_dtype=run.torch_dtype)
    student = load_model(student_name, torch_dtype=run.torch_dtype, attn_implementation=run.attn_implementation,
                         revision=run.model_revision, trust_remote_code=run.trust_remote_code, tokenizer=tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_model.to(device)
    student.to(device)
    reward = TeacherKLReward.from_run(run, student_model=student, tokenizer=tokenizer, teacher_model=teacher_model,
                                      offload_untrained_models=False,  # both models stay on the device
                                      teacher_reuse_sampling_logprobs=logprobs is not None)
    n = len(ids[0])  # samples per row
    rows_per_call = max(1, run.teacher_reward_batch_size * 4 // n)  # whole rows: their samples share prefix forwards
    values: list[list[float]] = []
    reused = 0
    for start in range(0, len(rows), rows_per_call):
        part = range(start, min(start + rows_per_call, len(rows)))
        sampled = dict(sampling_logprobs=[lp for r in part for lp in logprobs[r]],
                       sampling_temperature=temperature) if logprobs is not None else {}
        got = reward([rows[r]["prompt"] for r in part for _ in range(n)],
                     completion_ids=[sample for r in part for sample in ids[r]],
                     question=[rows[r]["question"] for r in part for _ in range(n)],
                     solution=[rows[r]["solution"] for r in part for _ in range(n)],
                     teacher_format=[rows[r]["teacher_format"] for r in part for _ in range(n)], **sampled)
        values += [[float(v) for v in got[k:k + n]] for k in range(0, len(got), n)]
        reused += reward.last_reused_sampling_logprobs
        logger.info("Scored the samples of %d of %d rows", part[-1] + 1, len(rows))
    del teacher_model, student, reward
    _free_memory()
    return values, reused


# -------------------------------------------------------------------------------------------------------- run


def distill(*, teacher: str, run, split: str | None = None, limit: int | None = None, num_samples: int = 1,
            select: str = "best", score: bool = True, keep_unclosed: bool = False,
            max_student_tokens: int | None = None, backend: str = "hf",
            temperature: float | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
            seed: int | None = None, kv_cache_memory_bytes: int = DEFAULT_VLLM_KV_CACHE_BYTES, chunk_rows: int = 512,
            work_dir: str | os.PathLike | None = None) -> tuple[list[dict], dict]:
    """``(rows, summary)`` for `teacher` (a model dir, hub id, `rlt:` name or LoRA adapter dir) under the RLT
    run config `run` (see `load_run_config`). `split` defaults to the run's ``train_split``, `temperature` and
    `max_new_tokens` to the run's sampling ``temperature`` and ``max_completion_length``; `limit` keeps the first N
    usable rows; `max_student_tokens` drops (and counts) rows whose student chat is longer, which SFT would
    otherwise truncate, solution first.

    Rows are processed in chunks of `chunk_rows` (generate, free the engine, score, free the models), chunk ``c``
    sampled with seed ``seed + c``. With `work_dir`, each finished chunk is saved there atomically and a rerun with
    the same settings skips it (a killed run resumes); other settings in the same dir are an error. Raises
    `RltError` subclasses for bad options, data or models."""
    from rlt.config import to_yaml
    from rlt.data.teacher import get_teacher_format, prepare_teacher_datasets
    from rlt.generation.sampling import Sampling
    from rlt.models import load_eval_tokenizer

    temperature = run.temperature if temperature is None else temperature
    max_new_tokens = run.max_completion_length if max_new_tokens is None else max_new_tokens
    seed = run.seed if seed is None else seed
    split = split or run.train_split
    _check_options(limit=limit, num_samples=num_samples, max_student_tokens=max_student_tokens,
                   batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, select=select,
                   backend=backend, score=score, chunk_rows=chunk_rows)
    fmt = get_teacher_format(run.teacher_format)
    settings = dict(teacher=str(teacher), split=split, limit=limit, num_samples=num_samples, select=select,
                    score=score, keep_unclosed=keep_unclosed, max_student_tokens=max_student_tokens, backend=backend,
                    temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, chunk_rows=chunk_rows)
    parts = _Parts(work_dir, {**settings, "run_config": to_yaml(run)}) if work_dir is not None else None

    # ---- data first: its errors come before any weights load (the tokenizer is the teacher's)
    ds, _ = prepare_teacher_datasets(
        run.dataset_id_or_path, mode="rl", tokenizer=load_eval_tokenizer(teacher), fmt=fmt,
        columns=run.data_columns, split=split, data_format=run.teacher_data_format,
        max_prompt_tokens=run.max_prompt_length, synthetic=run.synthetic, subset=run.dataset_subset, seed=run.seed)
    rows = ds.select(range(min(limit, len(ds)))).to_list() if limit is not None else ds.to_list()

    out: list[dict] = []
    stats: dict[str, float] = dict(dropped=0, too_long=0, closed=0, reward_sum=0.0, reward_n=0,
                                   reused_sampling_logprobs=0)
    chunks = range(0, len(rows), chunk_rows)
    for c, start in enumerate(chunks):
        done = parts.load(c) if parts is not None else None
        if done is not None:
            logger.info("Chunk %d of %d (rows %d-%d): done before, kept from %s", c + 1, len(chunks), start,
                        start + chunk_rows - 1, parts.root)
        else:
            logger.info("Chunk %d of %d (rows %d-%d): sampling %d explanation(s) per row (%s, %s, up to %d tokens)",
                        c + 1, len(chunks), start, start + chunk_rows - 1, num_samples, backend,
                        Sampling.from_run(run, temperature).describe(), max_new_tokens)
            done = _distill_chunk(teacher, run, fmt, rows[start:start + chunk_rows], start, seed=seed + c,
                                  **{k: settings[k] for k in ("num_samples", "select", "score", "keep_unclosed",
                                                              "max_student_tokens", "backend", "temperature",
                                                              "max_new_tokens")},
                                  batch_size=batch_size, kv_cache_memory_bytes=kv_cache_memory_bytes)
            if parts is not None:
                parts.save(c, *done)
        out += done[0]
        for k, v in done[1].items():
            stats[k] += v

    return out, _summary(teacher, run, split, fmt, settings, rows, out, stats)


def _summary(teacher, run, split, fmt, settings: dict, rows: list[dict], out: list[dict], stats: dict) -> dict:
    """The run's summary (``<output>.summary.json``); no row kept is an error naming the counts."""
    from rlt.generation.sampling import Sampling

    if not out:
        from rlt.errors import DataError

        raise DataError(f"none of the {len(rows)} rows was kept: {stats['dropped']} had no closed explanation in "
                        f"{settings['num_samples']} sample(s), {stats['too_long']} were over max_student_tokens="
                        f"{settings['max_student_tokens']}; more samples (--num-samples), a longer "
                        "max_completion_length, --keep-unclosed or a larger --max-student-tokens")
    kept_rewards = [r["teacher_reward"] for r in out if r["teacher_reward"] is not None]
    return {
        "teacher": str(teacher), "data": str(run.dataset_id_or_path), "split": split, "rows": len(rows),
        "kept": len(out), "dropped_no_closed_explanation": int(stats["dropped"]),
        "dropped_too_long": int(stats["too_long"]), "samples_closed": int(stats["closed"]),
        # samples whose teacher log-probs came from the generator (no teacher forward; `reuses_sampling_logprobs`)
        "samples_reusing_sampling_logprobs": int(stats["reused_sampling_logprobs"]),
        **{k: settings[k] for k in ("max_student_tokens", "num_samples", "backend", "temperature", "max_new_tokens",
                                    "seed", "chunk_rows")},
        "select": settings["select"], "sampling": Sampling.from_run(run, settings["temperature"]).describe(),
        "mean_reward_all_samples": stats["reward_sum"] / stats["reward_n"] if stats["reward_n"] else None,
        "mean_reward_kept": sum(kept_rewards) / len(kept_rewards) if kept_rewards else None,
        "teacher_format": fmt.fingerprint,
    }


def _distill_chunk(teacher, run, fmt, rows: list[dict], offset: int, *, num_samples, select, score, keep_unclosed,
                   max_student_tokens, backend, temperature, max_new_tokens, batch_size, seed,
                   kv_cache_memory_bytes) -> tuple[list[dict], dict[str, float]]:
    """One chunk: generate, then score (one model set on the device at a time), then keep one sample per row."""
    from rlt.data.teacher import student_messages
    from rlt.generation.sampling import Sampling

    reuse = score and reuses_sampling_logprobs(run, Sampling.from_run(run, temperature), backend)
    samples = _generate(
        teacher, run, [r["prompt"] for r in rows], backend=backend, num_samples=num_samples, temperature=temperature,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, kv_cache_memory_bytes=kv_cache_memory_bytes,
        keep_model=score and not run.use_reference_teacher_model,  # HF: the teacher that sampled also scores
        logprobs=reuse)
    tokenizer, ids = samples.tokenizer, samples.ids
    special = set(tokenizer.all_special_ids)
    explanations = [[parse_explanation(_decode_like_the_reward(tokenizer, sample, special), fmt) for sample in row]
                    for row in ids]
    reused = 0
    if score:
        rewards, reused = score_samples(teacher, run, tokenizer, rows, ids, samples.model,
                                        logprobs=samples.logprobs, temperature=temperature)
    else:
        rewards = [[None] * len(row) for row in ids]
    del samples
    out: list[dict] = []
    finite = [v for row in rewards for v in row if v is not None and math.isfinite(v)]
    stats = dict(dropped=0, too_long=0, closed=sum(e.closed and not e.blank for row in explanations for e in row),
                 reward_sum=sum(finite), reward_n=len(finite), reused_sampling_logprobs=reused)
    for index, (row, exps, rs) in enumerate(zip(rows, explanations, rewards, strict=True)):
        pick = pick_sample(exps, rs, select=select, keep_unclosed=keep_unclosed)
        if pick is None:
            stats["dropped"] += 1
            continue
        e = exps[pick]
        messages = student_messages(row["question"], e.text, row["solution"], fmt)
        if max_student_tokens is not None and len(tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True)["input_ids"]) > max_student_tokens:
            stats["too_long"] += 1
            continue
        out.append({
            "question": row["question"], "solution": row["solution"], "reasoning_trace": e.text.strip(),
            "messages": messages, "teacher_reward": rs[pick], "closed": e.closed, "samples": len(exps),
            "samples_closed": sum(x.closed and not x.blank for x in exps), "source_index": offset + index,
        })
    return out, stats


def _decode_like_the_reward(tokenizer, ids: list[int], special: set[int]) -> str:
    """The completion's text as `TeacherKLReward` reads it: trailing special tokens (eos, end of turn) dropped, the
    rest decoded verbatim, so the explanation kept is the one the reward scored."""
    end = len(ids)
    while end and ids[end - 1] in special:
        end -= 1
    return tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)


class _Parts:
    """Finished chunks of a distillation in `root`: ``part-<c>.jsonl`` + ``part-<c>.stats.json`` (the stats file,
    written last, marks a chunk done) and ``settings.json``, which a resumed run must match."""

    def __init__(self, root: str | os.PathLike, settings: dict) -> None:
        self.root = Path(root).expanduser()
        path = self.root / "settings.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise ConfigError(f"{self.root} holds the finished chunks of a distillation with other settings "
                                  f"({', '.join(changed)} differ): delete it to start over, or rerun with the same "
                                  "settings to resume")
        self.settings = settings  # written with the first finished chunk: a run that fails before leaves nothing

    def load(self, c: int) -> tuple[list[dict], dict] | None:
        stats = self.root / f"part-{c:05d}.stats.json"
        if not stats.is_file():
            return None
        rows = [json.loads(line) for line in (self.root / f"part-{c:05d}.jsonl").read_text().splitlines() if line]
        return rows, json.loads(stats.read_text())

    def save(self, c: int, rows: list[dict], stats: dict) -> None:
        from rlt.checkpoints import write_json_atomic

        if not (self.root / "settings.json").is_file():
            write_json_atomic(self.root / "settings.json", self.settings)
        write_jsonl_atomic(self.root / f"part-{c:05d}.jsonl", rows)
        write_json_atomic(self.root / f"part-{c:05d}.stats.json", stats)


def write_jsonl_atomic(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """`rows` as JSON lines, written atomically (`rlt.checkpoints.atomic_write_text`: never half-written)."""
    from rlt.checkpoints import atomic_write_text

    return atomic_write_text(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.distill", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="the teacher: an RLT run's final/ or checkpoint-N/ dir (or the run dir), a model dir, "
                             "hub id, rlt: name or LoRA adapter dir")
    parser.add_argument("--run-cfg", default=None,
                        help="take the data, tags and reward from cfgs/run_cfg/NAME instead of the teacher's run")
    parser.add_argument("--split", default=None, help="data split (default: the run's train_split)")
    parser.add_argument("--limit", type=int, default=None, help="the first N usable rows only")
    parser.add_argument("--num-samples", type=int, default=1, help="explanations sampled per row")
    parser.add_argument("--select", choices=SELECTIONS, default="best",
                        help="which closed explanation of a row to keep: the best by the teacher reward, or the first")
    parser.add_argument("--no-score", action="store_true", help="skip the teacher reward (no student forward)")
    parser.add_argument("--keep-unclosed", action="store_true",
                        help="keep a row whose explanations never close (its best sample, cut where it stopped)")
    parser.add_argument("--max-student-tokens", type=int, default=None,
                        help="drop rows whose student chat is longer (SFT would truncate them; use its max_length)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's temperature (0 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's max_completion_length")
    parser.add_argument("--batch-size", type=int, default=16, help="HF backend: sequences per generate call")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DEFAULT_VLLM_KV_CACHE_BYTES,
                        help="vLLM on CPU: KV cache size")
    parser.add_argument("--chunk-rows", type=int, default=512,
                        help="rows per chunk; each finished chunk is kept in <output>.parts/, so a killed run resumes")
    parser.add_argument("--seed", type=int, default=None, help="default: the run's seed (chunk c: seed + c)")
    parser.add_argument("--output", default=None,
                        help="JSON-lines path (default results/distill/<teacher>__<data>__<split>.jsonl)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run-config keys to override")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, with a one-line error on stderr)."""
    from rlt.cli import parse_cli, shorten

    args = parse_cli(build_parser(), argv)
    try:
        from rlt.config import register_defaults

        register_defaults()
        run = load_run_config(args.teacher, run_cfg=args.run_cfg, overrides=args.overrides)
        teacher = teacher_model_dir(args.teacher)
        from rlt.models import check_local_paths, missing_local_model

        if (problem := missing_local_model(teacher)) is not None:
            raise ConfigError(f"--teacher {teacher}: {problem}")
        if not args.no_score:
            check_local_paths(run)  # the student (the run's student_model, else its initial model) must exist
        output = Path(args.output or default_output_path(teacher, str(run.dataset_id_or_path),
                                                         args.split or run.train_split))
        work_dir = output.with_name(output.name + ".parts")  # finished chunks: a killed run resumes from them
        rows, summary = distill(
            teacher=teacher, run=run, split=args.split, limit=args.limit, num_samples=args.num_samples,
            select=args.select, score=not args.no_score, keep_unclosed=args.keep_unclosed,
            max_student_tokens=args.max_student_tokens, backend=args.backend,
            temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            seed=args.seed, kv_cache_memory_bytes=args.kv_cache_memory_bytes, chunk_rows=args.chunk_rows,
            work_dir=work_dir)
        from rlt.checkpoints import write_json_atomic

        try:
            path = write_jsonl_atomic(output, rows)
            write_json_atomic(output.with_name(output.name + ".summary.json"), {**summary, "output": str(path)})
        except OSError as e:
            raise ConfigError(f"cannot write the distilled data to {output}: {e}") from e
        shutil.rmtree(work_dir, ignore_errors=True)
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    mean = summary["mean_reward_kept"]
    print(f"{summary['teacher']} on {summary['data']} [{summary['split']}]: kept {summary['kept']} of "
          f"{summary['rows']} rows ({summary['dropped_no_closed_explanation']} without a closed explanation, "
          f"{summary['dropped_too_long']} over max_student_tokens; "
          f"{summary['samples_closed']} of {summary['rows'] * summary['num_samples']} samples closed)"
          + (f", mean teacher reward of the kept {mean:.4f}" if mean is not None else ""))
    for row in rows[:2]:
        print(f"- question: {shorten(row['question'])}\n  explanation: {shorten(row['reasoning_trace'])}\n"
              f"  solution: {shorten(row['solution'])}  reward: {row['teacher_reward']}")
    print(f"data: {path}  (train a student: ./launch_mono.sh student_sft_tiny.yaml dataset_id_or_path={path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
