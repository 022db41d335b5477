"""Decoding prompts into completions with HF ``generate`` or a vLLM engine, the same way on both backends.

A `Sampling` says how tokens are chosen (greedy, or tempered sampling with optional filters); `generate_hf` /
`generate_vllm` return the completions as text, `generate_hf_ids` / `generate_vllm_ids` as token ids (optionally
with their sampling log-probs). Used by evaluation (`rlt.evaluate`) and distillation (`rlt.distill`); what that
means for a user is in docs/grpo.md (Evaluation) and docs/rlt.md (Distillation data).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
DEFAULT_VLLM_KV_CACHE_BYTES = 1 << 30  # vLLM on CPU cannot size its KV cache from free GPU memory


def render_prompts(tokenizer, problems: Sequence[dict]) -> list[str]:
    """Each problem's chat ``prompt`` rendered with the tokenizer's chat template and the generation prompt."""
    return [tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True) for p in problems]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's ``generation_config.eos_token_id`` (an int or a list), then the
    tokenizer's eos, without duplicates or None."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


@dataclass(frozen=True)
class Sampling:
    """How completions are decoded, the same on both backends: greedy when ``temperature == 0``, else sampling at
    `temperature` from what the filters leave: `top_p` (1.0 = off), `top_k` (None = off), `min_p` (None = off).
    `repetition_penalty` (1.0 = off) applies to greedy decoding too, as it does in transformers and vLLM. The
    checkpoint's own sampling defaults (``generation_config.json``) are never used.

    `Sampling.from_run(run)` is a training run's sampling (its temperature and filters), what a teacher was
    trained to explain with.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def from_run(cls, run, temperature: float | None = None) -> Sampling:
        return cls(temperature=run.temperature if temperature is None else temperature, top_p=run.top_p,
                   top_k=run.top_k, min_p=run.min_p, repetition_penalty=run.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Sampling whose per-token log-probs are ``log_softmax(logits / temperature)``: not greedy, no filter, no
        repetition penalty (`rlt.config.logit_processing`).

        >>> Sampling(0.7).plain, Sampling(0.7, top_p=0.9).plain, Sampling().plain  # the last one is greedy
        (True, False, False)
        """
        from rlt.config import logit_processing

        return not self.greedy and not logit_processing(self.top_p, self.top_k, self.min_p, self.repetition_penalty)

    def problems(self) -> list[str]:
        """What is wrong with these values, one phrase each (empty when they are usable)."""
        def number(v) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        out = []
        if not (number(self.temperature) and self.temperature >= 0):
            out.append(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            out.append(f"top_k must be an integer >= 1 or None (off), got {self.top_k!r}")
        if self.min_p is not None and not (number(self.min_p) and 0 <= self.min_p <= 1):
            out.append(f"min_p must be in [0, 1] or None (off), got {self.min_p!r}")
        if not (number(self.repetition_penalty) and self.repetition_penalty > 0):
            out.append(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        return out

    def hf_kwargs(self) -> dict[str, Any]:
        """`transformers.GenerationConfig` fields (top_k 0 and min_p None switch those warpers off in transformers).

        >>> Sampling(0.7, top_k=20).hf_kwargs()
        {'do_sample': True, 'temperature': 0.7, 'top_p': 1.0, 'top_k': 20, 'min_p': None, 'repetition_penalty': 1.0}
        >>> GREEDY.hf_kwargs()
        {'do_sample': False, 'repetition_penalty': 1.0}
        """
        if self.greedy:
            return dict(do_sample=False, repetition_penalty=float(self.repetition_penalty))
        return dict(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                    top_k=self.top_k or 0, min_p=self.min_p, repetition_penalty=float(self.repetition_penalty))

    def vllm_kwargs(self) -> dict[str, Any]:
        """`vllm.SamplingParams` fields (vLLM: top_k 0 and min_p 0 = off, temperature 0 = greedy).

        >>> Sampling(0.7, top_k=20, min_p=0.05).vllm_kwargs()
        {'temperature': 0.7, 'top_p': 1.0, 'top_k': 20, 'min_p': 0.05, 'repetition_penalty': 1.0}
        >>> GREEDY.vllm_kwargs()
        {'temperature': 0.0, 'top_p': 1.0, 'top_k': 0, 'min_p': 0.0, 'repetition_penalty': 1.0}
        """
        if self.greedy:
            return dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                        repetition_penalty=float(self.repetition_penalty))
        return dict(temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k or 0,
                    min_p=float(self.min_p or 0.0), repetition_penalty=float(self.repetition_penalty))

    def describe(self) -> str:
        """``"greedy"``, or the temperature and only the filters that are on.

        >>> Sampling(0.7, top_k=20).describe(), GREEDY.describe()
        ('temperature 0.7, top_k 20', 'greedy')
        """
        if self.greedy:
            head = "greedy"
        else:
            head = f"temperature {self.temperature}"
            head += "".join(f", {k} {v}" for k, v in (("top_p", self.top_p if self.top_p != 1 else None),
                                                       ("top_k", self.top_k), ("min_p", self.min_p)) if v)
        return head + (f", repetition_penalty {self.repetition_penalty}" if self.repetition_penalty != 1 else "")


GREEDY = Sampling()


def generate_hf(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                num_samples: int = 1, sampling: Sampling = GREEDY, seed: int | None = None) -> list[list[str]]:
    """`num_samples` completions per prompt text with ``model.generate``, decoded as `sampling` says (greedy by
    default).

    Prompts are left-padded in batches of about `batch_size` sequences (``batch_size // num_samples`` prompts).
    Texts are tokenized without adding special tokens (the chat template has them). The model's train/eval mode and
    the tokenizer's padding side are restored afterwards. `generate_hf_ids` gives the sampled token ids instead.
    """
    ids = generate_hf_ids(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          num_samples=num_samples, sampling=sampling, seed=seed)
    return [tokenizer.batch_decode(row, skip_special_tokens=True) for row in ids]


def _check_sampling(sampling: Sampling, num_samples: int, *, logprobs: bool = False) -> None:
    if logprobs and not sampling.plain:
        raise ValueError(f"sampling log-probs are log_softmax(logits / temperature) only for plain tempered sampling; "
                         f"got {sampling.describe()}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if sampling.problems():
        raise ValueError("; ".join(sampling.problems()))
    if sampling.greedy and num_samples > 1:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy decoding gives one completion)")


def generate_hf_ids(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                    num_samples: int = 1, sampling: Sampling = GREEDY, seed: int | None = None,
                    return_logprobs: bool = False):
    """As `generate_hf`, the sampled token ids of each completion: up to and including its first end-of-sequence
    token, without the padding after it. With `return_logprobs` (plain tempered sampling only, `Sampling.plain`):
    ``(ids, logprobs)``, ``logprobs[prompt][sample][t]`` = ``log_softmax(logits / temperature)`` of token ``t`` as
    it was sampled (`rlt.generation.hf_logprobs.SamplingLogprobRecorder`; None for a batch where the recorder did
    not see the sampling steps)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    from rlt.generation.hf_logprobs import SamplingLogprobRecorder

    _check_sampling(sampling, num_samples, logprobs=return_logprobs)
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None), **sampling.hf_kwargs(),
    )
    if seed is not None:
        torch.manual_seed(seed)
    prompts_per_batch = max(1, batch_size // num_samples)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    results: list[list[list[int]]] = []
    logprobs: list[list[list[float] | None]] = []
    try:
        for start in range(0, len(texts), prompts_per_batch):
            batch = list(texts[start:start + prompts_per_batch])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            recorder = SamplingLogprobRecorder(sampling.temperature) if return_logprobs else None
            extra = dict(logits_processor=LogitsProcessorList([recorder])) if recorder is not None else {}
            with torch.no_grad():
                out = model.generate(**enc, generation_config=config, **extra)
            rows = [_until_eos(r, eos) for r in out[:, enc["input_ids"].shape[1]:].tolist()]
            results.extend(rows[i * num_samples:(i + 1) * num_samples] for i in range(len(batch)))
            if recorder is not None:
                lps = recorder.per_completion(out, [len(r) for r in rows]) or [None] * len(rows)
                logprobs.extend(lps[i * num_samples:(i + 1) * num_samples] for i in range(len(batch)))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return (results, logprobs) if return_logprobs else results


def _until_eos(ids: list[int], eos: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first of the `eos` ids (generate pads finished rows after it)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def make_vllm_engine(model_path: str, *, seed: int = 0, dtype: str = "auto",
                     kv_cache_memory_bytes: int = DEFAULT_VLLM_KV_CACHE_BYTES, max_model_len: int | None = None):
    """A ``vllm.LLM`` for `model_path` (a local model directory) with the trainer's platform settings
    (`rlt.generation.vllm_colocate.build_llm`): on CPU in-process, eager, with a KV cache of
    `kv_cache_memory_bytes` (vLLM cannot size it from GPU memory there), so deleting the engine frees it. Raises
    `MissingExtraError` (naming the extra) when vllm is not installed. On a GPU the engine takes vLLM's default
    0.9 of the GPU's memory and `kv_cache_memory_bytes` is not used."""
    import torch

    from rlt.generation.vllm_colocate import build_llm

    logger.info("Starting vLLM engine for %s (dtype %s, seed %d)", model_path, dtype, seed)
    return build_llm(model_path, seed=seed, dtype=dtype, max_model_len=max_model_len,
                     kv_cache_memory_bytes=None if torch.cuda.is_available() else kv_cache_memory_bytes)


def _vllm_request(llm, tokenizer, texts, *, max_new_tokens, num_samples, sampling: Sampling, seed,
                  logprobs: int | None = None):
    from vllm import SamplingParams

    _check_sampling(sampling, num_samples, logprobs=logprobs is not None)
    params = SamplingParams(n=num_samples, max_tokens=max_new_tokens, seed=seed, skip_special_tokens=True,
                            logprobs=logprobs, **sampling.vllm_kwargs())
    prompts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    return llm.generate(prompts, params, use_tqdm=False)


def generate_vllm(llm, tokenizer, texts: Sequence[str], *, max_new_tokens: int, num_samples: int = 1,
                  sampling: Sampling = GREEDY, seed: int | None = None) -> list[list[str]]:
    """`num_samples` completions per prompt text with a ``vllm.LLM`` (see `make_vllm_engine`), decoded as
    `sampling` says, as `generate_hf` does. Prompts are passed as token ids from our tokenizer
    (``add_special_tokens=False``), so both backends see identical inputs."""
    outputs = _vllm_request(llm, tokenizer, texts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                            sampling=sampling, seed=seed)
    return [[o.text for o in out.outputs] for out in outputs]


def generate_vllm_ids(llm, tokenizer, texts: Sequence[str], *, max_new_tokens: int, num_samples: int = 1,
                      sampling: Sampling = GREEDY, seed: int | None = None, return_logprobs: bool = False):
    """As `generate_vllm`, the sampled token ids of each completion (with its end-of-sequence token, if any). With
    `return_logprobs` (plain tempered sampling only): ``(ids, logprobs)`` as `generate_hf_ids` gives them, vLLM's
    processed log-probs of the sampled tokens (the engine's ``logprobs_mode``, `make_vllm_engine`)."""
    outputs = _vllm_request(llm, tokenizer, texts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                            sampling=sampling, seed=seed, logprobs=0 if return_logprobs else None)
    ids = [[list(o.token_ids) for o in out.outputs] for out in outputs]
    if not return_logprobs:
        return ids
    return ids, [[_sampled_logprobs(o) for o in out.outputs] for out in outputs]


def _sampled_logprobs(output) -> list[float] | None:
    """The log-prob of each sampled token of one vLLM completion (``logprobs=0`` returns the sampled token's only),
    or None when vLLM returned none."""
    if output.logprobs is None or len(output.logprobs) != len(output.token_ids):
        return None
    return [step[token].logprob for token, step in zip(output.token_ids, output.logprobs, strict=True)]


def vllm_engine_for(model: str, torch_dtype: str, stack: ExitStack, *, seed: int, kv_cache_memory_bytes: int):
    """``(tokenizer, vllm.LLM)`` for an evaluation model (a LoRA adapter is merged into a temp dir that `stack`
    removes)."""
    import tempfile

    from rlt.models import is_lora_adapter, load_eval_model, load_eval_tokenizer, resolve_model_path
    from rlt.utils.imports import require

    require("vllm")  # fail fast, before loading anything
    if is_lora_adapter(model):  # vLLM gets a plain model dir: merge the adapter and save it to a temp dir
        merged, tokenizer = load_eval_model(model, torch_dtype=torch_dtype)
        model_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlt-eval-merged-"))
        merged.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del merged
    else:
        tokenizer = load_eval_tokenizer(model)  # a missing local directory is a one-line `ModelError`
        model_dir = resolve_model_path(str(model))
    llm = make_vllm_engine(model_dir, seed=seed, dtype="auto" if torch_dtype == "auto" else torch_dtype,
                           kv_cache_memory_bytes=kv_cache_memory_bytes)
    return tokenizer, llm
