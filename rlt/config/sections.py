"""The sections every run config shares: run identity and logging, the model, the data, optimisation and batch
geometry. Each is a mixin dataclass: field = key, default and a comment saying what it means; `problems()` lists
what is wrong with the values, naming the key and the numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from rlt.config.checks import (
    ATTN_IMPLEMENTATIONS,
    COMPLETION_STYLES,
    DATA_FORMATS,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    OPTIMIZERS,
    REPORT_TO,
    TEACHER_DATA_FORMATS,
    TEACHER_STYLES,
    TEXT_SAMPLE_BY,
    TORCH_DTYPES,
    WANDB_MODES,
    in_unit_interval,
    one_of,
    positive,
)


@dataclass
class RunSection:
    """Run identity, output, logging and checkpoints (`cfgs/train.yaml`, `run_cfg/*`)."""

    algorithm: str = MISSING  # sft | grpo | rlt; set by trainer_cfg
    run_name: str = MISSING  # names the run dir: ${results_dir}/${run_name} (deterministic, so restarts resume)
    results_dir: str = "results"  # runs write to <results_dir>/<run_name>/ unless output_dir is set
    output_dir: str | None = None  # null = the Hydra job dir (results/<run_name>, or one subdir per multirun job)
    seed: int = 42  # seeds Python, NumPy, torch, data shuffles and sampling (the run is reproducible)
    report_to: list[str] = field(default_factory=lambda: ["wandb"])  # wandb | tensorboard | none
    wandb_project: str = "rlt"  # the wandb project runs log to (report_to=[wandb])
    wandb_group: str | None = None  # null = the sweep (one group per multirun), none for a single run
    wandb_mode: str | None = None  # null = online if credentials exist, else offline (never prompts)
    wandb_tags: list[str] = field(default_factory=list)  # added to the tags from the run (algorithm, run file, model)
    logging_steps: int = 1  # log metrics (console line, metrics.jsonl, wandb) every N optimizer steps
    verbose: bool = False  # show third-party progress bars and warnings (dataset map/filter bars, known noise)
    samples_every: int = 10  # every N logged steps, a few scored samples to samples.jsonl / wandb (0 = never)
    samples_per_dump: int = 4  # rows per dump: prompt, completion, reward and each reward term
    plots: bool = True  # plots/*.png of the run's metrics at the end of the run (python -m rlt.report)
    # what a hyperparameter search (hydra/sweeper=optuna, docs/sweeps.md) optimizes: a result of the run (summary.json,
    # metrics.jsonl), e.g. eval_loss, eval_reward, train_loss (wandb names such as eval/loss also work); null = the
    # run's main validation metric: eval_loss (SFT), eval_reward (GRPO, RLT)
    sweep_objective: str | None = None
    sweep_direction: str | None = None  # minimize | maximize; null = by the objective (rewards, accuracies: maximize)
    save_steps: int = 50  # checkpoint every N optimizer steps
    save_total_limit: int | None = 3  # keep the newest N checkpoint-* dirs (null = keep all)
    # true: continue from the last complete checkpoint in output_dir, if its config allows (docs/runs.md); force:
    # also with settings that change what is trained (recorded); false: start fresh (refused in a dir holding a run)
    resume: Any = True
    resume_from: str | None = None  # explicit checkpoint dir (wins over `resume`)
    save_final_model: bool = True  # model + tokenizer in ${output_dir}/final
    memcheck: bool = True  # estimate peak GPU memory before loading weights; refuse a run that does not fit
    memcheck_gpu_memory: str | None = None  # budget without a visible GPU, e.g. 85GB (GB = 1e9 B, GiB = 2^30 B)
    # model whose architecture the memory check assumes when model_name_or_path / student_model cannot be read yet
    # (a warm-up checkpoint still to be trained, a hub model not downloaded): a hub id, directory or config.json
    memcheck_model_arch: str | None = None
    # RLT: the student's architecture for memcheck when its config cannot be read
    memcheck_student_arch: str | None = None

    def problems(self) -> list[str]:
        errors: list[str] = []
        if self.resume not in (True, False, "force"):
            errors.append(f"resume={self.resume!r} must be true, false or force")
        if not self.run_name.strip() or "/" in self.run_name:
            errors.append(f"run_name={self.run_name!r} must be a non-empty name without '/'")
        for r in self.report_to:
            one_of(errors, "report_to", r, REPORT_TO)
        if self.wandb_mode is not None:
            one_of(errors, "wandb_mode", self.wandb_mode, WANDB_MODES)
        positive(errors, "logging_steps", self.logging_steps)
        if self.sweep_objective is not None and not self.sweep_objective.strip():
            errors.append("sweep_objective='' must name a result of the run (e.g. eval_loss), or be null")
        if self.sweep_direction is not None:
            one_of(errors, "sweep_direction", self.sweep_direction, ("minimize", "maximize"))
        if self.samples_every < 0:
            errors.append(f"samples_every={self.samples_every} must be >= 0 (0 = no samples)")
        positive(errors, "samples_per_dump", self.samples_per_dump)
        positive(errors, "save_steps", self.save_steps)
        positive(errors, "save_total_limit", self.save_total_limit, allow_none=True)
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
    model_revision: str | None = None  # hub revision (branch, tag or commit) of model_name_or_path
    torch_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (weights as loaded)
    attn_implementation: str | None = None  # null = transformers' default (sdpa); eager | sdpa | flash_attention_2
    trust_remote_code: bool = False  # allow model code from the hub repo (needed by some architectures)
    pad_token: str | None = None  # null = repair automatically (never pad == eos)
    use_peft: bool = False  # LoRA adapters instead of full fine-tuning
    lora_r: int = 16  # LoRA rank (use_peft=true)
    lora_alpha: int = 32  # LoRA scaling numerator: updates are scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05  # dropout on the LoRA branch's input
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # modules that get adapters
    load_in_4bit: bool = False  # QLoRA (bitsandbytes nf4); CUDA only

    def problems(self) -> list[str]:
        errors: list[str] = []
        one_of(errors, "torch_dtype", self.torch_dtype, TORCH_DTYPES)
        if self.attn_implementation is not None:
            one_of(errors, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        positive(errors, "lora_r", self.lora_r)
        positive(errors, "lora_alpha", self.lora_alpha)
        in_unit_interval(errors, "lora_dropout", self.lora_dropout)
        if not self.lora_target_modules:
            errors.append("lora_target_modules must name at least one module (or ['all-linear'])")
        if self.load_in_4bit and not self.use_peft:
            errors.append("load_in_4bit=true trains 4-bit weights only through adapters: set use_peft=true")
        return errors



@dataclass
class DataSection:
    """Where the data comes from and how rows become training examples (`data_cfg/*`)."""

    # hub id, local file/dir/glob, or synthetic:arithmetic; required unless the run lists its sources in
    # dataset_mix (SFT), which then replaces dataset_id_or_path, dataset_subset, data_format and data_columns
    dataset_id_or_path: str | None = None
    dataset_subset: str | None = None  # hub dataset config name (e.g. 'main' for openai/gsm8k)
    data_format: str | None = None  # gsm8k | alpaca | dolly | sharegpt | messages | text | prompt_completion | teacher
    data_columns: dict[str, str] = field(default_factory=dict)  # logical name -> column (over the format defaults)
    train_split: str = "train"  # the split trained on (a dataset_mix source names its own: split)
    eval_split: str | None = "test"  # null or missing split = carve eval_fraction out of train
    eval_fraction: float = 0.0  # share of train held out for evaluation when there is no eval split (seeded)
    # keep N train rows (a seeded random subset; null = all). dataset_mix with weights: the mix's total rows
    max_train_samples: int | None = None
    max_eval_samples: int | None = None  # keep N eval rows (a seeded random subset; null = all)
    system_prompt: str | None = None  # system message put first in every chat prompt without one (null = none)
    completion_style: str = "gsm8k"  # gsm8k data: gsm8k (worked answer + '#### n') | reasoning_answer_tags
    text_sample_by: str = "paragraph"  # text corpora: one example per paragraph | line | document
    synthetic: dict[str, Any] = field(default_factory=dict)  # synthetic:arithmetic parameters (num_train, ...)
    # data_format=teacher (RLT): rows with question/solution[/reasoning_trace], GSM8K rows, or Stratos conversations
    teacher_data_format: str = "auto"  # auto (from the columns) | custom | gsm8k | stratos
    teacher_format: dict[str, Any] = field(default_factory=lambda: {"style": "stratos"})  # tags + system prompts

    def sources_listed_elsewhere(self) -> bool:
        """True when the run lists its data sources in another key (SFT's `dataset_mix`): then the single-source
        keys are not required."""
        return False

    def problems(self) -> list[str]:
        errors: list[str] = []
        if not self.sources_listed_elsewhere():
            hint = ", or list the sources in dataset_mix" if hasattr(self, "dataset_mix") else ""
            for key in ("dataset_id_or_path", "data_format"):
                if getattr(self, key) is None:
                    errors.append(f"{key}: missing value (set it in the run config or on the command line{hint})")
        if self.data_format is not None:
            one_of(errors, "data_format", self.data_format, DATA_FORMATS)
        one_of(errors, "completion_style", self.completion_style, COMPLETION_STYLES)
        one_of(errors, "text_sample_by", self.text_sample_by, TEXT_SAMPLE_BY)
        one_of(errors, "teacher_data_format", self.teacher_data_format, TEACHER_DATA_FORMATS)
        one_of(errors, "teacher_format.style", self.teacher_format.get("style", "stratos"), TEACHER_STYLES)
        in_unit_interval(errors, "eval_fraction", self.eval_fraction)
        positive(errors, "max_train_samples", self.max_train_samples, allow_none=True)
        positive(errors, "max_eval_samples", self.max_eval_samples, allow_none=True)
        return errors



@dataclass
class OptimSection:
    """Optimisation and batch geometry shared by every trainer (`trainer_cfg/*`)."""

    learning_rate: float = 1e-5  # peak learning rate of the optimizer
    optim: str = "adamw_torch"  # adamw_8bit / paged_adamw_8bit: 2 bytes of state per parameter instead of 8
    lr_scheduler_type: str = "cosine"  # transformers scheduler name: cosine | linear | constant | ...
    warmup_ratio: float = 0.0  # fraction of the steps spent warming the learning rate up from 0
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    adam_beta1: float = 0.9  # AdamW beta1 (first-moment decay)
    adam_beta2: float = 0.999  # AdamW beta2 (second-moment decay)
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the global gradient norm to this value
    max_steps: int = -1  # optimizer steps; -1 = run num_train_epochs
    num_train_epochs: float = 1.0  # passes over the train data when max_steps=-1
    train_batch_size: int = 8  # sequences per optimizer step, over all processes
    per_device_train_batch_size: int = 8  # micro-batch per forward/backward
    gradient_accumulation_steps: int | None = None  # null = train_batch_size / (per_device × world size)
    per_device_eval_batch_size: int = 8  # evaluation micro-batch per process
    mixed_precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | no
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower steps
    # evaluate every N steps (null: SFT only at the end if there is eval data; GRPO/RLT: no validation). GRPO/RLT:
    # held-out reward per reward function (+ GSM8K accuracy, teacher reward terms) on eval_split
    eval_steps: int | None = None
    eval_on_start: bool = False  # evaluate before the first step (shows the starting loss)
    early_stopping_patience: int | None = None  # stop after N evals without eval_loss improvement

    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    def derived_gradient_accumulation_steps(self) -> int:
        """GA = train_batch_size / (per_device_train_batch_size × world), e.g. 64 / (4 × 2) = 8."""
        return self.train_batch_size // (self.per_device_train_batch_size * self.world_size())

    def problems(self) -> list[str]:
        errors: list[str] = []
        positive(errors, "learning_rate", self.learning_rate)
        one_of(errors, "optim", self.optim, OPTIMIZERS)
        one_of(errors, "lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        in_unit_interval(errors, "warmup_ratio", self.warmup_ratio)
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay} must be >= 0")
        in_unit_interval(errors, "adam_beta1", self.adam_beta1)
        in_unit_interval(errors, "adam_beta2", self.adam_beta2)
        positive(errors, "adam_epsilon", self.adam_epsilon)
        positive(errors, "max_grad_norm", self.max_grad_norm)
        if self.max_steps == 0 or self.max_steps < -1:
            errors.append(f"max_steps={self.max_steps} must be > 0 (or -1 to run num_train_epochs)")
        if self.max_steps == -1:
            positive(errors, "num_train_epochs", self.num_train_epochs)
        positive(errors, "train_batch_size", self.train_batch_size)
        positive(errors, "per_device_train_batch_size", self.per_device_train_batch_size)
        positive(errors, "per_device_eval_batch_size", self.per_device_eval_batch_size)
        one_of(errors, "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        positive(errors, "eval_steps", self.eval_steps, allow_none=True)
        positive(errors, "early_stopping_patience", self.early_stopping_patience, allow_none=True)
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



def section_problems(run) -> list[str]:
    """The problems of every section a run config is made of (its dataclass bases), in their order."""
    return [error for section in type(run).__bases__ for error in section.problems(run)]
