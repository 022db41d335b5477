"""What a caller of the rlt vLLM server (`rlt.generation.vllm_server`) may do: who may call (a per-run token, or
loopback only without one: `server_token`, `TokenGate`) and what a request may ask (`Limits`, `generate_plan`;
weight files checked against the model's parameter names and shapes from their header alone:
`check_weights_file`). Pure checks that answer `Rejected` (an HTTP status and a one-line reason); nothing here
imports vLLM. The rules and why: docs/distributed.md ("Security").
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlt.errors import RltError
from rlt.generation.vllm_client import TOKEN_ENV

logger = logging.getLogger(__name__)

TOKEN_PATTERN = re.compile(r"[!-~]{16,}")  # 16+ printable ASCII characters, no spaces
NEW_TOKEN = "export RLT_SERVER_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')"
DEFAULT_REQUEST_BYTES = 64 * 2**20  # a JSON request (/generate): ~8M prompt tokens
DEFAULT_MAX_SEQUENCES = 4096  # prompts × n of one /generate request (or the run's generation round, if larger)
WEIGHTS_PATH_REQUEST_BYTES = 64 * 2**10  # {"path": ..., "version": ...}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # safetensors dtype names


class Rejected(Exception):
    """A request the server refuses before doing anything: HTTP `status` with `reason` as the answer's detail."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one request may carry (the server's --max-* flags): bytes of a weight upload and of a JSON request,
    sequences (prompts × n) of one /generate, tokens of one prompt."""

    max_upload_bytes: int
    max_request_bytes: int = DEFAULT_REQUEST_BYTES
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    max_prompt_tokens: int = 2**20


# ---------------------------------------------------------------- who may call

def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches this machine only: 127.0.0.1, ::1, localhost → True;
    0.0.0.0, ::, 10.0.0.2, a host name with a network address → False."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def server_token(host: str, environ: Mapping[str, str]) -> str | None:
    """The token every request but /health must carry: $RLT_SERVER_TOKEN. None (no token asked) only for a server
    listening on a loopback address; RltError (one line) for a token too weak to use or a reachable address without
    one. E.g. ("127.0.0.1", {}) → None; ("0.0.0.0", {}) → RltError; ("0.0.0.0", {RLT_SERVER_TOKEN: 64 hex}) → it."""
    token = environ.get(TOKEN_ENV, "")
    if token:
        if not TOKEN_PATTERN.fullmatch(token):
            raise RltError(f"{TOKEN_ENV} must be at least 16 printable ASCII characters without spaces (it has "
                           f"{len(token)} characters), e.g. {NEW_TOKEN}")
        return token
    if not is_loopback(host):
        raise RltError(f"--host {host} can be reached from other machines, so the server needs a token: start it "
                       f"with {TOKEN_ENV} in its environment and the trainers' (e.g. {NEW_TOKEN}; launch_multi.sh "
                       "makes one per run), or listen on 127.0.0.1")
    return None


def token_refusal(authorization: str | None, token: str) -> int | None:
    """The HTTP status refusing a request with this Authorization header, None to let it through (compared in
    constant time). E.g. with token "s3cret...": None → 401, "Basic x" → 401, "Bearer wrong" → 403,
    "Bearer s3cret..." → None.
    """
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return 401
    import hmac

    return None if hmac.compare_digest(value.strip().encode(), token.encode()) else 403


class TokenGate:
    """ASGI middleware: every HTTP request but /health must carry `Authorization: Bearer <token>` (401 without it,
    403 with another token), checked before the request's body is read."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            status = token_refusal(header, self.token)
            if status is not None:
                from starlette.responses import JSONResponse

                reason = (f"no token: send 'Authorization: Bearer ${TOKEN_ENV}'" if status == 401
                          else f"wrong token: not the {TOKEN_ENV} this server was started with")
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                await JSONResponse({"detail": reason}, status_code=status, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- what a request may ask

def generate_plan(request: Any, limits: Limits, vocab_size: int | None = None
                  ) -> tuple[list[list[int]], list[int | None], dict[str, Any]]:
    """A /generate request checked against `limits` (and the model's vocabulary), before any work: its prompts, one
    sampling seed per prompt and the SamplingParams keywords (`generation_kwargs` merged in, so they cannot lift `n`
    past the limit). `Rejected` 422 for a malformed request, 413 for one over a limit.

    E.g. with Limits(max_sequences=8, max_prompt_tokens=4): {"prompts": [[1, 2]], "n": 4, "seeds": [7]} →
    ([[1, 2]], [7], {"n": 4, ...}); 3 prompts × n=4 → 413 (12 sequences); a prompt of 5 tokens → 413;
    {"prompts": "hi"} → 422.
    """
    if not isinstance(request, dict):
        raise Rejected(422, "the body must be a JSON object")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise Rejected(422, "prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt or not all(type(t) is int and t >= 0 for t in prompt):
            raise Rejected(422, f"prompts[{i}] must be a non-empty list of token ids (integers >= 0)")
        if vocab_size is not None and max(prompt) >= vocab_size:
            raise Rejected(422, f"prompts[{i}] has token id {max(prompt)}, outside the vocabulary (size {vocab_size})")
        if len(prompt) > limits.max_prompt_tokens:
            raise Rejected(413, f"prompts[{i}] has {len(prompt)} tokens, more than --max-prompt-tokens "
                                f"{limits.max_prompt_tokens}")
    seeds = request.get("seeds")
    if seeds is None:
        seeds = [None] * len(prompts)
    elif not isinstance(seeds, list) or len(seeds) != len(prompts) or \
            not all(s is None or type(s) is int for s in seeds):
        raise Rejected(422, f"seeds must be null or one integer (or null) per prompt, for {len(prompts)} prompts")
    extra = request.get("generation_kwargs") or {}
    if not isinstance(extra, dict):
        raise Rejected(422, "generation_kwargs must be a JSON object")
    try:
        params = {"n": int(request.get("n", 1)), "temperature": float(request.get("temperature", 1.0)),
                  "top_p": float(request.get("top_p", 1.0)), "top_k": int(request.get("top_k") or 0) or -1,
                  "min_p": float(request.get("min_p") or 0.0),
                  "repetition_penalty": float(request.get("repetition_penalty", 1.0)),
                  "max_tokens": int(request.get("max_tokens", 16)), "logprobs": request.get("logprobs", 0),
                  "detokenize": False}  # the client gets token ids only; detokenising every token is wasted work
    except (TypeError, ValueError) as e:
        raise Rejected(422, f"bad sampling setting: {e}") from None
    extra = dict(extra)
    fixed_seed = extra.pop("seed", None)  # one seed for every prompt, when no per-prompt seeds are given
    params.update(extra)
    if extra.get("stop") and "detokenize" not in extra:
        params["detokenize"] = True  # stop strings are matched on text
    n = params["n"]
    if type(n) is not int or n < 1:
        raise Rejected(422, f"n={n!r} must be a whole number >= 1")
    if len(prompts) * n > limits.max_sequences:
        raise Rejected(413, f"{len(prompts)} prompts × n={n} = {len(prompts) * n} sequences, more than "
                            f"--max-sequences-per-request {limits.max_sequences}: split the request")
    return prompts, [fixed_seed if s is None else s for s in seeds], params


def check_weights_file(path: str, expected: Mapping[str, tuple[int, ...]]) -> int:
    """The number of tensors in the safetensors file `path`, once its header (read alone: no weight is loaded)
    matches the model: names among `expected`, the same shapes, floating-point dtypes. `Rejected` otherwise: 400 for
    a file that is not safetensors, 422 for a tensor the model does not have or has in another shape.
    E.g. expected {"w": (2, 3)}: a file {"w": F32 2×3} → 1; {"w": F32 3×2} → 422 "w (3, 2), the model's (2, 3)".
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            header = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise Rejected(400, f"not a safetensors file: {' '.join(str(e).split())}") from None

    def listed(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    if not header:
        raise Rejected(422, "the weights file holds no tensors")
    unknown = sorted(set(header) - set(expected))
    if unknown:
        raise Rejected(422, f"{len(unknown)} tensor(s) the model does not have: {listed(unknown)}")
    wrong = [f"{name} {shape}, the model's {expected[name]}" for name, (shape, _) in sorted(header.items())
             if shape != tuple(expected[name])]
    if wrong:
        raise Rejected(422, f"shape mismatch: {listed(wrong)}")
    not_float = [f"{name} {dtype}" for name, (_, dtype) in sorted(header.items()) if dtype not in FLOAT_DTYPES]
    if not_float:
        raise Rejected(422, f"weights must be floating point: {listed(not_float)}")
    return len(header)


def model_weight_shapes(model_dir: str, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Every parameter name a trainer of this model may push (Hugging Face names, tied aliases included) with its
    shape: the model built from its config on the meta device (no memory), or, where transformers cannot build it,
    the tensors of the checkpoint's safetensors files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError, ImportError) as e:
        logger.warning("cannot build %s on the meta device (%s): weight uploads are checked against its "
                       "checkpoint's tensors", model_dir, e)
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    if not shapes:
        raise RltError(f"cannot tell the parameter names of {model_dir} (transformers cannot build it and it has no "
                       "safetensors files), so weight uploads could not be checked")
    return shapes
