"""
Salvaging the readable messages of a damaged outbox database.

A page of the database that can no longer be read (a bad disk sector, a
file damaged by something else) fails every read of the rows on it: the
outbox can not read its backlog past that point, and publishes nothing
after it (C{outbox_error} on C{/ready}).  Neither the hub nor C{fedhub
outbox} can read or delete such a row through the store.

L{salvage} works on a stopped hub's outbox.  It reads both tables row by
row where a batch fails, copies every row it can read, with its sequence
number, into a new database, and puts the new database in the place of the
old one, which it keeps next to it (C{outbox-damaged-<time>.sqlite3}).  It
reports what could not be read: the sequence numbers (and, when they can
still be read, the message ids) of the rows whose message is unreadable,
and the ranges of sequence numbers whose rows can not even be listed (a
damaged page of the table itself: which numbers it held can not be told).

The new database continues the old sequence numbers (none is used twice),
so the hub publishes the salvaged backlog in its order.  A store whose
messages all read but whose other parts do not (its layout version, the
record of the sequence numbers given, an index or free page SQLite's check
finds damaged: the store would fail to open or to write) is rebuilt the same
way.  A store that reads whole is not replaced; only its log, if any, is
brought into it (as the store's next open would), after a copy of the log
was kept as found (C{outbox-log-<time>.sqlite3-wal}).

A database file cut short (its header names more pages than the file
holds) fails every read: SQLite trusts the header's page count.  It is not
opened in place: held with SQLite's exclusive lock (no SQLite reads or
writes it meanwhile) and left as it was, the whole pages it still holds are
copied to C{outbox-reading.sqlite3}, extended with zeros to the length its
header names, and read instead.  A missing page then reads as a zeroed one
does, and the walk names what was on it; a page cut in the middle is
treated as missing, for what is left of it can not be told from what is
not (its rows point into the part that was cut).  The database's log
(C{-wal}), if any, is read with the copy (from the kept copy of it), and
removed beside the old file before the new one takes its place: the old
log must not be applied to the new file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fedhub.outbox.store import _SCHEMA, DATABASE_NAME, SCHEMA_VERSION, _is_locked

#: Rows read per statement while none fails.
BATCH = 1000

#: Where the new database is built, in the outbox's directory.
BUILDING_NAME = "outbox-salvaging.sqlite3"

#: Where a database cut short is copied to be read, in the outbox's
#: directory.
READING_NAME = "outbox-reading.sqlite3"

# SQLite's locks on a database file (os_unix.c): a write lock on these
# bytes is its EXCLUSIVE lock, which keeps every other connection out.
_PENDING_BYTE = 0x40000000
_LOCK_BYTES = 2 + 510

_COLUMNS = {
    "pending": ("seq", "message_id", "created", "attempts", "data"),
    "failed": ("seq", "message_id", "created", "failed_at", "kind", "reason", "attempts", "data"),
}


class SalvageError(Exception):
    """
    The salvage could not be done; the outbox's database is still the old
    one (see L{salvage}).

    @ivar locked: Whether another process holds the database.
    """

    def __init__(self, reason: str, *, locked: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.locked = locked


@dataclass
class Lost:
    """
    What one table lost.

    @ivar rows: C{(seq, message_id)} of each row whose message can not be
        read; C{message_id} is C{None} when that can not be read either.
    @ivar ranges: C{(after, before)}: the rows with a sequence number
        between these (exclusive; C{before} C{None}: to the end) can not
        be listed.
    """

    rows: list[tuple[int, str | None]] = field(default_factory=list)
    ranges: list[tuple[int, int | None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.ranges)


@dataclass
class SalvageReport:
    """
    What L{salvage} found and did.

    @ivar pending: Pending messages read (and copied, when C{kept} is set).
    @ivar failed: Messages of the failed area read (and copied).
    @ivar lost_pending: What the pending messages lost.
    @ivar lost_failed: What the failed area lost.
    @ivar broken: What else of the database, outside the messages, is
        damaged (its layout version, the record of the sequence numbers
        given, a page SQLite's check finds bad): the store may fail to open
        or to write with every message readable.
    @ivar kept: Where the damaged database was kept, or C{None} when it
        read whole and was not replaced.
    @ivar log_kept: Where a copy of the database's log (C{-wal}) was kept as
        it was found, before SQLite read it (and dropped what of it fails
        its checksums), or C{None} when there was none.
    @ivar cut: C{(held, named)} when the file is cut short: it holds
        C{held} whole pages of the C{named} its header names; C{None}
        otherwise.
    """

    pending: int = 0
    failed: int = 0
    lost_pending: Lost = field(default_factory=Lost)
    lost_failed: Lost = field(default_factory=Lost)
    broken: list[str] = field(default_factory=list)
    kept: str | None = None
    log_kept: str | None = None
    cut: tuple[int, int] | None = None

    @property
    def damaged(self) -> bool:
        """
        Whether anything could not be read.
        """
        return bool(self.lost_pending or self.lost_failed or self.broken or self.cut)


_ROW, _LOST, _GAP = "row", "lost", "gap"


def _rows(conn: sqlite3.Connection, table: str, upper: int) -> Iterator[tuple[str, tuple[object, ...]]]:
    """
    Every row of C{table} in order, as C{("row", values)}; each row that can
    not be read as C{("lost", (seq, message_id))}; each range of rows that
    can not be listed as C{("gap", (after, before))}.

    Rows are read a batch at a time; from a batch that fails, the rows
    before the failure are kept, then the following ones are found and read
    one at a time for a batch's length.  Where even finding the next row
    fails, the next sequence number from which rows can be found is looked
    for, up to C{upper}.
    """
    columns = ", ".join(_COLUMNS[table])
    # Each statement starts from a number (seq >= start), never after one:
    # the search for the row after the last one read would go into the
    # damaged page that held its successor.
    start = 0
    while True:
        count = 0
        try:
            for values in conn.execute(
                f"SELECT {columns} FROM {table} WHERE seq >= ? ORDER BY seq LIMIT ?", (start, BATCH)
            ):
                count += 1
                start = values[0] + 1
                yield _ROW, values
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise
        else:
            if count < BATCH:
                return
            continue
        # Something in the next rows can not be read (and a statement reads
        # a row ahead of the one it returns): a row at a time, each found by
        # a statement of its own that reads no message.
        for _ in range(BATCH):
            works, seq = _first_from(conn, table, start)
            if not works:
                following = _next_key(conn, table, start - 1, upper)
                yield _GAP, (start - 1, following)
                if following is None:
                    return
                start = following
                break
            if seq is None:
                return
            try:
                values = conn.execute(f"SELECT {columns} FROM {table} WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.DatabaseError as e:
                if _is_locked(e):
                    raise
                yield _LOST, (seq, _message_id(conn, table, seq))
            else:
                if values is not None:
                    yield _ROW, values
            start = seq + 1


def _message_id(conn: sqlite3.Connection, table: str, seq: int) -> str | None:
    try:
        row = conn.execute(f"SELECT message_id FROM {table} WHERE seq = ?", (seq,)).fetchone()
    except sqlite3.DatabaseError:
        return None
    return None if row is None else str(row[0])


def _first_from(conn: sqlite3.Connection, table: str, start: int) -> tuple[bool, int | None]:
    """
    Whether the rows from C{start} on can be listed, and the first one's
    sequence number (C{None}: there is none).
    """
    try:
        row = conn.execute(f"SELECT seq FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1", (start,)).fetchone()
    except sqlite3.DatabaseError as e:
        if _is_locked(e):
            raise
        return False, None
    return True, None if row is None else int(row[0])


def _next_key(conn: sqlite3.Connection, table: str, after: int, upper: int) -> int | None:
    """
    The first sequence number after a damaged part of C{table} from which
    rows can be listed again, or C{None}: steps that double from C{after},
    then halving back to the first start that works.
    """
    failing = after
    step = 1
    while True:
        start = after + step
        if start > upper:
            start = upper + 1
        works, first = _first_from(conn, table, start)
        if works:
            break
        if start > upper:
            return None
        failing = start
        step *= 2
    # The damaged part ends between failing and start.
    low, high = failing + 1, start
    while low < high:
        middle = (low + high) // 2
        works_there, first_there = _first_from(conn, table, middle)
        if works_there:
            high, first = middle, first_there
        else:
            low = middle + 1
    return first


def _upper(conn: sqlite3.Connection) -> int:
    """
    The largest sequence number the store has given (or a bound on it).
    """
    candidates = [0]
    for sql in (
        "SELECT seq FROM sqlite_sequence WHERE name = 'pending'",
        "SELECT max(seq) FROM pending",
        "SELECT max(seq) FROM failed",
    ):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise
            continue
        if row is not None and row[0] is not None:
            candidates.append(int(row[0]))
    return max(candidates)


def _schema(conn: sqlite3.Connection) -> str:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError:
        return str(SCHEMA_VERSION)
    return str(SCHEMA_VERSION) if row is None else str(row[0])


def _broken(conn: sqlite3.Connection) -> list[str]:
    """
    What the store needs besides its messages and can not read: its layout
    version (read at every open), the sequence numbers given (read at every
    hand-over), and any page SQLite's own check finds damaged (an index, the
    list of free pages: a write that meets it fails).
    """
    broken = []
    for what, sql in (
        ("the outbox layout version (table meta)", "SELECT value FROM meta WHERE key = 'schema'"),
        ("the sequence numbers given (table sqlite_sequence)", "SELECT seq FROM sqlite_sequence"),
    ):
        try:
            conn.execute(sql).fetchall()
        except sqlite3.DatabaseError as e:
            if _is_locked(e):
                raise
            broken.append(f"{what}: {e}")
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)")]
    except sqlite3.DatabaseError as e:
        if _is_locked(e):
            raise
        found = [str(e)]
    if found != ["ok"]:
        broken.append("SQLite's check of the file: " + "; ".join(found))
    return broken


def _walk(
    conn: sqlite3.Connection, upper: int, report: SalvageReport, copy: sqlite3.Connection | None
) -> int:
    """
    Read both tables into C{report}, inserting what reads into C{copy}.

    @return: the largest sequence number seen.
    """
    largest = 0
    for table in ("pending", "failed"):
        lost = report.lost_pending if table == "pending" else report.lost_failed
        insert = (
            f"INSERT INTO {table} ({', '.join(_COLUMNS[table])}) VALUES "
            f"({', '.join('?' * len(_COLUMNS[table]))})"
        )
        count = 0
        for kind, values in _rows(conn, table, upper):
            if kind == _ROW:
                count += 1
                seq = values[0]
                assert isinstance(seq, int)
                largest = max(largest, seq)
                if copy is not None:
                    copy.execute(insert, values)
            elif kind == _LOST:
                seq, message_id = values
                assert isinstance(seq, int)
                largest = max(largest, seq)
                lost.rows.append((seq, None if message_id is None else str(message_id)))
            else:
                start, end = values
                assert isinstance(start, int)
                lost.ranges.append((start, None if end is None else int(str(end))))
        if table == "pending":
            report.pending = count
        else:
            report.failed = count
    return largest


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=0.5, isolation_level=None, check_same_thread=False)
    # Held from the first read to the close: no hub opens the database
    # meanwhile.
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    return conn


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def salvage(directory: str, *, now: float | None = None) -> SalvageReport:
    """
    Check the outbox database in C{directory}, and when some of it can not
    be read, replace it with a new one holding everything that can.

    The hub must be stopped: the database is opened exclusively, and a hub
    holding it makes this fail with C{locked} set.

    @param now: The time named in the kept database's file name.
    @raise SalvageError: when it can not be done: the outbox's database
        is still the old one.  The copy of its log kept as found stays,
        for whoever looks into the damage, unless another process held
        the database (C{locked}): then nothing was changed at all.
    """
    path = os.path.join(directory, DATABASE_NAME)
    # SQLite would take a missing or empty file for a new database (and
    # throw its log away): the store refuses those, and so does this.
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise SalvageError(f"can not open {path}: {e.strerror or e}") from None
    if not size:
        raise SalvageError(f"{path} is empty: there is nothing in it to salvage")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    # SQLite stops reading a log at its first frame that fails its checksum,
    # and drops the rest with the log once it brings the log in: a copy of
    # the log as found keeps those frames for whoever looks into the damage.
    log_kept = _keep_log(path, stamp)
    try:
        return _salvage_kept(directory, path, size, stamp, log_kept)
    except SalvageError as e:
        if e.locked and log_kept is not None:
            # Another process holds the database: nothing read its log, so
            # the copy is of a log still in use, and nothing was changed.
            _remove(log_kept)
        raise


def _salvage_kept(directory: str, path: str, size: int, stamp: str, log_kept: str | None) -> SalvageReport:
    """
    L{salvage}, once the log (if any) is kept as found at C{log_kept}.
    """
    cut = _cut_short(path, size)
    if cut is None:
        return _salvage_in_place(directory, path, stamp, log_kept)
    # Cut short: SQLite fails every read of it, and lets go of its lock when
    # it does.  The file is held with that lock by hand, and read from a copy.
    page_size, held, named = cut
    holder = _hold(path)
    try:
        reading = os.path.join(directory, READING_NAME)
        _copy_pages(holder, path, reading, page_size, held, named, log_kept)
        try:
            report = _salvage_copy(directory, path, reading, stamp, log_kept)
        finally:
            _remove(reading)
        report.cut = (held, named)
        return report
    finally:
        # The old file is kept (or, on failure, still the outbox's) as it
        # was: SQLite's lock on it ends here.
        os.close(holder)


def _salvage_in_place(directory: str, path: str, stamp: str, log_kept: str | None) -> SalvageReport:
    """
    Salvage the database at C{path}, opened (exclusively) where it is.
    """
    try:
        conn = _connect(path)
    except sqlite3.Error as e:
        raise SalvageError(f"can not open {path}: {e}") from None
    try:
        found, upper = _check(conn, path, log_kept)
        if not found.damaged:
            return found
        # The log, if any, is brought into the old file: the kept copy is
        # then whole without it, and no log of it is left beside the new.
        report, building = _build_beside(conn, directory, path, upper, found, bring_log_in=True)
    finally:
        conn.close()
    if os.path.exists(path + "-wal") and os.path.getsize(path + "-wal"):
        _remove(building)
        raise SalvageError(f"the log {path}-wal could not be brought into {path}")
    report.kept = _replace(directory, path, building, stamp)
    return report


def _salvage_copy(directory: str, path: str, reading: str, stamp: str, log_kept: str | None) -> SalvageReport:
    """
    Salvage the database at C{path} from the copy of it at C{reading}: the
    file at C{path}, and its log, are neither read by SQLite nor written.
    """
    try:
        conn = _connect(reading)
    except sqlite3.Error as e:
        raise SalvageError(f"can not open the copy {reading} of {path}: {e}") from None
    try:
        found, upper = _check(conn, path, log_kept)
        # What the file lacks is damage, even where no message was on it:
        # SQLite refuses the whole file.
        report, building = _build_beside(conn, directory, path, upper, found)
    finally:
        conn.close()
    report.kept = _replace(directory, path, building, stamp, drop_log=True, log_kept=log_kept)
    return report


def _build_beside(
    conn: sqlite3.Connection,
    directory: str,
    path: str,
    upper: int,
    found: SalvageReport,
    *,
    bring_log_in: bool = False,
) -> tuple[SalvageReport, str]:
    """
    Build the new database from what C{conn} reads, at L{BUILDING_NAME} in
    C{directory}, and report on it (with what L{_check} C{found} outside the
    messages).

    @param bring_log_in: Whether to bring C{conn}'s log into its file
        afterwards (C{journal_mode=DELETE}).
    @return: the report and where the new database is.
    @raise SalvageError: when it can not be written (nothing is left of it).
    """
    building = os.path.join(directory, BUILDING_NAME)
    report = SalvageReport(broken=found.broken, log_kept=found.log_kept)
    try:
        _build(conn, building, upper, report)
        if bring_log_in:
            conn.execute("PRAGMA journal_mode=DELETE").fetchall()
    except (sqlite3.Error, OSError) as e:
        _remove(building)
        raise SalvageError(f"can not write the salvaged messages next to {path}: {e}") from None
    return report, building


def _check(conn: sqlite3.Connection, path: str, log_kept: str | None) -> tuple[SalvageReport, int]:
    """
    Take the exclusive lock on C{conn}'s database, bring its log in and
    read both tables through.

    @return: what was found, and the largest sequence number given.
    """
    report = SalvageReport(log_kept=log_kept)
    try:
        # Takes the exclusive lock, and brings the log in.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")
        upper = _upper(conn)
        _walk(conn, upper, report, None)
        if not report.damaged:
            report.broken = _broken(conn)
    except sqlite3.DatabaseError as e:
        if _is_locked(e):
            raise SalvageError(f"{path} is in use by another process", locked=True) from None
        raise SalvageError(f"can not read {path}: {e}") from None
    return report, upper


def _replace(
    directory: str, path: str, building: str, stamp: str, *, drop_log: bool = False, log_kept: str | None = None
) -> str:
    """
    Keep the database at C{path} under a new name, and put the one at
    C{building} in its place.

    @param drop_log: Whether to remove the old database's log: it must not
        be applied to the new file.
    @param log_kept: The copy of that log, put back if the new database
        can not be put in place.
    @return: where the old database was kept.
    """
    dropped = False
    try:
        stat = os.stat(path)
        os.chmod(building, stat.st_mode & 0o777)
        if os.geteuid() == 0:
            os.chown(building, stat.st_uid, stat.st_gid)
        kept = os.path.join(directory, f"outbox-damaged-{stamp}.sqlite3")
        number = 1
        while os.path.lexists(kept):
            number += 1
            kept = os.path.join(directory, f"outbox-damaged-{stamp}-{number}.sqlite3")
        # Kept first, then replaced: at every moment the outbox's file is
        # the old database or the new one.
        os.link(path, kept)
        _fsync_directory(directory)
        if drop_log:
            # Before the new file is in place, never after: SQLite would
            # apply the old log to it.  Until then the outbox's file is the
            # old one without its log, which a second salvage reads less
            # of; the log is kept as found.
            try:
                os.unlink(path + "-wal")
            except FileNotFoundError:
                pass
            else:
                dropped = True
                _fsync_directory(directory)
        os.replace(building, path)
        _fsync_directory(directory)
    except OSError as e:
        _remove(building)
        reason = f"can not put the salvaged database in place of {path}: {e}"
        if dropped and log_kept is not None and not _put_back(log_kept, path + "-wal", path):
            reason += f" (and could not put its log back: copy {log_kept} to {path}-wal)"
        raise SalvageError(reason) from None
    return kept


def _put_back(log_kept: str, log: str, database: str) -> bool:
    """
    Copy the kept log back where it was found, when the old database stays
    the outbox's (a copy: the kept one stays as found when SQLite later
    reads and empties the other), with the database's owner.

    @return: whether it could be.
    """
    try:
        with open(log_kept, "rb") as source, open(log, "xb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            os.fsync(copy.fileno())
        stat = os.stat(database)
        os.chmod(log, stat.st_mode & 0o777)
        if os.geteuid() == 0:
            os.chown(log, stat.st_uid, stat.st_gid)
        _fsync_directory(os.path.dirname(log))
    except OSError:
        return False
    return True


def _cut_short(path: str, size: int) -> tuple[int, int, int] | None:
    """
    Whether the database file at C{path} (of C{size} bytes) holds fewer
    pages than its header names, which makes SQLite refuse every read.

    SQLite trusts the header's page count (bytes 28-31) when it is not 0
    and the change counter (bytes 24-27) equals the number the count is
    valid for (bytes 92-95); otherwise it takes the file's length, and the
    file is not short for it.

    @return: C{(page_size, held, named)}: the whole pages the file holds
        and those its header names; C{None} when it is not cut short.
    @raise SalvageError: when the header can not be read.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise SalvageError(f"can not read {path}: {e.strerror or e}") from None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None
    (page_size,) = struct.unpack_from(">H", header, 16)
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        return None
    change, named = struct.unpack_from(">II", header, 24)
    (valid_for,) = struct.unpack_from(">I", header, 92)
    if not named or valid_for != change or named * page_size <= size:
        return None
    return page_size, size // page_size, named


