"""Tests for rlt.data.teacher: RLT teacher SFT rows, RL prompts and student chats, checked string by string and
token by token on the tiny model's tokenizer (whose BPE treats the tags as ordinary text)."""

from __future__ import annotations

import json
import logging

import pytest

from rlt.data import gsm8k_final_answer, gsm8k_reasoning, load_raw
from rlt.data.teacher import (
    REJECT_AMBIGUOUS,
    REJECT_BOUNDARY,
    REJECT_EMPTY,
    REJECT_MALFORMED,
    TeacherFormat,
    TeacherRow,
    build_teacher_rows,
    get_teacher_format,
    parse_teacher_row,
    prepare_teacher_datasets,
    sft_boundary_is_clean,
    student_chat,
    student_chat_parts,
    teacher_rl_prompt,
    teacher_sft_example,
)
from rlt.errors import ConfigError, DataError

FMT = TeacherFormat(teacher_system_prompt="Explain.", student_system_prompt="Think, then answer.")
ROW = {"question": "What is 2 plus 3?", "solution": "5", "reasoning_trace": "2 + 3 = 5."}

TEACHER_PROMPT = ("<|im_start|>system\nExplain.<|im_end|>\n"
                  "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                  "<|im_start|>assistant\n<|begin_of_solution|>\n\n5\n\n<|end_of_solution|>\n\n"
                  "<|begin_of_explanation|>\n\n")


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from rlt.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


def ids(tok, text: str) -> list[int]:
    return tok(text=text)["input_ids"]  # how TRL tokenizes non-conversational text


def pieces(tok, token_ids: list[int]) -> list[str]:
    return [tok.decode([t]) for t in token_ids]


# ----------------------------------------------------------------------------------------------------- formats


def test_formats_and_system_prompts():
    fmt = TeacherFormat()
    assert fmt.split_point == "<|begin_of_explanation|>\n\n"
    assert fmt.solution_block(" 5 ") == "<|begin_of_solution|>\n\n5\n\n<|end_of_solution|>"
    for tag in ("<|begin_of_solution|>", "<|end_of_solution|>", "<|begin_of_explanation|>", "<|end_of_explanation|>"):
        assert tag in fmt.teacher_system_prompt
    for tag in ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"):
        assert tag in fmt.student_system_prompt
    r1 = get_teacher_format("r1")
    assert (r1.explanation_open, r1.solution_close, r1.think_open) == ("<explanation>", "</solution>", "<think>")
    assert "<explanation>" in r1.teacher_system_prompt and "<think>" in r1.student_system_prompt
    assert get_teacher_format({"style": "r1", "delimiters_padding": "\n"}).delimiters_padding == "\n"
    assert fmt.fingerprint != r1.fingerprint and fmt.fingerprint == TeacherFormat().fingerprint
    with pytest.raises(ConfigError, match="unknown TeacherFormat field"):
        get_teacher_format({"style": "stratos", "padding": "\n"})
    with pytest.raises(ConfigError, match="style"):
        get_teacher_format("llama")
    with pytest.raises(ConfigError, match="explanation_close"):
        TeacherFormat(explanation_close="")


# ---------------------------------------------------------------------------------------------------- SFT rows


def test_sft_example_strings_and_token_boundary(tok):
    ex = teacher_sft_example(ROW, FMT, tok)
    assert ex["prompt"] == TEACHER_PROMPT
    assert ex["completion"] == "2 + 3 = 5.\n\n<|end_of_explanation|><|im_end|>"  # no 2nd eos added by TRL

    prompt_ids, full_ids = ids(tok, ex["prompt"]), ids(tok, ex["prompt"] + ex["completion"])
    assert full_ids[: len(prompt_ids)] == prompt_ids  # clean boundary
    completion_ids = full_ids[len(prompt_ids):]
    assert pieces(tok, prompt_ids)[-2:] == ["|>\n", "\n"]  # the prompt ends with the open tag + padding
    assert pieces(tok, completion_ids) == ["2", " +", " ", "3", " =", " ", "5", ".\n", "\n", "<|", "end", "_of",
                                           "_explanation", "|", ">", "<|im_end|>"]
    completion_text = tok.decode(completion_ids)
    assert "solution" not in completion_text and "5\n\n<|end_of_solution|>" in tok.decode(prompt_ids)
    assert sft_boundary_is_clean(ex, tok)


