"""GSM8K rewards (correctness via math-verify, tag format) and the reward guard. Expected values are hand-worked:
correctness = 2.0 right answer inside the last <answer>…</answer>, 1.0 right number elsewhere (see
`extract_fallback_answer`), else 0.0; format = 0.2 per well-placed tag (rules 1-4 in `format_score`)."""

import asyncio
import logging
import math
import pickle
import threading
import time

import pytest

from rlt.rewards import correctness_reward as lazy_correctness
from rlt.rewards.gsm8k import (
    correctness_reward,
    extract_fallback_answer,
    extract_tagged_answer,
    format_reward,
    grade_completion,
)
from rlt.rewards.guard import guard_reward

TAGS_OK = "<reasoning>\n16 - 3 - 4 = 9 eggs, 9 * 2 = 18\n</reasoning>\n<answer>\n18\n</answer>"


def conv(text):
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------- correctness

CORRECTNESS_CASES = [
    # (completion, reference, expected)  -- why
    (TAGS_OK, "18", 2.0),  # right number in the tags
    ("<answer>1,234</answer>", "1234", 2.0),  # thousands separator in the prediction
    ("<answer>1234</answer>", "1,234", 2.0),  # ... or in the reference
    ("so 1000 + 234 = 1234\n#### 1,234", "1234", 1.0),  # GSM8K '####' style, no tags: partial credit
    ("#### 1,234\nthat is all, 5 steps", "1234", 1.0),  # the number after '####' wins over the last number (5)
    ("<answer>0.75</answer>", "3/4", 2.0),  # fraction reference, decimal prediction
    ("<answer>3/4</answer>", "0.75", 2.0),  # and the other way round
    ("<answer>\\frac{3}{4}</answer>", "0.75", 2.0),  # LaTeX fraction
    ("<answer>1/2</answer>", "0.5", 2.0),
    ("<answer>0.7</answer>", "3/4", 0.0),  # close is not equal
    ("<answer>-5</answer>", "-5", 2.0),  # negative numbers
    ("<answer>\u22125</answer>", "-5", 2.0),  # Unicode minus sign is normalised
    ("<answer>5</answer>", "-5", 0.0),  # the sign matters
    ("<answer>\\boxed{12}</answer>", "12", 2.0),  # LaTeX \boxed inside the tags
    ("<answer>$18.00</answer>", "18", 2.0),  # currency and trailing zeros
    ("<answer>\\$18</answer>", "18", 2.0),  # escaped dollar is normalised
    ("<answer>18 apples</answer>", "18", 2.0),  # words around the number
    ("The answer is 18.", "18", 1.0),  # no tags: last number
    ("<answer>18", "18", 1.0),  # unclosed tag = no answer pair: last number
    ("<answer>17</answer> <answer>18</answer>", "18", 2.0),  # repeated tags: the last pair counts
    ("<answer>18</answer> <answer>17</answer>", "18", 0.0),  # ... so a wrong last pair gets nothing
    ("<answer>17</answer> Actually, it is 18", "18", 0.0),  # a wrong answer in the tags is not rescued
    ("<answer>eighteen</answer> since 9 * 2 = 18", "18", 1.0),  # tags without a number: last number of the text
    ("<answer><answer>18</answer></answer>", "18", 1.0),  # nested tags are malformed: partial credit only
    ("<reasoning>9 * 2 = 18</reasoning>", "18", 1.0),  # reasoning only
    ("<answer>18</answer>", "Natalia sold 9 * 2 = 18.\n#### 18", 2.0),  # a full GSM8K solution as reference
    ("no numbers at all", "18", 0.0),
    ("", "18", 0.0),  # empty completion
    ("   \n", "18", 0.0),
    (None, "18", 0.0),
    (42, "18", 0.0),  # not text
    ("<answer>18</answer>", None, 0.0),  # missing reference
    ("<answer>18</answer>", "", 0.0),
    ("答案是 <answer>42</answer>", "42", 2.0),  # non-ASCII around the tags
    ("<answer>四十二</answer>", "42", 0.0),  # non-ASCII numerals are not read
    ("<answer>\u0664\u0662</answer>", "42", 0.0),  # Arabic-Indic digits neither (ASCII digits only)
    ("🎉🎉🎉 \x00\ufffd", "5", 0.0),  # emoji, NUL and replacement characters
    ("<answer>" + "9" * 5000 + "</answer>", "5", 0.0),  # a huge number: not parsed, no crash
    ("<answer>9^9^9^9</answer>", "5", 0.0),  # a power tower is never evaluated
    ("<answer>100000!</answer>", "5", 0.0),
    (conv(TAGS_OK), "18", 2.0),  # conversational completion
    (conv("#### 18"), "18", 1.0),
    ([{"role": "assistant", "content": [{"type": "text", "text": "<answer>7</answer>"}]}], "7", 2.0),  # parts
    ([], "18", 0.0),  # empty message list
    ([{"role": "assistant", "content": None}], "18", 0.0),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), CORRECTNESS_CASES)
