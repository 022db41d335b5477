"""Several SFT sources in one training set (the `dataset_mix` key; `cfgs/data_cfg/instruct_mix.yaml`).

Each source is loaded and converted on its own (`rlt.data.loading.load_sft_source`: its split, columns, system
prompt), so every row reaches the mix in the same form: prompt/completion rows, ``messages`` conversations when
every assistant turn is trained (`train_on_all_assistant_turns`) and a source is a conversation format, or text for
an all-text mix. Then `plan_counts` says how many rows each source gives, `sample_rows` draws them without
replacement with a generator seeded by (seed, source index), and the concatenation is shuffled with the seed: the
same seed gives the same rows in the same order, another seed other rows.

Eval rows: each source's own eval split (its ``eval_split``, else the run's `eval_split`) when it has one, else a
seeded `eval_fraction` carved from its train split before sampling (the rule of a single source); all of them are
kept (not weighted), shuffled with the seed and capped at `max_eval_samples`.
"""

from __future__ import annotations

import glob as globlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets

from rlt.data.loading import BUILDERS, CONVERSATION_FORMATS, load_sft_source
from rlt.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixSource:
    """One validated `dataset_mix` entry (`rlt.config.sft.mix_source_problems` checked its keys and values)."""

    index: int
    name: str
    dataset_id_or_path: str
    data_format: str
    split: str = "train"
    eval_split: str | None = None
    weight: Fraction | None = None
    rows: int | None = None
    dataset_subset: str | None = None
    data_columns: Mapping[str, str] | None = None
    system_prompt: str | None = None


def source_name(dataset_id_or_path: str) -> str:
    """A short display name: the last part of a hub id or path, without a data-file extension.

    >>> [source_name(s) for s in ("tatsu-lab/alpaca", "/data/dolly.jsonl", "data/oasst/", "synthetic:arithmetic")]
    ['alpaca', 'dolly', 'oasst', 'arithmetic']
    >>> source_name("corpus/*.txt")
    'corpus/*.txt'
    """
    if globlib.has_magic(dataset_id_or_path):
        return dataset_id_or_path
    last = dataset_id_or_path.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return last[:-len(Path(last).suffix)] if Path(last).suffix.lower() in BUILDERS else last


def parse_sources(mix: Sequence[Mapping[str, Any]], *, eval_split: str | None,
                  system_prompt: str | None) -> list[MixSource]:
    """`MixSource`s of the config's `dataset_mix`; a source's missing ``eval_split`` / ``system_prompt`` take the
    run's. Names repeat only once: a later source named like an earlier one gets its index appended
    (``alpaca``, ``alpaca[2]``)."""
    sources, seen = [], set()
    for index, entry in enumerate(mix):
        name = str(entry.get("name") or source_name(str(entry["dataset_id_or_path"])))
        name = f"{name}[{index}]" if name in seen else name
        seen.add(name)
        weight = entry.get("weight")
        sources.append(MixSource(
            index=index, name=name, dataset_id_or_path=str(entry["dataset_id_or_path"]),
            data_format=str(entry["data_format"]), split=entry.get("split") or "train",
            eval_split=entry.get("eval_split", eval_split),
            weight=Fraction(str(weight)) if weight is not None else None, rows=entry.get("rows"),
            dataset_subset=entry.get("dataset_subset"), data_columns=entry.get("data_columns"),
            system_prompt=entry.get("system_prompt", system_prompt)))
    return sources


