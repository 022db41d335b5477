"""Shared test setup: hermetic, offline, CPU; a repo-local model cache reused across runs."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"

os.environ.setdefault("RLT_CACHE_DIR", str(REPO / ".cache" / "rlt"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def compose():
    """compose(overrides) -> the DictConfig `python -m rlt.train <overrides>` would build."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlt.config import register_defaults

    register_defaults()

    def _compose(overrides=()):
        with initialize_config_dir(config_dir=str(REPO / "cfgs"), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def tiny_model_path():
    from rlt.models import resolve_model_path

    return resolve_model_path("rlt:tiny")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Building a vLLM engine sets RANK/WORLD_SIZE/MASTER_PORT/... in this process (as TRL does); left behind they
    make later subprocesses (launchers, multirun) think they are distributed ranks. Every test starts clean."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
