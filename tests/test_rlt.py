"""RLT recipes on the tiny models: teacher SFT warm-up, 3-step teacher GRPO (hf and vllm_colocate), student sharing,
tokenizer check, completion/chat sampling to disk, and validation of the RLT keys."""

import csv
import re

import pytest

from rlt.config import validate
from rlt.errors import ConfigError
from rlt.models import check_shared_tokenizer
from rlt.tracking import read_metrics
from rlt.train import run_training

FAST = ["run_cfg=teacher_rlt_tiny", "max_steps=3", "save_steps=3", "train_batch_size=8",
        "per_device_train_batch_size=4", "num_generations=4", "max_completion_length=24"]


def _rlt(compose, tmp_path, *overrides):
    return run_training(compose([*FAST, f"output_dir={tmp_path}", *overrides]))


def test_teacher_sft_warmup_lowers_loss(compose, tmp_path):
    summary = run_training(compose(["run_cfg=teacher_sft_tiny", f"output_dir={tmp_path}", "max_steps=20",
                                    "eval_steps=20", "save_steps=20", "train_batch_size=8",
                                    "per_device_train_batch_size=8", "max_eval_samples=8"]))
    assert summary["global_step"] == 20
    assert summary["eval_loss"] < summary["eval_loss_at_start"], summary


