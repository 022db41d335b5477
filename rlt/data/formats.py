"""Pure row-level conversions: dataset formats -> TRL SFT rows, and GSM8K answer parsing / rendering.

Nothing here touches the disk or `datasets`; every function works on plain Python values so it can be unit-tested
with hand-worked examples. Malformed rows never raise in `to_sft_example`: they map to `None` and are dropped (and
counted) by `rlt.data.loading`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from rlt.config import COMPLETION_STYLES
from rlt.errors import DataError

# Per data_format: logical field name -> column name in the dataset (users override it with `data_columns`).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "gsm8k": {"question": "question", "answer": "answer"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "context": "context", "response": "response"},
    "sharegpt": {"conversations": "conversations"},
    "messages": {"messages": "messages"},
    "text": {"text": "text"},
    "prompt_completion": {"prompt": "prompt", "completion": "completion"},
}

# Logical fields that may be absent from a dataset (treated as empty) unless the user maps them explicitly.
OPTIONAL_FIELDS: dict[str, frozenset[str]] = {
    "alpaca": frozenset({"input"}),
    "dolly": frozenset({"context"}),
}


# A system prompt that asks for exactly the format `render_gsm8k_completion(..., "reasoning_answer_tags")` produces.
REASONING_SYSTEM_PROMPT = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)

# Role names seen in the wild -> chat-template roles.
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


# ----------------------------------------------------------------------------------------------------------- GSM8K


def gsm8k_final_answer(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the text after the last ``####``, stripped, thousands separators removed.

    ``"... #### 1,234"`` -> ``"1234"``; ``"#### -5"`` -> ``"-5"``; ``"#### 3/4"`` -> ``"3/4"``. Returns ``None`` when
    the text has no ``####`` or nothing follows it.
    """
    if not isinstance(answer, str) or "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip()
    final = _THOUSANDS_RE.sub("", final)
    return final or None


def gsm8k_reasoning(answer: str) -> str:
    """The worked part of a GSM8K solution (before the last ``####``), ``<<...>>`` calculator annotations removed."""
    body = answer.rsplit("####", 1)[0] if "####" in answer else answer
    return _CALCULATOR_RE.sub("", body).strip()


def render_gsm8k_completion(answer: str, style: str) -> str:
    """Render a GSM8K solution as the assistant's training target.

    - ``"gsm8k"``: the solution unchanged (worked lines, calculator annotations, ``#### <final>``).
    - ``"reasoning_answer_tags"``: ``<reasoning>\\n{reasoning}\\n</reasoning>\\n<answer>\\n{final}\\n</answer>``, the
      format the GRPO format reward checks for.

    Raises `DataError` for an unknown style, or for the tags style when the solution has no ``#### <final>`` line.
    """
    if style == "gsm8k":
        return answer
    if style == "reasoning_answer_tags":
        final = gsm8k_final_answer(answer)
        if final is None:
            raise DataError("GSM8K answer has no final '#### <number>' line, cannot render it as tags: "
                            f"{answer[:200]!r}")
        return f"<reasoning>\n{gsm8k_reasoning(answer)}\n</reasoning>\n<answer>\n{final}\n</answer>"
    raise DataError(f"unknown completion_style {style!r}; expected one of {list(COMPLETION_STYLES)}")


def gsm8k_prompt(question: str, system_prompt: str | None) -> list[dict]:
    """The chat prompt for a GSM8K question, shared by SFT, GRPO and evaluation: optional system message + the
    question."""
    prompt: list[dict] = []
    if system_prompt:
        prompt.append({"role": "system", "content": system_prompt})
    prompt.append({"role": "user", "content": question.strip()})
    return prompt


# ------------------------------------------------------------------------------------------------------ SFT mapping


