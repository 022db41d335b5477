"""The SFT run config: the shared sections plus TRL SFTTrainer's keys (`trainer_cfg/sft.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlt.config.checks import positive
from rlt.config.sections import DataSection, ModelSection, OptimSection, RunSection, section_problems


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
        positive(errors, "eval_max_new_tokens", self.eval_max_new_tokens)
        return errors


@dataclass
class SFTRunConfig(RunSection, ModelSection, DataSection, OptimSection, SFTSection):
    """Every key of an SFT run (`trainer_cfg=sft`)."""

    def problems(self) -> list[str]:
        errors = section_problems(self)
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

