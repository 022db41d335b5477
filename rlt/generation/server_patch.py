"""The `vllm_server` generation backend on the trainer's side: `use_vllm_servers` makes TRL's GRPOTrainer build
`ServerVLLMGeneration`, TRL's `VLLMGeneration` whose server mode talks to rlt vLLM servers through
`rlt.generation.vllm_client.VLLMServerClient`; TRL's own `generate` and `sync_weights` are unchanged. The TRL
internals it patches are listed in `rlt.trl_patches`; the backend is described in docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

from rlt.generation.vllm_client import VLLMServerClient
from rlt.trl_patches import check_trl, vllm_generation_swapped


@functools.cache
def _server_generation_class() -> type:
    from trl.generation.vllm_generation import VLLMGeneration

    check_trl()

    class ServerVLLMGeneration(VLLMGeneration):
        """TRL's `VLLMGeneration` whose server mode uses `VLLMServerClient` (several servers, weight sync without
        NCCL, timeouts, clear errors). Extra keyword-only arguments: `urls`, `request_timeout`, `seed`,
        `transport`, `resume_hint` (see `VLLMServerClient`); `server_timeout` is the start-up wait."""

        def __init__(self, *args, urls: Sequence[str] = (), request_timeout: float = 600.0, seed: int | None = 0,
                     transport: str = "auto", resume_hint: str = "", **kwargs):
            self.urls = list(urls)
            self.request_timeout = request_timeout
            self.sampling_seed = seed
            self.transport = transport
            self.resume_hint = resume_hint
            super().__init__(*args, **kwargs)  # calls _init_vllm

        def _init_vllm(self) -> None:
            if self.mode != "server":
                raise ValueError(f"ServerVLLMGeneration needs vllm_mode='server', got {self.mode!r}")
            urls = self.urls or [self.server_base_url or f"http://{self.server_host}:{self.server_port}"]
            if self.accelerator.is_main_process:  # TRL's generate/sync_weights talk to the servers from rank 0
                self.vllm_client = VLLMServerClient(urls, connect_timeout=self.server_timeout,
                                                    request_timeout=self.request_timeout, seed=self.sampling_seed,
                                                    transport=self.transport, resume_hint=self.resume_hint)
                self.vllm_client.wait_until_ready()
            self.accelerator.wait_for_everyone()

    ServerVLLMGeneration.__module__ = __name__
    ServerVLLMGeneration.__qualname__ = "ServerVLLMGeneration"
    return ServerVLLMGeneration


def __getattr__(name: str):
    if name == "ServerVLLMGeneration":  # built on first access: subclassing TRL's class imports TRL's vLLM module
        return _server_generation_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def use_vllm_servers(urls: Sequence[str], *, request_timeout: float = 600.0, seed: int | None = 0,
                     transport: str = "auto", resume_hint: str = "",
                     trainer_modules: Sequence[str] = ("trl.trainer.grpo_trainer",)) -> Iterator[Any]:
    """Within this block, TRL trainers built with `vllm_mode="server"` use `ServerVLLMGeneration` on `urls`.

    Only the trainer's construction must be inside the block. As `use_colocated_vllm`, this rebinds the module
    global `VLLMGeneration` of `trainer_modules` (TRL has no factory hook) and restores it on exit
    (`rlt.trl_patches.vllm_generation_swapped`).
    """
    from rlt.utils.imports import require

    require("vllm")  # TRL's vLLM module imports vllm
    factory = functools.partial(_server_generation_class(), urls=list(urls), request_timeout=request_timeout,
                                seed=seed, transport=transport, resume_hint=resume_hint)
    with vllm_generation_swapped(factory, trainer_modules):
        yield factory
