"""The RLT teacher reward: how well a frozen student understands the solution after reading the teacher's explanation,
minus how far the explanation is from what the student would have thought itself.

For each teacher completion (the explanation the teacher wrote after ``explanation_open + padding``):

1. Spans come from the **sampled token ids**, not from re-tokenised text. The explanation body is every completion
   token that lies wholly before the first ``explanation_close`` (trailing special tokens such as eos are dropped
   first). A token that straddles the closing tag (e.g. ``".<|"``) is not in the body; its text before the tag is
   kept as "leftover" text and re-tokenised on the student side. No closing tag: the whole completion is the body and
   the explanation is closed for scoring.
2. Student sequence = tokens(student chat up to ``think_open + padding``) + body ids + tokens(leftover +
   ``think_close`` + delimiter + solution block + end of turn), i.e. `rlt.data.teacher.student_chat` of the
   explanation text ``padding + body + leftover``. The solution span is the tokens lying wholly inside the padded
   solution content (located with the tokenizer's offsets; the tags are not in it). Teacher sequence = tokens(prompt)
   (tokenised like TRL does) + body ids. The explanation span is the padding tokens that end both prefixes (those
   lying wholly inside the padding text; a token fused with the open tag is not) followed by the body ids, since the
   thought content includes its leading padding (rlt-spec §1.5-1.6). Both models therefore score exactly the same
   explanation tokens.
3. Batched forwards (`rlt.rewards.scoring.TokenScorer`: the completions of a prompt share one forward of their
   prefix, other sequences are length-sorted and left-padded, forwards bounded by ``tokens_per_forward``), logits
   only for the scored positions (``logits_to_keep``), ``log_softmax(logits / tau)`` in float32: student at
   ``tau_S = unbias_student_log_probs_temp`` (None -> 1) gives ``l`` (solution span) and ``s_k`` (explanation span),
   teacher at ``tau_T = temperature`` if ``unbias_teacher_log_probs`` (None -> True) else 1 gives ``q_k``.
4. ``d_k = q_k - s_k`` (with ``use_schulman_kl_estimation``: ``d_k + exp(-d_k) - 1``); the no-entropy twin uses
   ``-s_k`` in place of ``d_k`` (the same estimator transform applied with ``q_k = 0``). Per token: normalise
   (``none``/``exp``/``exp_norm`` = 1 - e^-x), then clip (log-probs below at ``-clip_log_prob``, KL values above at
   ``clip_kl``), then reduce (mean, sum, min, max, median, first_quartile, last_quartile; median is the lower
   median, as the reference's ``nanmedian``; the quartiles are linear-interpolation quantiles). A list coefficient
   is paired elementwise with the list of reductions, a scalar multiplies each of them; the weighted reductions are
   summed.

Final reward::

    r = sum_j a_j R^lp_j(l) - sum_j b_j R^kl_j(d) + r_format

Penalties (``p = not_matched_penalty``, -1 by default; every case below is the same sign convention in the
no-entropy twin):

* ``r_format`` (logged as ``match_reward``) = ``p`` if the explanation is not closed, plus ``p`` if it is blank (no
  token, or only whitespace).
* The KL term is 0 when the KL is off (every KL coefficient 0: the teacher forward is skipped) or the explanation is
  blank (the blank penalty above replaces it). Otherwise each reduction that is NaN/inf (an empty span, a NaN
  log-prob) counts as ``-p`` before its coefficient weighs it (rlt-spec §2), so the KL term is ``-p * sum_j b_j``
  when every reduction is.
* Likewise each NaN/inf reduction of the log-prob term counts as ``p`` (an empty solution span: ``p * sum_j a_j``).

With ``include_teacher_think_entropy=False`` the reward uses the no-entropy twin and the teacher forward is skipped
(only the twin is computed). `rlt.trainers.GRPOTrainer` passes the generator's sampling log-probs (vLLM, or
recorded during HF generate), which are ``q_k`` already when sampled at ``tau_T`` with plain tempered sampling: the
teacher forward is then skipped (``reuse_sampling_logprobs``; logged as ``teacher_kl/reused_sampling_logprobs``) but
for one prefill per distinct prompt that scores the padding tokens (they are prompt tokens, which the generator does
not score). Per-completion values of the last call are in `TeacherKLReward.last_terms`; call averages go to TRL's ``log_metric`` as ``teacher_kl/<name>``: the
terms, each configured reduction, and as the reference logs them the unprocessed statistics (every reduction, before
normalisation and clipping) of the solution log-probs (``log_prob_raw_<r>``), the per-token KL (``kl_raw_<r>``) and
its no-entropy twin ``-s_k`` (``no_entropy_kl_raw_<r>``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlt.data.teacher import TeacherFormat, get_teacher_format, student_chat_parts
from rlt.errors import ConfigError
from rlt.models import embedding_rows
from rlt.rewards.scoring import TokenScorer, is_partitioned
from rlt.rewards.teacher_math import NORMALIZATIONS, REDUCTIONS, normalize_values, reduce_values, schulman_k3

logger = logging.getLogger(__name__)


def _as_names(value: Any, what: str, allowed: Sequence[str]) -> list[str]:
    names = [value] if isinstance(value, str) else list(value) if value is not None else []
    if not names:
        raise ConfigError(f"{what} must name at least one reduction out of {list(allowed)}")
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"{what} has unknown reduction(s) {bad}; expected some of {list(allowed)}")
    return [str(n) for n in names]


def _as_coefficients(value: Any, n: int, what: str) -> tuple[list[float], bool]:
    """Coefficients paired with `n` reductions, and whether the config gave a scalar."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        coeffs, scalar = [float(value)] * n, True
    elif isinstance(value, str) or value is None:
        raise ConfigError(f"{what} must be a number or a list of numbers, got {value!r}")
    else:
        try:
            coeffs, scalar = [float(v) for v in value], False
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{what} must be a number or a list of numbers, got {value!r}") from e
        if len(coeffs) != n:
            raise ConfigError(f"{what} has {len(coeffs)} coefficient(s) but there are {n} reduction(s); a list "
                              "coefficient is paired elementwise with the list of reductions")
    if not all(math.isfinite(c) for c in coeffs):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return coeffs, scalar


