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


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line of an rlt CLI, with INFO logging on stderr unless the caller configured logging."""
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
