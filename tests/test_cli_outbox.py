"""
Tests for C{fedhub outbox list|retry|drop} (L{fedhub.cli.outbox}).

The state directory is prepared by running a real L{Outbox} with a fake bus
that returns or refuses messages, so the failed area is exactly what a hub
leaves behind.  No broker is needed.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fedhub.cli.main import build_parser
from fedhub.errors import MessageNacked, MessageReturned
from fedhub.message import Message
from fedhub.outbox import Outbox, Store, SynchronousExecutor
from fedhub.outbox.spool import SpoolImporter
from fedhub.tap import StateLock
from tests.test_cli_publish import write_config
from tests.test_outbox import FakeBus, make_message


class OutboxCommandTests(SynchronousTestCase):
    """
    The failed area of a stopped hub's outbox, from the command line.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.outbox_dir = str(self.directory / "state" / "outbox" / "test")
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def prepare(self) -> list[Message]:
        """
        Run an outbox whose bus returns the first message, refuses the second
        and confirms the third; stop it.  Returns the three messages.
        """
        clock = Clock()
        bus = FakeBus()
        outbox = Outbox("test", self.outbox_dir, bus, clock, executor=SynchronousExecutor())
        outbox.startService()
        messages = [make_message(n) for n in (1, 2, 3)]
        for message in messages:
            outbox.publish(message)
        bus.fail_next(MessageReturned("no queue is bound for 'x' on exchange 'amq.topic': 312 NO_ROUTE",
                                      messages[0].id, 312))
        bus.fail_next(MessageNacked("the broker refused the message\x1b[31m", messages[1].id))
        bus.ack()
        self.successResultOf(outbox.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
        return messages

    def command(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        args = build_parser().parse_args(["outbox", *argv])
        from fedhub.cli import outbox

        status = outbox.run(args, out)
        return status, out.getvalue()

    def store_state(self) -> tuple[list[str], list[str]]:
        """
        The ids pending and failed in the (closed) outbox.
        """
        store = Store(self.outbox_dir, SynchronousExecutor())
        self.successResultOf(store.open())
        try:
            pending = [row.message().id for row in self.successResultOf(store.load(0, 1000))]
            failed = [record.message_id for record in self.successResultOf(store.failed())]
        finally:
            self.successResultOf(store.close())
        return pending, failed

    def test_list_table(self) -> None:
        """list shows seq, id, topic, kind, time, attempts and reason, control characters escaped."""
        messages = self.prepare()
        status, out = self.command("list", "-c", self.config)
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:4], ["SEQ", "ID", "TOPIC", "KIND"])
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[1].split()[:4], ["1", messages[0].id, messages[0].topic, "returned"])
        self.assertIn("312 NO_ROUTE", lines[1])
        self.assertEqual(lines[2].split()[:4], ["2", messages[1].id, messages[1].topic, "nacked"])
        self.assertNotIn("\x1b", out)
        self.assertIn("\\x1b", lines[2])

    def test_config_before_the_action(self) -> None:
        """-c and -d may come before the action too, as with the other commands; after it, they win."""
        self.prepare()
        before = self.command("-c", self.config, "list")
        self.assertEqual(before, self.command("list", "-c", self.config))
        self.assertEqual(before[0], 0)
        self.assertEqual(len(before[1].splitlines()), 3)
        status, _ = self.command("-c", "/nonexistent/hub.toml", "list", "-c", self.config)
        self.assertEqual(status, 0)
        status, _ = self.command("-c", self.config, "retry")
        self.assertEqual(status, 64)

    def test_list_json(self) -> None:
        """list --json gives one object per line, with the stored message."""
        messages = self.prepare()
        status, out = self.command("list", "--json", "-c", self.config)
        self.assertEqual(status, 0)
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([(r["seq"], r["id"], r["kind"], r["attempts"]) for r in records],
                         [(1, messages[0].id, "returned", 1), (2, messages[1].id, "nacked", 1)])
        self.assertEqual(records[0]["message"]["id"], messages[0].id)
        self.assertTrue(records[0]["failed_at"].endswith("+00:00"))

    def test_retry_by_seq_and_id(self) -> None:
        """retry moves the named messages (by seq or id) back to pending, where the hub picks them up."""
        messages = self.prepare()
        status, out = self.command("retry", "1", messages[1].id, "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        self.assertIn("2 message(s) moved back to pending", out)
        self.assertEqual(self.store_state(), ([messages[0].id, messages[1].id], []))
        # The hub publishes them at its next start.
        bus = FakeBus()
        bus.auto_ack = True
        clock = Clock()
        outbox = Outbox("test", self.outbox_dir, bus, clock, executor=SynchronousExecutor())
        outbox.startService()
        self.successResultOf(outbox.stopService())
        self.assertEqual([m.id for m in bus.published], [messages[0].id, messages[1].id])

    def test_digits_of_other_scripts_are_no_sequence_numbers(self) -> None:
        """
        Names that Python calls digits but are not ASCII ('²', an Arabic-Indic
        two) are not sequence numbers: not found, one line, exit 1; no
        traceback, and nothing retried by them.
        """
        self.prepare()
        status, _ = self.command("retry", "\u00b2", "\u0662", "-c", self.config)
        self.assertEqual(status, 1, self.stderr.getvalue())
        self.assertNotIn("Traceback", self.stderr.getvalue())
        self.assertEqual(len(self.store_state()[1]), 2)

    def test_drop_all(self) -> None:
        """drop --all empties the failed area."""
        self.prepare()
        status, out = self.command("drop", "--all", "-c", self.config)
        self.assertEqual((status, out.strip()), (0, "2 message(s) dropped"))
        self.assertEqual(self.store_state(), ([], []))

    def test_not_found(self) -> None:
        """Names that match nothing: the others are acted on, then exit 1 naming them."""
        messages = self.prepare()
        status, out = self.command("drop", "2", "no-such-id", "-c", self.config)
        self.assertEqual(status, 1)
        self.assertIn("1 message(s) dropped", out)
        self.assertIn("not found: no-such-id", self.stderr.getvalue())
        self.assertEqual(self.store_state(), ([], [messages[0].id]))

    def test_needs_names_or_all(self) -> None:
        """retry without names or --all (or with both) is a usage error."""
        self.prepare()
        self.assertEqual(self.command("retry", "-c", self.config)[0], 64)
        self.assertEqual(self.command("retry", "1", "--all", "-c", self.config)[0], 64)
        self.assertEqual(len(self.store_state()[1]), 2)

    def hold(self, hub: bool = True) -> Store:
        """
        Hold the outbox's store, as a running hub does (with the state
        directory's lock), or as another process might (C{hub} false);
        let go at the end of the test.
        """
        if hub:
            lock = StateLock(str(self.directory / "state"))
            lock.acquire()
            self.addCleanup(lock.release)
        holder = Store(self.outbox_dir, SynchronousExecutor())
        self.successResultOf(holder.open())
        self.addCleanup(lambda: self.successResultOf(holder.close()))
        return holder

    def test_hub_not_answering(self) -> None:
        """While a hub holds the outbox and does not answer the request, exit 75 and say why; nothing changes."""
        from fedhub.cli import outbox

        self.patch(outbox, "REQUEST_TIMEOUT", 0.3)
        self.prepare()
        holder = self.hold()
        status, _ = self.command("drop", "--all", "-c", self.config)
        self.successResultOf(holder.close())
        self.assertEqual(status, 75)
        self.assertIn("did not answer within 0.3 s", self.stderr.getvalue())
        self.assertEqual(len(self.store_state()[1]), 2)

    def test_held_by_another_process(self) -> None:
        """
        The outbox held by a process that is no hub (no hub holds the state
        directory): exit 75 saying so, and no request is left queued for
        whenever a hub starts.
        """
        self.prepare()
        holder = self.hold(hub=False)
        status, _ = self.command("drop", "--all", "-c", self.config)
        self.successResultOf(holder.close())
        self.assertEqual(status, 75)
        [line] = self.stderr.getvalue().splitlines()
        self.assertIn("is in use by another process, not a running hub", line)
        self.assertIn("nothing was changed", line)
        spool = self.directory / "state" / "spool"
        self.assertEqual([n for _, _, names in os.walk(spool) for n in names if n.endswith(".ctl")], [])
        self.assertEqual(len(self.store_state()[1]), 2)

    def test_unreadable_state(self) -> None:
        """An outbox this user may not look at is an error (77), not an empty one."""
        self.prepare()

        def refused(path: Any, *args: Any, **kwargs: Any) -> Any:
            raise PermissionError(13, "Permission denied", str(path))

        from fedhub.cli import outbox

        self.patch(outbox.os, "stat", refused)
        status, out = self.command("list", "-c", self.config)
        self.assertEqual((status, out), (77, ""))
        [line] = self.stderr.getvalue().splitlines()
        self.assertIn("can not look at the outbox of domain test", line)
        self.assertIn("Permission denied", line)

    def interrupted_while_held(self, *argv: str) -> int:
        """
        Run C{fedhub outbox ARGV...} while the store is held (a hub runs),
        with Ctrl-C as it waits for the hub's answer; its status.
        """
        from fedhub.cli import outbox

        def interrupt(seconds: float) -> None:
            raise KeyboardInterrupt()

        self.patch(outbox.time, "sleep", interrupt)
        self.prepare()
        holder = self.hold()
        status, _ = self.command(*argv, "-c", self.config)
        self.successResultOf(holder.close())
        return status

    def test_interrupted_waiting_for_hub(self) -> None:
        """Ctrl-C while waiting for the hub's answer: status 130, one line saying the request stays queued."""
        status = self.interrupted_while_held("drop", "--all")
        self.assertEqual(status, 130)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("interrupted", lines[0])
        self.assertIn("stays queued", lines[0])

    def test_names_not_answered(self) -> None:
        """
        retry or drop by name while the hub does not answer: the look-up of
        the names went unanswered, so the line says nothing was changed,
        not that a drop stays queued (none was sent).
        """
        status = self.interrupted_while_held("drop", "1")
        self.assertEqual(status, 130)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("nothing was changed", lines[0])
        spool = os.path.join(os.path.dirname(os.path.dirname(self.outbox_dir)), "spool")
        requests = [os.path.join(d, n) for d, _, names in os.walk(spool) for n in names
                    if n.endswith(".ctl")]
        self.assertEqual(len(requests), 1)
        with open(requests[0]) as f:
            self.assertEqual(json.load(f)["action"], "list")

    def test_no_outbox_yet(self) -> None:
        """A domain whose hub never ran has no failed messages; nothing is created."""
        status, out = self.command("list", "-c", self.config)
        self.assertEqual((status, "no failed messages" in out), (0, True))
        self.assertEqual(self.command("retry", "--all", "-c", self.config)[0], 0)
        self.assertEqual(self.command("drop", "7", "-c", self.config)[0], 1)
        self.assertFalse(os.path.exists(self.outbox_dir))

    def test_missing_database_with_log(self) -> None:
        """
        An outbox whose database file is missing but whose log is there is
        an error (74) naming both, not an empty outbox; nothing is created.
        """
        self.prepare()
        path = os.path.join(self.outbox_dir, "outbox.sqlite3")
        with open(path + "-wal", "wb") as f:
            f.write(b"frames")
        os.rename(path, path + ".moved")
        for argv in (("list",), ("retry", "--all"), ("drop", "--all")):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            status, out = self.command(*argv, "-c", self.config)
            self.assertEqual((status, out), (74, ""), argv)
            [line] = self.stderr.getvalue().splitlines()
            self.assertIn("can not open the outbox of domain test", line)
            self.assertIn(f"the file is missing but its log {path}-wal (6 bytes) is there", line)
        self.assertEqual(
            sorted(os.listdir(self.outbox_dir)), ["outbox.sqlite3-wal", "outbox.sqlite3.moved"]
        )

    def test_memory_domain(self) -> None:
        """An in-process domain has an outbox on disk too: it can be listed."""
        config = write_config(self.directory / "memory", broker="memory")
        status, out = self.command("list", "-c", config)
        self.assertEqual((status, "no failed messages" in out), (0, True), self.stderr.getvalue())

    def test_bad_config(self) -> None:
        """An unreadable configuration: 78."""
        status, _ = self.command("list", "-c", str(self.directory / "missing.toml"))
        self.assertEqual(status, 78)


class RunningHubTests(TestCase):
    """
    The failed area of the outbox a running hub holds: the command's request
    goes through the spool and the hub's importer carries it out.
    """

    @inlineCallbacks
    def test_list_retry_drop_through_the_hub(self) -> Generator[Deferred[Any], Any, None]:
        """list, retry and drop work while the hub runs; retried messages are published at once."""
        helper = OutboxCommandTests("test_list_table")
        helper.directory = Path(self.mktemp()).absolute()
        helper.config = write_config(helper.directory)
        helper.outbox_dir = str(helper.directory / "state" / "outbox" / "test")
        helper.stderr = io.StringIO()
        self.patch(sys, "stderr", helper.stderr)
        messages = helper.prepare()
        # The hub's lock on its state directory, as twistd takes it.
        lock = StateLock(str(helper.directory / "state"))
        lock.acquire()
        self.addCleanup(lock.release)
        bus = FakeBus()
        bus.auto_ack = True
        outbox = Outbox("test", helper.outbox_dir, bus, reactor)
        outbox.startService()
        self.addCleanup(outbox.stopService)
        spool = str(helper.directory / "state" / "spool" / "test")
        importer = SpoolImporter("test", spool, outbox, reactor, interval=0.05, failed_area=outbox)
        importer.startService()
        self.addCleanup(importer.stopService)

        status, out = yield deferToThread(helper.command, "list", "--json", "-c", helper.config)
        self.assertEqual(status, 0, helper.stderr.getvalue())
        listed = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["id"] for r in listed], [messages[0].id, messages[1].id])
        # The stored records come through whole: topic and message decode.
        self.assertEqual([r["topic"] for r in listed], [messages[0].topic, messages[1].topic])
        self.assertEqual([r["message"] for r in listed], [m.to_serialized() for m in messages[:2]])

        status, out = yield deferToThread(helper.command, "retry", messages[0].id, "-c", helper.config)
        self.assertEqual(status, 0, helper.stderr.getvalue())
        self.assertIn("1 message(s) moved back to pending; the hub publishes them now", out)
        for _ in range(100):
            if messages[0].id in [m.id for m in bus.published]:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn(messages[0].id, [m.id for m in bus.published])

        status, out = yield deferToThread(helper.command, "drop", "--all", "-c", helper.config)
        self.assertEqual((status, out.strip()), (0, "1 message(s) dropped"))
        stats = outbox.stats()
        self.assertEqual(stats.failed, 0)
