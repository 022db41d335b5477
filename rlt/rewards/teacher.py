"""The RLT teacher reward, `TeacherKLReward`: how well a frozen student reproduces the solution after reading the
teacher's explanation, minus how far the explanation is from what the student would have thought itself.

The definition (spans from the sampled ids, reductions, penalties, logged terms) is in docs/rlt.md "Reward"; its
keys, defaults and checks are `rlt.config.TeacherRewardSection`; the batched forwards are `rlt.rewards.scoring`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from rlt.config import REDUCTIONS, TeacherRewardSection, paired_coefficients, reduction_names
from rlt.data.teacher import get_teacher_format, student_chat_parts
from rlt.errors import ConfigError
from rlt.models import embedding_rows
from rlt.rewards.scoring import TokenScorer, is_partitioned
from rlt.rewards.teacher_math import normalize_values, reduce_values, schulman_k3

logger = logging.getLogger(__name__)


class Spans(NamedTuple):
    """One completion as the two models score it: both score the same explanation tokens (docs/rlt.md)."""

    student_ids: list[int]  # student chat up to think_open + padding, explanation body, tail (close, solution)
    student_start: int  # first scored student position: the explanation span (padding tokens, then the body)
    teacher_ids: list[int]  # teacher prompt (ending with explanation_open + padding) + explanation body
    teacher_start: int
    n_pad: int  # padding tokens that open the explanation span: prompt tokens in both sequences
    n_body: int  # sampled explanation tokens, wholly before the close tag
    solution: tuple[int, int]  # [lo, hi) of the solution tokens, counted from the end of the explanation span
    closed: bool  # the close tag was sampled
    blank: bool  # the explanation is nothing but whitespace

    @property
    def n_explanation(self) -> int:
        return self.n_pad + self.n_body


@dataclass
class Terms:
    """One completion's reward and its parts; a call logs the mean of each as ``teacher_kl/<name>``."""

    reward: float  # total_teacher_likelihood_reward, or no_entropy_reward without the teacher term
    log_prob_term: float  # sum_j a_j R_j(solution log-probs), NaN reductions filled with p
    kl_term: float  # sum_j b_j R_j(q_k - s_k), NaN reductions filled with -p; 0 when off or blank
    match_reward: float  # p if not closed, + p if blank
    total_teacher_likelihood_reward: float
    no_entropy_kl_term: float  # the KL term of -s_k (the teacher term dropped)
    no_entropy_reward: float
    unclosed: float
    blank: float
    explanation_tokens: float
    solution_tokens: float
    teacher_think_log_prob_mean: float
    student_think_log_prob_mean: float
    reductions: dict[str, float]  # log_prob_<r>, kl_<r>, no_entropy_kl_<r>; raw statistics *_raw_<every r>

    def as_dict(self) -> dict[str, float]:
        values = {k: float(v) for k, v in vars(self).items() if k != "reductions"}
        return {**values, **self.reductions}


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class TeacherKLReward:
    """TRL reward callable for RLT teachers (docs/rlt.md "Reward").

    Args:
        student_model: the frozen student (same tokenizer/vocabulary as the teacher), put in eval mode with
            gradients off; may be None and set later (`set_student_model`: the trainer's reference model).
        tokenizer: the policy's tokenizer (fast, with a chat template).
        teacher_model: the model whose log-probs give ``q_k``: the current policy (or the reference model); may be
            set later with `set_teacher_model` (TRL does not pass models to reward functions).
        settings: where the reward keys come from (a run config or a `TeacherRewardSection`; None = the schema's
            defaults); ``**keys`` override single keys (``answer_log_prob_coeff=[1, 0.01]``). Checked by
            `TeacherRewardSection.problems`, like a run config's.
        teacher_format: `TeacherFormat`, a style name or a mapping of its fields: the format the RL prompts were
            built with (checked against the rows' ``teacher_format`` column).
        temperature: the teacher's sampling temperature, tau_T of ``unbias_teacher_log_probs``.
        share_prefixes: score the completions of one prompt on one forward of their common prefix.
        offload_untrained_models: keep the student on CPU between calls, on the scoring device during one.
        device: the scoring device; default the teacher's device, else the student's.
    """

    settings_type = TeacherRewardSection  # `rlt.config` checks reward_funcs kwargs of this class against it

    def __init__(self, student_model, tokenizer, teacher_model=None, *, settings=None, teacher_format=None,
                 temperature: float = 1.0, share_prefixes: bool = True, offload_untrained_models: bool = False,
                 device: str | torch.device | None = None, **keys: Any) -> None:
        self.__name__ = "teacher_kl"
        if tokenizer is None:
            raise ConfigError("TeacherKLReward needs the policy's tokenizer")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("TeacherKLReward needs a fast tokenizer (offset mappings locate the solution span)")
        if not isinstance(temperature, numbers.Real) or temperature <= 0:
            raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
        self.tokenizer = tokenizer
        self.fmt = get_teacher_format(teacher_format)
        self.settings = s = TeacherRewardSection.of(settings, **keys)

        self.reduction_log_prob_fn = reduction_names(s.reduction_log_prob_fn)
        self.reduction_kl_fn = reduction_names(s.reduction_kl_fn)
        self.lp_coeffs = paired_coefficients(s.answer_log_prob_coeff, len(self.reduction_log_prob_fn))
        self.kl_coeffs = paired_coefficients(s.kl_penalty_reward_coeff, len(self.reduction_kl_fn))
        if isinstance(s.kl_penalty_reward_coeff, numbers.Real) and s.kl_penalty_reward_coeff < 0:
            logger.warning("kl_penalty_reward_coeff=%s is negative: the reward favours explanations the student "
                           "would NOT have produced", s.kl_penalty_reward_coeff)
        self.kl_active = any(c != 0 for c in self.kl_coeffs)
        self.normalize_log_prob_fn = s.normalize_log_prob_fn or "none"
        self.normalize_kl_fn = s.normalize_kl_fn or "none"
        self.clip_log_prob = None if s.clip_log_prob is None else float(s.clip_log_prob)
        self.clip_kl = None if s.clip_kl is None else float(s.clip_kl)
        self.use_schulman_kl_estimation = bool(s.use_schulman_kl_estimation)
        self.not_matched_penalty = float(s.not_matched_penalty)
        self.temperature = float(temperature)
        self.teacher_temperature = self.temperature if s.unbias_teacher_log_probs else 1.0
        self.student_temperature = 1.0 if s.unbias_student_log_probs_temp is None else float(
            s.unbias_student_log_probs_temp)
        self.include_teacher_think_entropy = bool(s.include_teacher_think_entropy)
        self.reuse_sampling_logprobs = bool(s.teacher_reuse_sampling_logprobs)
        self.offload_untrained_models = bool(offload_untrained_models)
        self.device = torch.device(device) if device is not None else None

        self.student_model = None
        self.set_student_model(student_model)
        self.teacher_model = teacher_model
        self._offload_teacher = False
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id or 0
        self.scorer = TokenScorer(pad_token_id=self.pad_token_id, batch_size=s.teacher_reward_batch_size,
                                  share_prefixes=bool(share_prefixes),
                                  tokens_per_forward=s.teacher_reward_tokens_per_forward)
        self._special_ids = set(tokenizer.all_special_ids)
        self.last_terms: dict[str, list[float]] = {}  # the last call's `Terms`, one list per name
        self._student_heads: dict[tuple[str, str], tuple[list[int], str]] = {}
        self._prompt_ids: dict[str, list[int]] = {}
        self.last_reused_sampling_logprobs = 0  # rows of the last call whose q_k came from the generator

    @classmethod
    def from_run(cls, run, *, student_model, tokenizer, teacher_model=None, offload_untrained_models=None,
                 **keys: Any) -> TeacherKLReward:
        """The reward a validated RLT run config describes: its reward keys, teacher format, sampling temperature
        and offloading; the generator's log-probs are not reused for a run whose q_k come from the reference model
        (``use_reference_teacher_model``). ``keys`` override reward keys (a `reward_funcs` entry's kwargs)."""
        keys.setdefault("teacher_reuse_sampling_logprobs",
                        run.teacher_reuse_sampling_logprobs and not run.use_reference_teacher_model)
        offload = run.offload_untrained_models if offload_untrained_models is None else offload_untrained_models
        return cls(student_model, tokenizer, teacher_model, settings=run, teacher_format=run.teacher_format,
                   temperature=run.temperature, offload_untrained_models=offload, **keys)

    # --------------------------------------------------------------------------------------------------- setup

    def set_student_model(self, student_model, *, offload: bool | None = None) -> None:
        """Set the frozen student (eval mode, no gradients). It may be None at construction when the trainer's
        reference model becomes the student later (rlt-spec §3.7: `student_model: null`); a shared reference model
        stays where the trainer keeps it (`offload=False`)."""
        if student_model is None:
            return
        vocab_rows = embedding_rows(student_model)
        if vocab_rows < len(self.tokenizer):
            raise ConfigError(f"the student's embedding has {vocab_rows} rows but the tokenizer has "
                              f"{len(self.tokenizer)} tokens: the student must share the teacher's tokenizer")
        self.student_model = student_model
        student_model.requires_grad_(False)
        student_model.eval()
        self._offload_student = self.offload_untrained_models if offload is None else offload
        if self._offload_student:
            student_model.to("cpu")

    def set_teacher_model(self, teacher_model, *, offload: bool = False) -> None:
        """Link the model that scores the explanation (the RLT policy, or the reference model); TRL does not pass it
        to reward functions. `offload`: the model waits on CPU between calls (an offloaded reference model) and is
        moved to the scoring device for its forward."""
        self.teacher_model = teacher_model
        self._offload_teacher = offload

    @property
    def needs_teacher_forward(self) -> bool:
        return self.kl_active and self.include_teacher_think_entropy

    @property
    def uses_sampling_logprobs(self) -> bool:
        """Whether the generator's sampling log-probs would replace a teacher forward (the trainer records them
        during HF generation only for rewards that say so)."""
        return self.reuse_sampling_logprobs and self.needs_teacher_forward

    @staticmethod
    @contextlib.contextmanager
    def _placed(model, device: torch.device, offload: bool):
        """`model` on `device` for the block; back on CPU afterwards if it is `offload`ed."""
        moved = _model_device(model) != device
        if moved:
            model.to(device)
        try:
            yield
        finally:
            if moved and offload:
                model.to("cpu")

    def _scoring_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        if self.teacher_model is not None:
            return _model_device(self.teacher_model)
        return _model_device(self.student_model)

    # ------------------------------------------------------------------------------------------------ parsing

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _split_explanation(self, ids: list[int]) -> tuple[list[int], str, bool, str]:
        """``(body_ids, leftover_text, closed, explanation_text)`` of completion ids (trailing special tokens
        already removed); ``explanation_text`` = decoded body + leftover."""
        close = self.fmt.explanation_close
        text = self._decode(ids)
        pos = text.find(close)
        if pos < 0:
            return ids, "", False, text
        lo, hi = 0, len(ids)  # invariant: close not in decode(ids[:lo]) (or lo == 0), close in decode(ids[:hi])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if close in self._decode(ids[:mid]):
                hi = mid
            else:
                lo = mid
        k = hi - 1  # ids[hi - 1] completes the tag; step back to tokens wholly before it
        before = text[:pos]
        while k > 0 and not before.startswith(self._decode(ids[:k])):
            k -= 1
        return ids[:k], before[len(self._decode(ids[:k])):], True, before

    def _padding_tokens(self, student_head: list[int], teacher_prompt: list[int]) -> int:
        """How many trailing tokens the student head (``... think_open + padding``) and the teacher prompt
        (``... explanation_open + padding``) share that lie wholly inside the padding text: the explanation span
        starts with them (rlt-spec §1.5-1.6: the thought content includes its leading padding). A token fused with
        the tag (e.g. ``'|>\\n'``) is not part of it, as the reference's boundary trimming drops it. Example:
        padding ``"\\n\\n"``, head ids ``[.., 7 '|>', 9 '\\n\\n']``, prompt ids ``[.., 7 '|>', 9 '\\n\\n']`` -> 1
        ('|>' is not inside the padding); head ``[.., 5 '|>\\n', 6 '\\n']`` and the same prompt -> 0 (6 != 9).
        """
        pad = self.fmt.delimiters_padding
        k = 0
        while k < min(len(student_head), len(teacher_prompt)) and student_head[-k - 1] == teacher_prompt[-k - 1]:
            text = self._decode(student_head[len(student_head) - k - 1:])
            if not text or not pad.endswith(text):
                break
            k += 1
        return k

    def _solution_span(self, tail_text: str, solution: str) -> tuple[list[int], int, int]:
        """Token ids of `tail_text` and the ``[start, end)`` token range lying wholly inside the padded solution."""
        enc = self.tokenizer(tail_text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        block = self.fmt.solution_block(solution)
        where = tail_text.rfind(block)
        if where < 0 or not solution.strip():
            return ids, 0, 0
        lo = where + len(self.fmt.solution_open)
        hi = lo + len(self.fmt.pad(solution))
        inside = [t for t, (a, b) in enumerate(offsets) if a >= lo and b <= hi and b > a]
        if not inside:
            return ids, 0, 0
        return ids, inside[0], inside[-1] + 1

    def _run(self, model, seqs, starts, temperature, device) -> list[torch.Tensor]:
        """Log-probs of ``seq[start:]`` of each sequence under `model` (`rlt.rewards.scoring.TokenScorer`)."""
        return self.scorer.logprobs(model, seqs, starts, temperature, device)

    def _reusable_sampling_logprobs(self, sampling_logprobs, sampling_temperature, i: int,
                                    n_body: int) -> torch.Tensor | None:
        """Row `i`'s generator log-probs of its `n_body` explanation tokens as ``q_k`` (float32), or None where they
        cannot stand in for the teacher forward (reuse off, none given, another temperature, missing/non-finite)."""
        if not self.reuse_sampling_logprobs or sampling_logprobs is None or sampling_temperature is None:
            return None
        temp = sampling_temperature if isinstance(sampling_temperature, numbers.Real) else sampling_temperature[i]
        values = sampling_logprobs[i]
        if values is None or len(values) < n_body or abs(float(temp) - self.teacher_temperature) > 1e-6:
            return None
        values = list(values[:n_body])
        if any(v is None for v in values):
            return None
        q_k = torch.tensor(values, dtype=torch.float32)
        return q_k if bool(torch.isfinite(q_k).all()) else None

    def _teacher_logprobs(self, prompts, spans: list[Spans], sampling_logprobs, sampling_temperature,
                          device) -> tuple[list[torch.Tensor | None], int]:
        """``q_k`` per row (None for a blank or empty explanation) and how many rows took the generator's sampling
        log-probs. A reused row still needs its padding tokens scored (prompt tokens the generator does not score):
        one prefill per distinct prompt; every other row is scored whole by the teacher forward."""
        n = len(prompts)
        teacher_lp: list[torch.Tensor | None] = [None] * n
        rows = [i for i in range(n) if spans[i].n_explanation > 0 and not spans[i].blank]
        sampled = {i: self._reusable_sampling_logprobs(sampling_logprobs, sampling_temperature, i, spans[i].n_body)
                   for i in rows if spans[i].n_body}
        sampled = {i: q for i, q in sampled.items() if q is not None}
        forward = [i for i in rows if i not in sampled]
        pad_only: dict[str, int] = {}
        for i in sampled:
            if spans[i].n_pad:
                pad_only.setdefault(prompts[i], i)
        seqs = [spans[i].teacher_ids for i in forward] + [
            spans[i].teacher_ids[:spans[i].teacher_start + spans[i].n_pad] for i in pad_only.values()]
        starts = [spans[i].teacher_start for i in forward] + [spans[i].teacher_start for i in pad_only.values()]
        if seqs and self.teacher_model is None:
            raise ConfigError("TeacherKLReward has no teacher model: pass teacher_model=... or call "
                              "set_teacher_model(trainer.model) before training (or set kl_penalty_reward_coeff to 0)")
        scored: list[torch.Tensor] = []
        # a partitioned teacher runs on every rank, also with nothing to score here (see `_token_logprobs`)
        if seqs or (self.teacher_model is not None and is_partitioned(self.teacher_model)):
            with self._placed(self.teacher_model, device, self._offload_teacher):
                scored = self._run(self.teacher_model, seqs, starts, self.teacher_temperature, device)
        for i, lp in zip(forward, scored, strict=False):
            teacher_lp[i] = lp
        pad_lp = dict(zip(pad_only, scored[len(forward):], strict=True))
        for i, q_body in sampled.items():
            teacher_lp[i] = torch.cat([pad_lp[prompts[i]], q_body]) if spans[i].n_pad else q_body
        return teacher_lp, len(sampled)

    # ------------------------------------------------------------------------------------------------- scoring

    @staticmethod
    def _reduced(values: torch.Tensor, names: list[str], coeffs: list[float],
                 fill: float) -> tuple[list[float], float]:
        """The reductions of `values` and ``sum_j c_j * R_j``, a NaN/inf reduction (an empty span) counting as
        `fill` (rlt-spec §2: each NaN score is replaced before the coefficients weigh it)."""
        reductions = [reduce_values(values, n) for n in names]
        score = sum(c * (r if math.isfinite(r) else fill) for c, r in zip(coeffs, reductions, strict=True))
        return reductions, score

    def _lp_values(self, lp: torch.Tensor) -> torch.Tensor:
        lp = normalize_values(lp, self.normalize_log_prob_fn)
        return lp.clamp(min=-self.clip_log_prob) if self.clip_log_prob is not None else lp

    def _kl_values(self, d: torch.Tensor) -> torch.Tensor:
        if self.use_schulman_kl_estimation:
            d = schulman_k3(d)
        d = normalize_values(d, self.normalize_kl_fn)
        return d.clamp(max=self.clip_kl) if self.clip_kl is not None else d

    # ------------------------------------------------------------------------------------------------ a call

    def __call__(self, prompts: Sequence[str], completions: Sequence[str] | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, *, question: Sequence[str] | None = None,
                 solution: Sequence[str] | None = None, teacher_format: Sequence[str] | None = None,
                 sampling_logprobs: Sequence[Sequence[float | None] | None] | None = None,
                 sampling_temperature: Sequence[float] | float | None = None, log_metric=None,
                 **kwargs: Any) -> list[float]:
        """One reward per completion. ``question``/``solution``/``teacher_format`` are the RL dataset's columns
        (`rlt.data.teacher.teacher_rl_prompt`). ``sampling_logprobs`` (one list per completion, aligned with
        ``completion_ids``) and ``sampling_temperature`` (a float or one per completion) are what
        `rlt.trainers.GRPOTrainer` passes from its generator: with ``teacher_reuse_sampling_logprobs`` and the
        sampling temperature equal to tau_T they are ``q_k``, row by row (a row with a missing or non-finite value is
        scored by the teacher forward)."""
        completion_ids = self._checked_inputs(prompts, completions, completion_ids, question, solution,
                                              teacher_format)
        self._student_heads, self._prompt_ids = {}, {}  # tokenised once per call (the rows of a call share them)
        spans = [self._spans(prompts[i], completion_ids[i], question[i], solution[i]) for i in range(len(prompts))]
        self._student_heads, self._prompt_ids = {}, {}
        student_lp, teacher_lp, reused = self._score(prompts, spans, sampling_logprobs, sampling_temperature)
        terms = [self._terms(s, lp, q) for s, lp, q in zip(spans, student_lp, teacher_lp, strict=True)]
        self._log(terms, reused, log_metric)
        return [t.reward for t in terms]

    def _checked_inputs(self, prompts, completions, completion_ids, question, solution,
                        teacher_format) -> list[list[int]]:
        """The completion ids (tokenised from `completions` when not given), after the checks of a call's inputs."""
        n = len(prompts)
        if question is None or solution is None:
            raise ConfigError("TeacherKLReward needs the 'question' and 'solution' dataset columns (build the RL "
                              "dataset with rlt.data.teacher.prepare_teacher_datasets(mode='rl'))")
        if completion_ids is None and completions is None:
            raise ConfigError("TeacherKLReward needs completion_ids (or completions)")
        if len(question) != n or len(solution) != n:
            raise ConfigError(f"TeacherKLReward got {n} prompts but {len(question)} questions and {len(solution)} "
                              "solutions")
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError("TeacherKLReward expects plain-string prompts (non-conversational RL rows)")
        if teacher_format is not None:
            other = sorted({f for f in teacher_format if f != self.fmt.fingerprint})
            if other:
                raise ConfigError(f"the RL rows were built with teacher format(s) {other} but the reward uses "
                                  f"{self.fmt.fingerprint}: configure the same TeacherFormat for data and reward")
        if completion_ids is None:
            return [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        return [[int(t) for t in ids] for ids in completion_ids]

    def _spans(self, prompt: str, completion_ids: list[int], question: str, solution: str) -> Spans:
        """Step 1: the student and teacher sequences of one completion and the spans each model scores. Prompt
        tokens and the student chat's head are tokenised once per distinct prompt / (question, solution)."""
        ids = list(completion_ids)
        while ids and ids[-1] in self._special_ids:
            ids.pop()
        body, leftover, closed, explanation = self._split_explanation(ids)
        key = (question, solution)
        if key not in self._student_heads:
            head, tail = student_chat_parts(question, solution, self.fmt, self.tokenizer)
            # add_special_tokens=False like apply_chat_template(tokenize=True): the template has any bos
            head_ids = self.tokenizer(head + self.fmt.delimiters_padding, add_special_tokens=False)["input_ids"]
            self._student_heads[key] = (head_ids, tail)
        head_ids, tail = self._student_heads[key]
        tail_ids, sol_lo, sol_hi = self._solution_span(leftover + tail, solution)
        if prompt not in self._prompt_ids:  # tokenised as TRL tokenises plain-string prompts for generation
            self._prompt_ids[prompt] = self.tokenizer(text=prompt)["input_ids"]
        prompt_ids = self._prompt_ids[prompt]
        n_pad = self._padding_tokens(head_ids, prompt_ids)
        return Spans(student_ids=head_ids + body + tail_ids, student_start=len(head_ids) - n_pad,
                     teacher_ids=prompt_ids + body, teacher_start=len(prompt_ids) - n_pad, n_pad=n_pad,
                     n_body=len(body), solution=(sol_lo, sol_hi), closed=closed, blank=not explanation.strip())

    def _score(self, prompts, spans: list[Spans], sampling_logprobs,
               sampling_temperature) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int]:
        """Step 2: the student's log-probs from the explanation span on, the teacher's ``q_k`` (forward or the
        generator's), and how many rows reused the generator's."""
        device = self._scoring_device()
        student = self.student_model
        if student is None:
            raise ConfigError("TeacherKLReward has no student model: pass student_model=... or call "
                              "set_student_model(...) before training")
        with self._placed(student, device, self._offload_student):
            student_lp = self._run(student, [s.student_ids for s in spans], [s.student_start for s in spans],
                                   self.student_temperature, device)
        if not self.needs_teacher_forward:
            return student_lp, [None] * len(spans), 0
        teacher_lp, reused = self._teacher_logprobs(prompts, spans, sampling_logprobs, sampling_temperature, device)
        return student_lp, teacher_lp, reused

    def _terms(self, span: Spans, student_lp: torch.Tensor, q_k: torch.Tensor | None) -> Terms:
        """Step 3: one completion's reward and its parts from its log-probs (docs/rlt.md "Reward")."""
        p = self.not_matched_penalty
        nb, (lo, hi) = span.n_explanation, span.solution
        s_k, ell = student_lp[:nb], student_lp[nb + lo: nb + hi]
        lp_red, lp_term = self._reduced(self._lp_values(ell), self.reduction_log_prob_fn, self.lp_coeffs, p)
        kl_term = ne_term = 0.0
        teacher_mean = math.nan
        raw_kl = raw_ne = torch.empty(0)  # the unprocessed per-token values, for the raw statistics
        kl_red = [math.nan] * len(self.reduction_kl_fn)
        ne_red = list(kl_red)
        if self.kl_active and not span.blank:
            raw_ne = -s_k
            ne_red, ne_term = self._reduced(self._kl_values(raw_ne), self.reduction_kl_fn, self.kl_coeffs, -p)
            if self.needs_teacher_forward:
                q_k = q_k if q_k is not None else torch.empty(0)
                raw_kl = q_k - s_k  # one value per explanation-span token (empty span: every reduction filled)
                kl_red, kl_term = self._reduced(self._kl_values(raw_kl), self.reduction_kl_fn, self.kl_coeffs, -p)
                if q_k.numel():
                    teacher_mean = q_k.mean().item()
            else:
                kl_term = math.nan  # not computed (include_teacher_think_entropy=False)
        match = (p if not span.closed else 0.0) + (p if span.blank else 0.0)
        total, ne_total = lp_term - kl_term + match, lp_term - ne_term + match
        reductions = {}
        for stat in REDUCTIONS:  # the reference's unprocessed statistics (before normalisation and clipping)
            reductions[f"log_prob_raw_{stat}"] = reduce_values(ell, stat)
            reductions[f"kl_raw_{stat}"] = reduce_values(raw_kl, stat)
            reductions[f"no_entropy_kl_raw_{stat}"] = reduce_values(raw_ne, stat)
        reductions.update({f"log_prob_{name}": v for name, v in zip(self.reduction_log_prob_fn, lp_red, strict=True)})
        for name, value, ne_value in zip(self.reduction_kl_fn, kl_red, ne_red, strict=True):
            reductions[f"kl_{name}"], reductions[f"no_entropy_kl_{name}"] = value, ne_value
        return Terms(
            reward=total if self.include_teacher_think_entropy else ne_total, log_prob_term=lp_term,
            kl_term=kl_term, match_reward=match, total_teacher_likelihood_reward=total, no_entropy_kl_term=ne_term,
            no_entropy_reward=ne_total, unclosed=float(not span.closed), blank=float(span.blank),
            explanation_tokens=span.n_body, solution_tokens=hi - lo, teacher_think_log_prob_mean=teacher_mean,
            student_think_log_prob_mean=s_k.mean().item() if s_k.numel() and not span.blank else math.nan,
            reductions=reductions)

    def _log(self, terms: list[Terms], reused: int, log_metric) -> None:
        """Step 4: `last_terms` (one list per name) and the call's means to TRL's ``log_metric``."""
        columns: dict[str, list[float]] = {}
        for t in terms:
            for name, value in t.as_dict().items():
                columns.setdefault(name, []).append(value)
        self.last_terms = columns
        self.last_reused_sampling_logprobs = reused
        if log_metric is not None:
            log_metric("teacher_kl/reused_sampling_logprobs", reused / max(len(terms), 1))
            for name, values in columns.items():
                finite = [v for v in values if math.isfinite(v)]
                if finite:
                    log_metric(f"teacher_kl/{name}", sum(finite) / len(finite))