def test_teacher_grpo_three_steps_hf(compose, tmp_path, capsys):
    summary = _rlt(compose, tmp_path, "save_completions_probability=1.0", "logging_prob=1.0")
    assert summary["global_step"] == 3
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    assert len(records) == 3
    for r in records:  # the reward terms are logged every step
        for key in ("teacher_kl/log_prob_term", "teacher_kl/kl_term", "teacher_kl/match_reward", "kl"):
            assert key in r, sorted(r)
        assert r["reward"] == pytest.approx(r["teacher_kl/reward"], abs=1e-4)
        assert r["teacher_kl/reused_sampling_logprobs"] > 0  # recorded during HF generate: no teacher forward
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]  # rlt.console
    assert "| log-prob term " in lines[0] and ", kl term " in lines[0] and " s/step (gen " in lines[0]
    with open(tmp_path / "stored_completions" / "step_0.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and rows[0]["prompt"].endswith("<|begin_of_explanation|>\n\n")
    for row in rows:  # each row with the reward's terms
        t = {k: float(row[k]) for k in ("reward", "log_prob_term", "kl_term", "match_reward", "explanation_tokens")}
        assert t["reward"] == pytest.approx(t["log_prob_term"] - t["kl_term"] + t["match_reward"], abs=1e-4)
    chats = (tmp_path / "teacher_chats" / "log.txt").read_text()
    assert "<|begin_of_thought|>" in chats and "<|begin_of_solution|>" in chats
    assert re.search(r"(?m)^=== step 0 reward -?\d+\.\d{4} log_prob_term -?\d+\.\d{4} kl_term -?\d+\.\d{4} "
                     r"match_reward -?\d+\.\d{4} explanation_tokens \d+$", chats), chats[:300]


def test_hf_sampling_logprobs_score_as_the_teacher_forward(compose, tmp_path):
    """HF generation: the first step (same seed, weights and samples) scores the same with the log-probs recorded
    while sampling as with the teacher forward."""
    reuse = _rlt(compose, tmp_path / "reuse", "max_steps=1")
    forward = _rlt(compose, tmp_path / "forward", "teacher_reuse_sampling_logprobs=false", "max_steps=1")
    assert reuse["global_step"] == forward["global_step"] == 1
    r, f = (read_metrics(tmp_path / name / "metrics.jsonl")[0] for name in ("reuse", "forward"))
    assert r["teacher_kl/reused_sampling_logprobs"] > 0 and f["teacher_kl/reused_sampling_logprobs"] == 0
    assert r["completions/mean_length"] == f["completions/mean_length"]
    for key in ("reward", "teacher_kl/kl_term", "teacher_kl/teacher_think_log_prob_mean"):
        assert r[key] == pytest.approx(f[key], abs=1e-4), key


def test_separate_student_model_offloaded(compose, tmp_path, tiny_model_path, monkeypatch):
    """Also: teacher_reward_tokens_per_forward reaches the reward, whose forwards then stay within it."""
    from rlt.rewards.scoring import TokenScorer

    sizes: list[int] = []
    original = TokenScorer._forward

    def forward(model, keep_ok, keep, **kwargs):
        sizes.append(kwargs["input_ids"].numel())
        return original(model, keep_ok, keep, **kwargs)

    monkeypatch.setattr(TokenScorer, "_forward", staticmethod(forward))
    summary = _rlt(compose, tmp_path, f"student_model={tiny_model_path}", "beta=0.0", "max_steps=2",
                   "teacher_reward_tokens_per_forward=96")
    assert summary["global_step"] == 2
    assert sizes and max(sizes) <= 96, sizes


def test_separate_student_with_a_new_pad_token(compose, tmp_path, tiny_model_path):
    """pad_token set to a token the vocabulary lacks: the teacher's and the student's tokenizers are repaired the same
    way (the shared-tokenizer check compared a repaired one with an unrepaired one), both models are resized."""
    from safetensors.torch import load_file

    summary = _rlt(compose, tmp_path, f"student_model={tiny_model_path}", "pad_token='<|newpad|>'", "max_steps=1")
    assert summary["global_step"] == 1
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    for key in ("teacher_kl/log_prob_term", "teacher_kl/kl_term", "teacher_kl/match_reward"):  # scored, not NaN
        assert record[key] == record[key], key
    assert record["reward"] == pytest.approx(record["teacher_kl/log_prob_term"] - record["teacher_kl/kl_term"]
                                             + record["teacher_kl/match_reward"], abs=1e-4)
    before, after = (load_file(f"{d}/model.safetensors") for d in (tiny_model_path, tmp_path / "final"))
    assert after["model.embed_tokens.weight"].shape[0] > before["model.embed_tokens.weight"].shape[0]  # resized
    changed = [k for k in before if k != "model.embed_tokens.weight" and not before[k].equal(after[k])]
    assert changed, "the teacher's weights did not change in a training step"


def test_reference_model_as_the_teacher(compose, tmp_path, monkeypatch):
    """use_reference_teacher_model: the reward's q_k come from TRL's reference model (here also the student), the
    generator's log-probs are not reused (they are the policy's)."""
    from rlt.rewards.teacher import TeacherKLReward
    from rlt.trainers import GRPOTrainer

    seen = {}
    setup = GRPOTrainer._setup_reference_offload
    link = TeacherKLReward.set_teacher_model

    def keep_trainer(self, enabled):
        seen["trainer"] = self
        setup(self, enabled)

    def keep_teacher(self, model, **kwargs):
        seen.update(teacher=model, reward=self, **kwargs)
        link(self, model, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_setup_reference_offload", keep_trainer)
    monkeypatch.setattr(TeacherKLReward, "set_teacher_model", keep_teacher)
    summary = _rlt(compose, tmp_path, "use_reference_teacher_model=true", "max_steps=2")
    assert summary["global_step"] == 2
    trainer = seen["trainer"]
    assert seen["teacher"] is trainer.ref_model and seen["teacher"] is not trainer.model
    assert seen["offload"] == trainer.offloads_reference and not seen["reward"].reuse_sampling_logprobs
    assert seen["reward"].student_model is trainer.ref_model  # student_model null: the reference is the student too
    assert seen["reward"].teacher_model is trainer.ref_model  # still so after training (nothing relinked it)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "teacher_kl/kl_term" in r]
    assert len(records) == 2 and all(r["teacher_kl/kl_term"] == r["teacher_kl/kl_term"] for r in records)  # not NaN


def test_student_with_another_tokenizer_is_rejected(tiny_model_path):
    from rlt.models import load_tokenizer, resolve_model_path

    tiny = load_tokenizer(tiny_model_path)
    wide = load_tokenizer(resolve_model_path("rlt:tiny-wide"))
    check_shared_tokenizer(tiny, wide, "rlt:tiny-wide")  # same offline tokenizer: accepted
    other = load_tokenizer(tiny_model_path)
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="does not share the teacher's tokenizer: chat templates differ"):
        check_shared_tokenizer(tiny, other, "other")


@pytest.mark.parametrize("overrides,message", [
    (["answer_log_prob_coeff=[1.0]"], r"answer_log_prob_coeff has 1 entries but reduction_log_prob_fn"),
    (["answer_log_prob_coeff=0"], r"answer_log_prob_coeff=0 must be > 0 as a scalar .*\[0.0, 0.0\]"),
    (["kl_penalty_reward_coeff=abc"], r"kl_penalty_reward_coeff='abc' must be a number or a list"),
    (["reduction_kl_fn=[mean,mode]"], r"reduction_kl_fn='mode' is not one of"),
    (["normalize_kl_fn=log"], r"normalize_kl_fn='log' is not one of"),
    (["logging_prob=2"], r"logging_prob=2.0 must be in \[0, 1\]"),
    (["use_reference_teacher_model=true", "beta=0.0"],
     r"use_reference_teacher_model=true needs TRL's reference model: beta > 0 \(got 0.0\)"),
    (["data_cfg=synthetic_arithmetic"], r"RLT trains on teacher prompts \(data_format=teacher\)"),
    (["teacher_format={style: chatml}"], r"teacher_format.style='chatml' is not one of"),
])
def test_bad_rlt_config(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["run_cfg=teacher_rlt_tiny", *overrides]))


