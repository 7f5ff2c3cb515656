"""
List, retry or drop the messages in a domain's outbox failed area, or salvage a damaged outbox.

The failed area holds what the broker returned as unroutable or refused
(see C{docs/outbox.md}); the hub never retries those by itself.

  - C{fedhub outbox list [--json]}: one row per message: sequence number, id,
    topic, kind, when it failed, attempts and the reason;
  - C{fedhub outbox retry SEQ|ID ... | --all}: move messages back to the
    pending queue, which the hub publishes;
  - C{fedhub outbox drop SEQ|ID ... | --all}: delete them for good;
  - C{fedhub outbox salvage}: on a stopped hub, copy every readable message
    of a damaged outbox database into a new one and name those that could
    not be read, exiting 1 when there were any (see L{fedhub.outbox.salvage}).

Messages are named by their sequence number (the first column of C{list}) or
their message id.  The outbox lives in C{<state_dir>/outbox/<domain>/}.  The
hub holds its outbox's database with an exclusive lock for as long as it
runs (so that two hubs never publish one outbox): on a stopped hub these
commands open the database themselves; while the hub runs they send their
request through the domain's spool and the hub carries it out (exit 75 when
it does not answer within 10 s; a retry or drop then stays queued, while a
list, also the look-up of the names a retry or drop is given, changes
nothing).

Either way the failed area, which may hold up to the outbox's byte limit, is
read a page at a time (at most L{PAGE} records and L{PAGE_BYTES} bytes of
stored messages; the running hub answers with pages of its own size), and
C{list} prints each page as it comes: neither this command nor the hub holds
more than one page.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from fedhub.cli import runner
from fedhub.cli.runner import (
    EX_IOERR,
    EX_NOPERM,
    EX_NOTFOUND,
    EX_OK,
    EX_TEMPFAIL,
    CommandError,
)
from fedhub.config import Config
from fedhub.errors import DecodeError
from fedhub.outbox.salvage import SalvageError, salvage
from fedhub.outbox.spool import spool_directory, write_request
from fedhub.outbox.store import DATABASE_NAME, FailedRecord, Store, StoreError, SynchronousExecutor
from fedhub.tap import LOCK_FILE, hub_running
from fedhub.text import ascii_digits, escape_control

_T = TypeVar("_T")

#: Records read from the store at a time...
PAGE = 5000

#: ...and at most this many bytes of their stored messages (but at least
#: one record).
PAGE_BYTES = 4 * 1024 * 1024

#: How long to wait for the running hub to answer a request.
REQUEST_TIMEOUT = 10.0

#: How long to wait for the database when another process holds it briefly.
LOCK_TIMEOUT = 2.0


def outbox_directory(config: Config, domain: str) -> str:
    """
    Where the hub keeps the outbox of a domain.
    """
    return os.path.join(config.hub.state_dir, "outbox", domain)


def _now(d: Deferred[_T]) -> _T:
    """
    The result of a Deferred that has fired (the store runs synchronously
    here), raising its failure.
    """
    results: list[_T | Failure] = []
    d.addBoth(results.append)
    if not results:  # pragma: no cover - a synchronous executor always fires
        raise RuntimeError("the store did not answer synchronously")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class FailedArea:
    """
    The failed area of one outbox, opened in this process with a synchronous
    store (blocking: fine for a command that has nothing else to do).
    """

    def __init__(self, directory: str, domain: str) -> None:
        self.directory = directory
        self.domain = domain
        self.store = Store(directory, SynchronousExecutor(), lock_timeout=LOCK_TIMEOUT)

    @property
    def exists(self) -> bool:
        """
        Whether the outbox has a database at all (it is made when the hub
        first starts), or the log of one whose file is missing (which the
        store refuses to open).

        @raise CommandError: C{EX_NOPERM} when this user may not look, else
            C{EX_IOERR} when it can not be told.
        """
        database = os.path.join(self.directory, DATABASE_NAME)
        for path in (database, database + "-wal"):
            try:
                os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                status = EX_NOPERM if isinstance(e, PermissionError) else EX_IOERR
                raise CommandError(
                    f"can not look at the outbox of domain {self.domain} ({path}): "
                    f"{e.strerror or e}", status,
                ) from None
            return True
        return False

    def open(self) -> None:
        """
        Open the database.

        @raise CommandError: C{EX_TEMPFAIL} while the hub holds it, else
            C{EX_IOERR}.
        """
        try:
            _now(self.store.open())
        except StoreError as e:
            if e.locked:
                raise CommandError(
                    f"the outbox of domain {self.domain} is in use ({e.path}): it is locked by "
                    "the running hub; stop the hub, then run this again",
                    EX_TEMPFAIL,
                ) from None
            raise CommandError(f"can not open the outbox of domain {self.domain}: {e}", EX_IOERR) from None

    def close(self) -> None:
        """
        Close the database.
        """
        try:
            _now(self.store.close())
        except StoreError:
            pass

    def pages(self) -> Iterator[list[FailedRecord]]:
        """
        Every record, oldest failure first, a page at a time (the first
        page empty when there are none).
        """
        after = 0
        while True:
            page = _now(self.store.failed_page(after, PAGE, PAGE_BYTES))
            yield page.records
            if page.next_after is None:
                return
            after = page.next_after

    def retry(self, seqs: list[int] | None) -> int:
        """
        Move failed messages back to pending; return how many.
        """
        try:
            return _now(self.store.retry_failed(seqs, time.time()))
        except StoreError as e:
            raise CommandError(f"retry failed: {e}", EX_IOERR) from None

    def drop(self, seqs: list[int] | None) -> int:
        """
        Delete failed messages; return how many.
        """
        try:
            return _now(self.store.drop_failed(seqs))
        except StoreError as e:
            raise CommandError(f"drop failed: {e}", EX_IOERR) from None

    def select(self, names: list[str]) -> tuple[list[int], list[str]]:
        """
        The sequence numbers of the records named by sequence number or
        message id, and the names that match none.

        A name is a message id first (every record of that id), else a
        sequence number.  The failed area is read once, a page at a time,
        whatever the number of names; only the matches are kept.
        """
        ids = set(names)
        numbers = {seq for seq in map(_sequence_number, names) if seq is not None}
        by_id: dict[str, list[int]] = {}
        numbered: set[int] = set()
        for page in self.pages():
            for record in page:
                if record.message_id in ids:
                    by_id.setdefault(record.message_id, []).append(record.seq)
                if record.seq in numbers:
                    numbered.add(record.seq)
        seqs: list[int] = []
        chosen: set[int] = set()
        missing: list[str] = []
        for name in names:
            matched = by_id.get(name, [])
            if not matched:
                seq = _sequence_number(name)
                if seq is not None and seq in numbered:
                    matched = [seq]
            if not matched:
                missing.append(name)
            for seq in matched:
                if seq not in chosen:
                    chosen.add(seq)
                    seqs.append(seq)
        return seqs, missing


def _sequence_number(name: str) -> int | None:
    """
    The sequence number a name given on the command line stands for, if
    any: ASCII digits, at most 20 of them (a sequence number is a 64-bit
    integer; Python refuses to read thousands of digits).
    """
    if ascii_digits(name) and len(name) <= 20:
        return int(name)
    return None


def _time(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).replace(microsecond=0).isoformat()


def _topic(record: FailedRecord) -> str:
    try:
        return record.message().topic
    except DecodeError:
        return "?"


def as_json(record: FailedRecord) -> str:
    """
    One record as one JSON object: its fields and, under C{message}, the
    stored message in the serialized form (C{null} when it does not decode).
    """
    try:
        message: Any = record.message().to_serialized()
    except DecodeError:
        message = None
    return json.dumps(
        {
            "seq": record.seq,
            "id": record.message_id,
            "topic": _topic(record),
            "kind": record.kind,
            "reason": record.reason,
            "created": _time(record.created),
            "failed_at": _time(record.failed_at),
            "attempts": record.attempts,
            "message": message,
        },
        ensure_ascii=True,
        sort_keys=True,
        default=str,
    )


HEADER = ("SEQ", "ID", "TOPIC", "KIND", "FAILED AT", "ATTEMPTS", "REASON")


def _row(record: FailedRecord) -> tuple[str, ...]:
    return (
        str(record.seq),
        escape_control(record.message_id, 64),
        escape_control(_topic(record), 100),
        record.kind,
        _time(record.failed_at),
        str(record.attempts),
        escape_control(record.reason, 200),
    )


class Table:
    """
    The records as aligned text lines, a page at a time, the header
    first; untrusted text escaped.

    Each column but the last is padded to its widest cell so far, as
    L{runner.aligned} pads a whole table: records that fit in one page come
    out exactly so, and a later page that needs a wider column widens it
    from there on, without holding the pages before it.
    """

    def __init__(self) -> None:
        self.widths = [0] * (len(HEADER) - 1)
        self.started = False

    def lines(self, records: Sequence[FailedRecord]) -> list[str]:
        """
        The lines of the next page of records (with the header, for the
        first).
        """
        rows = [_row(record) for record in records]
        if not self.started:
            self.started = True
            rows.insert(0, HEADER)
        for row in rows:
            self.widths = [max(width, len(cell)) for width, cell in zip(self.widths, row)]
        return runner.aligned(rows, self.widths)


def table(records: Sequence[FailedRecord]) -> list[str]:
    """
    The records as aligned text lines, a header first; untrusted text
    escaped.
    """
    return Table().lines(records)


# --- the command -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Arguments of C{fedhub outbox}.
    """
    runner.add_config_arguments(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="list the failed messages", description="List the failed messages.")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    runner.add_config_arguments(listing, inner=True)
    for name, summary in (
        ("retry", "move failed messages back to the pending queue (a running hub publishes them "
                  "at once, a stopped one when it starts)"),
        ("drop", "delete failed messages for good"),
    ):
        action = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        action.add_argument("ids", nargs="*", metavar="SEQ|ID", help="sequence numbers or message ids")
        action.add_argument("--all", action="store_true", help="every failed message")
        runner.add_config_arguments(action, inner=True)
    rescue = actions.add_parser(
        "salvage",
        help="copy every readable message of a damaged outbox into a new database (hub stopped)",
        description="Copy every message of a stopped hub's outbox that can still be read into a new "
        "database that takes its place, keep the damaged one beside it, and list the sequence "
        "numbers of the messages that could not be read. An outbox that reads whole is not replaced.",
    )
    runner.add_config_arguments(rescue, inner=True)


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """
    List, retry or drop; exit 1 when some of the named messages were not
    found (the others are acted on), 75 while the hub holds the outbox.
    """
    try:
        return _run(args, out or sys.stdout)
    except CommandError as e:
        return runner.fail("outbox", e.reason, e.status)