def test_sft_completion_only_loss_in_trl_trains_exactly_the_explanation(tok, tiny_model_path, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlt.models import load_model

    ex = teacher_sft_example(ROW, FMT, tok)
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[], max_length=None, bf16=False,
                     use_cpu=True)
    trainer = SFTTrainer(model=load_model(tiny_model_path, torch_dtype="float32"), args=args,
                         train_dataset=Dataset.from_list([ex]), processing_class=tok)
    row = trainer.train_dataset[0]
    assert row["input_ids"] == ids(tok, ex["prompt"] + ex["completion"])
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tok.decode(trained) == "2 + 3 = 5.\n\n<|end_of_explanation|><|im_end|>"
    assert row["labels"][: len(ids(tok, ex["prompt"]))] == [-100] * len(ids(tok, ex["prompt"]))


@pytest.mark.parametrize(
    ("trace", "first_piece"),
    [
        (" starts with a space", "st"),
        ("42 is the answer", "4"),
        ("\nNew line first", "New"),
        ("\n\n  (a + b) first", "("),
        ("Ends with a dot.", "E"),
        ("<b>Tag first</b>", "<"),
    ],
)
def test_sft_bpe_boundaries(tok, trace, first_piece):
    ex = teacher_sft_example({**ROW, "reasoning_trace": trace}, FMT, tok)
    assert ex["prompt"] == TEACHER_PROMPT
    assert ex["completion"] == trace.strip() + "\n\n<|end_of_explanation|><|im_end|>"
    assert sft_boundary_is_clean(ex, tok)
    prompt_ids, full_ids = ids(tok, ex["prompt"]), ids(tok, ex["prompt"] + ex["completion"])
    first = tok.decode([full_ids[len(prompt_ids)]])
    assert first == first_piece and trace.strip().startswith(first)


def test_tags_adjacent_to_text_without_padding(tok):
    fmt = TeacherFormat(delimiters_padding="", teacher_system_prompt="Explain.")
    ex = teacher_sft_example(ROW | {"reasoning_trace": "First add."}, fmt, tok)
    assert ex["prompt"].endswith("<|end_of_solution|>\n\n<|begin_of_explanation|>")
    assert ex["completion"] == "First add.<|end_of_explanation|><|im_end|>"
    assert sft_boundary_is_clean(ex, tok)
    full_ids = ids(tok, ex["prompt"] + ex["completion"])
    assert pieces(tok, full_ids[len(ids(tok, ex["prompt"])):])[:2] == ["First", " add"]


def test_unclean_boundary_is_rejected(tok):
    fmt = TeacherFormat(delimiters_padding=" ", teacher_system_prompt="Explain.")
    ex = teacher_sft_example(ROW | {"reasoning_trace": "First add."}, fmt, tok)
    assert ex["prompt"].endswith("<|begin_of_explanation|> ")
    assert not sft_boundary_is_clean(ex, tok)  # '|', '>', ' ' vs '|', '>', ' First'
    rows, rejected = build_teacher_rows([ROW | {"reasoning_trace": "First add."}], mode="sft", fmt=fmt,
                                        tokenizer=tok, data_format="custom")
    assert rows == [] and rejected == {REJECT_BOUNDARY: 1}
    rows, rejected = build_teacher_rows([ROW], mode="rl", fmt=fmt, tokenizer=tok, data_format="custom")
    assert len(rows) == 1 and not rejected  # RL prompts have no prompt/completion boundary to respect


# ------------------------------------------------------------------------------------------------- RL prompts


def test_rl_prompt(tok):
    row = teacher_rl_prompt({"question": " What is 2 plus 3? ", "solution": "5"}, FMT, tok)
    assert row == {"prompt": TEACHER_PROMPT, "question": "What is 2 plus 3?", "solution": "5",
                   "teacher_format": FMT.fingerprint}
    assert row["prompt"].endswith("<|begin_of_explanation|>\n\n")
    assert pieces(tok, ids(tok, row["prompt"]))[-6:] == ["<|", "begin", "_of", "_explanation", "|>\n", "\n"]
    r1 = TeacherFormat.r1(teacher_system_prompt="Explain.")
    assert teacher_rl_prompt(ROW, r1, tok)["prompt"].endswith(
        "<|im_start|>assistant\n<solution>\n\n5\n\n</solution>\n\n<explanation>\n\n")


def test_student_chat_exact(tok):
    text = student_chat("What is 2 plus 3?", "\n\n2 + 3 = 5.\n\n", " 5 ", FMT, tok)
    assert text == ("<|im_start|>system\nThink, then answer.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                    "<|im_start|>assistant\n<|begin_of_thought|>\n\n2 + 3 = 5.\n\n<|end_of_thought|>\n\n"
                    "<|begin_of_solution|>\n\n5\n\n<|end_of_solution|><|im_end|>\n")
    head, tail = student_chat_parts("What is 2 plus 3?", "5", FMT, tok)
    assert head.endswith("<|im_start|>assistant\n<|begin_of_thought|>")
    assert tail == "<|end_of_thought|>\n\n<|begin_of_solution|>\n\n5\n\n<|end_of_solution|><|im_end|>\n"
    fmt = TeacherFormat(think_prefix="Okay. ", think_solution_delimiter="\n", student_system_prompt="S")
    assert student_chat("Q", "x", "y", fmt, tok).endswith(
        "<|im_start|>assistant\nOkay. <|begin_of_thought|>x<|end_of_thought|>\n"
        "<|begin_of_solution|>\n\ny\n\n<|end_of_solution|><|im_end|>\n")


