"""
Tests for L{fedhub.outbox.spool}: the durable hand-over from other processes
to a running hub.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fedhub.errors import PublishError, TemporarilyUnavailable
from fedhub.message import Message
from fedhub.outbox import spool
from fedhub.outbox.spool import SUFFIX, SpoolImporter, spool_directory, write_spool
from fedhub.testing import RecordingPublisher


class SizeLimitedPublisher(RecordingPublisher):
    """
    A publisher that, like the outbox, refuses for good a message larger
    than everything it may hold.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__("d")
        self.max_bytes = max_bytes

    def publish(self, message: Message) -> Deferred[None]:
        if len(message.body_bytes) > self.max_bytes:
            return fail(PublishError("larger than the whole outbox", message.id))
        return super().publish(message)


def waiting(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


class WriteTests(SynchronousTestCase):
    """
    L{write_spool}.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute() / "spool" / "d"

    def test_durable_file(self) -> None:
        """A message becomes one private file holding its serialized form; no temporary file stays."""
        message = Message.create("a.b", {"x": 1})
        path = Path(write_spool(str(self.directory), message))
        self.assertEqual(waiting(self.directory), [path])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.directory).st_mode & 0o777, 0o700)
        self.assertEqual([p.name for p in self.directory.iterdir() if p.name.startswith(".")], [])

    def test_names_keep_order(self) -> None:
        """Files sort in hand-over order."""
        ids = [write_spool(str(self.directory), Message.create("a", {"n": n})) for n in range(20)]
        self.assertEqual([str(p) for p in waiting(self.directory)], ids)

    def test_bounded(self) -> None:
        """Past max_files the hand-over fails temporarily and writes nothing."""
        write_spool(str(self.directory), Message.create("a", {}), max_files=2)
        write_spool(str(self.directory), Message.create("a", {}), max_files=2)
        error = self.assertRaises(
            TemporarilyUnavailable, write_spool, str(self.directory), Message.create("a", {}), 2
        )
        self.assertIn("limit 2", error.reason)
        self.assertEqual(len(waiting(self.directory)), 2)

    def test_unusable_directory(self) -> None:
        """A spool path that can not be a directory fails temporarily."""
        blocker = Path(self.mktemp()).absolute()
        blocker.write_text("a file, not a directory")
        self.assertRaises(TemporarilyUnavailable, write_spool, str(blocker / "d"), Message.create("a", {}))

    def test_directory_layout(self) -> None:
        """Each domain has its own spool under the state directory."""
        self.assertEqual(spool_directory("/s", "infra"), "/s/spool/infra")


class ImportTests(SynchronousTestCase):
    """
    L{SpoolImporter} run synchronously.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.publisher = RecordingPublisher("d")
        self.importer = SpoolImporter("d", str(self.directory), self.publisher, Clock(), batch=3)
        self.importer._in_thread = lambda fn, *a: maybeDeferred(fn, *a)  # type: ignore[method-assign]
        self.importer.running = True

    def test_imports_in_order_and_deletes(self) -> None:
        """Every spooled message is handed over in order, in batches, and its file deleted."""
        messages = [Message.create("a", {"n": n}) for n in range(7)]
        for message in messages:
            write_spool(str(self.directory), message)
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, messages)
        self.assertEqual(waiting(self.directory), [])
        self.assertEqual(self.importer.imported, 7)

    def test_file_kept_until_durable(self) -> None:
        """A file is deleted only after the outbox's hand-over fired."""
        write_spool(str(self.directory), Message.create("a", {}))
        self.publisher.hold = True
        d = self.importer._import()
        self.assertNoResult(d)
        self.assertEqual(len(waiting(self.directory)), 1)
        self.publisher.waiting[0][1].callback(None)
        self.successResultOf(d)
        self.assertEqual(waiting(self.directory), [])

    def test_outbox_full_keeps_files(self) -> None:
        """When the outbox takes no more, the files stay for the next scan."""
        for n in range(2):
            write_spool(str(self.directory), Message.create("a", {"n": n}))
        self.publisher.refuse_with = TemporarilyUnavailable("outbox full")
        self.successResultOf(self.importer._import())
        self.assertEqual(len(waiting(self.directory)), 2)
        self.publisher.refuse_with = None
        self.successResultOf(self.importer._import())
        self.assertEqual(len(self.publisher.published), 2)

    def test_outbox_full_logged_once(self) -> None:
        """
        A full outbox is logged when the spool starts waiting, not on every
        scan while it waits; once files go in again that is logged, and a
        later wait is logged anew.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def said(text: str) -> int:
            return sum(1 for e in events if text in e.get("log_format", ""))

        write_spool(str(self.directory), Message.create("a", {}))
        self.publisher.refuse_with = TemporarilyUnavailable("outbox full")
        for _ in range(5):
            self.successResultOf(self.importer._import())
        self.assertEqual(said("takes no more for now"), 1)
        self.publisher.refuse_with = None
        self.successResultOf(self.importer._import())
        self.assertEqual(said("takes spooled messages again"), 1)
        write_spool(str(self.directory), Message.create("a", {}))
        self.publisher.refuse_with = TemporarilyUnavailable("outbox full")
        self.successResultOf(self.importer._import())
        self.assertEqual(said("takes no more for now"), 2)

    def test_bad_file_quarantined(self) -> None:
        """A file that holds no valid message is renamed *.bad and the rest still imported."""
        (self.directory).mkdir(parents=True)
        (self.directory / f"0000-bad{SUFFIX}").write_bytes(b'{"topic": "a", "body": [1]}\n')
        write_spool(str(self.directory), Message.create("a", {}))
        self.successResultOf(self.importer._import())
        self.assertEqual(len(self.publisher.published), 1)
        self.assertEqual(self.importer.rejected, 1)
        self.assertTrue((self.directory / f"0000-bad{SUFFIX}.bad").exists())
        self.assertEqual(waiting(self.directory), [])

    def test_bad_file_with_undecodable_name_logged_escaped(self) -> None:
        """
        A bad file whose name is not UTF-8 is set aside all the same, and
        its name is escaped in the log line: no raw byte reaches the log.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.directory.mkdir(parents=True)
        name = os.fsencode(str(self.directory)) + b"/0000-\xff" + os.fsencode(SUFFIX)
        with open(name, "wb") as f:
            f.write(b'{"topic": "a", "body": [1]}\n')
        self.successResultOf(self.importer._import())
        self.assertEqual(self.importer.rejected, 1)
        self.assertTrue(os.path.exists(name + b".bad"))
        (line,) = [formatEvent(e) for e in events if "holds no valid message" in e.get("log_format", "")]
        line.encode("utf-8")  # no lone surrogate left of the byte
        self.assertIn("0000-\\udcff", line)

    def test_message_too_large_for_outbox_quarantined(self) -> None:
        """A spooled message larger than the whole outbox is set aside; the files after it are still imported."""
        outbox = SizeLimitedPublisher(max_bytes=1000)
        self.importer.publisher = outbox
        big = Message.create("a", {"x": "y" * 5000})
        small = [Message.create("a", {"n": n}) for n in range(4)]
        write_spool(str(self.directory), small[0])
        big_path = write_spool(str(self.directory), big)
        for message in small[1:]:
            write_spool(str(self.directory), message)
        self.successResultOf(self.importer._import())
        self.assertEqual(outbox.published, small)
        self.assertEqual(self.importer.rejected, 1)
        self.assertTrue(os.path.exists(big_path + ".bad"))
        self.assertEqual(waiting(self.directory), [])

    def test_huge_file_quarantined_unread(self) -> None:
        """A spool file larger than the importer reads is set aside as too large, not misread as broken JSON."""
        self.patch(spool, "MAX_FILE_BYTES", 4096)
        big_path = write_spool(str(self.directory), Message.create("a", {"x": "y" * 5000}))
        small = Message.create("a", {})
        write_spool(str(self.directory), small)
        logged: list[dict[str, object]] = []
        self.importer.log = Logger(observer=logged.append)
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, [small])
        self.assertEqual(self.importer.rejected, 1)
        self.assertTrue(os.path.exists(big_path + ".bad"))
        self.assertIn("larger than 4096 bytes", [str(e.get("reason")) for e in logged])

    def test_batch_bounded_in_bytes(self) -> None:
        """A batch of large spool files is read a bounded number of bytes at a time, and every file is still imported in order."""
        self.patch(spool, "BATCH_BYTES", 3000)
        self.importer.batch = 100
        messages = [Message.create("a", {"x": "y" * 1000, "n": n}) for n in range(7)]
        for message in messages:
            write_spool(str(self.directory), message)
        read = spool._read_batch
        sizes: list[int] = []

        def recording(directory: str, limit: int, *rest: Any) -> Any:
            batch = read(directory, limit, *rest)
            sizes.append(sum(len(data or b"") for _, data in batch))
            return batch

        self.patch(spool, "_read_batch", recording)
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, messages)
        self.assertEqual(waiting(self.directory), [])
        self.assertGreater(len(sizes), 2)
        self.assertLessEqual(max(sizes), 3000)

    def test_vanished_file_skipped(self) -> None:
        """A file that disappears before it can be set aside is logged and skipped; the scan goes on."""
        self.directory.mkdir(parents=True)
        bad = self.directory / f"0000-bad{SUFFIX}"
        bad.write_bytes(b"not json\n")
        good = Message.create("a", {})
        write_spool(str(self.directory), good)
        run = self.importer._in_thread

        def vanishing(fn: Any, *args: Any) -> Deferred[Any]:
            if fn is spool._quarantine:
                # Someone else took the file in the meantime.
                os.unlink(args[0])
            return run(fn, *args)

        self.importer._in_thread = vanishing  # type: ignore[method-assign]
        logged: list[dict[str, object]] = []
        self.importer.log = Logger(observer=logged.append)
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, [good])
        self.assertEqual(waiting(self.directory), [])
        self.assertFalse((self.directory / f"0000-bad{SUFFIX}.bad").exists())
        self.assertEqual(self.importer.rejected, 0)
        self.assertIn(str(bad), [str(e.get("path")) for e in logged])

    def test_unreadable_file_skipped_and_logged_once(self) -> None:
        """
        A spool file that can not be read (here a directory by a spool
        file's name; in practice a file written by another user) does not
        hold up the files after it, even when there are more such files than
        a batch: it is logged once while it stays unreadable, not at every
        scan, and taken in once it can be read.  Found unreadable again after
        that, it is logged again.
        """
        self.directory.mkdir(parents=True)
        blocked = [self.directory / f"000{n}-blocked{SUFFIX}" for n in range(4)]
        for path in blocked:
            path.mkdir()
        messages = [Message.create("a", {"n": n}) for n in range(5)]
        for message in messages:
            write_spool(str(self.directory), message)
        logged: list[dict[str, Any]] = []
        self.importer.log = Logger(observer=logged.append)

        def complaints() -> list[str]:
            return [str(e["path"]) for e in logged if "can not be read" in e["log_format"]]

        for _ in range(3):
            self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, messages)
        self.assertEqual(sorted(complaints()), sorted(str(p) for p in blocked))
        self.assertEqual(self.importer.unreadable, 4)
        self.assertEqual({e["log_level"].name for e in logged}, {"error"})

        # The first becomes a readable spool file: it is taken in.
        late = Message.create("a", {"late": True})
        blocked[0].rmdir()
        write_spool(str(self.directory), late)
        os.rename(waiting(self.directory)[-1], blocked[0])
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, messages + [late])
        self.assertEqual(self.importer.unreadable, 3)
        self.assertFalse(blocked[0].exists())
        # Unreadable again: logged again.
        blocked[0].mkdir()
        self.successResultOf(self.importer._import())
        self.assertEqual(complaints().count(str(blocked[0])), 2)
        self.assertEqual(len(complaints()), 5)

    def test_stale_temporary_files_removed(self) -> None:
        """
        Temporary files a writer killed half-way left behind are removed by
        the running hub's scans, every PRUNE_INTERVAL seconds, once they are
        older than STALE_AFTER; a recent one (a writer at work) stays.
        """
        self.directory.mkdir(parents=True)
        old = self.directory / ".0001-1-1.tmp"
        recent = self.directory / ".0002-1-1.tmp"
        for path in (old, recent):
            path.write_bytes(b"half a message")
        aged = time.time() - spool.STALE_AFTER - 10
        os.utime(old, (aged, aged))
        self.successResultOf(self.importer._import())
        self.assertFalse(old.exists())
        self.assertTrue(recent.exists())
        # Aged since: removed at the first scan PRUNE_INTERVAL later, not before.
        os.utime(recent, (aged, aged))
        clock = self.importer.reactor
        clock.advance(spool.PRUNE_INTERVAL - 1)
        self.successResultOf(self.importer._import())
        self.assertTrue(recent.exists())
        clock.advance(1)
        self.successResultOf(self.importer._import())
        self.assertFalse(recent.exists())

    def test_missing_directory(self) -> None:
        """A spool that does not exist yet is simply empty."""
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, [])


