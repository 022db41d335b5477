"""GSM8K rewards for GRPO-style training: answer correctness (checked with math-verify) and the tag format.

Both follow TRL's reward-function protocol: ``f(prompts=..., completions=..., completion_ids=..., **columns)`` with
one float per completion. Completions are plain strings or, for conversational prompts, message lists such as
``[{"role": "assistant", "content": "..."}]``. TRL logs a reward function as ``rewards/<__name__>/mean``, so the two
functions are named ``correctness`` and ``format``.

The same answer checker (`answers_equivalent`, `grade_completion`) is used by `rlt.evaluate`, so an evaluation's
accuracy and the training reward agree on what counts as a correct answer.

math-verify notes (version 0.9.0):

- ``parse`` and ``verify`` guard their work with ``signal.alarm``, which only works in the main thread; elsewhere they
  raise ``ValueError``. We pass timeouts in the main thread and ``None`` in other threads (TRL runs async reward
  functions on an event-loop thread). Without a timeout, a power tower such as ``9^9^9^9`` would make ``verify``
  evaluate a gigantic number forever, so parsed expressions that could blow up (a power whose exponent is not a
  small number or whose base is not a plain atom, factorials, more than `MAX_EXPR_NODES` nodes) are never
  verified (they count as wrong), and texts longer than `MAX_ANSWER_CHARS` are not parsed.
- Its ``TimeoutException`` derives from ``BaseException``, not ``Exception``; we catch it explicitly.
- ``parse`` extracts the *last* expression (or one after an anchor such as "answer is"): ``"18 apples, minus 3 is 15"``
  parses as 15. It handles ``$``, thousands separators (``"1,234"`` -> 1234; but ``"12,50"`` -> 12.5), ``\\boxed{}``,
  ``\\frac{}{}``, ``x = 5`` (-> 5) and percentages (``"5%"`` verifies equal to 5).
- It does not understand the Unicode minus ``"−5"`` or an escaped dollar ``"\\$18"``; we normalise both first. A
  number right after an opening tag is not found (``parse("<answer>18</answer>") == []``), so only the text *inside*
  the tags is ever parsed. Scientific notation is misread (``"1e3"`` -> 1) and non-ASCII digits are not read.
- ``verify`` compares numbers after rounding (``float_rounding=6``): ``0.333333`` equals ``1/3``.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

CORRECT_REWARD = 2.0
PARTIAL_REWARD = 1.0
FORMAT_TAG_REWARD = 0.2

MAX_ANSWER_CHARS = 500  # longer candidate answers are not parsed (cost bound; no GSM8K answer is near this)
MAX_NUMBER_CHARS = 64  # longer digit runs are not treated as numbers
MAX_EXPR_NODES = 200
MAX_EXPONENT = 64
PARSE_TIMEOUT_S = 2  # math-verify timeouts (whole seconds: signal.alarm), main thread only
VERIFY_TIMEOUT_S = 2

REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_TAGS = (REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# ASCII digits only: `\d` would also match e.g. Arabic-Indic digits, which math-verify does not read.
_NUMBER_RE = re.compile(r"-?[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?(?:/[0-9]+)?")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\uff0d": "-"})


# ------------------------------------------------------------------------------------------------ text extraction


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; for a message list, the content of the last assistant message
    (the last message if none has role ``assistant``); text parts of list contents are joined. Anything else -> ""."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence) and not isinstance(completion, bytes | bytearray):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        return _content_text(chosen[-1].get("content")) if chosen else ""
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def extract_tagged_answer(text: str) -> str | None:
    """The stripped text between the last ``</answer>`` and the last ``<answer>`` before it, or None when there is
    no such pair. ``"<answer>3</answer><answer> 5 </answer>"`` -> ``"5"``; ``"<answer>5"`` -> None."""
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


def _numbers(text: str) -> list[str]:
    return [n for n in _NUMBER_RE.findall(text.translate(_UNICODE_MINUS)) if len(n) <= MAX_NUMBER_CHARS]


def extract_fallback_answer(text: str) -> str | None:
    """The number a completion ends on when its answer is not (correctly) in answer tags, for partial credit.

    The first that applies: the last number inside the last ``<answer>…</answer>`` pair; the first number on the
    first non-empty line after the last ``####``; the last number in the whole text. None if there is no number.
    Numbers are ASCII ``-1,234.5`` or ``3/4`` style, at most `MAX_NUMBER_CHARS` characters.
    """
    tagged = extract_tagged_answer(text)
    if tagged and (numbers := _numbers(tagged)):
        return numbers[-1]
    if "####" in text:
        lines = [line for line in text.rsplit("####", 1)[1].splitlines() if line.strip()]
        if lines and (numbers := _numbers(lines[0])):
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def reference_answer(reference: Any) -> str | None:
    """The final answer of a reference: a number as text; a full GSM8K solution is cut to what follows ``####``."""
    if isinstance(reference, bool) or reference is None:
        return None
    if isinstance(reference, int | float):
        reference = str(reference)
    if not isinstance(reference, str):
        return None
    if "####" in reference:
        from rlt.data.formats import gsm8k_final_answer

        reference = gsm8k_final_answer(reference) or ""
    reference = reference.strip()
    return reference or None


# ----------------------------------------------------------------------------------------------- math-verify check


def _normalise(text: str) -> str:
    return text.translate(_UNICODE_MINUS).replace("\\$", "$").strip()


def _main_thread() -> bool:
    main = threading.current_thread() is threading.main_thread()
    if not main:
        _quiet_no_timeout_warning()
    return main


class _NoTimeoutWarningFilter(logging.Filter):
    """Drops math-verify's one-time "Timeout is disabled" warning: outside the main thread we run without its
    signal-based timeouts on purpose and bound the work ourselves (`MAX_ANSWER_CHARS`, `_is_tame`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@functools.cache
def _quiet_no_timeout_warning() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarningFilter())


def _mv_parse(text: str) -> list:
    """math-verify's ``parse`` (LaTeX + plain expressions); [] on any error or timeout."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return list(parse(text, parsing_timeout=PARSE_TIMEOUT_S if _main_thread() else None))
    except ValueError as e:
        if "threaded environment" in str(e):  # main thread of a sub-interpreter: retry without signals
            return _mv_parse_no_timeout(text)
        return []
    except (Exception, TimeoutException):  # noqa: BLE001 - a reward must never raise on model output
        logger.debug("math-verify could not parse %r", text[:200], exc_info=True)
        return []


def _mv_parse_no_timeout(text: str) -> list:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return list(parse(text, parsing_timeout=None))
    except (Exception, TimeoutException):  # noqa: BLE001
        return []


@functools.lru_cache(maxsize=4096)
def _parse_reference(text: str) -> tuple:
    # References repeat (once per generation of a prompt): parse each once.
    return tuple(_mv_parse(text))


def _is_tame(expr: Any) -> bool:
    """True if evaluating `expr` is cheap: a string, or a sympy expression of at most `MAX_EXPR_NODES` nodes whose
    powers have an atomic base and a number exponent of magnitude <= `MAX_EXPONENT`, and with no factorials."""
    if isinstance(expr, str):
        return True
    import sympy
    from sympy.functions.combinatorial.factorials import CombinatorialFunction

    if not isinstance(expr, sympy.Basic):
        return False
    for count, node in enumerate(sympy.preorder_traversal(expr), start=1):
        if count > MAX_EXPR_NODES or isinstance(node, CombinatorialFunction):
            return False
        if isinstance(node, sympy.Pow):
            exp = node.exp
            if not (exp.is_Number and abs(exp) <= MAX_EXPONENT and node.base.is_Atom):
                return False
    return True


def answers_equivalent(predicted: str | None, reference: Any) -> bool:
    """Whether `predicted` states the same mathematical value as `reference` (math-verify ``parse`` + ``verify``).

    ``"1,234"`` ~ ``"1234"``, ``"0.75"`` ~ ``"3/4"``, ``"\\boxed{12}"`` ~ ``"12"``, ``"$18.00"`` ~ ``"18"``,
    ``"-5"`` ~ ``"−5"``. When the reference is not parseable as math, stripped texts must be equal. Never raises:
    None, empty, over-long (> `MAX_ANSWER_CHARS`) or unparseable text, expressions that are too costly to evaluate
    (see `_is_tame`), timeouts and math-verify errors all give False.
    """
    try:
        ref = reference_answer(reference)
        if not isinstance(predicted, str) or ref is None:
            return False
        pred, ref = _normalise(predicted), _normalise(ref)
        if not pred or len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
            return False
        gold = [g for g in _parse_reference(ref) if _is_tame(g)]
        if not gold:
            return pred == ref
        target = [t for t in _mv_parse(pred) if _is_tame(t)]
        if not target:
            return False
        return _mv_verify(gold, target)
    except Exception:  # noqa: BLE001 - never let a checker bug crash training on odd model output
        logger.debug("answer check failed for %r vs %r", predicted, reference, exc_info=True)
        return False


def _mv_verify(gold: list, target: list) -> bool:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout = VERIFY_TIMEOUT_S if _main_thread() else None
    for attempt in range(2):
        try:
            return bool(verify(gold, target, timeout_seconds=timeout))
        except ValueError as e:
            if attempt == 0 and timeout is not None and "threaded environment" in str(e):
                timeout = None
                continue
            return False
        except (Exception, TimeoutException):  # noqa: BLE001
            return False
    return False


def _has_answer_tag(text: str) -> bool:
    return ANSWER_OPEN in text or ANSWER_CLOSE in text


