"""
Tests for L{fedhub.producers.bugzilla.producer.Quarantine}: its limits follow
the directory, each kept mail is on disk before it is answered, and the
blocking work runs in a thread, one mail at a time.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fedhub.producers.bugzilla.parser import NotBugmail
from fedhub.errors import TemporarilyUnavailable
from fedhub.producers.bugzilla.producer import (
    BugmailIntake,
    EventPublisher,
    Quarantine,
    classify_failure,
)
from tests.test_smtp_server import (
    NOT_BUGMAIL,
    FakePublisher,
    Harness,
    dot_stuffed,
    envelope,
    sample,
    topic,
)


class HeldThreads:
    """
    A C{run_in_thread} that keeps each call until the test runs it, as a
    thread pool would run it later.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run_next(self) -> None:
        """
        Run the oldest held call and fire its Deferred with the outcome.
        """
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback()
        else:
            d.callback(result)

    def run_all(self) -> None:
        """
        Run held calls, and those they lead to, until none is left.
        """
        while self.calls:
            self.run_next()


def mails(directory: str) -> list[str]:
    """
    The names of the kept mails in C{directory}.
    """
    return sorted(name for name in os.listdir(directory) if name.endswith(".eml"))


def empty(directory: str) -> None:
    """
    Remove everything from C{directory}, as an administrator would.
    """
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))


def fd_path(fd: int) -> str:
    """
    The path an open file descriptor refers to now.
    """
    return os.readlink(f"/proc/self/fd/{fd}")


class RecountTests(SynchronousTestCase):
    """
    The limits follow the directory: mail removed from it makes room again
    without a restart.
    """

    def test_room_after_emptied(self) -> None:
        """Once full, a quarantine that was emptied keeps mail again."""
        directory = self.mktemp()
        quarantine = Quarantine(directory, 2, 10**6, Clock())
        self.assertIsNotNone(quarantine.save(b"1", "r", "c", "s"))
        self.assertIsNotNone(quarantine.save(b"2", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"3", "r", "c", "s"))
        empty(directory)
        path = quarantine.save(b"4", "r", "c", "s")
        assert path is not None
        self.assertEqual(Path(path).read_bytes(), b"4")
        self.assertIsNotNone(quarantine.save(b"5", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"6", "r", "c", "s"))
        self.assertEqual(len(mails(directory)), 2)

    def test_bytes_freed(self) -> None:
        """Once max_bytes is reached, removing mail makes room for as many bytes again."""
        directory = self.mktemp()
        quarantine = Quarantine(directory, 100, 10, Clock())
        self.assertIsNotNone(quarantine.save(b"123456", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"12345", "r", "c", "s"))
        empty(directory)
        self.assertIsNotNone(quarantine.save(b"1234567890", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"1", "r", "c", "s"))

    def test_still_full(self) -> None:
        """A quarantine nobody emptied stays full, however often it is asked."""
        directory = self.mktemp()
        quarantine = Quarantine(directory, 1, 10**6, Clock())
        self.assertIsNotNone(quarantine.save(b"1", "r", "c", "s"))
        for _ in range(3):
            self.assertIsNone(quarantine.save(b"2", "r", "c", "s"))
        self.assertEqual(len(mails(directory)), 1)

    def test_partly_emptied(self) -> None:
        """Removing one mail of a full quarantine makes room for exactly one."""
        directory = self.mktemp()
        quarantine = Quarantine(directory, 2, 10**6, Clock())
        first = quarantine.save(b"1", "r", "c", "s")
        assert first is not None
        self.assertIsNotNone(quarantine.save(b"2", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"3", "r", "c", "s"))
        os.unlink(first)
        self.assertIsNotNone(quarantine.save(b"4", "r", "c", "s"))
        self.assertIsNone(quarantine.save(b"5", "r", "c", "s"))

    def test_smtp_answers_follow_directory(self) -> None:
        """Over SMTP, non-Bugzilla mail gets 250, then 550 when the quarantine is full, then 250 once it was emptied."""
        directory = self.mktemp()
        harness = Harness(quarantine_dir=directory, quarantine_max_files=1)
        self.addCleanup(harness.close_all)
        answers = []
        for emptied in (False, False, True):
            if emptied:
                empty(directory)
            client = harness.connect()
            client.send(envelope() + dot_stuffed(sample(NOT_BUGMAIL)))
            answers.append(client.codes()[-1])
            client.close()
        self.assertEqual(answers, [250, 550, 250])
        self.assertEqual(len(mails(directory)), 1)


