"""`GRPOTrainer`: TRL 1.16's GRPOTrainer with eight additions, numbered as in docs/grpo.md ("What our trainer does
that plain TRL does not"): fewer forwards (1, 6, 7), sampling log-probs for rewards (2), a reference model that is
checkpointed when synced (3), can live on CPU (4) and has the policy's vocabulary (5), and asynchronous generation
with vLLM servers (8). The TRL internals it overrides and swaps are listed in `rlt.trl_patches`, checked when this
module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
from accelerate.utils.memory import clear_device_cache
from trl import GRPOTrainer as TRLGRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import nanmax, nanmin

from rlt.checkpoints import save_marked_then_rotated
from rlt.config import IS_MODES, logit_processing
from rlt.generation.hf_logprobs import SamplingLogprobRecorder
from rlt.models import match_vocabulary
from rlt.trl_patches import check_trl, swapped

log = logging.getLogger(__name__)

check_trl()  # the recipes import this module before any model loads: a TRL we cannot patch stops the run here

# the synced reference model (`sync_ref_model`) inside a checkpoint: TRL mixes it in place and rebuilds it from the
# policy's path at start-up, so without this file a resumed run would compare with the initial policy again
REF_MODEL_FILE = "ref_model.safetensors"


def importance_sampling_ratio(train_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, *,
                              mode: str, clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """TRL's vLLM importance-sampling correction ``exp(log p_train - log p_sampling)``, per token or per sequence.

    `train_logps`, `sampling_logps`, `mask`: (B, T). Masked-out tokens and tokens whose sampling log-prob is NaN
    contribute a difference of 0. ``token_*`` modes give (B, T), ``sequence_*`` modes (B, 1) from the summed
    difference. ``*_truncate`` clamps into [clip_min, clip_max]; ``*_mask`` zeroes ratios outside it (None = no bound).

    Worked example (one sequence, mask [1, 1, 0]): train [-1.0, -2.0, -9.0], sampling [-1.5, -2.0, nan]
    -> differences [0.5, 0.0, 0.0]. token_truncate, clip_max 1.5: [min(e^0.5, 1.5), 1, 1] = [1.5, 1.0, 1.0]
    (e^0.5 = 1.6487). token_mask, clip_max 1.5: [0.0, 1.0, 1.0]. sequence_truncate, clip_max 3: [[e^0.5]] = [[1.6487]];
    sequence_mask, clip_max 1.5: [[0.0]].
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}; expected one of {list(IS_MODES)}")
    diff = torch.nan_to_num((train_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        return ratio
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def plain_tempered_sampling(args) -> bool:
    """Whether the generator's sampling log-probs are ``log_softmax(logits / temperature)`` for these GRPOConfig
    sampling settings (`rlt.config.logit_processing`), with a generator that can return them (vLLM, or HF
    ``generate`` through `SamplingLogprobRecorder`; not TRL's continuous-batching transformers path)."""
    if getattr(args, "use_transformers_continuous_batching", False) and not args.use_vllm:
        return False
    return not logit_processing(args.top_p, args.top_k, args.min_p, args.repetition_penalty)


def _uses_sampling_logprobs(reward_func) -> bool:
    """A reward function (or the one a `rlt.rewards.guard` wrapper holds) that declares it reads
    ``sampling_logprobs`` (``uses_sampling_logprobs``, as `rlt.rewards.TeacherKLReward`)."""
    return bool(getattr(reward_func, "uses_sampling_logprobs", False)
                or getattr(getattr(reward_func, "__wrapped__", None), "uses_sampling_logprobs", False))


@contextlib.contextmanager
def _reference_like(policy):
    """While TRL builds its reference model from the policy's path, give it the policy's vocabulary rows (item 5).
    A policy given by name is loaded by TRL like its reference: nothing to match."""
    if policy is None:
        yield
        return
    import trl.trainer.grpo_trainer as grpo_module

    build = grpo_module.create_model_from_path

    def build_like_policy(*args, **kwargs):
        reference = build(*args, **kwargs)
        match_vocabulary(reference, policy)
        return reference

    with swapped(grpo_module, "create_model_from_path", build_like_policy):
        yield


def completion_ends(attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Per row, 1 + the last completion column it attends to (0 for none): its completion's padded-to width.

    Worked example: completion columns [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]] -> [2, 1, 0, 4].
    """
    if logits_to_keep == 0:
        return torch.zeros(attention_mask.size(0), dtype=torch.long, device=attention_mask.device)
    comp = attention_mask[:, attention_mask.size(1) - logits_to_keep:].bool()
    return (comp * torch.arange(1, logits_to_keep + 1, device=comp.device)).amax(dim=1)


def completion_columns(attention_mask: torch.Tensor, logits_to_keep: int, multiple: int | None = None) -> int:
    """How many of the last `logits_to_keep` columns of `attention_mask` (the right-padded completions) a forward over
    these rows needs: up to the last column any row attends to, at least 1, rounded up to a `multiple` (TRL's
    ``pad_to_multiple_of``) but never past `logits_to_keep`.

    Worked example: prompt columns [1, 1] and completion columns [[1, 1, 0, 0], [1, 0, 0, 0]] (logits_to_keep 4)
    -> 2; completions all masked [[0, 0, 0, 0]] -> 1; [[1, 1, 1, 0]] with multiple 2 -> 4 (3 rounded up), with
    multiple 8 -> 4 (capped).
    """
    ends = completion_ends(attention_mask, logits_to_keep)
    width = max(int(ends.max()) if ends.numel() else 0, 1)
    if multiple:
        width = -(-width // multiple) * multiple
    return min(width, logits_to_keep)


# loss types whose sum over the micro-batches of one optimizer step does not depend on how rows are split (equal
# micro-batches): per-sequence means averaged, or sums over a global token count (TRL 1.16 `_compute_loss`)
PARTITION_FREE_LOSSES = ("grpo", "dr_grpo", "dapo", "sapo", "cispo", "luspo")


def ordered_by_completion_length(batch: dict) -> dict:
    """The rows of a generation round (TRL's dict of per-row tensors and lists) ordered by completion length, longest
    first (stable), permuted as TRL's ``shuffle_sequence_dict`` permutes them (0-dim tensors and None kept).

    Worked example: completion_mask [[1, 0, 0], [1, 1, 1], [1, 1, 0]] and ``{"x": ["a", "b", "c"]}`` -> rows in the
    order 1, 2, 0: x = ["b", "c", "a"].
    """
    mask = batch["completion_mask"]
    order = torch.argsort(completion_ends(mask, mask.size(1)), descending=True, stable=True)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
            return v
        if isinstance(v, torch.Tensor):
            return v[order.to(v.device)]
        return [v[i] for i in order.tolist()]

    return {key: permute(value) for key, value in batch.items()}


@contextlib.contextmanager
def _rounds_split_by_length():
    """While TRL's `_prepare_inputs` splits a generation round, its shuffle orders rows by completion length (the
    random permutation still drawn, so the random stream is unchanged)."""
    import trl.trainer.grpo_trainer as grpo_module

    shuffle = grpo_module.shuffle_sequence_dict

    def by_length(batch):
        shuffle(batch)  # TRL's permutation: drawn for the random stream, not used
        return ordered_by_completion_length(batch)

    with swapped(grpo_module, "shuffle_sequence_dict", by_length):
        yield


class GRPOTrainer(TRLGRPOTrainer):
    """TRL's GRPOTrainer plus the eight additions of docs/grpo.md (its overrides: `rlt.trl_patches.HOOKS`).
    `is_ratio_from_loss` and `groups_micro_batches_by_length` tell whether additions 1 and 7 are active for this
    configuration; `trims_completion_padding` switches addition 6 (on)."""

    trims_completion_padding = True

    def __init__(self, *args, offload_reference: bool = False, max_staleness: int = 0, **kwargs):
        policy = kwargs.get("model", args[0] if args else None)
        with _reference_like(policy if isinstance(policy, torch.nn.Module) else None):
            super().__init__(*args, **kwargs)
        self._setup_reference_offload(offload_reference)
        self._setup_async_generation(max_staleness)
        generate_every = self.args.steps_per_generation * self.num_iterations
        self.is_ratio_from_loss = bool(self.use_vllm and self.vllm_importance_sampling_correction
                                       and self.args.gradient_accumulation_steps % generate_every == 0)
        self.passes_sampling_logprobs = plain_tempered_sampling(self.args)
        self._pending_is_inputs: tuple | None = None  # (model, inputs) of the running _compute_loss
        self._last_sampling_logprobs: list | None = None
        self._hf_sampling_logprobs: list | None = None  # recorded during HF generate (item 2)
        # HF generate records them only for a reward that uses them (a log-softmax per step otherwise wasted)
        self.records_hf_sampling_logprobs = bool(
            self.passes_sampling_logprobs and not self.use_vllm and not self.use_transformers_continuous_batching
            and not self.tools and any(_uses_sampling_logprobs(f) for f in self.reward_funcs))
        self.groups_micro_batches_by_length = bool(
            self.loss_type in PARTITION_FREE_LOSSES and self.top_entropy_quantile >= 1.0
            and not getattr(self.args, "use_liger_kernel", False)
            and self.args.gradient_accumulation_steps % self.args.steps_per_generation == 0)

    # ---- 1. the importance-sampling ratio from the loss forward

    def _generate_and_score_completions(self, inputs):
        if not self.is_ratio_from_loss:
            return super()._generate_and_score_completions(inputs)
        # off, TRL skips the old-log-prob forward; back on, the loss still applies the ratio we set
        with swapped(self, "vllm_importance_sampling_correction", False):
            return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model, inputs):
        if self.is_ratio_from_loss:
            if inputs.get("sampling_per_token_logps") is None:
                raise RuntimeError("the vLLM generator returned no sampling log-probs for the importance-sampling "
                                   "correction")
            self._pending_is_inputs = (model, inputs)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._pending_is_inputs = None

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if model is self.ref_model and self.offloads_reference:
            with self.reference_on_device():
                return self._logps_without_trailing_padding(model, *args, **kwargs)
        logps, entropies, aux_loss = self._logps_without_trailing_padding(model, *args, **kwargs)
        pending = self._pending_is_inputs
        if pending is not None and model is pending[0]:  # the loss forward of the policy inside _compute_loss
            self._pending_is_inputs = None
            pending[1]["importance_sampling_ratio"] = self._ratio_and_metrics(logps.detach(), pending[1])
        return logps, entropies, aux_loss

    def _ratio_and_metrics(self, logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        sampling = inputs["sampling_per_token_logps"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        ratio = importance_sampling_ratio(logps, sampling, mask, mode=self.vllm_importance_sampling_mode,
                                          clip_min=self.vllm_importance_sampling_clip_min,
                                          clip_max=self.vllm_importance_sampling_clip_max)
        metrics = self._metrics["train" if self.model.training else "eval"]
        mask = mask.bool()
        zero = torch.tensor(0.0, device=logps.device)
        delta = torch.abs(logps - sampling)
        delta = delta[mask & ~torch.isnan(delta)]
        metrics["sampling/sampling_logp_difference/mean"].append(
            self.accelerator.gather(delta.mean() if delta.numel() else zero).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(
            self.accelerator.gather(delta.max() if delta.numel() else zero).max().item())
        flat = ratio.flatten() if ratio.shape[1] == 1 else ratio[mask]
        empty = flat.numel() == 0
        metrics["sampling/importance_sampling_ratio/min"].append(
            nanmin(self.accelerator.gather(zero if empty else flat.min())).item())
        metrics["sampling/importance_sampling_ratio/mean"].append(
            self.accelerator.gather(zero if empty else flat.mean()).nanmean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(
            nanmax(self.accelerator.gather(zero if empty else flat.max())).item())
        return ratio

    # ---- 2. sampling log-probs for reward functions

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        self._hf_sampling_logprobs = None
        if self.async_rounds is not None and self.model.training:  # 8: sampled ahead, next rounds submitted
            num_generations = args[2] if len(args) > 2 else kwargs["num_generations"]
            return self.async_rounds.generate(prompt_ids, num_generations)
        if self.use_vllm or not self.records_hf_sampling_logprobs:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        recorder = SamplingLogprobRecorder(self.temperature)
        with recorder.attached(self.accelerator.unwrap_model(self.model_wrapped)):  # the model TRL generates with
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if recorder.sequences is not None:
            self._hf_sampling_logprobs = recorder.per_completion(recorder.sequences, [len(c) for c in completion_ids])
        if self._hf_sampling_logprobs is None:
            log.warning("HF generation: the sampling log-probs were not recorded; rewards get none this round")
        return completion_ids, logprobs  # TRL's own values (None for HF generation): its loss path is unchanged

    def _generate(self, prompts):
        self._hf_sampling_logprobs = None
        out = super()._generate(prompts)
        # per completion: vLLM's sampling log-probs, those recorded during HF generate, or None
        self._last_sampling_logprobs = out[4] if out[4] is not None else self._hf_sampling_logprobs
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        logprobs, self._last_sampling_logprobs = self._last_sampling_logprobs, None
        if self.passes_sampling_logprobs and logprobs is not None and len(logprobs) == len(inputs):
            inputs = [{**row, "sampling_logprobs": lp, "sampling_temperature": self.temperature}
                      for row, lp in zip(inputs, logprobs, strict=True)]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        from rlt.samples import offer_scored

        offer_scored(self, prompts, completions, rewards_per_func)  # rows with each function's reward: samples.jsonl
        return rewards_per_func

    # ---- 4. the reference model offloaded to CPU between its forwards (offload_untrained_models)

    def _setup_reference_offload(self, enabled: bool) -> None:
        """Keep TRL's reference model in CPU memory, on the training device only for its log-prob forward (and a
        `sync_ref_model` mix), as the reference RLT trainer did (rlt-spec §3.6). Not under DeepSpeed/FSDP (their
        reference is a wrapped, possibly partitioned engine) nor on a CPU-only run (nothing to free)."""
        has_reference = getattr(self, "ref_model", None) is not None
        wrapped = self.is_deepspeed_enabled or self.is_fsdp_enabled
        self.offloads_reference = bool(enabled and has_reference and not wrapped and self._device_is_not_cpu())
        if enabled and has_reference and wrapped:
            log.warning("offload_untrained_models: the reference model stays on the GPU under DeepSpeed/FSDP")
        if not self.offloads_reference:
            return
        self.ref_model.to("cpu")
        clear_device_cache()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SyncRefModelCallback):
                callback.on_step_end = self._with_reference_on_device_for_sync(callback.on_step_end)

    def _device_is_not_cpu(self) -> bool:
        return self._training_device().type != "cpu"

    def _training_device(self) -> torch.device:
        return self.accelerator.device

    @contextlib.contextmanager
    def reference_on_device(self):
        """The offloaded reference model on the training device for the duration of the block, then back on CPU."""
        self.ref_model.to(self._training_device())
        try:
            yield self.ref_model
        finally:
            self.ref_model.to("cpu")
            clear_device_cache()

    def _with_reference_on_device_for_sync(self, on_step_end):
        def wrapped(args, state, control, **kwargs):
            if state.global_step % args.ref_model_sync_steps:  # TRL's own test: not a sync step
                return on_step_end(args, state, control, **kwargs)
            with self.reference_on_device():
                return on_step_end(args, state, control, **kwargs)

        return wrapped

    # ---- 3. the synced reference model travels with the checkpoint

    def _synced_reference(self) -> torch.nn.Module | None:
        """The reference model when `sync_ref_model` changes it during training and it is held whole in this process
        (not ZeRO-3-partitioned), else None."""
        if not self.args.sync_ref_model or getattr(self, "ref_model", None) is None:
            return None
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            if not getattr(self, "_warned_zero3_reference", False):
                self._warned_zero3_reference = True
                log.warning("sync_ref_model under ZeRO-3: the synced reference model is not saved in checkpoints; "
                            "a resumed run restarts it from the initial policy")
            return None
        return self.accelerator.unwrap_model(self.ref_model)

    def _save_checkpoint(self, model, trial):
        def save():  # TRL's checkpoint, then the synced reference; marked complete and rotated after both
            TRLGRPOTrainer._save_checkpoint(self, model, trial)
            ref = self._synced_reference()
            if ref is not None and self.args.should_save:
                from safetensors.torch import save_model

                folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
                tmp = os.path.join(folder, f".{REF_MODEL_FILE}.tmp")
                save_model(ref, tmp)
                os.replace(tmp, os.path.join(folder, REF_MODEL_FILE))

        save_marked_then_rotated(self, save, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        ref = self._synced_reference()
        if ref is not None and resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, REF_MODEL_FILE)
            if os.path.isfile(path):
                from safetensors.torch import load_model

                load_model(ref, path, strict=True, device=str(next(ref.parameters()).device))
                log.info("Restored the synced reference model from %s", path)
            else:
                log.warning("%s has no %s: the reference model restarts from the initial policy",
                            resume_from_checkpoint, REF_MODEL_FILE)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- 6. no forward over trailing padding

    def _logps_without_trailing_padding(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                        compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's `_get_per_token_logps_and_entropies`, each chunk of `batch_size` rows cut after its last attended
        completion column (`completion_columns`) and its outputs padded back to `logits_to_keep` with zeros."""
        compute = super()._get_per_token_logps_and_entropies
        if not self.trims_completion_padding or any(v is not None for v in multimodal.values()):
            return compute(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                           compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        prompt_width = input_ids.size(1) - logits_to_keep
        order = None  # several chunks: rows by length, so that chunks hold similar lengths (not with an MoE aux
        if input_ids.size(0) > batch_size and not compute_aux_loss:  # loss: a mean over chunks, kept TRL's)
            order = torch.argsort(completion_ends(attention_mask, logits_to_keep), descending=True, stable=True)
            input_ids, attention_mask = input_ids[order], attention_mask[order]
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            mask = attention_mask[start:start + batch_size]
            width = completion_columns(mask, logits_to_keep, self.pad_to_multiple_of)
            lp, ent, aux = compute(model, input_ids[start:start + batch_size, :prompt_width + width],
                                   mask[:, :prompt_width + width], width, None, compute_entropy, compute_aux_loss)
            logps.append(torch.nn.functional.pad(lp, (0, logits_to_keep - width)))
            if compute_entropy:
                entropies.append(torch.nn.functional.pad(ent, (0, logits_to_keep - width)))
            if compute_aux_loss:
                aux_losses.append(aux)
        logps = torch.cat(logps)
        entropies = torch.cat(entropies) if compute_entropy else None
        if order is not None:  # back to the caller's row order
            inverse = torch.argsort(order)
            logps = logps[inverse]
            entropies = entropies[inverse] if entropies is not None else None
        return logps, entropies, torch.stack(aux_losses).mean() if compute_aux_loss else None

    # ---- 7. micro-batches grouped by completion length

    def _prepare_inputs(self, generation_batch):
        if self.async_rounds is not None and self.model.training:
            self.async_rounds.locate(generation_batch)  # 8: which round of the data stream this is
        if not (self.groups_micro_batches_by_length and self.model.training):
            return super()._prepare_inputs(generation_batch)
        with _rounds_split_by_length():
            return super()._prepare_inputs(generation_batch)

    # ---- 8. asynchronous generation (vllm_server): the servers sample the next rounds while this one trains

    def _setup_async_generation(self, max_staleness: int) -> None:
        """With `max_staleness` ≥ 1, rounds are sampled up to that many rounds ahead (`rlt.generation.async_rounds`);
        0 keeps TRL's synchronous generation."""
        self.async_rounds = None
        generation = getattr(self, "vllm_generation", None)
        if hasattr(generation, "policy_step"):
            generation.policy_step = lambda: self.state.global_step  # tags each weight push with its step
        if not max_staleness:
            return
        unsupported = [name for name, used in (
            ("a vLLM server generator (generation_backend=vllm_server)",
             not (self.use_vllm and hasattr(generation, "submit"))),
            ("no tools", bool(self.tools)), ("no rollout_func", self.rollout_func is not None),
            ("no environments", getattr(self, "environment_factories", None) is not None)) if used]
        if unsupported:
            raise ValueError(f"asynchronous generation needs {', '.join(unsupported)}")
        from rlt.generation.async_rounds import AsyncRounds

        self.async_rounds = AsyncRounds(self, max_staleness)
        client = getattr(generation, "vllm_client", None)  # rank 0's: the weights go out with the next round
        if client is not None:
            client.defer_weight_push = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.async_rounds is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches, num_items = super().get_batch_samples(self.async_rounds.wrap(epoch_iterator), num_batches, device)
        self.async_rounds.handed_out(batches)
        return batches, num_items
