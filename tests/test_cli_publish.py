"""
Tests for C{fedhub publish} (L{fedhub.cli.publish}) and the shared command
runner (L{fedhub.cli.runner}).

The first part needs no broker: message building, the line reader, the
windowed publishing loop against a fake bus on a fake clock, the exit
statuses.  The second part runs the command as a subprocess against the
shared RabbitMQ at 127.0.0.1:5672 and checks with a consumer what arrived;
like L{tests.test_amqp_bus}, a missing broker fails those tests under
C{CI=true} and skips them elsewhere.

The helpers at the end (L{CLIProcess}, L{run_cli}, L{write_config}) are
shared by the other command-line test modules.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli import publish, runner
from fedhub.cli.main import build_parser
from fedhub.cli.publish import MAX_LINE, LineReader, Progress, decode_line, publish_all
from fedhub.cli.runner import CommandError, Runtime
from fedhub.errors import (
    AccessRefused,
    DecodeError,
    MessageNacked,
    MessageReturned,
    NotConnected,
    NotFound,
)
from fedhub.message import Message, dump_line, dumps
from tests.test_amqp_bus import Collector, LiveCase, _reactor

ROOT = Path(__file__).resolve().parent.parent

#: The shared broker, as a domain's broker URL.
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: Runs the command line in a fresh interpreter.
CLI_SCRIPT = "import sys; from fedhub.cli.main import main; sys.exit(main(sys.argv[1:]))"


# --- shared helpers ------------------------------------------------------------


def write_config(directory: Path, broker: str = BROKER_URL, more: str = "", exchange: str | None = None) -> str:
    """
    Write a configuration with one domain C{test} (and C{more}) and return
    its path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[hub]",
        f'state_dir = "{directory / "state"}"',
        "",
        "[domains.test]",
        f'broker = "{broker}"',
        "heartbeat = 10",
    ]
    if exchange is not None:
        lines.append(f'exchange = "{exchange}"')
    path = directory / "hub.toml"
    path.write_text("\n".join(lines) + "\n" + more)
    return str(path)


class CLIProcess(ProcessProtocol):
    """
    One run of the C{fedhub} command in a subprocess, its output collected.

    @ivar ended: Fires with the exit status (C{-signal} when a signal
        killed it).
    """

    def __init__(self, stdin: bytes | None = None, close_stdin: bool = True) -> None:
        self.stdin = stdin
        self.close_stdin = close_stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.pid = transport.pid
        if self.stdin is not None:
            transport.write(self.stdin)
        if self.close_stdin:
            transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        error = reason.value
        if isinstance(error, ProcessDone):
            self.ended.callback(0)
        elif isinstance(error, ProcessTerminated):
            code = error.exitCode if error.exitCode is not None else -(error.signal or 0)
            self.ended.callback(code)
        else:
            self.ended.errback(reason)

    def signal(self, signum: int) -> None:
        """
        Send a signal to the process.
        """
        cast(Any, self.transport).signalProcess(signum)

    def kill(self) -> Deferred[int]:
        """
        Kill the process unless it ended; fires once it has.
        """
        if not self.ended.called:
            self.signal(signal.SIGKILL)
        d: Deferred[int] = Deferred()

        def ended(result: object) -> object:
            d.callback(0)
            return result

        self.ended.addBoth(ended)
        return d

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")


def spawn(
    *args: str, stdin: bytes | None = None, close_stdin: bool = True, env: dict[str, str] | None = None
) -> CLIProcess:
    """
    Start C{fedhub ARGS...} in a subprocess (the checkout on its path).

    @param env: Environment variables to set for it, beyond the inherited ones.
    """
    process = CLIProcess(stdin, close_stdin)
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cast(Any, _reactor()).spawnProcess(
        process, sys.executable, [sys.executable, "-c", CLI_SCRIPT, *args], env=env, path=os.getcwd()
    )
    return process


async def run_cli(*args: str, stdin: bytes | None = None) -> CLIProcess:
    """
    Run C{fedhub ARGS...} to its end.
    """
    process = spawn(*args, stdin=stdin)
    await process.ended
    return process


