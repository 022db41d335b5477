"""A step's memory plan (`MemoryPlan`), its estimate per phase (`estimate`), the batch-geometry checks, and the
changes that would make a failing plan fit (`suggestions`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from rlt.memory.arch import (
    ModelArch,
    largest_layer_params,
    lora_param_count,
    param_count,
)
from rlt.memory.terms import (
    TRL_TOKEN_CHUNK,
    TRL_VOCAB_CHUNK,
    VLLM_NON_TORCH,
    activation_bytes,
    deepspeed_cpu_bytes,
    deepspeed_model_state_bytes,
    fused_logits_bytes,
    gradient_bytes,
    kv_bytes_per_token,
    logits_bytes,
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
from rlt.memory.units import DTYPE_BYTES, GB

# CUDA context + cuBLAS/cuDNN workspaces + NCCL buffers of one training process (typical 0.5-1.5 GB on H100).
DEFAULT_FRAMEWORK_OVERHEAD = 1 * GB


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
        Component("activations", acts, f"micro-batch {plan.micro_batch} × {plan.seq_len} tokens, "
                                       f"{gc}{recompute_note}, "
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
    phases["optimizer step"] = [weights, grads, master,
                                dataclasses.replace(optim, bytes=optim.bytes + temp, note=optim.note
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


def _vllm(plan: MemoryPlan, utilization: float,
          gpu_memory: int) -> tuple[list[Component], dict[str, int], list[Check]]:
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
    """Batch geometry of the plan (spec §3.1): GA integral, aggregation divides GA, round is a multiple of the
    group."""
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
                            rep(plan, reference_offload=plan.reference_offload or ref_offloadable,
                                student_offload=True)))
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
            if (util is not None and util < plan.vllm_gpu_memory_utilization - 1e-9
                    and plan.vllm_kv_cache_bytes is None):
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
