"""GPU memory estimate of a training step: pure functions over a `ModelArch` and a `MemoryPlan`.

Nothing here imports torch, transformers or the config: `rlt.memcheck` turns a composed run config into a
`MemoryPlan`, and this module turns the plan into bytes. Every term is its own function whose docstring gives the
formula, where it comes from, and a hand-worked example (the same numbers are asserted in tests/test_memory.py).
Sizes are bytes (int); "GB" in docstrings and output means 10^9 bytes, "GiB" 2^30 bytes.

A step has phases, and each phase has its own set of live tensors; the peak of the step is the largest phase:

* `forward/backward`: weights, optimizer states, gradients, saved activations of one micro-batch and the
  logits/log-softmax buffers at the start of the backward pass;
* `optimizer step`: weights, all gradients, optimizer states (and their temporaries);
* RL only, `generation`: the trainer's resident state plus the colocated vLLM reservation and the weight-sync
  buffer (gradients were freed by the previous `zero_grad(set_to_none=True)`);
* RL only, `scoring`: no-grad forwards of the reference / student (logits of one micro-batch).

A colocated vLLM engine keeps its whole reservation in every phase unless sleep mode releases it between
generations. `docs/memory.md` has every formula with its source and the measured CPU benchmark.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

GB = 10**9
GiB = 2**30

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# bitsandbytes NF4 with double quantization (QLoRA): 4-bit codes, one 8-bit absmax per 64-weight block, one fp32
# second-level absmax per 256 blocks: 0.5 + 1/64 + 4/(64*256) bytes per weight (= 4.127 bits).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes 8-bit Adam: m and v as uint8 codes + one fp32 absmax per 2048-value block for each.
ADAM8BIT_BYTES_PER_PARAM = 2 * (1 + 4 / 2048)
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit")
# CUDA context + cuBLAS/cuDNN workspaces + NCCL buffers of one training process (typical 0.5-1.5 GB on H100).
DEFAULT_FRAMEWORK_OVERHEAD = 1 * GB
# vLLM's non-torch memory inside its reservation (NCCL, cuBLAS; `non_torch_increase` of its profiler).
VLLM_NON_TORCH = GB // 2
# vLLM scheduler defaults that size its profiling forward (`max_num_batched_tokens`, `max_num_seqs`).
VLLM_MAX_BATCHED_TOKENS = 8192
VLLM_MAX_NUM_SEQS = 256


# ----------------------------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class ModelArch:
    """The few numbers of a decoder-only transformer that memory depends on (a Llama/Qwen2-style block).

    `attention_layers` < `num_layers` describes hybrids like LFM2, whose other layers are gated short convolutions
    (in_proj h→3h, out_proj h→h, a depth-wise kernel of `conv_kernel` taps) and hold no KV cache.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    qk_norm: bool = False  # LFM2 / Qwen3 normalise q and k per head
    attention_layers: int | None = None  # None = every layer is attention
    conv_kernel: int = 0
    checkpoint_dtype: str | None = None  # what torch_dtype=auto loads (config.json `torch_dtype`/`dtype`)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def n_attention_layers(self) -> int:
        return self.num_layers if self.attention_layers is None else self.attention_layers

    def linear_shapes(self, kind: str = "attention") -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block, by its Llama/Qwen2 module name."""
        h, i = self.hidden_size, self.intermediate_size
        mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if kind == "conv":
            return {"in_proj": (h, 3 * h), "out_proj": (h, h), **mlp}
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), **mlp}


# Other names of the same modules (LFM2: w1/w3/w2 = gate/up/down, out_proj = o_proj in attention blocks).
MODULE_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "dense": "o_proj"}


def param_count(arch: ModelArch) -> int:
    """Total parameters, tied embeddings counted once (what `model.num_parameters()` reports).

    embed V·h (+ lm_head V·h if untied) + per attention layer [q,o: 2·h·q; k,v: 2·h·kv; q/k/v biases; q/k norms;
    gated MLP 3·h·i; 2 RMSNorms 2·h] + per conv layer [4·h² + h·kernel + 3·h·i + 2·h] + final norm h.

    Example, Qwen2.5-7B (h 3584, 28 layers, q 3584, kv 512, i 18944, V 152064, untied, qkv bias):
    layer = 2·3584·3584 + 2·3584·512 + (3584+1024) + 3·3584·18944 + 2·3584 = 233,057,792;
    total = 28 × 233,057,792 + 2 × 152064·3584 + 3584 = 7,615,616,512 (model card: 7.61B).
    """
    h, q, kv = arch.hidden_size, arch.q_dim, arch.kv_dim
    mlp = 3 * h * arch.intermediate_size
    attn = 2 * h * q + 2 * h * kv + (q + 2 * kv if arch.qkv_bias else 0) + (2 * arch.head_dim if arch.qk_norm else 0)
    conv = h * 3 * h + h * h + h * arch.conv_kernel
    n_attn = arch.n_attention_layers
    layers = n_attn * (attn + mlp + 2 * h) + (arch.num_layers - n_attn) * (conv + mlp + 2 * h)
    embeddings = arch.vocab_size * h * (1 if arch.tie_embeddings else 2)
    return embeddings + layers + h


def embedding_param_count(arch: ModelArch) -> int:
    """Parameters of the input embedding and (if untied) the LM head: V·h·(1 or 2)."""
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)


def largest_layer_params(arch: ModelArch) -> int:
    """The largest single module's own parameters (DeepSpeed ZeRO-3's `largest_layer_params`, `recurse=False`).

    Almost always the embedding (or LM head): Qwen2.5-7B: 152064 × 3584 = 544,997,376.
    """
    shapes = [a * b for kind in ("attention", "conv") for a, b in arch.linear_shapes(kind).values()]
    return max([arch.vocab_size * arch.hidden_size, *shapes])


def _target_modules(arch: ModelArch, target_modules: tuple[str, ...] | list[str]) -> dict[str, set[str]]:
    """Which linear modules of an attention / conv block LoRA wraps (peft's `all-linear` = all but the LM head)."""
    out: dict[str, set[str]] = {}
    for kind in ("attention", "conv"):
        names = set(arch.linear_shapes(kind))
        if "all-linear" in target_modules:
            out[kind] = names
        else:
            wanted = {MODULE_ALIASES.get(m, m) for m in target_modules}
            if kind == "conv" and "out_proj" in target_modules:
                wanted.add("out_proj")
            out[kind] = names & wanted
    return out


def unknown_lora_modules(arch: ModelArch, target_modules: tuple[str, ...] | list[str]) -> list[str]:
    """Target module names that match no linear layer of `arch` (they would add no adapter)."""
    known = {*arch.linear_shapes("attention"), *arch.linear_shapes("conv"), *MODULE_ALIASES, "all-linear"}
    return [m for m in target_modules if m not in known]


def lora_param_count(arch: ModelArch, r: int, target_modules: tuple[str, ...] | list[str] = ("all-linear",)) -> int:
    """Trainable LoRA parameters: Σ over wrapped linears of r·(in + out) (A is r×in, B is out×r).

    Example, Qwen2.5-7B, r=16, all-linear: per layer 16·[(3584+3584)·2 + (3584+512)·2 + (3584+18944)·3]
    = 16·(14336 + 8192 + 67584) = 1,441,792; × 28 layers = 40,370,176 (0.53% of 7.6B).
    """
    targets = _target_modules(arch, target_modules)
    n_attn = arch.n_attention_layers
    total = 0
    for kind, layers in (("attention", n_attn), ("conv", arch.num_layers - n_attn)):
        shapes = arch.linear_shapes(kind)
        total += layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in targets[kind])
    return total


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
                        offload_optimizer: bool = False, offload_params: bool = False, gpus_per_node: int | None = None,
                        zero_init: bool = True, buffer_factor: float = 1.5) -> int:
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
    keeps its dropout output (4·in) and mask: a bool (1·in) on CUDA, a float noise tensor (4·in) on CPU. On an fp32 base without dropout the adapters share the base input
    (already counted), so only the r-sized outputs are added.
    Base inputs no longer saved (16-bit base or dropout): −a·h for the attention input and the MLP input, −a·i for
    the down_proj input; the layer-0 input saves nothing (the frozen embedding has no grad), ignored here.
    Example, SmolLM2-135M fp32 (h 576, q 576, kv 192, i 1536), r 16, all-linear, dropout 0.05:
    per layer (4+4)·(6·576 + 1536) − 4·(576 + 576 + 1536) + 4·16·7 = 39,936 − 10,752 + 448 = 29,632 B/token
    with CPU masks (mask_bytes=4); (4+1)·4992 − 10,752 + 448 = 14,656 B/token with CUDA's bool masks.
    """
    targets = _target_modules(arch, target_modules)["attention"]
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
        return tokens * (arch.num_layers * stream * arch.hidden_size + final_norm) + (tokens * layer if recompute else 0)
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


def vllm_activation_profile_bytes(arch: ModelArch, dtype_bytes: int = 2, max_batched_tokens: int = VLLM_MAX_BATCHED_TOKENS,
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


# ----------------------------------------------------------------------------------------------- plan

@dataclass
class MemoryPlan:
    """Everything the estimate depends on, in model/hardware terms (see `rlt.memcheck.plan_from_config`)."""

    policy: ModelArch
    weight_dtype: str = "bfloat16"  # float32 | bfloat16 | float16: the loaded weights
    compute_dtype: str = "bf16"  # bf16 | fp16 | fp32: the activations (mixed precision)
    load_in_4bit: bool = False
    use_peft: bool = False
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    optimizer: str = "adamw_torch_fused"
    gradient_checkpointing: bool = False
    micro_batch: int = 1  # per_device_train_batch_size
    seq_len: int = 1024  # tokens per sequence in the loss forward
    logits_tokens: int | None = None  # tokens per sequence with logits (None = seq_len)
    grad_accum: int = 1
    attn_implementation: str = "sdpa"
    attention_mask: bool = True  # padded batches: SDPA gets a mask and HF expands k/v (`repeat_kv`)
    logits_mode: str = "full"  # full: HF loss over [tokens, V] logits | fused: TRL's chunked log-prob kernel
    dropout_mask_bytes: int = 1  # LoRA dropout mask: bool on CUDA (1), float noise on CPU (4)
    train_batch_size: int | None = None
    # RL (algorithm grpo / rlt)
    algorithm: str = "sft"
    reference_model: bool = False  # a separate frozen copy of the policy (beta > 0 without LoRA)
    reference_offload: bool = False
    student: ModelArch | None = None  # RLT: a separate frozen student
    student_offload: bool = False
    vllm_mode: str | None = None  # None (HF generate) | colocate | server
    vllm_gpu_memory_utilization: float = 0.3
    vllm_sleep: bool = False
    vllm_kv_dtype_bytes: int = 2
    vllm_kv_cache_bytes: int | None = None  # fixed KV cache (vLLM kv_cache_memory_bytes): no utilization sizing
    reward_batch: int = 8  # RLT: teacher_reward_batch_size, completions per scoring forward of the reward
    reward_tokens_per_forward: int = 8192  # RLT: teacher_reward_tokens_per_forward
    num_generations: int = 8
    prompt_len: int = 512
    completion_len: int = 512
    generation_round: int | None = None  # completions per generation round and engine (None = train_batch_size)
    generation_aggregation_steps: int | None = None
    vllm_gpus: int = 1  # server mode: GPUs running vLLM (one engine each)
    vllm_server_utilization: float = 0.9
    # hardware
    gpu_memory: int = 85 * GB
    margin: int | None = None  # None = 5% of gpu_memory
    num_gpus: int = 1
    zero_stage: int | None = None  # None = no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False
    framework_overhead: int = DEFAULT_FRAMEWORK_OVERHEAD
    notes: list[str] = field(default_factory=list)

    @property
    def is_rl(self) -> bool:
        return self.algorithm in ("grpo", "rlt")

    @property
    def margin_bytes(self) -> int:
        return int(0.05 * self.gpu_memory) if self.margin is None else self.margin

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage is not None or self.offload_optimizer or self.offload_params

    @property
    def effective_zero_stage(self) -> int | None:
        if self.zero_stage is not None:
            return self.zero_stage
        if self.offload_params:
            return 3
        return 2 if self.offload_optimizer else None


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Check:
    name: str
    ok: bool
    message: str
    severity: str = "fail"  # fail: makes the verdict FAIL; warn: reported only


@dataclass
class Estimate:
    plan: MemoryPlan
    phases: dict[str, list[Component]]
    peak_phase: str
    checks: list[Check]
    params: int
    trainable: int
    host_bytes: int = 0  # CPU RAM for offloaded states / models
    vllm: dict[str, int] = field(default_factory=dict)
    server: list[Component] | None = None  # a vLLM server GPU (mode=server)

    @property
    def components(self) -> list[Component]:
        return self.phases[self.peak_phase]

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def budget(self) -> int:
        return self.plan.gpu_memory

    @property
    def fits(self) -> bool:
        return self.total + self.plan.margin_bytes <= self.plan.gpu_memory

    @property
    def passed(self) -> bool:
        return self.fits and all(c.ok for c in self.checks if c.severity == "fail")

    def phase_totals(self) -> dict[str, int]:
        return {name: sum(c.bytes for c in comps) for name, comps in self.phases.items()}

    def to_dict(self) -> dict:
        return {
            "verdict": "PASS" if self.passed else "FAIL",
            "unit": "bytes",
            "gpu_memory": self.plan.gpu_memory, "margin": self.plan.margin_bytes, "total": self.total,
            "headroom": self.plan.gpu_memory - self.plan.margin_bytes - self.total,
            "peak_phase": self.peak_phase, "phase_totals": self.phase_totals(),
            "components": [dataclasses.asdict(c) for c in self.components],
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "params": self.params, "trainable_params": self.trainable, "host_bytes": self.host_bytes,
            "vllm": self.vllm, "vllm_server_gpu": [dataclasses.asdict(c) for c in self.server or []],
            "notes": list(self.plan.notes),
        }


def _fmt(n: float) -> str:
    return f"{n / GB:.2f} GB"


def trainable_params(plan: MemoryPlan) -> int:
    if plan.use_peft:
        return lora_param_count(plan.policy, plan.lora_r, plan.lora_target_modules)
    return param_count(plan.policy)


def _act_bytes(plan: MemoryPlan) -> int:
    if plan.compute_dtype in ("bf16", "fp16") or plan.load_in_4bit:
        return 2
    return DTYPE_BYTES[plan.weight_dtype]


def _frozen_weights(arch: ModelArch, plan: MemoryPlan, *, student: bool = False) -> int:
    """A frozen reference / student copy: 16-bit (fp32 if the policy loads in fp32). TRL's reference model is
    sharded under ZeRO-3 (a DeepSpeed engine); a separately loaded student is a plain model, whole on every GPU."""
    dtype = "float32" if DTYPE_BYTES[plan.weight_dtype] == 4 and not plan.uses_deepspeed else "bfloat16"
    shards = plan.num_gpus if plan.effective_zero_stage == 3 and not student else 1
    return weight_bytes(param_count(arch), dtype) // shards


def _model_states(plan: MemoryPlan, params: int, trainable: int) -> tuple[list[Component], int]:
    """(weights, gradients, master, optimizer) components resident on one GPU, and the host RAM they need."""
    arch, stage = plan.policy, plan.effective_zero_stage
    if stage is not None:
        lmax = largest_layer_params(arch)
        frozen = params - trainable if plan.use_peft else 0
        ds = deepspeed_model_state_bytes(trainable, lmax if not plan.use_peft else 0, stage=stage,
                                         num_gpus=plan.num_gpus, offload_optimizer=plan.offload_optimizer,
                                         offload_params=plan.offload_params)
        frozen_bytes = 2 * frozen // (plan.num_gpus if stage == 3 else 1)
        if plan.use_peft and stage == 3:
            frozen_bytes += 4 * lmax
        off = " (optimizer offloaded to CPU)" if plan.offload_optimizer else ""
        where = f"ZeRO-{stage} on {plan.num_gpus} GPU(s){off}"
        comps = [
            Component("policy weights", ds["weights"] + frozen_bytes,
                      f"16-bit, {where}" + (", + 4×largest layer gather buffer" if stage == 3 else "")),
            Component("gradients", ds["gradients"], "16-bit + fp32 partitions" if ds["gradients"] else
                      "partitioned to CPU with the optimizer"),
            Component("fp32 master weights", ds["master"], "mixed precision (DeepSpeed)" if ds["master"] else
                      "on CPU" if plan.offload_optimizer else "none"),
            Component("optimizer states", ds["optimizer"], "AdamW fp32 m+v" + ("" if ds["optimizer"] else ", on CPU")),
        ]
        host = deepspeed_cpu_bytes(trainable, lmax, stage=stage, num_gpus=plan.num_gpus,
                                   offload_optimizer=plan.offload_optimizer, offload_params=plan.offload_params)
        return comps, host
    if plan.load_in_4bit:
        weights = Component("policy weights", nf4_weight_bytes(arch), "4-bit NF4 linears (+double-quant absmax), "
                                                                      "16-bit embeddings/norms")
    else:
        weights = Component("policy weights", weight_bytes(params, plan.weight_dtype), plan.weight_dtype)
    grad_dtype = "float32" if plan.use_peft else plan.weight_dtype
    kind = "LoRA adapters (fp32)" if plan.use_peft else f"full fine-tuning ({grad_dtype})"
    comps = [
        weights,
        Component("gradients", gradient_bytes(trainable, grad_dtype), f"{trainable / 1e6:,.1f}M trainable, {kind}"),
        Component("fp32 master weights", 0, "none: torch AdamW updates the weights in their own dtype"
                  + (" (the fp32 weights are the master copy)" if DTYPE_BYTES[plan.weight_dtype] == 4 else "")),
        Component("optimizer states", optimizer_state_bytes(trainable, plan.optimizer, grad_dtype),
                  f"{plan.optimizer}: m+v in "
                  + ("8 bit" if "8bit" in plan.optimizer else grad_dtype)),
    ]
    return comps, 0


def _activation_components(plan: MemoryPlan) -> list[Component]:
    arch, a = plan.policy, _act_bytes(plan)
    autocast = plan.compute_dtype != "fp32" and DTYPE_BYTES[plan.weight_dtype] == 4 and not plan.load_in_4bit
    gqa = not plan.attention_mask or plan.attn_implementation.startswith("flash_attention")
    lora = (plan.lora_target_modules, plan.lora_r, plan.lora_dropout) if plan.use_peft else None
    acts = activation_bytes(arch, micro_batch=plan.micro_batch, seq_len=plan.seq_len, act_bytes=a,
                            gradient_checkpointing=plan.gradient_checkpointing, gqa_native=gqa,
                            attn_implementation=plan.attn_implementation, autocast_fp32_weights=autocast, lora=lora,
                            mask_bytes=plan.dropout_mask_bytes)
    logit_tokens = plan.micro_batch * (plan.logits_tokens or plan.seq_len)
    recompute_note = ""
    if plan.gradient_checkpointing:
        # The recomputed layer only exists after the loss buffers are gone: it adds only what exceeds them.
        layer = activation_bytes(arch, micro_batch=plan.micro_batch, seq_len=plan.seq_len, act_bytes=a,
                                 gradient_checkpointing=True, gqa_native=gqa,
                                 attn_implementation=plan.attn_implementation, autocast_fp32_weights=autocast,
                                 lora=lora, mask_bytes=plan.dropout_mask_bytes) - activation_bytes(
            arch, micro_batch=plan.micro_batch, seq_len=plan.seq_len, act_bytes=a, gradient_checkpointing=True,
            gqa_native=gqa, attn_implementation=plan.attn_implementation, autocast_fp32_weights=autocast,
            lora=None, mask_bytes=plan.dropout_mask_bytes, recompute=False)
        freed = 0 if plan.logits_mode == "fused" else logit_tokens * arch.vocab_size * 12
        acts -= min(layer, freed)
        recompute_note = f" (+ one recomputed layer, {_fmt(max(0, layer - freed))} beyond the freed loss buffers)"
    if plan.logits_mode == "fused":
        logits = fused_logits_bytes(logit_tokens, arch, lm_head_trainable=not plan.use_peft)
        how = f"TRL chunked log-probs over {logit_tokens:,} tokens (4096 × 32768 fp32 tiles + fp32 grads)"
    else:
        logits = logits_bytes(logit_tokens, arch.vocab_size, 2 if autocast else a)
        how = f"{logit_tokens:,} tokens × {arch.vocab_size:,} vocab × {(2 if autocast else a) + 12} B"
    gc = "gradient checkpointing" if plan.gradient_checkpointing else "no gradient checkpointing"
    return [
        Component("activations", acts, f"micro-batch {plan.micro_batch} × {plan.seq_len} tokens, {gc}{recompute_note}, "
                                       f"{'bf16 autocast' if autocast else f'{a}-byte'} activations"),
        Component("logits / log-softmax", logits, how),
    ]


def estimate(plan: MemoryPlan) -> Estimate:
    """Per-phase GPU memory of one training step under `plan`, the peak phase, and the plan's checks."""
    arch = plan.policy
    params = param_count(arch)
    trainable = trainable_params(plan)
    states, host = _model_states(plan, params, trainable)
    weights, grads, master, optim = states
    checks = batch_geometry_checks(plan)
    overhead = Component("framework overhead", plan.framework_overhead, "CUDA context, cuBLAS/NCCL workspaces")
    zero_grads = dataclasses.replace(grads, bytes=0, note="freed by zero_grad(set_to_none=True)")
    if plan.uses_deepspeed:
        zero_grads = grads  # DeepSpeed keeps its gradient partitions allocated
    # Gradients during the backward pass: all of them from the second micro-batch on (accumulation), else only
    # those allocated before the activations start to be freed (the LM head / tied embedding).
    # With gradient checkpointing the saved activations are small, so the late backward pass (almost every
    # gradient allocated, one layer recomputed) is the peak: count all gradients then too.
    if plan.uses_deepspeed or plan.grad_accum > 1 or plan.gradient_checkpointing:
        fb_grads = grads
    else:
        head = 0 if plan.use_peft else arch.vocab_size * arch.hidden_size * DTYPE_BYTES[plan.weight_dtype]
        fb_grads = dataclasses.replace(grads, bytes=head, note="grad_accum=1: only the LM-head gradient exists "
                                                               "when the backward pass starts")
    state_dtype = "float32" if plan.use_peft else plan.weight_dtype
    temp = 0 if plan.uses_deepspeed else optimizer_step_temp_bytes(trainable, plan.optimizer, state_dtype)

    # frozen models
    extra: list[Component] = []
    if plan.reference_model:
        ref_w = _frozen_weights(arch, plan)
        extra.append(Component("reference model", 0 if plan.reference_offload else ref_w,
                               "offloaded to CPU" if plan.reference_offload else f"{_fmt(ref_w)} frozen copy on GPU"))
        host += ref_w if plan.reference_offload else 0
    elif plan.is_rl:
        why = "LoRA: the policy with the adapter disabled" if plan.use_peft else "beta=0: no KL term"
        extra.append(Component("reference model", 0, f"none ({why})"))
    if plan.student is not None:
        st_w = _frozen_weights(plan.student, plan, student=True)
        extra.append(Component("student model", 0 if plan.student_offload else st_w,
                               "offloaded to CPU" if plan.student_offload else f"{_fmt(st_w)} frozen on GPU"))
        host += st_w if plan.student_offload else 0
    elif plan.algorithm == "rlt":
        extra.append(Component("student model", 0, "the reference model acts as the student"))

    phases: dict[str, list[Component]] = {}
    vllm_info: dict[str, int] = {}
    vllm_comp: list[Component] = []
    server: list[Component] | None = None
    if plan.is_rl and plan.vllm_mode == "colocate":
        vllm_comp, vllm_info, vchecks = _vllm(plan, plan.vllm_gpu_memory_utilization, plan.gpu_memory)
        checks += vchecks
    elif plan.is_rl and plan.vllm_mode == "server":
        server, vllm_info, vchecks = _vllm(plan, plan.vllm_server_utilization, plan.gpu_memory)
        server = server + [Component("framework overhead", plan.framework_overhead, "vLLM server process")]
        checks += vchecks
    asleep = [dataclasses.replace(c, bytes=0, note="asleep (sleep mode): released between generations")
              for c in vllm_comp] if plan.vllm_sleep else vllm_comp

    acts = _activation_components(plan)
    no_acts = [Component("activations", 0, ""), Component("logits / log-softmax", 0, "")]
    phases["forward/backward"] = [weights, fb_grads, master, optim, *acts, *extra, *asleep, overhead]
    phases["optimizer step"] = [weights, grads, master, dataclasses.replace(optim, bytes=optim.bytes + temp, note=optim.note
                                + (f" + {_fmt(temp)} foreach temporaries" if temp else "")),
                                *no_acts, *extra, *asleep, overhead]
    if plan.is_rl:
        if plan.vllm_mode in ("colocate", "server"):
            w_bytes = 2 if plan.weight_dtype != "float32" else 4
            sync = Component("weight-sync headroom", weight_sync_bytes(arch, w_bytes, use_peft=plan.use_peft),
                             "push to vLLM: " + ("merged LoRA deltas" if plan.use_peft else "2 × largest layer"))
        else:
            sync = Component("weight-sync headroom", 0, "HF generate: no separate engine")
        gen_acts = no_acts
        if plan.vllm_mode is None:  # HF generate: KV cache of the round inside the trainer
            kv = kv_bytes_per_token(arch, 2) * (plan.generation_round or plan.num_generations) * \
                (plan.prompt_len + plan.completion_len)
            gen_acts = [Component("activations", kv, "HF generate KV cache of one round"), no_acts[1]]
        phases["generation"] = [weights, zero_grads, master, optim, *gen_acts, *extra, *vllm_comp, sync, overhead]
        if plan.reference_model or plan.student is not None or plan.algorithm == "rlt":
            phases["scoring"] = [weights, zero_grads, master, optim, *_scoring(plan, extra), *asleep, overhead]
    peak = max(phases, key=lambda name: sum(c.bytes for c in phases[name]))
    return Estimate(plan=plan, phases=phases, peak_phase=peak, checks=checks, params=params, trainable=trainable,
                    host_bytes=host, vllm=vllm_info, server=server)


