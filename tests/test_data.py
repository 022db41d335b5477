"""Tests for rlt.data: format conversion, GSM8K parsing, synthetic problems, and loading from files / directories."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from rlt.data import (
    DEFAULT_COLUMNS,
    arithmetic_problems,
    gsm8k_final_answer,
    gsm8k_prompt,
    gsm8k_prompt_dataset,
    gsm8k_reasoning,
    load_raw,
    prepare_gsm8k_eval,
    prepare_sft_datasets,
    render_gsm8k_completion,
    split_arithmetic,
    to_sft_example,
)
from rlt.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"

SYS = {"role": "system", "content": "Be brief."}


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def sft(path: Path | str, data_format: str, **kw):
    kw.setdefault("eval_split", None)
    return prepare_sft_datasets(dataset_id_or_path=str(path), data_format=data_format, **kw)


# ------------------------------------------------------------------------------------------------- GSM8K parsing


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Some work.\n#### 1,234", "1234"),
        ("#### 1,234,567", "1234567"),
        ("It drops.\n#### -5", "-5"),
        ("Three quarters.\n####  3/4 ", "3/4"),
        ("first #### 1\nsecond #### 2", "2"),
        ("no final line here", None),
        ("####   ", None),
    ],
)
def test_gsm8k_final_answer(answer, expected):
    assert gsm8k_final_answer(answer) == expected


def test_gsm8k_reasoning_strips_annotations_and_final_line():
    answer = "He buys 3 * 4 = <<3*4=12>>12 eggs.\nHe eats 2, so 12 - 2 = <<12-2=10>>10 remain.\n#### 10"
    assert gsm8k_reasoning(answer) == "He buys 3 * 4 = 12 eggs.\nHe eats 2, so 12 - 2 = 10 remain."


def test_render_gsm8k_completion_styles():
    answer = "3 + 4 = <<3+4=7>>7 cats.\n#### 7"
    assert render_gsm8k_completion(answer, "gsm8k") == answer
    assert render_gsm8k_completion(answer, "reasoning_answer_tags") == (
        "<reasoning>\n3 + 4 = 7 cats.\n</reasoning>\n<answer>\n7\n</answer>"
    )
    assert render_gsm8k_completion("Big.\n#### 2,000", "reasoning_answer_tags").endswith("<answer>\n2000\n</answer>")
    with pytest.raises(DataError, match="no final"):
        render_gsm8k_completion("no final", "reasoning_answer_tags")
    with pytest.raises(DataError, match="completion_style"):
        render_gsm8k_completion(answer, "xml")


def test_gsm8k_prompt():
    assert gsm8k_prompt(" What is 1 + 1? ", None) == [user("What is 1 + 1?")]
    assert gsm8k_prompt("Q?", "") == [user("Q?")]
    assert gsm8k_prompt("Q?", "Be brief.") == [SYS, user("Q?")]


# -------------------------------------------------------------------------------------------------- to_sft_example


def convert(row, data_format, system_prompt=None, **kw):
    return to_sft_example(row, data_format=data_format, columns=DEFAULT_COLUMNS[data_format],
                          system_prompt=system_prompt, **kw)


def test_to_sft_alpaca_and_dolly():
    assert convert({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca") == {
        "prompt": [user("Add.\n\n2 and 3")], "completion": [assistant("5")]}
    assert convert({"instruction": "Hi.", "input": "", "output": "Hello."}, "alpaca", "Be brief.") == {
        "prompt": [SYS, user("Hi.")], "completion": [assistant("Hello.")]}
    assert convert({"instruction": "Hi.", "input": None, "output": ""}, "alpaca") is None
    assert convert({"instruction": None, "input": "x", "output": "y"}, "alpaca") is None
    assert convert({"instruction": "Who?", "context": "Ann wrote it.", "response": "Ann."}, "dolly") == {
        "prompt": [user("Who?\n\nAnn wrote it.")], "completion": [assistant("Ann.")]}


def test_to_sft_gsm8k_and_prompt_completion_and_text():
    row = {"question": "What is 2 + 5?", "answer": "2 + 5 = <<2+5=7>>7\n#### 7"}
    assert convert(row, "gsm8k", "Be brief.") == {
        "prompt": [SYS, user("What is 2 + 5?")], "completion": [assistant("2 + 5 = <<2+5=7>>7\n#### 7")]}
    assert convert(row, "gsm8k", completion_style="reasoning_answer_tags")["completion"] == [
        assistant("<reasoning>\n2 + 5 = 7\n</reasoning>\n<answer>\n7\n</answer>")]
    assert convert({"question": "Q?", "answer": "no final"}, "gsm8k", completion_style="reasoning_answer_tags") is None
    assert convert({"prompt": "Ping?", "completion": "Pong."}, "prompt_completion") == {
        "prompt": [user("Ping?")], "completion": [assistant("Pong.")]}
    assert convert({"text": " some text \n"}, "text", "ignored for text") == {"text": "some text"}
    assert convert({"text": "   "}, "text") is None


def test_to_sft_custom_columns():
    row = {"q": "Why?", "sol": "Because.\n#### 1"}
    out = to_sft_example(row, data_format="gsm8k", columns={"question": "q", "answer": "sol"}, system_prompt=None)
    assert out == {"prompt": [user("Why?")], "completion": [assistant("Because.\n#### 1")]}


def test_to_sft_conversations():
    sharegpt = [{"from": "system", "value": "Own rules."}, {"from": "human", "value": "A"},
                {"from": "gpt", "value": "B"}, {"from": "human", "value": "C"}, {"from": "gpt", "value": "D"},
                {"from": "human", "value": "trailing turn is discarded"}]
    assert convert({"conversations": sharegpt}, "sharegpt", "Be brief.") == {
        "prompt": [{"role": "system", "content": "Own rules."}, user("A"), assistant("B"), user("C")],
        "completion": [assistant("D")]}
    oasst = [{"role": "prompter", "content": "Q"}, {"role": "assistant", "content": "R"}]
    assert convert({"messages": oasst}, "messages", "Be brief.") == {
        "prompt": [SYS, user("Q")], "completion": [assistant("R")]}
    roles = [{"role": "user", "content": "u"}, {"role": "bot", "content": "b"}, {"role": "human", "content": "h"},
             {"role": "model", "content": "m"}]
    assert convert({"messages": roles}, "messages") == {
        "prompt": [user("u"), assistant("b"), user("h")], "completion": [assistant("m")]}


@pytest.mark.parametrize(
    "turns",
    [
        None,
        "human: hi",
        [],
        [{"from": "human", "value": "nobody answers"}],
        [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}],
        [{"from": "human"}, {"from": "gpt", "value": "A"}],
        [{"value": "Q"}, {"from": "gpt", "value": "A"}],
        [{"from": "gpt", "value": "I start."}],
        [{"from": "narrator", "value": "Q"}, {"from": "gpt", "value": "A"}],
        ["human: hi", {"from": "gpt", "value": "A"}],
        [{"from": "human", "value": ["multi", "modal"]}, {"from": "gpt", "value": "A"}],
        [{"from": 3, "value": "Q"}, {"from": "gpt", "value": "A"}],
    ],
)
def test_malformed_conversations_give_none(turns):
    assert convert({"conversations": turns}, "sharegpt") is None
    assert convert({"messages": turns}, "messages") is None


def test_to_sft_unknown_format_raises():
    with pytest.raises(DataError, match="unknown data_format"):
        to_sft_example({}, data_format="chatml", columns={}, system_prompt=None)


# ---------------------------------------------------------------------------------------------- file-based formats


def test_alpaca_file():
    train, eval_ds = sft(FIXTURES / "alpaca.jsonl", "alpaca", system_prompt="Be brief.")
    assert eval_ds is None
    assert train.column_names == ["prompt", "completion"]
    assert train.to_list() == [
        {"prompt": [SYS, user("Name a primary color.")], "completion": [assistant("Red is a primary color.")]},
        {"prompt": [SYS, user("Translate to French.\n\nGood morning")], "completion": [assistant("Bonjour")]},
    ]


def test_dolly_file():
    train, _ = sft(FIXTURES / "dolly.jsonl", "dolly")
    assert train.column_names == ["prompt", "completion"]
    assert train.to_list() == [
        {"prompt": [user("How tall is the toy tower?\n\nThe toy tower in the story is built from 12 wooden blocks "
                         "and is 36 cm tall.")],
         "completion": [assistant("It is 36 cm tall.")]},
        {"prompt": [user("Suggest a name for a pet snail.")], "completion": [assistant("Sir Slowpoke.")]},
    ]


def test_sharegpt_file_drops_malformed_with_count(caplog):
    with caplog.at_level(logging.WARNING, logger="rlt.data"):
        train, _ = sft(FIXTURES / "sharegpt.json", "sharegpt", system_prompt="Be brief.")
    assert train.to_list() == [
        {"prompt": [SYS, user("Hi there!")], "completion": [assistant("Hello! How can I help?")]},
        {"prompt": [{"role": "system", "content": "You are terse."}, user("What is 2 + 2?"), assistant("4"),
                    user("And times 3?")],
         "completion": [assistant("12")]},
    ]
    assert re.search(r"dropped 5 of 7 rows", caplog.text)


def test_messages_oasst_file(caplog):
    with caplog.at_level(logging.WARNING, logger="rlt.data"):
        train, _ = sft(FIXTURES / "messages_oasst.jsonl", "messages")
    assert train.to_list() == [
        {"prompt": [user("Give me a fun fact about owls.")],
         "completion": [assistant("Owls cannot move their eyes in their sockets.")]},
        {"prompt": [user("Pick a number."), assistant("Seven."), user("Why that one?")],
         "completion": [assistant("It felt lucky.")]},
    ]
    assert "dropped 2 of 4 rows" in caplog.text


def test_gsm8k_style_file_both_styles():
    train, _ = sft(FIXTURES / "gsm8k_style.jsonl", "gsm8k")
    assert train[1] == {
        "prompt": [user("A library owns 1,200 books and buys 34 more. How many books does it own now?")],
        "completion": [assistant("It owns 1200 + 34 = <<1200+34=1234>>1234 books.\n#### 1,234")]}
    tagged, _ = sft(FIXTURES / "gsm8k_style.jsonl", "gsm8k", completion_style="reasoning_answer_tags")
    assert tagged[1]["completion"] == [
        assistant("<reasoning>\nIt owns 1200 + 34 = 1234 books.\n</reasoning>\n<answer>\n1234\n</answer>")]


def test_prompt_completion_csv():
    train, _ = sft(FIXTURES / "prompt_completion.csv", "prompt_completion")
    assert train.to_list() == [
        {"prompt": [user("What colour is the sky on a clear day?")], "completion": [assistant("Blue.")]},
        {"prompt": [user("Count to three, please.")], "completion": [assistant("One, two, three.")]},
    ]


def test_parquet_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict({"ask": ["One?", "Two?"], "reply": ["1", "2"]}).to_parquet(str(path))
    train, _ = sft(path, "prompt_completion", data_columns={"prompt": "ask", "completion": "reply"})
    assert train.to_list() == [{"prompt": [user("One?")], "completion": [assistant("1")]},
                               {"prompt": [user("Two?")], "completion": [assistant("2")]}]


def test_txt_corpus_directory_and_glob():
    train, eval_ds = sft(FIXTURES / "corpus", "text")
    assert eval_ds is None
    assert train.column_names == ["text"]
    assert train["text"] == [
        "The river bends twice before it reaches the sea.\nBoats wait at the second bend.",
        "Nobody remembers who built the old bridge.",
        "Lanterns are lit at dusk in the harbour town.",
    ]
    lines, _ = sft(str(FIXTURES / "corpus" / "*.txt"), "text", text_sample_by="line")
    assert len(lines) == 4  # the blank line is dropped
    doc = load_raw(str(FIXTURES / "corpus"), text_sample_by="document")
    assert doc["train"].num_rows == 2


def test_optional_alpaca_input_column_may_be_absent(tmp_path):
    path = tmp_path / "no_input.jsonl"
    path.write_text(json.dumps({"instruction": "Wave.", "output": "*waves*"}) + "\n")
    train, _ = sft(path, "alpaca")
    assert train.to_list() == [{"prompt": [user("Wave.")], "completion": [assistant("*waves*")]}]
    with pytest.raises(DataError, match=r"no column 'extra' \(data_columns.input\)"):
        sft(path, "alpaca", data_columns={"input": "extra"})


# ------------------------------------------------------------------------------------------------------- errors


def test_missing_column_names_column_and_present_columns():
    with pytest.raises(DataError) as info:
        sft(FIXTURES / "wrong_columns.jsonl", "gsm8k")
    message = str(info.value)
    assert "split 'train' has no column 'question' (data_columns.question)" in message
    assert "columns present: ['prompt', 'solution']" in message
    # mapping the columns fixes it
    train, _ = sft(FIXTURES / "wrong_columns.jsonl", "prompt_completion", data_columns={"completion": "solution"})
    assert train[0] == {"prompt": [user("What is 5 + 6?")], "completion": [assistant("11")]}


def test_unknown_data_columns_key():
    with pytest.raises(DataError, match="does not use"):
        sft(FIXTURES / "alpaca.jsonl", "alpaca", data_columns={"question": "instruction"})


def test_empty_file_raises():
    with pytest.raises(DataError, match="empty.jsonl' is empty"):
        sft(FIXTURES / "empty.jsonl", "gsm8k")


def test_whitespace_only_file_raises(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="is empty"):
        load_raw(str(tmp_path / "blank.txt"))


def test_unknown_format_raises():
    with pytest.raises(DataError, match=r"unknown data_format 'chatml'.*'alpaca'"):
        sft(FIXTURES / "alpaca.jsonl", "chatml")


def test_unknown_completion_style_raises():
    with pytest.raises(DataError, match="completion_style"):
        sft(FIXTURES / "gsm8k_style.jsonl", "gsm8k", completion_style="xml")


def test_missing_path_raises():
    with pytest.raises(DataError, match="does not exist"):
        load_raw(str(FIXTURES / "nope.jsonl"))
    with pytest.raises(DataError, match="matches no files"):
        load_raw(str(FIXTURES / "nope" / "*.txt"))


def test_all_rows_unusable_raises(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}]}) for i in range(3)))
    with pytest.raises(DataError, match="none of its 3 rows"):
        sft(path, "sharegpt")


def test_hub_failure_is_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_raw("someone/some-dataset")
    message = str(info.value)
    assert "'someone/some-dataset'" in message and "offline" in message and "local path" in message


# ------------------------------------------------------------------------------------------- directories & splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def made_up_gsm8k(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(offset, offset + n)]


def test_directory_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", made_up_gsm8k(6))
    write_jsonl(tmp_path / "dev.jsonl", made_up_gsm8k(2, offset=100))
    (tmp_path / "LICENSE").write_text("not data")
    raw = load_raw(str(tmp_path))
    assert sorted(raw) == ["train", "validation"]
    train, eval_ds = sft(tmp_path, "gsm8k", eval_split="validation")
    assert (len(train), len(eval_ds)) == (6, 2)
    with pytest.raises(DataError, match=r"no split 'test'.*available splits: \['train', 'validation'\]"):
        load_raw(str(tmp_path), split="test")


def test_directory_with_unknown_file_names(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", made_up_gsm8k(2))
    write_jsonl(tmp_path / "extra_stuff.jsonl", made_up_gsm8k(2))
    with pytest.raises(DataError, match=r"extra_stuff\.jsonl"):
        load_raw(str(tmp_path))


def test_unknown_train_split_lists_available(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", made_up_gsm8k(2))
    with pytest.raises(DataError, match=r"no split 'training'.*available splits: \['train'\]"):
        sft(tmp_path, "gsm8k", train_split="training")


def test_eval_split_missing_carves_fraction_or_returns_none(caplog):
    with caplog.at_level(logging.WARNING, logger="rlt.data"):
        train, eval_ds = sft(FIXTURES / "gsm8k_style.jsonl", "gsm8k", eval_split="test")
    assert (len(train), eval_ds) == (3, None)
    assert "no eval split 'test'" in caplog.text
    train, eval_ds = sft(FIXTURES / "gsm8k_style.jsonl", "gsm8k", eval_split="test", eval_fraction=0.3)
    assert (len(train), len(eval_ds)) == (2, 1)
    again_train, again_eval = sft(FIXTURES / "gsm8k_style.jsonl", "gsm8k", eval_split="test", eval_fraction=0.3)
    assert again_eval.to_list() == eval_ds.to_list()


def test_max_samples_seeded_subsample():
    kw = {"synthetic": {"num_train": 40, "num_eval": 10}}
    train, eval_ds = sft("synthetic:arithmetic", "gsm8k", eval_split="test", max_train_samples=5,
                         max_eval_samples=3, **kw)
    assert (len(train), len(eval_ds)) == (5, 3)
    again, _ = sft("synthetic:arithmetic", "gsm8k", max_train_samples=5, **kw)
    other, _ = sft("synthetic:arithmetic", "gsm8k", max_train_samples=5, seed=7, **kw)
    assert again.to_list() == train.to_list()
    assert other.to_list() != train.to_list()
    with pytest.raises(DataError, match="max_train_samples"):
        sft("synthetic:arithmetic", "gsm8k", max_train_samples=0, **kw)


# ------------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_well_formed():
    rows = arithmetic_problems(50, seed=3, max_terms=3, ops="+-*")
    assert rows == arithmetic_problems(50, seed=3, max_terms=3, ops="+-*")
    assert rows != arithmetic_problems(50, seed=4, max_terms=3, ops="+-*")
    assert arithmetic_problems(20, seed=3, max_terms=3, ops="+-*") == rows[:20]
    assert len({r["question"] for r in rows}) == 50
    for row in rows:
        assert set(row) == {"question", "answer"}
        final = gsm8k_final_answer(row["answer"])
        assert final is not None and final.isdigit(), row  # non-negative integer
        for a, op, b, result in re.findall(r"<<(\d+)([-+*])(\d+)=(\d+)>>", row["answer"]):
            assert eval(f"{a}{op}{b}") == int(result) >= 0  # noqa: S307 - digits and one operator only
        assert row["answer"].splitlines()[-1] == f"#### {final}"


def test_synthetic_only_addition_never_subtracts():
    for row in arithmetic_problems(30, seed=1, ops="+"):
        assert "-" not in row["answer"].replace("####", "")


def test_split_arithmetic_disjoint():
    train, test = split_arithmetic(200, 50, seed=0)
    assert (len(train), len(test)) == (200, 50)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert split_arithmetic(200, 50, seed=0) == (train, test)


def test_synthetic_errors():
    with pytest.raises(DataError, match="distinct"):
        arithmetic_problems(1000, max_operand=1, ops="-")
    with pytest.raises(DataError, match="ops"):
        arithmetic_problems(5, ops="/")
    with pytest.raises(DataError, match="unknown synthetic option"):
        load_raw("synthetic:arithmetic", synthetic={"num_rows": 5})
    with pytest.raises(DataError, match="unknown synthetic dataset"):
        load_raw("synthetic:calculus")


def test_synthetic_source():
    raw = load_raw("synthetic:arithmetic", synthetic={"num_train": 30, "num_eval": 7, "max_operand": 9}, seed=1)
    assert {k: len(v) for k, v in raw.items()} == {"train": 30, "test": 7}
    assert not set(raw["train"]["question"]) & set(raw["test"]["question"])
    items = prepare_gsm8k_eval(dataset_id_or_path="synthetic:arithmetic",
                               synthetic={"num_train": 30, "num_eval": 7}, system_prompt="Be brief.")
    assert len(items) == 7
    assert items[0]["prompt"] == gsm8k_prompt(items[0]["question"], "Be brief.")
    assert all(item["answer"].isdigit() for item in items)


def test_gsm8k_eval_helpers_on_fixture():
    items = prepare_gsm8k_eval(dataset_id_or_path=str(FIXTURES / "gsm8k_style.jsonl"), split="train")
    assert [i["answer"] for i in items] == ["24", "1234", "6"]
    assert items[2]["prompt"] == [user("Pia had 10 grapes and ate 4. How many are left?")]
    ds = gsm8k_prompt_dataset(dataset_id_or_path=str(FIXTURES / "gsm8k_style.jsonl"), max_samples=2)
    assert ds.column_names == ["prompt", "answer", "question"] and len(ds) == 2
    with pytest.raises(DataError, match="available splits"):
        prepare_gsm8k_eval(dataset_id_or_path=str(FIXTURES / "gsm8k_style.jsonl"))


# ------------------------------------------------------------------------------ undecodable / malformed data files

GSM8K_ROW = json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n"


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_latin1_jsonl_names_file_line_byte_offset_and_encoding(tmp_path):
    """pyarrow's JSON reader loads the latin-1 bytes without complaint: the error must still come at load time."""
    path = tmp_path / "latin.jsonl"
    path.write_bytes(GSM8K_ROW.encode() + '{"question": "Caf\u00e9?", "answer": "#### 2"}\n'.encode("latin-1"))
    message = one_line_error(sft, path, "gsm8k")
    offset = len(GSM8K_ROW) + len('{"question": "Caf')
    assert f"data file '{path}' is not UTF-8: line 2, byte offset {offset}: byte 0xe9" in message
    assert "latin-1" in message and f"iconv -f LATIN1 -t UTF-8 {path} > {path}.utf8" in message
    assert one_line_error(prepare_gsm8k_eval, dataset_id_or_path=str(path), split="train") == message


