"""Where weight files pass between a trainer and the vLLM servers on its host (`rlt.generation.vllm_client`,
`rlt.generation.vllm_server`): /dev/shm, a RAM file system, or the temporary directory where there is none."""

from __future__ import annotations

import os
import tempfile

SHM_DIR = "/dev/shm"


def shm_dir() -> str:
    return SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else tempfile.gettempdir()
