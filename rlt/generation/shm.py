"""Where weight files pass between a trainer and the vLLM servers on its host (`rlt.generation.vllm_client`,
`rlt.generation.vllm_server`): /dev/shm, a RAM file system, or the temporary directory where there is none.
A server loads a weights file by path only from directly inside this directory (`weights_file_in_shm`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SHM_DIR = "/dev/shm"


def shm_dir() -> str:
    return SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else tempfile.gettempdir()


def weights_file_in_shm(path: str) -> Path:
    """`path` resolved, if it names a regular file directly inside `shm_dir()`; ValueError saying why not otherwise.

    Symbolic links are followed before the check, so a link in /dev/shm pointing elsewhere is refused, as are
    relative paths and any `..`. E.g. (shm_dir() = /dev/shm) "/dev/shm/rlt-weights-1.safetensors" → that path;
    "/etc/passwd", "/dev/shm/../etc/passwd", "/dev/shm/link" (→ /etc/passwd), "weights.safetensors" → ValueError.
    """
    root = Path(shm_dir()).resolve()
    given = Path(path)
    if not given.is_absolute() or ".." in given.parts:
        raise ValueError(f"weights path {path!r} must be an absolute path inside {root}, without '..'")
    resolved = given.resolve()
    if resolved.parent != root:
        raise ValueError(f"weights path {path!r} is not a file directly inside this server's {root}")
    if not resolved.is_file():
        raise ValueError(f"weights file {path} does not exist on this host (or is not a regular file)")
    return resolved


def create_private_file(path: str) -> None:
    """Create `path` empty, readable and writable by this user only (a file written over it keeps that mode)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
