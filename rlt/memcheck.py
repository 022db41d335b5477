"""Will this run fit on the GPU?  python -m rlt.memcheck RUN_CFG [overrides...] [--gpu-memory 85GB] [--json]

    python -m rlt.memcheck smollm2_sft                                  # 1 GPU of 85 GB (the default)
    python -m rlt.memcheck tiny_sft model_cfg=qwen2.5_7b_instruct --num-gpus 8 --zero 3 --json

The command line and config adapter of the GPU memory estimator `rlt.memory`: the run config as `python -m rlt.train`
composes it (`rlt.compose`), each model's architecture, then the per-GPU peak of a training step, PASS/FAIL, the
checks and one-knob changes that lower the peak. Exit status: 0 PASS, 1 FAIL, 2 usage or config error (one line on
stderr). Sizes, architecture sources, phases and formulas: docs/memory.md.
The config keys the estimate reads, and what for: docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rlt import memory as M
from rlt.compose import compose, one_line
from rlt.config import all_defaults

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
CLI_FLAGS = ("--zero", "--offload")


class UsageError(Exception):
    """A bad command line, config or model: exit 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message otherwise)
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m rlt.memcheck", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_cfg", help="run config: NAME, NAME.yaml or cfgs/run_cfg/NAME.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for rlt.train (key=value)")
    p.add_argument("--gpu-memory", default="85GB", help="memory of ONE GPU, with a unit: 85GB (10^9 B) or 80GiB "
                                                        "(2^30 B); default 85GB")
    p.add_argument("--margin", default=None, help="safety margin kept free (fragmentation), e.g. 10GB; "
                                                  "default 5%% of --gpu-memory")
    p.add_argument("--num-gpus", type=int, default=None, help="training GPUs (default: $WORLD_SIZE or 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="DeepSpeed ZeRO stage")
    p.add_argument("--offload", action="store_true", help="DeepSpeed optimizer offload to CPU (ZeRO-2 if --zero "
                                                          "is not given)")
    p.add_argument("--offload-params", action="store_true", help="ZeRO-3 parameter offload too")
    p.add_argument("--vllm-gpus", type=int, default=1, help="vLLM server GPUs (vllm_mode=server)")
    p.add_argument("--model-config", default=None, help="config.json (or its directory) of the policy model, "
                                                        "when its architecture cannot be found otherwise")
    p.add_argument("--overhead", default="1GB", help="framework overhead per process (CUDA context...), default 1GB")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    return p


# ----------------------------------------------------------------------------------------------- config

def _read_config_json(path: Path, name: str) -> M.ModelArch:
    try:
        data = json.loads(path.read_text())
        return M.arch_from_hf_config(data, name)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise UsageError(f"cannot read the architecture from {path}: {e}") from None


def resolve_arch(name: str, revision: str | None = None, model_config: str | None = None, *,
                 stand_in: str | None = None, stand_in_key: str = "memcheck_model_arch") -> tuple[M.ModelArch, str]:
    """(architecture, where it came from) for a model name; UsageError saying what to pass if none is found.

    `model_config` (the CLI's --model-config) wins; else `name` is read (local directory, `rlt:` model, Hugging Face
    cache, bundled table); when it cannot be, `stand_in` (the run's `stand_in_key`: a hub id, directory or
    config.json whose architecture is the same, e.g. the base model of a warm-up checkpoint not trained yet).
    """
    try:
        return _resolve_arch(name, revision, model_config)
    except UsageError:
        if not stand_in or model_config:
            raise
        try:
            arch, source = _resolve_arch(stand_in, None, stand_in if Path(stand_in).expanduser().exists() else None)
        except UsageError as e2:
            raise UsageError(f"{stand_in_key}={stand_in}: {e2}") from None
        return arch, f"stand-in {stand_in_key}={stand_in}, from {source}: {name} is not readable here"


def _resolve_arch(name: str, revision: str | None, model_config: str | None) -> tuple[M.ModelArch, str]:
    if model_config:
        path = Path(model_config).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--model-config {model_config}: no such file")
        return _read_config_json(path, name), str(path)
    if name.startswith("rlt:"):
        from rlt.errors import RltError
        from rlt.models import TINY_SPECS, resolve_model_path

        try:
            local = Path(resolve_model_path(name))
            return _read_config_json(local / "config.json", name), f"{local}/config.json"
        except RltError as e:
            key = name.removeprefix("rlt:")
            if key in TINY_SPECS:
                s = TINY_SPECS[key]
                arch = M.ModelArch(name, s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"],
                                   s["num_key_value_heads"], s["hidden_size"] // s["num_attention_heads"],
                                   s["intermediate_size"], s["vocab_size"], True, qkv_bias=True,
                                   checkpoint_dtype="float32")
                return arch, "rlt.models.TINY_SPECS"
            if (arch := M.bundled_arch(name)) is not None:
                return arch, f"bundled table ({e})"
            raise UsageError(str(e)) from None
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UsageError(f"{local} has no config.json: pass --model-config path/config.json")
        return _read_config_json(local / "config.json", name), str(local / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a valid repo id, no hub library...
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return _read_config_json(Path(cached), name), f"Hugging Face cache ({cached})"
    if (arch := M.bundled_arch(name)) is not None:
        return arch, "bundled table (rlt.memory.BUNDLED_ARCHS)"
    known = ", ".join(M.BUNDLED_ARCHS)
    raise UsageError(f"no architecture for model {name!r}: it is not a local directory, not in the Hugging Face "
                     f"cache, and not bundled ({known}). Pass a local model directory as model_name_or_path=PATH, "
                     f"--model-config path/config.json, or name a model of the same architecture with "
                     f"memcheck_model_arch=ID (memcheck_student_arch=ID for the student)")


def plan_from_config(run, args, *, policy: M.ModelArch, student: M.ModelArch | None) -> M.MemoryPlan:
    """Translate the run config (+ CLI hardware flags) into a MemoryPlan (the keys read: docs/memory.md). A key the
    run's algorithm does not have (an SFT run's GRPO keys) reads as the schema's default."""
    defaults = all_defaults()
    get = lambda key: getattr(run, key, defaults.get(key))  # noqa: E731
    notes: list[str] = []
    algorithm = get("algorithm")
    torch_dtype = get("torch_dtype")
    weight_dtype = (policy.checkpoint_dtype or "bfloat16") if torch_dtype == "auto" else torch_dtype
    mp = get("mixed_precision")
    compute = {"auto": "bf16", "bf16": "bf16", "fp16": "fp16", "no": "fp32"}[mp]
    if mp == "auto":
        notes.append("mixed_precision=auto: assumed bf16 (on a bf16-capable GPU; a CPU run would use fp32)")
    num_gpus = args.num_gpus or int(os.environ.get("WORLD_SIZE", "1"))
    micro = get("per_device_train_batch_size")
    train_batch = get("train_batch_size")
    ga = get("gradient_accumulation_steps") or max(1, train_batch // max(1, micro * num_gpus))
    optim = get("optim")
    if optim not in M.OPTIMIZERS:
        notes.append(f"optim={optim}: counted as adamw_torch_fused")
        optim = "adamw_torch_fused"
    rl = algorithm in ("grpo", "rlt")
    kw: dict = {}
    if rl:
        prompt, completion = get("max_prompt_length"), get("max_completion_length")
        peft = get("use_peft")
        beta = get("beta")
        offload = get("offload_untrained_models")
        mode = {"hf": None, "vllm_colocate": "colocate", "vllm_server": "server"}[get("generation_backend")]
        agg = get("generation_aggregation_steps")
        round_size = micro * num_gpus * (agg or ga)
        kw = dict(
            seq_len=prompt + completion, logits_tokens=completion, num_generations=get("num_generations"),
            prompt_len=prompt, completion_len=completion, reference_model=bool(beta) and not peft,
            # rlt.trainers offloads TRL's reference only without DeepSpeed (under ZeRO it is a wrapped engine)
            reference_offload=offload and args.zero is None, student=student,
            student_offload=offload, vllm_mode=mode,
            vllm_gpu_memory_utilization=get("vllm_gpu_memory_utilization"),
            vllm_sleep=get("vllm_enable_sleep_mode"), generation_round=round_size,
            generation_aggregation_steps=agg, vllm_gpus=args.vllm_gpus, logits_mode="fused",
            vllm_kv_cache_bytes=get("vllm_kv_cache_memory_bytes"), reward_batch=get("teacher_reward_batch_size"),
            reward_tokens_per_forward=get("teacher_reward_tokens_per_forward"))
        notes.append("log-probs through TRL's chunked LM-head kernel (the GRPO recipe uses TRL's GRPOTrainer)")
        if algorithm == "rlt" and student is None and peft:
            notes.append("rlt with LoRA and no student_model: the policy with its adapter disabled is the student")
        elif algorithm == "rlt" and student is None:
            kw["reference_model"] = True
            notes.append("rlt without student_model: the reference model is the student (kept even with beta=0)")
    else:
        kw = dict(seq_len=get("max_length"))
    return M.MemoryPlan(
        policy=policy, weight_dtype=weight_dtype, compute_dtype=compute, load_in_4bit=get("load_in_4bit"),
        use_peft=get("use_peft"), lora_r=get("lora_r"), lora_target_modules=tuple(get("lora_target_modules")),
        lora_dropout=get("lora_dropout"), optimizer=optim, gradient_checkpointing=get("gradient_checkpointing"),
        micro_batch=micro,
        grad_accum=ga, attn_implementation=get("attn_implementation") or "sdpa",
        attention_mask=not (get("packing") and not rl), train_batch_size=train_batch, algorithm=algorithm,
        gpu_memory=_size(args.gpu_memory, "--gpu-memory"),
        margin=None if args.margin is None else _size(args.margin, "--margin"), num_gpus=num_gpus,
        zero_stage=args.zero, offload_optimizer=args.offload, offload_params=args.offload_params,
        framework_overhead=_size(args.overhead, "--overhead"), notes=notes, **kw)


def _size(text: str, flag: str) -> int:
    try:
        value = M.parse_size(text)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None
    if flag == "--gpu-memory" and value <= 0:
        raise UsageError(f"{flag}: must be > 0, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------- output

def _gb(n: int) -> str:
    return f"{n / M.GB:9.2f}"


def describe_arch(arch: M.ModelArch) -> str:
    hybrid = f", {arch.n_attention_layers} attention + {arch.num_layers - arch.n_attention_layers} conv layers" \
        if arch.attention_layers is not None else ""
    return (f"{M.param_count(arch) / 1e9:.3f}B params, {arch.num_layers} layers, h {arch.hidden_size}, "
            f"{arch.num_heads}/{arch.num_kv_heads} heads × {arch.head_dim}, i {arch.intermediate_size}, "
            f"V {arch.vocab_size:,}, {'tied' if arch.tie_embeddings else 'untied'} embeddings{hybrid}")


def render(est: M.Estimate, sugg: list[M.Suggestion], *, header: list[str]) -> str:
    plan = est.plan
    lines = [*header, ""]
    totals = est.phase_totals()
    others = ", ".join(f"{k} {v / M.GB:.2f} GB" for k, v in totals.items() if k != est.peak_phase)
    lines.append(f"peak phase: {est.peak_phase}" + (f"  (other phases: {others})" if others else ""))
    lines.append(f"{'component':<24}{'GB':>9}  note")
    for c in est.components:
        lines.append(f"{c.name:<24}{_gb(c.bytes)}  {c.note}")
    lines.append(f"{'-' * 24}{'-' * 9}")
    lines.append(f"{'total':<24}{_gb(est.total)}")
    margin = plan.margin_bytes
    lines.append(f"{'budget':<24}{_gb(plan.gpu_memory)}  per GPU, minus margin {margin / M.GB:.2f} GB"
                 + (" (5%)" if plan.margin is None else "") + f" → {(plan.gpu_memory - margin) / M.GB:.2f} GB usable")
    if est.host_bytes:
        lines.append(f"host RAM for offloaded states/models: {est.host_bytes / M.GB:.2f} GB")
    if est.server:
        lines.append("")
        lines.append(f"vLLM server GPU (each of {plan.vllm_gpus}):")
        for c in est.server:
            lines.append(f"{c.name:<24}{_gb(c.bytes)}  {c.note}")
    if est.checks:
        lines.append("")
        lines.append("checks:")
        for c in est.checks:
            tag = "ok  " if c.ok else ("FAIL" if c.severity == "fail" else "warn")
            lines.append(f"  {tag} {c.name}: {c.message}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append("")
    head = est.plan.gpu_memory - margin - est.total
    if est.passed:
        lines.append(f"PASS: peak {est.total / M.GB:.2f} GB ≤ {(plan.gpu_memory - margin) / M.GB:.2f} GB usable "
                     f"({head / M.GB:.2f} GB to spare; GB = 10^9 bytes)")
    else:
        why = [] if est.fits else [f"peak {est.total / M.GB:.2f} GB > {(plan.gpu_memory - margin) / M.GB:.2f} GB "
                                   f"usable (over by {-head / M.GB:.2f} GB)"]
        why += [c.name for c in est.checks if not c.ok and c.severity == "fail"]
        lines.append("FAIL: " + "; ".join(why) + " (GB = 10^9 bytes)")
        if sugg:
            lines.append("suggestions (each alone, re-estimated):")
            for s in sugg[:8]:
                lines.append(f"  {s.override:<42} −{s.saving / M.GB:.2f} GB → {s.total / M.GB:.2f} GB"
                             + ("  (PASS)" if s.passes else ""))
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UsageError("--num-gpus must be >= 1")
    if args.offload_params and args.zero not in (None, 3):
        raise UsageError("--offload-params needs --zero 3")
    if args.offload and args.zero == 0:
        raise UsageError("--offload needs ZeRO stage 1, 2 or 3")
    # the batch geometry is checked for --num-gpus training processes (default: $WORLD_SIZE)
    run_config = compose(args.run_cfg, args.overrides, world_size=args.num_gpus)
    policy, source = resolve_arch(run_config.model_name_or_path, getattr(run_config, "model_revision", None),
                                  args.model_config, stand_in=run_config.memcheck_model_arch)
    student = student_source = None
    if (student_name := getattr(run_config, "student_model", None)) and run_config.algorithm == "rlt":
        student, student_source = resolve_arch(student_name, stand_in=run_config.memcheck_student_arch,
                                               stand_in_key="memcheck_student_arch")
    plan = plan_from_config(run_config, args, policy=policy, student=student)
    unknown = M.unknown_lora_modules(policy, plan.lora_target_modules) if plan.use_peft else []
    if unknown:
        plan.notes.append(f"lora_target_modules {unknown} match no linear layer of this architecture (no adapter)")
    est = M.estimate(plan)
    present = set(vars(run_config))

    def allowed(override: str) -> bool:
        return override.startswith(CLI_FLAGS) or all(part.split("=")[0] in present for part in override.split())

    sugg = M.suggestions(plan, est, allowed=allowed)
    machine_line, machine = this_machine(run_config, deepspeed=plan.uses_deepspeed)
    if args.json:
        out = est.to_dict()
        out.update(run_cfg=args.run_cfg, overrides=args.overrides, policy=dict(
            name=run_config.model_name_or_path, source=source, arch=vars(policy) | {"params": est.params}),
            suggestions=[vars(s) for s in sugg], this_machine=machine)
        if student is not None:
            out["student"] = dict(name=student_name, source=student_source, arch=vars(student))
        print(json.dumps(out, indent=2, default=str))
    else:
        gpus = f"{plan.num_gpus} GPU(s)" + (f", DeepSpeed ZeRO-{plan.effective_zero_stage}" if plan.uses_deepspeed
                                            else "") + (" + optimizer offload" if plan.offload_optimizer else "")
        lora = (f"LoRA r={plan.lora_r} {','.join(plan.lora_target_modules)} ({est.trainable / 1e6:,.2f}M trainable)"
                if plan.use_peft else f"full fine-tuning ({est.trainable / 1e9:.3f}B trainable)")
        header = [
            f"rlt memcheck: run_cfg={args.run_cfg} {' '.join(args.overrides)}".rstrip()
            + f" (algorithm={plan.algorithm}) on {gpus} of {plan.gpu_memory / M.GB:.2f} GB",
            f"policy: {run_config.model_name_or_path}: {describe_arch(policy)}  [{source}]",
            f"plan: {plan.weight_dtype} weights{' (4-bit NF4)' if plan.load_in_4bit else ''}, {plan.compute_dtype} "
            f"compute, {lora}, {plan.optimizer}, micro-batch {plan.micro_batch} × {plan.seq_len} tokens, "
            f"GA {plan.grad_accum}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        ]
        if student is not None:
            header.append(f"student: {student_name}: {describe_arch(student)}  [{student_source}]")
        if est.vllm:
            v = est.vllm
            header.append(f"vLLM ({plan.vllm_mode}): KV {v['kv_bytes_per_token']:,} B/token, cache "
                          f"{v['kv_available'] / M.GB:.2f} GB = {v['kv_tokens']:,} tokens; one group "
                          f"{v['group_tokens']:,} tokens, round of {v['round_completions_per_engine']} completions "
                          f"per engine needs {v['kv_needed_round'] / M.GB:.2f} GB")
        print(render(est, sugg, header=header))
        if machine_line:
            print(machine_line)
    return EXIT_PASS if est.passed else EXIT_FAIL


def this_machine(run_config, *, deepspeed: bool) -> tuple[str | None, dict]:
    """What the machine memcheck runs on cannot honour (`rlt.preflight`): reported, never a failure (the estimate is
    for a GPU). (one line or None, the same for --json: machine, problems, override line)."""
    from rlt import preflight

    machine = preflight.Machine.detect()
    found = preflight.problems(run_config, machine, deepspeed=deepspeed)
    data = {"machine": machine.describe(), "problems": [dict(vars(p), value=p.value_text) for p in found],
            "run_it_here_with": preflight.override_line(found)}
    if not found:
        return None, data
    if any(p.severity == "error" for p in found):
        return preflight.report(found, machine, one_line=True), data
    return f"this machine runs it, but: {'; '.join(map(str, found))}", data


def check_before_training(run) -> str | None:
    """The trainers' gate: estimate the run's peak GPU memory before any weights load and refuse a run that does not
    fit (`ConfigError` with the table and the suggestions). The budget is the visible GPU's memory, or
    `memcheck_gpu_memory` on a machine without one (none set there: the check is skipped). `memcheck=false` skips
    it. Returns the one-line verdict, or None when skipped."""
    import logging

    import torch

    from rlt.errors import ConfigError, RltError

    log = logging.getLogger(__name__)
    if not run.memcheck:
        return None
    if torch.cuda.is_available():
        budget = f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory}B"
    elif run.memcheck_gpu_memory:
        budget = run.memcheck_gpu_memory
    else:
        log.info("memory check skipped: no GPU here (set memcheck_gpu_memory=85GB to check against a budget)")
        return None
    args = build_parser().parse_args([run.run_name, "--gpu-memory", budget])
    try:
        policy, _ = resolve_arch(run.model_name_or_path, run.model_revision, stand_in=run.memcheck_model_arch)
        student = None
        if getattr(run, "student_model", None) and run.algorithm == "rlt":
            student, _ = resolve_arch(run.student_model, stand_in=run.memcheck_student_arch,
                                      stand_in_key="memcheck_student_arch")
        plan = plan_from_config(run, args, policy=policy, student=student)
    except (UsageError, RltError) as e:
        log.warning("memory check skipped: %s", e)
        return None
    est = M.estimate(plan)
    verdict = f"memory check: peak {est.total / M.GB:.2f} GB of {plan.gpu_memory / M.GB:.2f} GB " \
              f"({'PASS' if est.passed else 'FAIL'})"
    if not est.passed:
        raise ConfigError(f"{verdict}: this run would run out of GPU memory.\n"
                          + render(est, M.suggestions(plan, est), header=[])
                          + "\n(check it alone: python -m rlt.memcheck RUN_CFG ...; skip with memcheck=false)")
    log.info("%s", verdict)
    return verdict


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.disable(logging.WARNING)  # building rlt: models logs at INFO/WARNING; the table is the output
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write(f"memcheck: error: {e}\n")
        return EXIT_USAGE
    except Exception as e:
        from rlt.errors import RltError

        if isinstance(e, RltError):
            sys.stderr.write(f"memcheck: error: {one_line(e)}\n")
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
