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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """`make test-gpu`'s closing table: one block per test of tests/test_gpu.py that ran (passed, failed or skipped),
    with its outcome and the lines it recorded as the `gpu_summary` user property (or the skip reason / the error)."""
    rows = []
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "test_gpu.py::" not in getattr(rep, "nodeid", "") or (outcome == "passed" and rep.when != "call"):
                continue
            lines = [value for key, value in rep.user_properties if key == "gpu_summary"]
            if outcome == "skipped" and isinstance(rep.longrepr, tuple):
                lines = [str(rep.longrepr[2]).removeprefix("Skipped: ")]
            elif outcome in ("failed", "error"):
                crash = getattr(rep.longrepr, "reprcrash", None)
                lines.append((crash.message if crash else str(rep.longrepr)).splitlines()[0][:300])
            rows.append((getattr(rep, "start", 0), rep.nodeid.split("::", 1)[1], outcome.upper(), lines))
    if not rows:
        return
    terminalreporter.section("GPU check summary")
    reasons = {(outcome, *lines) for _, _, outcome, lines in rows}
    if len(reasons) == 1 and rows[0][2] == "SKIPPED":  # e.g. no CUDA device here: one line, not one per test
        terminalreporter.write_line(f"all {len(rows)} GPU checks skipped: {'; '.join(rows[0][3])}")
        return
    for _, name, outcome, lines in sorted(rows, key=lambda row: row[:2]):
        terminalreporter.write_line(f"{outcome:<8} {name}")
        for line in lines:
            terminalreporter.write_line(f"{'':<10}{line}")
