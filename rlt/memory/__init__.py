"""GPU memory estimate of a training step: pure functions (no torch, no config) over a `ModelArch` and a
`MemoryPlan`, per phase of the step (forward/backward, optimizer step, generation, scoring); the peak is the largest.
`rlt.memcheck` builds the plan from a run config. Formulas, sources and measurements: docs/memory.md. Modules:
`units` (bytes, sizes), `arch` (architectures, parameter counts), `terms` (one function per term, each with a worked
example asserted in tests/test_memory.py), `plan` (`estimate`, checks, `suggestions`); all re-exported here.
"""

from rlt.memory.arch import (
    BUNDLED_ARCHS,
    MODULE_ALIASES,
    PUBLISHED_PARAMS,
    ModelArch,
    arch_from_hf_config,
    bundled_arch,
    embedding_param_count,
    largest_layer_params,
    lora_param_count,
    lora_targets,
    param_count,
    unknown_lora_modules,
)
from rlt.memory.plan import (
    DEFAULT_FRAMEWORK_OVERHEAD,
    Check,
    Component,
    Estimate,
    MemoryPlan,
    Suggestion,
    batch_geometry_checks,
    candidate_changes,
    estimate,
    minimal_vllm_utilization,
    suggestions,
    trainable_params,
)
from rlt.memory.terms import (
    ADAM8BIT_BYTES_PER_PARAM,
    NF4_BYTES_PER_PARAM,
    OPTIMIZERS,
    REWARD_LOGSOFTMAX_CHUNK,
    TRL_TOKEN_CHUNK,
    TRL_VOCAB_CHUNK,
    VLLM_MAX_BATCHED_TOKENS,
    VLLM_MAX_NUM_SEQS,
    VLLM_NON_TORCH,
    activation_bytes,
    deepspeed_cpu_bytes,
    deepspeed_model_state_bytes,
    fused_logits_bytes,
    gradient_bytes,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    logits_bytes,
    lora_activation_bytes_per_token,
    master_weight_bytes,
    nf4_weight_bytes,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    teacher_reward_scoring_bytes,
    vllm_activation_profile_bytes,
    vllm_kv_available_bytes,
    vllm_reservation_bytes,
    weight_bytes,
    weight_sync_bytes,
)
from rlt.memory.units import (
    DTYPE_BYTES,
    GB,
    GiB,
    format_bytes,
    parse_size,
)

__all__ = [
    "GB", "GiB", "DTYPE_BYTES", "parse_size", "format_bytes", "ModelArch", "MODULE_ALIASES", "param_count",
    "embedding_param_count", "largest_layer_params", "unknown_lora_modules", "lora_param_count", "lora_targets",
    "BUNDLED_ARCHS",
    "PUBLISHED_PARAMS", "bundled_arch", "arch_from_hf_config", "NF4_BYTES_PER_PARAM", "ADAM8BIT_BYTES_PER_PARAM",
    "OPTIMIZERS", "VLLM_NON_TORCH", "VLLM_MAX_BATCHED_TOKENS", "VLLM_MAX_NUM_SEQS", "weight_bytes",
    "nf4_weight_bytes", "gradient_bytes", "optimizer_state_bytes", "master_weight_bytes",
    "optimizer_step_temp_bytes", "deepspeed_model_state_bytes", "deepspeed_cpu_bytes",
    "layer_activation_bytes_per_token", "lora_activation_bytes_per_token", "activation_bytes", "logits_bytes",
    "TRL_TOKEN_CHUNK", "TRL_VOCAB_CHUNK", "fused_logits_bytes", "REWARD_LOGSOFTMAX_CHUNK",
    "teacher_reward_scoring_bytes", "kv_bytes_per_token", "vllm_reservation_bytes", "vllm_activation_profile_bytes",
    "vllm_kv_available_bytes", "weight_sync_bytes", "DEFAULT_FRAMEWORK_OVERHEAD", "MemoryPlan", "Component",
    "Check", "Estimate", "trainable_params", "estimate", "batch_geometry_checks", "Suggestion", "candidate_changes",
    "minimal_vllm_utilization", "suggestions",
]
