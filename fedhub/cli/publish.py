"""
Publish messages to a domain's broker and wait for the broker's confirms.

Either one message built from options::

    fedhub publish --topic org.example.prod.scm.push --body '{"repo": "x"}'

or every message of a file in the serialized form (one JSON object per line,
as C{fedhub record} writes; C{-} reads standard input)::

    fedhub publish --file messages.jsonl

Topics are full topics (C{<prefix>.<env>.<service>.<event>}): nothing is
prepended.  Messages are published persistently with C{mandatory} set and
publisher confirms, at most C{--window} unconfirmed at once; a file is read
as it is published, so its size does not matter.  The command exits 0 once
every message is confirmed.  It stops at the first message the broker
refuses (returned as unroutable, nacked, 403/404), at the first line that is
not a message (status 65, with the line number), or when the broker can not be
reached within C{--timeout}; messages before that point were published.  See
C{docs/cli.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from fedhub.cli import runner
from fedhub.cli.runner import (
    EX_DATAERR,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    CommandError,
    Runtime,
    positive_int,
)
from fedhub.errors import DecodeError, FedhubError, MessageError, TemporarilyUnavailable
from fedhub.message import (
    BASE_SCHEMA,
    INFO,
    SEVERITIES,
    Message,
    iter_loads,
    utc_now,
)

#: A line of a message file may be at most this long: RabbitMQ's largest
#: message (its C{max_message_size} may be set up to 512 MiB), so that what
#: C{fedhub record} wrote of a message it received can be read back.
MAX_LINE = 512 * 1024 * 1024

#: The byte order mark some editors put at the start of a UTF-8 file.
UTF8_BOM = b"\xef\xbb\xbf"

#: Severity names accepted besides the numbers.
SEVERITY_NAMES = {"debug": 10, "info": 20, "warning": 30, "error": 40}


# --- reading message files ---------------------------------------------------


class InputStopped(FedhubError):
    """
    Reading was stopped (the command was interrupted) before the input ended.
    """


class LineReader:
    """
    Reads the lines of a binary stream in a daemon thread and hands them to
    the reactor thread a chunk at a time.

    At most C{ahead} chunks are read before the reactor thread takes them,
    so memory stays flat however large the input; a slow pipe on standard
    input never blocks the reactor.  The thread is a daemon: a command that
    stops early leaves it blocked in its read, and the process still exits.
    """

    def __init__(
        self,
        stream: IO[bytes],
        reactor: Any,
        *,
        chunk_size: int = 256 * 1024,
        max_line: int = MAX_LINE,
        ahead: int = 4,
    ) -> None:
        self._stream = stream
        self._reactor = reactor
        self._chunk_size = chunk_size
        self._max_line = max_line
        self._room = threading.Semaphore(ahead)
        self._ready: deque[list[bytes] | BaseException | None] = deque()
        self._waiter: Deferred[list[bytes] | None] | None = None
        self._thread: threading.Thread | None = None
        self._done = False
        self._stopped = False

    def start(self) -> None:
        """
        Start reading.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="fedhub-reader", daemon=True)
            self._thread.start()

    # -- the reading thread ---------------------------------------------------

    def _hand_over(self, item: list[bytes] | BaseException | None) -> None:
        self._reactor.callFromThread(self._arrived, item)

    def _reader(self) -> Callable[[int], bytes]:
        # The file descriptor itself where there is one: a daemon thread
        # blocked inside a buffered reader's read holds its lock, and the
        # interpreter aborts when it finds that lock held at exit.
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            read: Callable[[int], bytes] = getattr(self._stream, "read1", self._stream.read)
            return read
        return lambda size: os.read(fd, size)

    def _read(self) -> None:
        read = self._reader()
        partial: list[bytes] = []
        partial_size = 0
        try:
            while True:
                self._room.acquire()
                data = read(self._chunk_size)
                if not data:
                    if partial_size:
                        self._hand_over([b"".join(partial)])
                    self._hand_over(None)
                    return
                lines: list[bytes] = []
                start = 0
                while True:
                    end = data.find(b"\n", start)
                    if end < 0:
                        break
                    if partial:
                        partial.append(data[start:end])
                        lines.append(b"".join(partial))
                        partial, partial_size = [], 0
                    else:
                        lines.append(data[start:end])
                    start = end + 1
                if start < len(data):
                    partial.append(data[start:])
                    partial_size += len(data) - start
                if partial_size > self._max_line or any(len(line) > self._max_line for line in lines):
                    # The lines before the long one first, so that its
                    # number is known where lines are counted.
                    good = []
                    for line in lines:
                        if len(line) > self._max_line:
                            break
                        good.append(line)
                    if good:
                        self._hand_over(good)
                    self._hand_over(
                        DecodeError(f"a line is longer than {self._max_line} bytes", None)
                    )
                    return
                if lines:
                    self._hand_over(lines)
                else:
                    self._room.release()
        except Exception as e:
            self._hand_over(e)

    # -- the reactor thread ---------------------------------------------------

    def _arrived(self, item: list[bytes] | BaseException | None) -> None:
        self._ready.append(item)
        self._feed()

    def _feed(self) -> None:
        waiter = self._waiter
        if waiter is None or not self._ready:
            return
        self._waiter = None
        item = self._ready.popleft()
        if isinstance(item, list):
            self._room.release()
            waiter.callback(item)
        elif item is None:
            self._done = True
            waiter.callback(None)
        else:
            self._done = True
            waiter.errback(item)

    def stop(self) -> None:
        """
        Stop reading: a read that waits, and every later one, fails with
        L{InputStopped}.  (The thread may stay blocked in its read; it is a
        daemon.)
        """
        self._done = True
        self._stopped = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(InputStopped("reading was stopped"))

    def next_lines(self) -> Deferred[list[bytes] | None]:
        """
        The next lines (without their newlines), or C{None} at the end.

        @return: a Deferred; it fails with L{DecodeError} for a line longer
            than the limit and with the read error (an C{OSError}).
        """
        d: Deferred[list[bytes] | None] = Deferred()
        if self._stopped:
            d.errback(InputStopped("reading was stopped"))
            return d
        if self._done:
            d.callback(None)
            return d
        if self._waiter is not None:
            raise RuntimeError("only one read may wait at a time")
        self._waiter = d
        self._feed()
        return d


