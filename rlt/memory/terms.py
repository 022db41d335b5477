"""The byte count of each memory term (pure functions over a `ModelArch`): model states, DeepSpeed shards,
activations, logits, reward scoring, vLLM. Each docstring gives the formula, its source and a hand-worked example
(asserted in tests/test_memory.py); `docs/memory.md` collects them."""

from __future__ import annotations

import math

from rlt.memory.arch import (
    ModelArch,
    largest_layer_params,
    lora_targets,
    param_count,
)
from rlt.memory.units import DTYPE_BYTES, GB

# bitsandbytes NF4 with double quantization (QLoRA): 4-bit codes, one 8-bit absmax per 64-weight block, one fp32
# second-level absmax per 256 blocks: 0.5 + 1/64 + 4/(64*256) bytes per weight (= 4.127 bits).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes 8-bit Adam: m and v as uint8 codes + one fp32 absmax per 2048-value block for each.
ADAM8BIT_BYTES_PER_PARAM = 2 * (1 + 4 / 2048)
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit")
# vLLM's non-torch memory inside its reservation (NCCL, cuBLAS; `non_torch_increase` of its profiler).
VLLM_NON_TORCH = GB // 2
# vLLM scheduler defaults that size its profiling forward (`max_num_batched_tokens`, `max_num_seqs`).
VLLM_MAX_BATCHED_TOKENS = 8192
VLLM_MAX_NUM_SEQS = 256


# ----------------------------------------------------------------------------------------------- model states

def weight_bytes(n_params: int, dtype: str) -> int:
    """Weights: n × bytes per parameter (float32 4, bfloat16/float16 2).

    Example: Qwen2.5-7B in bf16: 7,615,616,512 × 2 B = 15.23 GB.
    """
    return n_params * DTYPE_BYTES[dtype]


def nf4_weight_bytes(arch: ModelArch, compute_dtype: str = "bfloat16") -> int:
    """4-bit QLoRA weights: the block linears in NF4 with double quantization, the rest in the compute dtype.

    bitsandbytes quantizes every nn.Linear except the LM head; embeddings, norms and biases stay 16-bit.
    NF4 costs 0.5 B + 1/64 B (8-bit absmax per 64 weights) + 4/16384 B (fp32 absmax of 256 absmax blocks).
    Example, Qwen2.5-7B: 28 block linears hold 6,525,288,448 weights × 0.515869 B = 3.366 GB; the other
    1,090,328,064 (embed, lm_head, norms, biases) × 2 B = 2.181 GB; total 5.55 GB (vs 15.23 GB in bf16).
    """
    n_attn = arch.n_attention_layers
    linear = sum(n_attn * a * b for a, b in arch.linear_shapes("attention").values())
    linear += sum((arch.num_layers - n_attn) * a * b for a, b in arch.linear_shapes("conv").values())
    rest = param_count(arch) - linear
    return math.ceil(linear * NF4_BYTES_PER_PARAM) + rest * DTYPE_BYTES[compute_dtype]


def gradient_bytes(trainable: int, dtype: str) -> int:
    """Gradients: one per trainable parameter, in the parameter's dtype (torch `.grad`).

    Example: Qwen2.5-7B full fine-tuning in bf16: 7.62e9 × 2 B = 15.23 GB; LoRA r=16 (fp32 adapters):
    40,370,176 × 4 B = 0.16 GB.
    """
    return trainable * DTYPE_BYTES[dtype]


def optimizer_state_bytes(trainable: int, optimizer: str, state_dtype: str) -> int:
    """AdamW keeps m and v per trainable parameter.

    torch AdamW: 2 × n × bytes of the parameter dtype (fp32 params → 8 B/param; bf16 params without a master copy
    → 4 B/param). bitsandbytes 8-bit AdamW: 2 × n × (1 B + 4 B/2048 absmax) ≈ 2.004 B/param.
    Example: Qwen2.5-7B, fp32 states: 7.62e9 × 8 B = 60.92 GB; 8-bit: 7.62e9 × 2.004 B = 15.26 GB.
    """
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return math.ceil(trainable * ADAM8BIT_BYTES_PER_PARAM)
    return 2 * trainable * DTYPE_BYTES[state_dtype]


