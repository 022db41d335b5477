"""Load datasets from synthetic generators, local files / directories / globs, or the Hub, and prepare SFT splits.

Every user-facing problem (missing path, empty file or split, unknown split / format / column, unreachable Hub id)
raises `rlt.errors.DataError` with a message that says what was found and what to change.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, List, Value

from rlt.config import TEXT_SAMPLE_BY
from rlt.data.diagnose import explain_load_failure, quiet_builder_errors
from rlt.data.formats import (
    COMPLETION_STYLES,
    DEFAULT_COLUMNS,
    OPTIONAL_FIELDS,
    as_messages,
    gsm8k_final_answer,
    gsm8k_prompt,
    to_sft_example,
    tokenize_assistant_turns,
)
from rlt.data.synthetic import split_arithmetic
from rlt.errors import DataError

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SOURCES = ("arithmetic",)
SYNTHETIC_DEFAULTS: dict[str, Any] = {"num_train": 1000, "num_eval": 100, "max_operand": 20, "max_terms": 2,
                                      "ops": "+-"}

# file extension -> `datasets` packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}

# split name -> file-name stem prefixes (lower case) that select it inside a directory
SPLIT_PREFIXES = {
    "train": ("train",),
    "test": ("test",),
    "validation": ("validation", "valid", "dev", "eval"),
}

_MESSAGE = {"role": Value("string"), "content": Value("string")}
_CONVERSATIONAL_FEATURES = Features({"prompt": List(_MESSAGE), "completion": List(_MESSAGE)})
_MESSAGES_FEATURES = Features({"messages": List(_MESSAGE)})
_TEXT_FEATURES = Features({"text": Value("string")})

# data formats whose rows are conversations (several turns): `train_on_all_assistant_turns` applies to them
CONVERSATION_FORMATS = ("sharegpt", "messages")


# ------------------------------------------------------------------------------------------------------- load_raw


def _split_of(path: Path) -> str | None:
    stem = path.name.split(".")[0].lower()
    for split, prefixes in SPLIT_PREFIXES.items():
        if stem.startswith(prefixes):
            return split
    return None


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_empty_file(path: Path) -> bool:
    """0 bytes, or (for small text-based files) only whitespace."""
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix.lower() == ".parquet" or size > 65536:
        return False
    return not path.read_bytes().strip()


def _load_files(files: list[Path], split: str, text_sample_by: str) -> Dataset:
    """Load files of one extension as one split; DataError for empty files, unreadable files (with the file, line
    and byte / column of the first non-UTF-8 byte or bad JSON line: `rlt.data.diagnose`) or 0 rows."""
    exts = sorted({f.suffix.lower() for f in files})
    if len(exts) != 1:
        raise DataError(f"split '{split}' mixes file types {exts}: {[str(f) for f in files]}; use one type per split")
    for f in files:
        if _is_empty_file(f):
            raise DataError(f"data file '{f}' is empty")
    builder = BUILDERS[exts[0]]
    kwargs: dict[str, Any] = {"sample_by": text_sample_by} if builder == "text" else {}
    names = [str(f) for f in files]
    try:
        with quiet_builder_errors(builder):
            ds = datasets.load_dataset(builder, data_files={split: names}, split=split, **kwargs)
        if builder == "json":  # pyarrow's JSON reader keeps non-UTF-8 bytes: fail here, not mid-training
            ds.data.table.validate(full=True)
    except Exception as e:  # noqa: BLE001 - anything the builder raises is a problem with the file
        raise explain_load_failure(files, builder, split, e) from e
    if len(ds) == 0:
        raise DataError(f"split '{split}' loaded from {names} has 0 rows")
    return ds


def _load_directory(root: Path, text_sample_by: str) -> DatasetDict:
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in BUILDERS and not _is_hidden(p, root))
    structured = [p for p in files if p.suffix.lower() != ".txt"]
    texts = [p for p in files if p.suffix.lower() == ".txt"]
    if not files:
        raise DataError(f"directory '{root}' has no data files (expected {sorted(BUILDERS)})")
    groups: dict[str, list[Path]] = {}
    if structured:
        if texts:
            logger.info("Directory '%s': using %d structured file(s), ignoring .txt files %s",
                        root, len(structured), [str(p.relative_to(root)) for p in texts])
        unknown = [p for p in structured if _split_of(p) is None]
        if unknown:
            raise DataError(
                f"directory '{root}': cannot tell the split of {[str(p.relative_to(root)) for p in unknown]}; "
                f"file names must start with one of {[p for ps in SPLIT_PREFIXES.values() for p in ps]} "
                f"(found {[str(p.relative_to(root)) for p in structured]}); or pass a single file / glob instead"
            )
        for p in structured:
            groups.setdefault(_split_of(p), []).append(p)  # type: ignore[arg-type]
    else:  # a text corpus: every .txt file is training text unless its name says otherwise
        for p in texts:
            groups.setdefault(_split_of(p) or "train", []).append(p)
    logger.info("Directory '%s': splits %s", root,
                {s: [str(p.relative_to(root)) for p in fs] for s, fs in groups.items()})
    ordered = [s for s in SPLIT_PREFIXES if s in groups]
    return DatasetDict({split: _load_files(groups[split], split, text_sample_by) for split in ordered})


def _load_synthetic(name: str, synthetic: Mapping[str, Any] | None, seed: int) -> DatasetDict:
    if name not in SYNTHETIC_SOURCES:
        raise DataError(f"unknown synthetic dataset 'synthetic:{name}'; available: "
                        f"{[SYNTHETIC_PREFIX + s for s in SYNTHETIC_SOURCES]}")
    params = dict(synthetic or {})
    seed = params.pop("seed", seed)
    unknown = sorted(set(params) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(f"unknown synthetic option(s) {unknown}; allowed: {sorted(SYNTHETIC_DEFAULTS)} and 'seed'")
    params = {**SYNTHETIC_DEFAULTS, **params}
    num_train, num_eval = params.pop("num_train"), params.pop("num_eval")
    if not isinstance(num_train, int) or num_train < 1:
        raise DataError(f"synthetic.num_train must be a positive integer, got {num_train!r}")
    train, test = split_arithmetic(num_train, num_eval, seed, **params)
    out = {"train": Dataset.from_list(train)}
    if test:
        out["test"] = Dataset.from_list(test)
    return DatasetDict(out)


def _looks_like_path(source: str) -> bool:
    """True for strings that cannot be Hub ids: absolute/relative/home paths, data-file names, deeper paths."""
    return (source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in BUILDERS
            or source.count("/") > 1 or os.sep != "/" and os.sep in source)


def _load_hub(source: str, subset: str | None = None) -> DatasetDict:
    try:
        loaded = datasets.load_dataset(source, subset)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo, bad script: all reported the same way
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        raise DataError(
            f"could not load dataset '{source}': it is not a local file or directory, and loading it as a "
            f"Hugging Face Hub id failed ({type(e).__name__}: {str(e)[:300]}). "
            "This machine may be offline"
            f"{' (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so the Hub is not even contacted)' if offline else ''}"
            ". "
            "A local path also works: a .jsonl/.json/.parquet/.csv/.txt file, a directory with train*/test* files, "
            "a glob such as 'corpus/*.txt', or 'synthetic:arithmetic'."
        ) from e
    if not isinstance(loaded, DatasetDict):
        raise DataError(f"Hub dataset '{source}' did not load as a dataset with splits (got {type(loaded).__name__})")
    return loaded


def load_raw(
    source: str,
    *,
    split: str | None = None,
    text_sample_by: str = "paragraph",
    synthetic: Mapping[str, Any] | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> DatasetDict:
    """Load `source` into a `DatasetDict` of raw (unconverted) rows.

    `source` is one of:

    - ``"synthetic:arithmetic"``: train/test from `split_arithmetic`; `synthetic` holds ``num_train``, ``num_eval``,
      ``max_operand``, ``max_terms``, ``ops`` (defaults in `SYNTHETIC_DEFAULTS`) and optionally ``seed``
      (else `seed`).
    - a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.txt`` file, or a glob such as ``corpus/*.txt`` (one file type):
      loaded as split `split` (default ``"train"``).
    - a directory: files (recursively, ignoring hidden ones) grouped into splits by name: ``train*``, ``test*``,
      ``validation*|valid*|dev*|eval*``; other names are an error. A directory of only ``.txt`` files is a corpus:
      every file goes to ``train`` unless its name selects a split. A ``save_to_disk`` directory is loaded with
      `datasets.load_from_disk`.
    - anything else: a Hub id for `datasets.load_dataset`, with config name `subset` (fails with a DataError when
      offline).

    ``.txt`` files become one ``text`` row per paragraph / line / document (`text_sample_by`). For directories, Hub
    ids and synthetic sources a given `split` restricts the result to that split. Raises `DataError` for a missing
    path, an empty file, a split with 0 rows, or a source that cannot be loaded.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"dataset source must be a non-empty string, got {source!r}")
    if text_sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"text_sample_by must be one of {list(TEXT_SAMPLE_BY)}, got {text_sample_by!r}")
    source = source.strip()

    single_split = split or "train"
    if source.startswith(SYNTHETIC_PREFIX):
        result = _load_synthetic(source[len(SYNTHETIC_PREFIX):], synthetic, seed)
    elif globlib.has_magic(source):
        matches = sorted(Path(p) for p in globlib.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"glob pattern '{source}' matches no files")
        unsupported = [str(p) for p in files if p.suffix.lower() not in BUILDERS]
        if unsupported:
            raise DataError(f"glob pattern '{source}' matches unsupported files {unsupported}; "
                            f"supported: {sorted(BUILDERS)}")
        return DatasetDict({single_split: _load_files(files, single_split, text_sample_by)})
    else:
        path = Path(source).expanduser()
        if path.is_file():
            if path.suffix.lower() not in BUILDERS:
                raise DataError(f"unsupported data file type '{path.suffix}' for '{path}'; "
                                f"supported: {sorted(BUILDERS)}")
            return DatasetDict({single_split: _load_files([path], single_split, text_sample_by)})
        if path.is_dir():
            result = _load_directory(path, text_sample_by)
        elif _looks_like_path(source):
            raise DataError(f"dataset path '{source}' does not exist (resolved to '{path.resolve()}')")
        else:
            result = _load_hub(source, subset)

    empty = [name for name, ds in result.items() if len(ds) == 0]
    if empty:
        raise DataError(f"dataset '{source}' has empty split(s) {empty}")
    if split is not None:
        if split not in result:
            raise DataError(f"dataset '{source}' has no split '{split}'; available splits: {list(result)}")
        result = DatasetDict({split: result[split]})
    return result


# ------------------------------------------------------------------------------------------------- column mapping


def _resolve_columns(data_format: str, data_columns: Mapping[str, str] | None) -> tuple[dict[str, str], set[str]]:
    """Defaults merged with user overrides, and the set of logical names the user set explicitly."""
    if data_format not in DEFAULT_COLUMNS:
        raise DataError(f"unknown data_format {data_format!r}; expected one of {sorted(DEFAULT_COLUMNS)}")
    user = {str(k): v for k, v in dict(data_columns or {}).items()}
    unknown = sorted(set(user) - set(DEFAULT_COLUMNS[data_format]))
    if unknown:
        raise DataError(f"data_columns has key(s) {unknown} that data_format '{data_format}' does not use; "
                        f"its fields are {sorted(DEFAULT_COLUMNS[data_format])}")
    bad = {k: v for k, v in user.items() if not isinstance(v, str) or not v}
    if bad:
        raise DataError(f"data_columns values must be non-empty column names, got {bad}")
    return {**DEFAULT_COLUMNS[data_format], **user}, set(user)


def _check_columns(ds: Dataset, source: str, split: str, data_format: str, columns: dict[str, str],
                   explicit: set[str]) -> dict[str, str]:
    """Raise DataError for mapped columns missing from `ds`; drop optional ones the user did not set explicitly."""
    present = list(ds.column_names)
    used = dict(columns)
    for name, column in columns.items():
        if column in present:
            continue
        if name in OPTIONAL_FIELDS.get(data_format, ()) and name not in explicit:
            logger.info("Dataset '%s' split '%s' has no column '%s'; treating %s as empty",
                        source, split, column, name)
            del used[name]
            continue
        raise DataError(f"dataset '{source}' split '{split}' has no column '{column}' (data_columns.{name}); "
                        f"columns present: {present}")
    return used


def _convert(ds: Dataset, *, source: str, split: str, data_format: str, columns: dict[str, str],
             system_prompt: str | None, completion_style: str, as_conversations: bool = False) -> Dataset:
    """Map raw rows to SFT rows (dropping unusable ones, with a logged count); DataError if none is left. With
    `as_conversations` every chat row is one ``messages`` conversation (`as_messages`), all its turns kept."""

    def convert_batch(batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values()))) if batch else 0
        out: dict[str, list] = {k: [] for k in features}
        for i in range(n):
            example = to_sft_example({k: v[i] for k, v in batch.items()}, data_format=data_format, columns=columns,
                                     system_prompt=system_prompt, completion_style=completion_style,
                                     all_assistant_turns=as_conversations)
            if example is not None:
                example = as_messages(example) if as_conversations else example
                for k in features:
                    out[k].append(example[k])
        return out

    if data_format == "text":
        features = _TEXT_FEATURES
    else:
        features = _MESSAGES_FEATURES if as_conversations else _CONVERSATIONAL_FEATURES
    converted = ds.map(convert_batch, batched=True, remove_columns=ds.column_names, features=features,
                       desc=f"Formatting {split} ({data_format})")
    dropped = len(ds) - len(converted)
    if dropped:
        logger.warning("Dataset '%s' split '%s': dropped %d of %d rows that are empty or malformed for data_format "
                       "'%s'", source, split, dropped, len(ds), data_format)
    if len(converted) == 0:
        raise DataError(f"dataset '{source}' split '{split}': none of its {len(ds)} rows is usable as data_format "
                        f"'{data_format}' (all empty or malformed; check data_format and data_columns)")
    return converted


def _subsample(ds: Dataset, n: int | None, seed: int, what: str) -> Dataset:
    if n is None:
        return ds
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"{what} must be a positive integer or null, got {n!r}")
    if n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def _pick_splits(raw: DatasetDict, source: str, train_split: str, eval_split: str | None,
                 eval_fraction: float, seed: int) -> tuple[Dataset, Dataset | None, str | None]:
    """The train split and the eval split (given, carved from train, or None) with the eval split's display name."""
    if train_split not in raw:
        raise DataError(f"dataset '{source}' has no split '{train_split}' (train_split); "
                        f"available splits: {list(raw)}")
    if not isinstance(eval_fraction, int | float) or not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    train = raw[train_split]
    if eval_split is not None and eval_split in raw:
        if eval_fraction > 0:
            logger.info("Using split '%s' of '%s' for evaluation; eval_fraction=%s is ignored",
                        eval_split, source, eval_fraction)
        return train, raw[eval_split], eval_split
    if eval_fraction > 0:
        if eval_split is not None:
            logger.info("Dataset '%s' has no split '%s' (available: %s); carving %.1f%% of '%s' for evaluation",
                        source, eval_split, list(raw), 100 * eval_fraction, train_split)
        try:
            parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        except ValueError as e:
            raise DataError(f"cannot carve eval_fraction={eval_fraction} out of the {len(train)} rows of split "
                            f"'{train_split}' of '{source}': {e}") from e
        return parts["train"], parts["test"], f"{train_split}[eval_fraction={eval_fraction}]"
    if eval_split is not None:
        logger.warning("Dataset '%s' has no eval split '%s' (available: %s) and eval_fraction=0: training without "
                       "evaluation data", source, eval_split, list(raw))
    else:
        logger.info("No eval split configured for '%s': training without evaluation data", source)
    return train, None, None


# ------------------------------------------------------------------------------------------------------ public API


def load_sft_source(
    *,
    dataset_id_or_path: str,
    data_format: str,
    dataset_subset: str | None = None,
    data_columns: Mapping[str, str] | None = None,
    train_split: str = "train",
    eval_split: str | None = "test",
    eval_fraction: float = 0.0,
    system_prompt: str | None = None,
    completion_style: str = "gsm8k",
    text_sample_by: str = "paragraph",
    synthetic: Mapping[str, Any] | None = None,
    as_conversations: bool = False,
    seed: int = 42,
) -> tuple[Dataset, Dataset | None]:
    """One source's converted train rows and eval rows (None without an eval split or `eval_fraction`).

    `load_raw`; pick `train_split` and `eval_split` (when the eval split is missing, carve a seeded `eval_fraction`
    of train if > 0, else no eval rows); merge `data_columns` over `DEFAULT_COLUMNS[data_format]` and check the
    columns exist; convert with `to_sft_example` and drop unusable rows (count logged). `as_conversations`: every
    chat row as one ``messages`` conversation with all its turns (`as_messages`). Raises `DataError` for an unknown
    format / style / split / column or when no usable row is left.
    """
    columns, explicit = _resolve_columns(data_format, data_columns)
    if completion_style not in COMPLETION_STYLES:
        raise DataError(f"unknown completion_style {completion_style!r}; expected one of {list(COMPLETION_STYLES)}")
    source = str(dataset_id_or_path)
    raw = load_raw(source, text_sample_by=text_sample_by, synthetic=synthetic, seed=seed, subset=dataset_subset)
    train_raw, eval_raw, eval_name = _pick_splits(raw, source, train_split, eval_split, eval_fraction, seed)

    def prepare(ds: Dataset, split: str) -> Dataset:
        used = _check_columns(ds, source, split, data_format, columns, explicit)
        return _convert(ds, source=source, split=split, data_format=data_format, columns=used,
                        system_prompt=system_prompt, completion_style=completion_style,
                        as_conversations=as_conversations)

    return prepare(train_raw, train_split), prepare(eval_raw, eval_name) if eval_raw is not None else None


def prepare_sft_datasets(
    *,
    dataset_id_or_path: str,
    dataset_subset: str | None = None,
    data_format: str,
    data_columns: Mapping[str, str] | None = None,
    train_split: str = "train",
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
) -> tuple[Dataset, Dataset | None]:
    """Train and eval datasets ready for TRL's SFTTrainer.

    Rows are conversational prompt-completion (``prompt``/``completion`` message lists) or ``text`` for
    ``data_format="text"``; with `all_assistant_turns`, conversations (sharegpt / messages) are ``messages`` rows
    instead, to be tokenized by `tokenize_conversations` so that every assistant turn is trained. The original
    columns are removed. `load_sft_source` loads, splits and converts; then the first `max_*_samples` rows after a
    seeded shuffle are kept. Raises `DataError` for an unknown format / style / split / column or when no usable
    row is left.
    """
    source = str(dataset_id_or_path)
    train, eval_ds = load_sft_source(
        dataset_id_or_path=source, data_format=data_format, dataset_subset=dataset_subset, data_columns=data_columns,
        train_split=train_split, eval_split=eval_split, eval_fraction=eval_fraction, system_prompt=system_prompt,
        completion_style=completion_style, text_sample_by=text_sample_by, synthetic=synthetic,
        as_conversations=all_assistant_turns and data_format in CONVERSATION_FORMATS, seed=seed)
    train = _subsample(train, max_train_samples, seed, "max_train_samples")
    if eval_ds is not None:
        eval_ds = _subsample(eval_ds, max_eval_samples, seed, "max_eval_samples")
    logger.info("SFT data from '%s' (%s): %d train rows, %s eval rows", source, data_format, len(train),
                len(eval_ds) if eval_ds is not None else "no")
    return train, eval_ds


def tokenize_conversations(ds: Dataset, tokenizer: Any, *, max_length: int | None, what: str = "train") -> Dataset:
    """``messages`` rows -> ``input_ids`` + ``assistant_masks`` (`tokenize_assistant_turns`): SFTTrainer then takes
    them as they are (a dataset with ``input_ids`` is not tokenized again), builds the labels from
    ``assistant_masks`` (-100 elsewhere) and truncates to ``max_length`` keeping the start (without packing it then
    drops rows left without a trained token; bfd packing truncates too). Counts logged: rows longer than
    `max_length` (truncated), rows of which no assistant token survives the truncation, and assistant turns the chat
    template renders differently once later turns follow (trained only up to the difference). Raises `DataError`
    when no row has an assistant token."""
    if "messages" not in ds.column_names:
        return ds
    stats = {"truncated": 0, "emptied": 0, "turns": 0, "cut_turns": 0, "no_assistant": 0}

    def tokenize(row: dict) -> dict:
        out = tokenize_assistant_turns(row["messages"], tokenizer)
        stats["turns"] += out.pop("assistant_turns")
        stats["cut_turns"] += out.pop("cut_turns")
        stats["no_assistant"] += 1 not in out["assistant_masks"]
        if max_length is not None and len(out["input_ids"]) > max_length:
            stats["truncated"] += 1
            stats["emptied"] += 1 not in out["assistant_masks"][:max_length]
        return out

    rows = [tokenize(row) for row in ds]
    tokenized = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                   "assistant_masks": [r["assistant_masks"] for r in rows]})
    _log_tokenize_counts(stats, len(ds), max_length, what)
    if stats["no_assistant"] == len(ds):
        raise DataError(f"none of the {len(ds)} {what} conversations has an assistant token once rendered by the "
                        "chat template: check the tokenizer's chat_template")
    return tokenized


def _log_tokenize_counts(stats: dict, rows: int, max_length: int | None, what: str) -> None:
    if stats["truncated"]:
        logger.warning("%d of %d %s rows are longer than max_length=%s tokens and are truncated (the start is kept)"
                       "; %d of them keep no assistant token (no loss)", stats["truncated"], rows, what,
                       max_length, stats["emptied"])
    if stats["cut_turns"]:
        logger.warning("%d of %d assistant turns of the %s rows render differently once later turns follow (the "
                       "chat template is not prefix-preserving, e.g. it drops earlier reasoning): each is trained "
                       "only up to where the renderings differ, possibly not at all (train_on_all_assistant_turns="
                       "false trains the last turn only)", stats["cut_turns"], stats["turns"], what)
    logger.info("%s: %d conversations, %d assistant turns trained (all assistant turns)", what, rows,
                stats["turns"])


def prepare_gsm8k_eval(
    *,
    dataset_id_or_path: str,
    dataset_subset: str | None = None,
    split: str = "test",
    data_columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_samples: int | None = None,
    synthetic: Mapping[str, Any] | None = None,
    seed: int = 42,
) -> list[dict]:
    """GSM8K-format evaluation items: ``[{"prompt": gsm8k_prompt(question, system_prompt), "answer": final,
    "question": question}, ...]``.

    `split` of `dataset_id_or_path` (any `load_raw` source, e.g. a GSM8K directory or ``"synthetic:arithmetic"``,
    whose eval split is ``"test"``) is read with the ``gsm8k`` column mapping (`data_columns` overrides
    ``question``/``answer``); ``answer`` is `gsm8k_final_answer` of the solution (commas removed). Rows with an empty
    question or no ``#### <final>`` line are dropped (count logged). `max_samples` keeps the first N after a seeded
    shuffle; without it the split's order is kept. Raises `DataError` like `prepare_sft_datasets`.
    """
    columns, explicit = _resolve_columns("gsm8k", data_columns)
    source = str(dataset_id_or_path)
    ds = load_raw(source, synthetic=synthetic, seed=seed, subset=dataset_subset)
    if split not in ds:
        raise DataError(f"dataset '{source}' has no split '{split}' for evaluation; available splits: {list(ds)}")
    ds = ds[split]
    _check_columns(ds, source, split, "gsm8k", columns, explicit)
    items = []
    for question, solution in zip(ds[columns["question"]], ds[columns["answer"]], strict=True):
        final = gsm8k_final_answer(solution) if isinstance(solution, str) else None
        if not isinstance(question, str) or not question.strip() or final is None:
            continue
        items.append({"prompt": gsm8k_prompt(question, system_prompt), "answer": final, "question": question.strip()})
    if len(items) < len(ds):
        logger.warning("Dataset '%s' split '%s': dropped %d of %d rows without a question or a '#### <final>' answer",
                       source, split, len(ds) - len(items), len(ds))
    if not items:
        raise DataError(f"dataset '{source}' split '{split}' has no row with a question and a '#### <final>' answer")
    if max_samples is not None:
        if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
            raise DataError(f"max_samples must be a positive integer or null, got {max_samples!r}")
        if max_samples < len(items):
            order = list(range(len(items)))
            random.Random(seed).shuffle(order)
            items = [items[i] for i in order[:max_samples]]
    return items


def gsm8k_prompt_dataset(
    *,
    dataset_id_or_path: str,
    dataset_subset: str | None = None,
    split: str = "train",
    data_columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    max_samples: int | None = None,
    synthetic: Mapping[str, Any] | None = None,
    seed: int = 42,
) -> Dataset:
    """`prepare_gsm8k_eval` as a `datasets.Dataset` with columns ``prompt``, ``answer``, ``question`` (for GRPO:
    TRL passes the extra columns to reward functions as keyword arguments)."""
    items = prepare_gsm8k_eval(dataset_id_or_path=dataset_id_or_path, dataset_subset=dataset_subset, split=split,
                               data_columns=data_columns, system_prompt=system_prompt, max_samples=max_samples,
                               synthetic=synthetic, seed=seed)
    return Dataset.from_list(items)
