"""GSM8K-style evaluation: greedy accuracy (pass@1) and sampled pass@k, with an HF or vLLM generation backend.

    python -m rlt.evaluate --model results/demo/final --data ../shared/data/gsm8k --limit 200
    python -m rlt.evaluate --model rlt:tiny --data synthetic:arithmetic --k 8 --temperature 0.7
    python -m rlt.evaluate --model results/lora_run/final --data ../shared/data/gsm8k --backend vllm

`--model` is a base model (local dir, hub id or `rlt:` name), a training checkpoint / final dir, or a LoRA adapter
dir (has ``adapter_config.json``), which is merged into its base model. Prompts are built exactly as in training
(`prepare_gsm8k_eval`, chat template with the generation prompt). Correctness uses the training reward's checker
(`rlt.rewards.gsm8k.grade_completion`, math-verify): a completion is correct when its final answer (in
``<answer>`` tags, else after ``####``, else its last number) equals the reference; ``strict_accuracy`` counts only
answers inside the tags. Bad input (missing model, data without the columns, bad options) ends with a one-line
error and exit status 2.

Python API: `evaluate` (the whole run as a dict), `gsm8k_accuracy` (greedy accuracy of an in-memory model, used by
the SFT recipe), `pass_at_k`, `generate_hf` / `generate_vllm` (decoding as a `Sampling` says), `load_eval_model`,
and the pure helpers
`answer_from_completion` and `answers_match`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlt.errors import ConfigError, ModelError, RltError

logger = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
DEFAULT_VLLM_KV_CACHE_BYTES = 1 << 30  # vLLM on CPU cannot size its KV cache from free GPU memory
REASONING_PROMPT_ALIAS = "@reasoning"  # --system-prompt @reasoning = rlt.data.formats.REASONING_SYSTEM_PROMPT
STUDENT_PROMPT_ALIAS = "@student"  # the RLT student prompt: @student (stratos) or @student:<distilled .jsonl>

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ------------------------------------------------------------------------------------------------- pure helpers


def answer_from_completion(text: str) -> str | None:
    """The final answer a completion states, as text, or None.

    Looks, in order, for the last `<answer>…</answer>`, the text after the last `####`, then the last number.
    Examples: "<answer>\n19\n</answer>" -> "19"; "so 3 + 4 = 7\n#### 7" -> "7"; "it is 1,234." -> "1,234".
    """
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1].strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether `predicted` states the reference answer, with the training reward's math-verify checker
    (`rlt.rewards.gsm8k.answers_equivalent`): "1,234" == "1234.0", "3/4" == "0.75", "\\boxed{12}" == "12"; text
    equality when the reference is not math."""
    from rlt.rewards.gsm8k import answers_equivalent

    return answers_equivalent(predicted, reference)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from `n` samples of which `c` are correct: ``1 - C(n-c, k) / C(n, k)``, the
    probability that at least one of `k` samples drawn without replacement from the `n` is correct.

    Needs ``0 <= c <= n`` and ``1 <= k <= n``. ``pass_at_k(5, 2, 1) == 0.4``; ``pass_at_k(5, 2, 2) == 0.7``;
    1.0 whenever ``n - c < k`` (every draw of k includes a correct sample).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --------------------------------------------------------------------------------------------------- generation


def render_prompts(tokenizer, problems: Sequence[dict]) -> list[str]:
    """Each problem's chat ``prompt`` rendered with the tokenizer's chat template and the generation prompt."""
    return [tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True) for p in problems]


