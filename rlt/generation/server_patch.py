"""The `vllm_server` generation backend on the trainer's side: `use_vllm_servers` makes TRL's GRPOTrainer build
`ServerVLLMGeneration`, TRL's `VLLMGeneration` whose server mode talks to rlt vLLM servers through
`rlt.generation.vllm_client.VLLMServerClient`; TRL's own `generate` and `sync_weights` are unchanged, and
`submit` / `collect` split a generation in two for asynchronous generation (`rlt.generation.async_rounds`). The TRL
internals it patches are listed in `rlt.trl_patches`; the backend is described in docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rlt.generation.async_rounds import PendingRound, in_background
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
            self.pushed_steps: list[int | None] = []
            super().__init__(*args, **kwargs)  # calls _init_vllm

        # what the trainer's current optimizer step is (set by rlt.trainers.GRPOTrainer): `pushed_steps` records,
        # for each weight update the servers received, the step of the weights pushed
        policy_step: Callable[[], int] | None = None

        def sync_weights(self) -> None:
            super().sync_weights()
            self.pushed_steps.append(self.policy_step() if self.policy_step is not None else None)

        def step_of_version(self, version: int | None) -> int | None:
            """The optimizer step of the weights the servers call `version` (their update count), None if unknown."""
            if version is None or not 1 <= version <= len(self.pushed_steps):
                return None
            return self.pushed_steps[version - 1]

        def submit(self, prompts: list[list[int]], num_generations: int) -> PendingRound:
            """Start sampling `num_generations` completions of each of this rank's `prompts` (token ids, each prompt
            repeated `num_generations` times in a row, as TRL passes them) and return at once; `collect` waits.
            Collective: every rank calls it at the same point (the prompts are gathered to rank 0, which sends one
            request from a background thread)."""
            from accelerate.utils import gather_object

            all_prompts = gather_object(prompts)
            future = None
            if self.accelerator.is_main_process:
                params = {"n": num_generations, "repetition_penalty": self.repetition_penalty,
                          "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                          "min_p": 0.0 if self.min_p is None else self.min_p, "max_tokens": self.max_completion_length,
                          "logprobs": self.logprobs, "generation_kwargs": self.generation_kwargs,
                          "round_index": self.vllm_client.next_round()}
                future = in_background(self.vllm_client.generate, all_prompts[::num_generations], **params)
            return PendingRound(prompts=list(prompts), future=future)

        def collect(self, pending: PendingRound) -> tuple[list, list, list | None, int | None]:
            """Wait for a `submit`ted round: this rank's (prompt_ids, completion_ids, per-token sampling log-probs of
            the sampled tokens or None, the servers' weights version that sampled it). Collective (a broadcast)."""
            from accelerate.utils import broadcast_object_list

            payload = None
            if self.accelerator.is_main_process:
                out = pending.future.result()
                payload = (out["completion_ids"], out["logprobs"], out.get("weights_version"))
            box = [payload]
            broadcast_object_list(box, from_process=0)
            completion_ids, logprobs, version = box[0]
            count = len(pending.prompts)
            mine = slice(self.accelerator.process_index * count, (self.accelerator.process_index + 1) * count)
            logprobs = None if logprobs is None else [[lp[0] for lp in seq] for seq in logprobs[mine]]
            return pending.prompts, completion_ids[mine], logprobs, version

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
