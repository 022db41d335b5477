"""The GRPO run config: the shared sections plus GRPO's keys (`trainer_cfg/grpo.yaml`), its rewards
(`reward_cfg/*`) and generation backends. The batch geometry is explained in docs/grpo.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlt.config.checks import (
    GENERATION_BACKENDS,
    IS_MODES,
    LOSS_TYPES,
    SCALE_REWARDS,
    in_unit_interval,
    is_server_url,
    one_of,
    positive,
)
from rlt.config.sections import DataSection, ModelSection, OptimSection, RunSection, section_problems


@dataclass
class GRPOSection:
    """GRPO on TRL's GRPOTrainer (`trainer_cfg/grpo.yaml`), rewards (`reward_cfg/*`) and generation backends.

    Batch geometry, as in the reference RLT trainer: train_batch_size = completions per optimizer step (all
    processes) = prompts × num_generations; the per-device micro-batch P drives accumulation GA; each generation
    round samples P × world × generation_aggregation_steps completions (null = GA: one round per optimizer step).
    """

    num_generations: int = 8  # completions per prompt (the group of the advantage)
    generation_aggregation_steps: int | None = None  # micro-batches generated together; null = GA (one round/step)
    max_prompt_length: int = 512  # tokens (chat template applied); longer prompts are dropped and counted
    max_completion_length: int = 256  # tokens sampled per completion at most (cut ones: "clipped" in the log)
    temperature: float = 1.0  # sampling temperature; log-probs of the loss use the same temperature
    top_p: float = 1.0  # nucleus sampling: the most likely tokens up to this total probability (1 = off)
    top_k: int | None = None  # sample among the k most likely tokens only; null = off
    min_p: float | None = None  # drop tokens below min_p × the top token's probability; null = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or completion; 1 = off
    loss_type: str = "grpo"  # grpo: per-sequence token mean (reference) | dr_grpo | dapo | bnpo
    scale_rewards: str = "group"  # divide advantages by the group std (reference) | batch | none
    beta: float = 0.04  # k3 KL weight against the reference model (0 = no reference model)
    epsilon: float = 0.2  # PPO clip (no effect at num_iterations=1)
    epsilon_high: float | None = None  # DAPO clip-higher; null = epsilon
    num_iterations: int = 1  # optimisation passes per generation batch
    sync_ref_model: bool = False  # TR-DPO style: ref <- alpha * policy + (1 - alpha) * ref every N steps
    ref_model_mixup_alpha: float = 0.6  # sync_ref_model: alpha in ref <- alpha * policy + (1 - alpha) * ref
    ref_model_sync_steps: int = 512  # sync_ref_model: optimizer steps between two updates of the reference
    mask_truncated_completions: bool = False  # exclude completions cut at max_completion_length from the loss
    reward_funcs: list[dict[str, Any]] = field(default_factory=list)  # [{_target_: dotted.path, kwarg: value}]
    reward_weights: list[float] | None = None  # null = all 1
    nonfinite_reward_penalty: float = -1.0  # a NaN/inf/None reward becomes this value (and is counted)
    generation_backend: str = "hf"  # hf (transformers generate) | vllm_colocate | vllm_server
    vllm_gpu_memory_utilization: float = 0.3  # GPU: fraction of the device vLLM reserves (weights + KV cache)
    vllm_kv_cache_memory_bytes: int | None = None  # KV cache size; null = 1 GiB on CPU, from the utilization on GPU
    vllm_enable_sleep_mode: bool = True  # GPU: free vLLM memory during the optimizer step (ignored on CPU)
    vllm_max_model_len: int | None = None  # null = max_prompt_length + max_completion_length
    vllm_enable_prefix_caching: bool = True  # vLLM computes a prompt shared by a group's completions once
    vllm_importance_sampling_correction: bool = True  # reweight by trainer/vLLM probability ratio (TRL's TIS)
    # token_truncate: per-token ratio clipped to [clip_min, clip_max] (never drops a sequence); TRL's default,
    # sequence_mask, zeroes whole sequences whose summed log-ratio leaves the bounds (long bf16 completions)
    vllm_importance_sampling_mode: str = "token_truncate"  # | token_mask | sequence_truncate | sequence_mask
    vllm_importance_sampling_clip_min: float | None = None  # lower bound of the ratio (*_mask: below = 0); null = none
    vllm_importance_sampling_clip_max: float | None = 3.0  # upper bound of the ratio (*_mask: above = 0); null = none
    # TRL 1.16 multiplies the KL term by the (differentiable) IS ratio by default, which changes the KL gradient
    # even on-policy; false = the reference's plain k3 gradient
    use_bias_correction_kl: bool = False
    vllm_server_host: str = "127.0.0.1"  # vllm_server: the one server used when vllm_server_urls is empty
    vllm_server_port: int = 8000  # vllm_server: the single server's port (with vllm_server_host)
    vllm_server_timeout: float = 240.0  # vllm_server: seconds to wait for every server's /health at start-up
    # vllm_server: base URLs of rlt vLLM servers (`python -m rlt.generation.vllm_server`; launch_multi.sh sets them),
    # prompts are split across them; [] = the single server http://{vllm_server_host}:{vllm_server_port}
    vllm_server_urls: list[str] = field(default_factory=list)
    vllm_server_request_timeout: float = 600.0  # vllm_server: seconds one generate/weight-update request may take
    vllm_server_gpu_memory_utilization: float = 0.9  # GPU share a dedicated server reserves (weights + KV cache)
    # vllm_server: the servers sample the next generation rounds while the trainer trains on the current one
    # (docs/distributed.md, "Asynchronous generation"); rounds are then up to max_staleness rounds off-policy,
    # corrected by the importance-sampling ratio
    async_generation: bool = False
    max_staleness: int = 1  # async_generation: generation rounds sampled ahead of the one being trained (>= 1)
    log_completions: bool = False  # print/log a sample of completions at each logging step

    def generation_round(self) -> int:
        """Completions sampled per generation round: P × world × G, e.g. 4 × 1 × 2 = 8."""
        g = self.generation_aggregation_steps or self.derived_gradient_accumulation_steps()
        return self.per_device_train_batch_size * self.world_size() * g

    def problems(self) -> list[str]:
        return (self._geometry_problems() + self._sampling_problems() + self._loss_problems()
                + reward_problems(self.reward_funcs, self.reward_weights, self) + self._vllm_problems())

    def _geometry_problems(self) -> list[str]:
        """Groups, generation rounds and micro-batches fit together (the numbers are in each message)."""
        errors: list[str] = []
        if self.num_generations < 2:
            errors.append(f"num_generations={self.num_generations} must be >= 2 (advantages compare completions "
                          "within a group)")
        if self.train_batch_size < 1 or self.per_device_train_batch_size < 1:
            return errors + ["GRPO batch geometry needs positive batch sizes (see above)"]
        ga = self.derived_gradient_accumulation_steps()
        g = self.generation_aggregation_steps
        if ga < 1:
            pass  # train_batch_size < per-device × world: reported by the optimisation section
        elif g is not None and (g < 1 or ga % g):
            errors.append(f"generation_aggregation_steps={g} must divide gradient_accumulation_steps={ga} "
                          f"(= train_batch_size {self.train_batch_size} / (per_device_train_batch_size "
                          f"{self.per_device_train_batch_size} × world size {self.world_size()})); "
                          f"choose one of {[d for d in range(1, ga + 1) if ga % d == 0]}")
        elif self.num_generations >= 2 and self.generation_round() % self.num_generations:
            n = self.generation_round()
            errors.append(f"a generation round of per_device_train_batch_size {self.per_device_train_batch_size} "
                          f"× world size {self.world_size()} × generation_aggregation_steps {g or ga} = {n} "
                          f"completions is not a multiple of num_generations={self.num_generations}")
        if self.eval_steps and not self.eval_split:
            errors.append(f"eval_steps={self.eval_steps} validates on held-out prompts, but eval_split is null: name "
                          "the split to validate on (e.g. eval_split=test), or set eval_steps=null")
        if self.eval_steps and (self.per_device_eval_batch_size * self.world_size()) % self.num_generations:
            errors.append(f"per_device_eval_batch_size={self.per_device_eval_batch_size} × world size "
                          f"{self.world_size()} must be a multiple of num_generations={self.num_generations}")
        return errors

    def _sampling_problems(self) -> list[str]:
        errors: list[str] = []
        positive(errors, "max_prompt_length", self.max_prompt_length)
        positive(errors, "max_completion_length", self.max_completion_length)
        positive(errors, "temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"top_k={self.top_k} must be >= 1 (or null for no top-k)")
        if self.min_p is not None:
            in_unit_interval(errors, "min_p", self.min_p, closed=True)
        positive(errors, "repetition_penalty", self.repetition_penalty)
        return errors

    def _loss_problems(self) -> list[str]:
        """The loss, its clipping and importance sampling, the reference model and its syncing."""
        errors: list[str] = []
        one_of(errors, "loss_type", self.loss_type, LOSS_TYPES)
        one_of(errors, "vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, IS_MODES)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and lo < 0:
            errors.append(f"vllm_importance_sampling_clip_min={lo} must be >= 0 or null")
        if hi is not None and hi <= 0:
            errors.append(f"vllm_importance_sampling_clip_max={hi} must be > 0 or null")
        if lo is not None and hi is not None and lo >= hi:
            errors.append(f"vllm_importance_sampling_clip_min={lo} must be below "
                          f"vllm_importance_sampling_clip_max={hi}")
        one_of(errors, "scale_rewards", self.scale_rewards, SCALE_REWARDS)
        if self.beta < 0:
            errors.append(f"beta={self.beta} must be >= 0")
        positive(errors, "epsilon", self.epsilon)
        positive(errors, "epsilon_high", self.epsilon_high, allow_none=True)
        positive(errors, "num_iterations", self.num_iterations)
        if self.sync_ref_model:
            if self.beta == 0:
                errors.append("sync_ref_model=true needs a reference model: set beta > 0")
            if self.use_peft:
                errors.append("sync_ref_model=true cannot be used with use_peft=true (the reference model is the "
                              "policy with its adapters disabled)")
        in_unit_interval(errors, "ref_model_mixup_alpha", self.ref_model_mixup_alpha, closed=True)
        positive(errors, "ref_model_sync_steps", self.ref_model_sync_steps)
        return errors

    def _vllm_problems(self) -> list[str]:
        """The generation backend and its vLLM engine or servers."""
        errors: list[str] = []
        one_of(errors, "generation_backend", self.generation_backend, GENERATION_BACKENDS)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            errors.append(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must be in (0, 1]")
        positive(errors, "vllm_kv_cache_memory_bytes", self.vllm_kv_cache_memory_bytes, allow_none=True)
        positive(errors, "vllm_server_timeout", self.vllm_server_timeout)
        positive(errors, "vllm_server_request_timeout", self.vllm_server_request_timeout)
        if not 0 < self.vllm_server_gpu_memory_utilization <= 1:
            errors.append(f"vllm_server_gpu_memory_utilization={self.vllm_server_gpu_memory_utilization} must be in "
                          "(0, 1]")
        if not 0 < self.vllm_server_port < 65536:
            errors.append(f"vllm_server_port={self.vllm_server_port} must be in [1, 65535]")
        for i, url in enumerate(self.vllm_server_urls):
            if not is_server_url(url):
                errors.append(f"vllm_server_urls[{i}]={url!r} must look like http://HOST:PORT (port in [1, 65535])")
        if len(set(self.vllm_server_urls)) != len(self.vllm_server_urls):
            errors.append(f"vllm_server_urls={self.vllm_server_urls} lists a server twice")
        processed = logit_processing(self.top_p, self.top_k, self.min_p, self.repetition_penalty)
        if self.generation_backend != "hf" and self.vllm_importance_sampling_correction and processed:
            errors.append(f"vllm_importance_sampling_correction=true with {', '.join(processed)}: vLLM's sampling "
                          "log-probs are then renormalised over the kept tokens while the trainer's are the full "
                          "log_softmax(logits / temperature), so every ratio is biased below 1. Set "
                          "vllm_importance_sampling_correction=false, or sample with top_p=1, top_k=null, "
                          "min_p=null, repetition_penalty=1")
        errors += self._async_problems()
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < self.max_prompt_length + \
                self.max_completion_length:
            errors.append(f"vllm_max_model_len={self.vllm_max_model_len} is shorter than max_prompt_length "
                          f"{self.max_prompt_length} + max_completion_length {self.max_completion_length}")
        return errors

    def _async_problems(self) -> list[str]:
        """What asynchronous generation cannot do."""
        if not self.async_generation:
            return []
        errors: list[str] = []
        if self.max_staleness < 1:
            errors.append(f"max_staleness={self.max_staleness} must be >= 1 with async_generation=true (rounds "
                          "sampled ahead of the one training; for synchronous generation set async_generation=false)")
        if self.generation_backend != "vllm_server":
            where = "in the training process" if self.generation_backend == "hf" else "on the training GPU"
            errors.append(f"async_generation=true needs generation_backend=vllm_server, not "
                          f"{self.generation_backend}, which generates {where}: there is nothing to overlap. Start "
                          "vLLM servers beside the trainer (launch_multi.sh N M ...) or set async_generation=false")
        if not self.vllm_importance_sampling_correction:
            errors.append("async_generation=true samples with weights up to max_staleness rounds old: keep "
                          "vllm_importance_sampling_correction=true, the ratio that corrects for it")
        return errors


def logit_processing(top_p: float | None, top_k: int | None, min_p: float | None,
                     repetition_penalty: float | None) -> list[str]:
    """The sampling settings (as ``key=value``) that make vLLM's processed log-probs differ from
    ``log_softmax(logits / temperature)``: vLLM renormalises after top-p/top-k/min-p and applies the repetition
    penalty before them. Empty = plain tempered sampling. top_k None, 0 or -1 means off (our key, TRL's, vLLM's).

    >>> logit_processing(1.0, None, None, 1.0), logit_processing(0.9, 0, 0.05, 1.1)
    ([], ['top_p=0.9', 'min_p=0.05', 'repetition_penalty=1.1'])
    """
    checks = (("top_p", top_p, top_p is None or top_p >= 1), ("top_k", top_k, top_k in (None, 0, -1)),
              ("min_p", min_p, not min_p), ("repetition_penalty", repetition_penalty,
                                            repetition_penalty is None or repetition_penalty == 1))
    return [f"{key}={value}" for key, value, plain in checks if not plain]


def reward_problems(reward_funcs: list[dict[str, Any]], weights: list[float] | None, run=None) -> list[str]:
    """Each reward is {_target_: importable callable or class, **kwargs}; kwargs must bind to its signature. A class
    with a `settings_type` (`TeacherKLReward`) is built from the run's keys of that type: kwargs override them and
    are checked with them."""
    import importlib
    import inspect

    errors: list[str] = []
    if not reward_funcs:
        errors.append("reward_funcs is empty: select a reward_cfg (e.g. reward_cfg=gsm8k)")
    for i, spec in enumerate(reward_funcs):
        target = spec.get("_target_")
        if not isinstance(target, str) or "." not in target:
            errors.append(f"reward_funcs[{i}] needs `_target_: module.name` (got {target!r})")
            continue
        module_name, _, attr = target.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            errors.append(f"reward_funcs[{i}]._target_={target} cannot be imported ({e})")
            continue
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
        settings_type = getattr(obj, "settings_type", None)
        if settings_type is not None:
            errors += [f"reward_funcs[{i}] ({target}): {e}" for e in settings_type.problems_of(run, **kwargs)]
            continue
        try:
            inspect.signature(obj).bind_partial(**kwargs)
        except TypeError as e:
            errors.append(f"reward_funcs[{i}] ({target}): {e}")
    if weights is not None and len(weights) != len(reward_funcs):
        errors.append(f"reward_weights has {len(weights)} entries but reward_funcs has {len(reward_funcs)}")
    return errors



@dataclass
class GRPORunConfig(RunSection, ModelSection, DataSection, OptimSection, GRPOSection):
    """Every key of a GRPO run (`trainer_cfg=grpo`)."""

    def problems(self) -> list[str]:
        errors = section_problems(self)
        if self.data_format != "gsm8k":
            errors.append(f"data_format={self.data_format!r}: plain GRPO needs prompts with a reference answer "
                          "(data_format=gsm8k)")
        if self.early_stopping_patience is not None:
            errors.append("early_stopping_patience is not supported for GRPO (there is no eval loss to watch)")
        return errors