def _run(args: argparse.Namespace, out: IO[str]) -> int:
    action: str = args.action
    names = None if action in ("list", "salvage") else runner.names_or_all(args, "SEQ or ID")
    config = runner.read_config(args.config)
    domain = runner.domain_of(config, args.domain, need_broker=False)
    if action == "salvage":
        return _salvage(config, domain.name, out)
    area = FailedArea(outbox_directory(config, domain.name), domain.name)
    if not area.exists:
        if action == "list":
            if not args.json:
                print(f"the outbox of domain {domain.name} has no failed messages", file=out)
            return EX_OK
        if names:
            raise CommandError(f"not found: {', '.join(escape_control(i) for i in names)}", EX_NOTFOUND)
        print(f"0 message(s) {'moved back to pending' if action == 'retry' else 'dropped'}", file=out)
        return EX_OK
    try:
        area.open()
    except CommandError as e:
        if e.status != EX_TEMPFAIL:
            raise
        if not hub_running(config.hub.state_dir):
            # Locked, but by no hub: a request queued now would wait for
            # whenever a hub starts.
            raise CommandError(
                f"the outbox of domain {domain.name} is in use by another process, not a running "
                f"hub ({os.path.join(area.directory, DATABASE_NAME)}); nothing was changed: try "
                "again once it is done", EX_TEMPFAIL,
            ) from None
        # The running hub holds the outbox: ask it through the spool.
        area = HubFailedArea(
            spool_directory(config.hub.state_dir, domain.name), domain.name, REQUEST_TIMEOUT
        )
    try:
        if action == "list":
            return _list(area, args.json, out)
        return _act(area, action, names, out)
    finally:
        area.close()


