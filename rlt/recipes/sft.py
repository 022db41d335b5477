"""SFT recipe: TRL's SFTTrainer, configured from a validated `SFTRunConfig`.

setup (tokenizer → data → model) → optional accuracy before → train (resuming from the last complete checkpoint)
→ final eval → save → summary. Chat data (prompt/completion) trains on the completion only; text corpora on every
token. Gradient accumulation = train_batch_size / (per_device_train_batch_size × world), derived in rlt.config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, set_seed
from trl import SFTConfig, SFTTrainer

from rlt.checkpoints import CompleteCheckpointCallback, atomic_write_text, last_complete_checkpoint
from rlt.config import SFTRunConfig, to_yaml
from rlt.data.loading import prepare_gsm8k_eval, prepare_sft_datasets
from rlt.evaluate import gsm8k_accuracy
from rlt.models import load_model, load_tokenizer, make_lora_config
from rlt.tracking import JsonlMetricsCallback, configure_reporting

log = logging.getLogger(__name__)


def train(run: SFTRunConfig) -> dict:
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(run))
    set_seed(run.seed)

    # ---- setup: tokenizer and data first, so data errors come before any weights load
    tokenizer = load_tokenizer(run.tokenizer_name_or_path or run.model_name_or_path, revision=run.model_revision,
                               trust_remote_code=run.trust_remote_code, pad_token=run.pad_token)
    train_ds, eval_ds = prepare_sft_datasets(**_data_kwargs(run))
    accuracy_problems = _accuracy_problems(run) if run.eval_accuracy_samples else []
    model = load_model(run.model_name_or_path, torch_dtype=run.torch_dtype,
                       attn_implementation=run.attn_implementation, revision=run.model_revision,
                       trust_remote_code=run.trust_remote_code, load_in_4bit=run.load_in_4bit, tokenizer=tokenizer)

    bf16, fp16 = _mixed_precision(run.mixed_precision)
    has_eval = eval_ds is not None
    args = SFTConfig(
        output_dir=str(out),
        seed=run.seed,
        max_steps=run.max_steps,
        num_train_epochs=run.num_train_epochs,
        learning_rate=run.learning_rate,
        lr_scheduler_type=run.lr_scheduler_type,
        warmup_steps=run.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        weight_decay=run.weight_decay,
        adam_beta1=run.adam_beta1,
        adam_beta2=run.adam_beta2,
        adam_epsilon=run.adam_epsilon,
        max_grad_norm=run.max_grad_norm,
        per_device_train_batch_size=run.per_device_train_batch_size,
        per_device_eval_batch_size=run.per_device_eval_batch_size,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        bf16=bf16,
        fp16=fp16,
        gradient_checkpointing=run.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if run.gradient_checkpointing else None,
        eval_strategy=("steps" if run.eval_steps else "no") if has_eval else "no",
        eval_steps=run.eval_steps,
        eval_on_start=run.eval_on_start and has_eval,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        load_best_model_at_end=run.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if run.early_stopping_patience is not None else None,
        logging_steps=run.logging_steps,
        report_to=configure_reporting(run.report_to, output_dir=str(out), project=run.wandb_project,
                                      group=run.wandb_group, run_name=run.run_name, mode=run.wandb_mode),
        run_name=run.run_name,
        max_length=run.max_length,
        packing=run.packing,
        completion_only_loss=run.completion_only_loss,
        dataset_num_proc=None,
        use_cpu=not torch.cuda.is_available(),
    )
    callbacks = [CompleteCheckpointCallback(), JsonlMetricsCallback(out / "metrics.jsonl")]
    if run.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=run.early_stopping_patience))
    trainer = _SFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=make_lora_config(r=run.lora_r, alpha=run.lora_alpha, dropout=run.lora_dropout,
                                     target_modules=run.lora_target_modules) if run.use_peft else None,
        callbacks=callbacks)

    # ---- train
    resume = run.resume_from or (last_complete_checkpoint(out) if run.resume else None)
    summary: dict = {"run_name": run.run_name, "output_dir": str(out), "resumed_from": resume}
    if accuracy_problems and resume is None:
        summary["accuracy_before"] = _accuracy(trainer.model, tokenizer, accuracy_problems, run)
    if resume:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    summary.update(global_step=trainer.state.global_step, train_loss=result.training_loss)

    # ---- evaluate, save
    if has_eval:
        metrics = trainer.evaluate()
        summary.update(eval_loss=metrics["eval_loss"], eval_perplexity=metrics.get("eval_perplexity"))
        first = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
        if first is not None and first.get("step", 0) == 0:
            summary["eval_loss_at_start"] = first["eval_loss"]
    if accuracy_problems:
        summary["accuracy_after"] = _accuracy(trainer.model, tokenizer, accuracy_problems, run)
    if run.save_final_model:
        summary["final_model"] = _save_final(trainer, tokenizer, out / "final")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _report(summary, out)
    return summary


class _SFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, plus eval perplexity = exp(eval_loss) in every evaluation log (wandb, metrics.jsonl)."""

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, *args, **kwargs)