def test_csv_with_a_cp1252_byte(tmp_path):
    path = tmp_path / "pairs.csv"
    head = b"prompt,completion\nq1,a1\n"
    path.write_bytes(head + b"\x93q2\x94,a2\n")
    message = one_line_error(load_raw, str(path))
    assert f"data file '{path}' is not UTF-8: line 3, byte offset {len(head)}: byte 0x93" in message
    assert "cp1252" in message and "iconv -f CP1252 -t UTF-8" in message


def test_jsonl_with_a_broken_line_3(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(GSM8K_ROW * 2 + '{"question": "c", "answer": #### 3}\n' + GSM8K_ROW)
    message = one_line_error(sft, path, "gsm8k")
    assert message == (f"data file '{path}' is not valid JSON: line 3, column 29: Expecting value "
                       """(in '{"question": "c", "answer": #### 3}')""")


def test_json_document_with_a_syntax_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"question": "a", "answer": "#### 1"},\n  {"question": "b" "answer": "#### 2"}\n]\n')
    message = one_line_error(load_raw, str(path))
    assert f"data file '{path}' is not valid JSON: line 3, column 20: Expecting ',' delimiter" in message
    assert """(in '  {"question": "b" "answer": "#### 2"}')""" in message


def test_directory_and_glob_name_the_bad_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", made_up_gsm8k(3))
    (tmp_path / "test.jsonl").write_bytes(GSM8K_ROW.encode() * 4 + b'{"question": "x\xff"}\n')
    message = one_line_error(load_raw, str(tmp_path))
    offset = 4 * len(GSM8K_ROW) + len('{"question": "x')
    assert f"data file '{tmp_path / 'test.jsonl'}' is not UTF-8: line 5, byte offset {offset}: byte 0xff" in message
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("fine text\n")
    (corpus / "b.txt").write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    message = one_line_error(load_raw, str(corpus / "*.txt"))
    assert f"data file '{corpus / 'b.txt'}' is not UTF-8: line 2, byte offset 5: byte 0xef" in message


