"""GRPO recipe: TRL's GRPOTrainer, configured from a validated `GRPORunConfig`.

setup (tokenizer → prompts, over-long ones dropped and counted → rewards → model) → train with the chosen
generation backend (hf | vllm_colocate | vllm_server), resuming from the last complete checkpoint → save → summary.

Defaults follow the reference RLT GRPO (rlt-spec §3), not TRL's: loss_type=grpo (per-sequence token mean, then mean
over sequences), k3 KL with beta=0.04, log-probs at the sampling temperature, advantages (r - mean) / (std + 1e-4)
within each group. Every one of these is a key; see cfgs/trainer_cfg/grpo.yaml.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from trl import GRPOConfig

from rlt import console, samples
from rlt.config import GRPORunConfig
from rlt.data.loading import gsm8k_prompt_dataset
from rlt.distributed import training_args_overrides
from rlt.errors import DataError
from rlt.recipes import common
from rlt.rewards.build import build_reward_funcs
from rlt.trainers import GRPOTrainer

log = logging.getLogger(__name__)


def train(run: GRPORunConfig) -> dict:
    out = common.prepare_run_dir(run)

    # ---- setup: tokenizer, prompts and rewards first, so their errors come before any weights load
    tokenizer = common.tokenizer_for(run)
    train_ds = drop_long_prompts(_prompts(run, run.train_split, run.max_train_samples), tokenizer,
                                 run.max_prompt_length, "train")
    eval_ds = None
    if run.eval_steps and run.eval_split:
        eval_ds = drop_long_prompts(_prompts(run, run.eval_split, run.max_eval_samples), tokenizer,
                                    run.max_prompt_length, "eval")
    reward_funcs = build_reward_funcs(run)
    return fit(run, out, tokenizer, train_ds, eval_ds, reward_funcs)


def fit(run, out: Path, tokenizer, train_ds, eval_ds, reward_funcs, *, on_trainer=None, callbacks=()) -> dict:
    """Load the policy, build our GRPOTrainer (TRL's, minus the redundant vLLM forward: `rlt.trainers`) with the
    configured generator, train (resuming), save, report.
    `on_trainer(trainer)` runs once the trainer exists (the RLT recipe links the teacher reward to it)."""
    model = common.model_for(run, tokenizer)
    args = GRPOConfig(**{**common.training_args_kwargs(run, out, has_eval=eval_ds is not None), **grpo_kwargs(run)})
    with generation_backend(run):
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_ds,
                              eval_dataset=eval_ds, processing_class=tokenizer,
                              peft_config=common.peft_config_for(run),
                              callbacks=[*common.callbacks_for(run, out), *samples.callbacks_for(run, out),
                                         *callbacks],
                              offload_reference=getattr(run, "offload_untrained_models", False),
                              max_staleness=run.max_staleness if run.async_generation else 0)
    console.quiet_trainer(trainer)
    if on_trainer is not None:
        on_trainer(trainer)

    resume = common.resume_checkpoint(run, out)
    result = common.train(trainer, resume, out)
    summary = {"run_name": run.run_name, "output_dir": str(out), "resumed_from": resume,
               "global_step": trainer.state.global_step, "train_loss": result.training_loss}
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lines = []
    if rewards:
        summary.update(reward_first=rewards[0], reward_last=rewards[-1])
        lines.append(f"reward:       {rewards[0]:.3f} (first step) -> {rewards[-1]:.3f} (last step)")
    if run.save_final_model:
        summary["final_model"] = common.save_final(trainer, tokenizer, out / "final")
    return common.finish(summary, out, lines, run)


def grpo_kwargs(run: GRPORunConfig) -> dict:
    """GRPOConfig fields from the GRPO keys (TRL's own defaults differ: dapo loss, beta 0; we set all explicitly)."""
    server = run.generation_backend == "vllm_server"
    return dict(
        num_generations=run.num_generations,
        steps_per_generation=run.generation_aggregation_steps or run.gradient_accumulation_steps,
        max_completion_length=run.max_completion_length,
        temperature=run.temperature,
        top_p=run.top_p,
        top_k=run.top_k or 0,
        min_p=run.min_p,
        repetition_penalty=run.repetition_penalty,
        loss_type=run.loss_type,
        scale_rewards=run.scale_rewards,
        beta=run.beta,
        epsilon=run.epsilon,
        epsilon_high=run.epsilon_high,
        num_iterations=run.num_iterations,
        sync_ref_model=run.sync_ref_model,
        ref_model_mixup_alpha=run.ref_model_mixup_alpha,
        ref_model_sync_steps=run.ref_model_sync_steps,
        mask_truncated_completions=run.mask_truncated_completions,
        reward_weights=run.reward_weights,
        use_vllm=run.generation_backend != "hf",
        vllm_mode="server" if server else "colocate",
        vllm_gpu_memory_utilization=run.vllm_gpu_memory_utilization,
        vllm_enable_sleep_mode=run.vllm_enable_sleep_mode,
        vllm_max_model_length=run.vllm_max_model_len or run.max_prompt_length + run.max_completion_length,
        vllm_importance_sampling_correction=run.vllm_importance_sampling_correction,
        vllm_importance_sampling_mode=run.vllm_importance_sampling_mode,
        vllm_importance_sampling_clip_min=run.vllm_importance_sampling_clip_min,
        vllm_importance_sampling_clip_max=run.vllm_importance_sampling_clip_max,
        use_bias_correction_kl=run.use_bias_correction_kl,
        # the reference model TRL builds from the policy's path loads like the policy
        trust_remote_code=run.trust_remote_code,
        model_init_kwargs={"revision": run.model_revision} if run.model_revision else None,
        vllm_server_host=run.vllm_server_host,
        vllm_server_port=run.vllm_server_port,
        vllm_server_timeout=run.vllm_server_timeout,
        log_completions=run.log_completions,
        **training_args_overrides(),  # use_cpu=False under DeepSpeed on a CPU-only machine (launch_multi.sh --cpu)
    )


@contextlib.contextmanager
def generation_backend(run: GRPORunConfig):
    """Trainers built inside use the configured generator: TRL's own for hf; for vllm_colocate our engine, which
    also runs (and syncs weights) on CPU; for vllm_server our client to `rlt.generation.vllm_server` servers (several,
    weight sync without NCCL, per-prompt sampling seeds, a clear error when a server dies)."""
    if run.generation_backend == "vllm_server":
        from rlt.generation.server_patch import use_vllm_servers
        from rlt.generation.vllm_client import server_urls

        with use_vllm_servers(server_urls(run.vllm_server_urls, run.vllm_server_host, run.vllm_server_port),
                              request_timeout=run.vllm_server_request_timeout, seed=run.seed,
                              resume_hint=f"Restart the same command to resume from the last complete checkpoint "
                                          f"in {run.output_dir}."):
            yield
        return
    if run.generation_backend != "vllm_colocate":
        yield
        return
    from rlt.generation.vllm_colocate import use_colocated_vllm

    with use_colocated_vllm(kv_cache_memory_bytes=run.vllm_kv_cache_memory_bytes,
                            enable_prefix_caching=run.vllm_enable_prefix_caching):
        yield


def _prompts(run: GRPORunConfig, split: str, max_samples: int | None):
    return gsm8k_prompt_dataset(dataset_id_or_path=run.dataset_id_or_path, dataset_subset=run.dataset_subset,
                                split=split, data_columns=run.data_columns, system_prompt=run.system_prompt,
                                max_samples=max_samples, synthetic=run.synthetic, seed=run.seed)


def drop_long_prompts(ds, tokenizer, max_prompt_length: int, what: str):
    """Drop prompts longer than `max_prompt_length` tokens (chat template applied), logging how many.

    The reference left-truncated them for the loss while vLLM saw the full prompt (rlt-spec §7.8): an off-policy
    mismatch that also cut the system prompt. Dropping keeps generation and loss on the same text.
    """
    def length(row):
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        return {"_prompt_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])}

    ds = ds.map(length)
    kept = ds.filter(lambda n: n <= max_prompt_length, input_columns="_prompt_tokens").remove_columns(
        "_prompt_tokens")
    dropped = len(ds) - len(kept)
    if dropped:
        log.warning("%s prompts: dropped %d of %d longer than max_prompt_length=%d tokens (longest: %d)", what,
                    dropped, len(ds), max_prompt_length, max(ds["_prompt_tokens"]))
    if not len(kept):
        raise DataError(f"every {what} prompt is longer than max_prompt_length={max_prompt_length} tokens "
                        f"(shortest: {min(ds['_prompt_tokens'])}): raise max_prompt_length")
    return kept
