"""
Check a configuration file and report every problem in it.
"""

from __future__ import annotations

import argparse
import sys

from fedhub.config import load_config
from fedhub.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub check-config}.
    """
    parser.add_argument("file", help="the TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """
    Exit 0 and summarize when the file is valid; print one line per problem
    on standard error and exit 1 when it is not.
    """
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"{args.file}: {len(e.problems)} problem(s)", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: OK ({len(config.domains)} domain(s), {len(config.producers)} producer(s), "
        f"{len(config.consumers)} consumer(s))"
    )
    return 0