def test_correctness_hand_worked(completion, reference, expected):
    assert correctness_reward([completion], [reference]) == [expected]


def test_correctness_batch_aligned_with_answers_and_extra_trl_kwargs():
    completions = [conv("<answer>3</answer>"), conv("<answer>3</answer>"), conv("the total is 5")]
    rewards = correctness_reward(prompts=[[{"role": "user", "content": "q"}]] * 3, completions=completions,
                                 answer=["3", "4", "5"], completion_ids=[[1], [2], [3]], trainer_state=None,
                                 log_extra=lambda *a: None, log_metric=lambda *a: None, question=["q"] * 3)
    assert rewards == [2.0, 0.0, 1.0]
    assert all(type(r) is float for r in rewards)


def test_correctness_length_mismatch_is_a_caller_bug():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        correctness_reward(["a", "b"], ["1"])


def test_grade_completion_returns_what_was_credited():
    assert grade_completion("<answer> 1,234 </answer>", "1234") == (2.0, "1,234")
    assert grade_completion("so #### 7", "7") == (1.0, "7")
    assert grade_completion("<answer>17</answer>", "18") == (0.0, "17")
    assert grade_completion("nothing", "18") == (0.0, None)


def test_extractors():
    assert extract_tagged_answer("<answer>3</answer><answer> 5 </answer>") == "5"
    assert extract_tagged_answer("<answer>5") is None
    assert extract_tagged_answer("5</answer>") is None
    assert extract_fallback_answer("a 3 b <answer>x 4, y -1,234.5</answer>") == "-1,234.5"
    assert extract_fallback_answer("2 apples #### 3/4 cup\n9") == "3/4"
    assert extract_fallback_answer("1 then 2, finally 30.") == "30"
    assert extract_fallback_answer("none") is None


