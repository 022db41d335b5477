"""What the ``python -m rlt.<tool>`` command lines share: argument parsing with logging set up, default result paths,
one-line text for printed summaries. The commands themselves are described in README.md (Running), docs/grpo.md
(Evaluation) and docs/rlt.md.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except the ones without a value (None, False): their help says what
    happens then."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
              quiet: bool = True) -> argparse.Namespace:
    """The parsed command line of an rlt CLI, with INFO logging on stderr unless the caller configured logging, and
    (`quiet`, for the tools that load models) third-party bars and warnings off unless the command has `--verbose`."""
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        from rlt.console import configure_noise

        configure_noise(bool(getattr(args, "verbose", False)))  # no "Loading weights" bars, no third-party warnings
    return args


def default_output_path(model: str, data: str, split: str, *, kind: str = "eval", suffix: str = ".json") -> Path:
    """``results/<kind>/<model>__<data>__<split><suffix>`` with every name flattened to ``[A-Za-z0-9._-]``.

    >>> default_output_path("results/run/final", "synthetic:arithmetic", "test").as_posix()
    'results/eval/results_run_final__synthetic_arithmetic__test.json'
    """

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"

    return Path("results") / kind / f"{slug(model)}__{slug(data)}__{slug(split)}{suffix}"


def shorten(text: Any, width: int = 200) -> str:
    """`text` on one line (whitespace runs become one space), cut to `width` characters with ``...``.

    >>> shorten("a  b\\n c"), shorten("x" * 10, width=8)
    ('a b c', 'xxxxx...')
    """
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def slug(text: Any, width: int = 60) -> str:
    """`text` flattened to ``[A-Za-z0-9._-]`` (every other run of characters becomes one ``_``) and cut to `width`.

    >>> slug("tiny grpo: lr=1e-4"), slug("x" * 10, width=4), slug("::")
    ('tiny_grpo_lr_1e-4', 'xxxx', 'x')
    """
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_.")[:width].strip("_.")
    return text or "x"


def data_slug(data: str) -> str:
    """A short readable name for a data source, for file names and metric keys: a path's or hub id's last part
    without its data file suffix; ``synthetic:NAME`` -> ``synthetic-NAME``.

    >>> [data_slug(d) for d in ("../shared/data/gsm8k", "synthetic:arithmetic", "data/gsm8k_style.jsonl",
    ...                         "openai/gsm8k", "results/distill/demo.jsonl")]
    ['gsm8k', 'synthetic-arithmetic', 'gsm8k_style', 'gsm8k', 'demo']
    """
    text = str(data).strip().rstrip("/")
    if text.startswith("synthetic:"):
        return slug("synthetic-" + text.removeprefix("synthetic:"), 40)
    name = Path(text).name or text
    for suffix in _DATA_SUFFIXES:
        name = name.removesuffix(suffix)
    return slug(name, 40)


def model_slug(model: str) -> str:
    """A short readable name for a model: a run's ``final`` / ``checkpoint-N`` with its run dir's name, a hub id's
    model name, any other path's last part; ``rlt:NAME`` -> ``rlt-NAME``.

    >>> [model_slug(m) for m in ("results/tiny_grpo/final", "/a/very/long/path/to/results/run/checkpoint-20",
    ...                          "Qwen/Qwen2.5-1.5B-Instruct", "rlt:tiny", "/models/my model")]
    ['tiny_grpo-final', 'run-checkpoint-20', 'Qwen2.5-1.5B-Instruct', 'rlt-tiny', 'my_model']
    """
    text = str(model).strip().rstrip("/")
    if text.startswith("rlt:"):
        return slug("rlt-" + text.removeprefix("rlt:"), 40)
    path = Path(text)
    if (path.name == "final" or re.fullmatch(r"checkpoint-\d+", path.name)) and path.parent.name:
        return slug(f"{path.parent.name}-{path.name}", 50)
    return slug(path.name or text, 50)
