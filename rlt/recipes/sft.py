"""SFT recipe: TRL's SFTTrainer, configured from a validated `SFTRunConfig`.

setup (tokenizer → data → model) → optional accuracy before → train (resuming from the last complete checkpoint)
→ final eval → save → summary. Chat data (prompt/completion) trains on the completion only; conversations on every
assistant turn (`train_on_all_assistant_turns`: tokenized here, `rlt.data.loading.tokenize_conversations`); text
corpora on every token. `dataset_mix` combines several sources (`rlt.data.mix`; its counts go into summary.json).
Gradient accumulation = train_batch_size / (per_device_train_batch_size × world), derived in rlt.config.
"""

from __future__ import annotations

import logging
import math

from trl import SFTConfig, SFTTrainer

from rlt import console
from rlt.checkpoints import save_marked_then_rotated
from rlt.config import SFTRunConfig
from rlt.data.loading import prepare_gsm8k_eval, prepare_sft_datasets, tokenize_conversations
from rlt.data.mix import prepare_sft_mix
from rlt.data.teacher import prepare_teacher_datasets
from rlt.evaluate import gsm8k_accuracy
from rlt.recipes import common

log = logging.getLogger(__name__)


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
    train_ds, eval_ds, data_summary = _datasets(run, tokenizer)
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
    summary: dict = {"run_name": run.run_name, "output_dir": str(out), "resumed_from": resume, **data_summary}
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


def _datasets(run: SFTRunConfig, tokenizer) -> tuple:
    """(train, eval, summary extras) for SFTTrainer. data_format=teacher: the RLT warm-up (loss on the explanation
    only). Conversations with every assistant turn trained arrive as ``messages`` rows and are tokenized here with
    their assistant masks; a mix adds ``data_mix`` (rows per source) to the summary."""
    if run.data_format == "teacher" and not run.dataset_mix:
        train, eval_ds = prepare_teacher_datasets(
            run.dataset_id_or_path, mode="sft", tokenizer=tokenizer, fmt=run.teacher_format, columns=run.data_columns,
            split=run.train_split, eval_split=run.eval_split, data_format=run.teacher_data_format,
            max_samples=run.max_train_samples, max_eval_samples=run.max_eval_samples, max_length=run.max_length,
            synthetic=run.synthetic, subset=run.dataset_subset, seed=run.seed)
        return train, eval_ds, {}
    # completion_only_loss=false trains every token anyway: no masks needed
    all_turns = run.train_on_all_assistant_turns and run.completion_only_loss is not False
    extras: dict = {}
    if run.dataset_mix:
        _warn_unused_single_source_keys(run)
        train, eval_ds, extras["data_mix"] = prepare_sft_mix(
            run.dataset_mix, eval_split=run.eval_split, eval_fraction=run.eval_fraction,
            max_train_samples=run.max_train_samples, max_eval_samples=run.max_eval_samples,
            system_prompt=run.system_prompt, completion_style=run.completion_style,
            text_sample_by=run.text_sample_by, synthetic=run.synthetic, all_assistant_turns=all_turns, seed=run.seed)
    else:
        train, eval_ds = prepare_sft_datasets(
            dataset_id_or_path=run.dataset_id_or_path, dataset_subset=run.dataset_subset, data_format=run.data_format,
            data_columns=run.data_columns, train_split=run.train_split, eval_split=run.eval_split,
            eval_fraction=run.eval_fraction, max_train_samples=run.max_train_samples,
            max_eval_samples=run.max_eval_samples, system_prompt=run.system_prompt,
            completion_style=run.completion_style, text_sample_by=run.text_sample_by, synthetic=run.synthetic,
            all_assistant_turns=all_turns, seed=run.seed)
    train = tokenize_conversations(train, tokenizer, max_length=run.max_length, what="train")
    if eval_ds is not None:
        eval_ds = tokenize_conversations(eval_ds, tokenizer, max_length=run.max_length, what="eval")
    return train, eval_ds, extras


def _warn_unused_single_source_keys(run: SFTRunConfig) -> None:
    """A data_cfg's single source left beside dataset_mix (e.g. the default synthetic data) is not trained on."""
    unused = {k: getattr(run, k) for k in ("dataset_id_or_path", "data_format", "dataset_subset")
              if getattr(run, k) is not None}
    if run.data_columns:
        unused["data_columns"] = run.data_columns
    if unused:
        log.warning("dataset_mix lists the sources, so %s %s not used", ", ".join(f"{k}={v!r}" for k, v in
                                                                              unused.items()),
                    "is" if len(unused) == 1 else "are")


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
