"""
Tests for C{fedhub outbox salvage} (L{fedhub.outbox.salvage}): the readable
messages of a damaged outbox database are copied into a new one, and those
that can not be read are named.

A store is damaged as a bad disk would damage it: a page of the database
file is overwritten with zeros while the hub is stopped.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fedhub.cli.main import build_parser
from fedhub.message import Message
from fedhub.outbox import Outbox, Store, StoreError, SynchronousExecutor
from fedhub.outbox.store import DATABASE_NAME, RETURNED, Failure, encode
from fedhub.tap import StateLock
from tests.test_cli_publish import write_config
from tests.test_outbox import FakeBus, make_message


class SalvageCommandTests(SynchronousTestCase):
    """
    C{fedhub outbox salvage} on a stopped hub's outbox.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.config = write_config(self.directory)
        self.outbox_dir = str(self.directory / "state" / "outbox" / "test")
        self.path = os.path.join(self.outbox_dir, DATABASE_NAME)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def command(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        args = build_parser().parse_args(["outbox", *argv])
        from fedhub.cli import outbox

        status = outbox.run(args, out)
        return status, out.getvalue()

    def open_store(self) -> Store:
        store = Store(self.outbox_dir, SynchronousExecutor())
        self.successResultOf(store.open())
        return store

    def damaged_overflow(self) -> tuple[list[Message], Message, Message]:
        """
        A backlog of two messages, a large one whose message can not be
        read (the first page of its overflow chain zeroed), two more; and a
        message in the failed area, handed over between the first two and
        the large one.

        @return: the four readable pending messages, the large one and the
            failed one.
        """
        store = self.open_store()
        before = [make_message(n) for n in range(2)]
        refused = make_message(9)
        big = Message.create("org.example.big", {"text": "x" * 20000})
        after = [make_message(n) for n in range(3, 5)]
        self.successResultOf(store.commit([(m.id, 1.0, encode(m)) for m in [*before, refused]]))
        self.successResultOf(store.commit([], [], [Failure(3, RETURNED, "312 NO_ROUTE", 2.0)]))
        conn = store._db.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        self.successResultOf(store.commit([(big.id, 1.0, encode(big))]))
        self.successResultOf(store.commit([(m.id, 1.0, encode(m)) for m in after]))
        self.successResultOf(store.close())
        with open(self.path, "r+b") as f:
            f.seek(pages * page_size)
            f.write(bytes(page_size))
        return before + after, big, refused

    def published(self) -> tuple[list[Message], str | None]:
        """
        Start an outbox on the directory, as the hub would, and return what
        it publishes and its problem; stop it.
        """
        clock = Clock()
        bus = FakeBus()
        outbox = Outbox("test", self.outbox_dir, bus, clock, executor=SynchronousExecutor(), window=100)
        outbox.startService()
        problem = outbox.problem
        published = list(bus.published)
        bus.ack_all()
        self.successResultOf(outbox.stopService())
        self.flushLoggedErrors(StoreError)
        return published, problem

    def test_damaged_message_in_the_backlog(self) -> None:
        """
        The messages before and after an unreadable one are salvaged and
        published in order, the failed area is kept, the unreadable message
        is named by sequence number and id, the damaged database is kept,
        and no sequence number is given twice.
        """
        readable, big, refused = self.damaged_overflow()
        # The hub publishes the messages before the damaged one, and no
        # further.
        published, problem = self.published()
        self.assertEqual(published, readable[:2])
        self.assertIn("database disk image is malformed", problem or "")
        self.assertIn("the messages after sequence number 2 are not published", problem or "")

        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        lines = out.splitlines()
        self.assertIn("2 pending and 1 failed message(s) salvaged", lines[0])
        self.assertEqual(lines[1:], [f"not salvaged: pending message 4 (id {big.id}): it can not be read"])
        kept = lines[0].rsplit(" ", 1)[-1]
        self.assertEqual(os.path.dirname(kept), self.outbox_dir)
        self.assertTrue(os.path.basename(kept).startswith("outbox-damaged-"))

        store = self.open_store()
        rows = self.successResultOf(store.load(0, 100))
        self.assertEqual([r.seq for r in rows], [5, 6])
        self.assertEqual([r.message() for r in rows], readable[2:])
        [record] = self.successResultOf(store.failed())
        self.assertEqual((record.seq, record.message(), record.reason), (3, refused, "312 NO_ROUTE"))
        new = make_message(20)
        self.assertEqual(self.successResultOf(store.commit([(new.id, 3.0, encode(new))])).first_seq, 7)
        self.successResultOf(store.close())

        published, problem = self.published()
        self.assertIsNone(problem)
        self.assertEqual(published, [*readable[2:], new])

        # The damaged database is kept as it was: the large message still
        # can not be read from it, the others can.
        damaged = Store(self.outbox_dir, SynchronousExecutor())
        damaged._db.path = kept
        self.successResultOf(damaged.open())
        self.assertEqual(damaged.pending_count, 3)
        self.failureResultOf(damaged.load(0, 100), StoreError)
        self.successResultOf(damaged.close())

        # Whole now: nothing more to do.
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0)
        self.assertEqual(
            out, "the outbox of domain test reads whole (0 pending, 1 failed message(s)): nothing to salvage\n"
        )

    def test_damaged_table_page(self) -> None:
        """
        A zeroed page of the table itself (the store does not even open):
        every row outside the range reported is salvaged, in order.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(300)]
        self.successResultOf(store.commit([(m.id, 1.0, encode(m)) for m in messages]))
        conn = store._db.conn
        assert conn is not None
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'pending'").fetchone()[0]
        self.successResultOf(store.close())
        with open(self.path, "r+b") as f:
            f.seek((root - 1) * page_size)
            page = f.read(page_size)
            # An interior page of the table: its second child is a leaf.
            self.assertEqual(page[0], 0x05)
            (pointer,) = struct.unpack_from("!H", page, 12 + 2)
            (leaf,) = struct.unpack_from("!I", page, pointer)
            f.seek((leaf - 1) * page_size)
            f.write(bytes(page_size))
        self.failureResultOf(Store(self.outbox_dir, SynchronousExecutor()).open(), StoreError)

        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        words = lines[1].split()
        self.assertEqual(words[:4], ["not", "salvaged:", "pending", "messages"])
        first, last = int(words[4]), int(words[7].rstrip(":"))
        self.assertEqual(words[5:7], ["up", "to"])
        self.assertIn("(a damaged page)", lines[1])
        self.assertGreater(first, 1)
        self.assertLess(last, 300)
        self.assertLess(last - first, 20)
        store = self.open_store()
        rows = self.successResultOf(store.load(0, 1000))
        self.successResultOf(store.close())
        expected = [n for n in range(1, 301) if not first <= n <= last]
        self.assertEqual([r.seq for r in rows], expected)
        self.assertEqual([r.message() for r in rows], [messages[n - 1] for n in expected])
        self.assertIn(f"{len(expected)} pending and 0 failed message(s) salvaged", lines[0])

    def test_hub_running(self) -> None:
        """
        While the hub runs, the command refuses with 75 and changes nothing.
        """
        self.damaged_overflow()
        with open(self.path, "rb") as f:
            before = f.read()
        lock = StateLock(str(self.directory / "state"))
        lock.acquire()
        self.addCleanup(lock.release)
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 75)
        self.assertEqual(out, "")
        self.assertIn("the hub is running", self.stderr.getvalue())
        self.assertIn("stop it, then run this again (nothing was changed)", self.stderr.getvalue())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(self.outbox_dir), [DATABASE_NAME])

    def test_database_in_use(self) -> None:
        """
        An outbox another process holds (no hub) is refused with 75 too.
        """
        self.damaged_overflow()
        holder = self.open_store()
        self.addCleanup(lambda: self.successResultOf(holder.close()))
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 75)
        self.assertIn("is in use by another process", self.stderr.getvalue())
        self.assertEqual(sorted(os.listdir(self.outbox_dir)), [DATABASE_NAME, DATABASE_NAME + "-wal"])

    def test_nothing_to_salvage(self) -> None:
        """
        A store that reads whole, or none at all, is left as it is.
        """
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0)
        self.assertEqual(out, "the outbox of domain test has no database: nothing to salvage\n")
        self.assertFalse(os.path.exists(self.outbox_dir))
        store = self.open_store()
        self.successResultOf(store.commit([(make_message(1).id, 1.0, encode(make_message(1)))]))
        self.successResultOf(store.close())
        with open(self.path, "rb") as f:
            before = f.read()
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0)
        self.assertEqual(
            out, "the outbox of domain test reads whole (1 pending, 0 failed message(s)): nothing to salvage\n"
        )
        self.assertEqual(os.listdir(self.outbox_dir), [DATABASE_NAME])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_log_kept_as_found(self) -> None:
        """
        The log of a store whose hub did not close it (killed) is copied
        aside, byte for byte, before SQLite reads it; its messages are in
        the store after the command.
        """
        elsewhere = self.mktemp()
        holder = Store(elsewhere, SynchronousExecutor())
        self.successResultOf(holder.open())
        messages = [make_message(n) for n in range(3)]
        self.successResultOf(holder.commit([(m.id, 1.0, encode(m)) for m in messages]))
        os.makedirs(self.outbox_dir)
        # Copied while the store is open: the database and its log as a
        # killed hub leaves them.
        for suffix in ("", "-wal"):
            with open(os.path.join(elsewhere, DATABASE_NAME + suffix), "rb") as source:
                data = source.read()
            with open(self.path + suffix, "wb") as copy:
                copy.write(data)
        self.successResultOf(holder.close())
        self.assertGreater(len(data), 0)
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        first, second = out.splitlines()
        self.assertIn("reads whole (3 pending, 0 failed message(s))", first)
        prefix = "its log, as it was found, is kept as "
        self.assertTrue(second.startswith(prefix), second)
        kept = second[len(prefix):]
        self.assertEqual(os.path.dirname(kept), self.outbox_dir)
        self.assertTrue(os.path.basename(kept).startswith("outbox-log-"))
        with open(kept, "rb") as f:
            self.assertEqual(f.read(), data)
        store = self.open_store()
        self.assertEqual([r.message() for r in self.successResultOf(store.load(0, 10))], messages)
        self.successResultOf(store.close())

    def test_lock_file_made(self) -> None:
        """
        Without a lock file in the state directory (no hub ran there yet),
        the command makes one and holds it while it works: a hub starting
        meanwhile is refused.
        """
        readable, _, _ = self.damaged_overflow()
        lock_path = self.directory / "state" / "hub.lock"
        self.assertFalse(lock_path.exists())
        attempts: list[bool] = []
        from fedhub.cli import outbox as command
        real = command.salvage

        def salvage_while_a_hub_starts(directory: str) -> Any:
            hub = StateLock(str(self.directory / "state"))
            try:
                hub.acquire()
            except Exception:
                attempts.append(False)
            else:
                attempts.append(True)
                hub.release()
            return real(directory)

        self.patch(command, "salvage", salvage_while_a_hub_starts)
        status, _ = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        self.assertEqual(attempts, [False])
        self.assertTrue(lock_path.exists())
        self.assertEqual(os.stat(lock_path).st_mode & 0o777, 0o600)
        # Once it is done, a hub can take the lock.
        hub = StateLock(str(self.directory / "state"))
        hub.acquire()
        hub.release()

    def zero_root_page(self, name: str) -> None:
        """
        Overwrite the root page of the table or index C{name} with zeros.
        """
        store = self.open_store()
        conn = store._db.conn
        assert conn is not None
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        [root] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        self.successResultOf(store.close())
        with open(self.path, "r+b") as f:
            f.seek((root - 1) * page_size)
            f.write(bytes(page_size))

    def check_rebuilt_whole(self, name: str, said: str) -> None:
        """
        With every message readable but C{name}'s page zeroed, the command
        rebuilds the database, says what was damaged, and the store then
        opens, publishes its backlog and takes new messages with fresh
        sequence numbers.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(3)]
        self.successResultOf(store.commit([(m.id, 1.0, encode(m)) for m in messages]))
        self.successResultOf(store.close())
        self.zero_root_page(name)

        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 0, self.stderr.getvalue())
        lines = out.splitlines()
        self.assertIn("3 pending and 0 failed message(s) salvaged", lines[0])
        self.assertTrue(
            any(line.startswith(f"damaged, though every message reads: {said}") for line in lines[1:]), out
        )
        self.assertFalse([line for line in lines if line.startswith("not salvaged")])

        store = self.open_store()
        new = make_message(20)
        self.assertEqual(self.successResultOf(store.commit([(new.id, 3.0, encode(new))])).first_seq, 4)
        self.successResultOf(store.close())
        published, problem = self.published()
        self.assertIsNone(problem)
        self.assertEqual(published, [*messages, new])

    def test_damaged_layout_version(self) -> None:
        """
        A zeroed page of the table holding the layout version: the store
        does not open although every message reads; it is rebuilt, not
        called whole.
        """
        self.check_rebuilt_whole("meta", "the outbox layout version")

    def test_damaged_sequence_record(self) -> None:
        """
        A zeroed page of the record of the sequence numbers given: the store
        opens but every hand-over fails; it is rebuilt, not called whole.
        """
        self.check_rebuilt_whole("sqlite_sequence", "the sequence numbers given")

    def test_damaged_index(self) -> None:
        """
        A zeroed page of an index (of the layout version's table): it is
        rebuilt, not called whole.
        """
        self.check_rebuilt_whole("sqlite_autoindex_meta_1", "SQLite's check of the file")
