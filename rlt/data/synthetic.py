"""Deterministic synthetic arithmetic word problems in GSM8K format (offline smoke tests and tiny training runs).

Each row is ``{"question": ..., "answer": ...}`` where the answer has GSM8K's shape: worked lines with ``<<a+b=c>>``
calculator annotations (always present, one per step) and a final ``#### <number>`` line. Every intermediate and
final value is a non-negative integer: a subtraction never takes away more than the running total.
"""

from __future__ import annotations

import random

from rlt.errors import DataError

SUPPORTED_OPS = "+-*"

_NAMES = ("Tom", "Mia", "Ravi", "Lena", "Omar", "Sofia", "Kenji", "Ada", "Noah", "Zara", "Luis", "Ivy")
_OBJECTS = ("apples", "marbles", "stickers", "pencils", "coins", "books", "shells", "cookies", "cards", "stamps")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def _check_args(n: int, max_operand: int, max_terms: int, ops: str) -> None:
    if not isinstance(n, int) or n < 0:
        raise DataError(f"synthetic: the number of problems must be a non-negative integer, got {n!r}")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise DataError(f"synthetic: max_operand must be an integer >= 1, got {max_operand!r}")
    if not isinstance(max_terms, int) or max_terms < 2:
        raise DataError(f"synthetic: max_terms must be an integer >= 2, got {max_terms!r}")
    bad = sorted(set(ops) - set(SUPPORTED_OPS))
    if not ops or bad:
        raise DataError(f"synthetic: ops must be a non-empty string of {SUPPORTED_OPS!r}, got {ops!r}")


def _steps(rng: random.Random, max_operand: int, max_terms: int, ops: str) -> tuple[int, list[tuple[str, int]]]:
    """A start value and a list of (op, operand) steps whose running total stays non-negative."""
    n_terms = rng.randint(2, max_terms)
    start = rng.randint(1, max_operand)
    total, steps = start, []
    for _ in range(n_terms - 1):
        op = rng.choice(ops)
        if op == "-" and total == 0:
            op = "+" if "+" in ops else op
        if op == "-":
            operand = rng.randint(1, min(total, max_operand)) if total > 0 else 0
            total -= operand
        elif op == "*":
            operand = rng.randint(2, max(2, min(max_operand, 9)))
            total *= operand
        else:
            operand = rng.randint(1, max_operand)
            total += operand
        steps.append((op, operand))
    return start, steps


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = <<{a}{op}{b}={result}>>{result}", result


_PLAIN_VERBS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply by {b}"}
_GAIN = (("gets", "getting"), ("finds", "finding"), ("buys", "buying"))
_LOSS = (("gives away", "giving away"), ("loses", "losing"), ("uses", "using"))


def _plain_problem(start: int, steps: list[tuple[str, int]]) -> dict:
    if len(steps) == 1:
        op, b = steps[0]
        question = f"What is {start} {_OP_WORDS[op]} {b}?"
    else:  # spelled out step by step, so operator precedence cannot make the question ambiguous
        actions = [_PLAIN_VERBS[op].format(b=b) for op, b in steps]
        question = f"Start with {start}, {', '.join(actions[:-1])}, then {actions[-1]}. What number do you get?"
    lines, total = [], start
    for op, b in steps:
        line, total = _calc(total, op, b)
        lines.append(line)
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {total}"}


def _word_problem(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> dict:
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    sentences = [f"{name} has {start} {obj}."]
    lines = [f"{name} starts with {start} {obj}."]
    total = start
    for i, (op, b) in enumerate(steps):
        then = "Then " if i else ""
        if op == "+":
            verb, gerund = rng.choice(_GAIN)
            sentences.append(f"{then}{name} {verb} {b} more.")
            intro = f"After {gerund} {b} more"
        elif op == "-":
            verb, gerund = rng.choice(_LOSS)
            sentences.append(f"{then}{name} {verb} {b} of them.")
            intro = f"After {gerund} {b}"
        else:
            sentences.append(f"{then}{name}'s number of {obj} becomes {b} times as large.")
            intro = f"After it becomes {b} times as large"
        line, total = _calc(total, op, b)
        lines.append(f"{intro}, {name} has {line} {obj}.")
    sentences.append(f"How many {obj} does {name} have now?")
    return {"question": " ".join(sentences), "answer": "\n".join(lines) + f"\n#### {total}"}


def _problem(rng: random.Random, max_operand: int, max_terms: int, ops: str) -> dict:
    start, steps = _steps(rng, max_operand, max_terms, ops)
    if rng.random() < 0.3:
        return _plain_problem(start, steps)
    return _word_problem(rng, start, steps)


def arithmetic_problems(
    n: int, *, seed: int = 0, max_operand: int = 20, max_terms: int = 2, ops: str = "+-"
) -> list[dict]:
    """`n` distinct GSM8K-format arithmetic problems, deterministic in `seed`.

    A problem has 2..`max_terms` numbers (operands up to `max_operand`; multipliers up to 9) combined with the
    operators in `ops` (any of ``+-*``); answers are non-negative integers. The rows for ``n`` are a prefix of the
    rows for any larger ``n`` with the same seed. Raises `DataError` if the settings allow fewer than `n` distinct
    problems.
    """
    _check_args(n, max_operand, max_terms, ops)
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise DataError(
                f"synthetic: could only generate {len(rows)} distinct problems out of {n} requested with "
                f"max_operand={max_operand}, max_terms={max_terms}, ops={ops!r}; raise max_operand or max_terms"
            )
        row = _problem(rng, max_operand, max_terms, ops)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


def split_arithmetic(num_train: int, num_eval: int, seed: int = 0, **kw) -> tuple[list[dict], list[dict]]:
    """Disjoint train / eval lists of synthetic problems (no question appears in both); `kw` as
    `arithmetic_problems`."""
    rows = arithmetic_problems(num_train + num_eval, seed=seed, **kw)
    return rows[:num_train], rows[num_train:]