def _eos_ids(model, tokenizer) -> list[int]:
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
        repetition penalty (`rlt.config.logit_processing`). ``Sampling(0.7).plain`` is True,
        ``Sampling(0.7, top_p=0.9).plain`` and ``Sampling().plain`` (greedy) are False."""
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
        """`transformers.GenerationConfig` fields. ``Sampling(0.7, top_k=20).hf_kwargs()`` == ``{do_sample: True,
        temperature: 0.7, top_p: 1.0, top_k: 20, min_p: None, repetition_penalty: 1.0}``; greedy: ``{do_sample:
        False, repetition_penalty: 1.0}`` (top_k 0 and min_p None switch those warpers off in transformers)."""
        if self.greedy:
            return dict(do_sample=False, repetition_penalty=float(self.repetition_penalty))
        return dict(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p),
                    top_k=self.top_k or 0, min_p=self.min_p, repetition_penalty=float(self.repetition_penalty))

    def vllm_kwargs(self) -> dict[str, Any]:
        """`vllm.SamplingParams` fields (vLLM: top_k 0 and min_p 0 = off, temperature 0 = greedy).
        ``Sampling(0.7, top_k=20, min_p=0.05).vllm_kwargs()`` == ``{temperature: 0.7, top_p: 1.0, top_k: 20,
        min_p: 0.05, repetition_penalty: 1.0}``; greedy: temperature 0, top_p 1, top_k 0, min_p 0."""
        if self.greedy:
            return dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                        repetition_penalty=float(self.repetition_penalty))
        return dict(temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k or 0,
                    min_p=float(self.min_p or 0.0), repetition_penalty=float(self.repetition_penalty))

    def describe(self) -> str:
        """``"greedy"`` or e.g. ``"temperature 0.7, top_k 20"`` (only the filters that are on)."""
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
    eos = _eos_ids(model, tokenizer)
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


# ------------------------------------------------------------------------------------------------------ scoring


def _grade(completion: str, answer: str) -> tuple[float, str | None]:
    from rlt.rewards.gsm8k import grade_completion

    return grade_completion(completion, answer)


def gsm8k_accuracy(model, tokenizer, problems: list[dict], *, max_new_tokens: int = 64,
                   batch_size: int = 16) -> dict:
    """Greedy accuracy of `model` on `problems` = [{"prompt": chat messages, "answer": final answer}, ...].

    A completion is correct when the training reward gives it any credit (`rlt.rewards.gsm8k.grade_completion`).
    Returns {"accuracy": float, "n": int, "predictions": [{"prompt", "completion", "predicted", "answer",
    "correct"}, ...]}.
    """
    texts = render_prompts(tokenizer, problems)
    completions = generate_hf(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = []
    for p, text, (completion,) in zip(problems, texts, completions, strict=True):
        score, predicted = _grade(completion, p["answer"])
        predictions.append({"prompt": text, "completion": completion, "predicted": predicted,
                            "answer": p["answer"], "correct": score > 0})
    n = len(predictions)
    return {"accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0, "n": n, "predictions": predictions}


# ------------------------------------------------------------------------------------------------ model loading


def is_lora_adapter(name_or_path: str) -> bool:
    """True if `name_or_path` is a local directory holding a peft adapter (``adapter_config.json``)."""
    return (Path(str(name_or_path)).expanduser() / "adapter_config.json").is_file()


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1


def _adapter_base(adapter_dir: Path) -> str:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the LoRA adapter config {adapter_dir / 'adapter_config.json'}: {e}") from e
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelError(f"LoRA adapter {adapter_dir} has no base_model_name_or_path in adapter_config.json; "
                         "cannot tell which base model to merge it into")
    return base


def load_eval_tokenizer(name_or_path: str, **kwargs):
    """The tokenizer `load_eval_model` uses (left padding): the model's, or a LoRA adapter dir's own if it has one,
    else its base model's. `kwargs` go to `rlt.models.load_tokenizer`. Raises `ModelError`."""
    from rlt.models import load_tokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if _looks_like_local_path(name) and not path.exists():
        raise ModelError(f"model directory '{name}' does not exist (resolved to '{path.resolve()}')")
    if is_lora_adapter(name) and not (path / "tokenizer_config.json").is_file():
        base = _adapter_base(path)
        try:
            return load_tokenizer(base, padding_side="left", **kwargs)
        except ModelError as e:
            raise ModelError(f"LoRA adapter {path}: cannot load its base model {base!r}: {e}") from e
    return load_tokenizer(name, padding_side="left", **kwargs)