# ------------------------------------------------------------------------------------------ parsing / rejection


BAD_ROWS = [
    {"question": "", "solution": "5", "reasoning_trace": "t"},
    {"question": "Q", "solution": "  ", "reasoning_trace": "t"},
    {"question": "Q", "solution": "5", "reasoning_trace": ""},
    {"question": "Q", "solution": "5", "reasoning_trace": "t <|end_of_explanation|> more"},
    {"question": "Q <|begin_of_explanation|>\n\n", "solution": "5", "reasoning_trace": "t"},
    {"question": "Q", "solution": "5<|end_of_solution|>", "reasoning_trace": "t"},
]


def test_rejection_counts(tok):
    rows, rejected = build_teacher_rows([ROW, *BAD_ROWS], mode="sft", fmt=FMT, tokenizer=tok, data_format="custom")
    assert len(rows) == 1 and rejected == {REJECT_EMPTY: 3, REJECT_AMBIGUOUS: 3}
    # RL needs no trace: the empty-trace and trace-with-tag rows are fine there
    rows, rejected = build_teacher_rows([ROW, *BAD_ROWS], mode="rl", fmt=FMT, tokenizer=tok, data_format="custom")
    assert len(rows) == 3 and rejected == {REJECT_EMPTY: 2, REJECT_AMBIGUOUS: 2}


def test_prepare_logs_rejections_and_raises_when_nothing_is_left(tok, tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROW, *BAD_ROWS]))
    with caplog.at_level(logging.WARNING, logger="rlt.data.teacher"):
        train, eval_ds = prepare_teacher_datasets(str(path), mode="sft", tokenizer=tok, fmt=FMT)
    assert len(train) == 1 and eval_ds is None and train.column_names == ["prompt", "completion"]
    assert "rejected 6 of 7 rows" in caplog.text and "'ambiguous': 3" in caplog.text and "'empty': 3" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in BAD_ROWS[:3]))
    with pytest.raises(DataError, match="none of its 3 rows"):
        prepare_teacher_datasets(str(bad), mode="sft", tokenizer=tok, fmt=FMT)


def test_custom_columns_and_missing_trace(tok, tmp_path, caplog):
    path = tmp_path / "train.jsonl"  # the reference read 'prompt' here; column names are configurable instead
    path.write_text(json.dumps({"prompt_text": "What is 2 plus 3?", "answer_text": "5"}) + "\n")
    columns = {"question": "prompt_text", "solution": "answer_text"}
    with caplog.at_level(logging.WARNING, logger="rlt.data.teacher"):
        train, _ = prepare_teacher_datasets(str(path), mode="sft", tokenizer=tok, fmt=FMT, columns=columns,
                                            data_format="custom")
    assert "solution is used as the explanation trace" in caplog.text
    assert train[0] == {"prompt": TEACHER_PROMPT, "completion": "5\n\n<|end_of_explanation|><|im_end|>"}
    rl, _ = prepare_teacher_datasets(str(path), mode="rl", tokenizer=tok, fmt=FMT, columns=columns)
    assert rl[0] == {"prompt": TEACHER_PROMPT, "question": "What is 2 plus 3?", "solution": "5",
                     "teacher_format": FMT.fingerprint}
    with pytest.raises(DataError, match="no column"):
        prepare_teacher_datasets(str(path), mode="rl", tokenizer=tok, fmt=FMT)


