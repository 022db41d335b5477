"""Multi-turn SFT: every assistant turn trained (`train_on_all_assistant_turns`), masks exact on the tiny tokenizer,
the same convention as TRL's completion-only loss for the last turn, truncation counted, a tiny run trains."""

from __future__ import annotations

import json
import logging
import math

import pytest
from datasets import Dataset

from rlt.data.formats import as_messages, to_sft_example, tokenize_assistant_turns
from rlt.data.loading import prepare_sft_datasets, tokenize_conversations
from rlt.errors import DataError

SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATION = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4"}]
SHAREGPT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"},
            {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4"},
            {"from": "human", "value": "a trailing user turn is dropped"}]


@pytest.fixture(scope="module")
def tokenizer():
    from rlt.models import load_tokenizer

    return load_tokenizer("rlt:tiny")


@pytest.fixture(scope="module")
def model(tokenizer):
    from rlt.models import load_model

    return load_model("rlt:tiny", tokenizer=tokenizer)


def trl_rows(ds: Dataset, tokenizer, model, tmp_path, max_length: int = 256) -> list[dict]:
    """The rows TRL's SFTTrainer trains on (input_ids + labels), as it prepares `ds`."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, report_to="none", use_cpu=True)
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer).train_dataset.to_list()


def trained_spans(row: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens (labels != -100)."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(span) for span in spans]


def as_labels(out: dict) -> dict:
    """`tokenize_assistant_turns` output as TRL turns it into labels: -100 where the mask is 0."""
    labels = [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
    return {"input_ids": out["input_ids"], "labels": labels}


def test_conversation_rows_keep_every_turn_up_to_the_last_reply():
    row = to_sft_example({"conversations": SHAREGPT}, data_format="sharegpt", columns={"conversations":
                         "conversations"}, system_prompt="Be brief.", all_assistant_turns=True)
    assert row == {"messages": CONVERSATION}
    single = {"prompt": [SYSTEM, CONVERSATION[1]], "completion": [CONVERSATION[2]]}
    assert as_messages(single) == {"messages": CONVERSATION[:3]}


def test_mask_covers_exactly_the_assistant_replies(tokenizer):
    out = tokenize_assistant_turns(CONVERSATION, tokenizer)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert out["input_ids"] == rendered
    assert trained_spans(as_labels(out), tokenizer) == ["Hello there<|im_end|>\n", "It is 4<|im_end|>\n"]
    assert (out["assistant_turns"], out["cut_turns"]) == (2, 0)


def test_labels_all_turns_on_and_off_match_trls_last_turn_convention(tokenizer, model, tmp_path):
    """On: TRL's labels (from our assistant_masks) are the two replies with their end-of-turn tokens. Off: TRL's own
    prompt/completion masking, the last reply only. The last reply is trained identically (same ids, same place)."""
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": SHAREGPT}) + "\n")
    on, _ = prepare_sft_datasets(dataset_id_or_path=str(tmp_path / "chat.jsonl"), data_format="sharegpt",
                                 eval_split=None, system_prompt="Be brief.", all_assistant_turns=True)
    off, _ = prepare_sft_datasets(dataset_id_or_path=str(tmp_path / "chat.jsonl"), data_format="sharegpt",
                                  eval_split=None, system_prompt="Be brief.")
    assert on.column_names == ["messages"] and off.column_names == ["prompt", "completion"]
    [row_on] = trl_rows(tokenize_conversations(on, tokenizer, max_length=256), tokenizer, model, tmp_path / "on")
    [row_off] = trl_rows(off, tokenizer, model, tmp_path / "off")
    assert trained_spans(row_on, tokenizer) == ["Hello there<|im_end|>\n", "It is 4<|im_end|>\n"]
    assert trained_spans(row_off, tokenizer) == ["It is 4<|im_end|>\n"]
    assert row_on["input_ids"] == row_off["input_ids"]
    last = [i for i, label in enumerate(row_off["labels"]) if label != -100]
    assert [row_on["labels"][i] for i in last] == [row_off["labels"][i] for i in last]


def test_single_turn_rows_as_messages_train_like_trl_prompt_completion(tokenizer, model, tmp_path):
    single = Dataset.from_list([{"prompt": [SYSTEM, CONVERSATION[1]], "completion": [CONVERSATION[2]]}])
    as_conv = Dataset.from_list([as_messages(single[0])])
    [ours] = trl_rows(tokenize_conversations(as_conv, tokenizer, max_length=256), tokenizer, model, tmp_path / "a")
    [theirs] = trl_rows(single, tokenizer, model, tmp_path / "b")
    assert (ours["input_ids"], ours["labels"]) == (theirs["input_ids"], theirs["labels"])


def test_truncation_is_counted_and_fully_cut_rows_are_dropped(tokenizer, model, tmp_path, caplog):
    long_user = {"role": "user", "content": "word " * 80}
    rows = [{"messages": CONVERSATION}, {"messages": [long_user, {"role": "assistant", "content": "late reply"}]}]
    full = len(tokenize_assistant_turns(CONVERSATION, tokenizer)["input_ids"])
    cut_at = full - 4  # the second reply loses its end; the long row keeps no assistant token
    with caplog.at_level(logging.INFO, logger="rlt.data"):
        ds = tokenize_conversations(Dataset.from_list(rows), tokenizer, max_length=cut_at)
    assert f"2 of 2 train rows are longer than max_length={cut_at}" in caplog.text
    assert "1 of them keep no assistant token" in caplog.text
    prepared = trl_rows(ds, tokenizer, model, tmp_path, max_length=cut_at)
    assert len(prepared) == 1 and len(prepared[0]["input_ids"]) == cut_at
    spans = trained_spans(prepared[0], tokenizer)
    assert spans[0] == "Hello there<|im_end|>\n" and "It is 4<|im_end|>\n".startswith(spans[1])


def test_a_template_that_rerenders_history_is_never_overmarked(tokenizer):
    """A template that writes the last assistant turn with a '[final]' tag, earlier ones without (as Qwen3 drops
    earlier reasoning): earlier turns are trained only up to where the renderings differ, and counted."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['role'] == 'assistant' and loop.last %}{{- '[final] ' }}{%- endif %}"
        "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    out = tokenize_assistant_turns(CONVERSATION, tok)
    assert trained_spans(as_labels(out), tok) == ["[final] It is 4<|im_end|>\n"]
    assert (out["assistant_turns"], out["cut_turns"]) == (2, 1)


def test_no_assistant_token_anywhere_is_a_data_error(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{%- for m in messages %}{%- if m['role'] != 'assistant' %}{{- m['content'] }}{%- endif %}" \
                        "{%- endfor %}"
    with pytest.raises(DataError, match="none of the 1 train conversations has an assistant token"):
        tokenize_conversations(Dataset.from_list([{"messages": CONVERSATION}]), tok, max_length=64)


def test_tiny_sft_run_on_multiturn_data_trains(compose, tmp_path, caplog):
    from rlt.train import run_training

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": " ".join(map(str, range(i)))},
        {"role": "user", "content": "Again, backwards."},
        {"role": "assistant", "content": " ".join(map(str, range(i)[::-1]))}]}) + "\n" for i in range(2, 18)))
    with caplog.at_level(logging.INFO, logger="rlt.data"):
        summary = run_training(compose(["run_cfg=tiny_sft", "report_to=[none]", f"output_dir={tmp_path / 'run'}",
                                        f"dataset_id_or_path={data}", "data_format=messages", "eval_split=null",
                                        "max_steps=3", "eval_steps=null", "save_steps=3",
                                        "save_final_model=false", "plots=false"]))
    assert "train: 16 conversations, 32 assistant turns trained" in caplog.text
    assert summary["global_step"] == 3 and math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
