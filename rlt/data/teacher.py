"""RLT data: the teacher's SFT warm-up rows, the teacher's RL prompts, and the student chat the reward scores.

Every tag, separator and system prompt is a `TeacherFormat` field; the chat layouts, the padding rule and why rows
are dropped (counted, never raised on) are in docs/rlt.md "Data". `prepare_teacher_datasets` is the entry point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from rlt.config import TEACHER_DATA_FORMATS
from rlt.data.formats import gsm8k_final_answer, gsm8k_reasoning, normalise_turns
from rlt.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MODES = ("sft", "rl")

# Per data format: logical field -> default column name (override with `columns`).
TEACHER_COLUMNS: dict[str, dict[str, str]] = {
    "custom": {"question": "question", "solution": "solution", "reasoning_trace": "reasoning_trace"},
    "gsm8k": {"question": "question", "answer": "answer"},
    "stratos": {"conversations": "conversations"},
}

# Why a row was rejected (keys of the counter `build_teacher_rows` returns).
REJECT_EMPTY = "empty"  # no question, no solution, or (SFT) no explanation trace
REJECT_AMBIGUOUS = "ambiguous"  # a tag inside a content, or the split point occurs more than once
REJECT_MALFORMED = "malformed"  # a Stratos conversation without user turn / thought block / solution block
REJECT_BOUNDARY = "unclean_boundary"  # SFT prompt tokens are not a prefix of prompt+completion tokens
REJECT_TOO_LONG = "too_long"  # over max_prompt_tokens / max_length

_SENTINEL = "\x00RLT-SPLIT\x00"  # never occurs in real text; used to locate contents inside rendered chats

# The default system prompts are the published texts, verbatim (tags templated), because the published checkpoints
# were trained with them: the teacher prompt is the one the RLT reference trains its teachers with, the student prompt
# is Bespoke-Stratos / SkyThought's (the Bespoke-Stratos-17k conversations and the Bespoke-Stratos-7B student). A
# student scored under another wording gives other log-probs. Their typos ("analisying") are part of the text.
_TEACHER_PROMPT = (
    "Your role as an assistant involves providing precise and accurate solutions before providing detailed "
    "explanations with your full work showing your systematic thinking process leading to each solution. "
    "Your explanations should show how you engaged in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracing, and iteration to develop well-considered thinking process. "
    "Please structure your response into two main sections: Solution and Explanation. "
    "In the Solution section, present your well-thought solution that accurately answers the question. The solution "
    "should remain a logical, accurate, concise expression style and detail necessary step needed to reach the "
    "conclusion, formatted as follows: {solution_open} {{final formatted, precise, and clear solution}} "
    "{solution_close}. "
    "In the Explanation section, comprehensively detail your reasoning process using the specified format: "
    "{explanation_open} {{explanation with steps separated with '\\n\\n'}} {explanation_close} Each step should "
    "show detailed considerations leading to your solutions such as analisying questions, summarizing relevant "
    "findings, brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and "
    "revisiting previous steps. "
)
_STUDENT_PROMPT = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking process "
    "before providing the final precise and accurate solutions. "
    "This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, reflection, "
    "backtracing, and iteration to develop well-considered thinking process. "
    "Please structure your response into two main sections: Thought and Solution. "
    "In the Thought section, detail your reasoning process using the specified format: {think_open} {{thought with "
    "steps separated with '\\n\\n'}} {think_close} Each step should include detailed considerations such as "
    "analisying questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy of the "
    "current steps, refining any errors, and revisiting previous steps. "
    "In the Solution section, based on various attempts, explorations, and reflections from the Thought section, "
    "systematically present the final solution that you deem correct. The solution should remain a logical, "
    "accurate, concise expression style and detail necessary step needed to reach the conclusion, formatted as "
    "follows: {solution_open} {{final formatted, precise, and clear solution}} {solution_close} Now, try to solve "
    "the following question through the above guidelines:"
)


@dataclass(frozen=True)
class TeacherFormat:
    """Tags, separators and system prompts shared by the teacher data, the student chat and the teacher reward.

    The tags are plain text (not special tokens). ``think_prefix`` goes before the student's thought tag;
    ``think_solution_delimiter`` separates the student's thought block from its solution block and the teacher's
    solution block from its explanation block; ``delimiters_padding`` wraps every content inside its tags. The system
    prompts default (``None``) to built-in texts that name this format's tags.
    """

    name: str = "stratos"
    solution_open: str = "<|begin_of_solution|>"
    solution_close: str = "<|end_of_solution|>"
    explanation_open: str = "<|begin_of_explanation|>"
    explanation_close: str = "<|end_of_explanation|>"
    think_open: str = "<|begin_of_thought|>"
    think_close: str = "<|end_of_thought|>"
    think_prefix: str = ""
    think_solution_delimiter: str = "\n\n"
    delimiters_padding: str = "\n\n"
    teacher_system_prompt: str | None = None
    student_system_prompt: str | None = None

    def __post_init__(self) -> None:
        for field in ("solution_open", "solution_close", "explanation_open", "explanation_close", "think_open",
                      "think_close"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"TeacherFormat.{field} must be a non-empty string, got {value!r}")
        for field in ("think_prefix", "think_solution_delimiter", "delimiters_padding"):
            if not isinstance(getattr(self, field), str):
                raise ConfigError(f"TeacherFormat.{field} must be a string, got {getattr(self, field)!r}")
        if self.explanation_open == self.explanation_close or self.explanation_open in self.explanation_close:
            raise ConfigError("TeacherFormat: the explanation open tag must differ from (and not be part of) the "
                              f"close tag, got {self.explanation_open!r} / {self.explanation_close!r}")
        tags = dict(self.tags())
        if self.teacher_system_prompt is None:
            object.__setattr__(self, "teacher_system_prompt", _TEACHER_PROMPT.format(**tags))
        if self.student_system_prompt is None:
            object.__setattr__(self, "student_system_prompt", _STUDENT_PROMPT.format(**tags))

    def tags(self) -> Iterable[tuple[str, str]]:
        return ((f, getattr(self, f)) for f in ("solution_open", "solution_close", "explanation_open",
                                               "explanation_close", "think_open", "think_close"))

    @classmethod
    def r1(cls, **overrides: Any) -> TeacherFormat:
        """The "r1" style: ``<solution>``, ``<explanation>``, ``<think>`` tags (same separators and padding)."""
        return cls(**{"name": "r1", "solution_open": "<solution>", "solution_close": "</solution>",
                      "explanation_open": "<explanation>", "explanation_close": "</explanation>",
                      "think_open": "<think>", "think_close": "</think>", **overrides})

    def pad(self, content: str) -> str:
        """``padding + content.strip() + padding``."""
        return f"{self.delimiters_padding}{content.strip()}{self.delimiters_padding}"

    def solution_block(self, solution: str) -> str:
        return f"{self.solution_open}{self.pad(solution)}{self.solution_close}"

    def explanation_block(self, explanation: str) -> str:
        return f"{self.explanation_open}{self.pad(explanation)}{self.explanation_close}"

    @property
    def split_point(self) -> str:
        """Where the teacher's generation starts: the explanation open tag plus padding."""
        return self.explanation_open + self.delimiters_padding

    @property
    def fingerprint(self) -> str:
        """``name:hash`` of every field; the RL rows carry it and the reward checks it matches its own format."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"{self.name}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


TEACHER_FORMATS = {"stratos": TeacherFormat, "r1": TeacherFormat.r1}


def get_teacher_format(fmt: TeacherFormat | str | Mapping[str, Any] | None = None, **overrides: Any) -> TeacherFormat:
    """A `TeacherFormat` from an instance, a style name (``"stratos"``, ``"r1"``), or a mapping (a Hydra node) of
    fields with an optional ``style`` key; ``overrides`` replace fields."""
    if isinstance(fmt, TeacherFormat):
        return dataclasses.replace(fmt, **overrides) if overrides else fmt
    if fmt is None:
        fmt = "stratos"
    if isinstance(fmt, str):
        style, fields = fmt, {}
    elif isinstance(fmt, Mapping):
        fields = {str(k): v for k, v in dict(fmt).items()}
        style = fields.pop("style", fields.get("name", "stratos"))
    else:
        raise ConfigError("teacher format must be a TeacherFormat, a style name or a mapping, "
                          f"got {type(fmt).__name__}")
    if style not in TEACHER_FORMATS:
        raise ConfigError(f"unknown teacher format style {style!r}; expected one of {sorted(TEACHER_FORMATS)}")
    fields.update(overrides)
    known = {f.name for f in dataclasses.fields(TeacherFormat)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown TeacherFormat field(s) {unknown}; known: {sorted(known)}")
    return TEACHER_FORMATS[style](**fields)


# ------------------------------------------------------------------------------------------------------ row parsing


@dataclass(frozen=True)
class TeacherRow:
    """A parsed source row: contents without tags or padding (``trace`` is ``None`` when the source has none)."""

    question: str
    solution: str
    trace: str | None = None


def _text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int | float):
        return "" if value != value else str(value)  # NaN -> ""
    return value.strip() if isinstance(value, str) else ""


def _block(text: str, open_tag: str, close_tag: str) -> str | None:
    match = re.search(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag), text, flags=re.DOTALL)
    return match.group(1) if match else None


def parse_teacher_row(row: Mapping[str, Any], data_format: str, fmt: TeacherFormat,
                      columns: Mapping[str, str] | None = None) -> TeacherRow | str:
    """One raw row -> `TeacherRow`, or a rejection reason (``"empty"`` / ``"malformed"``).

    * ``custom``: columns ``question``, ``solution`` and optional ``reasoning_trace`` (names overridable).
    * ``gsm8k``: ``question`` and ``answer``; trace = the worked lines (`gsm8k_reasoning`), solution = the final
      answer after ``####``.
    * ``stratos``: ``conversations`` (``from``/``value`` or ``role``/``content``); the first user turn is the
      question, the first assistant turn holds the thought block and the solution block (in `fmt`'s think and
      solution tags).
    """
    if data_format not in TEACHER_COLUMNS:
        raise DataError(f"unknown teacher data format {data_format!r}; expected one of {list(TEACHER_DATA_FORMATS)}")
    cols = {**TEACHER_COLUMNS[data_format], **dict(columns or {})}

    def get(name: str) -> Any:
        return row.get(cols[name])

    if data_format == "custom":
        question, solution = _text(get("question")), _text(get("solution"))
        trace = _text(get("reasoning_trace")) if cols["reasoning_trace"] in row else None
    elif data_format == "gsm8k":
        question, answer = _text(get("question")), _text(get("answer"))
        solution = gsm8k_final_answer(answer) or ""
        trace = gsm8k_reasoning(answer) if answer else ""
    else:
        turns = normalise_turns(get("conversations"))
        if turns is None:
            return REJECT_MALFORMED
        question = next((m["content"] for m in turns if m["role"] == "user"), None)
        answer = next((m["content"] for m in turns if m["role"] == "assistant"), None)
        if question is None or answer is None:
            return REJECT_MALFORMED
        thought = _block(answer, fmt.think_open, fmt.think_close)
        sol = _block(answer, fmt.solution_open, fmt.solution_close)
        if thought is None or sol is None:
            return REJECT_MALFORMED
        solution, trace = sol.strip(), thought.strip()
    if not question or not solution:
        return REJECT_EMPTY
    return TeacherRow(question=question, solution=solution, trace=trace)


def detect_data_format(column_names: Iterable[str], columns: Mapping[str, str] | None = None) -> str:
    """``stratos`` if there is a conversations column, ``gsm8k`` for question+answer without solution, else custom."""
    names = set(column_names)
    cols = dict(columns or {})
    if cols.get("conversations", "conversations") in names:
        return "stratos"
    if cols.get("answer", "answer") in names and cols.get("solution", "solution") not in names:
        return "gsm8k"
    return "custom"


# ------------------------------------------------------------------------------------------------------- builders


def _row(row: TeacherRow | Mapping[str, Any]) -> TeacherRow:
    if isinstance(row, TeacherRow):
        return row
    trace = row.get("trace", row.get("reasoning_trace"))
    return TeacherRow(question=_text(row.get("question")), solution=_text(row.get("solution")),
                      trace=None if trace is None else _text(trace))


def _render(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(text, str):
        raise ConfigError("tokenizer.apply_chat_template(tokenize=False) did not return a string; the tokenizer needs "
                          "a chat template")
    return text


def _split_once(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise DataError(f"{what}: expected {marker!r} exactly once in the rendered chat, found {text.count(marker)}")
    before, after = text.split(marker)
    return before, after


def _teacher_parts(row: TeacherRow, fmt: TeacherFormat, tokenizer) -> tuple[str, str]:
    """``(prompt, tail)``: the rendered teacher chat cut where the explanation body goes. ``prompt`` ends with
    ``explanation_open + padding``; ``tail`` is what the template puts after the assistant content (end of turn).
    The cut is located with a sentinel content, so tags in the system prompt cannot make it ambiguous."""
    assistant = fmt.solution_block(row.solution) + fmt.think_solution_delimiter + fmt.split_point + _SENTINEL
    text = _render(tokenizer, [{"role": "system", "content": fmt.teacher_system_prompt},
                               {"role": "user", "content": row.question},
                               {"role": "assistant", "content": assistant}])
    prompt, tail = _split_once(text, _SENTINEL, "teacher chat")
    if not prompt.endswith(fmt.split_point):
        raise DataError(f"the chat template changed the assistant content: the teacher prompt does not end with "
                        f"{fmt.split_point!r}")
    return prompt, tail


def _has_tags(row: TeacherRow, fmt: TeacherFormat) -> bool:
    """True if a content holds an explanation or solution tag (the split / the reward's tag search would be
    ambiguous)."""
    tags = (fmt.explanation_open, fmt.explanation_close, fmt.solution_open, fmt.solution_close)
    return any(tag in text for text in (row.question, row.solution, row.trace or "") for tag in tags)


def teacher_sft_example(row: TeacherRow | Mapping[str, Any], fmt: TeacherFormat, tokenizer) -> dict[str, str]:
    """The teacher SFT warm-up row ``{"prompt": str, "completion": str}`` (non-conversational prompt-completion).

    ``prompt`` = the rendered chat (system teacher prompt, user question, assistant solution block + delimiter)
    up to and including ``explanation_open + padding``; ``completion`` = explanation body + padding + closing tag +
    the rest of the assistant turn, cut right after the tokenizer's eos token when the template puts one there.
    Raises `DataError` when the row has no trace or a content holds a tag (`build_teacher_rows` turns that into a
    counted rejection).
    """
    row = _row(row)
    if not row.trace:
        raise DataError("teacher SFT row has no explanation trace")
    if _has_tags(row, fmt):
        raise DataError("teacher SFT row contains a solution/explanation tag inside its contents")
    prompt, tail = _teacher_parts(row, fmt, tokenizer)
    completion = row.trace.strip() + fmt.delimiters_padding + fmt.explanation_close + tail
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in completion:
        end = completion.rindex(eos) + len(eos)
        if not completion[end:].strip():
            completion = completion[:end]
    return {"prompt": prompt, "completion": completion}


def sft_boundary_is_clean(example: Mapping[str, str], tokenizer) -> bool:
    """True when tokenizing ``prompt`` alone gives a prefix of the tokens of ``prompt + completion`` (as TRL's
    SFTTrainer tokenizes them), i.e. the completion-only loss starts exactly at the first explanation token."""
    prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
    full_ids = tokenizer(text=example["prompt"] + example["completion"])["input_ids"]
    return len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids


def teacher_rl_prompt(row: TeacherRow | Mapping[str, Any], fmt: TeacherFormat, tokenizer) -> dict[str, str]:
    """The teacher RL row: ``prompt`` (a plain string ending right after ``explanation_open + padding``), and the
    reward columns ``question``, ``solution`` (stripped content, no tags/padding) and ``teacher_format``
    (`TeacherFormat.fingerprint`). With `student_chat` and the format these rebuild the student chat (§1.5)."""
    row = _row(row)
    if _has_tags(dataclasses.replace(row, trace=None), fmt):
        raise DataError("teacher RL row contains a solution/explanation tag inside its contents")
    return {"prompt": _teacher_parts(row, fmt, tokenizer)[0], "question": row.question, "solution": row.solution,
            "teacher_format": fmt.fingerprint}


def student_chat_parts(question: str, solution: str, fmt: TeacherFormat, tokenizer) -> tuple[str, str]:
    """``(head, tail)`` of the student chat around the explanation text: ``head`` ends with the thought open tag,
    ``tail`` starts with the thought close tag, so ``head + explanation_text + tail == student_chat(...)``."""
    return _split_once(_render(tokenizer, student_messages(question, _SENTINEL, solution, fmt)), _SENTINEL,
                       "student chat")


def student_answer(explanation_text: str, solution: str, fmt: TeacherFormat) -> str:
    """The student's assistant turn (§1.5 step 3): ``think_prefix + think_open + explanation_text + think_close +
    delimiter + solution block``. Stratos example (padding ``"\n\n"``): ``student_answer("\n\nAdd.\n\n", "4",
    fmt)`` == ``"<|begin_of_thought|>\n\nAdd.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n4\n\n"
    "<|end_of_solution|>"``."""
    return (fmt.think_prefix + fmt.think_open + explanation_text + fmt.think_close + fmt.think_solution_delimiter
            + fmt.solution_block(solution))


def student_messages(question: str, explanation_text: str, solution: str, fmt: TeacherFormat) -> list[dict]:
    """The student chat as messages (system = student prompt, user = question, assistant = `student_answer`): what
    the reward scores, and a student SFT row (``data_format=messages``)."""
    return [{"role": "system", "content": fmt.student_system_prompt},
            {"role": "user", "content": question.strip()},
            {"role": "assistant", "content": student_answer(explanation_text, solution, fmt)}]


def student_chat(question: str, explanation_text: str, solution: str, fmt: TeacherFormat, tokenizer) -> str:
    """The student's full chat (§1.5 step 3), rendered without a generation prompt: system = student prompt,
    user = question, assistant = ``think_prefix + think_open + explanation_text + think_close + delimiter +
    solution block``. ``explanation_text`` is used verbatim (it already holds its padding, as the text between the
    teacher's explanation tags does); ``solution`` is stripped and padded inside the solution tags."""
    head, tail = student_chat_parts(question, solution, fmt, tokenizer)
    return head + explanation_text + tail


# ------------------------------------------------------------------------------------------------------- datasets


def build_teacher_rows(rows: Iterable[Mapping[str, Any]], *, mode: str, fmt: TeacherFormat, tokenizer,
                       data_format: str, columns: Mapping[str, str] | None = None,
                       max_prompt_tokens: int | None = None, max_length: int | None = None,
                       ) -> tuple[list[dict[str, str]], Counter]:
    """Raw rows -> SFT (`teacher_sft_example`) or RL (`teacher_rl_prompt`) rows, and a Counter of rejections by
    reason. Custom rows without a trace column use the solution as the trace (as the reference does); a trace
    column that is present but empty rejects the row (SFT only; RL needs no trace)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    out: list[dict[str, str]] = []
    rejected: Counter = Counter()
    for raw in rows:
        parsed = parse_teacher_row(raw, data_format, fmt, columns)
        if isinstance(parsed, str):
            rejected[parsed] += 1
            continue
        if mode == "sft":
            if parsed.trace is None:
                parsed = dataclasses.replace(parsed, trace=parsed.solution)
            if not parsed.trace:
                rejected[REJECT_EMPTY] += 1
                continue
        if _has_tags(parsed if mode == "sft" else dataclasses.replace(parsed, trace=None), fmt):
            rejected[REJECT_AMBIGUOUS] += 1
            continue
        try:
            example = teacher_sft_example(parsed, fmt, tokenizer) if mode == "sft" else \
                teacher_rl_prompt(parsed, fmt, tokenizer)
        except DataError:
            rejected[REJECT_AMBIGUOUS] += 1
            continue
        if mode == "sft":
            if not sft_boundary_is_clean(example, tokenizer):
                rejected[REJECT_BOUNDARY] += 1
                continue
            if (max_length is not None
                    and len(tokenizer(text=example["prompt"] + example["completion"])["input_ids"]) > max_length):
                rejected[REJECT_TOO_LONG] += 1
                continue
        elif max_prompt_tokens is not None and len(tokenizer(text=example["prompt"])["input_ids"]) > max_prompt_tokens:
            rejected[REJECT_TOO_LONG] += 1
            continue
        out.append(example)
    return out, rejected


def _prepare_split(ds: Dataset, *, source: str, split: str, mode: str, fmt: TeacherFormat, tokenizer,
                   data_format: str, columns: Mapping[str, str] | None, max_prompt_tokens: int | None,
                   max_length: int | None) -> Dataset:
    resolved = detect_data_format(ds.column_names, columns) if data_format == "auto" else data_format
    cols = {**TEACHER_COLUMNS[resolved], **dict(columns or {})}
    unknown = sorted(set(columns or {}) - set(TEACHER_COLUMNS[resolved]))
    if unknown:
        raise DataError(f"columns has key(s) {unknown} that teacher data format '{resolved}' does not use; its "
                        f"fields are {sorted(TEACHER_COLUMNS[resolved])}")
    required = [name for name in cols if not (resolved == "custom" and name == "reasoning_trace")]
    missing = [cols[name] for name in required if cols[name] not in ds.column_names]
    if missing:
        raise DataError(f"dataset '{source}' split '{split}' has no column(s) {missing} needed by teacher data format "
                        f"'{resolved}'; columns present: {ds.column_names}")
    if resolved == "custom" and mode == "sft" and cols["reasoning_trace"] not in ds.column_names:
        logger.warning("Dataset '%s' split '%s' has no '%s' column: the solution is used as the explanation trace",
                       source, split, cols["reasoning_trace"])
    rows, rejected = build_teacher_rows(ds, mode=mode, fmt=fmt, tokenizer=tokenizer, data_format=resolved,
                                        columns=columns, max_prompt_tokens=max_prompt_tokens, max_length=max_length)
    if rejected:
        logger.warning("Dataset '%s' split '%s' (%s, teacher %s): rejected %d of %d rows: %s", source, split, resolved,
                       mode, sum(rejected.values()), len(ds), dict(sorted(rejected.items())))
    if not rows:
        raise DataError(f"dataset '{source}' split '{split}': none of its {len(ds)} rows is usable as teacher {mode} "
                        f"data (format '{resolved}'; rejected: {dict(rejected)}); check the columns and the tags")
    return Dataset.from_list(rows)


def prepare_teacher_datasets(
    source: str,
    *,
    mode: str,
    tokenizer,
    fmt: TeacherFormat | str | Mapping[str, Any] | None = None,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    eval_split: str | None = None,
    data_format: str = "auto",
    max_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_prompt_tokens: int | None = None,
    max_length: int | None = None,
    synthetic: Mapping[str, Any] | None = None,
    subset: str | None = None,
    seed: int = 42,
) -> tuple[Dataset, Dataset | None]:
    """Teacher datasets ``(train, eval or None)`` from any `load_raw` source.

    ``mode="sft"`` gives ``prompt``/``completion`` string rows for TRL's SFTTrainer (``completion_only_loss``);
    ``mode="rl"`` gives ``prompt``/``question``/``solution``/``teacher_format`` rows for GRPO with
    `rlt.rewards.TeacherKLReward`. ``data_format`` is ``custom``/``gsm8k``/``stratos`` or ``auto`` (detected from
    the column names); ``columns`` renames the logical fields (`TEACHER_COLUMNS`). Unusable rows are dropped and
    counted per reason; ``max_prompt_tokens`` (RL) / ``max_length`` (SFT) drop rows that are too long instead of
    letting them be truncated. ``max_samples`` keeps a seeded random subset. Raises `DataError` for a missing
    split/column or when no usable row is left.
    """
    from rlt.data.loading import load_raw

    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if data_format not in TEACHER_DATA_FORMATS:
        raise DataError(f"unknown teacher data format {data_format!r}; expected one of {list(TEACHER_DATA_FORMATS)}")
    fmt = get_teacher_format(fmt)
    source = str(source)
    raw = load_raw(source, synthetic=synthetic, seed=seed, subset=subset)
    if split not in raw:
        raise DataError(f"dataset '{source}' has no split '{split}'; available splits: {list(raw)}")
    kwargs = dict(source=source, mode=mode, fmt=fmt, tokenizer=tokenizer, data_format=data_format, columns=columns,
                  max_prompt_tokens=max_prompt_tokens, max_length=max_length)

    def subsample(ds: Dataset, n: int | None) -> Dataset:
        if n is None:
            return ds
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DataError(f"max samples must be a positive integer or null, got {n!r}")
        if n >= len(ds):
            return ds
        return ds.shuffle(seed=seed).select(range(n)).flatten_indices()

    train = subsample(_prepare_split(raw[split], split=split, **kwargs), max_samples)
    eval_ds = None
    if eval_split is not None:
        if eval_split in raw:
            eval_ds = subsample(_prepare_split(raw[eval_split], split=eval_split, **kwargs), max_eval_samples)
        else:
            logger.warning("Dataset '%s' has no eval split '%s' (available: %s): no teacher eval data", source,
                           eval_split, list(raw))
    logger.info("Teacher %s data from '%s' (%s): %d train rows, %s eval rows", mode, source, fmt.name, len(train),
                len(eval_ds) if eval_ds is not None else "no")
    return train, eval_ds