class FakeBus:
    """
    A bus whose publishes wait for the test to confirm or fail them.

    @ivar published: Every message published, in order.
    @ivar outstanding: Publishes not settled yet, oldest first.
    @ivar most_outstanding: The largest number outstanding at once.
    @ivar refuse: When set, publishes fail with it at once.
    @ivar auto_ack: Confirm at once.
    """

    def __init__(self) -> None:
        self.published: list[Message] = []
        self.outstanding: deque[tuple[Message, Deferred[None]]] = deque()
        self.most_outstanding = 0
        self.refuse: Exception | None = None
        self.auto_ack = False

    def publish(self, message: Message) -> Deferred[None]:
        self.published.append(message)
        if self.refuse is not None:
            return fail(self.refuse)
        if self.auto_ack:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.outstanding.append((message, d))
        self.most_outstanding = max(self.most_outstanding, len(self.outstanding))
        return d

    def ack(self, count: int | None = None) -> None:
        for _ in range(len(self.outstanding) if count is None else count):
            self.outstanding.popleft()[1].callback(None)

    def fail_next(self, error: Exception) -> None:
        self.outstanding.popleft()[1].errback(error)


def make(n: int, topic: str = "org.example.dev.test.n") -> Message:
    return Message.create(topic, {"n": n}, id=f"00000000-0000-4000-8000-{n:012d}")


async def messages_of(items: list[Message]) -> AsyncIterator[tuple[int | None, Message]]:
    for number, message in enumerate(items, 1):
        yield number, message


async def failing_after(items: list[Message], error: Exception) -> AsyncIterator[tuple[int | None, Message]]:
    for number, message in enumerate(items, 1):
        yield number, message
    raise error


# --- no broker ---------------------------------------------------------------------


class BuildMessageTests(SynchronousTestCase):
    """
    The message of --topic and --body.
    """

    def test_builds(self) -> None:
        """--topic, --body, --schema and --severity make the message."""
        message = publish.build_message("org.example.prod.a.b", '{"x": [1, 2]}', "my.schema", 30)
        self.assertEqual((message.topic, dict(message.body), message.schema, message.severity),
                         ("org.example.prod.a.b", {"x": [1, 2]}, "my.schema", 30))
        self.assertIsNotNone(message.sent_at)

    def test_bad_json(self) -> None:
        """A body that is not JSON is a data error (65)."""
        e = self.assertRaises(CommandError, publish.build_message, "a.b", '{"x": ', "s", 20)
        self.assertEqual(e.status, runner.EX_DATAERR)
        self.assertIn("not valid JSON", e.reason)

    def test_not_an_object(self) -> None:
        """A body that is a JSON array is a data error (65)."""
        e = self.assertRaises(CommandError, publish.build_message, "a.b", "[1]", "s", 20)
        self.assertEqual((e.status, "JSON object" in e.reason), (runner.EX_DATAERR, True))

    def test_deep_body(self) -> None:
        """A body nested too deeply is refused, not a crash."""
        e = self.assertRaises(CommandError, publish.build_message, "a.b", "[" * 100000, "s", 20)
        self.assertEqual(e.status, runner.EX_DATAERR)

    def test_bad_topic(self) -> None:
        """An invalid topic is a data error (65)."""
        e = self.assertRaises(CommandError, publish.build_message, "", "{}", "s", 20)
        self.assertEqual(e.status, runner.EX_DATAERR)

    def test_severity(self) -> None:
        """Severities are numbers or names; anything else is a usage error."""
        self.assertEqual([publish.parse_severity(t) for t in ("10", "WARNING", "error")], [10, 30, 40])
        e = self.assertRaises(CommandError, publish.parse_severity, "25")
        self.assertEqual(e.status, runner.EX_USAGE)


