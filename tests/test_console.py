"""The training console (`rlt.console`): one line per logged record for GRPO, RLT and SFT, health warnings, the
``timing/*`` metrics, transformers' printer removed, third-party noise quiet unless ``verbose``; end to end on tiny
GRPO runs."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

from rlt import console
from rlt.console import ConsoleLine, Health, format_end, format_eval, format_step, quiet_trainer

REPO = Path(__file__).resolve().parents[1]

GRPO_LOGS = {
    "loss": 0.01, "grad_norm": 0.5, "learning_rate": 1e-4, "num_tokens": 4000.0, "completions/mean_length": 87.4,
    "completions/clipped_ratio": 0.125, "rewards/correctness/mean": 1.0, "rewards/correctness/std": 0.0,
    "rewards/format/mean": 0.23, "rewards/format/std": 0.1, "reward": 1.234, "reward_std": 0.456,
    "frac_reward_zero_std": 0.25, "kl": 0.0123, "entropy": 1.234, "step_time": 2.3, "epoch": 0.1,
    "timing/step_s": 2.3, "timing/generation_s": 1.2, "timing/reward_s": 0.3, "timing/train_s": 0.8,
    "timing/tokens_per_s": 410.2,
}


def test_grpo_line():
    assert format_step(GRPO_LOGS, 12, 300) == (
        "step 12/300 | reward 1.234 ± 0.456 | correctness 1.00, format 0.230 | zero-std 0.25 | kl 0.0123 | "
        "entropy 1.23 | len 87 (clipped 0.12) | 2.3 s/step (gen 1.2, reward 0.30, train 0.80) | 410 tok/s | "
        "eta 11m02s")


def test_async_line_shows_the_staleness():
    line = format_step({**GRPO_LOGS, "async/staleness": 1.0, "timing/generation_s": 0.01}, 12, 300)
    assert "| len 87 (clipped 0.12) | stale 1 | 2.3 s/step (gen 0.01," in line
    assert "| stale 0.5 |" in format_step({**GRPO_LOGS, "async/staleness": 0.5}, 2, 300)  # a mean over 2 steps


def test_rlt_line_shows_the_teacher_terms_instead_of_the_function_means():
    logs = {**GRPO_LOGS, "rewards/teacher_kl/mean": -8.13, "teacher_kl/log_prob_term": -7.107,
            "teacher_kl/kl_term": 0.0215, "teacher_kl/match_reward": -1.0, "teacher_kl/unclosed": 1.0,
            "teacher_kl/kl_raw_max": 0.33}
    for key in ("rewards/correctness/mean", "rewards/format/mean"):
        del logs[key]
    line = format_step(logs, 3, 3)
    assert line.startswith("step 3/3 | reward 1.234 ± 0.456 | log-prob term -7.11, kl term 0.0215, match -1.00, "
                           "unclosed 1.00 | zero-std 0.25 | kl 0.0123 |")
    assert "teacher_kl " not in line and "kl_raw" not in line and "eta" not in line  # last step: no eta


def test_sft_line():
    logs = {"loss": 1.2345, "grad_norm": 0.731, "learning_rate": 3e-4, "entropy": 7.5, "mean_token_accuracy": 0.1,
            "num_tokens": 589.0, "epoch": 0.02, "timing/step_s": 0.153}
    assert format_step(logs, 12, 300) == "step 12/300 | loss 1.23 | lr 3.0e-04 | grad 0.731 | 0.15 s/step | eta 44s"


def test_eval_and_end_lines():
    sft = {"eval_loss": 0.9101, "eval_runtime": 2.1, "eval_perplexity": 2.4846, "eval_mean_token_accuracy": 0.5,
           "epoch": 1.0}
    assert format_eval(sft, 100) == "eval @ step 100 | loss 0.910 | ppl 2.48 | token accuracy 0.500"
    grpo = {"eval_reward": 0.5, "eval_reward_std": 0.25, "eval_rewards/correctness/mean": 0.5,
            "eval_frac_reward_zero_std": 0.0, "eval_completions/mean_length": 40.2, "eval_runtime": 3.0}
    assert format_eval(grpo, 10) == ("eval @ step 10 | reward 0.500 ± 0.250 | correctness 0.500 | zero-std 0.00 | "
                                     "len 40")
    end = {"train_runtime": 662.0, "train_samples_per_second": 2.0, "train_loss": 0.5, "epoch": 1.0}
    assert format_end(end, 300) == "trained to step 300 in 11m02s (mean loss 0.500)"


def test_number_formats():
    assert [console.num(v) for v in (1.0, 0.0123, -7.107, 87.04, 825.2, 2e-5, float("nan"))] == [
        "1.00", "0.0123", "-7.11", "87.0", "825", "2.0e-05", "nan"]
    assert [console.duration(v) for v in (42.4, 662, 7384)] == ["42s", "11m02s", "2h03m"]


def test_no_learning_signal_warns_once_after_k_steps_then_rate_limited():
    health = Health(zero_std_steps=3, every=10)
    args = SimpleNamespace(num_generations=4, max_completion_length=32, learning_rate=1e-4)
    flat = {"loss": 0.0, "reward": 0.0, "frac_reward_zero_std": 1.0}
    warned = {step: health.check(flat, step, args) for step in range(1, 14)}
    assert [s for s, w in warned.items() if w] == [3, 13]  # at the 3rd step in a row, then 10 steps later
    assert "no learning signal for 3 logged steps" in warned[3][0] and "4 completions" in warned[3][0]
    assert "num_generations" in warned[3][0] and "easier task" in warned[3][0]
    # a step with signal resets the streak: 3 more flat steps are needed (and the rate limit still holds)
    health = Health(zero_std_steps=3, every=1)
    seq = [1.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    assert [bool(health.check({**flat, "frac_reward_zero_std": f}, i + 1, args)) for i, f in enumerate(seq)] == [
        False, False, False, False, False, True]


def test_clipped_and_non_finite_warnings():
    args = SimpleNamespace(num_generations=4, max_completion_length=32, learning_rate=1e-4)
    health = Health(every=50)
    out = health.check({"loss": 0.1, "reward": 0.5, "completions/clipped_ratio": 0.75}, 1, args)
    assert len(out) == 1 and "75% of the completions were cut at max_completion_length=32" in out[0]
    assert "raise max_completion_length" in out[0]
    assert not health.check({"loss": 0.1, "reward": 0.5, "completions/clipped_ratio": 0.75}, 2, args)
    assert not health.check({"loss": 0.1, "reward": 0.5, "completions/clipped_ratio": 0.4}, 60, args)
    nan = health.check({"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 3e-4}, 7, args)
    assert len(nan) == 1 and "non-finite loss nan, grad_norm inf at step 7" in nan[0]
    assert "lower learning_rate (now 3.0e-04)" in nan[0]
    assert not health.check({"loss": float("nan")}, 8, args)  # rate-limited


def _state(step=0, max_steps=10):
    state = TrainerState()
    state.global_step, state.max_steps = step, max_steps
    return state


def test_timing_metrics_are_added_to_the_logged_record(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    line = ConsoleLine(write=lines.append)
    line.times_blocks = True
    args, control, state = SimpleNamespace(), TrainerControl(), _state()
    generate = line.timed("generation", lambda: clock.__setitem__(0, clock[0] + 1.5))
    reward = line.timed("reward", lambda: clock.__setitem__(0, clock[0] + 0.5))
    line.on_train_begin(args, state, control)
    generate()  # outside a step (an evaluation's generation): not counted
    for _ in range(2):  # two steps of 4 s: generation 1.5, reward 0.5
        line.on_step_begin(args, state, control)
        generate()
        reward()
        clock[0] += 2.0
        state.global_step += 1
        line.on_step_end(args, state, control)
    logs = {"loss": 0.1, "reward": 1.0, "num_tokens": 1000.0}
    state.log_history.append({**logs, "step": 2})
    line.on_log(args, state, control, logs=logs)
    expected = {"timing/step_s": 4.0, "timing/generation_s": 1.5, "timing/reward_s": 0.5, "timing/train_s": 2.0,
                "timing/tokens_per_s": 125.0}
    assert {k: v for k, v in logs.items() if k.startswith("timing/")} == pytest.approx(expected)
    assert state.log_history[-1]["timing/step_s"] == pytest.approx(4.0)  # the copy transformers keeps too
    assert lines == ["step 2/10 | reward 1.000 | 4.0 s/step (gen 1.5, reward 0.50, train 2.0) | 125 tok/s | "
                     "eta 32s"]
    # the next record covers only the steps since this one
    line.on_step_begin(args, state, control)
    clock[0] += 1.0
    state.global_step += 1
    line.on_step_end(args, state, control)
    logs = {"loss": 0.1, "num_tokens": 1100.0}
    line.on_log(args, state, control, logs=logs)
    assert logs["timing/step_s"] == pytest.approx(1.0) and logs["timing/generation_s"] == 0.0
    assert logs["timing/tokens_per_s"] == pytest.approx(100.0)


def test_eval_end_and_other_ranks():
    lines: list[str] = []
    line = ConsoleLine(write=lines.append)
    args, control, state = SimpleNamespace(), TrainerControl(), _state(3, 3)
    line.on_train_begin(args, state, control)
    line.on_log(args, state, control, logs={"eval_loss": 1.0, "eval_perplexity": 2.718})
    line.on_log(args, state, control, logs={"eval_loss": 1.0, "eval_perplexity": 2.718})  # a repeat: not again
    line.on_log(args, state, control, logs={"train_runtime": 8.0, "train_loss": 7.38, "epoch": 0.06})
    assert lines == ["eval @ step 3 | loss 1.00 | ppl 2.72", "trained to step 3 in 8s (mean loss 7.38)"]
    state.is_world_process_zero = False
    logs = {"loss": float("nan")}
    line.on_log(args, state, control, logs=logs)
    assert len(lines) == 2  # nothing printed (nor warned) on other processes


def test_quiet_trainer_drops_the_printers_runs_the_console_first_and_times_generation():
    consoles = ConsoleLine()
    handler = CallbackHandler([DefaultFlowCallback(), PrinterCallback(), consoles, ProgressCallback()], None, None,
                              None, None)

    class Trainer:
        callback_handler = handler

        def _generate(self, prompts):
            return prompts

        def _calculate_rewards(self, *args):
            return 1.0

    trainer = Trainer()
    quiet_trainer(trainer)
    assert [type(cb) for cb in handler.callbacks] == [ConsoleLine, DefaultFlowCallback]
    assert consoles.times_blocks and trainer._generate(["p"]) == ["p"] and trainer._calculate_rewards() == 1.0
    wrapped = trainer._generate
    quiet_trainer(trainer)  # idempotent: not timed twice
    assert trainer._generate is wrapped


@pytest.fixture
def restore_noise():
    import datasets
    import transformers

    tf_level, ds_level = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    levels = {name: logging.getLogger(name).level for name in ("trl", "vllm")}
    filters = list(warnings.filters)
    yield
    console.configure_noise(True)
    transformers.utils.logging.set_verbosity(tf_level)
    datasets.utils.logging.set_verbosity(ds_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters


def test_configure_noise_is_quiet_by_default_and_verbose_restores(restore_noise, capsys):
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled

    ds_logger = logging.getLogger("DeepSpeed")

    def deepspeed_says(message):
        return ds_logger.filter(ds_logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, message, (), None))

    console.configure_noise(False)
    console.configure_noise(False)  # idempotent
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()  # Hub download bars stay: a long wait shows progress
    assert transformers.utils.logging.get_verbosity() == logging.ERROR
    assert logging.getLogger("trl").level == logging.WARNING
    assert not deepspeed_says("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert deepspeed_says("something else")
    assert len(ds_logger.filters) == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`torch.distributed.reduce_op` is deprecated, please use ...", FutureWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]

    console.configure_noise(True)
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert transformers.utils.logging.get_verbosity() == logging.WARNING
    assert deepspeed_says("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert not any(console._is_known_warning_filter(f) for f in warnings.filters)


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    return subprocess.run(
        [sys.executable, "-m", "rlt.train", "run_cfg=tiny_grpo", "train_batch_size=8", "per_device_train_batch_size=4",
         "num_generations=4", "max_completion_length=16", "save_steps=100", "save_final_model=false",
         "report_to=[none]", f"output_dir={tmp_path}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_grpo_console_end_to_end(tmp_path):
    proc = _train(tmp_path / "quiet", "max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split(" | ")[0] for s in steps] == ["step 1/2", "step 2/2"], out
    assert all(" s/step (gen " in s and "reward " in s and "tok/s" in s for s in steps), steps
    assert "{'loss'" not in out and "'train_runtime'" not in out and "trained to step 2 in" in out
    both = out + proc.stderr
    assert "Map:" not in both and "Filter:" not in both and "Loading weights" not in both, both[-3000:]
    assert "Setting accelerator to CPU" not in both

    proc = _train(tmp_path / "verbose", "max_steps=1", "verbose=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Map:" in proc.stderr and "Filter:" in proc.stderr and "Loading weights" in proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("step ")][0].startswith("step 1/1 |")
    assert "{'loss'" not in proc.stdout
