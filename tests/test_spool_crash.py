"""
Tests for L{fedhub.outbox.spool.SpoolImporter} when the hub dies between
handing a spooled message to the outbox and deleting its spool file, or
when the file can not be deleted: how many messages are handed over twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fedhub.interfaces import IPublisher
from fedhub.message import Message
from fedhub.outbox import spool
from fedhub.outbox.spool import SUFFIX, SpoolImporter, write_spool
from fedhub.testing import RecordingPublisher
from tests.test_outbox import OutboxTestCase, make_message


class Died(Exception):
    """
    Ends what a dead process was waiting for, once the test is over.
    """


class Process:
    """
    The process an importer runs in.  Once it L{die}s, nothing it would do
    next happens: file work is not done, and the hand-over it waits for
    never comes back (until L{bury} ends the importer's scan, doing nothing).
    """

    def __init__(self) -> None:
        self.dead = False
        self.last_words: list[Deferred[None]] = []

    def run(self, importer: SpoolImporter) -> SpoolImporter:
        """
        Run an importer's file work in this process, in the calling thread,
        and mark it running.
        """

        def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
            if self.dead:
                return succeed(None)
            return maybeDeferred(fn, *args)

        importer._in_thread = in_thread  # type: ignore[method-assign]
        importer.running = True
        return importer

    def die(self) -> Deferred[None]:
        """
        Die now.

        @return: What the caller waiting on the process gets: nothing.
        """
        self.dead = True
        d: Deferred[None] = Deferred()
        self.last_words.append(d)
        return d

    def bury(self) -> None:
        """
        Let a scan the process was in when it died come to an end.
        """
        for d in self.last_words:
            d.errback(Died())


@implementer(IPublisher)
class DyingPublisher:
    """
    Passes hand-overs on to a real publisher; the process dies right after
    the hand-over numbered C{die_at} is done (durable).

    @ivar done: The Deferred of that last hand-over, as the publisher behind
        fired it.
    """

    def __init__(self, publisher: Any, process: Process, die_at: int) -> None:
        self.domain = publisher.domain
        self.publisher = publisher
        self.process = process
        self.die_at = die_at
        self.count = 0
        self.done: Deferred[None] | None = None

    def publish(self, message: Message) -> Deferred[None]:
        self.count += 1
        d: Deferred[None] = self.publisher.publish(message)
        if self.count == self.die_at:
            self.done = d
            return self.process.die()
        return d


def waiting(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


def synchronous(importer: SpoolImporter) -> SpoolImporter:
    """
    Run an importer's file work in the calling thread, and mark it running.
    """
    return Process().run(importer)


class CrashTests(SynchronousTestCase):
    """
    A crash right after a spooled message became durable in the outbox.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()

    def test_dying_publisher(self) -> None:
        """The fake used to die provides IPublisher."""
        self.assertTrue(verifyObject(IPublisher, DyingPublisher(RecordingPublisher("d"), Process(), 1)))

    def test_at_most_the_last_message_again(self) -> None:
        """Wherever in a batch the hub dies after a hand-over, the next start hands over that one message again and no other, and loses none."""
        count = 12
        for die_at in range(1, count + 1):
            directory = self.directory / str(die_at)
            messages = [make_message(n) for n in range(count)]
            for message in messages:
                write_spool(str(directory), message)
            first = RecordingPublisher("d")
            process = Process()
            dying = DyingPublisher(first, process, die_at)
            d = process.run(SpoolImporter("d", str(directory), dying, Clock()))._import()
            self.assertNoResult(d)
            assert dying.done is not None
            self.successResultOf(dying.done)
            self.assertEqual(first.published, messages[:die_at])
            process.bury()
            self.failureResultOf(d, Died)

            second = RecordingPublisher("d")
            self.successResultOf(synchronous(SpoolImporter("d", str(directory), second, Clock()))._import())
            self.assertEqual(second.published, messages[die_at - 1 :], f"died after hand-over {die_at}")
            self.assertEqual(waiting(directory), [])


class OutboxCrashTests(OutboxTestCase):
    """
    The same crash with the real outbox and its SQLite store.
    """

    def test_store_holds_one_copy_again_at_most(self) -> None:
        """After dying in the middle of a batch, the restarted hub stores only the message handed over last a second time."""
        spool_dir = os.path.abspath(os.path.join(self.mktemp(), "spool", "test"))
        messages = [make_message(n) for n in range(8)]
        for message in messages:
            write_spool(spool_dir, message)
        outbox, _ = self.make()
        process = Process()
        dying = DyingPublisher(outbox, process, 5)
        d = process.run(SpoolImporter("test", spool_dir, dying, self.clock))._import()
        self.assertNoResult(d)
        assert dying.done is not None
        self.successResultOf(dying.done)
        process.bury()
        self.failureResultOf(d, Died)
        # The outbox's own stop stands for what survives the crash: every
        # commit so far, with nothing confirmed by the broker.
        self.stop(outbox, None)
        ids = [m.id for m in messages]
        self.assertEqual(self.pending_ids(), ids[:5])

        restarted, _ = self.make()
        self.successResultOf(synchronous(SpoolImporter("test", spool_dir, restarted, self.clock))._import())
        self.stop(restarted, None)
        self.assertEqual(self.pending_ids(), ids[:5] + ids[4:])
        self.assertEqual(os.listdir(spool_dir), [])


class RemovalFailureTests(SynchronousTestCase):
    """
    A spool file whose message was handed over but which can not be deleted.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.publisher = RecordingPublisher("d")
        self.importer = synchronous(SpoolImporter("d", str(self.directory), self.publisher, Clock()))
        self.logged: list[dict[str, object]] = []
        self.importer.log = Logger(observer=cast(ILogObserver, self.logged.append))

    def failing_removal(self, error: OSError) -> list[OSError]:
        """
        Make deleting spool files fail with C{error} while the returned list
        holds it.
        """
        errors = [error]
        run = self.importer._in_thread

        def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
            if fn is spool._remove and errors:
                return maybeDeferred(self._raise, errors[0])
            return run(fn, *args)

        self.importer._in_thread = in_thread  # type: ignore[method-assign]
        return errors

    @staticmethod
    def _raise(error: OSError) -> None:
        raise error

    def test_not_handed_over_again(self) -> None:
        """A message whose file can not be deleted is not handed over again by later scans, and its file is deleted once that works; the scan stops with the error meanwhile."""
        messages = [Message.create("a", {"n": n}) for n in range(3)]
        for message in messages:
            write_spool(str(self.directory), message)
        errors = self.failing_removal(PermissionError(13, "Permission denied"))
        self.failureResultOf(self.importer._import(), PermissionError)
        self.failureResultOf(self.importer._import(), PermissionError)
        self.assertEqual(self.publisher.published, messages[:1])
        self.assertEqual(len(waiting(self.directory)), 3)
        errors.clear()
        self.successResultOf(self.importer._import())
        self.assertEqual(self.publisher.published, messages)
        self.assertEqual(self.importer.imported, 3)
        self.assertEqual(waiting(self.directory), [])

    def test_scan_logs_removal_failure(self) -> None:
        """A scan stopped by a file it can not delete logs the error, and the next scan runs."""
        write_spool(str(self.directory), Message.create("a", {}))
        errors = self.failing_removal(OSError(30, "Read-only file system"))
        self.successResultOf(self.importer._scan())
        self.assertEqual(len(self.publisher.published), 1)
        self.assertTrue(
            any("Read-only file system" in str(e.get("log_failure")) for e in self.logged)
        )
        errors.clear()
        self.successResultOf(self.importer._scan())
        self.assertEqual(len(self.publisher.published), 1)
        self.assertEqual(waiting(self.directory), [])
