"""
The C{fedhub} command line: C{fedhub COMMAND [options]}.

This package's own module imports nothing but the standard library, so
that the console script (L{entry}) answers a Ctrl-C that comes while the
commands, Twisted and the plugins are still being imported.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

__all__ = ["command_in", "entry"]

#: The exit status of a command stopped by SIGINT (128 + 2), as
#: L{fedhub.cli.runner.interrupted_status} gives it.
INTERRUPTED = 130


def command_in(argv: Sequence[str]) -> str | None:
    """
    The command a command line names: its first word that is not an option.
    """
    return next((word for word in argv if not word.startswith("-")), None)


def entry() -> None:
    """
    The console script: run L{fedhub.cli.main.main} and exit with what it
    returns; a Ctrl-C before it can answer one itself (while importing)
    ends the command with one line and status 130, not a traceback.
    """
    try:
        from fedhub.cli.main import main as run

        status = run()
        # Done: a Ctrl-C while the interpreter shuts down (a tenth of a
        # second) would end the process by the signal, 130 to a shell, as
        # if the command had not done its work.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        word = command_in(sys.argv[1:])
        print(f"fedhub {word}: interrupted" if word else "fedhub: interrupted", file=sys.stderr)
        status = INTERRUPTED
    sys.exit(status)