def _largest_remainder(shares: list[Fraction], total: int) -> list[int]:
    """`total` split in proportion to `shares` (summing to 1): floors, then one more for the largest remainders
    (ties: the earlier source), so the counts add up to `total` exactly."""
    exact = [share * total for share in shares]
    counts = [int(x) for x in exact]  # floor: the values are >= 0
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_counts(available: Sequence[int], *, weights: Sequence[Fraction | float] | None = None,
                rows: Sequence[int] | None = None, total: int | None = None,
                names: Sequence[str] | None = None) -> list[int]:
    """How many rows each source gives to the mix.

    - `rows` (explicit counts): exactly those; a count above what the source has is a `DataError`.
    - `weights` (shares, normalised to sum to 1: ``3, 2`` is ``0.6, 0.4``): the mix has `total` rows
      (`max_train_samples`) or, without it, the largest total no source has to give more rows than it has:
      ``floor(min(available_i / share_i))``. Each source gets ``share_i × total`` rows, rounded so that they add up to
      the total (largest remainder). With a `total` a source short of rows is a `DataError` (never oversampled).

    Worked example: alpaca has 1000 usable rows, dolly 500, weights 0.6 / 0.4. Without max_train_samples the total is
    ``min(1000 / 0.6, 500 / 0.4) = min(1666.7, 1250) = 1250``: alpaca 750, dolly 500 (all of dolly, no row twice).
    With max_train_samples=1000: alpaca 600, dolly 400.

    >>> plan_counts([1000, 500], weights=[0.6, 0.4])
    [750, 500]
    >>> plan_counts([1000, 500], weights=[3, 2], total=1000)
    [600, 400]
    >>> plan_counts([50, 50, 50], weights=[1, 1, 1], total=100)   # 33.3 each: the first gets the extra row
    [34, 33, 33]
    >>> plan_counts([1000, 500], rows=[300, 20])
    [300, 20]
    """
    names = list(names or [f"source {i}" for i in range(len(available))])
    if rows is not None:
        for name, want, have in zip(names, rows, available, strict=True):
            if want > have:
                raise DataError(f"dataset_mix: {name} has rows={want} but only {have} usable rows: lower its rows "
                                "(or give the sources weights)")
        return list(rows)
    fractions = [Fraction(str(w)) if not isinstance(w, Fraction) else w for w in weights or []]
    shares = [w / sum(fractions) for w in fractions]
    fits = min(int(have / share) for have, share in zip(available, shares, strict=True))
    if total is None:
        return _largest_remainder(shares, fits)
    counts = _largest_remainder(shares, total)
    for name, want, have, share in zip(names, counts, available, shares, strict=True):
        if want > have:
            raise DataError(f"dataset_mix: {name} has {have} usable rows, but its share {float(share):.1%} of "
                            f"max_train_samples={total} is {want}: lower max_train_samples to {fits} or less (or "
                            "its weight)")
    return counts


def sample_rows(ds: Dataset, count: int, seed: int, index: int) -> Dataset:
    """`count` rows of `ds` drawn without replacement by a generator seeded with (seed, index)."""
    if count >= len(ds):
        return ds
    chosen = np.random.default_rng([seed, index]).choice(len(ds), size=count, replace=False)
    return ds.select(chosen.tolist()).flatten_indices()


def row_form(formats: Sequence[str], all_assistant_turns: bool) -> str:
    """The common form of a mix's rows: ``text`` (every source a text corpus), ``messages`` (every assistant turn
    trained and some source a conversation format) or ``prompt_completion``.

    >>> row_form(["alpaca", "sharegpt"], True), row_form(["alpaca", "sharegpt"], False), row_form(["text"], True)
    ('messages', 'prompt_completion', 'text')
    """
    if set(formats) == {"text"}:
        return "text"
    if all_assistant_turns and any(f in CONVERSATION_FORMATS for f in formats):
        return "messages"
    return "prompt_completion"


