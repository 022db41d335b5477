"""Scored samples (`rlt.samples`): a few rows per dump with each reward function's value and the teacher reward's
terms, in samples.jsonl at the steps of metrics.jsonl and as a wandb Table; none with samples_every=0."""

import json
from types import SimpleNamespace

import pytest

from rlt.rewards.guard import guard_reward
from rlt.samples import SAMPLES_FILE, SamplesRecorder, Scored, reward_terms, sample_order, text
from rlt.tracking import read_metrics
from rlt.train import run_training

GRPO = ["run_cfg=tiny_grpo", "save_steps=3", "train_batch_size=8", "per_device_train_batch_size=8",
        "num_generations=4"]
RLT = ["run_cfg=teacher_rlt_tiny", "save_steps=3", "train_batch_size=8", "per_device_train_batch_size=4",
       "num_generations=4", "max_completion_length=24"]


def length_reward(completions, **kwargs):
    """A reward that is not 0 on the tiny model's text: its length / 100."""
    return [len(text(c)) / 100 for c in completions]


def _rows(out):
    return read_metrics(out / SAMPLES_FILE)


def test_sample_order_and_text_worked_examples():
    assert sample_order(8, 4) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sample_order(5, 2) == [0, 2, 4, 1, 3]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert text(chat) == "2+2?"
    assert text([{"role": "assistant", "content": [{"type": "text", "text": "4"}]}]) == "4"
    assert text("plain") == "plain" and text(None) == ""


def test_reward_terms_are_found_through_the_guard():
    class Terms:
        __name__ = "teacher_kl"
        last_terms = {"log_prob_term": [-1.0], "kl_term": [0.5], "match_reward": [0.0], "explanation_tokens": [3.0],
                      "unclosed": [0.0]}

        def __call__(self, prompts, completions=None, **kwargs):
            return [0.0]

    assert reward_terms(guard_reward(Terms(), penalty=-1.0)) == {
        "log_prob_term": [-1.0], "kl_term": [0.5], "match_reward": [0.0], "explanation_tokens": [3.0]}
    assert reward_terms(guard_reward(length_reward, penalty=-1.0)) is None


def test_dumps_at_every_nth_logged_step_with_the_round_of_that_step(tmp_path):
    """every=2: logged steps 1, 3, 5; a due step that scored nothing (one round feeds two steps) takes the next
    step's round, labelled with that step; a round not dumped is not kept for a later step."""
    recorder = SamplesRecorder(tmp_path / SAMPLES_FILE, every=2, per_dump=2)
    args = SimpleNamespace(logging_steps=1, report_to=["none"])

    def step(n, scored):
        if scored:
            rows = [f"p{n}"] * 4
            recorder.capture(SimpleNamespace(), Scored(prompts=rows, completions=[f"c{n}-{i}" for i in range(4)],
                                                       reward=[float(i) for i in range(4)],
                                                       per_func={"f": [float(i) for i in range(4)]}, terms={},
                                                       group=2, gathered=4))
        state = SimpleNamespace(global_step=n, is_world_process_zero=True)
        recorder.on_log(args, state, None, logs={"loss": 0.0, "reward": 0.0})

    for n, scored in ((1, True), (2, True), (3, False), (4, True), (5, True)):
        step(n, scored)
    rows = _rows(tmp_path)
    assert [(r["step"], r["completion"]) for r in rows] == [(1, "c1-0"), (1, "c1-2"), (4, "c4-0"), (4, "c4-2"),
                                                           (5, "c5-0"), (5, "c5-2")]
    assert rows[0]["advantage"] is None  # no TRL logs to take it from


def test_grpo_rows_with_each_reward_function_at_the_logged_steps_and_a_wandb_table(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = run_training(compose([*GRPO, f"output_dir={tmp_path}", "max_steps=3", "samples_every=1",
                                    "samples_per_dump=2", "reward_weights=[1.0,0.5]", "report_to=[wandb]",
                                    "wandb_mode=offline",
                                    "reward_funcs=[{_target_:rlt.rewards.gsm8k.correctness_reward},"
                                    "{_target_:tests.test_samples.length_reward}]"]))
    assert summary["global_step"] == 3
    rows = _rows(tmp_path)
    logged = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 1, 2, 2, 3, 3] and sorted(set(logged)) == [1, 2, 3]
    columns = ["step", "prompt", "completion", "reward", "advantage", "correctness", "length_reward"]
    for r in rows:
        assert list(r) == columns
        assert r["prompt"] and r["completion"] and r["advantage"] is not None
        assert r["reward"] == pytest.approx(r["correctness"] + 0.5 * r["length_reward"], abs=1e-5)
        assert r["length_reward"] == pytest.approx(len(r["completion"]) / 100, abs=1e-5)
    assert rows[0]["prompt"] != rows[1]["prompt"]  # the first completions of two groups
    tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 3, sorted(p.name for p in tmp_path.rglob("*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == columns and len(table["data"]) == 2
    _assert_plots_and_summary(tmp_path, summary, ["rewards/correctness/mean", "rewards/length_reward/mean"])


def _assert_plots_and_summary(out, summary, terms):
    """The end of a training run: plots/*.png (non-trivial images of metrics.jsonl's values, tested in detail in
    tests/test_report.py) and a summary.json with first / last / best / mean of the last values of each term."""
    from matplotlib.image import imread

    plots = {p.stem: p for p in (out / "plots").glob("*.png")}
    assert {"reward", "loss"} <= set(plots), sorted(plots)
    image = imread(plots["reward"])
    assert image.shape[0] > 100 and image.std() > 0.01  # not one colour
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary, default=str))
    rewards = [r["reward"] for r in read_metrics(out / "metrics.jsonl") if "reward" in r and "loss" in r]
    assert saved["metrics"]["reward"]["first"] == pytest.approx(rewards[0])
    assert saved["metrics"]["reward"]["last"] == pytest.approx(rewards[-1])
    assert saved["metrics"]["reward"]["best"] == pytest.approx(max(rewards))
    for term in terms:
        assert set(saved["metrics"][term]) == {"first", "last", "best", "mean_last"}, term
    assert saved["steps"] == summary["global_step"] and saved["wall_time_s"] >= 0
    assert {"learning_rate", "max_steps"} <= set(saved["hyperparameters"])


def test_rlt_rows_carry_the_teacher_reward_terms(compose, tmp_path):
    summary = run_training(compose([*RLT, f"output_dir={tmp_path}", "max_steps=2", "samples_every=1",
                                    "samples_per_dump=3", "report_to=[none]"]))
    assert summary["global_step"] == 2
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    for r in rows:
        assert r["prompt"].endswith("<|begin_of_explanation|>\n\n") and r["advantage"] is not None
        assert r["reward"] == pytest.approx(r["teacher_kl"], abs=1e-4)
        assert r["reward"] == pytest.approx(r["log_prob_term"] - r["kl_term"] + r["match_reward"], abs=1e-4)
        assert r["explanation_tokens"] >= 0
    _assert_plots_and_summary(tmp_path, summary, ["teacher_kl/log_prob_term", "teacher_kl/kl_term",
                                                  "teacher_kl/match_reward"])


def test_samples_every_0_writes_nothing(compose, tmp_path):
    summary = run_training(compose([*GRPO, f"output_dir={tmp_path}", "max_steps=1", "samples_every=0",
                                    "report_to=[none]", "train_batch_size=4", "per_device_train_batch_size=4"]))
    assert summary["global_step"] == 1
    assert not (tmp_path / SAMPLES_FILE).exists()
