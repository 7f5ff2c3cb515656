"""
Tests for C{fedhub outbox salvage} (L{fedhub.outbox.salvage}): the readable
messages of a damaged outbox database are copied into a new one, and those
that can not be read are named.

A store is damaged as a bad disk would damage it: a page of the database
file is overwritten with zeros while the hub is stopped.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import errno
import io
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fedhub.cli.main import build_parser
from fedhub.message import Message
from fedhub.outbox import Outbox, Store, StoreError, SynchronousExecutor
from fedhub.outbox import salvage as salvage_module
from fedhub.outbox.store import DATABASE_NAME, RETURNED, Failure, encode
from fedhub.tap import StateLock
from tests.test_cli_publish import write_config
from tests.test_outbox import FakeBus, make_message, page_layout, zero_page


class SalvageTestCase(SynchronousTestCase):
    """
    Runs C{fedhub outbox salvage} on an outbox in a temporary directory.
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

    def copy_as_killed(self, directory: str) -> bytes:
        """
        Copy the database of the open store in C{directory} and its log to
        the outbox's place, as a hub killed with that store open leaves
        them; the log's bytes.
        """
        os.makedirs(self.outbox_dir)
        for suffix in ("", "-wal"):
            with open(os.path.join(directory, DATABASE_NAME + suffix), "rb") as source:
                data = source.read()
            with open(self.path + suffix, "wb") as copy:
                copy.write(data)
        return data

    def published(self) -> tuple[list[Message], str | None]:
        """
        Start an outbox on the directory, as the hub would, and return what
        it publishes and its problem; stop it.
        """
        clock = Clock()
        bus = FakeBus()
        outbox = Outbox("test", self.outbox_dir, bus, clock, executor=SynchronousExecutor(), window=1000)
        outbox.startService()
        problem = outbox.problem
        published = list(bus.published)
        bus.ack_all()
        self.successResultOf(outbox.stopService())
        self.flushLoggedErrors(StoreError)
        return published, problem


class SalvageCommandTests(SalvageTestCase):
    """
    C{fedhub outbox salvage} on a stopped hub's outbox.
    """

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
        pages, page_size = page_layout(store)
        self.successResultOf(store.commit([(big.id, 1.0, encode(big))]))
        self.successResultOf(store.commit([(m.id, 1.0, encode(m)) for m in after]))
        self.successResultOf(store.close())
        zero_page(self.path, pages, page_size)
        return before + after, big, refused

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
        # Done, but with messages lost: status 1.
        self.assertEqual(status, 1, self.stderr.getvalue())
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
        # Done, but with messages lost: status 1.
        self.assertEqual(status, 1, self.stderr.getvalue())
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

    def test_database_in_use_with_log(self) -> None:
        """
        An outbox another process holds, with messages in its log, is
        refused with 75 and left without a copy of that log: nothing was
        changed, as the command says.
        """
        holder = self.open_store()
        self.addCleanup(lambda: self.successResultOf(holder.close()))
        messages = [make_message(n) for n in range(3)]
        self.successResultOf(holder.commit([(m.id, 1.0, encode(m)) for m in messages]))
        self.assertGreater(os.path.getsize(self.path + "-wal"), 0)
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 75)
        self.assertEqual(out, "")
        self.assertIn("is in use by another process", self.stderr.getvalue())
        self.assertIn("nothing was changed", self.stderr.getvalue())
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
        data = self.copy_as_killed(elsewhere)
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
        # Done, but with messages lost: status 1.
        self.assertEqual(status, 1, self.stderr.getvalue())
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
        zero_page(self.path, root - 1, page_size)

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


def _pages_of(conn: sqlite3.Connection, table: str) -> dict[int, int]:
    """
    The leaf page that holds each row of C{table}, by sequence number, as
    SQLite's C{dbstat} table tells it (rows are in leaves in tree order).
    """
    leaves = conn.execute(
        "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path", (table,)
    ).fetchall()
    seqs = iter(row[0] for row in conn.execute(f"SELECT seq FROM {table} ORDER BY seq"))
    return {next(seqs): page for page, cells in leaves for _ in range(cells)}


def _log_pages(path: str, page_size: int) -> set[int]:
    """
    The pages of which the log (C{-wal}) at C{path} holds a frame.
    """
    with open(path, "rb") as f:
        log = f.read()
    return {
        struct.unpack_from("!I", log, offset)[0] for offset in range(32, len(log), 24 + page_size)
    }