def decode_line(line: bytes, number: int) -> Message | None:
    """
    The message on one line of the serialized form, or C{None} for a blank
    line.

    @raise DecodeError: naming line C{number}.
    """
    try:
        for message in iter_loads((line,)):
            return message
    except DecodeError as e:
        raise DecodeError(e.reason, number) from None
    return None


async def file_messages(
    reader: LineReader, transform: Callable[[Message], Message] | None = None
) -> AsyncIterator[tuple[int | None, Message]]:
    """
    The messages of a file, with their line numbers, read as they are needed.
    A UTF-8 byte order mark at the start of the file (as some editors write
    it) is skipped.

    @raise DecodeError: at the first line that is not a message.
    """
    number = 0
    while True:
        try:
            lines = await reader.next_lines()
        except DecodeError as e:
            if e.line is not None:
                raise
            # The reader does not count lines: the next one is the culprit.
            raise DecodeError(e.reason, number + 1) from None
        if lines is None:
            return
        for line in lines:
            number += 1
            if number == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM):]
            message = decode_line(line, number)
            if message is not None:
                yield number, (transform(message) if transform is not None else message)


async def single_message(message: Message) -> AsyncIterator[tuple[int | None, Message]]:
    """
    One message, as a source for L{publish_all}.
    """
    yield None, message


def open_input(path: str) -> IO[bytes]:
    """
    Open a message file (C{-} for standard input).

    @raise CommandError: with C{EX_NOINPUT} when it can not be opened.
    """
    if path == "-":
        if sys.stdin is None:
            # Started with file descriptor 0 closed.
            raise CommandError("can not read standard input: it is closed", EX_NOINPUT)
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as e:
        raise CommandError(f"can not open {path}: {e.strerror or e}", EX_NOINPUT) from None


# --- publishing ----------------------------------------------------------------


class _Bus(Protocol):
    def publish(self, message: Message) -> Deferred[None]:
        """Publish one message; fires on its confirm."""