def test_scalar_kl_coefficient_is_accepted(compose):
    from rlt.config import TeacherRewardSection, paired_coefficients

    run = validate(compose(["run_cfg=teacher_rlt_tiny", "kl_penalty_reward_coeff=0.0"]))
    settings = TeacherRewardSection.of(run)
    assert paired_coefficients(settings.kl_penalty_reward_coeff, len(settings.reduction_kl_fn)) == [0.0, 0.0]


def test_reward_keys_are_defined_once(compose):
    """The teacher reward's keys come from the run config (the schema's defaults unless a YAML or the command line
    sets them): the reward entry lists no key; an entry's own kwargs override the run's and are checked with them."""
    from rlt.config import TeacherRewardSection

    run = validate(compose(["run_cfg=teacher_rlt_tiny", "clip_kl=50"]))
    assert run.reward_funcs == [{"_target_": "rlt.rewards.TeacherKLReward"}]
    assert run.answer_log_prob_coeff == TeacherRewardSection().answer_log_prob_coeff == [1.0, 0.01]
    assert TeacherRewardSection.of(run).clip_kl == 50
    entry = "reward_funcs=[{_target_: rlt.rewards.TeacherKLReward, kl_penalty_reward_coef: 1.0}]"
    with pytest.raises(ConfigError, match=r"kl_penalty_reward_coef: not a teacher reward key \(did you mean "
                                          r"kl_penalty_reward_coeff\?\)"):
        validate(compose(["run_cfg=teacher_rlt_tiny", entry]))
    entry = "reward_funcs=[{_target_: rlt.rewards.TeacherKLReward, kl_penalty_reward_coeff: [1.0]}]"
    with pytest.raises(ConfigError, match=r"kl_penalty_reward_coeff has 1 entries but reduction_kl_fn"):
        validate(compose(["run_cfg=teacher_rlt_tiny", entry]))


@pytest.mark.vllm
def test_teacher_grpo_three_steps_vllm_colocate(compose, tmp_path):
    """With vLLM the teacher's q_k come from the sampling log-probs (no teacher forward in the reward); the first
    step (same seed, same weights, same samples) scores the same as with the teacher forward."""
    summary = _rlt(compose, tmp_path / "reuse", "generation_backend=vllm_colocate")
    assert summary["global_step"] == 3
    reuse = [r for r in read_metrics(tmp_path / "reuse" / "metrics.jsonl") if "reward" in r]
    assert len(reuse) == 3 and all(r["teacher_kl/reused_sampling_logprobs"] > 0 for r in reuse), reuse
    _rlt(compose, tmp_path / "forward", "generation_backend=vllm_colocate", "teacher_reuse_sampling_logprobs=false",
         "max_steps=1")
    forward = [r for r in read_metrics(tmp_path / "forward" / "metrics.jsonl") if "reward" in r]
    assert forward[0]["teacher_kl/reused_sampling_logprobs"] == 0
    assert forward[0]["completions/mean_length"] == reuse[0]["completions/mean_length"]
    for key in ("reward", "teacher_kl/kl_term", "teacher_kl/teacher_think_log_prob_mean"):
        assert reuse[0][key] == pytest.approx(forward[0][key], abs=1e-4), key