def _data_kwargs(run: SFTRunConfig) -> dict:
    return dict(dataset_id_or_path=run.dataset_id_or_path, dataset_subset=run.dataset_subset,
                data_format=run.data_format, data_columns=run.data_columns, train_split=run.train_split,
                eval_split=run.eval_split, eval_fraction=run.eval_fraction, max_train_samples=run.max_train_samples,
                max_eval_samples=run.max_eval_samples, system_prompt=run.system_prompt,
                completion_style=run.completion_style, text_sample_by=run.text_sample_by, synthetic=run.synthetic,
                seed=run.seed)


def _accuracy_problems(run: SFTRunConfig) -> list[dict]:
    """The first `eval_accuracy_samples` problems of the eval split (GSM8K-format data), same prompt format."""
    return prepare_gsm8k_eval(dataset_id_or_path=run.dataset_id_or_path, dataset_subset=run.dataset_subset,
                              split=run.eval_split or run.train_split, data_columns=run.data_columns,
                              system_prompt=run.system_prompt, max_samples=run.eval_accuracy_samples,
                              synthetic=run.synthetic, seed=run.seed)


def _accuracy(model, tokenizer, problems, run: SFTRunConfig) -> float:
    result = gsm8k_accuracy(model, tokenizer, problems, max_new_tokens=run.eval_max_new_tokens,
                            batch_size=run.per_device_eval_batch_size)
    return result["accuracy"]


def _mixed_precision(choice: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments: auto = bf16 on a bf16-capable GPU, fp16 on an older GPU, fp32 on CPU."""
    if choice == "auto":
        if not torch.cuda.is_available():
            return False, False
        return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
    return choice == "bf16", choice == "fp16"


def _save_final(trainer, tokenizer, final_dir: Path) -> str:
    """Save model + tokenizer to a temp dir, then rename into place: `final/` is complete or absent."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if trainer.is_world_process_zero():
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    return str(final_dir)


def _report(summary: dict, out: Path) -> None:
    lines = [f"run dir:      {out}"]
    if "eval_loss_at_start" in summary:
        lines.append(f"eval loss:    {summary['eval_loss_at_start']:.4f} -> {summary['eval_loss']:.4f}")
    elif "eval_loss" in summary:
        lines.append(f"eval loss:    {summary['eval_loss']:.4f}")
    if "accuracy_after" in summary:
        before = summary.get("accuracy_before")
        lines.append("accuracy:     " + (f"{before:.1%} -> " if before is not None else "")
                     + f"{summary['accuracy_after']:.1%}")
    lines.append(f"metrics:      {out / 'metrics.jsonl'}")
    lines.append(f"checkpoints:  {out}/checkpoint-*")
    if "final_model" in summary:
        lines.append(f"final model:  {summary['final_model']}")
    lines.insert(0, f"done:         {summary['global_step']} optimizer steps")
    print("\n".join(["", "=" * 60, *lines, "=" * 60]), flush=True)  # noqa: T201 - the user-facing summary
