"""GRPO recipe on the tiny model (hf generation): every loss_type, with and without the KL term, with LoRA; batch
geometry validation; over-long prompts dropped and counted."""

import json
import logging
import math

import pytest
import torch

from rlt.config import validate
from rlt.errors import ConfigError, DataError
from rlt.recipes.grpo import drop_long_prompts, grpo_kwargs
from rlt.tracking import read_metrics
from rlt.train import run_training

FAST = ["run_cfg=tiny_grpo", "max_steps=3", "save_steps=3", "train_batch_size=8", "per_device_train_batch_size=4",
        "num_generations=4", "max_completion_length=16"]


def _run(compose, tmp_path, *overrides):
    return run_training(compose([*FAST, f"output_dir={tmp_path}", *overrides]))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_grpo_three_steps_each_loss_type(compose, tmp_path, loss_type, monkeypatch):
    from rlt.trainers import GRPOTrainer

    used = []  # the loss type TRL's loss computation reads, at every micro-batch
    compute_loss = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        used.append(self.loss_type)
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    summary = _run(compose, tmp_path, f"loss_type={loss_type}")
    assert summary["global_step"] == 3
    assert used and set(used) == {loss_type}, used
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    assert len(records) == 3
    for r in records:  # both reward components are logged separately, plus the KL to the reference model
        assert "rewards/correctness_reward/mean" in r or "rewards/correctness/mean" in r, sorted(r)
        assert any(k.startswith("rewards/format") for k in r)
        assert "kl" in r
    assert (tmp_path / "checkpoint-3" / ".rlt_complete").exists()


def test_grpo_without_kl_loads_no_reference_model(compose, tmp_path):
    summary = _run(compose, tmp_path, "beta=0.0")
    assert summary["global_step"] == 3
    assert all("kl" not in r for r in read_metrics(tmp_path / "metrics.jsonl"))


def test_grpo_lora(compose, tmp_path):
    summary = _run(compose, tmp_path, "use_peft=true", "lora_r=4")
    assert summary["global_step"] == 3
    assert (tmp_path / "final" / "adapter_config.json").exists()


def test_grpo_defaults_are_the_reference_semantics(compose):
    """TRL 1.16 defaults to loss_type=dapo and beta=0; our trainer_cfg/grpo.yaml pins the reference's choices."""
    run = validate(compose(["run_cfg=tiny_grpo", "trainer_cfg=grpo"]))
    kw = grpo_kwargs(run)
    assert (kw["loss_type"], kw["beta"], kw["scale_rewards"], kw["num_iterations"]) == ("grpo", 0.04, "group", 1)
    assert kw["steps_per_generation"] == run.gradient_accumulation_steps
    # TRL 1.16 multiplies the KL by the differentiable IS ratio by default (another gradient, even on-policy)
    assert kw["use_bias_correction_kl"] is False
    # with vLLM: per-token truncated IS (TRL's default sequence_mask zeroes whole long sequences)
    assert (kw["vllm_importance_sampling_mode"], kw["vllm_importance_sampling_clip_max"]) == ("token_truncate", 3.0)
    from trl import GRPOConfig

    args = GRPOConfig(output_dir="/tmp/unused", bf16=False, use_cpu=True, **kw)
    assert args.use_bias_correction_kl is False and args.vllm_importance_sampling_mode == "token_truncate"
    assert args.trust_remote_code is False and args.model_init_kwargs is None
    revision = grpo_kwargs(validate(compose(["run_cfg=tiny_grpo", "model_revision=v2", "trust_remote_code=true"])))
    assert revision["model_init_kwargs"] == {"revision": "v2"} and revision["trust_remote_code"] is True


def test_geometry_of_the_85gb_plan_is_rejected_with_numbers(compose):
    """rlt-spec §6: batch 96, per-device 3, 24 generations, aggregation 3 → GA = 96/3 = 32, and 3 does not
    divide 32."""
    with pytest.raises(ConfigError,
                       match=r"generation_aggregation_steps=3 must divide gradient_accumulation_steps=32"):
        validate(compose(["run_cfg=tiny_grpo", "train_batch_size=96", "per_device_train_batch_size=3",
                          "num_generations=24", "generation_aggregation_steps=3"]))
    # the consistent choice: G = 32 → one round of 96 = 4 prompts × 24
    run = validate(compose(["run_cfg=tiny_grpo", "train_batch_size=96", "per_device_train_batch_size=3",
                            "num_generations=24", "generation_aggregation_steps=32"]))
    assert run.generation_round() == 96