@contextmanager
def _hub_kept_out(state_dir: str, domain: str) -> Iterator[None]:
    """
    Hold the hub's lock of the state directory (when there is one), so that
    no hub starts while the outbox is being replaced.

    @raise CommandError: C{EX_TEMPFAIL} while a hub runs.
    """
    path = os.path.join(state_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # No hub ran here yet (or its lock file went): made now, owned like
        # the state directory, so that a hub starting meanwhile is refused
        # as if another hub ran, and can use the file afterwards.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.geteuid() == 0:
                owner = os.stat(state_dir)
                os.fchown(fd, owner.st_uid, owner.st_gid)
        except OSError as e:
            raise CommandError(f"can not make the lock file {path}: {e.strerror or e}", EX_IOERR) from None
    except OSError as e:
        raise CommandError(f"can not open the lock file {path}: {e.strerror or e}", EX_IOERR) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CommandError(f"can not lock {state_dir}: {e.strerror or e}", EX_IOERR) from None
            raise CommandError(
                f"the hub is running ({os.path.join(state_dir, LOCK_FILE)} is locked): the outbox "
                f"of domain {domain} can only be salvaged while the hub is stopped; stop it, then "
                "run this again (nothing was changed)", EX_TEMPFAIL,
            ) from None
        yield
    finally:
        os.close(fd)


def _salvage(config: Config, domain: str, out: IO[str]) -> int:
    """
    Copy every readable message of a damaged outbox into a new database
    (see L{fedhub.outbox.salvage}) and say what could not be read.
    """
    area = FailedArea(outbox_directory(config, domain), domain)
    if not area.exists:
        print(f"the outbox of domain {domain} has no database: nothing to salvage", file=out)
        return EX_OK
    with _hub_kept_out(config.hub.state_dir, domain):
        try:
            report = salvage(area.directory)
        except SalvageError as e:
            if e.locked:
                raise CommandError(
                    f"the outbox of domain {domain} is in use by another process ({e.reason}); "
                    "nothing was changed: stop it, then run this again", EX_TEMPFAIL,
                ) from None
            raise CommandError(f"can not salvage the outbox of domain {domain}: {e.reason}", EX_IOERR) from None
    if not report.damaged:
        print(
            f"the outbox of domain {domain} reads whole ({report.pending} pending, {report.failed} "
            "failed message(s)): nothing to salvage", file=out,
        )
        if report.log_kept is not None:
            print(f"its log, as it was found, is kept as {report.log_kept}", file=out)
        return EX_OK
    print(
        f"the outbox of domain {domain}: {report.pending} pending and {report.failed} failed "
        f"message(s) salvaged into a new database; the damaged one is kept as {report.kept}",
        file=out,
    )
    if report.log_kept is not None:
        print(f"its log, as it was found, is kept as {report.log_kept}", file=out)
    if report.cut is not None:
        held, named = report.cut
        print(
            f"the damaged database file is cut short: it holds {held} whole page(s) of the {named} its "
            "header names; the others, and a page cut in the middle, are missing (but for what its log held)",
            file=out,
        )
    for what in report.broken:
        print(f"damaged, though every message reads: {escape_control(what, 1000)}", file=out)
    for table, lost in (("pending", report.lost_pending), ("failed", report.lost_failed)):
        for seq, message_id in lost.rows:
            shown = "unreadable" if message_id is None else escape_control(message_id, 255)
            print(f"not salvaged: {table} message {seq} (id {shown}): it can not be read", file=out)
        for after, before in lost.ranges:
            upto = "on" if before is None else f"up to {before - 1}"
            print(
                f"not salvaged: {table} messages {max(1, after + 1)} {upto}: which of these numbers held "
                "a message can not be told (a damaged page)", file=out,
            )
    if report.lost_pending or report.lost_failed:
        # Done, but not whole: a script can tell from the status.
        return EX_NOTFOUND
    return EX_OK


def _list(area: FailedArea, as_lines: bool, out: IO[str]) -> int:
    listing = Table()
    for page in area.pages():
        if as_lines:
            for record in page:
                print(as_json(record), file=out)
        elif page:
            for line in listing.lines(page):
                print(line, file=out)
    if not as_lines and not listing.started:
        print(f"the outbox of domain {area.domain} has no failed messages", file=out)
    return EX_OK


def _act(area: FailedArea, action: str, names: list[str] | None, out: IO[str]) -> int:
    missing: list[str] = []
    seqs: list[int] | None = None
    if names is not None:
        seqs, missing = area.select(names)
    count = 0
    if seqs is None or seqs:
        count = area.retry(seqs) if action == "retry" else area.drop(seqs)
    if action == "retry":
        when = "now" if isinstance(area, HubFailedArea) else "when it starts"
        print(f"{count} message(s) moved back to pending; the hub publishes them {when}", file=out)
    else:
        print(f"{count} message(s) dropped", file=out)
    if missing:
        return runner.fail("outbox", f"not found: {', '.join(escape_control(m) for m in missing)}", EX_NOTFOUND)
    return EX_OK


def _record_data(answer: dict[str, Any]) -> bytes:
    """
    The stored record in the hub's answer: base64, or text from a hub of a
    layout whose records were text (what it could not say as text is
    lost, so that message shows as not decodable).
    """
    if "data_base64" in answer:
        try:
            return base64.b64decode(answer["data_base64"], validate=True)
        except (binascii.Error, TypeError):
            return b""
    return str(answer.get("data", "")).encode("utf-8")


class HubFailedArea(FailedArea):
    """
    The failed area of an outbox the running hub holds, reached through
    requests in the domain's spool that the hub carries out (see
    L{fedhub.outbox.spool}).
    """

    def __init__(self, spool: str, domain: str, timeout: float = REQUEST_TIMEOUT) -> None:
        self.spool = spool
        self.domain = domain
        self.timeout = timeout

    def open(self) -> None:
        """
        Nothing to open: the hub has it.
        """

    def close(self) -> None:
        """
        Nothing to close.
        """

    def _ask(self, action: str, seqs: list[int] | None, after: int | None = None) -> dict[str, Any]:
        try:
            reply = write_request(self.spool, action, seqs, after)
        except OSError as e:
            raise CommandError(f"can not ask the hub: {e}", EX_IOERR) from None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                with open(reply, "rb") as f:
                    answer: dict[str, Any] = json.loads(f.read())
            except FileNotFoundError:
                try:
                    time.sleep(0.1)
                except KeyboardInterrupt:
                    # The request is in the spool already: the hub may act
                    # on it at any moment, so say so rather than imply that
                    # Ctrl-C cancelled it.
                    raise CommandError(
                        f"interrupted while waiting for the hub; {self._left(action)}",
                        runner.interrupted_status(signal.SIGINT),
                    ) from None
                continue
            os.unlink(reply)
            if "error" in answer:
                raise CommandError(f"the hub refused: {answer['error']}", EX_TEMPFAIL)
            return answer
        raise CommandError(
            f"the hub holds the outbox of domain {self.domain} but did not answer within "
            f"{self.timeout:g} s; {self._left(action)}",
            EX_TEMPFAIL,
        )

    @staticmethod
    def _left(action: str) -> str:
        """
        What an unanswered request leaves behind.  A list (also the look-up
        of the names given to retry or drop) changes nothing; a retry or a
        drop stays queued, and the hub carries it out.
        """
        if action == "list":
            return "nothing was changed"
        return f"the {action} request stays queued and the hub carries it out"

    def pages(self) -> Iterator[list[FailedRecord]]:
        """
        Every record, a page per request: the hub answers with one page and
        the sequence number to ask after for the next (none after the
        last).
        """
        after: int | None = None
        while True:
            answer = self._ask("list", None, after)
            yield [
                FailedRecord(
                    seq=r["seq"], message_id=r["message_id"], created=r["created"],
                    failed_at=r["failed_at"], kind=r["kind"], reason=r["reason"],
                    attempts=r["attempts"], data=_record_data(r),
                )
                for r in answer["records"]
            ]
            following = answer.get("next")
            if following is None:
                return
            if (
                not isinstance(following, int)
                or isinstance(following, bool)
                or following <= (after or 0)
            ):
                # Asking after it again would never end.
                raise CommandError(
                    f"the hub answered with a page that does not lead on (next {following!r} "
                    f"after {after or 0})", EX_TEMPFAIL,
                )
            after = following

    def retry(self, seqs: list[int] | None) -> int:
        return int(self._ask("retry", seqs)["count"])

    def drop(self, seqs: list[int] | None) -> int:
        return int(self._ask("drop", seqs)["count"])
