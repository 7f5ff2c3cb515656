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
from fedhub.outbox import FailedPage, Outbox, Store, SynchronousExecutor
from fedhub.outbox import spool
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

    def prepare_many(self, count: int, *more: Message) -> list[Message]:
        """
        Run an outbox whose bus returns each of C{count} messages, then of
        C{more}; stop it.  Returns the messages, in the order of their
        sequence numbers.
        """
        clock = Clock()
        bus = FakeBus()
        outbox = Outbox("test", self.outbox_dir, bus, clock, executor=SynchronousExecutor())
        outbox.startService()
        messages = [make_message(n) for n in range(count)] + list(more)
        for message in messages:
            outbox.publish(message)
        while bus.outstanding:
            message = bus.outstanding[0][0]
            bus.fail_next(MessageReturned(f"312 NO_ROUTE for {message.topic}", message.id, 312))
        self.successResultOf(outbox.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
        return messages

    def page_reads(self, out: io.StringIO) -> list[tuple[int, int]]:
        """
        Record every page the command reads from the store: the sequence
        number it reads after, and how many lines were printed by then.
        """
        reads: list[tuple[int, int]] = []
        real = Store.failed_page

        def failed_page(store: Store, after_seq: int, limit: int, max_bytes: int) -> Any:
            reads.append((after_seq, len(out.getvalue().splitlines())))
            return real(store, after_seq, limit, max_bytes)

        self.patch(Store, "failed_page", failed_page)
        return reads

    def command(self, *argv: str, out: io.StringIO | None = None) -> tuple[int, str]:
        out = out or io.StringIO()
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

    def test_list_pages(self) -> None:
        """
        A failed area larger than a page is read and printed a page at a
        time: every record once, in order, each page printed before the
        next is read; the lines are those of a listing in one page.
        """
        from fedhub.cli import outbox

        messages = self.prepare_many(8)
        whole = {flag: self.command("list", *flag, "-c", self.config) for flag in ((), ("--json",))}
        self.patch(outbox, "PAGE", 3)
        for flag, expected in (((), [0, 4, 7]), (("--json",), [0, 3, 6])):
            out = io.StringIO()
            reads = self.page_reads(out)
            status, text = self.command("list", *flag, "-c", self.config, out=out)
            self.assertEqual(status, 0, self.stderr.getvalue())
            self.assertEqual((status, text), whole[flag])
            self.assertEqual(reads, list(zip([0, 3, 6], expected)))
        lines = whole[("--json",)][1].splitlines()
        self.assertEqual([json.loads(line)["id"] for line in lines], [m.id for m in messages])
        lines = whole[()][1].splitlines()
        self.assertEqual([line.split()[1] for line in lines[1:]], [m.id for m in messages])

    def test_table_widens_for_a_later_page(self) -> None:
        """
        A page that needs a wider column than the pages before it widens it
        from there on: its lines are aligned, the earlier ones stay.
        """
        from fedhub.cli import outbox

        longer = Message.create("org.example.dev.test.with.a.longer.topic", {}, id="long")
        self.prepare_many(4, longer)
        self.patch(outbox, "PAGE", 3)
        status, text = self.command("list", "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        lines = text.splitlines()
        records = self.records()
        self.assertEqual(len(lines), 6)
        self.assertEqual(lines[:4], outbox.table(records[:3]))
        self.assertEqual(lines[4:], outbox.table(records)[4:])
        self.assertNotEqual(lines[3].index("returned"), lines[4].index("returned"))

    def records(self) -> list[Any]:
        store = Store(self.outbox_dir, SynchronousExecutor())
        self.successResultOf(store.open())
        try:
            return self.successResultOf(store.failed(0, 1000))
        finally:
            self.successResultOf(store.close())

    def test_retry_by_names_over_pages(self) -> None:
        """
        retry by several names (ids and sequence numbers) whose messages
        are on several pages acts on all of them, reading the failed area
        once whatever the number of names; a name that matches nothing is
        reported.
        """
        from fedhub.cli import outbox

        messages = self.prepare_many(7)
        self.patch(outbox, "PAGE", 2)
        reads = self.page_reads(io.StringIO())
        status, out = self.command(
            "retry", messages[6].id, "2", "no-such-id", messages[3].id, "5", "2", "-c", self.config
        )
        self.assertEqual(status, 1)
        self.assertIn("4 message(s) moved back to pending", out)
        self.assertIn("not found: no-such-id", self.stderr.getvalue())
        self.assertEqual([after for after, _ in reads], [0, 2, 4, 6])
        pending, failed = self.store_state()
        self.assertEqual(sorted(pending), sorted(messages[n].id for n in (1, 3, 4, 6)))
        self.assertEqual(failed, [messages[n].id for n in (0, 2, 5)])

    def test_huge_number_is_no_sequence_number(self) -> None:
        """A name of more digits than any sequence number has is not found, not a crash."""
        self.prepare()
        status, _ = self.command("drop", "9" * 5000, "-c", self.config)
        self.assertEqual(status, 1)
        self.assertIn("not found: 999", self.stderr.getvalue())
        self.assertEqual(len(self.store_state()[1]), 2)

    def test_hub_pages_end(self) -> None:
        """
        The hub's pages are asked for until one comes without C{next}; a
        C{next} that does not lead past what was asked for is an error, not
        an endless listing.
        """
        from fedhub.cli import outbox

        class Answers(outbox.HubFailedArea):
            def __init__(self, answers: list[dict[str, Any]]) -> None:
                super().__init__("/nonexistent", "test")
                self.answers = answers
                self.asked: list[int | None] = []

            def _ask(self, action: str, seqs: list[int] | None, after: int | None = None) -> dict[str, Any]:
                self.asked.append(after)
                return self.answers.pop(0)

        record = {"seq": 4, "message_id": "x", "created": 0.0, "failed_at": 0.0, "kind": "nacked",
                  "reason": "r", "attempts": 1, "data_base64": ""}
        area = Answers([{"records": [record], "next": 4}, {"records": []}])
        self.assertEqual([[r.seq for r in page] for page in area.pages()], [[4], []])
        self.assertEqual(area.asked, [None, 4])
        for following in (4, 3, "5", True):
            area = Answers([{"records": [record], "next": 4}, {"records": [], "next": following}])
            with self.assertRaises(outbox.CommandError) as raised:
                list(area.pages())
            self.assertIn("does not lead on", raised.exception.reason)

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

    def helper(self) -> OutboxCommandTests:
        """
        The stopped hub's tests, to prepare the state directory and run
        commands.
        """
        helper = OutboxCommandTests("test_list_table")
        helper.directory = Path(self.mktemp()).absolute()
        helper.config = write_config(helper.directory)
        helper.outbox_dir = str(helper.directory / "state" / "outbox" / "test")
        helper.stderr = io.StringIO()
        self.patch(sys, "stderr", helper.stderr)
        return helper

    def start_hub(self, helper: OutboxCommandTests) -> tuple[Outbox, FakeBus]:
        """
        Run the outbox and spool importer of a hub on C{helper}'s state
        directory until the end of the test.
        """
        # The hub's lock on its state directory, as twistd takes it.
        lock = StateLock(str(helper.directory / "state"))
        lock.acquire()
        self.addCleanup(lock.release)
        bus = FakeBus()
        bus.auto_ack = True
        outbox = Outbox("test", helper.outbox_dir, bus, reactor)
        outbox.startService()
        self.addCleanup(outbox.stopService)
        directory = str(helper.directory / "state" / "spool" / "test")
        importer = SpoolImporter("test", directory, outbox, reactor, interval=0.05, failed_area=outbox)
        importer.startService()
        self.addCleanup(importer.stopService)
        return outbox, bus

    @inlineCallbacks
    def test_list_retry_drop_through_the_hub(self) -> Generator[Deferred[Any], Any, None]:
        """list, retry and drop work while the hub runs; retried messages are published at once."""
        helper = self.helper()
        messages = helper.prepare()
        outbox, bus = self.start_hub(helper)

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

    @inlineCallbacks
    def test_pages_through_the_hub(self) -> Generator[Deferred[Any], Any, None]:
        """
        The hub answers a list a page at a time and the command asks for
        the next until the last: it prints what a stopped hub's listing
        does, every record once and in order; retry by names on several
        pages acts on each.
        """
        helper = self.helper()
        messages = helper.prepare_many(8)
        stopped = {
            flag: helper.command("list", *flag, "-c", helper.config) for flag in ((), ("--json",))
        }
        self.patch(spool, "LIST_RECORDS", 3)
        outbox, bus = self.start_hub(helper)
        pages: list[int] = []
        real = outbox.failed_page

        def read(page: FailedPage) -> FailedPage:
            pages.append(len(page.records))
            return page

        def failed_page(after_seq: int, limit: int, max_bytes: int) -> Deferred[FailedPage]:
            return real(after_seq, limit, max_bytes).addCallback(read)

        outbox.failed_page = failed_page  # type: ignore[method-assign]
        for flag in ((), ("--json",)):
            del pages[:]
            listed = yield deferToThread(helper.command, "list", *flag, "-c", helper.config)
            self.assertEqual(listed, stopped[flag], helper.stderr.getvalue())
            self.assertEqual(pages, [3, 3, 2])
        lines = stopped[("--json",)][1].splitlines()
        self.assertEqual([json.loads(line)["id"] for line in lines], [m.id for m in messages])

        status, out = yield deferToThread(
            helper.command, "retry", messages[7].id, "1", messages[4].id, "-c", helper.config
        )
        self.assertEqual(status, 0, helper.stderr.getvalue())
        self.assertIn("3 message(s) moved back to pending", out)
        for _ in range(100):
            if len(bus.published) >= 3:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sorted(m.id for m in bus.published), sorted(messages[n].id for n in (0, 4, 7)))
        failed = yield outbox.failed(0, 100)
        self.assertEqual([r.message_id for r in failed], [messages[n].id for n in (1, 2, 3, 5, 6)])