def test_power_tower_is_fast_in_a_worker_thread():
    """Off the main thread math-verify has no timeout (signal.alarm is main-thread only): `_is_tame` must stop
    9^9^9^9 from being evaluated, and everything must still be graded the same as in the main thread."""
    completions = ["<answer>9^9^9^9</answer>", "<answer>0.75</answer>", "#### 1,234", "<answer>9**9**9</answer>"]
    answers = ["5", "3/4", "1234", "5"]
    expected = correctness_reward(completions, answers)
    box = {}

    def work():
        start = time.monotonic()
        box["rewards"] = correctness_reward(completions, answers)
        box["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert box["rewards"] == expected == [0.0, 2.0, 1.0, 0.0]
    assert box["seconds"] < 5


def test_math_verify_failures_score_zero(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    from rlt.rewards import gsm8k

    def timeout(*args, **kwargs):
        raise TimeoutException("Operation timed out!")  # a BaseException, not an Exception

    monkeypatch.setattr(math_verify, "verify", timeout)
    assert correctness_reward(["<answer>18</answer>", "#### 18"], ["18", "18"]) == [0.0, 0.0]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    gsm8k._parse_reference.cache_clear()
    monkeypatch.setattr(math_verify, "parse", broken)
    # Nothing parses: only the exact-text fallback for references math-verify cannot read is left.
    assert correctness_reward(["<answer>18.0</answer>", "<answer>18</answer>"], ["18", "18"]) == [0.0, 2.0]
    gsm8k._parse_reference.cache_clear()


# ------------------------------------------------------------------------------------------------------ format

FORMAT_CASES = [
    # (completion, expected)  -- rules: 1 <reasoning> first, 2 </reasoning> after it, 3 <answer> after
    # </reasoning>, 4 </answer> after <answer> and last; each tag exactly once
    ("<reasoning>r</reasoning><answer>5</answer>", 0.8),  # all four
    ("\n  <reasoning>\nr\n</reasoning>\n<answer>\n5\n</answer>\n\n", 0.8),  # whitespace around is fine
    ("<reasoning>r</reasoning> then <answer>5</answer>", 0.8),  # text between the blocks is free
    ("Sure! <reasoning>r</reasoning><answer>5</answer>", 0.6),  # 1 fails: text before <reasoning>
    ("<reasoning>r</reasoning><answer>5</answer> done", 0.6),  # 4 fails: text after </answer>
    ("<reasoning>r</reasoning><answer>5", 0.6),  # 4 fails: no </answer>
    ("r</reasoning><answer>5</answer>", 0.4),  # 1 and 2 fail: no <reasoning>
    ("<answer>5</answer>", 0.2),  # only 4: rule 3 needs </reasoning> before <answer>
    ("<reasoning><answer>5</answer></reasoning>", 0.4),  # nested: 1, 2 hold; 3 (<answer> too early), 4 fail
    ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>5</answer>", 0.2),  # repeated reasoning: only 4
    ("<reasoning>r</reasoning><answer>4</answer><answer>5</answer>", 0.4),  # repeated answer: 3, 4 fail
    ("<answer>5</answer><reasoning>r</reasoning>", 0.2),  # out of order: only 2 holds
    ("</answer><answer>5<reasoning></reasoning>", 0.2),  # 1 fails (text before), 2 holds, 3 and 4 fail (reversed)
    ("<Reasoning>r</Reasoning><Answer>5</Answer>", 0.0),  # tags are case-sensitive
    ("just 5", 0.0),
    ("", 0.0),
    (None, 0.0),
    ("é<reasoning>ü</reasoning><answer>五</answer>", 0.6),  # non-ASCII text is fine, rule 1 fails
    (conv("<reasoning>r</reasoning><answer>5</answer>"), 0.8),  # conversational
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_CASES)
def test_format_hand_worked(completion, expected):
    assert format_reward([completion]) == [expected]


# ------------------------------------------------------------------------------------------------ names (TRL)


def test_trl_logs_the_rewards_as_correctness_and_format():
    from trl.trainer.utils import get_callable_name, is_async_callable

    assert get_callable_name(correctness_reward) == "correctness"
    assert get_callable_name(format_reward) == "format"
    assert lazy_correctness is correctness_reward
    guarded = guard_reward(correctness_reward, penalty=0.0)
    assert get_callable_name(guarded) == "correctness"
    assert not is_async_callable(guarded)
    assert pickle.loads(pickle.dumps(correctness_reward)) is correctness_reward
    assert pickle.loads(pickle.dumps(guarded)).__name__ == "correctness"


# ------------------------------------------------------------------------------------------------------- guard


def test_guard_replaces_nonfinite_with_penalty_and_reports_count(caplog):
    def flaky(completions, **kwargs):
        return [1.0, None, math.nan, math.inf, -math.inf, 0.5]

    logged = []
    guarded = guard_reward(flaky, penalty=-1.0, name="flaky")
    with caplog.at_level(logging.WARNING, logger="rlt.rewards.guard"):
        out = guarded(completions=["c"] * 6, log_metric=lambda name, value: logged.append((name, value)))
    assert out == [1.0, -1.0, -1.0, -1.0, -1.0, 0.5]
    assert logged == [("rewards/flaky/nonfinite", 4.0)]
    assert "replaced 4 of 6" in caplog.text


def test_guard_reports_zero_and_passes_every_trl_kwarg_through():
    seen = {}

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(kwargs, prompts=prompts, completion_ids=completion_ids, answer=answer)
        return [float(len(c)) for c in completions]

    logged = []
    guarded = guard_reward(reward, penalty=0.0)
    state = object()
    out = guarded(prompts=["p", "q"], completions=["ab", "c"], completion_ids=[[1, 2], [3]], answer=["1", "2"],
                  trainer_state=state, log_extra=print, log_metric=lambda n, v: logged.append((n, v)),
                  question=["x", "y"])
    assert out == [2.0, 1.0]
    assert guarded.__name__ == "reward"
    assert logged == [("rewards/reward/nonfinite", 0.0)]
    assert seen["trainer_state"] is state and seen["question"] == ["x", "y"] and seen["answer"] == ["1", "2"]
    assert seen["log_extra"] is print and callable(seen["log_metric"])


def test_guard_without_log_metric_and_with_numpy_like_values():
    class Scalar:  # e.g. a 0-d tensor: float() works
        def __float__(self):
            return 3.0

    guarded = guard_reward(lambda completions, **kw: (Scalar(), True, math.nan), penalty=-2, name="x")
    assert guarded(completions=[1, 2, 3]) == [3.0, 1.0, -2.0]


def test_guard_lets_exceptions_raise():
    def crashing(completions, **kwargs):
        raise RuntimeError("reward bug")

    with pytest.raises(RuntimeError, match="reward bug"):
        guard_reward(crashing, penalty=0.0)(completions=["a"])


@pytest.mark.parametrize(("result", "match"), [
    ([1.0], r"'short' returned 1 rewards for 2 completions"),
    (None, r"'short' returned NoneType"),
    ("12", r"'short' returned str"),
    ([1.0, "high"], r"'short' returned a non-numeric reward 'high' at index 1"),
    ([1.0, object()], r"'short' returned a non-numeric reward"),
])
def test_guard_rejects_malformed_results_naming_the_function(result, match):
    with pytest.raises(ValueError, match=match):
        guard_reward(lambda **kw: result, penalty=0.0, name="short")(completions=["a", "b"])


def test_guard_checks_prompts_when_no_completions_are_given():
    with pytest.raises(ValueError, match="3 prompts"):
        guard_reward(lambda **kw: [0.0], penalty=0.0, name="p")(prompts=["a", "b", "c"])


def test_guard_rejects_bad_arguments():
    with pytest.raises(ValueError, match="finite"):
        guard_reward(format_reward, penalty=math.nan)
    with pytest.raises(TypeError):
        guard_reward("format_reward", penalty=0.0)


def test_guard_wraps_the_gsm8k_rewards_unchanged():
    guarded = guard_reward(format_reward, penalty=-1.0)
    assert guarded.__name__ == "format"
    assert guarded(completions=["<reasoning>r</reasoning><answer>5</answer>", ""]) == [0.8, 0.0]
    named = guard_reward(correctness_reward, penalty=-1.0, name="acc")
    assert named.__name__ == "acc"
    assert named(prompts=["p"], completions=["#### 4"], answer=["4"], log_metric=lambda *a: None) == [1.0]


def test_guard_async_reward():
    from trl.trainer.utils import is_async_callable

    async def slow(completions, **kwargs):
        return [None for _ in completions]

    logged = []
    guarded = guard_reward(slow, penalty=-0.5)
    assert is_async_callable(guarded) and guarded.__name__ == "slow"
    out = asyncio.run(guarded(completions=["a", "b"], log_metric=lambda n, v: logged.append((n, v))))
    assert out == [-0.5, -0.5]
    assert logged == [("rewards/slow/nonfinite", 2.0)]