class DecodeLineTests(SynchronousTestCase):
    """
    Lines of a message file.
    """

    def test_message(self) -> None:
        """A serialized line gives its message back, id and headers intact."""
        message = Message.create("org.example.dev.a", {"a": 1}, headers={"fedora_messaging_user_x": True})
        self.assertEqual(decode_line(dump_line(message).encode(), 7), message)

    def test_blank(self) -> None:
        """A blank line is skipped."""
        self.assertIsNone(decode_line(b"  \r", 3))

    def test_bad_line_numbered(self) -> None:
        """A bad line is a DecodeError naming its line number."""
        for line in (b"{not json", b"[]", b'{"topic": "a"}', b"\xff\xfe"):
            e = self.assertRaises(DecodeError, decode_line, line, 42)
            self.assertEqual(e.line, 42)
            self.assertIn("line 42", str(e))


class FakeThreadReactor:
    """
    Collects what a thread hands to the reactor; the test runs it.
    """

    def __init__(self) -> None:
        self.calls: deque[tuple[Any, tuple[Any, ...]]] = deque()
        self.arrived = threading.Condition()

    def callFromThread(self, fn: Any, *args: Any) -> None:
        with self.arrived:
            self.calls.append((fn, args))
            self.arrived.notify_all()

    def run_calls(self, at_least: int = 1) -> None:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.calls) >= at_least, timeout=10):
                raise AssertionError("the reading thread handed nothing over")
            calls = list(self.calls)
            self.calls.clear()
        for fn, args in calls:
            fn(*args)


