"""
Tests for L{fedhub.cli.inject_mail}: one mail in, a message to a (fake)
publisher out, and the exit status procmail or Postfix act on (0 accepted,
75 retry later, 65 never), with a one-line reason on standard error.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli import inject_mail
from fedhub.cli.inject_mail import (
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    SeenFile,
    add_arguments,
    run,
)
from fedhub.config import Config
from fedhub.errors import TemporarilyUnavailable
from fedhub.interfaces import IPublisher
from fedhub.message import loads
from fedhub.outbox import spool
from fedhub.outbox.spool import SpoolImporter
from fedhub.testing import RecordingPublisher
from tests.test_smtp_server import CHANGED, NEW, NOT_BUGMAIL, FakePublisher, copy_for, sample

#: The seam as shipped, before any test replaces it.
REAL_OPEN_PUBLISHER = inject_mail.open_publisher

PRODUCER = """
[[producers]]
name = "{name}"
plugin = "bugzilla-smtp"
domain = "community"
recipients = ["bugs@example.org"]
max_message_size = 65536
{extra}
"""


class InjectTestCase(SynchronousTestCase):
    """
    Writes a configuration, swaps in a fake publisher and captures stderr.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir(parents=True)
        self.publisher = FakePublisher()
        self.opened: list[tuple[Config, str]] = []

        def fake_open(config: Config, producer_name: str) -> IPublisher:
            self.opened.append((config, producer_name))
            return self.publisher

        self.patch(inject_mail, "open_publisher", fake_open)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.config = self.write_config()

    def write_config(self, producers: str | None = None) -> str:
        if producers is None:
            producers = PRODUCER.format(name="bugzilla-mail", extra="")
        text = (
            f'[hub]\ntopic_prefix = "org.example"\nenvironment = "prod"\n'
            f'state_dir = "{self.directory / "state"}"\n\n'
            '[domains.community]\nbroker = "memory"\n' + producers
        )
        path = self.directory / "hub.toml"
        path.write_text(text)
        return str(path)

    def mail(self, raw: bytes, name: str = "mail.eml") -> str:
        path = self.directory / name
        path.write_bytes(raw)
        return str(path)

    def inject(self, raw: bytes | None, *extra: str) -> int:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        argv = ["--config", self.config, *extra]
        if raw is not None:
            argv += ["--input", self.mail(raw)]
        return run(parser.parse_args(argv))

    def error_lines(self) -> list[str]:
        return self.stderr.getvalue().splitlines()