def master_weight_bytes(trainable: int) -> int:
    """fp32 master weights kept by mixed-precision optimizers (DeepSpeed) next to 16-bit model weights: 4 B/param.

    Example: Qwen2.5-7B: 7.62e9 × 4 B = 30.46 GB.
    """
    return 4 * trainable


def optimizer_step_temp_bytes(trainable: int, optimizer: str, state_dtype: str) -> int:
    """Transient memory of `optimizer.step()`.

    torch's foreach AdamW (`adamw_torch`) materialises `sqrt(v)` for all parameters at once: one state-sized
    buffer (n × state bytes). The fused kernel (`adamw_torch_fused`, transformers' default on torch ≥ 2.8) and
    bitsandbytes' 8-bit kernels update in place: 0.
    Example: Qwen2.5-7B, adamw_torch, fp32 states: 7.62e9 × 4 B = 30.46 GB.
    """
    return trainable * DTYPE_BYTES[state_dtype] if optimizer == "adamw_torch" else 0


def deepspeed_model_state_bytes(total_params: int, largest_layer: int, *, stage: int, num_gpus: int,
                                offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, int]:
    """Per-GPU model states under DeepSpeed ZeRO with bf16/fp16 (the formulas of DeepSpeed's own estimators).

    P params, G GPUs, Lmax the largest layer. 16-bit weights 2P, 16-bit grads 2P, fp32 grads 4P, fp32 master 4P,
    Adam m+v 8P (DeepSpeed's "18" = 2 + 4 + 4 + 8 is everything but the 16-bit weights):
    * ZeRO-1: weights 2P, 16-bit grads 2P, the rest (4+4+8)P/G (optimizer states partitioned).
    * ZeRO-2 (`estimate_zero2_model_states_mem_needs`): 2P + int(18P/G); optimizer offload: 2P.
    * ZeRO-3 (`estimate_zero3_model_states_mem_needs`): 4·Lmax + int(18P/G); optimizer offload: 4·Lmax +
      int(2P/G); params offload too: 4·Lmax.
    Example, Qwen2.5-7B, ZeRO-2, 1 GPU, no offload: 2·7.62e9 + 18·7.62e9 = 152.3 GB; on 8 GPUs: 15.23 + 17.14
    = 32.4 GB; ZeRO-3 on 8 GPUs: 2.18 + 17.14 = 19.3 GB.
    Returns the split {weights, gradients, master, optimizer}; the sum equals DeepSpeed's gpu_mem.
    """
    p, g = total_params, num_gpus
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    master, optimizer = int(4 * p / g), int(8 * p / g)
    if stage == 3:
        gather = 4 * largest_layer
        if offload_optimizer:
            weights = gather if offload_params else gather + int(2 * p / g)
            return {"weights": weights, "gradients": 0, "master": 0, "optimizer": 0}
        weights = gather + int(2 * p / g)
        # DeepSpeed's 18 includes the 2-byte parameter shard; the rest of it (4) is gradient partitions.
        return {"weights": weights, "gradients": gather + int(18 * p / g) - weights - master - optimizer,
                "master": master, "optimizer": optimizer}
    if offload_optimizer:
        if stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
        return {"weights": 2 * p, "gradients": 2 * p if stage == 1 else 0, "master": 0, "optimizer": 0}
    if stage == 2:
        return {"weights": 2 * p, "gradients": int(18 * p / g) - master - optimizer, "master": master,
                "optimizer": optimizer}
    if stage == 1:  # 16-bit gradients are not partitioned
        return {"weights": 2 * p, "gradients": 2 * p + int(4 * p / g), "master": master, "optimizer": optimizer}
    return {"weights": 2 * p, "gradients": 6 * p, "master": 4 * p, "optimizer": 8 * p}