def _scoring(plan: MemoryPlan, extra: list[Component]) -> list[Component]:
    """The frozen models and buffers of the largest no-grad scoring forward of a step. They run one after another:
    TRL's reference log-probs (chunked kernel tiles) and, for RLT, the teacher reward's forwards (student, and the
    policy as teacher). An offloaded reference / student is moved whole onto the GPU for its forward
    (`rlt.trainers.GRPOTrainer.reference_on_device`, `TeacherKLReward._placed`) and back to CPU afterwards."""
    arch = plan.policy
    a = 4 if DTYPE_BYTES[plan.weight_dtype] == 4 else 2
    forwards: list[tuple[str | None, int, str]] = []  # (model moved onto the GPU, buffer bytes, note)
    if plan.reference_model:
        tokens = plan.micro_batch * (plan.logits_tokens or plan.seq_len)
        if plan.logits_mode == "fused":
            tile = min(tokens, TRL_TOKEN_CHUNK) * min(arch.vocab_size, TRL_VOCAB_CHUNK) * 4
        else:
            tile = logits_bytes(tokens, arch.vocab_size, a, backward=False)
        forwards.append(("reference model" if plan.reference_offload else None, tile,
                         f"reference log-probs of {tokens:,} tokens"))
    if plan.algorithm == "rlt":
        batch = plan.reward_batch
        student = plan.student or arch
        moved = ("student model" if plan.student_offload else None) if plan.student is not None else \
            ("reference model" if plan.reference_model and plan.reference_offload else None)
        forwards.append((moved, teacher_reward_scoring_bytes(student, batch, plan.seq_len, a,
                                                             plan.reward_tokens_per_forward),
                         f"teacher reward: {batch} × {plan.seq_len:,}-token student forward"))
    def weights_of(name: str | None) -> int:
        if name == "student model":
            return _frozen_weights(plan.student, plan, student=True)
        return _frozen_weights(arch, plan) if name else 0

    moved, buffers, note = max(forwards, key=lambda f: f[1] + weights_of(f[0]))
    frozen = [dataclasses.replace(c, bytes=weights_of(moved), note="moved to the GPU for its scoring forward")
              if c.name == moved else c for c in extra]
    return [Component("activations", 0, "no-grad forward (counted with its buffers)"),
            Component("logits / log-softmax", buffers, note), *frozen]