def _hold(path: str) -> int:
    """
    Take SQLite's exclusive lock on the database file at C{path} without
    SQLite (which reads the file as it locks it, and lets go when that
    fails).  The lock lasts until the returned descriptor is closed; no
    other descriptor of the file may be closed meanwhile (that would end
    it: POSIX locks belong to the process).

    @raise SalvageError: when another process holds the file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise SalvageError(f"can not open {path}: {e.strerror or e}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _LOCK_BYTES, _PENDING_BYTE)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise SalvageError(f"{path} is in use by another process", locked=True) from None
        raise SalvageError(f"can not lock {path}: {e.strerror or e}") from None
    return fd


def _copy_pages(
    source: int, path: str, reading: str, page_size: int, held: int, named: int, log_kept: str | None
) -> None:
    """
    Copy the C{held} whole pages of the database open as C{source} to
    C{reading}, extended with zeros to the C{named} pages, and the kept log
    beside it.  A page the file holds only part of is left out: its rows
    point into the part that is gone, and would read as rows that never
    were.  The schema's pages past the end are then there (zeroed), and
    SQLite reads the tables they do not hold.

    @raise SalvageError: when the copy can not be made (nothing is left of
        it).
    """
    _remove(reading)
    try:
        fd = os.open(reading, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            offset, end = 0, held * page_size
            while offset < end:
                chunk = os.pread(source, min(1 << 20, end - offset), offset)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                offset += len(chunk)
            os.ftruncate(fd, named * page_size)
        finally:
            os.close(fd)
        if log_kept is not None:
            shutil.copyfile(log_kept, reading + "-wal")
    except OSError as e:
        _remove(reading)
        raise SalvageError(
            f"can not copy what is left of {path} to {reading} to read it: {e.strerror or e}"
        ) from None


def _keep_log(path: str, stamp: str) -> str | None:
    """
    Copy the log of the database at C{path}, if it holds anything, to
    C{outbox-log-<stamp>.sqlite3-wal} beside it (fsync'd); where it went.

    @raise SalvageError: when it can not be copied (nothing was changed).
    """
    log = path + "-wal"
    try:
        if not os.path.getsize(log):
            return None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SalvageError(f"can not read the log {log}: {e.strerror or e}") from None
    directory = os.path.dirname(path)
    kept = os.path.join(directory, f"outbox-log-{stamp}.sqlite3-wal")
    number = 1
    while os.path.lexists(kept):
        number += 1
        kept = os.path.join(directory, f"outbox-log-{stamp}-{number}.sqlite3-wal")
    try:
        with open(log, "rb") as source, open(kept, "xb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            os.fsync(copy.fileno())
        os.chmod(kept, os.stat(log).st_mode & 0o777)
        _fsync_directory(directory)
    except OSError as e:
        _remove(kept)
        raise SalvageError(f"can not keep a copy of the log {log}: {e.strerror or e}") from None
    return kept


def _build(conn: sqlite3.Connection, building: str, upper: int, report: SalvageReport) -> None:
    """
    Copy what reads into a new database at C{building}, continuing the old
    sequence numbers.
    """
    _remove(building)
    copy = sqlite3.connect(building, isolation_level=None)
    try:
        copy.execute("PRAGMA synchronous=FULL")
        copy.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            copy.execute(statement)
        copy.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (_schema(conn),))
        largest = max(_walk(conn, upper, report, copy), upper)
        for start, end in report.lost_pending.ranges + report.lost_failed.ranges:
            largest = max(largest, start, end or 0)
        # No sequence number is given twice, not even one lost.
        copy.execute("DELETE FROM sqlite_sequence WHERE name = 'pending'")
        copy.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('pending', ?)", (largest,))
        copy.execute("COMMIT")
    finally:
        copy.close()


def _remove(path: str) -> None:
    for name in (path, path + "-journal", path + "-wal"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
