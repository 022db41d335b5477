"""Typed schema of the flat run config, and its validation.

Hydra composes `cfgs/train.yaml`: every group (`model_cfg`, `data_cfg`, `trainer_cfg`, `reward_cfg`, `run_cfg`) is
packaged `@_global_`, so the result is ONE flat namespace and users override any key by its short name
(`max_steps=300`), as in the reference RLT repo. `validate()` turns that DictConfig into a typed dataclass:

* the schema is chosen by `algorithm` (set by `trainer_cfg`): keys of another algorithm are unknown keys;
* unknown keys, wrong types and missing values are all collected into ONE `ConfigError` message;
* cross-field rules (`problems()` of each section) quote the offending keys and numbers;
* nothing here imports torch/transformers: validation runs before any model is loaded.

Sections are mixin dataclasses; a run schema is their union (`SFTRunConfig`, ...). Later algorithms add a section.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlt.errors import ConfigError

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
REPORT_TO = ("wandb", "tensorboard", "none")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adafactor", "sgd")  # 8-bit and paged variants need bitsandbytes (the `quant` extra) and CUDA
WANDB_MODES = ("online", "offline", "disabled")
DATA_FORMATS = ("gsm8k", "alpaca", "dolly", "sharegpt", "messages", "text", "prompt_completion", "teacher")
TEACHER_DATA_FORMATS = ("auto", "custom", "gsm8k", "stratos")
TEACHER_STYLES = ("stratos", "r1")
REDUCTIONS = ("mean", "sum", "min", "max", "median", "first_quartile", "last_quartile")
NORMALIZATIONS = (None, "none", "exp", "exp_norm")
COMPLETION_STYLES = ("gsm8k", "reasoning_answer_tags")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL 1.16
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
GENERATION_BACKENDS = ("hf", "vllm_colocate", "vllm_server")
TEXT_SAMPLE_BY = ("paragraph", "line", "document")


def _is_server_url(url: str) -> bool:
    """http(s)://HOST:PORT with an explicit port in [1, 65535] and nothing after it but an optional '/'."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port is not None and 0 < port < 65536
            and parts.path in ("", "/") and not parts.query and not parts.fragment)


