"""Train from a Hydra config:  python -m rlt.train [run_cfg=NAME] [key=value ...] [--print-config]

    python -m rlt.train                                    # the embedded default (run_cfg=demo)
    python -m rlt.train run_cfg=tiny_sft max_steps=3       # any key by its short name
    python -m rlt.train -m run_cfg=tiny_sft learning_rate=1e-3,3e-3   # Hydra multirun sweep, one dir per job
    python -m rlt.train run_cfg=tiny_sft --print-config    # validate and print the resolved config, then exit

Config mistakes (unknown keys, wrong types, impossible values, missing data columns, ...) end the program with one
readable message and exit status 2; a traceback means a bug in rlt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlt.config import register_defaults, to_yaml, validate
from rlt.errors import RltError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "cfgs"
PRINT_CONFIG_FLAG = "--print-config"


def resolve_output_dir(run) -> str:
    """`output_dir` if set, else the Hydra job dir (`results/<run_name>`, or the multirun job's own subdir)."""
    if run.output_dir:
        return run.output_dir
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    return os.path.join(run.results_dir, run.run_name)


def run_training(cfg: DictConfig, *, print_config: bool = False) -> dict | None:
    """Validate `cfg` (before anything heavy is imported or loaded), then run its algorithm's recipe."""
    run = validate(cfg)
    run.output_dir = resolve_output_dir(run)
    if print_config:
        sys.stdout.write(to_yaml(run))
        return None
    import importlib

    from rlt.memcheck import check_before_training

    check_before_training(run)
    recipe = importlib.import_module(f"rlt.recipes.{run.algorithm}")  # sft | grpo | rlt, checked by validate()
    return recipe.train(run)


def main() -> None:
    print_config = PRINT_CONFIG_FLAG in sys.argv
    if print_config:
        sys.argv.remove(PRINT_CONFIG_FLAG)

    register_defaults()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        try:
            run_training(cfg, print_config=print_config)
        except RltError as e:
            sys.stderr.write(f"\nrlt: {e}\n")
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