def test_gsm8k_rows_from_synthetic_arithmetic(tok):
    synthetic = {"num_train": 20, "num_eval": 5}
    raw = load_raw("synthetic:arithmetic", synthetic=synthetic, seed=42)
    train, eval_ds = prepare_teacher_datasets("synthetic:arithmetic", mode="sft", tokenizer=tok, fmt=FMT,
                                              synthetic=synthetic, eval_split="test", seed=42)
    assert len(train) == 20 and len(eval_ds) == 5
    for ex, src in zip(train, raw["train"], strict=True):
        final, worked = gsm8k_final_answer(src["answer"]), gsm8k_reasoning(src["answer"])
        assert ex["prompt"].endswith(f"<|begin_of_solution|>\n\n{final}\n\n<|end_of_solution|>\n\n"
                                     "<|begin_of_explanation|>\n\n")
        assert f"user\n{src['question'].strip()}<|im_end|>" in ex["prompt"]
        assert ex["completion"] == worked + "\n\n<|end_of_explanation|><|im_end|>"
        assert "####" not in ex["completion"] and "<<" not in ex["completion"]
        assert sft_boundary_is_clean(ex, tok)
    rl, _ = prepare_teacher_datasets("synthetic:arithmetic", mode="rl", tokenizer=tok, fmt=FMT,
                                     synthetic=synthetic, seed=42, max_samples=7)
    assert len(rl) == 7 and set(rl.column_names) == {"prompt", "question", "solution", "teacher_format"}
    finals = {gsm8k_final_answer(a) for a in raw["train"]["answer"]}
    assert all(r["solution"] in finals and r["prompt"].endswith("<|begin_of_explanation|>\n\n") for r in rl)
    assert parse_teacher_row({"question": "Q", "answer": "no final line"}, "gsm8k", FMT) == REJECT_EMPTY


STRATOS = {
    "system": "ignored",
    "conversations": [
        {"from": "user", "value": "What is 2+2?"},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nAdd 2 and 2.\n\nThat makes 4.\n\n<|end_of_thought|>"
                                       "\n\n<|begin_of_solution|>\n\n**4**\n\n<|end_of_solution|>"},
    ],
}


def test_stratos_conversation_rows(tok, tmp_path):
    assert parse_teacher_row(STRATOS, "stratos", FMT) == TeacherRow("What is 2+2?", "**4**",
                                                                     "Add 2 and 2.\n\nThat makes 4.")
    no_solution = {"conversations": [{"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "<|begin_of_thought|>x<|end_of_thought|>"}]}
    assert parse_teacher_row(no_solution, "stratos", FMT) == REJECT_MALFORMED
    assert parse_teacher_row({"conversations": "not a list"}, "stratos", FMT) == REJECT_MALFORMED
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(STRATOS) + "\n" + json.dumps({"system": "s", **no_solution}) + "\n")
    train, _ = prepare_teacher_datasets(str(path), mode="sft", tokenizer=tok, fmt=FMT)  # format auto-detected
    assert len(train) == 1
    assert train[0]["prompt"].endswith("user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<|begin_of_solution|>"
                                       "\n\n**4**\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n")
    assert train[0]["completion"] == "Add 2 and 2.\n\nThat makes 4.\n\n<|end_of_explanation|><|im_end|>"


def test_bad_arguments(tok):
    with pytest.raises(ConfigError, match="mode"):
        prepare_teacher_datasets("synthetic:arithmetic", mode="ppo", tokenizer=tok)
    with pytest.raises(DataError, match="teacher data format"):
        prepare_teacher_datasets("synthetic:arithmetic", mode="rl", tokenizer=tok, data_format="alpaca")
    with pytest.raises(DataError, match="no split 'validation'"):
        prepare_teacher_datasets("synthetic:arithmetic", mode="rl", tokenizer=tok, split="validation",
                                 synthetic={"num_train": 2, "num_eval": 1})
    with pytest.raises(DataError, match="no explanation trace"):
        teacher_sft_example({"question": "Q", "solution": "5"}, FMT, tok)


def test_default_system_prompts_are_the_published_texts():
    """The stratos defaults are the texts the published checkpoints were trained with (RLT's teacher prompt, the
    Bespoke-Stratos student prompt), with this format's tags; literal backslash-n and braces are part of them."""
    fmt = TeacherFormat()
    student, teacher = fmt.student_system_prompt, fmt.teacher_system_prompt
    assert student.startswith("Your role as an assistant involves thoroughly exploring questions through a "
                              "systematic long thinking process before providing the final precise and accurate")
    assert "<|begin_of_thought|> {thought with steps separated with '\\n\\n'} <|end_of_thought|> Each" in student
    assert student.endswith("<|begin_of_solution|> {final formatted, precise, and clear solution} "
                            "<|end_of_solution|> Now, try to solve the following question through the above "
                            "guidelines:")
    assert teacher.startswith("Your role as an assistant involves providing precise and accurate solutions before "
                              "providing detailed explanations with your full work")
    assert ("<|begin_of_solution|> {final formatted, precise, and clear solution} <|end_of_solution|>. In the "
            "Explanation section") in teacher
    assert ("<|begin_of_explanation|> {explanation with steps separated with '\\n\\n'} <|end_of_explanation|>"
            in teacher)
    assert teacher.endswith("refining any errors, and revisiting previous steps. ")
    r1 = TeacherFormat.r1()
    assert "<think> {thought with steps" in r1.student_system_prompt and "<explanation> {explanation" in \
        r1.teacher_system_prompt