class CountingStream(io.BytesIO):
    """
    A stream that counts its reads.
    """

    reads = 0

    def read1(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read1(size)


class LineReaderTests(SynchronousTestCase):
    """
    Reading a file in a thread, a chunk at a time.
    """

    def read_all(self, data: bytes, **options: Any) -> list[bytes] | Failure:
        reactor = FakeThreadReactor()
        reader = LineReader(io.BytesIO(data), reactor, **options)
        reader.start()
        lines: list[bytes] = []
        while True:
            d = reader.next_lines()
            while not d.called:
                reactor.run_calls()
            result: list[Any] = []
            d.addBoth(result.append)
            if isinstance(result[0], Failure):
                return result[0]
            if result[0] is None:
                return lines
            lines.extend(result[0])

    def test_lines_across_chunks(self) -> None:
        """Lines cut across chunks come out whole; a last line without newline is kept."""
        data = b"first\nsecond line\n\nthird" 
        self.assertEqual(self.read_all(data, chunk_size=4), [b"first", b"second line", b"", b"third"])

    def test_long_line_refused(self) -> None:
        """A line longer than the limit is refused with a DecodeError."""
        outcome = self.read_all(b"short\n" + b"x" * 100 + b"\n", chunk_size=8, max_line=50)
        self.assertIsInstance(outcome, Failure)
        cast(Failure, outcome).trap(DecodeError)

    def test_line_of_a_large_message_read(self) -> None:
        """
        By default a line as long as what record writes of a 17 MiB message
        (more than the 16 MiB limit of before) is read: the limit is
        RabbitMQ's largest message, 512 MiB.
        """
        self.assertEqual(MAX_LINE, 512 * 1024 * 1024)
        big = b"x" * (17 << 20)
        self.assertEqual(self.read_all(b"a\n" + big + b"\n", chunk_size=1 << 20), [b"a", big])

    def test_long_line_numbered(self) -> None:
        """
        The lines before a long one come first, so that counting them names
        the long one: a file of 5 good lines and a long 6th fails at line 6.
        """
        reactor = FakeThreadReactor()
        data = b"".join(b'{"topic": "a.b", "body": {"n": %d}}\n' % n for n in range(5)) + b"x" * 500 + b"\n"
        reader = LineReader(io.BytesIO(data), reactor, chunk_size=1 << 16, max_line=200)
        reader.start()
        seen: list[int | None] = []

        async def drain() -> None:
            async for number, _ in publish.file_messages(reader):
                seen.append(number)

        d = Deferred.fromCoroutine(drain())
        while not d.called:
            reactor.run_calls()
        error = self.failureResultOf(d, DecodeError).value
        self.assertEqual(seen, [1, 2, 3, 4, 5])
        self.assertEqual(error.line, 6)

    def drain(self, data: bytes) -> tuple[list[tuple[int | None, Message]], Deferred[None]]:
        """
        The messages L{publish.file_messages} reads from C{data}, and a
        Deferred firing once it is done.
        """
        reactor = FakeThreadReactor()
        reader = LineReader(io.BytesIO(data), reactor)
        reader.start()
        seen: list[tuple[int | None, Message]] = []

        async def drain() -> None:
            async for item in publish.file_messages(reader):
                seen.append(item)

        d = Deferred.fromCoroutine(drain())
        while not d.called:
            reactor.run_calls()
        return seen, d

    def test_byte_order_mark(self) -> None:
        """
        A file that starts with a UTF-8 byte order mark (as some editors
        save it) is read as without it.
        """
        messages = [make(n) for n in range(2)]
        seen, d = self.drain(b"\xef\xbb\xbf" + dumps(messages).encode("utf-8"))
        self.successResultOf(d)
        self.assertEqual(seen, [(1, messages[0]), (2, messages[1])])

    def test_byte_order_mark_only_at_the_start(self) -> None:
        """A byte order mark on a later line is no part of the serialized form: that line is bad."""
        first, second = make(1), make(2)
        data = dumps([first]).encode("utf-8") + b"\xef\xbb\xbf" + dumps([second]).encode("utf-8")
        seen, d = self.drain(data)
        self.assertEqual(self.failureResultOf(d, DecodeError).value.line, 2)
        self.assertEqual(seen, [(1, first)])

    def test_stop(self) -> None:
        """Stopping fails the read that waits, and later ones, with InputStopped."""
        reader = LineReader(io.BytesIO(b""), FakeThreadReactor())
        waiting = reader.next_lines()
        reader.stop()
        self.failureResultOf(waiting, publish.InputStopped)
        self.failureResultOf(reader.next_lines(), publish.InputStopped)

    def test_reads_ahead_bounded(self) -> None:
        """The thread reads at most `ahead` chunks the reactor side has not taken."""
        reactor = FakeThreadReactor()
        stream = CountingStream(b"".join(b"%d\n" % n for n in range(1000)))
        reader = LineReader(stream, reactor, chunk_size=10, ahead=2)
        reader.start()
        reactor.run_calls(at_least=2)
        # Give the thread every chance to read more than it may.
        threading.Event().wait(0.2)
        self.assertEqual(stream.reads, 2)
        lines = self.successResultOf(reader.next_lines())
        assert lines is not None
        self.assertEqual(lines[0], b"0")
        reactor.run_calls()
        self.assertEqual(stream.reads, 3)


class PublishAllTests(SynchronousTestCase):
    """
    The publishing loop: window, first failure, bad input, rate, stop.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = FakeBus()

    def run_all(self, source: Any, **options: Any) -> Deferred[Progress]:
        options.setdefault("window", 3)
        return Deferred.fromCoroutine(publish_all(self.bus, source, self.clock, **options))

    def test_window(self) -> None:
        """At most `window` publishes wait for confirms; it ends once all are confirmed."""
        d = self.run_all(messages_of([make(n) for n in range(10)]))
        while self.bus.outstanding:
            self.assertNoResult(d)
            self.bus.ack(1)
        progress = self.successResultOf(d)
        self.assertEqual((progress.sent, progress.confirmed, progress.failed), (10, 10, None))
        self.assertEqual(self.bus.most_outstanding, 3)
        self.assertEqual([m.id for m in self.bus.published], [make(n).id for n in range(10)])

    def test_stops_at_first_failure(self) -> None:
        """The first refusal stops sending; publishes in flight are still waited for."""
        d = self.run_all(messages_of([make(n) for n in range(10)]))
        returned = MessageReturned("no queue is bound", make(0).id, 312)
        self.bus.fail_next(returned)
        self.assertNoResult(d)
        self.bus.ack()
        progress = self.successResultOf(d)
        self.assertEqual((progress.sent, progress.confirmed), (3, 2))
        assert progress.failed is not None
        self.assertEqual(progress.failed[0], 1)
        self.assertIs(progress.failed[2], returned)

    def test_bad_input_after_some(self) -> None:
        """A bad line stops reading; the messages before it are published and confirmed."""
        self.bus.auto_ack = True
        error = DecodeError("not valid JSON", 3)
        progress = self.successResultOf(self.run_all(failing_after([make(1), make(2)], error)))
        self.assertEqual((progress.confirmed, progress.bad_input), (2, error))

    def test_rate(self) -> None:
        """With a rate, messages go out no faster than it allows."""
        self.bus.auto_ack = True
        d = self.run_all(messages_of([make(n) for n in range(5)]), rate=2.0)
        sent = []
        for _ in range(12):
            sent.append(len(self.bus.published))
            self.clock.advance(0.25)
        self.successResultOf(d)
        # t=0: 1, t=0.5: 2, t=1.0: 3, t=1.5: 4, t=2.0: 5
        self.assertEqual(sent, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_input_stopped(self) -> None:
        """Input stopped by an interrupt ends publishing as stopped, not as finished."""
        self.bus.auto_ack = True
        progress = self.successResultOf(
            self.run_all(failing_after([make(1)], publish.InputStopped("stopped")))
        )
        self.assertEqual((progress.confirmed, progress.stopped, progress.bad_input), (1, True, None))

    def test_stop(self) -> None:
        """When asked to stop, no more messages are sent and the result says so."""
        stopping = [False]
        d = self.run_all(messages_of([make(n) for n in range(10)]), stop=lambda: stopping[0])
        stopping[0] = True
        self.bus.ack()
        progress = self.successResultOf(d)
        self.assertEqual((progress.sent, progress.confirmed, progress.stopped), (3, 3, True))


class ReportTests(SynchronousTestCase):
    """
    Exit statuses and the one line on standard error.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.runtime = Runtime(Clock())

    def status(self, progress: Progress) -> int:
        return publish.report("publish", progress, self.runtime, single=False)

    def failed(self, error: Exception) -> int:
        return self.status(Progress(sent=2, confirmed=1, failed=(2, make(2), error)))

    def test_ok(self) -> None:
        """Everything confirmed: 0 and nothing printed."""
        self.assertEqual(self.status(Progress(sent=2, confirmed=2)), 0)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_refusals(self) -> None:
        """Returned, nacked and 404 are 69; 403 (at login or on publishing) is 77; a lost connection is 75."""
        self.assertEqual(self.failed(MessageReturned("no queue is bound", None)), 69)
        self.assertEqual(self.failed(MessageNacked("refused")), 69)
        self.assertEqual(self.failed(NotFound(404, "NOT_FOUND - no exchange")), 69)
        self.assertEqual(self.failed(AccessRefused(403, "ACCESS_REFUSED")), 77)
        self.assertEqual(self.failed(AccessRefused(530, "NOT_ALLOWED - access to vhost 'a' "
                                                        "refused for user 'guest'")), 77)
        self.assertEqual(self.failed(AccessRefused(530, "NOT_ALLOWED - vhost a not found")), 78)
        self.assertEqual(self.failed(NotConnected("the connection was lost")), 75)
        from fedhub.amqp.transport import PublishRefused

        self.assertEqual(self.failed(PublishRefused("amq.topic", "a.b", 403, "ACCESS_REFUSED - write")), 77)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 8)
        self.assertIn("the broker has no such virtual host", lines[5])
        self.assertIn("the broker refused publishing to exchange 'amq.topic': 403", lines[7])
        self.assertTrue(lines[0].startswith(f"fedhub publish: line 2: message {make(2).id}"), lines[0])
        self.assertIn("1 of 2 message(s) sent were confirmed", lines[0])

    def test_interrupted_while_confirms_stalled(self) -> None:
        """
        A signal while confirms are stalled: the connection given up for it
        fails the unconfirmed messages as lost, but the command reports the
        interruption (130, 143), with what may or may not have arrived.
        """
        self.runtime.signal = signal.SIGTERM
        progress = Progress(sent=10, confirmed=7, last_line=10,
                            failed=(8, make(8), NotConnected("the connection to the broker was lost")))
        self.assertEqual(self.status(progress), 143)
        (line,) = self.stderr.getvalue().splitlines()
        self.assertIn("interrupted after line 10; 7 of 10 message(s) sent were confirmed; "
                      "3 unconfirmed may or may not have arrived", line)
        # A refusal is still reported as one.
        self.assertEqual(self.failed(AccessRefused(403, "ACCESS_REFUSED")), 77)

    def test_too_large(self) -> None:
        """A body larger than the broker's max_message_size is 69, the line naming both sizes."""
        from fedhub.amqp.transport import MessageTooLarge

        error = MessageTooLarge(5000, 4096, "PRECONDITION_FAILED - message size 5000 is larger"
                                " than configured max size 4096", make(2).id)
        self.assertEqual(self.failed(error), 69)
        (line,) = self.stderr.getvalue().splitlines()
        self.assertTrue(line.startswith(f"fedhub publish: line 2: message {make(2).id}"), line)
        self.assertIn("(5000 bytes) is larger than the broker takes (max_message_size 4096 bytes)", line)

    def test_bad_input(self) -> None:
        """A bad line is 65, with its number."""
        self.assertEqual(self.status(Progress(sent=2, confirmed=2, bad_input=DecodeError("bad", 3))), 65)
        self.assertIn("line 3: bad", self.stderr.getvalue())

    def test_interrupted(self) -> None:
        """Stopped by SIGINT: 130, saying how far it got."""
        self.runtime.interrupt(signal.SIGINT)
        self.assertEqual(self.status(Progress(sent=5, last_line=5, confirmed=5, stopped=True)), 130)
        self.assertIn("interrupted after line 5", self.stderr.getvalue())

    def test_control_characters_escaped(self) -> None:
        """What the broker said is printed as one safe line."""
        self.failed(MessageReturned("no queue\n\x1b[31m", None))
        self.assertNotIn("\x1b", self.stderr.getvalue())
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 1)


