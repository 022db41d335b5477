"""The RLT run config: GRPO's keys plus the teacher reward's (`TeacherRewardSection`) and the student's
(`trainer_cfg/teacher_grpo.yaml`, `reward_cfg/teacher_logprob_kl.yaml`; docs/rlt.md)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from rlt.config.checks import NORMALIZATIONS, REDUCTIONS, in_unit_interval, is_number, one_of, positive
from rlt.config.grpo import GRPOSection
from rlt.config.sections import DataSection, ModelSection, OptimSection, RunSection, section_problems
from rlt.errors import ConfigError


@dataclass
class TeacherRewardSection:
    """The RLT teacher reward's keys (rlt-spec §2; `rlt.rewards.TeacherKLReward` reads them):
    r = sum_j a_j R_j(student log-probs of the solution) - sum_j b_j R_j(per-token KL teacher || student on the
    explanation) + not_matched_penalty if the explanation is not closed. The defaults are the published RLT run's
    (the reference's `teacher_rlt.yaml`); docs/rlt.md says where the reference's other defaults differ."""

    answer_log_prob_coeff: Any = field(default_factory=lambda: [1.0, 0.01])  # a: > 0, or one number per reduction
    kl_penalty_reward_coeff: Any = field(default_factory=lambda: [3.0, 0.03])  # b: a number, or one per reduction
    reduction_log_prob_fn: list[str] = field(default_factory=lambda: ["mean", "min"])  # R^lp over solution tokens
    reduction_kl_fn: list[str] = field(default_factory=lambda: ["mean", "max"])  # R^kl over explanation tokens
    normalize_log_prob_fn: str | None = None  # per token, before reducing: null (none) | exp | exp_norm (1 - e^-x)
    normalize_kl_fn: str | None = None  # the same for the per-token KL values of the explanation
    clip_log_prob: float | None = 1e5  # log-probs clamped below at -clip_log_prob (1e5: no effect); null = off
    clip_kl: float | None = 1e5  # per-token KL clamped above at clip_kl (1e5: no effect); null = off
    use_schulman_kl_estimation: bool = False  # k3 (d + e^-d - 1 >= 0) instead of the k1 estimate d = q_k - s_k
    not_matched_penalty: float = -1.0  # unclosed (or blank) explanation; also the fill of an empty span's terms
    unbias_teacher_log_probs: bool = True  # teacher log-probs q_k at the sampling temperature tau_T (else 1)
    unbias_student_log_probs_temp: float | None = 0.7  # student temperature tau_S (null = 1)
    include_teacher_think_entropy: bool = True  # false: -s_k instead of q_k - s_k (no teacher forward)
    teacher_reward_batch_size: int = 8  # completions per scoring forward (length-sorted, prefixes shared)
    teacher_reward_tokens_per_forward: int = 8192  # at most rows x positions per scoring forward (then chunks)
    # the generator's sampling log-probs at tau_T (vLLM or HF, plain tempered sampling) stand in for q_k: no forward
    teacher_reuse_sampling_logprobs: bool = True

    def problems(self) -> list[str]:
        errors: list[str] = []
        for coeff, reductions in (("answer_log_prob_coeff", "reduction_log_prob_fn"),
                                  ("kl_penalty_reward_coeff", "reduction_kl_fn")):
            errors += _coefficient_problems(coeff, getattr(self, coeff), reductions, getattr(self, reductions))
        if is_number(self.answer_log_prob_coeff) and self.answer_log_prob_coeff <= 0:
            zeros = [0.0] * len(reduction_names(self.reduction_log_prob_fn))
            errors.append(f"answer_log_prob_coeff={self.answer_log_prob_coeff} must be > 0 as a scalar (the solution "
                          f"log-prob term is the reward's signal; to switch it off deliberately give one 0 per "
                          f"reduction, e.g. {zeros})")
        for key in ("normalize_log_prob_fn", "normalize_kl_fn"):
            if getattr(self, key) is not None:
                one_of(errors, key, getattr(self, key), NORMALIZATIONS)
        positive(errors, "clip_log_prob", self.clip_log_prob, allow_none=True)
        positive(errors, "clip_kl", self.clip_kl, allow_none=True)
        if not is_number(self.not_matched_penalty) or not math.isfinite(self.not_matched_penalty):
            errors.append(f"not_matched_penalty={self.not_matched_penalty!r} must be a finite number")
        positive(errors, "unbias_student_log_probs_temp", self.unbias_student_log_probs_temp, allow_none=True)
        for key in ("teacher_reward_batch_size", "teacher_reward_tokens_per_forward"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{key}={value!r} must be an integer >= 1")
        return errors

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def problems_of(cls, source=None, **overrides: Any) -> list[str]:
        """The problems of the settings `source` holds (a run config, a section; None = the defaults) with
        `overrides`, unknown override keys first."""
        known = cls.keys()
        unknown = [k for k in overrides if k not in known]
        if unknown:
            return [f"{k}: not a teacher reward key" + _did_you_mean(k, known) for k in unknown]
        base = {k: getattr(source, k) for k in known} if source is not None else {}
        return cls(**{**base, **overrides}).problems()

    @classmethod
    def of(cls, source=None, **overrides: Any) -> TeacherRewardSection:
        """The settings `source` holds with `overrides`, checked. Raises `ConfigError` listing every problem."""
        errors = cls.problems_of(source, **overrides)
        if errors:
            raise ConfigError("invalid teacher reward settings:\n" + "\n".join(f"  - {e}" for e in errors))
        base = {k: getattr(source, k) for k in cls.keys()} if source is not None else {}
        return cls(**{**base, **overrides})


def reduction_names(value: Any) -> list[str]:
    """A reduction key as a list of names: ``"mean"`` -> ``["mean"]`` (a single name is allowed from Python)."""
    return [value] if isinstance(value, str) else list(value or [])


def paired_coefficients(value: Any, n: int) -> list[float]:
    """A coefficient key as one float per reduction: a scalar multiplies each of the `n` reductions, a list is
    paired elementwise with them (checked by `TeacherRewardSection.problems`).

    >>> paired_coefficients(3, 2), paired_coefficients([1, 0.01], 2)
    ([3.0, 3.0], [1.0, 0.01])
    """
    return [float(value)] * n if is_number(value) else [float(v) for v in value]


def _coefficient_problems(coeff: str, value: Any, reductions: str, names: Any) -> list[str]:
    errors: list[str] = []
    names = reduction_names(names)
    if not names:
        errors.append(f"{reductions} must name at least one reduction out of {list(REDUCTIONS)}")
    for name in names:
        one_of(errors, reductions, name, REDUCTIONS)
    if isinstance(value, list | tuple):
        if not all(is_number(v) and math.isfinite(v) for v in value):
            errors.append(f"{coeff}={value} must be a number or a list of numbers")
        elif len(value) != len(names):
            errors.append(f"{coeff} has {len(value)} entries but {reductions}={names} has {len(names)}: a list "
                          "coefficient is paired elementwise with the reductions; give one per reduction, or a scalar")
    elif not is_number(value) or not math.isfinite(value):
        errors.append(f"{coeff}={value!r} must be a number or a list of numbers")
    return errors


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else f" (the keys: {', '.join(known)})"


@dataclass
class RLTSection:
    """The student, offloading and what an RLT run records (`trainer_cfg/teacher_grpo.yaml`); rlt-spec §2-3."""

    student_model: str | None = None  # null = the reference model (the initial teacher), as in the reference
    offload_untrained_models: bool = True  # student and reference model on CPU except for their forwards (GPU)
    use_reference_teacher_model: bool = False  # q_k from the reference model (initial / synced teacher), not policy
    save_completions_probability: float = 0.0  # sample (prompt, completion, reward) rows to stored_completions/
    logging_prob: float = 0.1  # sample student chats to teacher_chats/log.txt

    def problems(self) -> list[str]:
        errors: list[str] = []
        in_unit_interval(errors, "save_completions_probability", self.save_completions_probability, closed=True)
        in_unit_interval(errors, "logging_prob", self.logging_prob, closed=True)
        return errors


@dataclass
class RLTRunConfig(RunSection, ModelSection, DataSection, OptimSection, GRPOSection, RLTSection, TeacherRewardSection):
    """Every key of an RLT teacher run (`trainer_cfg=teacher_grpo`)."""

    def problems(self) -> list[str]:
        errors = section_problems(self)
        if self.data_format != "teacher":
            errors.append(f"data_format={self.data_format!r}: RLT trains on teacher prompts (data_format=teacher)")
        if self.early_stopping_patience is not None:
            errors.append("early_stopping_patience is not supported for RLT (there is no eval loss to watch)")
        if self.use_reference_teacher_model and (self.beta == 0 or self.use_peft):
            errors.append(f"use_reference_teacher_model=true needs TRL's reference model: beta > 0 (got {self.beta}) "
                          f"and use_peft=false (got {str(self.use_peft).lower()})")
        return errors
