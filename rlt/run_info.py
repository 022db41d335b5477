"""What a trained model says about its run: the tools after training (`rlt.chat`, `rlt.compare`, `rlt.export`,
`rlt.evaluate`) take a run dir, its ``final/``, a ``checkpoint-N`` or a plain model, and follow the run it came from.

    located = locate("results/tiny_grpo")        # the run dir -> its final/ model
    located.model_dir                            # 'results/tiny_grpo/final'
    located.system_prompt, located.max_new_tokens, located.sampling   # as the run trained

A plain model (hub id, rlt: name, a model dir outside any run) has no run: its defaults are None and the tools keep
their own. A path that should be a model but is not (missing, no config.json / adapter_config.json, no weights, an
unreadable config) is a `ModelError` with one line saying which.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlt.errors import ModelError

CONFIG_FILE = "config.yaml"  # written by rlt.run_dir.open_run
FINAL_DIR = "final"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Located:
    """A model to load (`model_dir`) and the run it came from (`run_dir`, its `config`; None / {} without one)."""

    given: str
    model_dir: str
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def has_run(self) -> bool:
        return self.run_dir is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    @property
    def algorithm(self) -> str | None:
        return self.get("algorithm")

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the run trained with (None: the run had none, or there is no run)."""
        return self.get("system_prompt")

    @property
    def max_new_tokens(self) -> int | None:
        """The completion length the run generated (GRPO / RLT ``max_completion_length``); None for SFT runs."""
        value = self.get("max_completion_length")
        return int(value) if value is not None else None

    @property
    def sampling(self):
        """The run's sampling (`rlt.generation.sampling.Sampling`: temperature and filters) for GRPO / RLT runs,
        None for SFT runs and plain models."""
        if self.get("temperature") is None:
            return None
        from rlt.generation.sampling import Sampling

        return Sampling(temperature=float(self.get("temperature")), top_p=float(self.get("top_p", 1.0)),
                        top_k=self.get("top_k"), min_p=self.get("min_p"),
                        repetition_penalty=float(self.get("repetition_penalty", 1.0)))

    @property
    def base_model(self) -> str | None:
        """The model the run started from, as the config names it (hub id, rlt: name or the given path)."""
        return self.get("model_name_or_path")

    @property
    def label(self) -> str:
        """A short name for tables: the run name and the model dir's last part (``tiny_grpo/final``), else the
        given name."""
        if self.run_dir is not None:
            return f"{self.get('run_name') or self.run_dir.name}/{Path(self.model_dir).name}"
        return self.given

    def run(self):
        """The validated run config (`rlt.config.validate`), or None without a run. Raises `ConfigError`."""
        if not self.config:
            return None
        from omegaconf import OmegaConf

        from rlt.config import validate

        return validate(OmegaConf.create(self.config))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a plain dict. Raises `ModelError` when it cannot be read."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - yaml / omegaconf errors of a damaged file
        raise ModelError(f"{path}: cannot read the run config: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: the run config is not a mapping of keys")
    return cfg


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint-N of `run_dir` with the largest N (None when there is none)."""
    found = [(int(m[1]), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


def check_model_dir(path: Path) -> None:
    """A local model dir must hold a model: config.json (or a LoRA adapter's adapter_config.json), readable, and a
    weights file. Raises `ModelError` naming what is missing."""
    if not path.exists():
        raise ModelError(f"model directory '{path}' does not exist")
    if not path.is_dir():
        raise ModelError(f"'{path}' is a file, not a model directory")
    configs = [path / name for name in ("adapter_config.json", "config.json") if (path / name).is_file()]
    if not configs:
        raise ModelError(f"'{path}' is not a model directory: it has no config.json (nor adapter_config.json)")
    try:
        json.loads(configs[0].read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"'{path}' is a damaged model directory: {configs[0].name} does not parse ({e})") from None
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        raise ModelError(f"'{path}' is a damaged model directory: it has {configs[0].name} but no weights "
                         f"(none of {', '.join(WEIGHT_FILES[:3])}, ...)")


def locate(name_or_path: str) -> Located:
    """The model `name_or_path` names and its run:

    - a run dir (has config.yaml): its ``final/``, else its latest ``checkpoint-N`` (a run stopped early);
    - a run's ``final/`` or ``checkpoint-N`` (its parent has config.yaml): that dir, with the parent's run;
    - any other local dir: a plain model (checked: `check_model_dir`); a hub id or ``rlt:`` name: passed through.

    Raises `ModelError` for a missing or damaged local model and for a run dir without any model in it.
    """
    from rlt.models import missing_local_model

    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if problem := missing_local_model(name):
            raise ModelError(problem)
        if len(path.parts) > 1 and Path(path.parts[0]).is_dir():  # results/run: a local path, not org/name
            raise ModelError(f"there is no directory {name} (and {path.parts[0]}/ here is a local folder, so it is "
                             "not read as a hub id)")
        return Located(given=name, model_dir=name)  # a hub id or an rlt: name: the loader resolves it
    if (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file():
        model = path / FINAL_DIR if (path / FINAL_DIR).is_dir() else latest_checkpoint(path)
        if model is None:
            raise ModelError(f"run dir '{path}' has no model yet: no {FINAL_DIR}/ and no checkpoint-N (the run "
                             "stopped before its first save)")
        check_model_dir(model)
        return Located(given=name, model_dir=str(model), run_dir=path, config=read_run_config(path))
    check_model_dir(path)
    parent = path.resolve().parent
    if (parent / CONFIG_FILE).is_file() and (path.name == FINAL_DIR or _CHECKPOINT.match(path.name)):
        return Located(given=name, model_dir=str(path), run_dir=Path(name).expanduser().parent,
                       config=read_run_config(parent))
    return Located(given=name, model_dir=name)