class UsageTests(SynchronousTestCase):
    """
    Problems found before connecting; the reactor never runs.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.directory = Path(self.mktemp()).absolute()

    def run_publish(self, *argv: str) -> int:
        args = build_parser().parse_args(["publish", *argv])
        return cast(int, args.run(args))

    def test_neither(self) -> None:
        """Without --topic/--body or --file: 64."""
        self.assertEqual(self.run_publish("--topic", "a.b"), 64)

    def test_both(self) -> None:
        """--file with --topic: 64."""
        self.assertEqual(self.run_publish("--file", "x", "--topic", "a.b"), 64)

    def test_memory_domain_refused(self) -> None:
        """A domain on the in-process bus is refused with a clear reason (78)."""
        config = write_config(self.directory, broker="memory")
        self.assertEqual(self.run_publish("-c", config, "--topic", "a.b", "--body", "{}"), 78)
        self.assertIn("in-process bus", self.stderr.getvalue())

    def test_domain_choice(self) -> None:
        """Several domains and no --domain: 78, listing them; an unknown one likewise."""
        config = write_config(self.directory, more=f'[domains.other]\nbroker = "{BROKER_URL}"\n')
        self.assertEqual(self.run_publish("-c", config, "--topic", "a.b", "--body", "{}"), 78)
        self.assertIn("other, test", self.stderr.getvalue())
        self.assertIn("use --domain", self.stderr.getvalue())
        self.assertEqual(self.run_publish("-c", config, "-d", "nope", "--topic", "a.b", "--body", "{}"), 78)

    def test_bad_config(self) -> None:
        """An unreadable configuration: 78."""
        self.assertEqual(self.run_publish("-c", str(self.directory / "missing.toml"), "--topic", "a.b",
                                          "--body", "{}"), 78)

    def test_missing_file(self) -> None:
        """A message file that does not exist: 66."""
        config = write_config(self.directory)
        self.assertEqual(self.run_publish("-c", config, "--file", str(self.directory / "nope")), 66)


class FirstOfTests(SynchronousTestCase):
    """
    L{runner.first_of}.
    """

    def test_first_wins_others_untouched(self) -> None:
        """The first result wins; the other Deferred is not cancelled and may fire later."""
        a: Deferred[int] = Deferred()
        b: Deferred[int] = Deferred()
        d = runner.first_of(a, b)
        b.callback(2)
        self.assertEqual(self.successResultOf(d), (1, 2))
        a.errback(RuntimeError("late"))
        self.assertIsNone(self.successResultOf(a))

    def test_failure(self) -> None:
        """A failure that comes first is the result."""
        a: Deferred[int] = Deferred()
        d = runner.first_of(a, Deferred())
        a.errback(NotConnected("no"))
        self.failureResultOf(d, NotConnected)


# --- the shared broker ----------------------------------------------------------------


class BlockedWatchTests(SynchronousTestCase):
    """
    The watch that keeps a publishing command's time bound while its broker
    blocks publishing (a resource alarm), when the bus stops timing confirms.
    """

    def test_fires_after_timeout_blocked(self) -> None:
        """Blocked for longer than the timeout in a row: it fires; an unblock in between starts afresh."""

        class Bus:
            blocked = False

        clock = Clock()
        bus = Bus()

        def advance(seconds: float) -> None:
            clock.pump([0.25] * int(seconds / 0.25))

        watch = runner._blocked_too_long(bus, clock, 5.0)
        bus.blocked = True
        advance(4)
        bus.blocked = False
        advance(0.25)
        bus.blocked = True
        advance(5)
        self.assertNoResult(watch)
        advance(1)
        self.assertIsNone(self.successResultOf(watch))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelled (the work ended first), it stops looking."""

        class Bus:
            blocked = True

        clock = Clock()
        watch = runner._blocked_too_long(Bus(), clock, 5.0)
        watch.addErrback(lambda f: f.trap(CancelledError))
        watch.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])