class DurabilityTests(SynchronousTestCase):
    """
    A kept mail and its note are on disk (file and directory synced) before
    L{Quarantine.save} returns.
    """

    def setUp(self) -> None:
        self.directory = os.path.realpath(self.mktemp())
        os.makedirs(self.directory)
        self.events: list[tuple[str, str]] = []
        self.fail_fsync: Callable[[str], bool] = lambda path: False
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd: int) -> None:
            path = fd_path(fd)
            self.events.append(("fsync", path))
            if self.fail_fsync(path):
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        def rename(src: str, dst: str) -> None:
            self.events.append(("rename", os.path.realpath(dst)))
            real_rename(src, dst)

        def replace(src: str, dst: str) -> None:
            self.events.append(("rename", os.path.realpath(dst)))
            real_replace(src, dst)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        self.patch(os, "replace", replace)

    def test_synced_before_and_after_rename(self) -> None:
        """The note and the mail are each synced before being renamed into place, and the directory after both."""
        quarantine = Quarantine(self.directory, 10, 10**6, Clock())
        path = quarantine.save(b"mail", "r", "c", "s")
        assert path is not None
        note = path[: -len(".eml")] + ".json"
        self.assertEqual(
            self.events,
            [
                ("fsync", note + ".part"),
                ("rename", note),
                ("fsync", path + ".part"),
                ("rename", path),
                ("fsync", self.directory),
            ],
        )

    def test_created_directory_synced_in_parent(self) -> None:
        """A quarantine directory it creates is synced into its parent before the first mail is kept."""
        directory = os.path.join(self.directory, "q")
        path = Quarantine(directory, 10, 10**6, Clock()).save(b"mail", "r", "c", "s")
        assert path is not None
        self.assertEqual(self.events[0], ("fsync", self.directory))
        self.assertEqual(self.events[-1], ("fsync", directory))

    def test_mail_sync_fails(self) -> None:
        """When the mail can not be synced, save fails, leaves nothing behind and the mail does not count."""
        quarantine = Quarantine(self.directory, 1, 10**6, Clock())
        self.fail_fsync = lambda path: path.endswith(".eml.part")
        error = self.assertRaises(OSError, quarantine.save, b"mail", "r", "c", "s")
        self.assertEqual(error.errno, errno.EIO)
        self.assertEqual(os.listdir(self.directory), [])
        self.fail_fsync = lambda path: False
        self.assertIsNotNone(quarantine.save(b"mail", "r", "c", "s"))

    def test_directory_sync_fails(self) -> None:
        """When the directory can not be synced, save fails, removes the mail and its note, and the mail does not count."""
        quarantine = Quarantine(self.directory, 1, 10**6, Clock())
        self.fail_fsync = lambda path: path == self.directory
        self.assertRaises(OSError, quarantine.save, b"mail", "r", "c", "s")
        self.assertEqual(os.listdir(self.directory), [])
        self.fail_fsync = lambda path: False
        self.assertIsNotNone(quarantine.save(b"mail", "r", "c", "s"))