def load_eval_model(name_or_path: str, *, torch_dtype: str = "auto"):
    """``(model, tokenizer)`` ready for generation (eval mode, left padding).

    A LoRA adapter dir is loaded onto its base model (``base_model_name_or_path`` in ``adapter_config.json``) and
    merged (``PeftModel.from_pretrained(...).merge_and_unload()``); its tokenizer is the adapter dir's if it has one,
    else the base model's. Raises `ModelError` for a missing directory or a model that cannot be loaded.
    """
    from rlt.models import load_model

    name = str(name_or_path)
    path = Path(name).expanduser()
    tokenizer = load_eval_tokenizer(name)
    if not is_lora_adapter(name):
        model = load_model(name, torch_dtype=torch_dtype, tokenizer=tokenizer)
        return model.eval(), tokenizer

    base = _adapter_base(path)
    try:
        model = load_model(base, torch_dtype=torch_dtype, tokenizer=tokenizer)
    except ModelError as e:
        raise ModelError(f"LoRA adapter {path}: cannot load its base model {base!r}: {e}") from e
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - shape mismatch, bad weights file, ...: report, not a bug in rlt
        raise ModelError(f"cannot apply the LoRA adapter {path} to its base model {base!r}: "
                         f"{type(e).__name__}: {str(e).strip()[:300]}") from e
    logger.info("Merged LoRA adapter %s into its base model %s", path, base)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------- evaluation