class ExitStatusTests(InjectTestCase):
    """
    What each kind of mail and failure exits with.
    """

    def test_bugmail_accepted(self) -> None:
        """A bugmail exits 0 and is published once on the configured hub's topic, silently."""
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        [message] = self.publisher.published
        self.assertEqual(message.topic, "org.example.prod.bugzilla.bug.update")
        self.assertEqual(message.body["bug_id"], 218297)
        self.assertEqual(self.opened[0][1], "bugzilla-mail")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_lf_and_mbox_from_line(self) -> None:
        """A mail with LF line ends and procmail's leading "From " line is accepted."""
        raw = b"From bugzilla-daemon@example.org Thu Feb  1 04:36:30 2024\n" + (
            sample(NEW).replace(b"\r\n", b"\n")
        )
        self.assertEqual(self.inject(raw), EX_OK)
        self.assertEqual(self.publisher.published[0].topic, "org.example.prod.bugzilla.bug.new")

    def test_copies_across_runs_published_once(self) -> None:
        """Copies of one event injected by separate runs are published once; all exit 0."""
        raw = sample(CHANGED)
        for n in range(3):
            self.assertEqual(self.inject(copy_for(raw, f"u{n}@example.net", f"id-{n}@x")), EX_OK)
        self.assertEqual(len(self.publisher.published), 1)
        seen = self.directory / "state" / "components" / "bugzilla-mail" / "inject-mail.seen"
        self.assertEqual(len(seen.read_text().splitlines()), 1)

    def test_no_dedup_with_zero_window(self) -> None:
        """With dedup_window = 0 every run publishes (with the same message id)."""
        self.config = self.write_config(PRODUCER.format(name="bugzilla-mail", extra="dedup_window = 0"))
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        first, second = self.publisher.published
        self.assertEqual(first.id, second.id)

    def test_not_bugmail_65(self) -> None:
        """Mail that is not Bugzilla's exits 65 with the reason on one line."""
        self.assertEqual(self.inject(sample(NOT_BUGMAIL)), EX_DATAERR)
        [line] = self.error_lines()
        self.assertTrue(line.startswith("fedhub inject-mail: Launchpad bug mail"), line)
        self.assertEqual(self.publisher.published, [])

    def test_malformed_65(self) -> None:
        """Bugzilla mail that can not be understood exits 65."""
        raw = b"X-Bugzilla-Type: changed\nX-Bugzilla-URL: https://b.example/\nSubject: hi\n\nbody\n"
        self.assertEqual(self.inject(raw), EX_DATAERR)
        self.assertEqual(len(self.error_lines()), 1)

    def test_too_large_65(self) -> None:
        """A mail larger than the producer's max_message_size exits 65 without being parsed."""
        self.assertEqual(self.inject(sample(CHANGED) + b"x" * 65536), EX_DATAERR)
        self.assertEqual(self.error_lines(), ["fedhub inject-mail: the mail is larger than 65536 bytes"])

    def test_empty_65(self) -> None:
        """An empty input exits 65."""
        self.assertEqual(self.inject(b"\n"), EX_DATAERR)

    def test_temporarily_unavailable_75(self) -> None:
        """A publisher failing with TemporarilyUnavailable exits 75 with its reason, and the event is not remembered."""
        self.publisher.failure = TemporarilyUnavailable("the outbox of domain community is full")
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertEqual(self.error_lines(), ["fedhub inject-mail: the outbox of domain community is full"])
        self.publisher.failure = None
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        self.assertEqual(len(self.publisher.published), 1)

    def test_open_failure_75(self) -> None:
        """When no publisher can be opened the run exits 75."""
        def refuse(config: Config, name: str) -> IPublisher:
            raise TemporarilyUnavailable("the hub is stopped")

        self.patch(inject_mail, "open_publisher", refuse)
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertEqual(self.error_lines(), ["fedhub inject-mail: the hub is stopped"])

    def test_spooled_for_the_hub(self) -> None:
        """The real publisher writes the message durably into the domain's spool, which a hub imports."""
        self.patch(inject_mail, "open_publisher", REAL_OPEN_PUBLISHER)
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        directory = self.directory / "state" / "spool" / "community"
        [path] = [p for p in directory.iterdir() if p.name.endswith(".msg")]
        [message] = loads(path.read_bytes())
        self.assertEqual(message.topic, "org.example.prod.bugzilla.bug.update")
        publisher = RecordingPublisher("community")
        importer = SpoolImporter("community", str(directory), publisher, Clock())
        importer._in_thread = lambda fn, *a: maybeDeferred(fn, *a)  # type: ignore[method-assign]
        importer.running = True
        self.successResultOf(importer._import())
        self.assertEqual(publisher.published, [message])
        self.assertEqual([p for p in directory.iterdir() if p.name.endswith(".msg")], [])

    def test_full_spool_75(self) -> None:
        """When the spool is full (the hub is not taking mail), the run exits 75: the mail stays queued."""
        self.patch(inject_mail, "open_publisher", REAL_OPEN_PUBLISHER)
        self.patch(inject_mail, "write_spool", lambda d, m: spool.write_spool(d, m, max_files=1))
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        self.assertEqual(self.inject(sample(NEW)), EX_TEMPFAIL)
        self.assertIn("is the hub running?", self.error_lines()[0])

    def test_unexpected_error_75(self) -> None:
        """An unexpected exception exits 75 so the mail is retried."""
        self.publisher.failure = RuntimeError("surprise")
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertIn("RuntimeError", self.error_lines()[0])

    def test_control_characters_escaped(self) -> None:
        """A reason holding control characters is printed as one escaped line."""
        self.publisher.failure = TemporarilyUnavailable("full\n\x1b[2Jforged line")
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertEqual(len(self.error_lines()), 1)
        self.assertNotIn("\x1b", self.stderr.getvalue())

    def test_publisher_closed(self) -> None:
        """A publisher with a close() method is closed after the hand-over."""
        closed: list[bool] = []

        class Closing(FakePublisher):
            def close(self) -> Deferred[None]:
                closed.append(True)
                return succeed(None)

        self.publisher = Closing()
        self.assertEqual(self.inject(sample(CHANGED)), EX_OK)
        self.assertEqual(closed, [True])

    def test_no_standard_input_75(self) -> None:
        """Run with standard input closed, the run exits 75 with one line saying so, not a traceback."""
        self.patch(sys, "stdin", None)
        self.assertEqual(self.inject(None), EX_TEMPFAIL)
        self.assertEqual(self.error_lines(),
                         ["fedhub inject-mail: can not read the mail: no standard input"])

    def test_missing_input_file_66(self) -> None:
        """An --input file that can not be opened exits 66 (EX_NOINPUT): trying again would not help."""
        missing = os.path.join(self.mktemp(), "nothing.eml")
        self.assertEqual(self.inject(None, "--input", missing), inject_mail.EX_NOINPUT)
        self.assertEqual(self.error_lines(),
                         [f"fedhub inject-mail: can not read the mail: {missing}: No such file or directory"])

    def test_unexpected_synchronous_error_75(self) -> None:
        """An unexpected exception raised before the hand-over exits 75 with one line, so the mail is retried, never bounced."""
        def broken(*args: object, **kwargs: object) -> Deferred[object]:
            raise RuntimeError("surprise\nsecond line")

        self.patch(inject_mail, "inject", broken)
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertEqual(self.error_lines(),
                         ["fedhub inject-mail: unexpected error: RuntimeError: surprise\\nsecond line"])

    def test_stdin(self) -> None:
        """Without --input the mail is read from standard input."""
        stdin: Any = io.TextIOWrapper(io.BytesIO(sample(CHANGED)))
        self.patch(sys, "stdin", stdin)
        self.assertEqual(self.inject(None), EX_OK)
        self.assertEqual(len(self.publisher.published), 1)