@pytest.mark.parametrize("overrides,message", [
    (["num_generations=1"], r"num_generations=1 must be >= 2"),
    (["num_generations=3"], r"generation round of .* = 16 completions is not a multiple of num_generations=3"),
    (["loss_type=ppo"], r"loss_type='ppo' is not one of"),
    (["beta=-0.1"], r"beta=-0.1 must be >= 0"),
    (["sync_ref_model=true", "beta=0"], r"sync_ref_model=true needs a reference model"),
    (["reward_weights=[1.0]"], r"reward_weights has 1 entries but reward_funcs has 2"),
    (["reward_funcs=[{_target_: rlt.rewards.nope.f}]", "reward_weights=null"], r"cannot be imported"),
    (["reward_funcs=[]", "reward_weights=null"], r"reward_funcs is empty"),
    (["generation_backend=sglang"], r"generation_backend='sglang' is not one of"),
    (["vllm_max_model_len=64"], r"vllm_max_model_len=64 is shorter than"),
    (["temperature=0"], r"temperature=0.0 must be > 0"),
    (["generation_backend=vllm_colocate", "top_p=0.9", "min_p=0.05"],
     r"vllm_importance_sampling_correction=true with top_p=0.9, min_p=0.05: vLLM's sampling log-probs"),
    (["vllm_importance_sampling_mode=token"], r"vllm_importance_sampling_mode='token' is not one of"),
    (["vllm_importance_sampling_clip_min=2", "vllm_importance_sampling_clip_max=1"],
     r"vllm_importance_sampling_clip_min=2.0 must be below vllm_importance_sampling_clip_max=1.0"),
    (["vllm_importance_sampling_clip_max=0"], r"vllm_importance_sampling_clip_max=0.0 must be > 0 or null"),
    (["eval_accuracy_samples=5"], r"eval_accuracy_samples: not used by algorithm=grpo \(it is a key of sft\)"),
])
def test_bad_grpo_config(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["run_cfg=tiny_grpo", *overrides]))


def test_logit_processing_is_fine_without_the_vllm_ratio(compose):
    validate(compose(["run_cfg=tiny_grpo", "top_p=0.9"]))  # hf: the loss uses the full distribution, no ratio
    validate(compose(["run_cfg=tiny_grpo", "generation_backend=vllm_colocate", "top_p=0.9",
                      "vllm_importance_sampling_correction=false"]))


def test_long_prompts_are_dropped_and_counted(caplog, tiny_model_path):
    from datasets import Dataset

    from rlt.models import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is 1 plus 2?"}], "answer": "3"},
                            {"prompt": [{"role": "user", "content": "apples " * 200}], "answer": "0"}])
    with caplog.at_level(logging.WARNING):
        kept = drop_long_prompts(ds, tok, 64, "train")
    assert len(kept) == 1 and kept[0]["answer"] == "3" and "_prompt_tokens" not in kept.column_names
    assert "dropped 1 of 2 longer than max_prompt_length=64" in caplog.text
    with pytest.raises(DataError, match="every train prompt is longer than max_prompt_length=4"):
        drop_long_prompts(ds, tok, 4, "train")


def test_summary_json(compose, tmp_path):
    _run(compose, tmp_path, "beta=0.0", "max_steps=1")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 1 and "reward_last" in summary


@pytest.mark.vllm
def test_grpo_three_steps_vllm_colocate_weights_stay_synced(compose, tmp_path):
    """With the CPU weight sync, vLLM samples from the current policy: TRL's importance-sampling ratio stays ~1."""
    summary = _run(compose, tmp_path, "generation_backend=vllm_colocate", "vllm_kv_cache_memory_bytes=67108864")
    assert summary["global_step"] == 3
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward" in r]
    assert len(records) == 3
    for r in records:
        assert r["sampling/importance_sampling_ratio/min"] > 0.9, r
        assert r["sampling/importance_sampling_ratio/max"] < 1.1, r


