"""
Tests for C{fedhub record} and C{fedhub replay} (L{fedhub.cli.record},
L{fedhub.cli.replay}): the file writer without a broker, then a round trip
through the shared RabbitMQ (a missing broker fails under C{CI=true}, skips
elsewhere).
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import io
import os
import stat
import sys
import uuid
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli.main import build_parser
from fedhub.cli.record import Appender, open_output
from fedhub.cli.replay import new_id
from fedhub.cli.runner import CommandError
from fedhub.cli.tail import Filter, Follower
from fedhub.message import Message, dumps, from_amqp, iter_loads, loads
from tests.test_amqp_bus import Collector, LiveCase
from tests.test_cli_publish import run_cli, spawn, write_config
from tests.test_cli_tail import FakeDelivery


class FullStream(io.BytesIO):
    """
    A file on a full disk.
    """

    def write(self, data: bytes) -> int:  # type: ignore[override]
        raise OSError(28, "No space left on device")


class HalfFullFile(io.FileIO):
    """
    A file on a disk that fills up in the middle of a line: a write of more
    than a few bytes takes half of them, then fails.
    """

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(data) > 10:
            super().write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


class AppenderTests(SynchronousTestCase):
    """
    Writing recorded messages.
    """

    def test_appends_lines(self) -> None:
        """Each message is one serialized line, appended after what the file held."""
        path = Path(self.mktemp())
        path.write_bytes(b"earlier\n")
        messages = [Message.create("org.example.dev.a", {"n": n}) for n in range(3)]
        appender = Appender(open_output(str(path)), str(path))
        for message in messages:
            appender(message)
            # Flushed per message: readable at once by another process.
            self.assertTrue(path.read_bytes().endswith(b"}\n"))
        appender.close()
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"earlier\n"))
        self.assertEqual(loads(data[len(b"earlier\n"):]), messages)
        self.assertEqual(appender.written, 3)

    def test_write_error(self) -> None:
        """A failed write is an I/O error (74) naming the file."""
        appender = Appender(FullStream(), "out.jsonl")
        e = self.assertRaises(CommandError, appender, Message.create("a.b", {}))
        self.assertEqual(e.status, 74)
        self.assertIn("out.jsonl", e.reason)

    def test_write_failing_half_way(self) -> None:
        """
        A write that fails half-way (a full disk) is cut back: the file keeps
        only whole lines, so that replay reads everything written.
        """
        path = Path(self.mktemp())
        path.write_bytes(b"earlier\n")
        appender = Appender(HalfFullFile(str(path), "ab"), str(path))
        e = self.assertRaises(CommandError, appender, Message.create("a.b", {"n": 1}))
        appender.close()
        self.assertEqual(e.status, 74)
        self.assertEqual(path.read_bytes(), b"earlier\n")
        self.assertEqual(appender.written, 0)

    def test_after_an_unterminated_line(self) -> None:
        """
        Appended to a file whose last line has no newline (half a line left
        by an earlier failure), the messages go on lines of their own.
        """
        path = Path(self.mktemp())
        path.write_bytes(b'{"topic": "a.b", "bo')
        messages = [Message.create("org.example.dev.a", {"n": n}) for n in range(2)]
        appender = Appender(open_output(str(path)), str(path))
        for message in messages:
            appender(message)
        appender.close()
        first, rest = path.read_bytes().split(b"\n", 1)
        self.assertEqual(first, b'{"topic": "a.b", "bo')
        self.assertEqual(loads(rest), messages)

    def test_new_file_mode(self) -> None:
        """A new file is readable by its owner and group only; an existing one keeps its mode."""
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        path = Path(self.mktemp())
        Appender(open_output(str(path)), str(path)).close()
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o640)
        path.chmod(0o600)
        Appender(open_output(str(path)), str(path)).close()
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_unserializable_message(self) -> None:
        """A message that can not be serialized ends the recording with one line naming it and the file (70), writing nothing."""
        # No AMQP value is without a serialized form; a set stands for a bug.
        message = from_amqp("org.example.dev.a", {"headers": {"odd": {1, 2}}}, b"{}")
        stream = io.BytesIO()
        appender = Appender(stream, "out.jsonl")
        follower = Follower(appender, Filter(), count=1)
        follower(FakeDelivery(message))
        error = self.failureResultOf(follower.done, CommandError).value
        self.assertEqual(error.status, 70)
        self.assertIn("out.jsonl", error.reason)
        self.assertIn(message.id, error.reason)
        self.assertEqual((stream.getvalue(), appender.written), (b"", 0))

    def test_cannot_open(self) -> None:
        """A file that can not be created: 73."""
        e = self.assertRaises(CommandError, open_output, str(Path(self.mktemp()) / "no" / "dir"))
        self.assertEqual(e.status, 73)

    def test_new_id(self) -> None:
        """--new-ids keeps everything but the id."""
        message = Message.create("org.example.dev.a", {"n": 1}, headers={"fedora_messaging_user_a": True})
        fresh = new_id(message)
        self.assertNotEqual(fresh.id, message.id)
        self.assertEqual(fresh.evolve(id=message.id), message)


class UsageTests(SynchronousTestCase):
    """
    Problems found before connecting.
    """

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.directory = Path(self.mktemp()).absolute()

    def test_replay_missing_file(self) -> None:
        """Replaying a file that does not exist: 66."""
        config = write_config(self.directory)
        args = build_parser().parse_args(["replay", "-c", config, str(self.directory / "nope")])
        self.assertEqual(args.run(args), 66)

    def test_record_memory_domain(self) -> None:
        """Recording an in-process domain is refused (78)."""
        config = write_config(self.directory, broker="memory")
        args = build_parser().parse_args(["record", "-c", config, str(self.directory / "out")])
        self.assertEqual(args.run(args), 78)

    def test_rate_must_be_positive(self) -> None:
        """--rate 0 is refused by the parser."""
        self.assertRaises(SystemExit, build_parser().parse_args, ["replay", "x", "--rate", "0"])


class LiveRecordReplayTests(LiveCase):
    """
    Record, then replay, through the shared RabbitMQ.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.prefix = f"fedhubtest.record.{uuid.uuid4().hex}"

    async def record(self, path: Path, messages: list[Message]) -> None:
        process = spawn("record", "-c", self.config, str(path), "--topic", f"{self.prefix}.#",
                        "--count", str(len(messages)))
        self.addCleanup(process.kill)
        await self.wait_for(lambda: b"following" in process.err or process.ended.called, "record", 30)
        bus = await self.start_bus()
        for message in messages:
            await bus.publish(message)
        self.assertEqual(await process.ended, 0, process.stderr)

    async def consumer(self) -> Collector:
        bus = await self.start_bus()
        queue = await self.queue(bus, f"{self.prefix}.#")
        collector = Collector()
        await bus.subscribe(queue, collector, 100)
        return collector

    async def test_round_trip(self) -> None:
        """Recorded messages replay with their ids, headers and bodies; --new-ids changes only ids."""
        messages = [
            Message.create(f"{self.prefix}.n{n}", {"n": n, "text": "é\u2028"},
                           headers={"fedora_messaging_rpm_kernel": True})
            for n in range(5)
        ]
        path = self.directory / "recorded.jsonl"
        await self.record(path, messages)
        recorded = list(iter_loads(path.read_bytes().split(b"\n")))
        self.assertEqual([m.id for m in recorded], [m.id for m in messages])

        collector = await self.consumer()
        result = await run_cli("replay", "-c", self.config, str(path), "--rate", "50")
        self.assertEqual(await result.ended, 0, result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 5, "the replayed messages")
        replayed = [d.message for d in collector.deliveries]
        self.assertEqual([m.evolve(queue=None) for m in replayed], messages)

        result = await run_cli("replay", "-c", self.config, str(path), "--new-ids")
        self.assertEqual(await result.ended, 0, result.stderr)
        await self.wait_for(lambda: len(collector.deliveries) == 10, "the messages with new ids")
        fresh = [d.message for d in collector.deliveries[5:]]
        self.assertFalse({m.id for m in fresh} & {m.id for m in messages})
        self.assertEqual([m.evolve(id="x", queue=None) for m in fresh],
                         [m.evolve(id="x") for m in messages])

    async def test_replay_refused(self) -> None:
        """A recorded message nobody is bound for any more: exit 69 naming its line."""
        path = self.directory / "old.jsonl"
        path.write_text(dumps([Message.create(f"{self.prefix}.gone", {})]))
        result = await run_cli("replay", "-c", self.config, str(path))
        self.assertEqual(await result.ended, 69)
        self.assertIn("line 1:", result.stderr)
        self.assertIn("no queue is bound", result.stderr)