def _text(value: Any) -> str | None:
    """A field value as stripped text; ``None`` for missing / empty / non-scalar values (lists, dicts, NaN)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _with_system(prompt: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not any(m["role"] == "system" for m in prompt):
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def _single_turn(user: str, assistant: str, system_prompt: str | None) -> dict:
    return {
        "prompt": _with_system([{"role": "user", "content": user}], system_prompt),
        "completion": [{"role": "assistant", "content": assistant}],
    }


def normalise_turns(turns: Any) -> list[dict] | None:
    """``[{from, value}]`` or ``[{role, content}]`` -> ``[{role, content}]`` with chat-template roles; None if
    malformed."""
    if not isinstance(turns, list | tuple) or not turns:
        return None
    out = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            return None
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or role.strip().lower() not in _ROLE_ALIASES:
            return None
        if content is not None and not isinstance(content, str):
            return None  # multimodal / structured content is not supported
        out.append({"role": _ROLE_ALIASES[role.strip().lower()], "content": (content or "").strip()})
    return out


def _conversation(turns: Any, system_prompt: str | None, all_assistant_turns: bool) -> dict | None:
    messages = normalise_turns(turns)
    if messages is None:
        return None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not messages[last]["content"]:
        return None
    prompt = messages[:last]
    if not any(m["role"] == "user" and m["content"] for m in prompt):
        return None
    if all_assistant_turns:
        return {"messages": _with_system(messages[:last + 1], system_prompt)}
    return {"prompt": _with_system(prompt, system_prompt), "completion": [messages[last]]}


def as_messages(example: Mapping[str, Any]) -> dict:
    """A prompt/completion row as one conversation, so it concatenates with multi-turn rows; other rows unchanged.

    ``{"prompt": [user("Q")], "completion": [assistant("A")]}`` -> ``{"messages": [user("Q"), assistant("A")]}``.
    Its last assistant turn is then trained exactly as TRL trains the completion (`tokenize_assistant_turns`).
    """
    if "prompt" in example and "completion" in example:
        return {"messages": [*example["prompt"], *example["completion"]]}
    return dict(example)


def _instruction_with(instruction: str | None, extra: str | None) -> str | None:
    if instruction is None:
        return None
    return f"{instruction}\n\n{extra}" if extra else instruction


def to_sft_example(
    row: Mapping[str, Any],
    *,
    data_format: str,
    columns: Mapping[str, str],
    system_prompt: str | None,
    completion_style: str = "gsm8k",
    all_assistant_turns: bool = False,
) -> dict | None:
    """Convert one raw row into a TRL SFTTrainer row, or ``None`` if the row is unusable (it is then dropped).

    Returns ``{"prompt": [messages...], "completion": [{"role": "assistant", ...}]}`` (conversational
    prompt-completion: TRL applies the chat template and, with ``completion_only_loss``, trains on the completion
    only), or ``{"text": ...}`` for ``data_format="text"``. `columns` maps logical field names (see
    `DEFAULT_COLUMNS`) to the row's keys; a logical field missing from `columns` or from the row counts as empty.

    Conversations (``sharegpt``/``messages``): roles are normalised (human/user/prompter -> user,
    gpt/assistant/bot/model -> assistant), the prompt is everything before the last assistant turn and the completion
    is that turn; turns after it are discarded. Conversations without an assistant turn, with an empty last assistant
    turn, without a non-empty user turn before it, with unknown roles or malformed turns give ``None``. With
    `all_assistant_turns` a conversation is ``{"messages": [...]}`` instead: every turn up to the last assistant turn
    (the system prompt added as for the prompt), for `tokenize_assistant_turns` to train on every assistant turn.

    Only an unknown `data_format` / `completion_style` raises (`DataError`); bad row contents never do.
    """
    if data_format not in DEFAULT_COLUMNS:
        raise DataError(f"unknown data_format {data_format!r}; expected one of {sorted(DEFAULT_COLUMNS)}")
    if completion_style not in COMPLETION_STYLES:
        raise DataError(f"unknown completion_style {completion_style!r}; expected one of {list(COMPLETION_STYLES)}")

    def field(name: str) -> Any:
        column = columns.get(name)
        return row.get(column) if column is not None else None

    if data_format == "text":
        text = _text(field("text"))
        return {"text": text} if text is not None else None

    if data_format in ("sharegpt", "messages"):
        key = "conversations" if data_format == "sharegpt" else "messages"
        return _conversation(field(key), system_prompt, all_assistant_turns)

    if data_format == "gsm8k":
        question, answer = _text(field("question")), _text(field("answer"))
        if question is None or answer is None:
            return None
        if completion_style == "reasoning_answer_tags" and gsm8k_final_answer(answer) is None:
            return None
        return {
            "prompt": gsm8k_prompt(question, system_prompt),
            "completion": [{"role": "assistant", "content": render_gsm8k_completion(answer, completion_style)}],
        }

    if data_format == "alpaca":
        user = _instruction_with(_text(field("instruction")), _text(field("input")))
        response = _text(field("output"))
    elif data_format == "dolly":
        user = _instruction_with(_text(field("instruction")), _text(field("context")))
        response = _text(field("response"))
    else:  # prompt_completion
        user, response = _text(field("prompt")), _text(field("completion"))
    if user is None or response is None:
        return None
    return _single_turn(user, response, system_prompt)


# ------------------------------------------------------------------------------------------- multi-turn tokenizing


def _render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two sequences share: ``[1, 2, 3], [1, 2, 4]`` -> 2."""
    n = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        n += 1
    return n