class ConfigurationTests(InjectTestCase):
    """
    Configuration problems are temporary: the mail waits until they are fixed.
    """

    def test_bad_command_line(self) -> None:
        """
        A command line with a mistake (in master.cf, say) exits 75, not
        argparse's 2, on which a mail server bounces the mail; other
        commands keep 2, and --help 0.
        """
        from fedhub.cli.main import main

        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main(["inject-mail", "--timeout", "60s"]), EX_TEMPFAIL)
        self.assertEqual(main(["inject-mail", "--no-such-option"]), EX_TEMPFAIL)
        self.assertIn("--timeout: not a number: '60s'", sys.stderr.getvalue())
        with self.assertRaises(SystemExit) as other:
            main(["publish", "--no-such-option"])
        self.assertEqual(other.exception.code, 2)
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as helped:
            main(["inject-mail", "--help"])
        self.assertEqual(helped.exception.code, 0)

    def test_timeout_must_be_positive(self) -> None:
        """
        A --timeout that is not a finite number of seconds greater than 0 is
        a mistake in the command line (75, the mail waits): a negative one
        would end an asynchronous hand-over (enrichment) with a traceback
        and status 1, on which a mail server bounces the mail.
        """
        from fedhub.cli.main import build_parser

        self.patch(sys, "stderr", io.StringIO())
        for value in ("-1", "0", "nan", "inf"):
            with self.assertRaises(SystemExit, msg=value):
                build_parser().parse_args(["inject-mail", "--timeout", value])
        self.assertEqual(build_parser().parse_args(["inject-mail", "--timeout", "0.5"]).timeout, 0.5)

    def test_missing_file(self) -> None:
        """An unreadable configuration exits 75."""
        self.config = str(self.directory / "absent.toml")
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertEqual(len(self.error_lines()), 1)

    def test_invalid_file(self) -> None:
        """An invalid configuration exits 75 naming the problem."""
        self.config = self.write_config(PRODUCER.format(name="bugzilla-mail", extra="max_recipients = 0"))
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertIn("max_recipients", self.error_lines()[0])

    def test_no_producer(self) -> None:
        """A configuration without a bugzilla-smtp producer exits 75."""
        self.config = self.write_config("")
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertTrue(self.error_lines()[0].endswith("the configuration has no bugzilla-smtp "
                                                       "producer"), self.error_lines())

    def test_choose_producer(self) -> None:
        """With two producers, --producer picks one; without it the run exits 75."""
        self.config = self.write_config(
            PRODUCER.format(name="one", extra="") + PRODUCER.format(name="two", extra="")
        )
        self.assertEqual(self.inject(sample(CHANGED)), EX_TEMPFAIL)
        self.assertIn("name the bugzilla-smtp producer to use with --producer (found: one, two)",
                      self.error_lines()[-1])
        self.assertEqual(self.inject(sample(CHANGED), "--producer", "two"), EX_OK)
        self.assertEqual(self.opened[-1][1], "two")
        self.assertEqual(self.inject(sample(NEW), "--producer", "three"), EX_TEMPFAIL)


