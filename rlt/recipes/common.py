"""What every recipe does the same way: run dir, tokenizer/model from the model keys, the TrainingArguments shared by
TRL's configs, callbacks, resume, the final save and the summary. Recipes stay short and read top to bottom."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, set_seed

from rlt import console
from rlt.checkpoints import CompleteCheckpointCallback, atomic_write_text, last_complete_checkpoint
from rlt.errors import ConfigError
from rlt.models import load_model, load_tokenizer, make_lora_config
from rlt.stop import GracefulStop, raise_if_stopped
from rlt.tracking import JsonlMetricsCallback, configure_reporting, tracking_callbacks

log = logging.getLogger(__name__)


def prepare_run_dir(run) -> Path:
    """The run dir (its config.yaml is written by `rlt.run_dir.open_run`, which checked it), seed everything, and
    quiet third-party output unless ``verbose`` (`rlt.console.configure_noise`)."""
    console.configure_noise(run.verbose)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(run.seed)
    return out


def tokenizer_for(run):
    tokenizer = load_tokenizer(run.tokenizer_name_or_path or run.model_name_or_path, revision=run.model_revision,
                               trust_remote_code=run.trust_remote_code, pad_token=run.pad_token)
    backend = getattr(run, "generation_backend", "hf")
    if backend != "hf":
        check_vocabulary_fits_engine(run, tokenizer, backend)
    return tokenizer


def check_vocabulary_fits_engine(run, tokenizer, backend: str) -> None:
    """vLLM builds its engine from the model's own config; when the pad-token repair grew the vocabulary past the
    config's ``vocab_size``, the policy's resized embedding can no longer be pushed into it (shape mismatch at the
    first weight sync). Caught here, before any weights load."""
    from transformers import AutoConfig

    from rlt.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(run.model_name_or_path), revision=run.model_revision,
                                        trust_remote_code=run.trust_remote_code)
    vocab_size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"pad_token={tokenizer.pad_token!r} is a new token: the tokenizer has {len(tokenizer)} "
                          f"tokens but {run.model_name_or_path} has vocab_size={vocab_size}, and "
                          f"generation_backend={backend} loads the model with its own vocabulary. Set pad_token to a "
                          "token the vocabulary already has (or null to pick one), or use generation_backend=hf")


def model_for(run, tokenizer, name_or_path: str | None = None):
    return load_model(name_or_path or run.model_name_or_path, torch_dtype=run.torch_dtype,
                      attn_implementation=run.attn_implementation, revision=run.model_revision,
                      trust_remote_code=run.trust_remote_code, load_in_4bit=run.load_in_4bit, tokenizer=tokenizer)


def peft_config_for(run):
    if not run.use_peft:
        return None
    return make_lora_config(r=run.lora_r, alpha=run.lora_alpha, dropout=run.lora_dropout,
                            target_modules=run.lora_target_modules)


def mixed_precision_flags(choice: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments: auto = bf16 on a bf16-capable GPU, fp16 on an older GPU, fp32 on CPU."""
    if choice == "auto":
        if not torch.cuda.is_available():
            return False, False
        return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
    return choice == "bf16", choice == "fp16"


def training_args_kwargs(run, out: Path, *, has_eval: bool) -> dict:
    """The TrainingArguments fields every recipe sets the same way from the shared keys."""
    bf16, fp16 = mixed_precision_flags(run.mixed_precision)
    early_stop = run.early_stopping_patience is not None
    return dict(
        output_dir=str(out),
        seed=run.seed,
        max_steps=run.max_steps,
        num_train_epochs=run.num_train_epochs,
        learning_rate=run.learning_rate,
        optim=run.optim,
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
        eval_strategy="steps" if (has_eval and run.eval_steps) else "no",
        eval_steps=run.eval_steps,
        eval_on_start=run.eval_on_start and has_eval,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        logging_steps=run.logging_steps,
        disable_tqdm=True,  # the console prints one line per logged step instead (`rlt.console`)
        report_to=configure_reporting(run, str(out)),
        run_name=run.run_name,
        use_cpu=not torch.cuda.is_available(),
    )