@dataclass
class Progress:
    """
    How far publishing got.

    @ivar sent: Messages handed to the bus.
    @ivar last_line: The line of the last message handed to the bus.
    @ivar confirmed: Messages the broker confirmed.
    @ivar failed: The first message the broker did not take: its line (or
        C{None}), the message and the error.
    @ivar bad_input: The input error that stopped reading, if any.
    @ivar stopped: Whether sending stopped early because it was asked to.
    """

    sent: int = 0
    last_line: int | None = None
    confirmed: int = 0
    failed: tuple[int | None, Message, BaseException] | None = None
    bad_input: BaseException | None = None
    stopped: bool = False


async def publish_all(
    bus: _Bus,
    source: AsyncIterator[tuple[int | None, Message]],
    clock: IReactorTime,
    *,
    window: int,
    rate: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
) -> Progress:
    """
    Publish every message of C{source}, at most C{window} unconfirmed at
    once and, with C{rate}, at most C{rate} per second.

    Sending stops at the first failed publish, at the first input error, or
    when C{stop()} says so; the messages sent by then are waited for in every
    case.  Nothing is raised: the returned L{Progress} says what happened.
    """
    progress = progress or Progress()
    tokens = DeferredSemaphore(window)
    outstanding = 0
    idle: list[Deferred[None]] = []
    started = clock.seconds()

    def settled(result: object, line: int | None, message: Message) -> None:
        nonlocal outstanding
        outstanding -= 1
        if isinstance(result, Failure):
            if progress.failed is None:
                progress.failed = (line, message, result.value or RuntimeError("unknown failure"))
        else:
            progress.confirmed += 1
        tokens.release()
        if not outstanding:
            waiters = idle[:]
            del idle[:]
            for d in waiters:
                d.callback(None)

    def halted() -> bool:
        if progress.failed is not None:
            return True
        if stop():
            progress.stopped = True
            return True
        return False

    try:
        async for line, message in source:
            if halted():
                break
            if rate is not None:
                due = started + progress.sent / rate
                while not halted() and clock.seconds() < due:
                    await _sleep(clock, min(0.5, due - clock.seconds()))
                if halted():
                    break
            await tokens.acquire()
            if halted():
                tokens.release()
                break
            progress.sent += 1
            progress.last_line = line
            outstanding += 1
            d = bus.publish(message)
            d.addBoth(settled, line, message)
    except InputStopped:
        progress.stopped = True
    except (DecodeError, OSError) as e:
        progress.bad_input = e
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()
    if outstanding:
        waiter: Deferred[None] = Deferred()
        idle.append(waiter)
        await waiter
    return progress


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(max(0.0, seconds), d.callback, None)
    return d


def describe_failure(line: int | None, message: Message, error: BaseException) -> tuple[int, str]:
    """
    The exit status and reason for a message the broker did not take.
    """
    status, reason = runner.status_of(error)
    where = f"line {line}: " if line is not None else ""
    return status, f"{where}message {message.id} ({message.topic}): {reason}"


def report(command: str, progress: Progress, runtime: Runtime, *, single: bool) -> int:
    """
    The exit status of a publishing command, printing why when it is not 0.
    """
    counts = f"{progress.confirmed} of {progress.sent} message(s) sent were confirmed"
    if (
        progress.failed is not None
        and runtime.signal is not None
        and isinstance(progress.failed[2], TemporarilyUnavailable)
    ):
        # Interrupted while confirms were stalled: giving up on them lost the
        # connection, which is what the signal asked for, not the broker
        # failing.
        unconfirmed = progress.sent - progress.confirmed
        where = f" after line {progress.last_line}" if progress.last_line is not None else ""
        return runner.fail(
            command,
            f"interrupted{where}; {counts}; {unconfirmed} unconfirmed may or may not have arrived",
            runner.interrupted_status(runtime.signal),
        )
    if progress.failed is not None:
        status, reason = describe_failure(*progress.failed)
        if not single:
            reason += f"; {counts}"
        return runner.fail(command, reason, status)
    if progress.bad_input is not None:
        error = progress.bad_input
        if isinstance(error, DecodeError):
            return runner.fail(command, f"{error}; {counts} before it", EX_DATAERR)
        return runner.fail(
            command, f"reading failed: {getattr(error, 'strerror', None) or error}; {counts}",
            runner.EX_IOERR,
        )
    if progress.stopped:
        signum = runtime.signal or 2
        where = f" after line {progress.last_line}" if progress.last_line is not None else ""
        return runner.fail(command, f"interrupted{where}; {counts}", runner.interrupted_status(signum))
    return EX_OK