def grade_completion(completion: Any, reference: Any) -> tuple[float, str | None]:
    """``(score, predicted)`` for one completion against a reference final answer.

    - `CORRECT_REWARD` (2.0): the text inside the last ``<answer>…</answer>`` is equivalent to the reference
      (`answers_equivalent`) and holds no further answer tag (nested ``<answer><answer>18</answer></answer>`` is
      malformed); `predicted` is that text.
    - `PARTIAL_REWARD` (1.0): otherwise, `extract_fallback_answer` (the last number in the answer tags, else the
      number after the last ``####``, else the last number of the text) is equivalent; `predicted` is that number.
    - 0.0 otherwise, with `predicted` the tagged answer if any, else the fallback number, else None.

    Never raises (malformed input of any kind scores 0.0).
    """
    try:
        text = completion_text(completion)
        tagged = extract_tagged_answer(text) if text else None
        fallback = extract_fallback_answer(text) if text else None
        if reference_answer(reference) is not None:
            if tagged and not _has_answer_tag(tagged) and answers_equivalent(tagged, reference):
                return CORRECT_REWARD, tagged
            if fallback is not None and answers_equivalent(fallback, reference):
                return PARTIAL_REWARD, fallback
        return 0.0, tagged if tagged is not None else fallback
    except Exception:  # noqa: BLE001
        logger.debug("grading failed", exc_info=True)
        return 0.0, None


def format_score(completion: Any) -> float:
    """`FORMAT_TAG_REWARD` (0.2) for each well-placed tag of ``<reasoning>…</reasoning><answer>…</answer>``, max 0.8.

    Tags are the exact, case-sensitive strings `FORMAT_TAGS`. A tag is well placed when it occurs exactly once and:

    1. ``<reasoning>``: only whitespace precedes it;
    2. ``</reasoning>``: ``<reasoning>`` occurs exactly once, before it;
    3. ``<answer>``: ``</reasoning>`` occurs exactly once, before it;
    4. ``</answer>``: ``<answer>`` occurs exactly once, before it, and only whitespace follows it.

    Text between the tags is free (including between ``</reasoning>`` and ``<answer>``). Examples:
    ``"<reasoning>r</reasoning>\\n<answer>5</answer>\\n"`` -> 0.8; ``"Hi <reasoning>r</reasoning><answer>5</answer>"``
    -> 0.6 (rule 1 fails); ``"<answer>5</answer>"`` -> 0.2 (only rule 4: rule 3 needs ``</reasoning>``).
    """
    text = completion_text(completion)
    if not text:
        return 0.0
    positions: list[int | None] = []
    for tag in FORMAT_TAGS:
        pos = text.find(tag)
        positions.append(pos if pos >= 0 and text.find(tag, pos + 1) < 0 else None)  # None: missing or repeated
    r_open, r_close, a_open, a_close = positions
    ok = [
        r_open is not None and not text[:r_open].strip(),
        r_close is not None and r_open is not None and r_open < r_close,
        a_open is not None and r_close is not None and r_close < a_open,
        a_close is not None and a_open is not None and a_open < a_close
        and not text[a_close + len(ANSWER_CLOSE):].strip(),
    ]
    return round(FORMAT_TAG_REWARD * sum(ok), 6)


# --------------------------------------------------------------------------------------------- reward functions


def correctness_reward(completions: Sequence[Any], answer: Sequence[Any] | str, **kwargs: Any) -> list[float]:
    """TRL reward: `grade_completion` score (2.0 right answer in ``<answer>`` tags, 1.0 right number elsewhere,
    0.0 otherwise) for each completion against the aligned ``answer`` dataset column. Never raises on odd
    completions or answers; a single string `answer` applies to every completion. Logged as ``rewards/correctness``.
    """
    references = [answer] * len(completions) if isinstance(answer, str) else list(answer)
    if len(references) != len(completions):
        raise ValueError(f"correctness reward: {len(completions)} completions but {len(references)} answers")
    scores = [grade_completion(c, ref)[0] for c, ref in zip(completions, references, strict=True)]
    if kwargs.get("log_metric") is not None and scores:  # TRL's: train and eval (eval_gsm8k/...) alike
        for name, value in accuracy_metrics(scores).items():
            kwargs["log_metric"](name, value)
    return scores


def accuracy_metrics(scores: Sequence[float]) -> dict[str, float]:
    """GSM8K accuracy of sampled completions from their correctness scores: ``gsm8k/accuracy`` = the right number
    anywhere (score >= 1), ``gsm8k/strict_accuracy`` = inside the answer tags (score 2), as `rlt.evaluate` counts.

    >>> accuracy_metrics([2.0, 1.0, 0.0, 2.0])
    {'gsm8k/accuracy': 0.75, 'gsm8k/strict_accuracy': 0.5}
    """
    n = len(scores)
    return {"gsm8k/accuracy": sum(s >= 1.0 for s in scores) / n,
            "gsm8k/strict_accuracy": sum(s >= 2.0 for s in scores) / n}


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward: `format_score` (0.2 per well-placed ``<reasoning>…</reasoning><answer>…</answer>`` tag, max 0.8)
    for each completion. Logged as ``rewards/format``."""
    return [format_score(c) for c in completions]


# TRL names a reward function by its `__name__` (rewards/<name>/mean). `__qualname__` stays, so pickling still
# finds the functions under their module-level names.
correctness_reward.__name__ = "correctness"
format_reward.__name__ = "format"
