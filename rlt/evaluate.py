"""GSM8K-style answer accuracy with greedy decoding (HF generate backend).

`answer_from_completion` and `answers_match` are pure helpers; `gsm8k_accuracy` runs a model on chat prompts.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_from_completion(text: str) -> str | None:
    """The final answer a completion states, as text, or None.

    Looks, in order, for the last `<answer>…</answer>`, the text after the last `####`, then the last number.
    Examples: "<answer>\n19\n</answer>" -> "19"; "so 3 + 4 = 7\n#### 7" -> "7"; "it is 1,234." -> "1,234".
    """
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1].strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str | None) -> Fraction | None:
    if text is None:
        return None
    m = _NUMBER_RE.search(text.replace("$", ""))
    if m is None:
        return None
    try:
        return Fraction(m.group(0).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Numeric equality of the first number in each ("1,234" == "1234.0", "3/4" == "0.75"); text equality otherwise."""
    p, r = _as_number(predicted), _as_number(reference)
    if p is not None and r is not None:
        return p == r
    return predicted is not None and predicted.strip() == reference.strip()


def gsm8k_accuracy(model, tokenizer, problems: list[dict], *, max_new_tokens: int = 64,
                   batch_size: int = 16) -> dict:
    """Greedy accuracy of `model` on `problems` = [{"prompt": chat messages, "answer": final answer}, ...].

    Returns {"accuracy": float, "n": int, "predictions": [{"prompt", "completion", "predicted", "answer",
    "correct"}, ...]}.
    """
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    predictions = []
    try:
        for start in range(0, len(problems), batch_size):
            batch = problems[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
                     for p in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for p, text, completion in zip(batch, texts, completions, strict=True):
                predicted = answer_from_completion(completion)
                predictions.append({"prompt": text, "completion": completion, "predicted": predicted,
                                    "answer": p["answer"], "correct": answers_match(predicted, p["answer"])})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    n = len(predictions)
    return {"accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0, "n": n, "predictions": predictions}