# --- the command -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub publish}.
    """
    one = parser.add_argument_group("one message")
    one.add_argument("--topic", help="the full topic, e.g. org.example.prod.scm.push")
    one.add_argument("--body", help="the body: a JSON object")
    one.add_argument("--schema", default=BASE_SCHEMA, help=f"the schema name (default {BASE_SCHEMA})")
    one.add_argument(
        "--severity", default=str(INFO),
        help="10/debug, 20/info, 30/warning or 40/error (default 20)",
    )
    many = parser.add_argument_group("many messages")
    many.add_argument(
        "-f", "--file", metavar="FILE",
        help="publish every message of FILE (serialized form, one per line; - for standard input)",
    )
    parser.add_argument(
        "--window", type=positive_int, default=None, metavar="N",
        help="at most N messages unconfirmed at once (default: the domain's confirm_window)",
    )
    runner.add_broker_arguments(
        parser, "seconds to wait for the connection, and for each confirm"
    )


def parse_severity(text: str) -> int:
    """
    A severity given as a number or a name.

    @raise CommandError: with C{EX_USAGE}.
    """
    value = SEVERITY_NAMES.get(text.lower())
    if value is None:
        try:
            value = int(text)
        except ValueError:
            value = -1
    if value not in SEVERITIES:
        raise CommandError(
            f"--severity must be one of 10, 20, 30, 40 (or debug, info, warning, error), not {text!r}",
            EX_USAGE,
        )
    return value


def build_message(topic: str, body: str, schema: str, severity: int) -> Message:
    """
    The message of C{--topic} and C{--body}.

    @raise CommandError: with C{EX_DATAERR} when the body or topic is bad.
    """
    try:
        value = json.loads(body)
    except RecursionError:
        raise CommandError("--body is nested too deeply", EX_DATAERR) from None
    except ValueError as e:
        raise CommandError(f"--body is not valid JSON: {e}", EX_DATAERR) from None
    if not isinstance(value, dict):
        raise CommandError(f"--body must be a JSON object, not a JSON {type(value).__name__}", EX_DATAERR)
    try:
        return Message.create(topic, value, schema=schema, severity=severity)
    except MessageError as e:
        raise CommandError(str(e), EX_DATAERR) from None


def _fill_sent_at(message: Message) -> Message:
    return message if message.sent_at is not None else message.evolve(sent_at=utc_now())


def run(args: argparse.Namespace) -> int:
    """
    Publish, and exit with 0 once every message is confirmed (see
    L{fedhub.cli.runner} for the other statuses).
    """
    try:
        return _run(args)
    except CommandError as e:
        return runner.fail("publish", e.reason, e.status)


def _run(args: argparse.Namespace) -> int:
    single = args.file is None
    if single:
        if args.topic is None or args.body is None:
            raise CommandError("give --topic and --body, or --file", EX_USAGE)
        message = build_message(args.topic, args.body, args.schema, parse_severity(args.severity))
    elif args.topic is not None or args.body is not None:
        raise CommandError("--file can not be combined with --topic or --body", EX_USAGE)
    config = runner.read_config(args.config)
    domain = runner.domain_of(config, args.domain)
    window = args.window or domain.confirm_window
    stream = None if single else open_input(args.file)

    async def work(runtime: Runtime) -> int:
        async def publish(bus: Any) -> int:
            if single:
                source = single_message(message)
            else:
                assert stream is not None
                reader = LineReader(stream, runtime.reactor)
                reader.start()
                runtime.when_interrupted().addCallback(lambda _: reader.stop())
                source = file_messages(reader, _fill_sent_at)
            progress = await publish_all(
                bus, source, runtime.reactor, window=window, stop=lambda: runtime.interrupted
            )
            status = report("publish", progress, runtime, single=single)
            if status == EX_OK:
                if single:
                    print(message.id)
                elif args.verbose:
                    print(f"fedhub publish: {progress.confirmed} message(s) confirmed", file=sys.stderr)
            return status

        return await runner.with_bus(
            "publish", runtime, domain, args.timeout,
            lambda bus: Deferred.fromCoroutine(publish(bus)),
            publishing=True,
            max_in_flight=window,
        )

    return runner.run("publish", work, verbose=args.verbose)
