"""Periodic validation of GRPO and RLT runs (`eval_steps`): held-out reward per reward function, GSM8K accuracy of
the sampled completions, the RLT teacher reward and its terms on held-out rows, logged like training metrics."""

import pytest

from rlt.rewards.gsm8k import correctness_reward
from rlt.tracking import read_metrics
from rlt.train import run_training


def test_correctness_reward_logs_accuracy():
    logged = {}
    scores = correctness_reward(["<answer>5</answer>", "it is 5", "7"], answer=["5", "5", "5"],
                                log_metric=lambda name, value: logged.__setitem__(name, value))
    assert scores == [2.0, 1.0, 0.0]
    assert logged == {"gsm8k/accuracy": pytest.approx(2 / 3), "gsm8k/strict_accuracy": pytest.approx(1 / 3)}


def _evals(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval_reward" in r]


def test_grpo_validation_every_eval_steps(compose, tmp_path):
    run_training(compose(["run_cfg=tiny_grpo", "max_steps=4", "save_steps=4", "eval_steps=2", "max_eval_samples=8",
                          "report_to=[none]", f"output_dir={tmp_path}"]))
    evals = _evals(tmp_path)
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for key in ("eval_rewards/correctness/mean", "eval_rewards/format/mean", "eval_gsm8k/accuracy",
                    "eval_gsm8k/strict_accuracy"):
            assert key in r, sorted(r)
        assert 0.0 <= r["eval_gsm8k/strict_accuracy"] <= r["eval_gsm8k/accuracy"] <= 1.0
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r and "eval_reward" not in r]
    assert all("gsm8k/accuracy" in r for r in train)


def test_rlt_validation_scores_held_out_rows(compose, tmp_path):
    run_training(compose(["run_cfg=teacher_rlt_tiny", "max_steps=2", "save_steps=2", "eval_steps=2",
                          "max_eval_samples=4", "eval_split=test", "train_batch_size=8",
                          "per_device_train_batch_size=4", "per_device_eval_batch_size=4", "num_generations=4",
                          "max_completion_length=16",
                          "report_to=[none]", f"output_dir={tmp_path}"]))
    (r,) = _evals(tmp_path)
    assert r["step"] == 2
    for key in ("eval_teacher_kl/log_prob_term", "eval_teacher_kl/kl_term", "eval_teacher_kl/match_reward"):
        assert key in r, sorted(r)
    assert r["eval_reward"] == pytest.approx(r["eval_teacher_kl/reward"], abs=1e-4)


def test_validation_without_held_out_prompts_is_refused(compose):
    from rlt.config import validate
    from rlt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval_steps=2 validates on held-out prompts, but eval_split is null"):
        validate(compose(["run_cfg=teacher_rlt_tiny", "eval_steps=2"]))
