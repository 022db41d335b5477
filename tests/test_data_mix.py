"""`dataset_mix`: several SFT sources (alpaca, dolly, sharegpt, messages) in one seeded training set; config checks
naming the key and the index; the per-source counts in the log and in summary.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlt.config import validate
from rlt.data.mix import plan_counts, prepare_sft_mix
from rlt.errors import ConfigError, DataError

from .conftest import REPO

SIZES = {"alpaca": 40, "dolly": 30, "sharegpt": 20, "oasst": 10}


def _rows(kind: str, n: int) -> list[dict]:
    if kind == "alpaca":
        return [{"instruction": f"alpaca task {i}", "input": "", "output": f"alpaca answer {i}"} for i in range(n)]
    if kind == "dolly":
        return [{"instruction": f"dolly question {i}", "context": "", "response": f"dolly response {i}",
                 "category": "open_qa"} for i in range(n)]
    if kind == "sharegpt":
        return [{"conversations": [{"from": "human", "value": f"sharegpt hi {i}"}, {"from": "gpt", "value": "hello"},
                                   {"from": "human", "value": "and?"}, {"from": "gpt", "value": f"bye {i}"}]}
                for i in range(n)]
    return [{"messages": [{"role": "prompter", "content": f"oasst question {i}"},
                          {"role": "assistant", "content": f"oasst answer {i}"}]} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for kind, n in SIZES.items():
        out[kind] = root / f"{kind}.jsonl"
        out[kind].write_text("".join(json.dumps(r) + "\n" for r in _rows(kind, n)))
    return out


FORMATS = {"alpaca": "alpaca", "dolly": "dolly", "sharegpt": "sharegpt", "oasst": "messages"}


def mix(files, **sizes) -> list[dict]:
    """One source per keyword: ``alpaca={"rows": 3}`` -> that source with its format and rows."""
    return [{"dataset_id_or_path": str(files[kind]), "data_format": FORMATS[kind], **size}
            for kind, size in sizes.items()]


def origin(row: dict) -> str:
    """Which fixture a mixed row came from: the first word of its first user message."""
    messages = row["messages"] if "messages" in row else row["prompt"]
    return next(m["content"] for m in messages if m["role"] == "user").split()[0]


def counts_of(ds) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in ds:
        out[origin(row)] = out.get(origin(row), 0) + 1
    return out


# ------------------------------------------------------------------------------------------------------ planning


def test_plan_counts_weights_rows_and_total():
    assert plan_counts([1000, 500], weights=[0.6, 0.4]) == [750, 500]  # dolly binds: 500 / 0.4 = 1250 in all
    assert plan_counts([1000, 500], weights=[0.6, 0.4], total=1000) == [600, 400]
    assert plan_counts([40, 30, 20, 10], weights=[1, 1, 1, 1], total=30) == [8, 8, 7, 7]
    assert plan_counts([5, 5], rows=[5, 1]) == [5, 1]
    with pytest.raises(DataError, match=r"dolly has 500 usable rows, but its share 40.0% of max_train_samples=1400 "
                                        r"is 560: lower max_train_samples to 1250 or less \(or its weight\)"):
        plan_counts([1000, 500], weights=[0.6, 0.4], total=1400, names=["alpaca", "dolly"])
    with pytest.raises(DataError, match=r"dolly has rows=9 but only 5 usable rows"):
        plan_counts([5, 5], rows=[1, 9], names=["alpaca", "dolly"])


# ------------------------------------------------------------------------------------------------------- mixing


def test_rows_are_exact_and_every_source_is_converted(files, caplog):
    sources = mix(files, alpaca={"rows": 12}, dolly={"rows": 5}, sharegpt={"rows": 7}, oasst={"rows": 3})
    with caplog.at_level(logging.INFO, logger="rlt.data"):
        train, eval_ds, report = prepare_sft_mix(sources, eval_split=None, all_assistant_turns=True, seed=1)
    assert counts_of(train) == {"alpaca": 12, "dolly": 5, "sharegpt": 7, "oasst": 3} and eval_ds is None
    assert train.column_names == ["messages"]  # a conversation source + all assistant turns: one common form
    assert [s["rows"] for s in report["sources"]] == [12, 5, 7, 3] and report["total"] == 27
    assert [s["available"] for s in report["sources"]] == list(SIZES.values())
    assert "data mix: alpaca 12 (44.4%), dolly 5 (18.5%), sharegpt 7 (25.9%), oasst 3 (11.1%)" in caplog.text
    sharegpt = next(r for r in train if origin(r) == "sharegpt")
    assert [m["role"] for m in sharegpt["messages"]] == ["user", "assistant", "user", "assistant"]
    assert len({json.dumps(r) for r in train}) == len(train)  # sampled without replacement


def test_weights_within_rounding_and_never_oversampled(files):
    sources = mix(files, alpaca={"weight": 1}, dolly={"weight": 1}, sharegpt={"weight": 1}, oasst={"weight": 1})
    train, _, report = prepare_sft_mix(sources, eval_split=None, max_train_samples=30, seed=0)
    assert [s["rows"] for s in report["sources"]] == [8, 8, 7, 7] and len(train) == 30
    for source in report["sources"]:
        assert abs(source["rows"] - 30 / 4) < 1 and source["share"] == source["rows"] / 30
    # without max_train_samples: the largest total no source oversamples (oasst's 10 rows at 25% -> 40)
    _, _, report = prepare_sft_mix(sources, eval_split=None, seed=0)
    assert [s["rows"] for s in report["sources"]] == [10, 10, 10, 10]
    weighted = mix(files, alpaca={"weight": 0.6}, dolly={"weight": 0.4})  # 40 / 0.6 = 66.7, 30 / 0.4 = 75
    _, _, report = prepare_sft_mix(weighted, eval_split=None, seed=0)
    assert [s["rows"] for s in report["sources"]] == [40, 26]


def test_same_seed_same_rows_other_seed_other_rows(files):
    sources = mix(files, alpaca={"rows": 10}, dolly={"rows": 10}, sharegpt={"rows": 5})
    first, _, _ = prepare_sft_mix(sources, eval_split=None, seed=3)
    again, _, _ = prepare_sft_mix(sources, eval_split=None, seed=3)
    other, _, _ = prepare_sft_mix(sources, eval_split=None, seed=4)
    assert first.to_list() == again.to_list()
    assert first.to_list() != other.to_list()
    assert {json.dumps(r) for r in first} != {json.dumps(r) for r in other}  # other rows, not only another order


def test_last_turn_only_keeps_prompt_completion_rows(files):
    train, _, _ = prepare_sft_mix(mix(files, alpaca={"rows": 4}, sharegpt={"rows": 4}), eval_split=None,
                                  all_assistant_turns=False)
    assert train.column_names == ["prompt", "completion"]
    row = next(r for r in train if origin(r) == "sharegpt")
    assert row["completion"][0]["content"].startswith("bye")


def test_eval_rows_from_each_sources_split_or_carved(files, tmp_path):
    split_dir = tmp_path / "dolly_dir"
    split_dir.mkdir()
    (split_dir / "train.jsonl").write_text(files["dolly"].read_text())
    (split_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("dolly", 6)))
    sources = [{"dataset_id_or_path": str(files["alpaca"]), "data_format": "alpaca", "rows": 10},
               {"dataset_id_or_path": str(split_dir), "data_format": "dolly", "rows": 10, "name": "dolly"}]
    train, eval_ds, report = prepare_sft_mix(sources, eval_split="test", eval_fraction=0.25, seed=0)
    assert [s["eval_rows"] for s in report["sources"]] == [10, 6]  # alpaca: 25% of 40 carved; dolly: its test split
    assert [s["available"] for s in report["sources"]] == [30, 30] and len(eval_ds) == report["eval_total"] == 16
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in eval_ds if origin(r) == "alpaca"}
    _, capped, _ = prepare_sft_mix(sources, eval_split="test", eval_fraction=0.25, max_eval_samples=5, seed=0)
    assert len(capped) == 5


def test_a_bad_source_is_named_by_index(files, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "response": "b"}\n{"instruction": oops}\n')
    sources = [*mix(files, alpaca={"rows": 2}), {"dataset_id_or_path": str(broken), "data_format": "dolly",
                                                 "rows": 1}]
    with pytest.raises(DataError, match=r"^dataset_mix\[1\] \(broken\): .*broken\.jsonl.* line 2") as e:
        prepare_sft_mix(sources, eval_split=None)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"^dataset_mix\[0\] \(missing\): dataset path .* does not exist"):
        prepare_sft_mix([{"dataset_id_or_path": str(tmp_path / "missing.jsonl"), "data_format": "alpaca",
                          "rows": 1}], eval_split=None)


# ------------------------------------------------------------------------------------------------------- config


def _problems(compose, *overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(compose(["run_cfg=tiny_sft", "data_cfg=instruct_mix", "max_train_samples=null", *overrides]))
    return [line.removeprefix("  - ") for line in str(e.value).splitlines()[1:]]


SOURCE = "{dataset_id_or_path: a.jsonl, data_format: alpaca, weight: 1}"


@pytest.mark.parametrize(("entry", "problem"), [
    ("{dataset_id_or_path: d.jsonl, data_format: dolly, weight: -1}", "dataset_mix[1].weight=-1 must be > 0"),
    ("{dataset_id_or_path: d.jsonl, data_format: dolly, wieght: 2}",
     "dataset_mix[1]: unknown key 'wieght' (did you mean weight?)"),
    ("{dataset_id_or_path: d.jsonl, data_format: dolly, weight: 1, rows: 5}",
     "dataset_mix[1]: give weight or rows, not both (weight=1, rows=5)"),
    ("{data_format: dolly, weight: 1}", "dataset_mix[1].dataset_id_or_path: missing (a hub id, file, directory or "
                                        "glob)"),
    ("{dataset_id_or_path: d.jsonl, data_format: csv, weight: 1}",
     "dataset_mix[1].data_format='csv' is not one of ['gsm8k', 'alpaca', 'dolly', 'sharegpt', 'messages', 'text', "
     "'prompt_completion']"),
    ("{dataset_id_or_path: d.jsonl, data_format: teacher, weight: 1}",
     "dataset_mix[1].data_format='teacher' is not allowed in a mix: RLT teacher rows train alone (data_format=teacher "
     "without dataset_mix)"),
    ("{dataset_id_or_path: d.jsonl, data_format: dolly}",
     "dataset_mix[1]: needs weight (its share of the mix) or rows (how many of its rows to use)"),
])
def test_config_errors_name_the_key_and_index(compose, entry, problem):
    assert _problems(compose, f"dataset_mix=[{SOURCE},{entry}]") == [problem]


def test_config_whole_mix_rules(compose):
    rows = "{dataset_id_or_path: d.jsonl, data_format: dolly, rows: 5}"
    assert _problems(compose, f"dataset_mix=[{SOURCE},{rows}]") == [
        "dataset_mix: sources [0] give weight and sources [1] give rows: give every source a weight (shares of the "
        "total) or every source rows (counts)"]
    text = "{dataset_id_or_path: c.txt, data_format: text, weight: 1}"
    assert _problems(compose, f"dataset_mix=[{SOURCE},{text}]") == [
        "dataset_mix mixes data_format=text with ['alpaca']: a text corpus has no prompt/completion, so it mixes only "
        "with other text corpora"]
    assert _problems(compose, f"dataset_mix=[{rows}]", "max_train_samples=10") == [
        "max_train_samples=10 with dataset_mix rows: the rows set the total (set max_train_samples=null, or give the "
        "sources weights)"]
    assert _problems(compose, f"dataset_mix=[{SOURCE}]", "eval_accuracy_samples=4") == [
        "eval_accuracy_samples=4 needs data_format=gsm8k (got dataset_mix)"]


def test_neither_a_dataset_nor_a_mix_is_a_clear_error(compose):
    assert _problems(compose, "dataset_mix=[]") == [
        "dataset_id_or_path: missing value (set it in the run config or on the command line, or list the sources in "
        "dataset_mix)",
        "data_format: missing value (set it in the run config or on the command line, or list the sources in "
        "dataset_mix)"]


def test_instruct_mix_example_validates_without_a_single_source(compose):
    run = validate(compose(["run_cfg=tiny_sft", "data_cfg=instruct_mix"]))
    assert run.dataset_id_or_path is None and run.data_format is None
    assert [s["data_format"] for s in run.dataset_mix] == ["alpaca", "dolly", "sharegpt", "messages"]
    assert "dataset_mix" not in (REPO / "cfgs" / "data_cfg" / "alpaca.yaml").read_text()
    with pytest.raises(ConfigError, match=r"dataset_mix: not used by algorithm=grpo \(it is a key of sft\)"):
        validate(compose(["run_cfg=tiny_grpo", f"dataset_mix=[{SOURCE}]"]))


# ------------------------------------------------------------------------------------------------------ a run


def test_tiny_sft_run_on_a_mix_records_the_counts(compose, files, tmp_path, caplog):
    from rlt.train import run_training

    entries = ",".join(f"{{name: {k}, dataset_id_or_path: '{files[k]}', data_format: {FORMATS[k]}, rows: {n}}}"
                       for k, n in (("alpaca", 6), ("dolly", 4), ("sharegpt", 4), ("oasst", 2)))
    with caplog.at_level(logging.WARNING, logger="rlt.recipes.sft"):
        summary = run_training(compose([
            "run_cfg=tiny_sft", "report_to=[none]", f"output_dir={tmp_path / 'run'}", f"dataset_mix=[{entries}]",
            "eval_split=null", "eval_fraction=0.25", "max_steps=3", "eval_steps=null", "save_steps=3",
            "save_final_model=false", "plots=false"]))
    assert "dataset_mix lists the sources, so dataset_id_or_path='synthetic:arithmetic', data_format='gsm8k' are " \
           "not used" in caplog.text  # tiny_sft's data_cfg stays in the config, the mix wins
    assert summary["global_step"] == 3 and summary["eval_loss"] > 0
    written = json.loads((tmp_path / "run" / "summary.json").read_text())["data_mix"]
    assert [(s["name"], s["rows"]) for s in written["sources"]] == [("alpaca", 6), ("dolly", 4), ("sharegpt", 4),
                                                                    ("oasst", 2)]
    assert written["total"] == 16 and written["eval_total"] == 10 + 8 + 5 + 3
