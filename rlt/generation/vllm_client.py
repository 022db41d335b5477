"""The trainer's client of the rlt vLLM servers (`rlt.generation.vllm_server`): prompts split across servers, a
sampling seed per prompt, weights through /dev/shm or the request body, a timeout on every request and one clear error
when a server fails. Every request but /health carries the servers' token, $RLT_SERVER_TOKEN (launch_multi.sh makes
one per run). How it fits together: docs/distributed.md ("The `vllm_server` generation backend", "Security").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from rlt.errors import RltError
from rlt.generation.shm import create_private_file, shm_dir

TOKEN_ENV = "RLT_SERVER_TOKEN"  # the servers' token (rlt.generation.vllm_server), from the environment

logger = logging.getLogger(__name__)


class VLLMServerError(RltError):
    """A generation server could not be reached, answered with an error, or took longer than the timeout."""


def server_urls(urls: Sequence[str], host: str, port: int) -> list[str]:
    """The configured servers: `vllm_server_urls`, or the single http://host:port."""
    return [u.rstrip("/") for u in urls] if urls else [f"http://{host}:{port}"]


def _round_seeds(seed: int, round_index: int, count: int) -> list[int]:
    """One sampling seed per prompt of a generation round: a function of (run seed, round, prompt index) only."""
    out = []
    for i in range(count):
        digest = hashlib.sha256(f"{seed}:{round_index}:{i}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out


def _refusal(status: int) -> str:
    """Why a server refused the trainer (HTTP 401 or 403), naming what to set."""
    if status == 401:
        return (f"HTTP 401, the server asks for a token: set {TOKEN_ENV} in the trainer's environment to the "
                "server's (launch_multi.sh passes one per run to both)")
    return (f"HTTP 403, wrong token: {TOKEN_ENV} in the trainer's environment is not the one the server was "
            "started with")


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges covering `count` items, sizes differing by at most one, e.g. 5, 2 → [(0, 3),
    (3, 5)]; empty ranges are dropped."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            ranges.append((start, stop))
        start = stop
    return ranges


class VLLMServerClient:
    """Talks to one or more rlt vLLM servers: the interface TRL's `VLLMGeneration` uses in server mode
    (`generate`, `update_named_params`, `reset_prefix_cache`, `get_server_info`).

    `connect_timeout`: seconds to wait for every server's /health (`wait_until_ready`). `request_timeout`: seconds
    one request may take. `seed`: base of the per-prompt sampling seeds (None: unseeded sampling). `transport`:
    how weights travel: "auto" (a /dev/shm file for servers on this host, the request body otherwise), "shm" or
    "http". `resume_hint`: appended to error messages (e.g. where the last checkpoint is). `token`: sent as
    `Authorization: Bearer` to every endpoint but /health (default: $RLT_SERVER_TOKEN; none if that is unset).
    """

    def __init__(self, urls: Sequence[str], *, connect_timeout: float = 240.0, request_timeout: float = 600.0,
                 seed: int | None = 0, transport: str = "auto", resume_hint: str = "", token: str | None = None):
        import requests

        if not urls:
            raise ValueError("no server URLs")
        if transport not in ("auto", "shm", "http"):
            raise ValueError(f"transport must be auto, shm or http, got {transport!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.seed = seed
        self.transport = transport
        self.resume_hint = resume_hint
        self.rounds = 0  # generate() calls so far: the round index of the sampling seeds
        self.weights_version = 0
        self.last_sync_seconds: float | None = None
        self.defer_weight_push = False  # asynchronous generation: weights travel with the next generate
        self._deferred_push: tuple[int, dict] | None = None
        self._push_lock = threading.Lock()
        token = os.environ.get(TOKEN_ENV) if token is None else token
        self._sessions = {u: requests.Session() for u in self.urls}
        for session in self._sessions.values():
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.urls),
                                                           thread_name_prefix="vllm-client")
        self._infos: dict[str, dict] = {}

    # ---- plumbing
    def _fail(self, url: str, what: str, reason: str) -> VLLMServerError:
        hint = f" {self.resume_hint}" if self.resume_hint else ""
        return VLLMServerError(f"vLLM server {url} failed during {what}: {reason}. Training stops here.{hint}")

    def _request(self, method: str, url: str, path: str, what: str, *, timeout: float | None = None, **kwargs):
        import requests

        timeout = self.request_timeout if timeout is None else timeout
        try:
            response = self._sessions[url].request(method, url + path, timeout=timeout, **kwargs)
        except requests.exceptions.ReadTimeout:
            raise self._fail(url, what, f"no answer within {timeout:g}s (vllm_server_request_timeout)") from None
        except requests.exceptions.ConnectionError:
            raise self._fail(url, what, "connection refused or reset (is the server process gone? see its log)"
                             ) from None
        except requests.exceptions.RequestException as e:
            raise self._fail(url, what, f"{type(e).__name__}: {e}") from None
        if response.status_code in (401, 403):
            raise self._fail(url, what, _refusal(response.status_code))
        if response.status_code != 200:
            raise self._fail(url, what, f"HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def _on_all(self, fn) -> list:
        """fn(url) on every server concurrently; the first failure is raised after all have finished."""
        futures = [self._pool.submit(fn, url) for url in self.urls]
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]

    # ---- start-up
    def wait_until_ready(self, poll_seconds: float = 1.0) -> None:
        """Poll every server's /health until all answer 200, or raise after `connect_timeout` seconds."""
        import requests

        deadline = time.monotonic() + self.connect_timeout
        pending = list(self.urls)
        while pending:
            for url in list(pending):
                with contextlib.suppress(requests.exceptions.RequestException):
                    if requests.get(url + "/health", timeout=5).status_code == 200:
                        pending.remove(url)
            if pending and time.monotonic() > deadline:
                raise VLLMServerError(f"vLLM server(s) {', '.join(pending)} not ready after {self.connect_timeout:g}s "
                                      "(vllm_server_timeout): start them first (launch_multi.sh does) or check "
                                      "their logs")
            if pending:
                time.sleep(poll_seconds)
        self._infos = dict(zip(self.urls, self._on_all(lambda u: self._request("GET", u, "/info", "info")),
                               strict=True))
        logger.info("vLLM servers ready: %s", ", ".join(self.urls))

    def get_server_info(self) -> dict:
        if not self._infos:
            self._infos = {u: self._request("GET", u, "/info", "info") for u in self.urls}
        return self._infos[self.urls[0]]

    def next_round(self) -> int:
        """Reserve the next round index (`generate`'s sampling seeds)."""
        self.rounds += 1
        return self.rounds - 1

    def init_communicator(self, device=None) -> None:  # TRL's NCCL group: not used here
        return None

    def close_communicator(self) -> None:
        return None

    # ---- generation
    def generate(self, prompts: Sequence[Sequence[int]], features=None, n: int = 1, repetition_penalty: float = 1.0,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 max_tokens: int = 16, logprobs: int | None = 0, structured_outputs_regex: str | None = None,
                 generation_kwargs: dict | None = None, round_index: int | None = None) -> dict[str, Any]:
        """`n` completions per prompt, prompts split contiguously across the servers (results in prompt order), and
        ``weights_version``: the update count of the oldest weights that sampled them. `round_index` picks the
        sampling seeds (None: `next_round`); give it when requests are sent from several threads."""
        if features is not None or structured_outputs_regex is not None:
            raise VLLMServerError("the rlt vLLM server generates from token ids only (no images, no structured "
                                  "outputs)")
        if isinstance(prompts[0], str) if prompts else False:
            raise VLLMServerError("the rlt vLLM server takes token-id prompts, not strings")
        self._push_deferred()
        if round_index is None:
            round_index = self.next_round()
        seeds = None if self.seed is None else _round_seeds(self.seed, round_index, len(prompts))
        common = {"n": n, "repetition_penalty": repetition_penalty, "temperature": temperature, "top_p": top_p,
                  "top_k": top_k, "min_p": 0.0 if min_p is None else min_p, "max_tokens": max_tokens,
                  "logprobs": logprobs, "generation_kwargs": generation_kwargs or {}}
        ranges = split_evenly(len(prompts), len(self.urls))

        def send(index: int):
            url, (start, stop) = self.urls[index], ranges[index]
            body = {**common, "prompts": [list(p) for p in prompts[start:stop]],
                    "seeds": None if seeds is None else seeds[start:stop]}
            return self._request("POST", url, "/generate", f"generate ({stop - start} prompts × {n})", json=body)

        futures = [self._pool.submit(send, i) for i in range(len(ranges))]
        concurrent.futures.wait(futures)
        parts = [f.result() for f in futures]
        out: dict[str, Any] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "logprob_token_ids": []}
        for part in parts:
            for key in out:
                if out[key] is not None and part.get(key) is not None:
                    out[key].extend(part[key])
                else:
                    out[key] = None
        # the oldest weights that sampled any of it (the servers' `weights_version`: updates pushed so far)
        versions = [part.get("weights_version") for part in parts]
        out["weights_version"] = None if None in versions else min(versions)
        return out

    # ---- weights
    def _local(self, url: str) -> bool:
        info = self._infos.get(url) or self._request("GET", url, "/info", "info")
        return info.get("hostname") == socket.gethostname()

    def update_named_params(self, metadata, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Push the policy's weights (TRL's iterator: consumed entirely, as ZeRO-3 gathers are collective). With
        `defer_weight_push` only their copy is made here; the next `generate` pushes it first (from its own thread)."""
        import torch

        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in named_tensors:  # copies: gathered shards and merged LoRA weights are only lent
                tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.weights_version += 1
        if self.defer_weight_push:
            with self._push_lock:  # a newer copy replaces one not yet pushed: the servers skip that version
                self._deferred_push = (self.weights_version, tensors)
            return
        self._push(self.weights_version, tensors)

    def _push_deferred(self) -> None:
        with self._push_lock:  # held while pushing: a generate from another thread waits for these weights
            deferred, self._deferred_push = self._deferred_push, None
            if deferred is not None:
                self._push(*deferred)

    def _push(self, version: int, tensors: dict) -> None:
        from safetensors.torch import save, save_file

        start = time.perf_counter()
        local = [u for u in self.urls if self.transport == "shm" or (self.transport == "auto" and self._local(u))]
        remote = [u for u in self.urls if u not in local]
        path = blob = None
        try:
            if local:
                name = os.path.join(shm_dir(), f"rlt-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors")
                create_private_file(name)  # the weights are readable by this user only
                path = name
                save_file(tensors, path)
            if remote:
                blob = save(tensors)

            def push(url: str):
                what = f"weight update {version}"
                if url in local:
                    return self._request("POST", url, "/update_weights", what, json={"path": path, "version": version})
                return self._request("POST", url, "/update_weights", what, params={"version": version}, data=blob,
                                     headers={"Content-Type": "application/octet-stream"})

            results = self._on_all(push)
        finally:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for url, result in zip(self.urls, results, strict=True):
            if result.get("num_tensors") != len(tensors):
                raise self._fail(url, f"weight update {version}",
                                 f"loaded {result.get('num_tensors')} of {len(tensors)} tensors")
        self.last_sync_seconds = time.perf_counter() - start
        logger.debug("weights v%d pushed to %d server(s) in %.3fs", version, len(self.urls), self.last_sync_seconds)

    def reset_prefix_cache(self) -> None:
        self._on_all(lambda u: self._request("POST", u, "/reset_prefix_cache", "prefix-cache reset"))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for session in self._sessions.values():
            session.close()
