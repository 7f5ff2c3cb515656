"""
The entry point of the C{fedhub} command and its sub-command table.

Each sub-command lives in its own module with two functions:
C{add_arguments(parser)} and C{run(args) -> int} (the exit status).
"""

from __future__ import annotations

import argparse
import codecs
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from contextlib import contextmanager
from types import ModuleType

from fedhub import __version__
from fedhub.cli import (
    check_config,
    command_in,
    dead_letters,
    inject_mail,
    outbox,
    publish,
    record,
    replay,
    runner,
    tail,
)

#: Sub-command name → module with add_arguments/run and a docstring.
COMMANDS: dict[str, ModuleType] = {
    "check-config": check_config,
    "inject-mail": inject_mail,
    "publish": publish,
    "tail": tail,
    "record": record,
    "replay": replay,
    "outbox": outbox,
    "dead-letters": dead_letters,
}


#: The codec error handler standard output gets while a command runs.
ESCAPE_ERRORS = "fedhub-escape"

#: The error handlers standard output may have by default: on a terminal
#: whose encoding lacks a character of a message, they would end the
#: command.  One chosen otherwise (C{PYTHONIOENCODING=ascii:replace}) is kept.
DEFAULT_ERRORS = frozenset({"strict", "surrogateescape"})


def _escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def escape_unencodable(error: UnicodeError) -> tuple[str, int]:
    """
    A codec error handler: each character the encoding has no form for is
    written as JSON writes it with C{ensure_ascii} (C{\\uXXXX}, a surrogate
    pair beyond U+FFFF).  Inside a JSON string the escape stands for the same
    character, so the JSON C{tail} prints stays the same JSON; elsewhere it
    is a visible stand-in, as lone surrogates are
    (L{fedhub.message.escape_surrogates}).

    @raise UnicodeError: C{error} itself when it is not an encoding error.
    """
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return "".join(map(_escape, error.object[error.start:error.end])), error.end


codecs.register_error(ESCAPE_ERRORS, escape_unencodable)


class _TaggedOutput:
    """
    Standard output whose write failures say they came from it (the
    attribute C{standard_output} of the C{OSError}), so that a full disk or
    a closed pipe behind it is told apart from the command's own failures.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except OSError as e:
            e.standard_output = True  # type: ignore[attr-defined]
            raise

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            e.standard_output = True  # type: ignore[attr-defined]
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ClosedOutput:
    """
    Standard output of a process started with file descriptor 1 closed
    (C{sys.stdout} is C{None}): writing to it, as text or to its C{buffer},
    fails as a write to standard output, where C{print} would drop the text
    without a word.
    """

    @property
    def buffer(self) -> _ClosedOutput:
        return self

    def _closed(self) -> OSError:
        error = OSError(errno.EBADF, "it is closed")
        error.standard_output = True  # type: ignore[attr-defined]
        return error

    def write(self, data: object) -> int:
        raise self._closed()

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise self._closed()


@contextmanager
def tagged_output() -> Iterator[None]:
    """
    While the block runs, standard output is a L{_TaggedOutput} (or a
    L{_ClosedOutput}, when there is none); the block ends with its buffer
    flushed.
    """
    stream = sys.stdout
    if stream is None:
        sys.stdout = _ClosedOutput()  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = stream
        return
    sys.stdout = _TaggedOutput(stream)  # type: ignore[assignment]
    try:
        yield
        sys.stdout.flush()
    finally:
        sys.stdout = stream


@contextmanager
def escaping_output() -> Iterator[None]:
    """
    While the block runs, standard output escapes the characters its
    encoding lacks (see L{escape_unencodable}) instead of raising: a message
    holding one must not end C{tail} or hide the rest of a listing on a
    terminal that is not UTF-8.  The error handler is restored afterwards.
    """
    stream = sys.stdout
    previous = getattr(stream, "errors", None)
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is None or previous not in DEFAULT_ERRORS:
        yield
        return
    reconfigure(errors=ESCAPE_ERRORS)
    try:
        yield
    finally:
        try:
            reconfigure(errors=previous)
        except (OSError, ValueError):
            # Closed, or its reader went away: nothing more is written to it.
            pass


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


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """
    The parsed command line.  Names given after an option (C{dead-letters
    requeue CONSUMER --limit N ID ...}, C{outbox retry 1 -c FILE 2}) join
    the names before it: argparse fills a C{nargs="*"} positional once, at
    its first chance, and would refuse the rest.

    @raise SystemExit: (2) for arguments that can not be parsed, as argparse.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        names = getattr(args, "ids", None)
        if isinstance(names, list) and not any(e.startswith("-") for e in extra):
            names.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line and return the exit status.
    """
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as e:
        if e.code == 2 and command_in(sys.argv[1:] if argv is None else argv) == "inject-mail":
            # A mail server bounces the mail when its pipe exits 2: a typo
            # in master.cf or an alias must keep the mail queued instead.
            return inject_mail.EX_TEMPFAIL
        raise
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with escaping_output(), tagged_output():
            return run(args)
    except OSError as e:
        if not getattr(e, "standard_output", False):
            raise
        _drop_standard_output()
        if isinstance(e, BrokenPipeError):
            # Its reader went away (`fedhub outbox list | head`): nothing
            # more to say to it.
            return 0
        return runner.fail(args.command, runner.status_of(e)[1], runner.EX_IOERR)
    except KeyboardInterrupt:
        # Ctrl-C outside the reactor (reading a configuration, waiting for
        # the running hub, importing plugins): one line, as for any other stop.
        return runner.fail(args.command, "interrupted", runner.interrupted_status(signal.SIGINT))


def _drop_standard_output() -> None:
    """
    Point standard output at /dev/null, so that flushing it at exit does
    not fail once more.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def entry() -> None:
    """
    The console script as installations of earlier versions name it: see
    L{fedhub.cli.entry}.
    """
    from fedhub.cli import entry as run

    run()


if __name__ == "__main__":
    sys.exit(main())
