"""
The entry point of the C{fedhub} command and its sub-command table.

Each sub-command lives in its own module with two functions:
C{add_arguments(parser)} and C{run(args) -> int} (the exit status).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from fedhub import __version__
from fedhub.cli import check_config, inject_mail, outbox, publish, record, replay, runner, tail

#: Sub-command name → module with add_arguments/run and a docstring.
COMMANDS: dict[str, ModuleType] = {
    "check-config": check_config,
    "inject-mail": inject_mail,
    "publish": publish,
    "tail": tail,
    "record": record,
    "replay": replay,
    "outbox": outbox,
}


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser with every sub-command.
    """
    parser = argparse.ArgumentParser(
        prog="fedhub",
        description="fedhub: the message bus hub. Run the hub itself with `twistd fedhub`.",
    )
    parser.add_argument("--version", action="version", version=f"fedhub {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line and return the exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return run(args)
    except KeyboardInterrupt:
        # Ctrl-C outside the reactor (reading a configuration, waiting for
        # the running hub, importing plugins): one line, as for any other stop.
        return runner.fail(args.command, "interrupted", runner.interrupted_status(signal.SIGINT))


def entry() -> None:
    """
    The console script: exit with what L{main} returns.
    """
    sys.exit(main())


if __name__ == "__main__":
    entry()
