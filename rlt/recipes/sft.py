"""SFT recipe: TRL's SFTTrainer, configured from a validated `SFTRunConfig`.

setup (tokenizer → data → model) → optional accuracy before → train (resuming from the last complete checkpoint)
→ final eval → save → summary. Chat data (prompt/completion) trains on the completion only; text corpora on every
token. Gradient accumulation = train_batch_size / (per_device_train_batch_size × world), derived in rlt.config.
"""

from __future__ import annotations

import math

from trl import SFTConfig, SFTTrainer

from rlt import console
from rlt.checkpoints import save_marked_then_rotated
from rlt.config import SFTRunConfig
from rlt.data.loading import prepare_gsm8k_eval, prepare_sft_datasets
from rlt.data.teacher import prepare_teacher_datasets
from rlt.evaluate import gsm8k_accuracy
from rlt.recipes import common


class _SFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, plus eval perplexity = exp(eval_loss) in every evaluation log (wandb, metrics.jsonl), and
    checkpoints marked complete before older ones are rotated away (`rlt.checkpoints.save_marked_then_rotated`)."""

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):  # marked complete before older checkpoints are rotated away
        save_marked_then_rotated(self, lambda: SFTTrainer._save_checkpoint(self, model, trial), trial)


def train(run: SFTRunConfig) -> dict:
    out = common.prepare_run_dir(run)

    # ---- setup: tokenizer and data first, so data errors come before any weights load
    tokenizer = common.tokenizer_for(run)
    train_ds, eval_ds = _datasets(run, tokenizer)
    accuracy_problems = _accuracy_problems(run) if run.eval_accuracy_samples else []
    model = common.model_for(run, tokenizer)
    args = SFTConfig(**common.training_args_kwargs(run, out, has_eval=eval_ds is not None),
                     max_length=run.max_length, packing=run.packing, completion_only_loss=run.completion_only_loss)
    trainer = _SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=common.peft_config_for(run),
                          callbacks=common.callbacks_for(run, out))
    console.quiet_trainer(trainer)

    # ---- train
    resume = common.resume_checkpoint(run, out)
    summary: dict = {"run_name": run.run_name, "output_dir": str(out), "resumed_from": resume}
    if accuracy_problems and resume is None:
        summary["accuracy_before"] = _accuracy(trainer.model, tokenizer, accuracy_problems, run)
    result = common.train(trainer, resume, out)
    summary.update(global_step=trainer.state.global_step, train_loss=result.training_loss)

    # ---- evaluate, save, report
    lines = []
    if eval_ds is not None:
        metrics = trainer.evaluate()
        summary.update(eval_loss=metrics["eval_loss"], eval_perplexity=metrics.get("eval_perplexity"))
        first = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
        if first is not None and first.get("step", 0) == 0:
            summary["eval_loss_at_start"] = first["eval_loss"]
            lines.append(f"eval loss:    {first['eval_loss']:.4f} -> {summary['eval_loss']:.4f}")
        else:
            lines.append(f"eval loss:    {summary['eval_loss']:.4f}")
    if accuracy_problems:
        summary["accuracy_after"] = _accuracy(trainer.model, tokenizer, accuracy_problems, run)
        before = summary.get("accuracy_before")
        lines.append("accuracy:     " + (f"{before:.1%} -> " if before is not None else "")
                     + f"{summary['accuracy_after']:.1%}")
    if run.save_final_model:
        summary["final_model"] = common.save_final(trainer, tokenizer, out / "final")
    return common.finish(summary, out, lines, run)


def _datasets(run: SFTRunConfig, tokenizer):
    """(train, eval) rows for SFTTrainer; for data_format=teacher the RLT warm-up: loss on the explanation only."""
    if run.data_format == "teacher":
        return prepare_teacher_datasets(
            run.dataset_id_or_path, mode="sft", tokenizer=tokenizer, fmt=run.teacher_format, columns=run.data_columns,
            split=run.train_split, eval_split=run.eval_split, data_format=run.teacher_data_format,
            max_samples=run.max_train_samples, max_eval_samples=run.max_eval_samples, max_length=run.max_length,
            synthetic=run.synthetic, subset=run.dataset_subset, seed=run.seed)
    return prepare_sft_datasets(dataset_id_or_path=run.dataset_id_or_path, dataset_subset=run.dataset_subset,
                                data_format=run.data_format, data_columns=run.data_columns,
                                train_split=run.train_split, eval_split=run.eval_split,
                                eval_fraction=run.eval_fraction, max_train_samples=run.max_train_samples,
                                max_eval_samples=run.max_eval_samples, system_prompt=run.system_prompt,
                                completion_style=run.completion_style, text_sample_by=run.text_sample_by,
                                synthetic=run.synthetic, seed=run.seed)


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