def prepare_sft_mix(
    mix: Sequence[Mapping[str, Any]],
    *,
    eval_split: str | None = "test",
    eval_fraction: float = 0.0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    system_prompt: str | None = None,
    completion_style: str = "gsm8k",
    text_sample_by: str = "paragraph",
    synthetic: Mapping[str, Any] | None = None,
    all_assistant_turns: bool = False,
    seed: int = 42,
) -> tuple[Dataset, Dataset | None, dict]:
    """Train and eval datasets of a `dataset_mix` (see the module docstring), and the mix report:
    ``{"total": rows, "eval_total": rows or None, "sources": [{"name", "dataset_id_or_path", "data_format",
    "split", "available", "rows", "share", "eval_rows"}, ...]}`` (``share`` of the train rows, 0-1).

    Raises `DataError` naming the source (``dataset_mix[1] (dolly): ...``) when it cannot be loaded or converted, or
    has too few rows for its rows / share.
    """
    sources = parse_sources(mix, eval_split=eval_split, system_prompt=system_prompt)
    form = row_form([s.data_format for s in sources], all_assistant_turns)
    loaded = [_load(source, form=form, eval_fraction=eval_fraction, completion_style=completion_style,
                    text_sample_by=text_sample_by, synthetic=synthetic, seed=seed) for source in sources]
    counts = plan_counts([len(train) for train, _ in loaded], names=[s.name for s in sources],
                         weights=None if sources[0].rows is not None else [s.weight for s in sources],
                         rows=[s.rows for s in sources] if sources[0].rows is not None else None,
                         total=max_train_samples)
    parts = [sample_rows(train, count, seed, s.index) for s, (train, _), count in zip(sources, loaded, counts,
                                                                                        strict=True)]
    train = concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
    evals = [e for _, e in loaded if e is not None]
    eval_ds = concatenate_datasets(evals).shuffle(seed=seed).flatten_indices() if evals else None
    if eval_ds is not None and max_eval_samples is not None and max_eval_samples < len(eval_ds):
        eval_ds = eval_ds.select(range(max_eval_samples)).flatten_indices()
    report = _report(sources, loaded, counts, eval_ds)
    logger.info("data mix: %s (%d train rows, %s eval rows)", mix_line(report), len(train),
                len(eval_ds) if eval_ds is not None else "no")
    return train, eval_ds, report


def _load(source: MixSource, *, form: str, eval_fraction: float, completion_style: str, text_sample_by: str,
          synthetic: Mapping[str, Any] | None, seed: int) -> tuple[Dataset, Dataset | None]:
    try:
        return load_sft_source(
            dataset_id_or_path=source.dataset_id_or_path, data_format=source.data_format,
            dataset_subset=source.dataset_subset, data_columns=source.data_columns, train_split=source.split,
            eval_split=source.eval_split, eval_fraction=eval_fraction, system_prompt=source.system_prompt,
            completion_style=completion_style, text_sample_by=text_sample_by, synthetic=synthetic,
            as_conversations=form == "messages", seed=seed)
    except DataError as e:
        raise DataError(f"dataset_mix[{source.index}] ({source.name}): {e}") from e


def _report(sources: list[MixSource], loaded: list, counts: list[int], eval_ds: Dataset | None) -> dict:
    total = sum(counts)
    return {
        "total": total,
        "eval_total": len(eval_ds) if eval_ds is not None else None,
        "sources": [{"name": s.name, "dataset_id_or_path": s.dataset_id_or_path, "data_format": s.data_format,
                     "split": s.split, "available": len(train), "rows": count, "share": count / total,
                     "eval_rows": len(eval_part) if eval_part is not None else 0}
                    for s, (train, eval_part), count in zip(sources, loaded, counts, strict=True)],
    }


def mix_line(report: Mapping[str, Any]) -> str:
    """``alpaca 600 (60.0%), dolly 400 (40.0%)``: each source's train rows and share of the mix.

    >>> mix_line({"sources": [{"name": "alpaca", "rows": 600, "share": 0.6}, {"name": "dolly", "rows": 400,
    ...                                                                        "share": 0.4}]})
    'alpaca 600 (60.0%), dolly 400 (40.0%)'
    """
    return ", ".join(f"{s['name']} {s['rows']} ({s['share']:.1%})" for s in report["sources"])