def _check_options(*, split: str, limit: int | None, k: int, num_samples: int, sampling: Sampling,
                   max_new_tokens: int, batch_size: int, backend: str) -> None:
    problems = sampling.problems()
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not split:
        problems.append("split must be a non-empty split name")
    for name, value, low in (("limit", limit, 1), ("k", k, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("num_samples", num_samples, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(k, int) and isinstance(num_samples, int) and num_samples < k:
        problems.append(f"num_samples ({num_samples}) must be >= k ({k})")
    if k > 1 and not problems and sampling.greedy:
        problems.append(f"pass@k with k={k} samples needs temperature > 0, got {sampling.temperature!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def resolve_system_prompt(value: str | None) -> str | None:
    """The system prompt a ``--system-prompt`` value names: ``@reasoning`` (the ``<reasoning>``/``<answer>`` format
    prompt), ``@student`` (the RLT student prompt of the stratos format, what ``student_sft`` trains with),
    ``@student:<file.jsonl>`` (the system turn of the first row of a `rlt.distill` output: the prompt a student was
    trained on); any other text is the prompt itself. Raises `ConfigError` for an unreadable distilled file."""
    if value == REASONING_PROMPT_ALIAS:
        from rlt.data.formats import REASONING_SYSTEM_PROMPT

        return REASONING_SYSTEM_PROMPT
    if value == STUDENT_PROMPT_ALIAS:
        from rlt.data.teacher import get_teacher_format

        return get_teacher_format("stratos").student_system_prompt
    if value is not None and value.startswith(STUDENT_PROMPT_ALIAS + ":"):
        path = Path(value[len(STUDENT_PROMPT_ALIAS) + 1:]).expanduser()
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline())
            return next(m["content"] for m in first["messages"] if m["role"] == "system")
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
            raise ConfigError(f"--system-prompt {value}: cannot read the system turn of the first row of {path} "
                              f"(a python -m rlt.distill output): {type(e).__name__}: {e}") from None
    return value


def _hf_backend(model: str, torch_dtype: str, stack: ExitStack):
    loaded, tokenizer = load_eval_model(model, torch_dtype=torch_dtype)

    def generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed):
        return generate_hf(loaded, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           num_samples=num_samples, sampling=sampling, seed=seed)

    return tokenizer, generate


def vllm_engine_for(model: str, torch_dtype: str, stack: ExitStack, *, seed: int, kv_cache_memory_bytes: int):
    """``(tokenizer, vllm.LLM)`` for an evaluation model (a LoRA adapter is merged into a temp dir that `stack`
    removes)."""
    from rlt.models import load_tokenizer, resolve_model_path
    from rlt.utils.imports import require

    require("vllm")  # fail fast, before loading anything
    if is_lora_adapter(model):  # vLLM gets a plain model dir: merge the adapter and save it to a temp dir
        merged, tokenizer = load_eval_model(model, torch_dtype=torch_dtype)
        model_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlt-eval-merged-"))
        merged.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del merged
    else:
        name = str(model)
        if _looks_like_local_path(name) and not Path(name).expanduser().exists():
            raise ModelError(f"model directory '{name}' does not exist (resolved to '{Path(name).expanduser().resolve()}')")
        model_dir = resolve_model_path(name)
        tokenizer = load_tokenizer(name, padding_side="left")
    llm = make_vllm_engine(model_dir, seed=seed, dtype="auto" if torch_dtype == "auto" else torch_dtype,
                           kv_cache_memory_bytes=kv_cache_memory_bytes)
    return tokenizer, llm


def evaluate(*, model: str, data: str, split: str = "test", limit: int | None = None,
             system_prompt: str | None = None, k: int = 1, num_samples: int | None = None, temperature: float = 0.7,
             top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None, max_new_tokens: int = 256, batch_size: int = 16, backend: str = "hf", seed: int = 0,
             torch_dtype: str = "auto", data_columns: dict[str, str] | None = None,
             kv_cache_memory_bytes: int = DEFAULT_VLLM_KV_CACHE_BYTES) -> dict:
    """Evaluate `model` on the GSM8K-format `split` of `data` and return the results dict (see `main`).

    Greedy decoding gives ``accuracy`` (pass@1) and ``strict_accuracy`` (answer inside ``<answer>`` tags). With
    ``k > 1``, `num_samples` (default k) completions per problem are also sampled at `temperature` (after the
    `top_p` / `top_k` / `min_p` filters, off by default), and
    ``pass_at_k`` is the mean of `pass_at_k(num_samples, correct, k)` over problems. `limit` keeps the first N
    problems of the split, in file order. Raises `RltError` subclasses for bad options, data or models.
    """
    from rlt.data.loading import prepare_gsm8k_eval

    num_samples = k if num_samples is None else num_samples
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    _check_options(split=split, limit=limit, k=k, num_samples=num_samples, sampling=sampling,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend)
    system_prompt = resolve_system_prompt(system_prompt)
    problems = prepare_gsm8k_eval(dataset_id_or_path=data, split=split, data_columns=data_columns,
                                  system_prompt=system_prompt)
    if limit is not None:
        problems = problems[:limit]

    with ExitStack() as stack:
        if backend == "hf":
            tokenizer, generate = _hf_backend(model, torch_dtype, stack)
        else:
            tokenizer, llm = vllm_engine_for(model, torch_dtype, stack, seed=seed,
                                             kv_cache_memory_bytes=kv_cache_memory_bytes)

            def generate(texts, *, max_new_tokens, batch_size, num_samples, sampling, seed):
                return generate_vllm(llm, tokenizer, texts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                                     sampling=sampling, seed=seed)
        texts = render_prompts(tokenizer, problems)
        options = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        logger.info("Generating greedy completions for %d problems (%s backend)", len(problems), backend)
        greedy = generate(texts, num_samples=1, sampling=GREEDY, **options)
        sampled: list[list[str]] | None = None
        if k > 1:
            logger.info("Sampling %d completions per problem (%s) for pass@%d", num_samples, sampling.describe(), k)
            sampled = generate(texts, num_samples=num_samples, sampling=sampling, **options)

    predictions = []
    strict = 0
    pass_values = []
    for i, (problem, text) in enumerate(zip(problems, texts, strict=True)):
        completion = greedy[i][0]
        score, predicted = _grade(completion, problem["answer"])
        strict += score >= 2.0
        entry = {"question": problem["question"], "prompt": text, "completions": [completion],
                 "predicted": predicted, "answer": problem["answer"], "correct": score > 0, "score": score}
        if sampled is not None:
            sample_correct = [_grade(c, problem["answer"])[0] > 0 for c in sampled[i]]
            entry["completions"] += sampled[i]
            entry["samples_correct"] = sum(sample_correct)
            pass_values.append(pass_at_k(num_samples, sum(sample_correct), k))
        predictions.append(entry)

    n = len(predictions)
    results: dict[str, Any] = {
        "model": str(model), "data": str(data), "split": split, "n": n,
        "accuracy": sum(p["correct"] for p in predictions) / n if n else 0.0,
        "strict_accuracy": strict / n if n else 0.0,
    }
    if sampled is not None:
        results.update(pass_at_k=sum(pass_values) / n if n else 0.0, k=k, num_samples=num_samples,
                       temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    results.update(backend=backend, max_new_tokens=max_new_tokens, system_prompt=system_prompt, seed=seed,
                   predictions=predictions)
    return results


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON to `path` atomically (`rlt.checkpoints.atomic_write_text`): the file is either the old
    one or complete, never half-written."""
    from rlt.checkpoints import atomic_write_text

    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def default_output_path(model: str, data: str, split: str, *, kind: str = "eval", suffix: str = ".json") -> Path:
    """``results/<kind>/<model>__<data>__<split><suffix>`` with every name flattened to ``[A-Za-z0-9._-]``."""

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"

    return Path("results") / kind / f"{slug(model)}__{slug(data)}__{slug(split)}{suffix}"


# ----------------------------------------------------------------------------------------------------------- CLI


def _shorten(text: Any, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _print_summary(results: dict, output: Path, out: Callable[[str], None] = print) -> None:
    line = f"accuracy {results['accuracy']:.4f} (strict, in <answer> tags: {results['strict_accuracy']:.4f})"
    if "pass_at_k" in results:
        sampled = Sampling(**{k: results[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in results})
        line += f", pass@{results['k']} {results['pass_at_k']:.4f} ({results['num_samples']} samples, " \
                f"{sampled.describe()})"
    out(f"{results['model']} on {results['data']} [{results['split']}], n={results['n']}: {line}")
    for p in results["predictions"][:3]:
        out(f"- question: {_shorten(p['question'])}\n  completion: {_shorten(p['completions'][0])}\n"
            f"  predicted: {p['predicted']!r}  answer: {p['answer']!r}  correct: {p['correct']}")
    out(f"results: {output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlt.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="model dir / hub id / rlt: name, checkpoint, or LoRA adapter dir")
    parser.add_argument("--data", required=True, help="GSM8K-format data: dir, file, hub id or synthetic:arithmetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument("--system-prompt", default=None,
                        help=f"system prompt, as in training (default none); {REASONING_PROMPT_ALIAS} = the "
                             f"<reasoning>/<answer> format prompt; {STUDENT_PROMPT_ALIAS} = the RLT student prompt, "
                             f"{STUDENT_PROMPT_ALIAS}:FILE.jsonl = the one of a distilled file (rlt.distill)")
    parser.add_argument("--k", type=int, default=1, help="pass@k: with k > 1, also sample completions per problem")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per problem for pass@k (default k)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for pass@k")
    parser.add_argument("--top-p", type=float, default=1.0, help="pass@k sampling: nucleus filter (1.0 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="pass@k sampling: top-k filter (default off)")
    parser.add_argument("--min-p", type=float, default=None, help="pass@k sampling: min-p filter (default off)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DEFAULT_VLLM_KV_CACHE_BYTES,
                        help="vLLM on CPU: KV cache size")
    parser.add_argument("--output", default=None,
                        help="results JSON path (default results/eval/<model>__<data>__<split>.json)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line of an rlt CLI, with INFO logging on stderr unless the caller configured logging."""
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, with a one-line error on stderr)."""
    args = parse_cli(build_parser(), argv)
    try:
        results = evaluate(model=args.model, data=args.data, split=args.split, limit=args.limit,
                           system_prompt=args.system_prompt, k=args.k, num_samples=args.num_samples,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                           max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, backend=args.backend, seed=args.seed, torch_dtype=args.dtype,
                           kv_cache_memory_bytes=args.kv_cache_memory_bytes)
        output = args.output or default_output_path(args.model, args.data, args.split)
        try:
            path = write_json_atomic(output, results)
        except OSError as e:
            raise ConfigError(f"cannot write the results to {output}: {e}") from e
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    _print_summary(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