class LivePublishTests(LiveCase):
    """
    C{fedhub publish} against the shared RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.tag = uuid.uuid4().hex
        self.prefix = f"fedhubtest.cli.{self.tag}"

    async def consumer(self) -> Collector:
        bus = await self.start_bus()
        queue = await self.queue(bus, f"{self.prefix}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 100)
        return collector

    async def test_one_message(self) -> None:
        """One message from options arrives as given; its id is printed; exit 0."""
        collector = await self.consumer()
        result = await run_cli("publish", "-c", self.config, "--topic", f"{self.prefix}.one",
                               "--body", '{"hello": "world"}', "--schema", "x.y", "--severity", "warning")
        self.assertEqual(await result.ended, 0, result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 1, "the message")
        message = collector.deliveries[0].message
        self.assertEqual(result.stdout.strip(), message.id)
        self.assertEqual((dict(message.body), message.schema, message.severity), ({"hello": "world"}, "x.y", 30))

    async def test_file_of_many(self) -> None:
        """Every message of a file arrives, in order, ids and headers intact; blank lines are skipped."""
        collector = await self.consumer()
        messages = [
            Message.create(f"{self.prefix}.m{n % 3}", {"n": n}, headers={"fedora_messaging_rpm_pkg": True})
            for n in range(300)
        ]
        path = self.directory / "messages.jsonl"
        path.write_text(dumps(messages[:150]) + "\n\n" + dumps(messages[150:]))
        result = await run_cli("publish", "-c", self.config, "--file", str(path), "--window", "20")
        self.assertEqual(await result.ended, 0, result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 300, "300 messages")
        self.assertEqual(collector.ids, [m.id for m in messages])
        got = collector.deliveries[299].message
        self.assertEqual((got.headers, got.sent_at), (messages[299].headers, messages[299].sent_at))

    async def test_stdin(self) -> None:
        """--file - reads standard input; a record without sent-at gets one."""
        collector = await self.consumer()
        record = {"topic": f"{self.prefix}.stdin", "body": {"a": 1}, "id": str(uuid.uuid4())}
        result = await run_cli("publish", "-c", self.config, "--file", "-",
                               stdin=json.dumps(record).encode() + b"\n")
        self.assertEqual(await result.ended, 0, result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 1, "the message")
        self.assertEqual(collector.ids, [record["id"]])
        self.assertIsNotNone(collector.deliveries[0].message.sent_at)

    async def test_unroutable(self) -> None:
        """A topic nobody is bound for: exit 69 and one line saying so."""
        result = await run_cli("publish", "-c", self.config, "--topic", f"{self.prefix}.nobody", "--body", "{}")
        self.assertEqual(await result.ended, 69)
        self.assertIn("no queue is bound", result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    async def test_bad_line_stops_with_its_number(self) -> None:
        """A bad third line: exit 65 naming line 3; the two before it were published."""
        collector = await self.consumer()
        good = [Message.create(f"{self.prefix}.ok", {"n": n}) for n in range(2)]
        path = self.directory / "bad.jsonl"
        path.write_text(dumps(good) + '{"topic": "x", "body": [1]}\n' + dumps(Message.create(f"{self.prefix}.ok", {})))
        result = await run_cli("publish", "-c", self.config, "--file", str(path))
        self.assertEqual(await result.ended, 65)
        self.assertIn("line 3:", result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 2, "the two good messages")
        self.assertEqual(collector.ids, [m.id for m in good])

    async def test_missing_exchange(self) -> None:
        """A domain whose exchange does not exist: exit 69 with the broker's 404."""
        config = write_config(self.directory / "x", exchange=f"fedhubtest.missing.{self.tag}")
        result = await run_cli("publish", "-c", config, "--topic", f"{self.prefix}.a", "--body", "{}")
        self.assertEqual(await result.ended, 69, result.stderr)
        self.assertIn("404", result.stderr)

    async def test_unreachable(self) -> None:
        """A closed port: non-zero (75) after the timeout, naming the broker without its password."""
        closed = write_config(self.directory / "closed", broker="amqp://guest:secret@127.0.0.1:1/%2F")
        result = await run_cli("publish", "-c", closed, "--timeout", "1", "--topic", "a.b", "--body", "{}")
        self.assertEqual(await result.ended, 75)
        self.assertIn("could not connect to amqp://guest@127.0.0.1:1/", result.stderr)
        self.assertNotIn("secret", result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    async def test_vhost_missing(self) -> None:
        """A vhost the broker does not have is a configuration problem (78), not a permission."""
        config = write_config(self.directory / "novhost",
                              broker=f"amqp://guest:guest@127.0.0.1:5672/fedhubtest-none-{self.tag}")
        result = await run_cli("publish", "-c", config, "--timeout", "10", "--topic", "a.b",
                               "--body", "{}")
        self.assertEqual(await result.ended, 78, result.stderr)
        self.assertIn("the broker has no such virtual host: 530", result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)

    async def test_interrupted(self) -> None:
        """SIGINT while waiting for the broker: exit 130 at once, not after the timeout."""
        closed = write_config(self.directory / "closed", broker="amqp://guest:guest@127.0.0.1:1/%2F")
        process = spawn("publish", "-c", closed, "--timeout", "60", "--topic", "a.b", "--body", "{}", "-v")
        self.addCleanup(process.kill)
        await self.wait_for(lambda: b"Connecting to" in process.err, "a connection attempt", 30)
        process.signal(signal.SIGINT)
        self.assertEqual(await process.ended, 130, process.stderr)
        self.assertIn("interrupted while connecting", process.stderr)


    async def test_interrupted_reading(self) -> None:
        """SIGINT while waiting for lines on standard input: 130 with the count, at once."""
        collector = await self.consumer()
        line = dump_line(Message.create(f"{self.prefix}.first", {})).encode()
        process = spawn("publish", "-c", self.config, "--file", "-", stdin=line, close_stdin=False)
        self.addCleanup(process.kill)
        await self.wait_for(lambda: len(collector.deliveries) == 1, "the first line's message", 30)
        process.signal(signal.SIGINT)
        self.assertEqual(await process.ended, 130, process.stderr)
        self.assertIn("interrupted after line 1; 1 of 1 message(s) sent were confirmed", process.stderr)


class MainTests(SynchronousTestCase):
    """
    The command table.
    """

    def test_registered(self) -> None:
        """Every command is registered with a one-line summary, the older ones kept."""
        from fedhub.cli.main import COMMANDS

        for name in ("check-config", "inject-mail", "publish", "tail", "record", "replay", "outbox"):
            module = COMMANDS[name]
            self.assertTrue((module.__doc__ or "").strip().splitlines()[0])
        self.assertIsInstance(build_parser(), argparse.ArgumentParser)
