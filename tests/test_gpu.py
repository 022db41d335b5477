"""The GPU check, `make test-gpu` (docs/install.md "GPU check"): what the CPU suite cannot show, on one CUDA GPU.

Marked `gpu` (left out of `make test`) and skipped with the reason "no CUDA device" where there is none. Budget on
one H100: about 3 minutes for this file (the offline install before it: under a minute), 8 minutes at most:

1. bf16 training on CUDA (~1 min): 3 SFT steps and 2 GRPO steps (hf generation) of `rlt:tiny` and `rlt:tiny-wide`
   through `rlt.train.run_training`, `mixed_precision=bf16`: finite losses, every parameter on the GPU during
   training, linear layers computing in bf16.
2. The RLT teacher reward (~15 s): the same completions scored on CPU and on CUDA agree, fp32 within 1e-5.
3. The memory estimate (~1.5 min): `rlt.memcheck`'s plan (as the trainers' gate builds it) against
   `torch.cuda.max_memory_allocated()` around real training steps, for tiny SFT (full, LoRA), tiny GRPO and a
   randomly initialised model of Qwen2.5-0.5B's shape: within 15%; a table on the terminal and
   results/gpu_check/memory.json.
4. `rlt.preflight` (~1 s): a run asking for flash-attn or bitsandbytes where the package is absent is reported with
   the setting to use instead.

Each test records its result line(s) as the `gpu_summary` user property; tests/conftest.py prints them as one table at
the end of the run.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import math
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from .conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

MEMORY_JSON = REPO / "results" / "gpu_check" / "memory.json"
MEMORY_TOLERANCE = 0.15  # |estimate / measured - 1|
SUMMARY = "gpu_summary"  # the user property tests/conftest.py prints
GPU = "cuda"  # the device the checks run on (a CPU dry run of the helpers sets "cpu")


class Probe(TrainerCallback):
    """A trainer callback (added to the recipe's by `probed`) that watches one training run: the devices of the
    parameters after each step, the (device, dtype) of the first linear layer's outputs, the logged losses, and on
    CUDA the peak of allocated bytes from the start of training to its end."""

    def __init__(self) -> None:
        self.param_devices: set[str] = set()
        self.linear_outputs: set[tuple[str, str]] = set()
        self.losses: list[float] = []
        self.bf16: bool | None = None
        self.peak: int | None = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.bf16 = bool(args.bf16)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))  # layer 0's q_proj (or its base)
        self._hook = linear.register_forward_hook(self._record_output)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _record_output(self, module, inputs, output):
        self.linear_outputs.add((output.device.type, str(output.dtype).removeprefix("torch.")))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.param_devices |= {p.device.type for p in model.parameters()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        if self._hook is not None:
            self._hook.remove()


@contextlib.contextmanager
def probed():
    """A `Probe` added to the callbacks of the runs started inside (`rlt.recipes.common.callbacks_for`)."""
    from rlt.recipes import common

    probe = Probe()
    original = common.callbacks_for
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "callbacks_for", lambda run, out: [*original(run, out), probe])
        yield probe


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- 1. bf16 training

SFT = ["run_cfg=tiny_sft", "max_steps=3", "eval_steps=null", "save_steps=3", "plots=false"]
GRPO = ["run_cfg=tiny_grpo", "max_steps=2", "save_steps=2", "train_batch_size=8", "per_device_train_batch_size=4",
        "num_generations=4", "max_completion_length=16", "plots=false"]


@pytest.mark.parametrize("model_cfg", ["tiny", "tiny_wide"])
@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
def test_bf16_training_on_cuda(compose, tmp_path, record_property, algorithm, model_cfg):
    """SFT (3 steps) and GRPO with hf generation (2 steps) in bf16 mixed precision: finite losses, the parameters on
    the GPU throughout, the linear layers computing in bf16 on CUDA. ~10-20 s each."""
    from rlt.train import run_training

    overrides = [*(SFT if algorithm == "sft" else GRPO), f"model_cfg={model_cfg}", "mixed_precision=bf16",
                 f"output_dir={tmp_path}"]
    start = time.perf_counter()
    with probed() as probe:
        summary = run_training(compose(overrides))
    seconds = time.perf_counter() - start
    steps = 3 if algorithm == "sft" else 2
    record_property(SUMMARY, f"{summary['global_step']} steps in {seconds:.0f} s, losses "
                             f"{[round(x, 3) for x in probe.losses]}, parameters on {sorted(probe.param_devices)}, "
                             f"linear outputs {sorted(probe.linear_outputs)}")
    assert summary["global_step"] == steps
    assert probe.bf16 is True
    assert len(probe.losses) == steps and all(math.isfinite(x) for x in probe.losses), probe.losses
    assert math.isfinite(summary["train_loss"])
    assert probe.param_devices == {GPU}, probe.param_devices
    assert (GPU, "bfloat16") in probe.linear_outputs, probe.linear_outputs
    _free_cuda()


# ------------------------------------------------------------------------------------------- 2. teacher reward

@contextlib.contextmanager
def _exact_cuda_matmuls():
    """fp32 matmuls without TF32 and bf16 ones without reduced-precision reductions, restored afterwards."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32, matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = saved


def test_teacher_reward_on_cuda_equals_cpu(tiny_model_path, record_property):
    """tests/test_teacher_reward.py's setup (tiny teacher, seed-perturbed tiny student, four explanations and an
    unclosed one, the recipe's coefficients, batches of 3 with shared prefixes) scored on CPU in fp32, then on CUDA in
    fp32 (must agree within 1e-5) and bf16. A bf16 reward cannot agree with the fp32 one within 1e-3: on CPU alone
    bf16 moves it by ~0.04, and SDPA vs eager attention in bf16 by ~0.009 (measured on rlt:tiny). So bf16 on CUDA is
    held to the band bf16 has on CPU: |cuda bf16 - cpu fp32| <= 2 max|cpu bf16 - cpu fp32|, and its distance to CPU
    bf16 is reported. ~15 s."""
    from rlt.data.teacher import teacher_rl_prompt
    from rlt.models import load_model, load_tokenizer

    from .test_teacher_reward import BODIES, CLOSE, FMT, QUESTION, SOLUTION, call, make_reward

    tok = load_tokenizer(tiny_model_path)
    teacher = load_model(tiny_model_path, torch_dtype="float32")
    student = load_model(tiny_model_path, torch_dtype="float32")
    gen = torch.Generator().manual_seed(1234)  # the CPU tests' student
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    row = teacher_rl_prompt({"question": QUESTION, "solution": SOLUTION}, FMT, tok)
    texts = [body + CLOSE for body in BODIES] + [BODIES[0]]  # the last one is not closed

    def score(device: str, dtype: torch.dtype) -> tuple[list[float], dict[str, list[float]]]:
        setup = (tok, copy.deepcopy(teacher).to(device, dtype), copy.deepcopy(student).to(device, dtype), row)
        reward = make_reward(setup, teacher_reward_batch_size=3, temperature=0.7, unbias_student_log_probs_temp=0.7)
        with _exact_cuda_matmuls():
            values = call(reward, setup, texts)
        return values, reward.last_terms

    cpu32, cpu32_terms = score("cpu", torch.float32)
    cpu16, _ = score("cpu", torch.bfloat16)
    gpu32, gpu32_terms = score(GPU, torch.float32)
    gpu16, _ = score(GPU, torch.bfloat16)

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    band = gap(cpu16, cpu32)
    record_property(SUMMARY, f"|cuda fp32 - cpu fp32| = {gap(gpu32, cpu32):.1e} (<= 1e-5); |cuda bf16 - cpu fp32| = "
                             f"{gap(gpu16, cpu32):.1e} (<= 2 x {band:.1e}, bf16's band on CPU); "
                             f"|cuda bf16 - cpu bf16| = {gap(gpu16, cpu16):.1e}")
    assert all(math.isfinite(x) for x in [*gpu32, *gpu16]), (gpu32, gpu16)
    assert gpu32 == pytest.approx(cpu32, abs=1e-5)
    for key in ("log_prob_term", "kl_term", "match_reward", "explanation_tokens", "solution_tokens"):
        assert gpu32_terms[key] == pytest.approx(cpu32_terms[key], abs=1e-5), key
    assert gap(gpu16, cpu32) <= 2 * band + 1e-6, (gpu16, cpu16, cpu32)


# ------------------------------------------------------------------------------------------- 3. memory estimate

def _build_qwen_shape(out: Path, tokenizer_dir: str, name: str = "Qwen2.5-0.5B") -> int:
    """A randomly initialised bf16 model with the bundled architecture `name` (`rlt.memory.BUNDLED_ARCHS`), saved with
    rlt:tiny's tokenizer: its real vocabulary size (151,936 rows) is kept and the tokenizer uses the first 2,048 rows
    (as Qwen's own 151,665 tokens leave rows unused). Built on the GPU (~5 s). Returns the parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    from rlt import memory as M

    arch = M.BUNDLED_ARCHS[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) <= arch.vocab_size
    config = Qwen2Config(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                         num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                         tie_word_embeddings=arch.tie_embeddings, max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = model.num_parameters()
    assert params == M.param_count(arch), (params, M.param_count(arch))  # the real shape, not an approximation
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    _free_cuda()
    return params


# name -> overrides ({corpus}: `write_corpus`'s directory, {qwen}: `_build_qwen_shape`'s). SFT reads a text corpus of
# paragraphs longer than max_length: every row is max_length tokens, unpadded, the estimate's worst case made real
# (packing is no substitute: TRL packs padding-free, one row of batch × max_length tokens with a block-diagonal mask).
# GRPO's max_prompt_length is the longest synthetic prompt (83 tokens with the tiny tokenizer) + 1, so the estimate's
# prompt + completion is what it generates.
SFT_CORPUS = ["data_cfg=text_corpus", "dataset_id_or_path={corpus}", "text_sample_by=paragraph"]
MEMORY_CASES: dict[str, list[str]] = {
    "tiny SFT full": ["run_cfg=tiny_sft", *SFT_CORPUS, "max_length=1024", "per_device_train_batch_size=16",
                      "train_batch_size=16"],
    "tiny SFT LoRA": ["run_cfg=tiny_sft", *SFT_CORPUS, "max_length=1024", "per_device_train_batch_size=16",
                      "train_batch_size=16", "use_peft=true", "lora_r=16"],
    "tiny GRPO": ["run_cfg=tiny_grpo", "per_device_train_batch_size=16", "train_batch_size=16", "num_generations=4",
                  "max_prompt_length=84", "max_completion_length=256"],
    "Qwen2.5-0.5B shape SFT full bf16": ["run_cfg=tiny_sft", *SFT_CORPUS, "model_name_or_path={qwen}",
                                         "torch_dtype=bfloat16", "max_length=512", "per_device_train_batch_size=4",
                                         "train_batch_size=4", "learning_rate=1e-5"],
}


def write_corpus(root: Path, paragraphs: int = 64) -> Path:
    """`paragraphs` paragraphs of ~1,500 tokens each (with the tiny tokenizer) in root/train.txt."""
    root.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(" ".join(f"The cat {k} sat on mat number {7 * i + k}." for k in range(150))
                         for i in range(paragraphs))
    (root / "train.txt").write_text(text + "\n")
    return root


MEMORY_COMMON = ["max_steps=3", "save_steps=1000", "save_final_model=false", "eval_steps=null", "plots=false",
                 "mixed_precision=bf16"]


def estimate_for(run, gpu_memory: str = "80GB"):
    """`rlt.memory.estimate` of the plan `rlt.memcheck` builds for this validated run (the trainers' gate), without
    the framework overhead (CUDA context, cuBLAS workspaces), which `max_memory_allocated` does not see."""
    from rlt import memory as M
    from rlt.memcheck import build_parser, plan_from_config, resolve_arch

    args = build_parser().parse_args([run.run_name, "--gpu-memory", gpu_memory, "--overhead", "0B"])
    policy, _ = resolve_arch(run.model_name_or_path, run.model_revision, stand_in=run.memcheck_model_arch)
    return M.estimate(plan_from_config(run, args, policy=policy, student=None))


def measure_case(compose, overrides: list[str], output_dir: Path) -> dict:
    """Train one case and compare: measured = peak allocated bytes during training (the probe's) minus what was
    allocated before the run started (the cuBLAS workspaces a warm-up made, leftovers)."""
    from rlt.config import validate
    from rlt.train import run_training

    cfg = compose([*overrides, *MEMORY_COMMON, f"output_dir={output_dir}"])
    est = estimate_for(validate(cfg), f"{torch.cuda.get_device_properties(0).total_memory}B")
    _free_cuda()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with probed() as probe:
        summary = run_training(cfg)
    seconds = time.perf_counter() - start
    measured = probe.peak - base
    row = {"estimate_bytes": est.total, "measured_bytes": measured, "ratio": est.total / measured,
           "peak_phase": est.peak_phase, "phase_totals": est.phase_totals(),
           "components": {c.name: c.bytes for c in est.components if c.bytes}, "base_allocated_bytes": base,
           "steps": summary["global_step"], "losses": probe.losses, "seconds": round(seconds, 1),
           "overrides": [*overrides, *MEMORY_COMMON]}
    _free_cuda()
    return row


def _warm_up_cublas() -> None:
    """Allocate the cuBLAS/cuBLASLt workspaces of the forward and the backward (autograd's) thread in fp32 and bf16, so
    they are in every case's baseline rather than in the first case's peak."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(x, w, torch.zeros(64, device="cuda", dtype=dtype)).sum().backward()
    torch.cuda.synchronize()


def format_table(rows: dict[str, dict]) -> list[str]:
    head = f"{'config':<34} {'estimated GB':>12} {'measured GB':>12} {'ratio':>6}  peak phase"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        flag = "" if abs(r["ratio"] - 1) <= MEMORY_TOLERANCE else f"  OUTSIDE ±{MEMORY_TOLERANCE:.0%}"
        lines.append(f"{name:<34} {r['estimate_bytes'] / 1e9:>12.3f} {r['measured_bytes'] / 1e9:>12.3f} "
                     f"{r['ratio']:>6.3f}  {r['peak_phase']}{flag}")
    return lines


def test_memory_estimate_against_cuda_peak(compose, tmp_path, tiny_model_path, record_property, capsys):
    """The estimate of each of MEMORY_CASES (3 steps, bf16) against `torch.cuda.max_memory_allocated()`, within 15%;
    the table is printed and written to results/gpu_check/memory.json before anything is asserted. ~1.5 min (the
    0.5B model: ~5 s to build, ~20 s to load and train)."""
    import transformers
    import trl

    from bench.common import machine_info, write_json

    qwen_dir = tmp_path / "qwen2.5-0.5b-shape"
    params = _build_qwen_shape(qwen_dir, tiny_model_path)
    paths = {"corpus": write_corpus(tmp_path / "corpus"), "qwen": qwen_dir}
    _warm_up_cublas()
    rows: dict[str, dict] = {}
    for i, (name, overrides) in enumerate(MEMORY_CASES.items()):
        rows[name] = measure_case(compose, [o.format(**paths) for o in overrides], tmp_path / f"run{i}")
    table = format_table(rows)
    with capsys.disabled():
        print("\n\nmemory: estimate (rlt.memcheck's plan, no framework overhead) vs torch.cuda.max_memory_allocated()"
              " (GB = 10^9 bytes)\n" + "\n".join(table))
        write_json(MEMORY_JSON, {"device": torch.cuda.get_device_name(0), "tolerance": MEMORY_TOLERANCE,
                                 "qwen_shape_params": params, "torch": torch.__version__,
                                 "transformers": transformers.__version__, "trl": trl.__version__,
                                 "machine": machine_info(), "cases": rows})
    for name, r in rows.items():
        record_property(SUMMARY, f"{name}: estimated {r['estimate_bytes'] / 1e9:.3f} GB, measured "
                                 f"{r['measured_bytes'] / 1e9:.3f} GB, ratio {r['ratio']:.3f} ({r['peak_phase']})")
    for name, r in rows.items():
        assert r["steps"] == 3 and all(math.isfinite(x) for x in r["losses"]), (name, r["losses"])
    outside = {name: round(r["ratio"], 3) for name, r in rows.items() if abs(r["ratio"] - 1) > MEMORY_TOLERANCE}
    assert not outside, f"estimate / measured outside 1 ± {MEMORY_TOLERANCE}: {outside} (see {MEMORY_JSON})"


# ------------------------------------------------------------------------------------------- 4. preflight

def _preflight_report(compose, overrides: list[str], key: str) -> tuple[str, str]:
    """(the problem `rlt.preflight.problems` finds for `key` on this machine, the message `check` refuses the run
    with) for tiny_sft + `overrides`."""
    from rlt.config import validate
    from rlt.errors import ConfigError

    preflight = pytest.importorskip("rlt.preflight")
    run = validate(compose(["run_cfg=tiny_sft", *overrides]))
    machine = preflight.Machine.detect()
    assert machine.has_cuda, machine
    found = [str(p) for p in preflight.problems(run, machine) if str(p).startswith(f"{key}=")]
    with pytest.raises(ConfigError) as refused:
        preflight.check(run, machine)
    return "\n".join(found), str(refused.value)


def test_preflight_without_flash_attn_names_sdpa(compose, record_property):
    """On this GPU machine without flash-attn: `attn_implementation=flash_attention_2` is reported (and the run
    refused), naming `attn_implementation=sdpa` as the setting that runs here. ~1 s."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    problem, message = _preflight_report(compose, ["attn_implementation=flash_attention_2", "torch_dtype=bfloat16"],
                                         "attn_implementation")
    record_property(SUMMARY, problem)
    assert problem and "flash_attn" in problem and problem.endswith("attn_implementation=sdpa"), problem
    assert "run it here with:" in message and "attn_implementation=sdpa" in message.splitlines()[-1], message


def test_preflight_without_bitsandbytes_names_another_optimizer(compose, record_property):
    """On this GPU machine without bitsandbytes: `optim=paged_adamw_8bit` is reported (and the run refused), naming
    the package and an optimizer that needs none. ~1 s."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    problem, message = _preflight_report(compose, ["optim=paged_adamw_8bit"], "optim")
    record_property(SUMMARY, problem)
    assert problem.startswith("optim=paged_adamw_8bit") and "bitsandbytes" in problem, problem
    replacement = re.search(r"→ optim=(\w+)$", problem)
    assert replacement and replacement[1] not in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"), problem
    assert f"optim={replacement[1]}" in message.splitlines()[-1], message
