"""Sampling log-probs from HF ``generate``: what vLLM returns as processed log-probs, recorded while sampling.

Used by the GRPO trainer (`rlt.trainers`, rewards that declare ``uses_sampling_logprobs``; docs/grpo.md, addition 2)
and by distillation (`rlt.generation.sampling.generate_hf_ids` with ``return_logprobs``), so that the RLT teacher
reward can skip its teacher forward with either generator. Imports torch and transformers only (no TRL, no vLLM).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rlt.trl_patches import swapped


class SamplingLogprobRecorder(LogitsProcessor):
    """Records, while HF ``generate`` samples, the log-prob of every sampled token under
    ``log_softmax(logits / temperature)``: what vLLM returns as processed log-probs under plain tempered sampling.

    Used as a custom logits processor, it is called once per new token with the logits of that step (HF runs custom
    processors before its warpers: the scores it sees are the model's logits when nothing else processes them,
    which is what `plain_tempered_sampling` checks). It keeps that step's log-softmax [batch, vocab] and gathers it
    at the token the next call sees appended to ``input_ids``; `per_completion` gathers the last step at the final
    tokens and returns each row's values cut to its completion length. Memory: one step's log-softmax, not one per
    step (HF's ``output_scores`` would keep batch x length x vocab).

    Example: a 1-token vocabulary step is certain (log-prob 0): scores [[5.0]] at any temperature give [[0.0]].
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self._last: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []
        self.calls = 0
        self.sequences: torch.Tensor | None = None  # what `generate` returned, while `attached`

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self._steps.append(self._last.gather(1, input_ids[:, -1:].to(self._last.device))[:, 0])
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.calls += 1
        return scores

    def per_completion(self, sequences: torch.Tensor, lengths: list[int]) -> list[list[float]] | None:
        """Per row, the log-probs of its first ``lengths[row]`` new tokens, given the generated ``sequences``
        (prompt + new tokens); None when the calls do not match the new tokens (another decoding path ran)."""
        if self._last is None or len(sequences) != len(lengths) or max(lengths, default=0) > self.calls:
            return None
        steps = [*self._steps, self._last.gather(1, sequences[:, -1:].to(self._last.device))[:, 0]]
        table = torch.stack(steps, dim=1).cpu()
        return [table[row, :n].tolist() for row, n in enumerate(lengths)]

    @contextlib.contextmanager
    def attached(self, model):
        """While the block runs, ``model.generate`` samples with this recorder in its logits-processor chain and
        keeps the sequences it returns (`sequences`)."""
        generate = model.generate
        self.sequences = None

        def recording_generate(*args, **kwargs):
            if kwargs.get("logits_processor") is not None:
                raise RuntimeError("SamplingLogprobRecorder: generate already has a logits_processor")
            out = generate(*args, logits_processor=LogitsProcessorList([self]), **kwargs)
            self.sequences = out if isinstance(out, torch.Tensor) else None
            return out

        # an instance attribute: shadows the method for this model only, deleted again after the block
        with swapped(model, "generate", recording_generate):
            yield self
