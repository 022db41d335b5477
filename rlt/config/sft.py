"""The SFT run config: the shared sections plus TRL SFTTrainer's keys (`trainer_cfg/sft.yaml`) and the data mix."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlt.config.checks import DATA_FORMATS, is_number, positive
from rlt.config.sections import DataSection, ModelSection, OptimSection, RunSection, section_problems

# The keys of one `dataset_mix` source; every other key is refused.
MIX_SOURCE_KEYS = ("name", "dataset_id_or_path", "data_format", "split", "eval_split", "weight", "rows",
                   "dataset_subset", "data_columns", "system_prompt")
# Formats a mix refuses: teacher rows are RLT prompts, not SFT rows (they keep data_format=teacher, alone).
MIX_REFUSED_FORMATS = {"teacher": "RLT teacher rows train alone (data_format=teacher without dataset_mix)"}


@dataclass
class SFTSection:
    """Supervised fine-tuning on TRL's SFTTrainer (`trainer_cfg/sft.yaml`)."""

    max_length: int = 1024  # tokens per example; longer examples are truncated (counted in the log)
    packing: bool = False  # pack several examples per sequence (TRL bfd packing)
    completion_only_loss: bool | None = None  # null = loss on the completion for chat data, on all text for corpora
    # conversations (sharegpt / messages): loss on every assistant turn (true) or on the last one only (false);
    # system / user turns and the chat template's scaffolding are never trained
    train_on_all_assistant_turns: bool = True
    # several sources in one training set (data_cfg/instruct_mix.yaml): a list of {dataset_id_or_path, data_format,
    # weight | rows, split: train, eval_split, dataset_subset, data_columns, system_prompt, name}; see rlt.data.mix
    dataset_mix: list[dict[str, Any]] = field(default_factory=list)
    eval_accuracy_samples: int = 0  # gsm8k data: greedy accuracy on N eval problems before and after training
    eval_max_new_tokens: int = 64  # tokens generated per problem for eval_accuracy_samples (greedy)

    def problems(self) -> list[str]:
        errors: list[str] = []
        if self.max_length < 16:
            errors.append(f"max_length={self.max_length} must be >= 16")
        if self.eval_accuracy_samples < 0:
            errors.append(f"eval_accuracy_samples={self.eval_accuracy_samples} must be >= 0")
        positive(errors, "eval_max_new_tokens", self.eval_max_new_tokens)
        for index, source in enumerate(self.dataset_mix):
            errors += mix_source_problems(index, source)
        return errors