def _one_of(errors: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of {list(allowed)}")


def _positive(errors: list[str], key: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        errors.append(f"{key}={value} must be > 0")


@dataclass
class RunSection:
    """Run identity, output, logging and checkpoints (`cfgs/train.yaml`, `run_cfg/*`)."""

    algorithm: str = MISSING  # sft | grpo | rlt; set by trainer_cfg
    run_name: str = MISSING  # names the run dir: ${results_dir}/${run_name} (deterministic, so restarts resume)
    results_dir: str = "results"
    output_dir: str | None = None  # null = the Hydra job dir (results/<run_name>, or one subdir per multirun job)
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["wandb"])  # wandb | tensorboard | none
    wandb_project: str = "rlt"
    wandb_group: str | None = None
    wandb_mode: str | None = None  # null = online if credentials exist, else offline (never prompts)
    logging_steps: int = 1
    save_steps: int = 50  # checkpoint every N optimizer steps
    save_total_limit: int | None = 3
    resume: bool = True  # continue from the last complete checkpoint in output_dir
    resume_from: str | None = None  # explicit checkpoint dir (wins over `resume`)
    save_final_model: bool = True  # model + tokenizer in ${output_dir}/final
    memcheck: bool = True  # estimate peak GPU memory before loading weights; refuse a run that does not fit
    memcheck_gpu_memory: str | None = None  # budget without a visible GPU, e.g. 85GB (GB = 1e9 B, GiB = 2^30 B)
    # model whose architecture the memory check assumes when model_name_or_path / student_model cannot be read yet
    # (a warm-up checkpoint still to be trained, a hub model not downloaded): a hub id, directory or config.json
    memcheck_model_arch: str | None = None
    memcheck_student_arch: str | None = None

    def problems(self) -> list[str]:
        errors: list[str] = []
        if not self.run_name.strip() or "/" in self.run_name:
            errors.append(f"run_name={self.run_name!r} must be a non-empty name without '/'")
        for r in self.report_to:
            _one_of(errors, "report_to", r, REPORT_TO)
        if self.wandb_mode is not None:
            _one_of(errors, "wandb_mode", self.wandb_mode, WANDB_MODES)
        _positive(errors, "logging_steps", self.logging_steps)
        _positive(errors, "save_steps", self.save_steps)
        _positive(errors, "save_total_limit", self.save_total_limit, allow_none=True)
        if self.memcheck_gpu_memory is not None:
            from rlt.memory import parse_size

            try:
                parse_size(self.memcheck_gpu_memory)
            except ValueError as e:
                errors.append(f"memcheck_gpu_memory: {e}")
        for key in ("memcheck_model_arch", "memcheck_student_arch"):
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                errors.append(f"{key}='' must be a model id, directory or config.json path, or null")
        return errors


@dataclass
class ModelSection:
    """What model to train and how to load it (`model_cfg/*`)."""

    model_name_or_path: str = MISSING  # hub id, local dir, or rlt:tiny / rlt:tiny-wide / rlt:smollm2-135m
    tokenizer_name_or_path: str | None = None  # null = same as the model
    model_revision: str | None = None
    torch_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (weights as loaded)
    attn_implementation: str | None = None  # null = transformers' default (sdpa); eager | sdpa | flash_attention_2
    trust_remote_code: bool = False
    pad_token: str | None = None  # null = repair automatically (never pad == eos)
    use_peft: bool = False  # LoRA adapters instead of full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    load_in_4bit: bool = False  # QLoRA (bitsandbytes nf4); CUDA only

    def problems(self) -> list[str]:
        errors: list[str] = []
        _one_of(errors, "torch_dtype", self.torch_dtype, TORCH_DTYPES)
        if self.attn_implementation is not None:
            _one_of(errors, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _positive(errors, "lora_r", self.lora_r)
        _positive(errors, "lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.lora_target_modules:
            errors.append("lora_target_modules must name at least one module (or ['all-linear'])")
        if self.load_in_4bit and not self.use_peft:
            errors.append("load_in_4bit=true trains 4-bit weights only through adapters: set use_peft=true")
        return errors


@dataclass
class DataSection:
    """Where the data comes from and how rows become training examples (`data_cfg/*`)."""

    dataset_id_or_path: str = MISSING  # hub id, local file/dir/glob, or synthetic:arithmetic
    dataset_subset: str | None = None  # hub dataset config name (e.g. 'main' for openai/gsm8k)
    data_format: str = MISSING  # gsm8k | alpaca | dolly | sharegpt | messages | text | prompt_completion
    data_columns: dict[str, str] = field(default_factory=dict)  # logical name -> column (over the format defaults)
    train_split: str = "train"
    eval_split: str | None = "test"  # null or missing split = carve eval_fraction out of train
    eval_fraction: float = 0.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    system_prompt: str | None = None
    completion_style: str = "gsm8k"  # gsm8k data: gsm8k (worked answer + '#### n') | reasoning_answer_tags
    text_sample_by: str = "paragraph"  # text corpora: one example per paragraph | line | document
    synthetic: dict[str, Any] = field(default_factory=dict)  # synthetic:arithmetic parameters (num_train, ...)
    # data_format=teacher (RLT): rows with question/solution[/reasoning_trace], GSM8K rows, or Stratos conversations
    teacher_data_format: str = "auto"  # auto (from the columns) | custom | gsm8k | stratos
    teacher_format: dict[str, Any] = field(default_factory=lambda: {"style": "stratos"})  # tags + system prompts

    def problems(self) -> list[str]:
        errors: list[str] = []
        _one_of(errors, "data_format", self.data_format, DATA_FORMATS)
        _one_of(errors, "completion_style", self.completion_style, COMPLETION_STYLES)
        _one_of(errors, "text_sample_by", self.text_sample_by, TEXT_SAMPLE_BY)
        _one_of(errors, "teacher_data_format", self.teacher_data_format, TEACHER_DATA_FORMATS)
        _one_of(errors, "teacher_format.style", self.teacher_format.get("style", "stratos"), TEACHER_STYLES)
        if not 0 <= self.eval_fraction < 1:
            errors.append(f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        _positive(errors, "max_train_samples", self.max_train_samples, allow_none=True)
        _positive(errors, "max_eval_samples", self.max_eval_samples, allow_none=True)
        return errors


@dataclass
class OptimSection:
    """Optimisation and batch geometry shared by every trainer (`trainer_cfg/*`)."""

    learning_rate: float = 1e-5
    optim: str = "adamw_torch"  # adamw_8bit / paged_adamw_8bit: 2 bytes of state per parameter instead of 8
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_steps: int = -1  # optimizer steps; -1 = run num_train_epochs
    num_train_epochs: float = 1.0
    train_batch_size: int = 8  # sequences per optimizer step, over all processes
    per_device_train_batch_size: int = 8  # micro-batch per forward/backward
    gradient_accumulation_steps: int | None = None  # null = train_batch_size / (per_device × world size)
    per_device_eval_batch_size: int = 8
    mixed_precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | no
    gradient_checkpointing: bool = False
    eval_steps: int | None = None  # evaluate every N steps (null: SFT only at the end if there is eval data; GRPO/RLT never)
    eval_on_start: bool = False  # evaluate before the first step (shows the starting loss)
    early_stopping_patience: int | None = None  # stop after N evals without eval_loss improvement

    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def derived_gradient_accumulation_steps(self) -> int:
        """GA = train_batch_size / (per_device_train_batch_size × world), e.g. 64 / (4 × 2) = 8."""
        return self.train_batch_size // (self.per_device_train_batch_size * self.world_size())

    def problems(self) -> list[str]:
        errors: list[str] = []
        _positive(errors, "learning_rate", self.learning_rate)
        _one_of(errors, "optim", self.optim, OPTIMIZERS)
        _one_of(errors, "lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay} must be >= 0")
        for k in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, k) < 1:
                errors.append(f"{k}={getattr(self, k)} must be in [0, 1)")
        _positive(errors, "adam_epsilon", self.adam_epsilon)
        _positive(errors, "max_grad_norm", self.max_grad_norm)
        if self.max_steps == 0 or self.max_steps < -1:
            errors.append(f"max_steps={self.max_steps} must be > 0 (or -1 to run num_train_epochs)")
        if self.max_steps == -1:
            _positive(errors, "num_train_epochs", self.num_train_epochs)
        _positive(errors, "train_batch_size", self.train_batch_size)
        _positive(errors, "per_device_train_batch_size", self.per_device_train_batch_size)
        _positive(errors, "per_device_eval_batch_size", self.per_device_eval_batch_size)
        _one_of(errors, "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _positive(errors, "eval_steps", self.eval_steps, allow_none=True)
        _positive(errors, "early_stopping_patience", self.early_stopping_patience, allow_none=True)
        if self.train_batch_size > 0 and self.per_device_train_batch_size > 0:
            world = self.world_size()
            per_step = self.per_device_train_batch_size * world
            if self.train_batch_size % per_step:
                errors.append(
                    f"train_batch_size={self.train_batch_size} is not divisible by per_device_train_batch_size="
                    f"{self.per_device_train_batch_size} × world size {world} = {per_step}: choose train_batch_size "
                    f"as a multiple of {per_step}")
            elif (self.gradient_accumulation_steps is not None
                  and self.gradient_accumulation_steps != self.derived_gradient_accumulation_steps()):
                errors.append(
                    f"gradient_accumulation_steps={self.gradient_accumulation_steps} contradicts train_batch_size="
                    f"{self.train_batch_size} / (per_device_train_batch_size={self.per_device_train_batch_size} × "
                    f"world size {world}) = {self.derived_gradient_accumulation_steps()}: set it to null")
        return errors


@dataclass
class SFTSection:
    """Supervised fine-tuning on TRL's SFTTrainer (`trainer_cfg/sft.yaml`)."""

    max_length: int = 1024  # tokens per example; longer examples are truncated (counted in the log)
    packing: bool = False  # pack several examples per sequence (TRL bfd packing)
    completion_only_loss: bool | None = None  # null = loss on the completion for chat data, on all text for corpora
    eval_accuracy_samples: int = 0  # gsm8k data: greedy accuracy on N eval problems before and after training
    eval_max_new_tokens: int = 64

    def problems(self) -> list[str]:
        errors: list[str] = []
        if self.max_length < 16:
            errors.append(f"max_length={self.max_length} must be >= 16")
        if self.eval_accuracy_samples < 0:
            errors.append(f"eval_accuracy_samples={self.eval_accuracy_samples} must be >= 0")
        _positive(errors, "eval_max_new_tokens", self.eval_max_new_tokens)
        return errors


@dataclass
class SFTRunConfig(RunSection, ModelSection, DataSection, OptimSection, SFTSection):
    """Every key of an SFT run (`trainer_cfg=sft`)."""

    def problems(self) -> list[str]:
        errors = []
        for section in (RunSection, ModelSection, DataSection, OptimSection, SFTSection):
            errors += section.problems(self)
        if self.data_format == "text" and self.completion_only_loss:
            errors.append("completion_only_loss=true needs prompt/completion data, but data_format=text has no "
                          "completion: set completion_only_loss=null")
        if self.data_format == "teacher" and self.completion_only_loss is False:
            errors.append("data_format=teacher trains only on the explanation: completion_only_loss must not be false")
        if self.data_format != "gsm8k" and self.eval_accuracy_samples:
            errors.append(f"eval_accuracy_samples={self.eval_accuracy_samples} needs data_format=gsm8k "
                          f"(got {self.data_format!r})")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                errors.append("early_stopping_patience needs eval_steps (evaluations to compare)")
            elif self.save_steps % self.eval_steps:
                errors.append(f"early_stopping_patience keeps the best checkpoint, so save_steps={self.save_steps} "
                              f"must be a multiple of eval_steps={self.eval_steps}")
        return errors


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
    max_completion_length: int = 256
    temperature: float = 1.0  # sampling temperature; log-probs of the loss use the same temperature
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    loss_type: str = "grpo"  # grpo: per-sequence token mean (reference) | dr_grpo | dapo | bnpo
    scale_rewards: str = "group"  # divide advantages by the group std (reference) | batch | none
    beta: float = 0.04  # k3 KL weight against the reference model (0 = no reference model)
    epsilon: float = 0.2  # PPO clip (no effect at num_iterations=1)
    epsilon_high: float | None = None  # DAPO clip-higher; null = epsilon
    num_iterations: int = 1  # optimisation passes per generation batch
    sync_ref_model: bool = False  # TR-DPO style: ref <- alpha * policy + (1 - alpha) * ref every N steps
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    mask_truncated_completions: bool = False  # exclude completions cut at max_completion_length from the loss
    reward_funcs: list[dict[str, Any]] = field(default_factory=list)  # [{_target_: dotted.path, kwarg: value}]
    reward_weights: list[float] | None = None  # null = all 1
    nonfinite_reward_penalty: float = -1.0  # a NaN/inf/None reward becomes this value (and is counted)
    generation_backend: str = "hf"  # hf (transformers generate) | vllm_colocate | vllm_server
    vllm_gpu_memory_utilization: float = 0.3  # GPU: fraction of the device vLLM reserves (weights + KV cache)
    vllm_kv_cache_memory_bytes: int | None = None  # KV cache size; null = 1 GiB on CPU, from the utilization on GPU
    vllm_enable_sleep_mode: bool = True  # GPU: free vLLM memory during the optimizer step (ignored on CPU)
    vllm_max_model_len: int | None = None  # null = max_prompt_length + max_completion_length
    vllm_enable_prefix_caching: bool = True
    vllm_importance_sampling_correction: bool = True  # reweight by trainer/vLLM probability ratio (TRL's TIS)
    # token_truncate: per-token ratio clipped to [clip_min, clip_max] (never drops a sequence); TRL's default,
    # sequence_mask, zeroes whole sequences whose summed log-ratio leaves the bounds (long bf16 completions)
    vllm_importance_sampling_mode: str = "token_truncate"  # | token_mask | sequence_truncate | sequence_mask
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    # TRL 1.16 multiplies the KL term by the (differentiable) IS ratio by default, which changes the KL gradient
    # even on-policy; false = the reference's plain k3 gradient
    use_bias_correction_kl: bool = False
    vllm_server_host: str = "127.0.0.1"  # vllm_server: the one server used when vllm_server_urls is empty
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0  # vllm_server: seconds to wait for every server's /health at start-up
    # vllm_server: base URLs of rlt vLLM servers (`python -m rlt.generation.vllm_server`; launch_multi.sh sets them),
    # prompts are split across them; [] = the single server http://{vllm_server_host}:{vllm_server_port}
    vllm_server_urls: list[str] = field(default_factory=list)
    vllm_server_request_timeout: float = 600.0  # vllm_server: seconds one generate/weight-update request may take
    vllm_server_gpu_memory_utilization: float = 0.9  # GPU share a dedicated server reserves (weights + KV cache)
    log_completions: bool = False  # print/log a sample of completions at each logging step

    def generation_round(self) -> int:
        """Completions sampled per generation round: P × world × G, e.g. 4 × 1 × 2 = 8."""
        g = self.generation_aggregation_steps or self.derived_gradient_accumulation_steps()
        return self.per_device_train_batch_size * self.world_size() * g

    def problems(self) -> list[str]:
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
        if self.eval_steps and (self.per_device_eval_batch_size * self.world_size()) % self.num_generations:
            errors.append(f"per_device_eval_batch_size={self.per_device_eval_batch_size} × world size "
                          f"{self.world_size()} must be a multiple of num_generations={self.num_generations}")
        _positive(errors, "max_prompt_length", self.max_prompt_length)
        _positive(errors, "max_completion_length", self.max_completion_length)
        _positive(errors, "temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"top_k={self.top_k} must be >= 1 (or null for no top-k)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            errors.append(f"min_p={self.min_p} must be in [0, 1]")
        _positive(errors, "repetition_penalty", self.repetition_penalty)
        _one_of(errors, "loss_type", self.loss_type, LOSS_TYPES)
        _one_of(errors, "vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, IS_MODES)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and lo < 0:
            errors.append(f"vllm_importance_sampling_clip_min={lo} must be >= 0 or null")
        if hi is not None and hi <= 0:
            errors.append(f"vllm_importance_sampling_clip_max={hi} must be > 0 or null")
        if lo is not None and hi is not None and lo >= hi:
            errors.append(f"vllm_importance_sampling_clip_min={lo} must be below vllm_importance_sampling_clip_max={hi}")
        _one_of(errors, "scale_rewards", self.scale_rewards, SCALE_REWARDS)
        if self.beta < 0:
            errors.append(f"beta={self.beta} must be >= 0")
        _positive(errors, "epsilon", self.epsilon)
        _positive(errors, "epsilon_high", self.epsilon_high, allow_none=True)
        _positive(errors, "num_iterations", self.num_iterations)
        if self.sync_ref_model:
            if self.beta == 0:
                errors.append("sync_ref_model=true needs a reference model: set beta > 0")
            if self.use_peft:
                errors.append("sync_ref_model=true cannot be used with use_peft=true (the reference model is the "
                              "policy with its adapters disabled)")
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            errors.append(f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in [0, 1]")
        _positive(errors, "ref_model_sync_steps", self.ref_model_sync_steps)
        errors += _reward_problems(self.reward_funcs, self.reward_weights)
        _one_of(errors, "generation_backend", self.generation_backend, GENERATION_BACKENDS)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            errors.append(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must be in (0, 1]")
        _positive(errors, "vllm_kv_cache_memory_bytes", self.vllm_kv_cache_memory_bytes, allow_none=True)
        _positive(errors, "vllm_server_timeout", self.vllm_server_timeout)
        _positive(errors, "vllm_server_request_timeout", self.vllm_server_request_timeout)
        if not 0 < self.vllm_server_gpu_memory_utilization <= 1:
            errors.append(f"vllm_server_gpu_memory_utilization={self.vllm_server_gpu_memory_utilization} must be in "
                          "(0, 1]")
        if not 0 < self.vllm_server_port < 65536:
            errors.append(f"vllm_server_port={self.vllm_server_port} must be in [1, 65535]")
        for i, url in enumerate(self.vllm_server_urls):
            if not _is_server_url(url):
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
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < self.max_prompt_length + \
                self.max_completion_length:
            errors.append(f"vllm_max_model_len={self.vllm_max_model_len} is shorter than max_prompt_length "
                          f"{self.max_prompt_length} + max_completion_length {self.max_completion_length}")
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


def _reward_problems(reward_funcs: list[dict[str, Any]], weights: list[float] | None) -> list[str]:
    """Each reward is {_target_: importable callable or class, **kwargs}; kwargs must bind to its signature."""
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
        errors = []
        for section in (RunSection, ModelSection, DataSection, OptimSection, GRPOSection):
            errors += section.problems(self)
        if self.data_format != "gsm8k":
            errors.append(f"data_format={self.data_format!r}: plain GRPO needs prompts with a reference answer "
                          "(data_format=gsm8k)")
        if self.early_stopping_patience is not None:
            errors.append("early_stopping_patience is not supported for GRPO (there is no eval loss to watch)")
        return errors


@dataclass
class RLTSection:
    """Teacher–student RLT (`trainer_cfg/teacher_grpo.yaml`, `reward_cfg/teacher_logprob_kl.yaml`): GRPO on the
    teacher, rewarded by how well a frozen student reproduces the solution after its explanation (rlt-spec §2).
    The reward keys keep the reference names."""

    student_model: str | None = None  # null = the reference model (the initial teacher), as in the reference
    offload_untrained_models: bool = True  # student and reference model on CPU except for their forwards (GPU)
    teacher_reward_batch_size: int = 8  # completions per scoring forward (length-sorted)
    teacher_reward_tokens_per_forward: int = 8192  # at most rows × positions per scoring forward (then chunks)
    teacher_reuse_sampling_logprobs: bool = True  # the generator's sampling log-probs at tau_T (vLLM or HF) replace the teacher forward
    use_reference_teacher_model: bool = False  # q_k from the reference model (initial / synced teacher), not the policy
    save_completions_probability: float = 0.0  # sample (prompt, completion, reward) rows to stored_completions/
    logging_prob: float = 0.1  # sample student chats to teacher_chats/log.txt
    answer_log_prob_coeff: Any = field(default_factory=lambda: [1.0, 0.01])  # a: scalar or one per reduction
    kl_penalty_reward_coeff: Any = field(default_factory=lambda: [3.0, 0.03])  # b: scalar or one per reduction
    reduction_log_prob_fn: list[str] = field(default_factory=lambda: ["mean", "min"])
    reduction_kl_fn: list[str] = field(default_factory=lambda: ["mean", "max"])
    normalize_log_prob_fn: str | None = None  # null | exp | exp_norm
    normalize_kl_fn: str | None = None
    clip_log_prob: float | None = 1e5
    clip_kl: float | None = 1e5
    use_schulman_kl_estimation: bool = False  # k3 instead of k1 per-token KL estimate
    not_matched_penalty: float = -1.0  # unclosed explanation; also the fill for empty spans / NaN terms
    unbias_teacher_log_probs: bool = True  # teacher log-probs at the sampling temperature
    unbias_student_log_probs_temp: float | None = None  # student temperature tau_S (null = 1)
    include_teacher_think_entropy: bool = True  # false: -s_k instead of q_k - s_k (no teacher forward)

    def problems(self) -> list[str]:
        errors: list[str] = []
        _positive(errors, "teacher_reward_batch_size", self.teacher_reward_batch_size)
        _positive(errors, "teacher_reward_tokens_per_forward", self.teacher_reward_tokens_per_forward)
        for k in ("save_completions_probability", "logging_prob"):
            if not 0 <= getattr(self, k) <= 1:
                errors.append(f"{k}={getattr(self, k)} must be in [0, 1]")
        for coeff, reductions in (("answer_log_prob_coeff", "reduction_log_prob_fn"),
                                  ("kl_penalty_reward_coeff", "reduction_kl_fn")):
            value, names = getattr(self, coeff), getattr(self, reductions)
            for name in names:
                _one_of(errors, reductions, name, REDUCTIONS)
            if isinstance(value, list | tuple):
                if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                    errors.append(f"{coeff}={value} must be a number or a list of numbers")
                elif len(value) != len(names):
                    errors.append(f"{coeff} has {len(value)} entries but {reductions}={names} has {len(names)}: "
                                  "pair one coefficient with each reduction, or give a scalar")
            elif not isinstance(value, int | float) or isinstance(value, bool):
                errors.append(f"{coeff}={value!r} must be a number or a list of numbers")
        if isinstance(self.answer_log_prob_coeff, int | float) and self.answer_log_prob_coeff <= 0:
            errors.append(f"answer_log_prob_coeff={self.answer_log_prob_coeff} must be > 0 as a scalar (to switch the "
                          f"solution term off give one 0 per reduction, e.g. {[0.0] * len(self.reduction_log_prob_fn)})")
        _one_of(errors, "normalize_log_prob_fn", self.normalize_log_prob_fn, NORMALIZATIONS)
        _one_of(errors, "normalize_kl_fn", self.normalize_kl_fn, NORMALIZATIONS)
        _positive(errors, "clip_log_prob", self.clip_log_prob, allow_none=True)
        _positive(errors, "clip_kl", self.clip_kl, allow_none=True)
        _positive(errors, "unbias_student_log_probs_temp", self.unbias_student_log_probs_temp, allow_none=True)
        return errors


@dataclass
class RLTRunConfig(RunSection, ModelSection, DataSection, OptimSection, GRPOSection, RLTSection):
    """Every key of an RLT teacher run (`trainer_cfg=teacher_grpo`)."""

    def problems(self) -> list[str]:
        errors = []
        for section in (RunSection, ModelSection, DataSection, OptimSection, GRPOSection, RLTSection):
            errors += section.problems(self)
        if self.data_format != "teacher":
            errors.append(f"data_format={self.data_format!r}: RLT trains on teacher prompts (data_format=teacher)")
        if self.early_stopping_patience is not None:
            errors.append("early_stopping_patience is not supported for RLT (there is no eval loss to watch)")
        if self.use_reference_teacher_model and (self.beta == 0 or self.use_peft):
            errors.append(f"use_reference_teacher_model=true needs TRL's reference model: beta > 0 (got {self.beta}) "
                          f"and use_peft=false (got {str(self.use_peft).lower()})")
        return errors


SCHEMAS: dict[str, type] = {"sft": SFTRunConfig, "grpo": GRPORunConfig, "rlt": RLTRunConfig}


def _schema_keys(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default  # MISSING is the string "???", which OmegaConf reads as a missing value


def all_defaults() -> dict[str, Any]:
    """The default of every key of every algorithm: the base layer of the composed config (`rlt_defaults`).

    Having every key in the composed config lets users override any key by its short name (`use_peft=true`), even
    if no YAML file mentions it; keys of other algorithms left at their defaults are dropped by `validate`.
    """
    out: dict[str, Any] = {}
    for schema in SCHEMAS.values():
        for f in dataclasses.fields(schema):
            out.setdefault(f.name, _field_default(f))
    return out


def register_defaults() -> None:
    """Register `all_defaults()` as the config node `rlt_defaults` that cfgs/train.yaml lists first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlt_defaults", node=all_defaults())


def _unknown_key_message(key: str, schema: type, algorithm: str) -> str:
    owners = [name for name, s in SCHEMAS.items() if name != algorithm and key in _schema_keys(s)]
    if owners:
        return f"{key}: not used by algorithm={algorithm} (it is a key of {', '.join(owners)})"
    close = difflib.get_close_matches(key, sorted(_schema_keys(schema)), n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{key}: unknown key{hint}"


def unknown_override_message(key: str) -> str:
    """The message for a command-line override of a key no schema has (Hydra refuses it before `validate`)."""
    keys = sorted(set().union(*(_schema_keys(schema) for schema in SCHEMAS.values())))
    close = difflib.get_close_matches(key, keys, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (the keys are listed in rlt/config.py)"
    return f"{key}: unknown key{hint}"


def validate(cfg: DictConfig | dict) -> Any:
    """Check a composed config and return the typed run config (an `SFTRunConfig`, ...).

    Raises:
        ConfigError: listing every problem found, one per line, each naming the key and the numbers.
    """
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {e}") from None
    raw.pop("hydra", None)
    algorithm = raw.get("algorithm")
    if algorithm not in SCHEMAS:
        raise ConfigError(f"algorithm={algorithm!r} is not one of {sorted(SCHEMAS)} (it is set by trainer_cfg)")
    schema = SCHEMAS[algorithm]
    typed = OmegaConf.structured(schema)
    defaults = all_defaults()
    errors: list[str] = []
    for key, value in raw.items():
        if key not in _schema_keys(schema):
            if key not in defaults or value != defaults[key]:  # a key of another algorithm left at its default is fine
                errors.append(_unknown_key_message(key, schema, algorithm))
            continue
        try:
            typed[key] = value
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            errors.append(f"{key}={value!r}: wrong type ({msg})")
    errors += [f"{k}: missing value (set it in the run config or on the command line)"
               for k in sorted(OmegaConf.missing_keys(typed))]
    if errors:
        raise ConfigError(_format(errors))
    run = OmegaConf.to_object(typed)
    errors = run.problems()
    if errors:
        raise ConfigError(_format(errors))
    if run.gradient_accumulation_steps is None:
        run.gradient_accumulation_steps = run.derived_gradient_accumulation_steps()
    return run


def _format(errors: list[str]) -> str:
    return "invalid config:\n" + "\n".join(f"  - {e}" for e in errors)


def to_yaml(run: Any) -> str:
    """The validated config as YAML (what `--print-config` shows and what is saved in the run dir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))
