"""
Follow a domain's bus and append every message to a file in the serialized form.

C{fedhub record FILE} follows like C{fedhub tail} (a temporary exclusive
queue bound for the C{--topic} patterns, the same filters) and appends each
message to FILE as one line of fedora-messaging's serialized form, flushed
after every message; C{fedhub replay FILE} and C{fedhub publish --file FILE}
read it back.  A new FILE is made with mode 0640 (messages may hold private
data), and a write that fails (a full disk) is cut back to where the line
began, so the file never ends in half a line that the next recording's
first line would join; appending to a file whose last line has no newline
(left by something else), the first line written starts with one.  FILE
C{-} writes to standard output.  The command exits 0 after C{--count}
messages, and on SIGINT (Ctrl-C) or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import IO

from fedhub.cli import runner
from fedhub.cli.runner import EX_CANTCREAT, EX_IOERR, CommandError, Runtime
from fedhub.cli.tail import Follower, add_filter_arguments, filter_of, follow, silence_stdout
from fedhub.message import Message, dump_line


#: The permissions of a new file, as the C{record} consumer's: messages may
#: hold private data.
FILE_MODE = 0o640


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub record}.
    """
    parser.add_argument("file", metavar="FILE", help="append to this file (- for standard output)")
    add_filter_arguments(parser)


def open_output(path: str) -> IO[bytes]:
    """
    Open FILE for appending (C{-}: standard output), made with mode
    L{FILE_MODE} when new, unbuffered: each line goes to the file in the
    writes L{Appender} makes, and no half line can wait in a buffer to be
    written when the file is closed.

    @raise CommandError: with C{EX_CANTCREAT} when it can not be opened.
    """
    if path == "-":
        return sys.stdout.buffer
    try:
        return open(path, "ab", buffering=0,
                    opener=lambda name, flags: os.open(name, flags, FILE_MODE))
    except OSError as e:
        raise CommandError(f"can not open {path} for writing: {e.strerror or e}", EX_CANTCREAT) from None


def _regular_size(stream: IO[bytes]) -> int | None:
    """
    The size of the regular file C{stream} writes to, or C{None} when it
    writes to something else (a pipe, a device, memory).
    """
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _unterminated(stream: IO[bytes]) -> bool:
    """
    Whether C{stream} writes to a regular file whose last line has no
    newline (the end of a write that failed half-way elsewhere, a file
    edited by hand): a line appended to it would be glued to that one.
    """
    size = _regular_size(stream)
    name = getattr(stream, "name", None)
    if not size or not isinstance(name, str):
        return False
    # Read through a descriptor of its own: the one writing is write-only.
    try:
        with open(name, "rb") as f:
            if os.fstat(f.fileno()).st_ino != os.fstat(stream.fileno()).st_ino:
                return False
            f.seek(size - 1)
            return f.read(1) != b"\n"
    except OSError:
        return False


class Appender:
    """
    Writes messages to a file, one serialized line each, flushed at once.

    The file never gets half a line from here: a write that fails half-way
    (a full disk, the file size limit) is cut back to where the line began.
    Appended to a file whose last line has no newline, the first line starts
    with one, so that the messages written stay readable lines of their own.

    @ivar written: Messages written.
    """

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.stream = stream
        self.name = name
        self.written = 0
        self._newline_first = _unterminated(stream)

    def __call__(self, message: Message) -> None:
        """
        Append one message.

        @raise CommandError: with C{EX_IOERR} when writing fails, with the
            status of L{runner.status_of} when the message can not be
            serialized.
        @raise BrokenPipeError: when FILE is a pipe whose reader went away.
        """
        try:
            line = dump_line(message).encode("utf-8")
        except Exception as e:
            # Nothing of it is written, so the file gets no partial line.
            status, reason = runner.status_of(e)
            raise CommandError(
                f"message {message.id} can not be written to {self.name}: {reason}", status
            ) from None
        if self._newline_first:
            line = b"\n" + line
        try:
            self._append(line)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise CommandError(f"writing to {self.name} failed: {e.strerror or e}", EX_IOERR) from None
        self._newline_first = False
        self.written += 1

    def _append(self, line: bytes) -> None:
        """
        Write C{line} whole, or cut a regular file back to where it began
        and raise.
        """
        start = _regular_size(self.stream)
        view = memoryview(line)
        try:
            while view:
                # An unbuffered file may take part of it at a time.
                written = self.stream.write(view)
                view = view[written if written is not None else 0:]
            self.stream.flush()
        except OSError:
            if start is not None:
                try:
                    os.ftruncate(self.stream.fileno(), start)
                except OSError:
                    pass
            raise

    def close(self) -> None:
        """
        Flush to disk and close (standard output is only flushed).
        """
        try:
            self.stream.flush()
            if self.stream is not sys.stdout.buffer:
                os.fsync(self.stream.fileno())
                self.stream.close()
        except (OSError, ValueError):
            pass


def run(args: argparse.Namespace) -> int:
    """
    Record until the count is reached or a signal arrives (exit 0).
    """
    try:
        topics, accept = filter_of(args)
        config = runner.read_config(args.config)
        domain = runner.domain_of(config, args.domain)
        appender = Appender(open_output(args.file), args.file)
    except CommandError as e:
        return runner.fail("record", e.reason, e.status)
    follower = Follower(appender, accept, args.count)

    async def work(runtime: Runtime) -> int:
        return await follow(
            "record", runtime, domain, topics, follower, timeout=args.timeout, quiet=args.quiet,
            max_backlog=args.max_backlog,
        )

    try:
        return runner.run("record", work, verbose=args.verbose)
    finally:
        if follower.pipe_closed:
            silence_stdout()
        else:
            appender.close()
