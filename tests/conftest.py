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
    """compose(overrides) -> the DictConfig `python -m rlt.train <overrides>` would build (`rlt.compose.compose_raw`:
    a config that does not compose raises `ConfigError`)."""
    from rlt.compose import compose_raw

    return compose_raw


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


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The real GSM8K files: ../shared/data/gsm8k beside the repo (or $RLT_GSM8K_DIR). When they are missing the test
    FAILS where the shared data is expected (a ../shared dir exists, as on the project's machines and in CI, or
    RLT_REQUIRE_SHARED_DATA=1), and is skipped with the reason elsewhere (a clone on another machine)."""
    path = Path(os.environ.get("RLT_GSM8K_DIR", SHARED_GSM8K))
    if (path / "train.jsonl").is_file() and (path / "test.jsonl").is_file():
        return path
    message = f"the GSM8K train/test files are not at {path} (set RLT_GSM8K_DIR to their directory)"
    if os.environ.get("RLT_REQUIRE_SHARED_DATA") == "1" or SHARED_GSM8K.parents[1].is_dir():
        pytest.fail(message + ": the shared data is expected here")
    pytest.skip(message)
