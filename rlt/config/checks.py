"""The allowed values of the config's choice keys and the small checks every section's `problems()` uses.
Torch-free: validation runs before anything heavy is imported."""

from __future__ import annotations

from typing import Any

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
REPORT_TO = ("wandb", "tensorboard", "none")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adafactor", "sgd")  # 8-bit and paged variants need bitsandbytes (the `quant` extra) and CUDA
WANDB_MODES = ("online", "offline", "disabled")
DATA_FORMATS = ("gsm8k", "alpaca", "dolly", "sharegpt", "messages", "text", "prompt_completion", "teacher")
TEACHER_DATA_FORMATS = ("auto", "custom", "gsm8k", "stratos")
TEACHER_STYLES = ("stratos", "r1")
REDUCTIONS = ("mean", "sum", "min", "max", "median", "first_quartile", "last_quartile")
NORMALIZATIONS = ("none", "exp", "exp_norm")  # null means none
COMPLETION_STYLES = ("gsm8k", "reasoning_answer_tags")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL 1.16
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
GENERATION_BACKENDS = ("hf", "vllm_colocate", "vllm_server")
TEXT_SAMPLE_BY = ("paragraph", "line", "document")


def is_server_url(url: str) -> bool:
    """http(s)://HOST:PORT with an explicit port in [1, 65535] and nothing after it but an optional '/'.

    >>> is_server_url("http://10.0.0.2:8002/"), is_server_url("localhost:8000"), is_server_url("http://a:70000")
    (True, False, False)
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port is not None and 0 < port < 65536
            and parts.path in ("", "/") and not parts.query and not parts.fragment)


def is_number(value: Any) -> bool:
    """A real number that is not a bool (YAML's `true` must not pass as 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def one_of(errors: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of {list(allowed)}")


def positive(errors: list[str], key: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_number(value) or value <= 0:
        errors.append(f"{key}={value} must be > 0")


def in_unit_interval(errors: list[str], key: str, value: float, *, closed: bool = False) -> None:
    """0 <= value < 1, or <= 1 with `closed`."""
    if not is_number(value) or not (0 <= value <= 1 if closed else 0 <= value < 1):
        errors.append(f"{key}={value} must be in [0, {1 if closed else '1)'}" + ("]" if closed else ""))