def _unknown_mix_key(where: str, key: str) -> str:
    close = difflib.get_close_matches(str(key), MIX_SOURCE_KEYS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (keys: {', '.join(MIX_SOURCE_KEYS)})"
    return f"{where}: unknown key {key!r}{hint}"


def _optional_text(errors: list[str], where: str, source: Mapping, key: str) -> None:
    value = source.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        errors.append(f"{where}.{key}={value!r} must be a non-empty string (or left out)")


def mix_source_problems(index: int, source: Any) -> list[str]:
    """What is wrong with `dataset_mix[index]`, one line each, naming the key and the index.

    >>> mix_source_problems(1, {"dataset_id_or_path": "d.jsonl", "data_format": "dolly", "weight": -1})
    ['dataset_mix[1].weight=-1 must be > 0']
    >>> mix_source_problems(0, {"data_format": "alpaca", "rows": 10, "wieght": 2})
    ["dataset_mix[0]: unknown key 'wieght' (did you mean weight?)", 'dataset_mix[0].dataset_id_or_path: missing (a hub id, file, directory or glob)']
    """  # noqa: E501 - a doctest's expected output is one line
    where = f"dataset_mix[{index}]"
    if not isinstance(source, Mapping):
        return [f"{where}={source!r} must be a mapping such as {{dataset_id_or_path: data.jsonl, data_format: "
                "alpaca, weight: 1}"]
    errors = [_unknown_mix_key(where, key) for key in source if key not in MIX_SOURCE_KEYS]
    path = source.get("dataset_id_or_path")
    if path is None:
        errors.append(f"{where}.dataset_id_or_path: missing (a hub id, file, directory or glob)")
    elif not isinstance(path, str) or not path.strip():
        errors.append(f"{where}.dataset_id_or_path={path!r} must be a non-empty string")
    data_format = source.get("data_format")
    if data_format is None:
        errors.append(f"{where}.data_format: missing (one of {[f for f in DATA_FORMATS if f != 'teacher']})")
    elif data_format in MIX_REFUSED_FORMATS:
        errors.append(f"{where}.data_format={data_format!r} is not allowed in a mix: "
                      f"{MIX_REFUSED_FORMATS[data_format]}")
    elif data_format not in DATA_FORMATS:
        errors.append(f"{where}.data_format={data_format!r} is not one of "
                      f"{[f for f in DATA_FORMATS if f not in MIX_REFUSED_FORMATS]}")
    if not errors or source.get("weight") is not None or source.get("rows") is not None:
        errors += _size_problems(where, source)  # (a misspelt weight is reported once, as an unknown key)
    for key in ("split", "eval_split", "name", "dataset_subset", "system_prompt"):
        _optional_text(errors, where, source, key)
    columns = source.get("data_columns")
    if columns is not None and (not isinstance(columns, Mapping)
                                or not all(isinstance(v, str) and v for v in columns.values())):
        errors.append(f"{where}.data_columns={columns!r} must map field names to column names, e.g. "
                      "{instruction: prompt}")
    return errors


def _size_problems(where: str, source: Mapping) -> list[str]:
    """A source gives its share as `weight` (> 0) or its size as `rows` (a positive integer), not both."""
    has_weight, has_rows = source.get("weight") is not None, source.get("rows") is not None
    if has_weight and has_rows:
        return [f"{where}: give weight or rows, not both (weight={source['weight']}, rows={source['rows']})"]
    if not has_weight and not has_rows:
        return [f"{where}: needs weight (its share of the mix) or rows (how many of its rows to use)"]
    if has_weight and (not is_number(source["weight"]) or source["weight"] <= 0):
        return [f"{where}.weight={source['weight']} must be > 0"]
    rows = source.get("rows")
    if has_rows and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        return [f"{where}.rows={rows} must be a positive integer"]
    return []


def mix_formats(mix: list) -> list[str]:
    """The data formats a mix lists (only those of well-formed sources)."""
    return [s["data_format"] for s in mix if isinstance(s, Mapping) and isinstance(s.get("data_format"), str)]


@dataclass
class SFTRunConfig(RunSection, ModelSection, DataSection, OptimSection, SFTSection):
    """Every key of an SFT run (`trainer_cfg=sft`)."""

    def sources_listed_elsewhere(self) -> bool:
        return bool(self.dataset_mix)

    def formats(self) -> list[str]:
        """The data formats this run trains on: the mix's, or the single `data_format`."""
        return mix_formats(self.dataset_mix) if self.dataset_mix else [self.data_format]

    def problems(self) -> list[str]:
        errors = section_problems(self)
        formats = self.formats()
        if self.dataset_mix:
            errors += self._mix_problems(formats)
        elif self.data_format == "teacher" and self.completion_only_loss is False:
            errors.append("data_format=teacher trains only on the explanation: completion_only_loss must not be false")
        if "text" in formats and self.completion_only_loss:
            errors.append("completion_only_loss=true needs prompt/completion data, but data_format=text has no "
                          "completion: set completion_only_loss=null")
        if self.eval_accuracy_samples and formats != ["gsm8k"]:
            got = "dataset_mix" if self.dataset_mix else repr(self.data_format)
            errors.append(f"eval_accuracy_samples={self.eval_accuracy_samples} needs data_format=gsm8k "
                          f"(got {got})")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                errors.append("early_stopping_patience needs eval_steps (evaluations to compare)")
            elif self.save_steps % self.eval_steps:
                errors.append(f"early_stopping_patience keeps the best checkpoint, so save_steps={self.save_steps} "
                              f"must be a multiple of eval_steps={self.eval_steps}")
        return errors

    def _mix_problems(self, formats: list[str]) -> list[str]:
        """Whole-mix rules: one kind of size for every source; text corpora only with text corpora."""
        errors: list[str] = []
        sources = [s if isinstance(s, Mapping) else {} for s in self.dataset_mix]
        by_weight = [i for i, s in enumerate(sources) if s.get("weight") is not None and s.get("rows") is None]
        by_rows = [i for i, s in enumerate(sources) if s.get("rows") is not None and s.get("weight") is None]
        if by_weight and by_rows:
            errors.append(f"dataset_mix: sources {by_weight} give weight and sources {by_rows} give rows: give every "
                          "source a weight (shares of the total) or every source rows (counts)")
        if by_rows and self.max_train_samples is not None:
            errors.append(f"max_train_samples={self.max_train_samples} with dataset_mix rows: the rows set the total "
                          "(set max_train_samples=null, or give the sources weights)")
        if "text" in formats and set(formats) != {"text"}:
            errors.append(f"dataset_mix mixes data_format=text with {sorted(set(formats) - {'text'})}: a text corpus "
                          "has no prompt/completion, so it mixes only with other text corpora")
        return errors
