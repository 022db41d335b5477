"""Datasets for rlt: synthetic GSM8K-style problems, local / Hub loading, and conversion to TRL SFT rows."""

from rlt.data.formats import (
    DEFAULT_COLUMNS,
    REASONING_SYSTEM_PROMPT,
    gsm8k_final_answer,
    gsm8k_prompt,
    gsm8k_reasoning,
    render_gsm8k_completion,
    to_sft_example,
)
from rlt.data.loading import gsm8k_prompt_dataset, load_raw, prepare_gsm8k_eval, prepare_sft_datasets
from rlt.data.synthetic import arithmetic_problems, split_arithmetic

__all__ = [
    "DEFAULT_COLUMNS",
    "REASONING_SYSTEM_PROMPT",
    "arithmetic_problems",
    "gsm8k_final_answer",
    "gsm8k_prompt",
    "gsm8k_prompt_dataset",
    "gsm8k_reasoning",
    "load_raw",
    "prepare_gsm8k_eval",
    "prepare_sft_datasets",
    "render_gsm8k_completion",
    "split_arithmetic",
    "to_sft_example",
]
