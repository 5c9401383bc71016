"""The ``segops`` command line: ``segops info``, ``segops bench [losses|...]``, ``segops train / eval / predict``,
``segops demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from segops.info import format_info, info

    details = info()
    print(json.dumps(details, indent=2) if args.json else format_info(details))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from segops import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segops", description="segops: fast segmentation ops for PyTorch")
    subcommands = parser.add_subparsers(dest="command", required=True)

    command = subcommands.add_parser("info", help="versions, compiled kernels (CPU/CUDA archs), devices, threads")
    command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    command.set_defaults(func=_cmd_info)

    from segops import bench

    command = subcommands.add_parser("bench", help="time segops ops against their pure-PyTorch twins")
    bench.add_arguments(command)
    command.set_defaults(func=_cmd_bench)

    from segops import train_cli

    train_cli.add_subcommands(subcommands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import segops  # noqa: F401  (loads the extension with a clear error when it is missing)

    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