def tokenize_assistant_turns(messages: list[dict], tokenizer: Any) -> dict:
    """``{"input_ids", "assistant_masks", "assistant_turns", "cut_turns"}`` of a conversation: 1 in
    ``assistant_masks`` on exactly the tokens each assistant message adds to the rendered chat, 0 elsewhere.

    The chat template renders the whole conversation once (``full``); then, for assistant message *i*, its tokens
    start where ``render(messages[:i], add_generation_prompt=True)`` stops agreeing with ``full`` and end where
    ``render(messages[:i + 1])`` stops agreeing with it. That is TRL's prompt/completion rule for one turn (the
    completion starts after the common prefix of the prompt and prompt+completion: `trl.data_utils
    .common_prefix_length`), applied to every turn, so the mask holds the reply, its end-of-turn token and whatever
    the template closes the turn with, and nothing of the system / user turns or the template's role headers.

    With the ChatML template of ``rlt:tiny``, ``[user "Hi", assistant "Yo", user "Ok?", assistant "Ok"]`` renders as
    ``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n`` +
    ``<|im_start|>user\\nOk?<|im_end|>\\n<|im_start|>assistant\\nOk<|im_end|>\\n`` and the mask covers
    ``Yo<|im_end|>\\n`` and ``Ok<|im_end|>\\n``: for the last turn exactly what TRL's completion mask covers for the
    same row as prompt/completion.

    It is exact for any template that renders each prefix of a conversation as a prefix of the whole (the property
    TRL calls prefix-preserving; ChatML templates such as rlt:tiny's, SmolLM2's and Qwen2.5's have it). A template
    that renders an earlier assistant turn differently once more messages follow (Qwen3 drops the reasoning of
    earlier turns) has that turn trained only up to where the two renderings differ: never a token that is not the
    assistant's. ``cut_turns`` counts such turns (logged by `rlt.data.loading.tokenize_conversations`),
    ``assistant_turns`` all assistant turns. Cost: one render of the whole chat and two per assistant turn, tokenized
    in one batched call.
    """
    # an opening assistant turn (nothing before it) answers nothing: it stays context
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    texts = [_render(tokenizer, messages)]
    for i in turns:
        texts += [_render(tokenizer, messages[:i], add_generation_prompt=True), _render(tokenizer, messages[:i + 1])]
    # one batched call; as apply_chat_template(tokenize=True) does: the template writes any special tokens itself
    full, *prefixes = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mask = [0] * len(full)
    cut = 0
    for before, through in zip(prefixes[::2], prefixes[1::2], strict=True):
        start, end = _common_prefix_length(before, full), _common_prefix_length(through, full)
        cut += end < len(through)
        mask[start:end] = [1] * max(0, end - start)
    return {"input_ids": list(full), "assistant_masks": mask, "assistant_turns": len(turns), "cut_turns": cut}