def callbacks_for(run, out: Path) -> list:
    """The callbacks every recipe uses; the console line first (it adds ``timing/*`` to the logged record that
    metrics.jsonl then writes)."""
    callbacks = [console.ConsoleLine(), CompleteCheckpointCallback(), JsonlMetricsCallback(out / "metrics.jsonl"),
                 GracefulStop()]
    if run.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=run.early_stopping_patience))
    return callbacks + tracking_callbacks(run)


def disk_full(error: BaseException, out, *, min_free_bytes: int = 64 * 2**20) -> bool:
    """Whether `error` (raised while training, most often inside a checkpoint save) means the disk of `out` is full:
    ENOSPC, its message, or a writer error that torch / safetensors raise without the errno (torch 2.13's zip writer:
    ``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos``, ``basic_ios::clear: iostream error``)
    while less than `min_free_bytes` are free there."""
    import errno
    import shutil

    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
        return True
    text = str(error)
    if not any(sign in text for sign in ("inline_container", "unexpected pos", "iostream error", "file write failed")):
        return False
    try:
        return shutil.disk_usage(out).free < min_free_bytes
    except OSError:
        return False


def train(trainer, resume: str | None, out: Path):
    """`trainer.train` from `resume`. A signal ends it with `RunStopped` once its checkpoint is saved (`rlt.stop`);
    a full disk with one line naming the step, the free space and the checkpoint kept."""
    from rlt.errors import RltError
    from rlt.run_dir import no_space_message

    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except (OSError, RuntimeError) as e:
        if not disk_full(e, out):
            raise
        raise RltError(no_space_message(out, trainer.state.global_step, None)) from None
    raise_if_stopped(trainer, str(out))
    return result


def resume_checkpoint(run, out: Path) -> str | None:
    """`resume_from` if given, else the last complete checkpoint of this run dir (unless ``resume=false``); the one
    `rlt.run_dir.open_run` checked."""
    ckpt = run.resume_from or (last_complete_checkpoint(out) if run.resume is not False else None)
    if ckpt:
        log.info("resuming from %s", ckpt)
    return ckpt


def save_final(trainer, tokenizer, final_dir: Path) -> str:
    """Save model (or adapter) + tokenizer to a temp dir, then rename it into place: `final/` is complete or absent.
    Every process calls it (ZeRO-3 gathers the weights collectively); only the main one clears the temp dir, before
    anyone writes (a late process clearing it deleted the main one's files: seen with 2 DDP processes), and renames
    it, before anyone returns."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    trainer.accelerator.wait_for_everyone()
    return str(final_dir)


def finish(summary: dict, out: Path, lines: list[str], run=None) -> dict:
    """Write summary.json (the recipe's results + `rlt.report_summary.run_summary`: swept keys, hyperparameters,
    first / last / best / mean of the last values of each main metric, validation, wall time), the run's plots (when
    ``plots`` is on) and print the user-facing report (run dir, the given result lines, where things are); on the
    main process only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return summary
    from rlt import report
    from rlt.report_summary import run_summary

    summary = {**run_summary(out), **summary}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    plots = report.write_plots(out) if run is None or run.plots else []
    lines = [*lines, *([f"samples:      {out / 'samples.jsonl'}"] if (out / "samples.jsonl").is_file() else [])]
    report_lines = [f"done:         {summary['global_step']} optimizer steps", f"run dir:      {out}", *lines,
                    f"metrics:      {out / 'metrics.jsonl'}", f"checkpoints:  {out}/checkpoint-*"]
    if plots:
        report_lines.append(f"plots:        {out / 'plots'}/ ({len(plots)}; python -m rlt.report {out} for the page)")
    if "final_model" in summary:
        report_lines.append(f"final model:  {summary['final_model']}")
    print("\n".join(["", "=" * 60, *report_lines, "=" * 60]), flush=True)  # noqa: T201 - the user-facing summary
    return summary