class ServiceTests(TestCase):
    """
    L{SpoolImporter} as a service with its thread and the real reactor.
    """

    @inlineCallbacks
    def test_picks_up_new_files(self) -> None:
        """Files written while the hub runs are imported at the next scan; stopping is clean (twice too)."""
        directory = Path(self.mktemp()).absolute()
        publisher = RecordingPublisher("d")
        importer = SpoolImporter("d", str(directory), publisher, reactor, interval=0.05)
        importer.startService()
        message = Message.create("a", {})
        write_spool(str(directory), message)
        for _ in range(100):
            if publisher.published:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(publisher.published, [message])
        yield importer.stopService()
        yield importer.stopService()

    @inlineCallbacks
    def test_restart(self) -> None:
        """An importer stopped and started again imports the files written meanwhile."""
        directory = Path(self.mktemp()).absolute()
        publisher = RecordingPublisher("d")
        importer = SpoolImporter("d", str(directory), publisher, reactor, interval=0.05)
        importer.startService()
        yield importer.stopService()
        importer.startService()
        message = Message.create("a", {})
        write_spool(str(directory), message)
        for _ in range(100):
            if publisher.published:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        yield importer.stopService()
        self.assertEqual(publisher.published, [message])
        self.assertEqual(waiting(directory), [])
