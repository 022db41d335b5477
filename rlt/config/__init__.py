"""The typed schema of the flat run config and its validation (README "Running"; `cfgs/train.yaml`).

Every group is merged into one flat namespace, so any key is overridden by its short name; `validate` picks the
schema by `algorithm` and reports unknown keys, wrong types and impossible values in one message. Torch-free.
"""

from rlt.config.checks import (
    ATTN_IMPLEMENTATIONS,
    COMPLETION_STYLES,
    DATA_FORMATS,
    GENERATION_BACKENDS,
    IS_MODES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    NORMALIZATIONS,
    OPTIMIZERS,
    REDUCTIONS,
    REPORT_TO,
    SCALE_REWARDS,
    TEACHER_DATA_FORMATS,
    TEACHER_STYLES,
    TEXT_SAMPLE_BY,
    TORCH_DTYPES,
    WANDB_MODES,
)
from rlt.config.grpo import GRPORunConfig, GRPOSection, logit_processing
from rlt.config.rlt import RLTRunConfig, RLTSection, TeacherRewardSection, paired_coefficients, reduction_names
from rlt.config.schema import (
    SCHEMAS,
    all_defaults,
    register_defaults,
    to_yaml,
    unknown_override_message,
    validate,
)
from rlt.config.sections import DataSection, ModelSection, OptimSection, RunSection
from rlt.config.sft import SFTRunConfig, SFTSection