def _vllm(plan: MemoryPlan, utilization: float, gpu_memory: int) -> tuple[list[Component], dict[str, int], list[Check]]:
    arch = plan.policy
    w_dtype_bytes = 4 if plan.weight_dtype == "float32" else 2
    weights = param_count(arch) * w_dtype_bytes
    profile = vllm_activation_profile_bytes(arch, w_dtype_bytes)
    if plan.vllm_kv_cache_bytes is not None:  # vLLM skips memory profiling: the engine holds exactly this
        kv_avail = plan.vllm_kv_cache_bytes
        reservation = weights + profile + VLLM_NON_TORCH + kv_avail
        sizing = "fixed KV (vllm_kv_cache_memory_bytes)"
    else:
        reservation = vllm_reservation_bytes(utilization, gpu_memory)
        kv_avail = vllm_kv_available_bytes(reservation, weights, profile)
        sizing = f"{utilization:g} × {_fmt(gpu_memory)}"
    per_token = kv_bytes_per_token(arch, plan.vllm_kv_dtype_bytes)
    seq = plan.prompt_len + plan.completion_len
    group = plan.num_generations * seq * per_token
    round_completions = plan.generation_round or plan.train_batch_size or plan.num_generations
    engines = plan.num_gpus if plan.vllm_mode == "colocate" else plan.vllm_gpus
    per_engine = math.ceil(round_completions / max(1, engines))
    round_need = per_engine * seq * per_token
    info = {"reservation": reservation, "weights": weights, "activation_profile": profile,
            "non_torch": VLLM_NON_TORCH, "kv_available": kv_avail, "kv_bytes_per_token": per_token,
            "kv_tokens": max(0, kv_avail) // per_token, "group_tokens": plan.num_generations * seq,
            "kv_needed_group": group, "round_completions_per_engine": per_engine, "kv_needed_round": round_need}
    name = "vLLM reservation" if plan.vllm_mode == "colocate" else "vLLM server"
    comps = [Component(name, reservation,
                       f"{sizing}: weights {_fmt(weights)} + profile {_fmt(profile)} + "
                       f"non-torch {_fmt(VLLM_NON_TORCH)} + KV cache {_fmt(kv_avail)} "
                       f"({max(0, kv_avail) // per_token:,} tokens)")]
    checks: list[Check] = []
    if kv_avail <= 0:
        checks.append(Check("vLLM KV cache", False, f"vLLM's reservation {_fmt(reservation)} does not even hold its "
                            f"weights {_fmt(weights)} + profile {_fmt(profile)}: raise vllm_gpu_memory_utilization"))
        return comps, info, checks
    groups_fit = kv_avail // group if group else 0
    # vLLM refuses to start when one sequence of the maximal length does not fit its KV cache; requests that do
    # not fit at the same time (members of a group, the rest of a round) wait or are preempted: slower, no error
    checks.append(Check(
        "KV cache holds one sequence", kv_avail >= seq * per_token,
        f"one sequence = ({plan.prompt_len}+{plan.completion_len}) tokens × {per_token:,} B = {_fmt(seq * per_token)}"
        f"; KV cache {_fmt(kv_avail)}" + ("" if kv_avail >= seq * per_token else
                                           f": short by {_fmt(seq * per_token - kv_avail)}, vLLM would refuse to "
                                           f"start: raise vllm_gpu_memory_utilization or shorten the sequences")))
    short = (f": short by {_fmt(group - kv_avail)}, so completions of one prompt are generated in turns (slower, "
             f"not an OOM; at most {kv_avail // (seq * per_token)} full-length sequences at once)")
    checks.append(Check(
        "KV cache holds one group", kv_avail >= group,
        f"one group = {plan.num_generations} × ({plan.prompt_len}+{plan.completion_len}) tokens × {per_token:,} B = "
        f"{_fmt(group)}; KV cache {_fmt(kv_avail)}" + ("" if kv_avail >= group else short), severity="warn"))
    if round_need > kv_avail and group <= kv_avail:
        checks.append(Check(
            "KV cache holds the generation round", False,
            f"{per_engine} completions per engine need {_fmt(round_need)}, the KV cache holds {_fmt(kv_avail)} "
            f"({groups_fit} full group(s) at once): short by {_fmt(round_need - kv_avail)}, so vLLM queues or "
            f"preempts (slower, not an OOM)", severity="warn"))
    return comps, info, checks