class SeenFileTests(SynchronousTestCase):
    """
    L{SeenFile}.
    """

    def test_window_and_bound(self) -> None:
        """Keys expire after the window and at most max_entries are kept."""
        now = [1000.0]
        path = os.path.join(self.mktemp(), "sub", "seen")
        seen = SeenFile(path, 10.0, 2, now=lambda: now[0])
        self.assertFalse(seen.seen("a"))
        seen.add("a")
        seen.add("b")
        self.assertTrue(seen.seen("a"))
        seen.add("c")
        self.assertFalse(seen.seen("a"))
        now[0] += 11
        self.assertFalse(seen.seen("c"))
        self.assertEqual(Path(path).read_text(), "1000.000 b\n1000.000 c\n")

    def test_unusable_path(self) -> None:
        """When the file can not be created, nothing is remembered and a warning is given."""
        blocker = self.mktemp()
        Path(blocker).write_text("file")
        warnings: list[str] = []
        seen = SeenFile(os.path.join(blocker, "seen"), 10.0, 5, warn=warnings.append)
        seen.add("a")
        self.assertFalse(seen.seen("a"))
        self.assertEqual(len(warnings), 1)

    def test_copy_handed_over_meanwhile_found(self) -> None:
        """
        A run that did not find its event keeps the file locked until it
        added it: another run with a copy of the event waits, then finds it
        (Bugzilla mails every recipient a copy at once).
        """
        path = self.mktemp()
        first, second = SeenFile(path, 10.0, 5), SeenFile(path, 10.0, 5)
        self.assertFalse(first.seen("k"))
        found: list[bool] = []
        waiting = threading.Thread(target=lambda: found.append(second.seen("k")))
        waiting.start()
        time.sleep(0.2)
        self.assertEqual(found, [])
        first.add("k")
        waiting.join(5)
        self.assertEqual(found, [True])

    def test_released_without_adding(self) -> None:
        """A failed hand-over lets the lock go: the next run is not held up, and finds nothing."""
        path = self.mktemp()
        first, second = SeenFile(path, 10.0, 5), SeenFile(path, 10.0, 5)
        self.assertFalse(first.seen("k"))
        first.release()
        self.assertFalse(second.seen("k"))

    def test_held_too_long(self) -> None:
        """A lock held past SEEN_LOCK_WAIT is given up on with a warning: the mail still goes."""
        self.patch(inject_mail, "SEEN_LOCK_WAIT", 0.05)
        path = self.mktemp()
        warnings: list[str] = []
        first, second = SeenFile(path, 10.0, 5), SeenFile(path, 10.0, 5, warn=warnings.append)
        first.add("k")
        self.assertFalse(first.seen("other"))
        self.assertFalse(second.seen("k"))
        second.add("k")
        self.assertEqual(len(warnings), 1)
        self.assertIn("stayed locked by another inject-mail", warnings[0])
        first.release()

    def test_failed_update_keeps_what_was_remembered(self) -> None:
        """
        An update whose write fails (the disk full) is warned about and
        leaves the keys remembered before: copies of their events are still
        recognized.
        """
        path = self.mktemp()
        SeenFile(path, 10.0, 5, now=lambda: 50.0).add("k")
        real_fdopen = os.fdopen

        class DiskFull:
            def __init__(self, f: Any) -> None:
                self._f = f

            def __getattr__(self, name: str) -> Any:
                return getattr(self._f, name)

            def __enter__(self) -> DiskFull:
                return self

            def __exit__(self, *exc: object) -> None:
                self._f.close()

            def write(self, data: bytes) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(inject_mail.os, "fdopen", lambda *a, **k: DiskFull(real_fdopen(*a, **k)))
        warnings: list[str] = []
        SeenFile(path, 10.0, 5, now=lambda: 51.0, warn=warnings.append).add("other")
        self.assertEqual(warnings, [f"can not update {path}: No space left on device"])
        self.patch(inject_mail.os, "fdopen", real_fdopen)
        self.assertTrue(SeenFile(path, 10.0, 5, now=lambda: 52.0).seen("k"))

    def test_garbage_lines_ignored(self) -> None:
        """Lines that are not <time> <key> are ignored."""
        path = self.mktemp()
        Path(path).write_text("nonsense\n\n99999999999 \n")
        seen = SeenFile(path, 10.0, 5, now=lambda: 50.0)
        self.assertFalse(seen.seen("nonsense"))
        seen.add("k")
        self.assertEqual(Path(path).read_text(), "50.000 k\n")