class ThreadTests(SynchronousTestCase):
    """
    L{Quarantine.keep} does the blocking work through C{run_in_thread}, one
    mail at a time, and the intake answers only once it is done.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.threads = HeldThreads()
        self.directory = self.mktemp()

    def quarantine(self, max_files: int = 5) -> Quarantine:
        return Quarantine(self.directory, max_files, 10**6, self.clock, run_in_thread=self.threads)

    def intake(self, quarantine: Quarantine) -> BugmailIntake:
        return BugmailIntake(EventPublisher(FakePublisher(), topic), clock=self.clock, quarantine=quarantine)

    def test_keep_waits_for_thread(self) -> None:
        """keep touches nothing until its work runs in the thread, then fires with the path of the kept mail."""
        d = self.quarantine().keep(b"mail", "r", "c", "s")
        self.assertNoResult(d)
        self.assertFalse(os.path.exists(self.directory))
        self.threads.run_all()
        path = self.successResultOf(d)
        assert path is not None
        self.assertEqual(Path(path).read_bytes(), b"mail")

    def test_one_at_a_time(self) -> None:
        """A second mail's work starts only after the first one's ended, so the limit holds."""
        quarantine = self.quarantine(max_files=1)
        first = quarantine.keep(b"1", "r", "c", "s")
        second = quarantine.keep(b"2", "r", "c", "s")
        self.assertEqual(len(self.threads.calls), 1)
        self.threads.run_next()
        self.assertIsNotNone(self.successResultOf(first))
        self.assertNoResult(second)
        self.threads.run_all()
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(len(mails(self.directory)), 1)

    def test_failure_releases(self) -> None:
        """A failed write fails its Deferred and lets the next mail through."""
        Path(self.directory).write_bytes(b"a file, not a directory")
        quarantine = self.quarantine()
        first = quarantine.keep(b"1", "r", "c", "s")
        second = quarantine.keep(b"2", "r", "c", "s")
        self.threads.run_all()
        self.failureResultOf(first, OSError)
        self.failureResultOf(second, OSError)

    def test_recount_in_thread(self) -> None:
        """When full, the directory is counted again in the thread, not at once."""
        quarantine = self.quarantine(max_files=1)
        self.threads.run_all()
        first = quarantine.keep(b"1", "r", "c", "s")
        self.threads.run_all()
        self.assertIsNotNone(self.successResultOf(first))
        empty(self.directory)
        d = quarantine.keep(b"2", "r", "c", "s")
        self.assertNoResult(d)
        self.threads.run_all()
        self.assertIsNotNone(self.successResultOf(d))

    def test_intake_answers_after_disk(self) -> None:
        """The intake accepts a quarantined mail only once it is written."""
        d = self.intake(self.quarantine()).receive(sample(NOT_BUGMAIL), "peer")
        self.assertNoResult(d)
        self.threads.run_all()
        accepted = self.successResultOf(d)
        self.assertEqual(accepted.outcome, "quarantined")
        self.assertEqual(Path(accepted.detail).read_bytes(), sample(NOT_BUGMAIL))

    def test_intake_write_fails(self) -> None:
        """
        When the write fails in the thread, the mail is refused for now,
        not for good (the fault is ours, not the mail's), and the error is
        logged.
        """
        Path(self.directory).write_bytes(b"a file, not a directory")
        d = self.intake(self.quarantine()).receive(sample(NOT_BUGMAIL), "peer")
        self.threads.run_all()
        refusal = classify_failure(self.failureResultOf(d, TemporarilyUnavailable).value)
        self.assertEqual((refusal.temporary, refusal.kind), (True, "unavailable"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_intake_disk_full(self) -> None:
        """A quarantine on a full disk answers as a full outbox does: storage, temporary (452)."""
        quarantine = self.quarantine()

        def full(*args: Any, **kwargs: Any) -> str:
            raise OSError(errno.ENOSPC, "No space left on device")

        quarantine.save = full  # type: ignore[method-assign]
        d = self.intake(quarantine).receive(sample(NOT_BUGMAIL), "peer")
        self.threads.run_all()
        refusal = classify_failure(self.failureResultOf(d, TemporarilyUnavailable).value)
        self.assertEqual((refusal.temporary, refusal.kind), (True, "storage"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_intake_full(self) -> None:
        """When the quarantine is full, the intake refuses the mail with its own reason."""
        intake = self.intake(self.quarantine(max_files=1))
        first = intake.receive(sample(NOT_BUGMAIL), "peer")
        self.threads.run_all()
        self.successResultOf(first)
        second = intake.receive(sample(NOT_BUGMAIL), "peer")
        self.threads.run_all()
        self.failureResultOf(second, NotBugmail)

    def test_smtp_250_after_disk(self) -> None:
        """Over SMTP, the 250 for a quarantined mail is sent only once the mail is written."""
        harness = Harness(intake=self.intake(self.quarantine()))
        self.addCleanup(harness.close_all)
        client = harness.connect()
        client.send(envelope() + dot_stuffed(sample(NOT_BUGMAIL)))
        self.assertEqual(client.codes()[-1], 354)
        self.threads.run_all()
        self.assertEqual(client.codes(), [250])
        self.assertEqual(len(mails(self.directory)), 1)


class ReactorThreadTests(TestCase):
    """
    With a real reactor, the quarantine's disk work runs in its thread pool.
    """

    @inlineCallbacks
    def test_not_on_reactor_thread(self) -> Generator[Deferred[Any], Any, None]:
        """Counting, writing and syncing a quarantined mail happen outside the reactor thread."""
        threads: list[int] = []
        real_fsync, real_scandir = os.fsync, os.scandir

        def fsync(fd: int) -> None:
            threads.append(threading.get_ident())
            real_fsync(fd)

        def scandir(path: Any) -> Any:
            threads.append(threading.get_ident())
            return real_scandir(path)

        self.patch(os, "fsync", fsync)
        self.patch(os, "scandir", scandir)
        quarantine = Quarantine(self.mktemp(), 5, 10**6, reactor)
        intake = BugmailIntake(EventPublisher(FakePublisher(), topic), clock=reactor, quarantine=quarantine)
        accepted = yield intake.receive(sample(NOT_BUGMAIL), "peer")
        self.assertEqual(accepted.outcome, "quarantined")
        self.assertGreaterEqual(len(threads), 2)
        self.assertNotIn(threading.get_ident(), threads)


class ConfigTests(SynchronousTestCase):
    """
    The C{quarantine_dir} key in a configuration.
    """

    def config(self, value: str, base: str) -> Any:
        from fedhub.config import parse_config

        text = (
            '[domains.d]\nbroker = "memory"\n'
            '[[producers]]\nname = "mail"\nplugin = "bugzilla-smtp"\ndomain = "d"\n'
            'recipients = ["bugs@hub.example"]\n'
            f'quarantine_dir = "{value}"\n'
        )
        return parse_config(text, base_dir=base)

    def test_relative_to_the_file(self) -> None:
        """A relative quarantine_dir is taken from the configuration file's directory, not the working directory."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config = self.config("q", base)
        self.assertEqual(config.producers[0].options["quarantine_dir"], os.path.join(base, "q"))

    def test_not_a_directory(self) -> None:
        """A quarantine_dir under a file is refused, naming the key."""
        from fedhub.errors import ConfigError

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        Path(base, "file").write_bytes(b"")
        error = self.assertRaises(ConfigError, self.config, "file/q", base)
        self.assertEqual([p.path for p in error.problems], ["producers[0].quarantine_dir"])