def batch_geometry_checks(plan: MemoryPlan) -> list[Check]:
    """Batch geometry of the plan (spec §3.1): GA integral, aggregation divides GA, round is a multiple of the group."""
    checks: list[Check] = []
    world = plan.num_gpus
    if plan.train_batch_size is not None:
        per_step = plan.micro_batch * world
        ok = plan.train_batch_size % per_step == 0
        checks.append(Check("batch geometry", ok, f"train_batch_size {plan.train_batch_size} / (per_device "
                            f"{plan.micro_batch} × {world} GPU(s)) = {plan.train_batch_size / per_step:g}"
                            + ("" if ok else ": not an integer")))
        if not ok:
            return checks
        ga = plan.train_batch_size // per_step
        if plan.is_rl:
            agg = plan.generation_aggregation_steps or 1
            if ga % agg:
                checks.append(Check("generation_aggregation_steps", False, f"generation_aggregation_steps {agg} "
                                    f"must divide gradient accumulation {ga} (valid: "
                                    f"{[d for d in range(1, ga + 1) if ga % d == 0]})"))
            round_size = plan.micro_batch * agg * world
            if round_size % plan.num_generations:
                checks.append(Check("generation round", False, f"a generation round of per_device {plan.micro_batch}"
                                    f" × aggregation {agg} × {world} GPU(s) = {round_size} completions is not a "
                                    f"multiple of num_generations {plan.num_generations}"))
            if plan.train_batch_size % plan.num_generations:
                checks.append(Check("groups per step", False, f"train_batch_size {plan.train_batch_size} is not a "
                                    f"multiple of num_generations {plan.num_generations}"))
    return checks