def _normalization(value: Any, what: str) -> str:
    name = "none" if value is None else str(value)
    name = "none" if name in ("null", "None") else name
    if name not in NORMALIZATIONS:
        raise ConfigError(f"{what} must be one of {list(NORMALIZATIONS)} or null, got {value!r}")
    return name


def _clip_value(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} must be a positive number or null, got {value!r}")
    return float(value)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------- the reward


class TeacherKLReward:
    """TRL reward callable for RLT teachers (see the module docstring for the exact definition).

    The keyword defaults are the reference class's (``TeacherKLBasedReward``: a = b = 1, ``mean`` reductions,
    ``exp``/``exp_norm`` normalisation, no clipping), so a call ported from the reference gives the same numbers;
    the Hydra group ``reward_cfg/teacher_logprob_kl`` sets every key (the reference configs' values).

    Args:
        student_model: the frozen student (same tokenizer/vocabulary as the teacher). Put in eval mode with
            gradients off.
        tokenizer: the policy's tokenizer (fast tokenizer with a chat template).
        teacher_model: the model whose log-probs give ``q_k``; for RLT the current policy. May be set later with
            `set_teacher_model` (TRL does not pass the model to reward functions).
        teacher_format: `TeacherFormat`, a style name (``"stratos"``/``"r1"``) or a mapping of its fields; must be
            the format the RL prompts were built with (checked against the ``teacher_format`` column if present).
        answer_log_prob_coeff / reduction_log_prob_fn: ``a`` and the reductions of the student's solution log-probs.
        answer_log_prob_coeff: a scalar must be > 0 (as in the reference); a list (one per reduction) may hold
            zeros.
        kl_penalty_reward_coeff / reduction_kl_fn: ``b`` and the reductions of the per-token KL. All-zero -> the
            teacher forward is skipped; a negative scalar is allowed (it rewards divergence) with a warning.
        normalize_log_prob_fn / normalize_kl_fn: ``None``/``"none"``, ``"exp"`` or ``"exp_norm"``.
        clip_log_prob / clip_kl: clamp log-probs below at ``-clip_log_prob`` and KL values above at ``clip_kl``
            (after normalisation); ``None`` = no clipping.
        use_schulman_kl_estimation: k3 instead of k1 per-token estimate.
        not_matched_penalty: ``p`` in the penalties (negative = a penalty).
        unbias_teacher_log_probs: teacher at ``tau_T = temperature`` (None -> True) instead of 1.
        unbias_student_log_probs_temp: ``tau_S`` (None -> 1).
        include_teacher_think_entropy: False -> the reward uses ``-s_k`` instead of ``d_k`` (no teacher forward).
        temperature: the teacher's sampling temperature (pass the trainer's; TRL's default is 1.0).
        reuse_sampling_logprobs: when the trainer passes the generator's sampling log-probs (`rlt.trainers`:
            vLLM or HF generation, plain tempered sampling) at ``tau_T``, use them as ``q_k`` instead of a teacher
            forward; rows whose log-probs are missing or non-finite are still scored by the forward.
        batch_size: sequences per scoring forward.
        share_prefixes: score the completions of one prompt on one forward of their common prefix (the teacher
            prompt; the student's system prompt + question), shared through the KV cache.
        tokens_per_forward: at most this many input positions (rows × positions) per scoring forward; longer
            batches run in several forwards on the KV cache, so the logits and a layer's activations stay bounded
            (8192 × a 152k vocabulary in bf16: 2.5 GB of logits) whatever the sequence length.
        offload_untrained_models: keep the student on CPU between calls, moved to the scoring device for a call.
        device: scoring device; default the teacher's device, else the student's current device.
    """

    def __init__(
        self,
        student_model,
        tokenizer,
        teacher_model=None,
        *,
        teacher_format: TeacherFormat | str | Mapping[str, Any] | None = None,
        answer_log_prob_coeff: float | Sequence[float] = 1.0,
        kl_penalty_reward_coeff: float | Sequence[float] = 1.0,
        reduction_log_prob_fn: str | Sequence[str] = "mean",
        reduction_kl_fn: str | Sequence[str] = "mean",
        normalize_log_prob_fn: str | None = "exp",
        normalize_kl_fn: str | None = "exp_norm",
        clip_log_prob: float | None = None,
        clip_kl: float | None = None,
        use_schulman_kl_estimation: bool = False,
        not_matched_penalty: float = -1.0,
        unbias_teacher_log_probs: bool | None = None,
        unbias_student_log_probs_temp: float | None = None,
        include_teacher_think_entropy: bool | None = None,
        temperature: float = 1.0,
        reuse_sampling_logprobs: bool = True,
        batch_size: int = 8,
        share_prefixes: bool = True,
        tokens_per_forward: int = 8192,
        offload_untrained_models: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        self.__name__ = "teacher_kl"
        if tokenizer is None:
            raise ConfigError("TeacherKLReward needs the policy's tokenizer")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("TeacherKLReward needs a fast tokenizer (offset mappings locate the solution span)")
        self.tokenizer = tokenizer
        self.fmt = get_teacher_format(teacher_format)

        self.reduction_log_prob_fn = _as_names(reduction_log_prob_fn, "reduction_log_prob_fn", REDUCTIONS)
        self.reduction_kl_fn = _as_names(reduction_kl_fn, "reduction_kl_fn", REDUCTIONS)
        self.lp_coeffs, lp_scalar = _as_coefficients(answer_log_prob_coeff, len(self.reduction_log_prob_fn),
                                                     "answer_log_prob_coeff")
        if lp_scalar and self.lp_coeffs[0] <= 0:
            raise ConfigError(f"a scalar answer_log_prob_coeff must be > 0 (the solution log-prob term is the reward's "
                              f"signal), got {answer_log_prob_coeff!r}; to switch the term off deliberately give one "
                              f"zero per reduction, e.g. {[0.0] * len(self.reduction_log_prob_fn)}")
        self.kl_coeffs, kl_scalar = _as_coefficients(kl_penalty_reward_coeff, len(self.reduction_kl_fn),
                                                     "kl_penalty_reward_coeff")
        if kl_scalar and self.kl_coeffs[0] < 0:
            logger.warning("kl_penalty_reward_coeff=%s is negative: the reward favours explanations the student "
                           "would NOT have produced", kl_penalty_reward_coeff)
        self.kl_active = any(c != 0 for c in self.kl_coeffs)
        self.normalize_log_prob_fn = _normalization(normalize_log_prob_fn, "normalize_log_prob_fn")
        self.normalize_kl_fn = _normalization(normalize_kl_fn, "normalize_kl_fn")
        self.clip_log_prob = _clip_value(clip_log_prob, "clip_log_prob")
        self.clip_kl = _clip_value(clip_kl, "clip_kl")
        self.use_schulman_kl_estimation = bool(use_schulman_kl_estimation)
        if not isinstance(not_matched_penalty, numbers.Real) or not math.isfinite(not_matched_penalty):
            raise ConfigError(f"not_matched_penalty must be a finite number, got {not_matched_penalty!r}")
        self.not_matched_penalty = float(not_matched_penalty)
        if not isinstance(temperature, numbers.Real) or temperature <= 0:
            raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.unbias_teacher_log_probs = True if unbias_teacher_log_probs is None else bool(unbias_teacher_log_probs)
        self.teacher_temperature = self.temperature if self.unbias_teacher_log_probs else 1.0
        self.reuse_sampling_logprobs = bool(reuse_sampling_logprobs)
        if unbias_student_log_probs_temp is not None and (
                not isinstance(unbias_student_log_probs_temp, numbers.Real) or unbias_student_log_probs_temp <= 0):
            raise ConfigError(f"unbias_student_log_probs_temp must be a positive number or null, got "
                              f"{unbias_student_log_probs_temp!r}")
        self.student_temperature = 1.0 if unbias_student_log_probs_temp is None else float(unbias_student_log_probs_temp)
        self.include_teacher_think_entropy = True if include_teacher_think_entropy is None else bool(
            include_teacher_think_entropy)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(tokens_per_forward, int) or isinstance(tokens_per_forward, bool) or tokens_per_forward < 1:
            raise ConfigError(f"tokens_per_forward must be a positive integer, got {tokens_per_forward!r}")
        self.offload_untrained_models = bool(offload_untrained_models)
        self.device = torch.device(device) if device is not None else None

        self.student_model = None
        self.set_student_model(student_model)
        self.teacher_model = teacher_model
        self._offload_teacher = False
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.scorer = TokenScorer(pad_token_id=self.pad_token_id, batch_size=batch_size,
                                  share_prefixes=bool(share_prefixes), tokens_per_forward=tokens_per_forward)
        self._special_ids = set(tokenizer.all_special_ids)
        self.last_terms: dict[str, list[float]] = {}
        self.last_reused_sampling_logprobs = 0  # rows of the last call whose q_k came from the generator

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

    def _teacher_logprobs(self, prompts, info, t_seqs, t_starts, sampling_logprobs, sampling_temperature,
                          device) -> tuple[list[torch.Tensor | None], int]:
        """``q_k`` per row (None for a blank or empty explanation) and how many rows took the generator's sampling
        log-probs. A reused row still needs its padding tokens scored (prompt tokens the generator does not score):
        one prefill per distinct prompt; every other row is scored whole by the teacher forward."""
        n = len(prompts)
        teacher_lp: list[torch.Tensor | None] = [None] * n
        rows = [i for i in range(n) if info[i]["n_pad"] + info[i]["n_body"] > 0 and not info[i]["blank"]]
        sampled = {i: self._reusable_sampling_logprobs(sampling_logprobs, sampling_temperature, i, info[i]["n_body"])
                   for i in rows if info[i]["n_body"]}
        sampled = {i: q for i, q in sampled.items() if q is not None}
        forward = [i for i in rows if i not in sampled]
        pad_only: dict[str, int] = {}
        for i in sampled:
            if info[i]["n_pad"]:
                pad_only.setdefault(prompts[i], i)
        seqs = [t_seqs[i] for i in forward] + [t_seqs[i][:t_starts[i] + info[i]["n_pad"]] for i in pad_only.values()]
        starts = [t_starts[i] for i in forward] + [t_starts[i] for i in pad_only.values()]
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
            teacher_lp[i] = torch.cat([pad_lp[prompts[i]], q_body]) if info[i]["n_pad"] else q_body
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

    def __call__(self, prompts: Sequence[str], completions: Sequence[str] | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, *, question: Sequence[str] | None = None,
                 solution: Sequence[str] | None = None, teacher_format: Sequence[str] | None = None,
                 sampling_logprobs: Sequence[Sequence[float | None] | None] | None = None,
                 sampling_temperature: Sequence[float] | float | None = None, log_metric=None,
                 **kwargs: Any) -> list[float]:
        """One reward per completion. ``question``/``solution``/``teacher_format`` are the RL dataset's columns
        (`rlt.data.teacher.teacher_rl_prompt`). ``sampling_logprobs`` (one list per completion, aligned with
        ``completion_ids``) and ``sampling_temperature`` (a float or one per completion) are what
        `rlt.trainers.GRPOTrainer` passes from its generator (vLLM, or HF generate with a recorder): with
        ``reuse_sampling_logprobs`` on and the sampling temperature equal to ``tau_T`` they are ``q_k``, row by row (a row with a missing or non-finite
        value is scored by the teacher forward)."""
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
            completion_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        p = self.not_matched_penalty

        # ---- sequences and spans
        prompt_cache: dict[str, list[int]] = {}
        student_cache: dict[tuple[str, str], tuple[list[int], str]] = {}
        s_seqs, s_starts, t_seqs, t_starts, info = [], [], [], [], []
        for i in range(n):
            ids = [int(t) for t in completion_ids[i]]
            while ids and ids[-1] in self._special_ids:
                ids.pop()
            body, leftover, closed, explanation = self._split_explanation(ids)
            blank = not explanation.strip()
            key = (question[i], solution[i])
            if key not in student_cache:
                head, tail = student_chat_parts(question[i], solution[i], self.fmt, self.tokenizer)
                # add_special_tokens=False like apply_chat_template(tokenize=True): the template has any bos
                head_ids = self.tokenizer(head + self.fmt.delimiters_padding, add_special_tokens=False)["input_ids"]
                student_cache[key] = (head_ids, tail)
            head_ids, tail = student_cache[key]
            tail_ids, sol_lo, sol_hi = self._solution_span(leftover + tail, solution[i])
            if prompts[i] not in prompt_cache:  # tokenised as TRL tokenises plain-string prompts for generation
                prompt_cache[prompts[i]] = self.tokenizer(text=prompts[i])["input_ids"]
            prompt_ids = prompt_cache[prompts[i]]
            n_pad = self._padding_tokens(head_ids, prompt_ids)
            s_seqs.append(head_ids + body + tail_ids)
            s_starts.append(len(head_ids) - n_pad)
            t_seqs.append(prompt_ids + body)
            t_starts.append(len(prompt_ids) - n_pad)
            info.append(dict(n_body=len(body), n_pad=n_pad, sol=(sol_lo, sol_hi), closed=closed, blank=blank))

        # ---- forwards
        device = self._scoring_device()
        student = self.student_model
        if student is None:
            raise ConfigError("TeacherKLReward has no student model: pass student_model=... or call "
                              "set_student_model(...) before training")
        with self._placed(student, device, self._offload_student):
            student_lp = self._run(student, s_seqs, s_starts, self.student_temperature, device)
        teacher_lp, reused = ([None] * n, 0) if not self.needs_teacher_forward else self._teacher_logprobs(
            prompts, info, t_seqs, t_starts, sampling_logprobs, sampling_temperature, device)

        # ---- terms
        terms: dict[str, list[float]] = {}

        def put(name: str, value: float) -> None:
            terms.setdefault(name, []).append(float(value))

        rewards = []
        for i in range(n):
            nb, (lo, hi) = info[i]["n_pad"] + info[i]["n_body"], info[i]["sol"]  # nb: the explanation span
            lp_all = student_lp[i]
            s_k, ell = lp_all[:nb], lp_all[nb + lo: nb + hi]
            lp_red, lp_term = self._reduced(self._lp_values(ell), self.reduction_log_prob_fn, self.lp_coeffs, p)
            blank = info[i]["blank"]
            kl_term = ne_term = 0.0
            teacher_mean = math.nan
            raw_kl = raw_ne = torch.empty(0)  # the unprocessed per-token values, for the raw statistics
            kl_red = [math.nan] * len(self.reduction_kl_fn)
            ne_red = list(kl_red)
            if self.kl_active and not blank:
                raw_ne = -s_k
                ne_red, ne_term = self._reduced(self._kl_values(raw_ne), self.reduction_kl_fn, self.kl_coeffs, -p)
                if self.needs_teacher_forward:
                    q_k = teacher_lp[i] if teacher_lp[i] is not None else torch.empty(0)
                    raw_kl = q_k - s_k  # one value per explanation-span token (empty span: every reduction filled)
                    kl_red, kl_term = self._reduced(self._kl_values(raw_kl), self.reduction_kl_fn, self.kl_coeffs, -p)
                    if q_k.numel():
                        teacher_mean = q_k.mean().item()
                else:
                    kl_term = math.nan  # not computed (include_teacher_think_entropy=False)
            match = (p if not info[i]["closed"] else 0.0) + (p if blank else 0.0)
            total = lp_term - kl_term + match
            ne_total = lp_term - ne_term + match
            reward = total if self.include_teacher_think_entropy else ne_total
            rewards.append(reward)
            put("reward", reward)
            put("log_prob_term", lp_term)
            put("kl_term", kl_term)
            put("match_reward", match)
            put("total_teacher_likelihood_reward", total)
            put("no_entropy_kl_term", ne_term)
            put("no_entropy_reward", ne_total)
            put("unclosed", float(not info[i]["closed"]))
            put("blank", float(blank))
            put("explanation_tokens", info[i]["n_body"])
            put("solution_tokens", hi - lo)
            for stat in REDUCTIONS:  # the reference's unprocessed statistics (before normalisation and clipping)
                put(f"log_prob_raw_{stat}", reduce_values(ell, stat))
                put(f"kl_raw_{stat}", reduce_values(raw_kl, stat))
                put(f"no_entropy_kl_raw_{stat}", reduce_values(raw_ne, stat))
            put("teacher_think_log_prob_mean", teacher_mean)
            put("student_think_log_prob_mean", s_k.mean().item() if s_k.numel() and not blank else math.nan)
            for name, value in zip(self.reduction_log_prob_fn, lp_red, strict=True):
                put(f"log_prob_{name}", value)
            for name, value, ne_value in zip(self.reduction_kl_fn, kl_red, ne_red, strict=True):
                put(f"kl_{name}", value)
                put(f"no_entropy_kl_{name}", ne_value)
        self.last_terms = terms
        self.last_reused_sampling_logprobs = reused
        if log_metric is not None:
            log_metric("teacher_kl/reused_sampling_logprobs", reused / max(n, 1))
            for name, values in terms.items():
                finite = [v for v in values if math.isfinite(v)]
                if finite:
                    log_metric(f"teacher_kl/{name}", sum(finite) / len(finite))
        return rewards
