"""The run config `python -m rlt.train run_cfg=NAME key=value ...` trains with, composed in one place.

cfgs/train.yaml + the run file + Hydra overrides, then `rlt.config.validate`; every entry point that needs a run
config without training (the sweep check of `rlt.train`, `rlt.memcheck`, `rlt.distributed`, `rlt.distill`, the vLLM
server, the tests and benchmarks) composes it here, so they all read the same config and report a mistake the same
way: `rlt.errors.ConfigError`. Keys and run files: README.md ("Running"); world size: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from rlt.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "cfgs"


def compose(run_cfg: str | None = None, overrides: Sequence[str] = (), *, world_size: int | None = None):
    """The validated run config (an `SFTRunConfig`, `GRPORunConfig` or `RLTRunConfig`) for `run_cfg` + `overrides`.

    `run_cfg`: NAME, NAME.yaml, cfgs/run_cfg/NAME.yaml or run_cfg=NAME (None: `overrides` may name it, else the
    default of cfgs/train.yaml). `world_size`: the number of training processes the batch geometry is checked for
    (None: the current `WORLD_SIZE`, else 1); `WORLD_SIZE` is restored afterwards.

        compose("tiny_sft", ["max_steps=3"]).max_steps                       # 3
        compose("tiny_grpo", world_size=3)   # ConfigError: train_batch_size=16 is not divisible by ... = 24

    Raises `ConfigError`: an unknown run file, a config that does not compose (unknown key, group option or bad
    override syntax) or does not validate, in `validate`'s format ("invalid config:" and one "  - " line a problem).
    """
    from rlt.config import validate

    cfg = compose_raw(overrides, run_cfg=run_cfg)
    with _world_size(world_size):
        return validate(cfg)


def compose_raw(overrides: Sequence[str] = (), *, run_cfg: str | None = None):
    """The composed `DictConfig`, before `validate` (what `rlt.train.run_training` takes, and `hydra.main` would pass
    it). Composition errors raise `ConfigError`; the arguments are as for `compose`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlt.config import register_defaults

    overrides = list(overrides)
    if run_cfg is not None:
        overrides.insert(0, f"run_cfg={_run_cfg_name(run_cfg)}")
    register_defaults()
    GlobalHydra.instance().clear()  # a compose (or hydra.main) before this one may have left it initialized
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=overrides)
    except Exception as e:  # hydra / omegaconf composition errors (unknown key or group option, bad syntax...)
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise ConfigError("invalid config:\n  - " + composition_error(e).replace("\n", "\n    ")) from None


def composition_error(e: Exception) -> str:
    """Hydra/OmegaConf's message for a config that does not compose, without its traceback hint and search path; an
    unknown key is named as `validate` names it (with the closest known keys), a group's options on one line."""
    from rlt.config import unknown_override_message

    text = str(e).split("Config search path:")[0]
    if match := re.match(r"Could not override '([^']+)'", text):
        return unknown_override_message(match.group(1))
    text = re.sub(r"\s*Available options in '[^']*':\n((?:[ \t]+\S+\n?)+)",
                  lambda m: f" (available: {', '.join(m.group(1).split())})\n", text.removeprefix("In 'train': "))
    return "\n".join(line.rstrip().replace("\t", "  ") for line in text.splitlines()
                     if line.strip() and "HYDRA_FULL_ERROR" not in line)


def one_line(message: object) -> str:
    """An error message on one line, for the CLIs that promise one: "invalid config:\\n  - a\\n  - b" ->
    "invalid config: a; b" (a problem's own continuation lines are joined with spaces)."""
    head, *rest = [line.strip() for line in str(message).splitlines() if line.strip()] or [""]
    items: list[str] = []
    for line in rest:
        if line.startswith("- ") or not items:
            items.append(line.removeprefix("- "))
        else:
            items[-1] += " " + line
    return f"{head.rstrip(':')}: {'; '.join(items)}" if items else head


def _run_cfg_name(run_cfg: str) -> str:
    run_cfg = run_cfg.removeprefix("run_cfg=")
    name = Path(run_cfg).name.removesuffix(".yaml")
    if not (CONFIG_DIR / "run_cfg" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "run_cfg").glob("*.yaml"))
        raise ConfigError(f"no run config {run_cfg!r} in {CONFIG_DIR / 'run_cfg'} (available: {', '.join(known)})")
    return name


@contextlib.contextmanager
def _world_size(n: int | None):
    """`WORLD_SIZE=n` inside (validate reads it), the caller's value (or none) after; n None: unchanged."""
    saved = os.environ.get("WORLD_SIZE")
    if n is not None:
        os.environ["WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved
