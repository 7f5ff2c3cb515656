"""
Tests for the C{record} consumer: serialized lines in order, batching by
turn, interval and size, fsync policies, rotation by rename (with and
without C{reopen()}), failed writes that leave no half line, and stopping.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from fedhub.config import HubSettings
from fedhub.consumers.record import RecordHandler, RecordPlugin, RecordSettings
from fedhub.errors import ConfigError
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.message import Message, from_amqp, loads
from fedhub.testing import ConsumerHarness

TOPIC = "org.example.dev.record.test"


class RecordTests(SynchronousTestCase):
    """
    The record consumer on the harness's clock, writing real files.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "messages.jsonl"

    def harness(self, options: Mapping[str, Any] | None = None, **kwargs: Any) -> ConsumerHarness:
        """
        A started harness recording to C{self.path} unless told otherwise.
        """
        harness = ConsumerHarness(RecordPlugin(), {"path": str(self.path), **(options or {})},
                                  **kwargs)
        harness.start()
        return harness

    def handler(self, harness: ConsumerHarness) -> RecordHandler:
        """
        The harness's handler, typed.
        """
        handler = harness.handler
        assert isinstance(handler, RecordHandler)
        return handler

    def test_provides(self) -> None:
        """The plugin and its handler provide their interfaces."""
        verifyObject(IConsumerPlugin, RecordPlugin())
        verifyObject(IMessageHandler, self.harness().handler)

    def test_lines_load_in_order(self) -> None:
        """Every message becomes one line loadable with loads(), in delivery order."""
        harness = self.harness(concurrency=20)
        sent = [Message.create(TOPIC, {"n": n, "text": "ünïcode\u2028line"}) for n in range(50)]
        settled = [harness.deliver(m) for m in sent]
        self.assertEqual([self.successResultOf(d).outcome for d in settled], ["acked"] * 50)
        text = self.path.read_text(encoding="utf-8")
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(text.count("\n"), 50)
        loaded = loads(text)
        self.assertEqual([m.id for m in loaded], [m.id for m in sent])
        self.assertEqual([m.body for m in loaded], [m.body for m in sent])
        self.assertEqual(loaded[0].queue, "fedhub.test")

    def test_one_write_per_turn(self) -> None:
        """Messages arriving in the same turn share one write."""
        harness = self.harness(concurrency=10)
        for n in range(10):
            harness.bus.publish(Message.create(TOPIC, {"n": n}))
        harness.advance(0)
        self.assertEqual([s.outcome for s in harness.settled], ["acked"] * 10)
        self.assertEqual(self.handler(harness).writes, 1)

    def test_flush_interval(self) -> None:
        """Lines wait up to flush_interval; the message is acknowledged only after the write."""
        harness = self.harness({"flush_interval": 2.0}, concurrency=5)
        settled = [harness.deliver(Message.create(TOPIC, {"n": n})) for n in range(3)]
        for d in settled:
            self.assertNoResult(d)
        self.assertEqual(self.path.read_text(), "")
        harness.advance(2.0)
        self.assertEqual([self.successResultOf(d).outcome for d in settled], ["acked"] * 3)
        self.assertEqual(len(loads(self.path.read_text())), 3)
        self.assertEqual(self.handler(harness).writes, 1)

    def test_max_batch(self) -> None:
        """A full batch is written at once, without waiting for the interval."""
        harness = self.harness({"flush_interval": 60.0, "max_batch": 2}, concurrency=5)
        first = harness.deliver(Message.create(TOPIC, {"n": 1}))
        self.assertNoResult(first)
        second = harness.deliver(Message.create(TOPIC, {"n": 2}))
        self.assertEqual(self.successResultOf(first).outcome, "acked")
        self.assertEqual(self.successResultOf(second).outcome, "acked")
        self.assertEqual(len(loads(self.path.read_text())), 2)

    def test_fsync_every(self) -> None:
        """fsync_every = N syncs after every N lines, before those messages are acknowledged."""
        harness = self.harness({"fsync_every": 3})
        handler = self.handler(harness)
        synced_at: list[int] = []
        handler.fsync = lambda fd: synced_at.append(len(harness.settled))
        for n in range(7):
            self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": n})))
        self.assertEqual(synced_at, [2, 5])
        self.assertEqual(handler.syncs, 2)

    def test_fsync_interval(self) -> None:
        """fsync_interval syncs once within the interval after writes, and not when idle."""
        harness = self.harness({"fsync_interval": 5.0})
        handler = self.handler(harness)
        calls: list[int] = []
        handler.fsync = calls.append
        for n in range(3):
            self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": n})))
        self.assertEqual(calls, [])
        harness.advance(5.0)
        self.assertEqual(len(calls), 1)
        harness.advance(50.0)
        self.assertEqual(len(calls), 1)

    def test_reopen_after_rename(self) -> None:
        """After a rename and reopen(), new lines go to a new file at the path."""
        harness = self.harness({"follow_rotation": False})
        first = [Message.create(TOPIC, {"n": n}) for n in range(2)]
        for m in first:
            self.successResultOf(harness.deliver(m))
        rotated = self.dir / "messages.jsonl.1"
        os.rename(self.path, rotated)
        self.handler(harness).reopen()
        second = [Message.create(TOPIC, {"n": n}) for n in range(2, 4)]
        for m in second:
            self.successResultOf(harness.deliver(m))
        self.assertEqual([m.id for m in loads(rotated.read_text())], [m.id for m in first])
        self.assertEqual([m.id for m in loads(self.path.read_text())], [m.id for m in second])

    def test_reopen_when_not_open(self) -> None:
        """
        A reopen (SIGHUP) before the handler's start (one that failed and is
        tried again) or after its stop opens nothing: no descriptor is left
        behind, and the start opens the path.
        """
        handler = RecordHandler("r", ("#",), Clock(), RecordSettings(path=str(self.path)))
        before = len(os.listdir("/proc/self/fd"))
        handler.reopen()
        self.assertFalse(handler.is_open)
        handler.start()
        handler.stop()
        handler.reopen()
        self.assertFalse(handler.is_open)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_without_reopen_rename_keeps_old_file(self) -> None:
        """With follow_rotation off and no reopen(), lines keep going to the renamed file."""
        harness = self.harness({"follow_rotation": False})
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 0})))
        rotated = self.dir / "old"
        os.rename(self.path, rotated)
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertFalse(self.path.exists())
        self.assertEqual(len(loads(rotated.read_text())), 2)

    def test_follows_rotation(self) -> None:
        """A file renamed or removed behind its back is followed by a new one at the path."""
        harness = self.harness()
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 0})))
        os.rename(self.path, self.dir / "messages.jsonl.1")
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual([m.body["n"] for m in loads(self.path.read_text())], [1])
        self.path.unlink()
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 2})))
        self.assertEqual([m.body["n"] for m in loads(self.path.read_text())], [2])

    def test_fifo_at_the_path_refused(self) -> None:
        """
        A FIFO put at the path, read or not, is refused at once, the message
        retried with a reason naming the path, never waited on: the reactor
        would block until a reader came.  A file put back is written again.
        """
        harness = self.harness()
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 0})))
        os.rename(self.path, self.dir / "messages.jsonl.1")
        os.mkfifo(self.path)
        settled = self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual(settled.outcome, "retried")
        self.assertEqual(settled.reason, f"can not write {self.path}: {str(self.path)!r} is a "
                                         "FIFO, not a file")
        # With a reader it is opened, and refused all the same.
        reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        settled = self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("is a FIFO, not a file", settled.reason or "")
        self.assertEqual(os.read(reader, 100), b"")
        self.path.unlink()
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 2})))
        self.assertEqual([m.body["n"] for m in loads(self.path.read_text())], [2])

    def test_fifo_at_start_refused(self) -> None:
        """A FIFO at the path when the consumer starts is a start failure naming it."""
        os.mkfifo(self.path)
        harness = ConsumerHarness(RecordPlugin(), {"path": str(self.path)})
        with self.assertRaises(ConfigError) as caught:
            harness.handler.start()
        self.assertIn("is a FIFO, not a file", str(caught.exception))

    def test_rotation_syncs_the_old_file(self) -> None:
        """With fsync set, lines written before a rotation are synced to the old file before it is closed."""
        harness = self.harness({"fsync_interval": 60.0})
        handler = self.handler(harness)
        synced: list[int] = []
        handler.fsync = lambda fd: synced.append(os.fstat(fd).st_ino)
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 0})))
        old = self.path.stat().st_ino
        os.rename(self.path, self.dir / "messages.jsonl.1")
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual(synced, [old])
        harness.advance(60.0)
        self.assertEqual(synced, [old, self.path.stat().st_ino])

    def test_header_name_not_utf8(self) -> None:
        """A message whose header name was not UTF-8 on the wire is recorded, and reads back."""
        harness = self.harness()
        odd = from_amqp(TOPIC, {"headers": {"\udcffname": "x"}}, b'{"n": 1}')
        settled = self.successResultOf(harness.deliver(odd))
        self.assertEqual(settled.outcome, "acked")
        (loaded,) = loads(self.path.read_bytes())
        self.assertEqual(loaded.id, odd.id)
        self.assertEqual(loaded.headers["\udcffname"], "x")

    def test_failed_write_retries_and_leaves_no_half_line(self) -> None:
        """A write failing half-way is cut back, its messages retried; later lines stay whole."""
        harness = self.harness()
        handler = self.handler(harness)
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 0})))

        def half_then_full(fd: int, data: Any) -> int:
            if len(data) > 10:
                return os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handler.write = half_then_full
        settled = self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual(settled.outcome, "retried")
        self.assertIn("No space left on device", settled.reason or "")
        self.assertEqual([m.body["n"] for m in loads(self.path.read_text())], [0])
        handler.write = os.write
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 2})))
        self.assertEqual([m.body["n"] for m in loads(self.path.read_text())], [0, 2])

    def test_disk_full(self) -> None:
        """Writing to a full device retries the message."""
        if not os.path.exists("/dev/full"):
            raise self.skipTest("no /dev/full")
        harness = ConsumerHarness(RecordPlugin(), {"path": "/dev/full"})
        harness.start()
        settled = self.successResultOf(harness.deliver(Message.create(TOPIC, {})))
        self.assertEqual(settled.outcome, "retried")

    def test_relative_path_in_component_directory(self) -> None:
        """A relative path is taken in <state_dir>/components/<name>, created at start."""
        state = self.dir / "state"
        harness = ConsumerHarness(RecordPlugin(), {}, name="rec",
                                  hub=HubSettings(state_dir=str(state)))
        harness.start()
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"x": 1})))
        target = state / "components" / "rec" / "messages.jsonl"
        self.assertEqual(len(loads(target.read_text())), 1)
        self.assertEqual(target.stat().st_mode & 0o777, 0o640)

    def test_unopenable_path(self) -> None:
        """start() reports a file that can not be opened as a ConfigError naming the path."""
        blocker = self.dir / "a-file"
        blocker.write_text("")
        harness = ConsumerHarness(RecordPlugin(), {"path": str(blocker / "sub" / "x.jsonl")})
        with self.assertRaises(ConfigError) as caught:
            harness.handler.start()
        self.assertIn("a-file", str(caught.exception))

    def test_bad_options(self) -> None:
        """Negative intervals, a zero batch and a directory path are refused."""
        for options in ({"flush_interval": -1}, {"max_batch": 0}, {"fsync_every": -1},
                        {"fsync_interval": -0.5}, {"path": "dir/"}, {"path": ""}):
            self.assertRaises(ConfigError, ConsumerHarness, RecordPlugin(), options)

    def test_stop_writes_pending_and_closes(self) -> None:
        """
        Stopping writes the lines still waiting at once (not after the
        flush interval, which is longer than the drain timeout), so their
        messages are acknowledged; then it syncs when asked to and closes
        the file.
        """
        harness = self.harness({"flush_interval": 60.0, "fsync_interval": 60.0}, concurrency=5)
        handler = self.handler(harness)
        calls: list[int] = []
        handler.fsync = calls.append
        settled = [harness.deliver(Message.create(TOPIC, {"n": n})) for n in range(2)]
        stopped = harness.stop()
        self.assertEqual([self.successResultOf(d).outcome for d in settled], ["acked"] * 2)
        self.assertEqual(len(loads(self.path.read_text())), 2)
        self.successResultOf(stopped)
        self.assertEqual(harness.bus.queue_depth(harness.service.queue), 0)
        self.assertFalse(handler.is_open)
        self.assertEqual(len(calls), 1)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_stop_flushes_before_drain_ends(self) -> None:
        """A consumer stopped while lines wait for the interval still records them."""
        harness = self.harness({"flush_interval": 60.0}, concurrency=5)
        handler = self.handler(harness)
        harness.deliver(Message.create(TOPIC, {"n": 1}))
        handler.stop()
        self.assertEqual(len(loads(self.path.read_text())), 1)
        self.assertFalse(handler.is_open)

    def test_stop_closes_when_sync_fails(self) -> None:
        """A final sync that fails is reported, and the file is closed all the same."""
        harness = self.harness({"fsync_interval": 60.0})
        handler = self.handler(harness)
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual(descriptors_on(self.path), 1)

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        handler.fsync = failing
        self.assertRaises(OSError, handler.stop)
        self.assertFalse(handler.is_open)
        self.assertEqual(descriptors_on(self.path), 0)

    def test_reopen_when_sync_fails(self) -> None:
        """reopen() whose sync of the old file fails still closes it and opens the path again."""
        harness = self.harness({"fsync_interval": 60.0, "follow_rotation": False})
        handler = self.handler(harness)
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 0})))
        rotated = self.dir / "messages.jsonl.1"
        os.rename(self.path, rotated)

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        handler.fsync = failing
        self.assertRaises(OSError, handler.reopen)
        self.assertEqual(descriptors_on(rotated), 0)
        handler.fsync = lambda fd: None
        self.successResultOf(harness.deliver(Message.create(TOPIC, {"n": 1})))
        self.assertEqual([m.body["n"] for m in loads(self.path.read_text())], [1])
        self.assertEqual([m.body["n"] for m in loads(rotated.read_text())], [0])


def descriptors_on(path: Path) -> int:
    """
    How many file descriptors of this process are open on C{path}.
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                count += 1
        except OSError:
            # The descriptor listdir itself used is gone already.
            pass
    return count