def test_load_failure_without_a_diagnosis_keeps_the_first_line_of_the_cause(tmp_path, monkeypatch):
    from datasets.exceptions import DatasetGenerationError

    path = tmp_path / "fine.jsonl"
    path.write_text(GSM8K_ROW)

    def fails(*args, **kwargs):
        try:
            raise ValueError("disk on fire\nmore detail")
        except ValueError as e:
            raise DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets, "load_dataset", fails)
    message = one_line_error(load_raw, str(path))
    assert message == f"could not read json file(s) ['{path}'] for split 'train': ValueError: disk on fire"


def test_diagnose_docstring_examples_hold():
    import doctest

    import rlt.data.diagnose

    result = doctest.testmod(rlt.data.diagnose)
    assert result.failed == 0 and result.attempted > 0, result


def test_train_cli_reports_a_bad_data_file_in_one_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(GSM8K_ROW * 2 + '{"question": "c", "answer": #### 3}\n')
    proc = subprocess.run([sys.executable, "-m", "rlt.train", "run_cfg=tiny_sft", f"dataset_id_or_path={path}",
                           "data_format=gsm8k", f"results_dir={tmp_path / 'results'}", "report_to=[none]"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    mentions = [line for line in proc.stderr.splitlines() if str(path) in line]
    assert mentions == [f"rlt: data file '{path}' is not valid JSON: line 3, column 29: Expecting value "
                        """(in '{"question": "c", "answer": #### 3}')"""], proc.stderr


# ------------------------------------------------------------------------------------------------------ real GSM8K


def test_real_gsm8k_loads(gsm8k_dir):
    expected = {split: sum(1 for line in (gsm8k_dir / f"{split}.jsonl").open() if line.strip())
                for split in ("train", "test")}
    assert expected == {"train": 7473, "test": 1319}
    train, test = prepare_sft_datasets(dataset_id_or_path=str(gsm8k_dir), data_format="gsm8k",
                                       completion_style="reasoning_answer_tags")
    assert (len(train), len(test)) == (expected["train"], expected["test"])
    for ds in (train, test):
        for completion in ds["completion"]:
            answer = re.search(r"<answer>\n(.*)\n</answer>$", completion[0]["content"])
            assert answer and re.fullmatch(r"-?\d+(\.\d+)?", answer.group(1)), completion
    items = prepare_gsm8k_eval(dataset_id_or_path=str(gsm8k_dir))
    assert len(items) == expected["test"]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", item["answer"]) for item in items)