class TruncatedSalvageTests(SalvageTestCase):
    """
    C{fedhub outbox salvage} on a database file cut short (its header names
    more pages than it holds: SQLite fails every read of it).
    """

    def setUp(self) -> None:
        super().setUp()
        try:
            sqlite3.connect(":memory:").execute("SELECT * FROM dbstat").fetchall()
        except sqlite3.Error:
            raise SkipTest("SQLite without its dbstat table") from None

    def fill(self, count: int) -> tuple[list[Message], Message, dict[int, int], int, int]:
        """
        A store of C{count} messages, the third moved to the failed area.

        @return: the messages, the failed one, the page of each pending
            row, the page size, and the page of the failed table's root.
        """
        store = self.open_store()
        messages = [make_message(n) for n in range(count)]
        self.successResultOf(store.commit([(m.id, 1.0, encode(m)) for m in messages]))
        self.successResultOf(store.commit([], [], [Failure(3, RETURNED, "312 NO_ROUTE", 2.0)]))
        conn = store._db.conn
        assert conn is not None
        pages = _pages_of(conn, "pending")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        [failed_root] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'failed'").fetchone()
        self.successResultOf(store.close())
        return messages, messages[2], pages, page_size, failed_root

    def cut(self, length: int) -> bytes:
        """
        Cut the database file to C{length} bytes; its content then.
        """
        os.truncate(self.path, length)
        with open(self.path, "rb") as f:
            return f.read()

    def salvaged(self, original: bytes) -> tuple[list[str], str]:
        """
        Run the command; check that the damaged file is kept as it was and
        nothing else is left beside the new one.

        @return: the lines it printed, and where it kept the damaged file.
        """
        inode = os.stat(self.path).st_ino
        status, out = self.command("salvage", "-c", self.config)
        lines = out.splitlines()
        # 1 when messages were lost (named), 0 when none was.
        lost = any(line.startswith("not salvaged") for line in lines)
        self.assertEqual(status, 1 if lost else 0, self.stderr.getvalue())
        kept = lines[0].rsplit(" ", 1)[-1]
        with open(kept, "rb") as f:
            self.assertEqual(f.read(), original)
        self.assertEqual(os.stat(kept).st_ino, inode)
        names = set(os.listdir(self.outbox_dir)) - {DATABASE_NAME, os.path.basename(kept)}
        self.assertEqual({name for name in names if not name.startswith("outbox-log-")}, set())
        return lines, kept

    def check_store(
        self, expected: list[int], messages: list[Message], failed: Message | None, next_seq: int
    ) -> None:
        """
        The new store holds the pending messages C{expected} (sequence
        numbers) in order, C{failed} in its failed area, and gives
        C{next_seq} next; the hub publishes the backlog.
        """
        store = self.open_store()
        rows = self.successResultOf(store.load(0, 1000))
        self.assertEqual([r.seq for r in rows], expected)
        self.assertEqual([r.message() for r in rows], [messages[n - 1] for n in expected])
        records = self.successResultOf(store.failed())
        self.assertEqual([(r.seq, r.message()) for r in records], [] if failed is None else [(3, failed)])
        new = make_message(900)
        self.assertEqual(self.successResultOf(store.commit([(new.id, 3.0, encode(new))])).first_seq, next_seq)
        self.successResultOf(store.close())
        published, problem = self.published()
        self.assertIsNone(problem)
        self.assertEqual(published, [*(messages[n - 1] for n in expected), new])

    def check_cut(self, extra: int) -> None:
        """
        Cut the file C{extra} bytes past the end of a page in the middle of
        the pending table: the messages on the whole pages left are
        salvaged, those after are named as a range, and a page cut in the
        middle counts as missing.
        """
        messages, failed, pages, page_size, failed_root = self.fill(300)
        held = sorted(set(pages.values()))[len(set(pages.values())) // 2]
        self.assertLess(failed_root, held)
        original = self.cut(held * page_size + extra)
        self.failureResultOf(Store(self.outbox_dir, SynchronousExecutor()).open(), StoreError)

        lines, _ = self.salvaged(original)
        expected = sorted(seq for seq, page in pages.items() if page <= held)
        named = max(pages.values())
        self.assertEqual(expected, [1, 2, *range(4, expected[-1] + 1)])
        self.assertIn(f"{len(expected)} pending and 1 failed message(s) salvaged", lines[0])
        self.assertEqual(
            lines[1:],
            [
                f"the damaged database file is cut short: it holds {held} whole page(s) of the {named} its "
                "header names; the others, and a page cut in the middle, are missing (but for what its log held)",
                f"not salvaged: pending messages {expected[-1] + 1} on: which of these numbers held a message "
                "can not be told (a damaged page)",
            ],
        )
        self.check_store(expected, messages, failed, 301)

    def test_cut_at_page_boundary(self) -> None:
        """
        A file cut at the end of a page: every message on the pages left is
        salvaged in order, the rest named, the file kept as it was, and no
        sequence number given twice.
        """
        self.check_cut(0)

    def test_cut_inside_a_page(self) -> None:
        """
        A file cut in the middle of a page, or one byte short of its end:
        that page's rows are not salvaged (they point into what is gone),
        those on the whole pages are.
        """
        self.check_cut(1024)

    def test_cut_one_byte_short(self) -> None:
        """
        A file one byte short of a whole page: that page's rows are not
        salvaged, not even the ones whose bytes are all there but for the
        last (they would be copied with a byte missing).
        """
        self.check_cut(4095)

    def test_cut_loses_failed_table(self) -> None:
        """
        A file cut before the failed table's root page: the pending
        messages are salvaged, the failed area is named lost, and the
        sequence numbers go on.
        """
        messages, _, pages, page_size, failed_root = self.fill(5)
        self.assertEqual(set(pages.values()), {4}, "the pending table no longer fits in one page")
        original = self.cut((failed_root - 1) * page_size)
        lines, _ = self.salvaged(original)
        self.assertIn("4 pending and 0 failed message(s) salvaged", lines[0])
        self.assertIn(
            f"it holds {failed_root - 1} whole page(s) of the {failed_root} its header names", lines[1]
        )
        self.assertEqual(
            lines[2:],
            [
                "not salvaged: failed messages 1 on: which of these numbers held a message can not be told "
                "(a damaged page)"
            ],
        )
        self.check_store([1, 2, 4, 5], messages, None, 6)

    def killed_and_cut(self) -> tuple[list[Message], dict[int, int], set[int], int, bytes, bytes]:
        """
        The database and log of a killed hub whose last five messages are
        only in the log, the database then cut short in the middle of the
        pending table.

        @return: the messages, the page of each pending row, the pages the
            log holds, the page the file was cut after, the file's and the
            log's content.
        """
        elsewhere = self.mktemp()
        holder = Store(elsewhere, SynchronousExecutor())
        self.successResultOf(holder.open())
        messages = [make_message(n) for n in range(305)]
        self.successResultOf(holder.commit([(m.id, 1.0, encode(m)) for m in messages[:300]]))
        self.successResultOf(holder.commit([], [], [Failure(3, RETURNED, "312 NO_ROUTE", 2.0)]))
        conn = holder._db.conn
        assert conn is not None
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.successResultOf(holder.commit([(m.id, 1.0, encode(m)) for m in messages[300:]]))
        pages = _pages_of(conn, "pending")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        log = self.copy_as_killed(elsewhere)
        self.successResultOf(holder.close())
        logged = _log_pages(self.path + "-wal", page_size)
        leaves = sorted(set(pages.values()))
        held = leaves[len(leaves) // 2]
        return messages, pages, logged, held, self.cut(held * page_size), log

    def test_cut_with_log(self) -> None:
        """
        A file cut short beside the log a killed hub left: what the log
        holds of the missing pages is salvaged with the pages left; the file
        and its log are kept as found (neither is brought into the other),
        and no log is left beside the new database.
        """
        messages, pages, logged, held, original, data = self.killed_and_cut()
        lines, _ = self.salvaged(original)
        expected = sorted(seq for seq, page in pages.items() if page <= held or page in logged)
        # The log holds the last messages' page, and not all of the pages
        # cut away.
        self.assertEqual(expected[-5:], [301, 302, 303, 304, 305])
        self.assertLess(len(expected), 304)
        self.assertIn(f"{len(expected)} pending and 1 failed message(s) salvaged", lines[0])
        prefix = "its log, as it was found, is kept as "
        self.assertTrue(lines[1].startswith(prefix), lines)
        with open(lines[1][len(prefix):], "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertIn("the damaged database file is cut short", lines[2])
        lost = [n for n in range(1, 306) if n != 3 and n not in expected]
        self.assertTrue(lines[3:])
        for line in lines[3:]:
            words = line.split()
            first, last = int(words[4]), int(words[7].rstrip(":"))
            self.assertEqual(words[:4] + words[5:7], ["not", "salvaged:", "pending", "messages", "up", "to"])
            self.assertTrue(set(range(first, last + 1)) <= set(lost), line)
        self.assertFalse(os.path.exists(self.path + "-wal"))
        self.check_store(expected, messages, messages[2], 306)

    def probe(self) -> str:
        """
        What SQLite says, in another process, to a read of the outbox's
        database.
        """
        script = (
            "import sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1], timeout=0)\n"
            "try:\n"
            "    conn.execute('PRAGMA schema_version').fetchall()\n"
            "except sqlite3.Error as e:\n"
            "    print(e)\n"
            "else:\n"
            "    print('read')\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, self.path], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def test_cut_held_while_salvaged(self) -> None:
        """
        While the copy of a file cut short is read, the file is held with
        SQLite's exclusive lock: another process's read is refused as
        locked.
        """
        messages, failed, pages, page_size, _ = self.fill(300)
        original = self.cut(max(pages.values()) // 2 * page_size)
        self.assertEqual(self.probe(), "database disk image is malformed")
        said = []
        real = salvage_module._build

        def build(*args: Any) -> None:
            said.append(self.probe())
            real(*args)

        self.patch(salvage_module, "_build", build)
        self.salvaged(original)
        self.assertEqual(said, ["database is locked"])
        self.assertEqual(self.probe(), "read")

    def test_cut_in_use(self) -> None:
        """
        A file cut short that another process holds (SQLite's shared lock)
        is refused with 75, and nothing is changed.
        """
        _, _, pages, page_size, _ = self.fill(300)
        original = self.cut(max(pages.values()) // 2 * page_size)
        script = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.lockf(fd, fcntl.LOCK_SH, 510, 0x40000002)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", script, self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdin is not None and holder.stdout is not None
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline(), "held\n")
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 75)
        self.assertEqual(out, "")
        self.assertIn("is in use by another process", self.stderr.getvalue())
        self.assertEqual(os.listdir(self.outbox_dir), [DATABASE_NAME])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), original)

    def test_cut_copy_fails(self) -> None:
        """
        When the copy of a file cut short can not be written (the disk is
        full), the command exits 74 saying so, and nothing is changed.
        """
        messages, failed, pages, page_size, _ = self.fill(300)
        original = self.cut(max(pages.values()) // 2 * page_size)
        real = os.write

        def write(fd: int, data: Any) -> int:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(salvage_module.READING_NAME):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        self.patch(os, "write", write)
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 74)
        self.assertEqual(out, "")
        reading = os.path.join(self.outbox_dir, salvage_module.READING_NAME)
        self.assertIn(
            f"can not copy what is left of {self.path} to {reading} to read it: No space left on device",
            self.stderr.getvalue(),
        )
        self.assertEqual(os.listdir(self.outbox_dir), [DATABASE_NAME])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), original)
        self.assertEqual(self.probe(), "database disk image is malformed")

    def test_cut_with_log_not_replaced(self) -> None:
        """
        When the new database can not be put in place of a file cut short,
        the command exits 74 and the file's log is back beside it as found.
        """
        _, _, _, _, original, log = self.killed_and_cut()
        real = os.replace

        def replace(source: str, target: str) -> None:
            if target == self.path:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(source, target)

        self.patch(os, "replace", replace)
        status, out = self.command("salvage", "-c", self.config)
        self.assertEqual(status, 74)
        self.assertIn(f"can not put the salvaged database in place of {self.path}", self.stderr.getvalue())
        self.assertNotIn("could not put its log back", self.stderr.getvalue())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), original)
        with open(self.path + "-wal", "rb") as f:
            self.assertEqual(f.read(), log)
        self.assertEqual(
            sorted(name.split("-")[:2] for name in os.listdir(self.outbox_dir)),
            [["outbox", "damaged"], ["outbox", "log"], ["outbox.sqlite3"], ["outbox.sqlite3", "wal"]],
        )
