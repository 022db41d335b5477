"""The config reference on the command line (`rlt/config/reference.py`):

    python -m rlt.config --key learning_rate        # one key: meaning, type, default, allowed values, who sets it
    python -m rlt.config --reference > docs/config.md   # the whole reference as markdown (or --write)
    python -m rlt.config --reference --check        # exit 1 if docs/config.md is stale or a key has no help text
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlt.errors import RltError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlt.config",
        description="The run config's keys: their meaning, type, default, allowed values and the config files that "
                    "set them, from rlt/config/ and cfgs/.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", metavar="KEY", help="print one key's entry (an unknown key gets the closest ones)")
    what.add_argument("--reference", action="store_true", help="print the whole reference as markdown")
    what.add_argument("--missing-help", action="store_true", help="list the keys whose field has no help comment")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="with --reference: write it to --path instead")
    action.add_argument("--check", action="store_true",
                        help="with --reference: exit 1 if --path differs from it or a key has no help text")
    parser.add_argument("--path", type=Path, default=None, help="the reference file (default: docs/config.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.write or args.check or args.path) and not args.reference:
        parser.error("--write, --check and --path go with --reference")
    from rlt.config import reference

    path = args.path or reference.REFERENCE_PATH
    try:
        if args.key is not None:
            print(reference.render_key(reference.key_doc(args.key)))
        elif args.missing_help:
            print("\n".join(reference.keys_without_help()))
        elif args.check:
            problems = reference.check_reference(path)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if problems:
                return 1
            print(f"{path}: up to date, every key has help text")
        elif args.write:
            print(f"wrote {reference.write_reference(path)}")
        else:
            sys.stdout.write(reference.render_markdown())
    except RltError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