def deepspeed_cpu_bytes(total_params: int, largest_layer: int, *, stage: int, num_gpus: int,
                        offload_optimizer: bool = False, offload_params: bool = False,
                        gpus_per_node: int | None = None, zero_init: bool = True, buffer_factor: float = 1.5) -> int:
    """Host RAM per node for model states, as DeepSpeed's estimators compute it (×1.5 buffer factor).

    ZeRO-2: offload P·max(4G, 16)·1.5, else P·4·gpn·1.5. ZeRO-3 (zero_init): params+optimizer offload 18P/N·1.5,
    optimizer offload 16P/N·1.5, none Lmax·4·gpn·1.5 (N nodes; one node here). ZeRO-0/1 are counted like ZeRO-2.
    Example: Qwen2.5-7B, ZeRO-2 + optimizer offload, 1 GPU: 7.62e9 × 16 × 1.5 = 182.8 GB of host RAM.
    """
    p, g = total_params, num_gpus
    gpn = gpus_per_node or g
    nodes = max(1, g // gpn)
    if stage == 3:
        if offload_optimizer:
            per = (18 if offload_params else 16) / nodes
            return int(p * (per if zero_init else max(4 * gpn, per)) * buffer_factor)
        return int((largest_layer * 4 * gpn if zero_init else p * 4 * gpn) * buffer_factor)
    if offload_optimizer:
        return int(p * max(4 * g, 16) * buffer_factor)
    return int(p * 4 * gpn * buffer_factor)


# ----------------------------------------------------------------------------------------------- activations

def layer_activation_bytes_per_token(arch: ModelArch, act_bytes: int, *, gqa_native: bool = True,
                                     attn_implementation: str = "sdpa", seq_len: int = 0,
                                     autocast_fp32_weights: bool = False, frozen_norms: bool = False) -> int:
    """Bytes autograd saves per token in one decoder layer (HF Llama/Qwen2 code, flash/SDPA attention, no dropout).

    a = activation bytes (2 for bf16/fp16, 4 for fp32). Counted from the tensors autograd saves (checked with
    `torch.autograd.graph.saved_tensors_hooks` on transformers 5.17, see docs/memory.md):
    * each RMSNorm: its input upcast to fp32 (4h) + the normalised value before the weight (a·h) + its output, the
      input of the next linears (a·h); frozen norm weights (LoRA) do not save the middle one;
    * attention: RoPE'd q (a·q), k and v (a·kv, or a·q each when `repeat_kv` expands them because SDPA gets a
      padding mask), the SDPA output, which is also o_proj's input (a·q), and the fp32 log-sum-exp (4·heads);
      eager attention also keeps the fp32 softmax and its a-byte copy: (4 + a)·heads·seq_len;
    * gated MLP: gate output, SiLU output, up output, their product (4·a·i);
    * autocast with fp32 weights keeps an fp32 residual stream (norms 4h + 4h) and one bf16 cast of the input per
      consuming linear (q, k, v: 3·2h; gate, up: 2·2h).
    Example, Qwen2.5-7B, bf16, flash: 2·(4+2+2)·3584 + 2·(2·3584 + 2·512) + 4·28 + 4·2·18944 = 225,392 B/token.
    """
    h, q, i, heads = arch.hidden_size, arch.q_dim, arch.intermediate_size, arch.num_heads
    kv = arch.kv_dim if (gqa_native and attn_implementation != "eager") else q
    if autocast_fp32_weights:
        norms = (4 + 4) * h * 2 + 2 * h * 3 + 2 * h * 2
        a = 2
    else:
        a = act_bytes
        norms = 2 * (4 + (0 if frozen_norms else a) + a) * h
    attention = a * (2 * q + 2 * kv) + 4 * heads
    if attn_implementation == "eager":
        attention += (4 + a) * heads * seq_len
    mlp = 4 * a * i
    return norms + attention + mlp


def lora_activation_bytes_per_token(arch: ModelArch, act_bytes: int, target_modules: tuple[str, ...] | list[str],
                                    r: int, dropout: float, adapter_bytes: int = 4, mask_bytes: int = 1) -> int:
    """Per token and layer: what LoRA adds to (or removes from) the saved activations of full fine-tuning.

    Frozen base linears do not save their input; each adapter's A saves what it reads, and B saves A's output
    (adapter_bytes·r). peft keeps adapters in fp32 (`autocast_adapter_dtype`), so on a 16-bit base each wrapped
    linear casts its input: one fp32 copy per wrapped module (4·in). With lora_dropout > 0 each wrapped module
    keeps its dropout output (4·in) and mask: a bool (1·in) on CUDA, a float noise tensor (4·in) on CPU. On an fp32
    base without dropout the adapters share the base input (already counted), so only the r-sized outputs are added.
    Base inputs no longer saved (16-bit base or dropout): −a·h for the attention input and the MLP input, −a·i for
    the down_proj input; the layer-0 input saves nothing (the frozen embedding has no grad), ignored here.
    Example, SmolLM2-135M fp32 (h 576, q 576, kv 192, i 1536), r 16, all-linear, dropout 0.05:
    per layer (4+4)·(6·576 + 1536) − 4·(576 + 576 + 1536) + 4·16·7 = 39,936 − 10,752 + 448 = 29,632 B/token
    with CPU masks (mask_bytes=4); (4+1)·4992 − 10,752 + 448 = 14,656 B/token with CUDA's bool masks.
    """
    targets = lora_targets(arch, target_modules)["attention"]
    if not targets:
        return 0
    shapes = arch.linear_shapes("attention")
    sum_in = sum(shapes[m][0] for m in targets)
    outputs = adapter_bytes * r * len(targets)
    if act_bytes == adapter_bytes and dropout == 0:
        return outputs
    per_module = adapter_bytes + (mask_bytes if dropout > 0 else 0)
    base_inputs = act_bytes * (arch.hidden_size * (bool(targets & {"q_proj", "k_proj", "v_proj"})
                                                   + bool(targets & {"gate_proj", "up_proj"}))
                               + arch.intermediate_size * ("down_proj" in targets))
    return per_module * sum_in - base_inputs + outputs


def activation_bytes(arch: ModelArch, *, micro_batch: int, seq_len: int, act_bytes: int,
                     gradient_checkpointing: bool, gqa_native: bool = True, attn_implementation: str = "sdpa",
                     autocast_fp32_weights: bool = False, lora: tuple | None = None, mask_bytes: int = 1,
                     recompute: bool = True) -> int:
    """Saved activations of one micro-batch at the end of the forward pass (peak of the backward pass).

    tokens = micro_batch × seq_len. Without checkpointing: tokens × (L × layer + final norm (4+2a)·h).
    With gradient checkpointing (HF, use_reentrant=False) each layer keeps only its input (a·h per token; 4h with
    an fp32 residual stream), and the backward pass recomputes one layer at a time:
    tokens × (L·a·h + final norm) + tokens × layer (`recompute=False` leaves out the recomputed layer; the
    estimate counts it only beyond the loss buffers freed before it exists, see `estimate`).
    `lora` = (target_modules, r, dropout) adds `lora_activation_bytes_per_token` per layer.
    Example, Qwen2.5-7B bf16, batch 1 × 4096 tokens: 4096 × (28 × 225,392 + 8·3584) = 25.97 GB; with
    checkpointing 4096 × (28·2·3584 + 8·3584) + 4096 × 225,392 = 0.94 + 0.92 = 1.86 GB.
    """
    tokens = micro_batch * seq_len
    layer = layer_activation_bytes_per_token(arch, act_bytes, gqa_native=gqa_native,
                                             attn_implementation=attn_implementation, seq_len=seq_len,
                                             autocast_fp32_weights=autocast_fp32_weights,
                                             frozen_norms=lora is not None)
    if lora is not None:
        targets, r, dropout = lora
        layer += lora_activation_bytes_per_token(arch, act_bytes, targets, r, dropout, mask_bytes=mask_bytes)
    stream = 4 if autocast_fp32_weights else act_bytes
    final_norm = (4 + 2 * stream) * arch.hidden_size
    if gradient_checkpointing:
        return (tokens * (arch.num_layers * stream * arch.hidden_size + final_norm)
                + (tokens * layer if recompute else 0))
    return tokens * (arch.num_layers * layer + final_norm)


def logits_bytes(tokens: int, vocab_size: int, logits_dtype_bytes: int, *, backward: bool = True) -> int:
    """The logits and log-softmax buffers of the loss, live at the start of the backward pass.

    The logits (a·V per token) stay alive in the model output; the loss upcasts them and log_softmax keeps its
    fp32 output (4V); backward then holds the fp32 gradient of the log-softmax (4V) and of the logits (4V):
    tokens × V × (a + 12). Without backward (reference / student scoring): logits + fp32 copy + log-softmax =
    tokens × V × (a + 8). Measured exactly on CPU in fp32 and bf16 (docs/memory.md).
    Example, Qwen2.5-7B, 4096 tokens, bf16 logits: 4096 × 152,064 × 14 B = 8.72 GB.
    """
    return tokens * vocab_size * (logits_dtype_bytes + (12 if backward else 8))


TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768


def fused_logits_bytes(tokens: int, arch: ModelArch, *, lm_head_trainable: bool) -> int:
    """TRL ≥ 1.16 GRPO log-probs (`trl/kernels/chunked_logprob.py`): the [tokens, V] logits are never built.

    A fp32 tile of 4096 tokens × 32768 vocab (and its gradient tile), the fp32 gradient of the hidden states
    (tokens × h × 4) and, when the LM head trains, its fp32 gradient accumulator (V × h × 4):
    2·min(N,4096)·min(V,32768)·4 + N·h·4 (+ V·h·4).
    Example, Qwen2.5-7B, 18,432 tokens, full fine-tuning: 1.07 + 0.26 + 2.18 = 3.52 GB.
    """
    tile = 2 * min(tokens, TRL_TOKEN_CHUNK) * min(arch.vocab_size, TRL_VOCAB_CHUNK) * 4
    head = arch.vocab_size * arch.hidden_size * 4 if lm_head_trainable else 0
    return tile + tokens * arch.hidden_size * 4 + head


REWARD_LOGSOFTMAX_CHUNK = 512  # = rlt.rewards.teacher_math._LOGSOFTMAX_CHUNK (this module imports no torch; tested)


def teacher_reward_scoring_bytes(arch: ModelArch, batch: int, tokens: int, dtype_bytes: int,
                                 tokens_per_forward: int = 8192) -> int:
    """The buffers of the RLT teacher reward's no-grad scoring (`rlt.rewards.TeacherKLReward`) in a `dtype_bytes`
    model: `batch` sequences (``teacher_reward_batch_size``) of up to `tokens` tokens, at most
    `tokens_per_forward` positions per forward (``teacher_reward_tokens_per_forward``; longer batches run in
    chunks on the KV cache). With ``n = min(batch·tokens, tokens_per_forward)``: the logits of one forward
    (n·V·a), two fp32 log-softmax chunks of 512 positions (2·512·V·4), one layer's MLP input/gate/up tensors
    (n·(h + 2i)·a), and the KV cache of the batch: the shared prefix, its per-piece copy and the suffixes,
    at most 2·batch·tokens·kv.
    Example, Qwen2.5-7B, batch 2, 12,288 tokens, bf16, 8192 per forward: 2.49 + 0.62 + 0.68 + 2.82 = 6.61 GB.
    """
    n = min(batch * tokens, tokens_per_forward)
    logits = n * arch.vocab_size * dtype_bytes
    chunks = 2 * REWARD_LOGSOFTMAX_CHUNK * arch.vocab_size * 4
    layer = n * (arch.hidden_size + 2 * arch.intermediate_size) * dtype_bytes
    kv = 2 * batch * tokens * kv_bytes_per_token(arch, dtype_bytes)
    return logits + chunks + layer + kv


# ----------------------------------------------------------------------------------------------- vLLM

def kv_bytes_per_token(arch: ModelArch, dtype_bytes: int = 2) -> int:
    """KV cache per token: 2 (K and V) × attention layers × kv heads × head_dim × dtype bytes (vLLM's page size).

    vLLM (`v1/kv_cache_interface.py`): page_bytes = block × kv_heads × (head_size + head_size_v) × dtype bytes
    per layer. Example, Qwen2.5-7B bf16: 2 × 28 × 4 × 128 × 2 = 57,344 B (56 KiB).
    """
    return 2 * arch.n_attention_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes


def vllm_reservation_bytes(utilization: float, gpu_memory: int) -> int:
    """What a vLLM engine claims: ceil(gpu_memory_utilization × TOTAL GPU memory) (vLLM `request_memory`).

    Example: 0.55 × 85 GB = 46.75 GB.
    """
    return math.ceil(utilization * gpu_memory)


def vllm_activation_profile_bytes(arch: ModelArch, dtype_bytes: int = 2,
                                  max_batched_tokens: int = VLLM_MAX_BATCHED_TOKENS,
                                  max_num_seqs: int = VLLM_MAX_NUM_SEQS) -> int:
    """vLLM's profiling forward peak (approximation): a no-grad forward of `max_num_batched_tokens` tokens keeps
    one layer's widest tensors (qkv, 2 × MLP intermediate, 2 × hidden) plus fp32 logits and sampler probabilities
    for `max_num_seqs` sequences.

    T·b·(2h + q + 2kv + 2i) + seqs·V·8. Example, Qwen2.5-7B: 8192·2·(7168 + 3584 + 1024 + 37888) + 256·152064·8
    = 0.814 + 0.311 = 1.125 GB.
    """
    width = 2 * arch.hidden_size + arch.q_dim + 2 * arch.kv_dim + 2 * arch.intermediate_size
    return max_batched_tokens * dtype_bytes * width + min(max_num_seqs, max_batched_tokens) * arch.vocab_size * 8


def vllm_kv_available_bytes(reservation: int, weights: int, activation_profile: int,
                            non_torch: int = VLLM_NON_TORCH) -> int:
    """KV cache vLLM allocates: reservation − weights − profile activations − non-torch memory (vLLM
    `gpu_worker.determine_available_memory`). Example, Qwen2.5-7B at 0.55 of 85 GB:
    46.75 − 15.23 − 1.13 − 0.50 = 29.89 GB (27.8 GiB, 521,000 tokens at 57,344 B/token)."""
    return reservation - weights - activation_profile - non_torch


def weight_sync_bytes(arch: ModelArch, weight_dtype_bytes: int, *, use_peft: bool) -> int:
    """Headroom for pushing the policy's weights into vLLM before a generation.

    Full fine-tuning: parameters go one by one (gathered under ZeRO-3, made contiguous / cast): 2 × largest
    layer × bytes. LoRA: adapters are merged per module, ΔW = B·A in fp32 plus its cast: 2 × largest linear × 4 B.
    Example, Qwen2.5-7B full: 2 × 544,997,376 × 2 B = 2.18 GB.
    """
    if use_peft:
        largest_linear = max(a * b for a, b in arch.linear_shapes("attention").values())
        return 2 * largest_linear * 4
    return 2 * largest_layer_params(arch) * weight_dtype_bytes