# ----------------------------------------------------------------------------------------------- suggestions

@dataclass
class Suggestion:
    override: str  # what to pass: a config override (key=value) or a memcheck flag (--zero 2)
    total: int
    saving: int
    passes: bool


def candidate_changes(plan: MemoryPlan) -> list[tuple[str, MemoryPlan]]:
    """One-knob variants of the plan, each with the override that selects it."""
    out: list[tuple[str, MemoryPlan]] = []
    rep = dataclasses.replace
    if plan.micro_batch > 1:
        per_gpu = (plan.train_batch_size or plan.micro_batch * plan.grad_accum * plan.num_gpus) // plan.num_gpus
        for b in range(plan.micro_batch - 1, 0, -1):
            if per_gpu % b == 0:
                out.append((f"per_device_train_batch_size={b}", rep(plan, micro_batch=b, grad_accum=per_gpu // b)))
                break
    if not plan.gradient_checkpointing:
        out.append(("gradient_checkpointing=true", rep(plan, gradient_checkpointing=True)))
    if plan.use_peft and plan.lora_dropout > 0:
        out.append(("lora_dropout=0", rep(plan, lora_dropout=0.0)))
    if not plan.use_peft:
        out.append(("use_peft=true", rep(plan, use_peft=True, reference_model=False)))
    if not plan.load_in_4bit and not plan.uses_deepspeed:
        out.append(("use_peft=true load_in_4bit=true" if not plan.use_peft else "load_in_4bit=true",
                    rep(plan, use_peft=True, load_in_4bit=True, reference_model=False)))
    if DTYPE_BYTES[plan.weight_dtype] == 4 and not plan.load_in_4bit:
        out.append(("torch_dtype=bfloat16", rep(plan, weight_dtype="bfloat16")))
    if plan.optimizer not in ("adamw_8bit", "paged_adamw_8bit") and not plan.offload_optimizer:
        out.append(("optim=adamw_8bit", rep(plan, optimizer="adamw_8bit")))
    if not plan.offload_optimizer:
        stage = plan.zero_stage if plan.zero_stage is not None else 2
        out.append((f"--zero {stage} --offload", rep(plan, zero_stage=stage, offload_optimizer=True)))
    if plan.num_gpus > 1 and (plan.zero_stage or 0) < 3:
        out.append(("--zero 3", rep(plan, zero_stage=3)))
    if plan.is_rl:
        if plan.reference_model:
            ref_offloadable = not plan.uses_deepspeed  # under DeepSpeed the reference stays a (sharded) engine
            student_on_gpu = plan.student is not None and not plan.student_offload
            if (ref_offloadable and not plan.reference_offload) or student_on_gpu:
                out.append(("offload_untrained_models=true",
                            rep(plan, reference_offload=plan.reference_offload or ref_offloadable, student_offload=True)))
            out.append(("beta=0", rep(plan, reference_model=False)))
        elif plan.student is not None and not plan.student_offload:
            out.append(("offload_untrained_models=true", rep(plan, student_offload=True)))
        if plan.algorithm == "rlt" and plan.reward_batch > 1:  # the largest smaller scoring batch that fits
            smaller = [b for b in (plan.reward_batch // 2 ** k for k in range(1, 8)) if b >= 1]
            fits = [b for b in dict.fromkeys(smaller) if estimate(rep(plan, reward_batch=b)).passed]
            b = fits[0] if fits else 1
            out.append((f"teacher_reward_batch_size={b}", rep(plan, reward_batch=b)))
        if plan.vllm_mode == "colocate":
            if not plan.vllm_sleep:
                out.append(("vllm_enable_sleep_mode=true", rep(plan, vllm_sleep=True)))
            util = minimal_vllm_utilization(plan)
            if util is not None and util < plan.vllm_gpu_memory_utilization - 1e-9 and plan.vllm_kv_cache_bytes is None:
                out.append((f"vllm_gpu_memory_utilization={util:.2f}", rep(plan, vllm_gpu_memory_utilization=util)))
    return out


def minimal_vllm_utilization(plan: MemoryPlan, step: float = 0.05) -> float | None:
    """The smallest utilization (a multiple of `step`) whose KV cache still holds one full group (all of a prompt's
    completions at full length at once: below it, vLLM generates a group in turns)."""
    arch = plan.policy
    w_bytes = 4 if plan.weight_dtype == "float32" else 2
    need = (param_count(arch) * w_bytes + vllm_activation_profile_bytes(arch, w_bytes) + VLLM_NON_TORCH
            + plan.num_generations * (plan.prompt_len + plan.completion_len) * kv_bytes_per_token(
                arch, plan.vllm_kv_dtype_bytes))
    util = math.ceil(need / plan.gpu_memory / step - 1e-9) * step
    return round(util, 4) if util < 1 else None


def suggestions(plan: MemoryPlan, base: Estimate | None = None, allowed=None) -> list[Suggestion]:
    """Re-run the estimate with one knob changed; keep those that lower the peak by > 0.5%, largest first.

    `allowed(override) -> bool` filters overrides the caller cannot apply (e.g. keys its config schema lacks).
    """
    base = base or estimate(plan)
    out = []
    for override, variant in candidate_changes(plan):
        if allowed is not None and not allowed(override):
            continue
        est = estimate(variant)
        if base.total - est.total > max(10**6, base.total // 200):  # ignore < 0.5% (or 1 MB) changes
            out.append(Suggestion(override, est.total, base.total - est.total, est.passed))
    return sorted(out, key=lambda s: -s.saving)


# ----------------------------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """'85GB' → 85·10^9 bytes, '85GiB' → 85·2^30, '512MiB', '1.5TB'. A bare number is refused (which unit?).

    Raises:
        ValueError: with a message that says what to write.
    """
    raw = str(text)
    m = _SIZE_RE.match(raw)
    if not m:
        raise ValueError(f"cannot read the size {raw!r}: write a number and a unit, e.g. 85GB (10^9 bytes) or "
                         f"80GiB (2^30 bytes)")
    number, unit = m.groups()
    if unit is None:
        raise ValueError(f"the size {raw!r} has no unit: write {raw.strip()}GB (10^9 bytes) or {raw.strip()}GiB "
                         f"(2^30 bytes)")
    return int(round(float(number) * _UNITS[unit.lower()]))


def format_bytes(n: int, unit: str = "GB") -> str:
    """Bytes in GB (10^9) or GiB (2^30) with two decimals, e.g. 15,231,233,024 → '15.23 GB'."""
    div = GB if unit == "GB" else GiB
    return f"{n / div:.2f} {unit}"


# ----------------------------------------------------------------------------------------------- architectures

def _arch(name, h, layers, heads, kv, head_dim, inter, vocab, tied, **kw) -> ModelArch:
    return ModelArch(name, h, layers, heads, kv, head_dim, inter, vocab, tied, checkpoint_dtype="bfloat16", **kw)


# Published config.json values; `param_count` of each reproduces the published total (tests/test_memory.py).
BUNDLED_ARCHS: dict[str, ModelArch] = {a.name: a for a in (
    _arch("Qwen2.5-0.5B", 896, 24, 14, 2, 64, 4864, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-1.5B", 1536, 28, 12, 2, 128, 8960, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-3B", 2048, 36, 16, 2, 128, 11008, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-7B", 3584, 28, 28, 4, 128, 18944, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-14B", 5120, 48, 40, 8, 128, 13824, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-32B", 5120, 64, 40, 8, 128, 27648, 152064, False, qkv_bias=True),
    _arch("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, False),
    _arch("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True),
    _arch("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, True),
    _arch("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152, True),
    _arch("SmolLM2-360M", 960, 32, 15, 5, 64, 2560, 49152, True),
    _arch("SmolLM2-1.7B", 2048, 24, 32, 32, 64, 8192, 49152, True),
    # LFM2: 6 attention + 10 short-conv layers; the FFN width is the auto-adjusted 2/3·6656 → multiple of 256.
    _arch("LFM2-350M", 1024, 16, 16, 8, 64, 4608, 65536, True, qk_norm=True, attention_layers=6, conv_kernel=3),
)}
# Published totals (model cards), for the self-check in the tests.
PUBLISHED_PARAMS = {"Qwen2.5-0.5B": 0.49e9, "Qwen2.5-1.5B": 1.54e9, "Qwen2.5-3B": 3.09e9, "Qwen2.5-7B": 7.61e9,
                    "Qwen2.5-14B": 14.7e9, "Qwen2.5-32B": 32.5e9, "Llama-3.1-8B": 8.03e9, "Llama-3.2-3B": 3.21e9,
                    "Llama-3.2-1B": 1.24e9, "SmolLM2-135M": 135e6, "SmolLM2-360M": 362e6, "SmolLM2-1.7B": 1.71e9,
                    "LFM2-350M": 354e6}


def bundled_arch(name_or_path: str) -> ModelArch | None:
    """The bundled architecture of a hub id or name ('Qwen/Qwen2.5-7B-Instruct', 'meta-llama/Llama-3.1-8B',
    'HuggingFaceTB/SmolLM2-135M-Instruct', 'rlt:smollm2-135m'); None if unknown. Instruct variants share the base."""
    base = str(name_or_path).rstrip("/").split("/")[-1].split(":")[-1].lower()
    base = re.sub(r"-(instruct|it|chat)$", "", base)
    base = base.replace("meta-llama-", "")
    for key, arch in BUNDLED_ARCHS.items():
        if key.lower() == base:
            return arch
    return None


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def arch_from_hf_config(cfg: dict, name: str = "model") -> ModelArch:
    """A `ModelArch` from a Hugging Face config.json dict (Llama/Qwen2/Qwen3/Mistral/SmolLM/LFM2 style).

    Raises:
        ValueError: naming the missing key.
    """
    cfg = cfg.get("text_config") or cfg
    model_type = cfg.get("model_type", "")
    try:
        h, layers, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        inter, vocab = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config.json of {name} has no {e.args[0]!r} (not a decoder-only transformer config?)") from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    attention_layers, conv_kernel = None, 0
    if model_type == "lfm2":
        types = cfg.get("layer_types")
        idxs = cfg.get("full_attn_idxs")
        attention_layers = (sum(t == "full_attention" for t in types) if types else len(idxs) if idxs else layers)
        conv_kernel = int(cfg.get("conv_L_cache", 3))
        if cfg.get("block_auto_adjust_ff_dim", False):
            inter = int(2 * inter / 3)
            if cfg.get("block_ffn_dim_multiplier") is not None:
                inter = int(cfg["block_ffn_dim_multiplier"] * inter)
            inter = _round_up(inter, int(cfg.get("block_multiple_of", 256)))
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type in ("lfm2", "gemma", "gemma2", "gemma3_text")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return ModelArch(
        name=name, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=inter, vocab_size=vocab, tie_embeddings=bool(tied),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type in ("lfm2", "qwen3", "olmo2", "gemma3_text"),
        attention_layers=attention_layers, conv_kernel=conv_kernel,
        checkpoint_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else None)