def length_reward(completions, **_):
    """A reward that differs within every group (so the policy moves from the first step): completion length."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def test_synced_reference_model_is_checkpointed_and_restored(compose, tmp_path, monkeypatch):
    """sync_ref_model every step with alpha 0.5: the reference changes at each step; each checkpoint holds it
    (ref_model.safetensors), and a resumed run starts from the saved reference, not from the initial policy."""
    from safetensors.torch import load_file
    from trl import GRPOTrainer as TRLGRPOTrainer

    from rlt.trainers import REF_MODEL_FILE

    sync = ["sync_ref_model=true", "ref_model_sync_steps=1", "ref_model_mixup_alpha=0.5", "learning_rate=1e-2",
            "save_total_limit=null", "reward_funcs=[{_target_:tests.test_grpo.length_reward}]", "reward_weights=null"]
    _run(compose, tmp_path, "max_steps=2", "save_steps=1", *sync)
    saved = [load_file(tmp_path / f"checkpoint-{k}" / REF_MODEL_FILE) for k in (1, 2)]
    name = next(k for k in saved[0] if k.endswith("q_proj.weight"))
    assert not torch.equal(saved[0][name], saved[1][name])  # synced again at step 2
    assert (tmp_path / "checkpoint-2" / ".rlt_complete").exists()

    class Loaded(Exception):  # stops the resumed run where TRL's training would begin
        pass

    def stop(self, *args, **kwargs):
        raise Loaded(self.accelerator.unwrap_model(self.ref_model).state_dict()[name].clone())

    monkeypatch.setattr(TRLGRPOTrainer, "train", stop)
    with pytest.raises(Loaded) as loaded:
        _run(compose, tmp_path, "max_steps=3", "save_steps=1", *sync)  # resumes from checkpoint-2
    assert torch.equal(loaded.value.args[0], saved[1][name])


def test_offloaded_reference_visits_the_device_only_for_its_forward_and_sync(compose, tmp_path, monkeypatch):
    """offload_untrained_models on a GPU: the reference lives on CPU and is moved to the training device for its
    log-prob forward and for each sync_ref_model mix, then back. This machine has no GPU: the trainer is told its
    device is "meta" and the reference's `.to` records where it is sent, moving it only to the CPU (no-op)."""
    from rlt.trainers import GRPOTrainer

    moves = []
    monkeypatch.setattr(GRPOTrainer, "_training_device", lambda self: torch.device("meta"))
    original = GRPOTrainer._setup_reference_offload

    def setup(self, enabled):
        to = self.ref_model.to

        def record(device):
            moves.append(str(device))
            return self.ref_model if str(device) == "meta" else to(device)

        self.ref_model.to = record
        original(self, True)  # the GRPO schema has no offload key: forced here

    monkeypatch.setattr(GRPOTrainer, "_setup_reference_offload", setup)
    _run(compose, tmp_path, "max_steps=2", "sync_ref_model=true", "ref_model_sync_steps=2",
         "ref_model_mixup_alpha=0.5")
    # construction: to CPU; each of 2 steps: there and back for the reference forward; step 2 also for the mix
    assert moves == ["cpu", "meta", "cpu", "meta", "cpu", "meta", "cpu"]


def test_reference_model_gets_the_vocabulary_of_a_repaired_tokenizer(compose, tmp_path, monkeypatch):
    """A pad token the tokenizer did not have is added and the policy's embeddings grow (2048 -> 2112 rows, a
    multiple of 64); TRL rebuilds its reference from the path (2048 rows), whose forward over padded batches then
    indexed past its embedding. The reference gets the policy's rows (the new ones copied), so the KL runs and
    sync_ref_model mixes equal shapes."""
    from rlt.trainers import GRPOTrainer

    seen = {}
    original = GRPOTrainer._setup_reference_offload

    def record(self, enabled):
        ref, policy = self.ref_model.get_input_embeddings().weight, self.model.get_input_embeddings().weight
        seen.update(rows=(ref.shape[0], policy.shape[0]), same=torch.equal(ref[2048:], policy[2048:]))
        original(self, enabled)

    monkeypatch.setattr(GRPOTrainer, "_setup_reference_offload", record)
    summary = _run(compose, tmp_path, "pad_token='<|newpad|>'", "max_steps=2", "sync_ref_model=true",
                   "ref_model_sync_steps=1", "ref_model_mixup_alpha=0.5")
    assert summary["global_step"] == 2
    assert seen == {"rows": (2112, 2112), "same": True}
    assert all(math.isfinite(r["kl"]) for r in read_metrics(tmp_path / "metrics.jsonl") if "kl" in r)


def test_new_pad_token_with_a_vllm_generator_is_rejected_before_loading(compose, tmp_path, monkeypatch):
    """vLLM builds its engine with the model's own vocabulary (2048 here): a pad token added past it (2049 tokens)
    could not be pushed at the first weight sync. Rejected from the tokenizer, before any weights load."""
    import re

    import rlt.recipes.common as common

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    message = re.escape("pad_token='<|newpad|>' is a new token: the tokenizer has 2049 tokens but rlt:tiny has "
                        "vocab_size=2048, and generation_backend=vllm_colocate")
    with pytest.raises(ConfigError, match=message):
        _run(compose, tmp_path, "pad_token='<|newpad|>'", "generation_backend=vllm_colocate")
