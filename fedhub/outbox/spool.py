"""
The spool: how other processes hand messages to a running hub's outbox.

A command such as C{fedhub inject-mail}, run by a mail transfer agent for one
mail, can not share the hub's process.  It writes the message as one file into
the domain's spool directory (C{<state_dir>/spool/<domain>/}): written to a
temporary name, fsync'd, renamed, and the directory fsync'd, so once
L{write_spool} returns the message survives a crash of either process.  The
hub's L{SpoolImporter} picks the files up in name order (which is hand-over
order), hands each to the domain's outbox, and deletes the file only after the
outbox made the message durable, before handing over the next one.  When the
hub is not running the files wait; they are imported when it starts.

Nothing records a hand-over and the deletion of its file together: a hub
killed between the two hands that one message over again at its next start,
with the same id (and a power loss before the directory is fsync'd, once per
batch, may bring back the files of that batch).  A file that can not be
deleted is not handed over again by the same hub; later scans try to delete
it first, and stop there while that fails.

The spool also carries requests about the outbox's failed area from
C{fedhub outbox} while the hub holds the outbox: a request file
(C{*.ctl}: C{{"action": "list"|"retry"|"drop", "seqs": [...] or null,
"reply": NAME}}) is carried out by the importer, which writes the answer to
C{replies/NAME.json} in the spool directory and then deletes the request.
A hub killed in between carries the request out again at its next start, so
before it retries or drops anything it fixes the messages the request means
(every failed one for C{null}, else those of C{seqs} still failed) in the
request file, as C{"found": [...]}, written durably like a spool file; a
request carried out again acts on those only, never on messages that failed
since, and answers with their number again.

A list is answered a page at a time (at most L{LIST_RECORDS} records and
L{LIST_BYTES} bytes of stored messages, but at least one record), so the hub
never holds more of a large failed area at once: the request names the
sequence number to list after (C{"after"}, 0 without it) and the answer the
one to ask after for the next page (C{"next"}), left out after the last
page.

The spool is bounded: L{write_spool} refuses with L{TemporarilyUnavailable}
when it holds C{max_files} messages already, so a stopped hub makes the mail
system keep mail queued instead of filling the disk.

A spool file that can never be handed over (not one valid message, larger
than L{MAX_FILE_BYTES}, or refused by the outbox for good, e.g. larger than
the whole outbox) is renamed to C{*.bad} and kept for inspection; the files
after it are imported as usual.  One that disappears before it can be set
aside is logged and skipped.  One the hub can not read (written by another
user) is left where it is and logged once, while the files after it are
imported; it is imported once it can be read.  The importer reads files a
batch at a time, at most L{BATCH_BYTES} of them at once, and removes the
temporary files of writers killed half-way once they are L{STALE_AFTER}
seconds old (looking every L{PRUNE_INTERVAL} seconds).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import time
from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from fedhub.errors import DecodeError, MessageError, PublishError, TemporarilyUnavailable
from fedhub.files import fsync_directory, replace_durably
from fedhub.interfaces import IPublisher
from fedhub.logs import HubLogger
from fedhub.message import Message, dump_line, iter_loads
from fedhub.text import escape_control

#: Spool files end in this; anything else in the directory is ignored.
SUFFIX = ".msg"

#: Requests about the failed area end in this.
CONTROL_SUFFIX = ".ctl"

#: Answers to requests go in this subdirectory.
REPLIES = "replies"

#: A reply, or a temporary file, older than this many seconds is left over
#: (a command that gave up waiting, a writer that died midway) and removed
#: by the running hub (every L{PRUNE_INTERVAL} seconds, and when it answers
#: a request).
STALE_AFTER = 3600.0
#: Seconds between two removals of stale files by the running hub.
PRUNE_INTERVAL = 600.0

#: The spool holds at most this many messages by default.
DEFAULT_MAX_FILES = 10_000

#: A spool file larger than this is never read: the importer sets it aside
#: as too large.
MAX_FILE_BYTES = 16 * 1024 * 1024

#: A request file larger than this is never carried out (a request for every
#: failed message grows by the sequence numbers it is fixed to).
REQUEST_BYTES = MAX_FILE_BYTES

#: The importer holds at most this many bytes of spool files at once (and at
#: least one file), so a burst of large mails does not fill the hub's memory.
BATCH_BYTES = 16 * 1024 * 1024

#: A list request is answered with at most this many failed records...
LIST_RECORDS = 5000

#: ...and at most this many bytes of their stored messages (but at least
#: one record): a page, not the whole failed area, which may hold up to the
#: outbox's byte limit.
LIST_BYTES = 4 * 1024 * 1024

_sequence = 0


def spool_directory(state_dir: str, domain: str) -> str:
    """
    The spool directory of a domain.
    """
    return os.path.join(state_dir, "spool", domain)


def write_spool(directory: str, message: Message, max_files: int = DEFAULT_MAX_FILES) -> str:
    """
    Write one message durably into a spool directory.  This blocks on disk
    I/O: it is for short-lived commands, never for the reactor thread.

    @return: The path of the spool file.
    @raise TemporarilyUnavailable: when the spool is full or the disk is
        (the caller should try again later).
    """
    global _sequence
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        waiting = sum(1 for name in os.listdir(directory) if name.endswith(SUFFIX))
    except OSError as e:
        raise TemporarilyUnavailable(f"spool {directory} can not be used: {e.strerror}") from None
    if waiting >= max_files:
        raise TemporarilyUnavailable(
            f"spool {directory} holds {waiting} messages already (limit {max_files}); "
            "is the hub running?",
            message.id,
        )
    _sequence += 1
    # Names sort in hand-over order: time in nanoseconds, then pid and a counter.
    name = f"{time.time_ns():020d}-{os.getpid()}-{_sequence}"
    temporary = os.path.join(directory, f".{name}.tmp")
    final = os.path.join(directory, name + SUFFIX)
    data = dump_line(message).encode("utf-8")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, final)
        fsync_directory(directory)
    except OSError as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        error = TemporarilyUnavailable(
            f"spool {directory}: {'disk full' if full else e.strerror}", message.id
        )
        raise error from None
    return final


def write_request(
    directory: str, action: str, seqs: list[int] | None, after: int | None = None
) -> str:
    """
    Ask the running hub to act on the failed area (blocking; for commands).

    @param after: For a list, the page of records after this sequence
        number (the C{"next"} of the previous answer); the first without it.
    @return: The path its answer will be written to.
    """
    global _sequence
    _sequence += 1
    name = f"{time.time_ns():020d}-{os.getpid()}-{_sequence}"
    os.makedirs(os.path.join(directory, REPLIES), mode=0o700, exist_ok=True)
    request: dict[str, Any] = {"action": action, "seqs": seqs, "reply": name}
    if after is not None:
        request["after"] = after
    replace_durably(
        os.path.join(directory, name + CONTROL_SUFFIX), json.dumps(request).encode("utf-8"), ".tmp"
    )
    return os.path.join(directory, REPLIES, name + ".json")


def _request_paths(directory: str) -> list[str]:
    """
    Up to 20 request files, oldest first.
    """
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(CONTROL_SUFFIX))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, name) for name in names[:20]]


def _read_request(path: str) -> bytes | None:
    """
    The contents of a request file, at most one byte more than
    L{REQUEST_BYTES}; C{None} when it is gone.
    """
    try:
        with open(path, "rb") as f:
            return f.read(REQUEST_BYTES + 1)
    except FileNotFoundError:
        return None


def _rewrite_request(directory: str, path: str, data: bytes) -> None:
    """
    Replace a request file with C{data} durably: once this returns, a crash
    brings back the new request, never the old one.
    """
    replace_durably(path, data, ".tmp")
    fsync_directory(directory)


def _is_seq_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in value
    )


def _prune_stale(directory: str) -> None:
    """
    Remove the replies and temporary files older than L{STALE_AFTER}: no
    command waits for such a reply any more, and no writer for such a file.
    """
    limit = time.time() - STALE_AFTER
    for folder, suffix in ((os.path.join(directory, REPLIES), ".json"), (directory, ".tmp")):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if (
                    entry.name.endswith(suffix)
                    and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < limit
                ):
                    os.unlink(entry.path)
            except OSError:
                pass


def _answer(directory: str, request_path: str, reply: str, answer: dict[str, Any]) -> None:
    _prune_stale(directory)
    if reply and all(c.isalnum() or c in "-_" for c in reply):
        os.makedirs(os.path.join(directory, REPLIES), mode=0o700, exist_ok=True)
        replace_durably(
            os.path.join(directory, REPLIES, reply + ".json"),
            json.dumps(answer).encode("utf-8"),
            ".tmp",
        )
    os.unlink(request_path)


def _read_batch(
    directory: str, limit: int, unreadable: dict[str, str] | None = None
) -> list[tuple[str, bytes | None]]:
    """
    Up to C{limit} spool files, oldest first, with their contents: as many
    as fit in L{BATCH_BYTES} (at least one).  A file larger than
    L{MAX_FILE_BYTES} comes without its contents (C{None}), unread.

    A file that can not be opened or read (written by another user, say)
    is skipped, so it does not hold up the files after it, and does not
    count towards C{limit}.

    @param unreadable: Given, it gets the path of each file skipped so,
        with the reason.
    """
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(SUFFIX))
    except FileNotFoundError:
        return []
    batch: list[tuple[str, bytes | None]] = []
    total = 0
    for name in names:
        if len(batch) >= limit:
            break
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_FILE_BYTES:
                    batch.append((path, None))
                    continue
                if batch and total + size > BATCH_BYTES:
                    break
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            continue
        except OSError as e:
            if unreadable is not None:
                unreadable[path] = e.strerror or e.__class__.__name__
            continue
        if len(data) > MAX_FILE_BYTES:
            batch.append((path, None))
            continue
        total += len(data)
        batch.append((path, data))
    return batch


def _remove(path: str) -> None:
    """
    Delete a spool file whose message the outbox holds (one gone already
    is fine).  The directory is fsync'd once per batch, not here.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _quarantine(path: str) -> str | None:
    """
    Set a spool file aside as C{*.bad}.

    @return: Its new path, or C{None} when it is gone already (removed by
        someone else since it was read): there is nothing left to keep.
    """
    bad = path + ".bad"
    try:
        os.rename(path, bad)
    except FileNotFoundError:
        return None
    return bad


class SpoolImporter(Service):
    """
    Moves messages from a domain's spool directory into its outbox.

    @ivar imported: Messages handed over so far.
    @ivar rejected: Spool files that held no valid message (renamed to
        C{*.bad} and kept for inspection).
    """

    log = HubLogger()

    def __init__(
        self,
        domain: str,
        directory: str,
        publisher: IPublisher,
        reactor: Any,
        *,
        interval: float = 1.0,
        batch: int = 500,
        failed_area: Any = None,
    ) -> None:
        """
        @param failed_area: The outbox whose failed area requests act on
            (its C{failed}, C{failed_page}, C{retry_failed} and
            C{drop_failed}); without it, requests are answered with an
            error.
        """
        self.failed_area = failed_area
        self.domain = domain
        self.directory = directory
        self.publisher = publisher
        self.reactor = reactor
        self.interval = interval
        self.batch = batch
        self.imported = 0
        self.rejected = 0
        # Whether the outbox refused the last hand-over for now: the wait is
        # logged when it begins and when it ends, not on every scan.
        self._waiting = False
        # Spool files whose message was handed over but which could not be
        # deleted: later scans delete them instead of handing them over again.
        self._handed_over: set[str] = set()
        # Requests told to wait for the outbox (see _requests).
        self._waiting_requests: set[str] = set()
        # Spool files that could not be read, with why: each is logged
        # when first found, not on every scan while it stays so.
        self._unreadable: dict[str, str] = {}
        # When the stale temporary files were last removed (see _import).
        self._pruned_at: float | None = None
        self._pool = self._new_pool()
        self._loop: LoopingCall | None = None
        self._running: Deferred[Any] | None = None

    def _new_pool(self) -> ThreadPool:
        return ThreadPool(minthreads=0, maxthreads=1, name=f"fedhub-spool-{self.domain}")

    def _in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    def startService(self) -> None:
        super().startService()
        if self._pool.joined:
            # A thread pool can not be started again once stopped.
            self._pool = self._new_pool()
        self._pool.start()
        self._loop = LoopingCall(self._scan)
        self._loop.clock = self.reactor
        self._running = self._loop.start(self.interval, now=True)

    def _scan(self) -> Deferred[None]:
        # Contained: a failed scan is logged and the next one runs anyway
        # (a LoopingCall stops for good after one failure).
        d = self._import()
        d.addErrback(
            lambda f: self.log.failure("Importing spool of {domain} failed", f, domain=self.domain)
        )
        return d

    @inlineCallbacks
    def _import(self) -> Generator[Deferred[Any], Any, None]:
        yield self._requests()
        now = self.reactor.seconds()
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_INTERVAL:
            # What writers killed half-way (an inject-mail run, a command)
            # left behind.
            self._pruned_at = now
            yield self._in_thread(_prune_stale, self.directory)
        while self.running:
            unreadable: dict[str, str] = {}
            batch = yield self._in_thread(_read_batch, self.directory, self.batch, unreadable)
            self._found_unreadable(unreadable, complete=not batch)
            if not batch:
                return
            removed = False
            try:
                for path, data in batch:
                    if path in self._handed_over:
                        yield self._in_thread(_remove, path)
                        self._handed_over.discard(path)
                        removed = True
                        continue
                    try:
                        if data is None:
                            raise DecodeError(f"larger than {MAX_FILE_BYTES} bytes")
                        (message,) = list(iter_loads([data]))
                    except (DecodeError, ValueError) as e:
                        reason = e.reason if isinstance(e, DecodeError) else "not one message"
                        bad = yield self._in_thread(_quarantine, path)
                        if bad is None:
                            self._vanished(path, reason)
                            continue
                        self.rejected += 1
                        self.log.error(
                            "Spool file {path} of {domain} holds no valid message ({reason}); "
                            "kept as {bad}",
                            path=path, domain=self.domain, reason=reason,
                            bad=escape_control(bad),
                        )
                        continue
                    try:
                        yield self.publisher.publish(message)
                    except TemporarilyUnavailable as e:
                        if not self._waiting:
                            self._waiting = True
                            self.log.warn(
                                "Outbox of {domain} takes no more for now ({reason}); spool waits",
                                domain=self.domain, reason=e.reason,
                            )
                        return
                    except (MessageError, PublishError) as e:
                        # Never acceptable (invalid, or larger than the whole
                        # outbox): set aside, or it would hold up every file
                        # after it for good.
                        bad = yield self._in_thread(_quarantine, path)
                        if bad is None:
                            self._vanished(path, str(e))
                            continue
                        self.rejected += 1
                        self.log.error(
                            "Spooled message {msg_id} of {domain} refused ({reason}); kept as {bad}",
                            msg_id=message.id, domain=self.domain, reason=str(e), bad=bad,
                        )
                        continue
                    self.imported += 1
                    if self._waiting:
                        self._waiting = False
                        self.log.info("Outbox of {domain} takes spooled messages again", domain=self.domain)
                    # Deleted before the next hand-over, not with the batch:
                    # a crash between the outbox's commit and this deletion
                    # hands over this one message again at the next start
                    # (with its id), not every message of the batch.
                    self._handed_over.add(path)
                    yield self._in_thread(_remove, path)
                    self._handed_over.discard(path)
                    removed = True
            finally:
                if removed:
                    # Until then a power loss may bring deleted files back:
                    # their messages are handed over again, never lost.
                    yield self._in_thread(fsync_directory, self.directory)
            # A batch cut short by its size in bytes leaves files behind;
            # the next read finds out whether any are left.

    @property
    def unreadable(self) -> int:
        """
        Spool files the last scan could not read (they wait; the files
        after them are taken in).
        """
        return len(self._unreadable)

    def _found_unreadable(self, found: dict[str, str], complete: bool) -> None:
        """
        Log the spool files found unreadable for the first time.

        @param found: Those a read of the spool skipped, with why.
        @param complete: Whether that read went through the whole spool:
            then the files not in C{found} are forgotten (read since, or
            gone), and one found again later is logged again.
        """
        for path, reason in found.items():
            if path not in self._unreadable:
                self.log.error(
                    "Spool file {path} of {domain} can not be read ({reason}); it waits "
                    "(the files after it are taken in) until the hub's user can read it",
                    path=escape_control(path), domain=self.domain, reason=reason,
                )
        if complete:
            self._unreadable = found
        else:
            self._unreadable.update(found)

    def _vanished(self, path: str, reason: str) -> None:
        """
        A file to set aside disappeared first: nothing is left to keep, and
        the files after it are imported as usual.
        """
        self.log.warn(
            "Spool file {path} of {domain} could not be used ({reason}) and disappeared before "
            "it could be kept; skipped",
            path=path, domain=self.domain, reason=reason,
        )

    @inlineCallbacks
    def _requests(self) -> Generator[Deferred[Any], Any, None]:
        """
        Carry out the failed-area requests waiting in the spool.
        """
        paths = yield self._in_thread(_request_paths, self.directory)
        for path in paths:
            data = yield self._in_thread(_read_request, path)
            if data is None:
                continue
            reply = ""
            try:
                if len(data) > REQUEST_BYTES:
                    raise ValueError(f"request larger than {REQUEST_BYTES} bytes")
                request = json.loads(data)
                reply = str(request.get("reply", ""))
                answer = yield self._carry_out(request, path)
            except TemporarilyUnavailable as e:
                # The outbox is not open yet (the hub is starting) or can not
                # be used for now: the request stays, for the next pass, as
                # the command promised.  Those after it wait their turn.  Said
                # once per request: an outbox that never opens keeps it.
                told = path in self._waiting_requests
                self._waiting_requests.add(path)
                (self.log.debug if told else self.log.warn)(
                    "Failed-area request {path} of {domain} waits until the outbox can be used: "
                    "{reason}",
                    path=path, domain=self.domain, reason=e.reason,
                )
                return
            except Exception as e:
                answer = {"error": f"{type(e).__name__}: {e}"}
            self._waiting_requests.discard(path)
            self.log.info(
                "Failed area of {domain}: {action} requested by a command",
                domain=self.domain, action=escape_control(str(answer.get("action", "?"))),
            )
            yield self._in_thread(_answer, self.directory, path, reply, answer)

    @inlineCallbacks
    def _carry_out(
        self, request: dict[str, Any], path: str
    ) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """
        Carry out one request read from the file C{path}.

        A retry or drop is first fixed to the messages it acts on (see
        L{_fixed}); one fixed already, by a run that may have acted on them
        before the hub died, acts on those again (those gone are ignored)
        and answers with how many there were.

        @return: The answer.
        """
        area = self.failed_area
        action = request.get("action")
        seqs = request.get("seqs")
        if area is None:
            return {"action": action, "error": "this hub has no outbox for the domain"}
        if seqs is not None and not _is_seq_list(seqs):
            return {"action": action, "error": "seqs must be a list of integers"}
        if action == "list":
            after = request.get("after")
            if after is None:
                after = 0
            if not isinstance(after, int) or isinstance(after, bool):
                return {"action": action, "error": "after must be an integer"}
            # One page, never the whole failed area: the command asks again
            # for the next.
            page = yield area.failed_page(after, LIST_RECORDS, LIST_BYTES)
            answer: dict[str, Any] = {
                "action": action,
                "records": [
                    {
                        "seq": r.seq, "message_id": r.message_id, "created": r.created,
                        "failed_at": r.failed_at, "kind": r.kind, "reason": r.reason,
                        "attempts": r.attempts,
                        # The stored record is binary (see fedhub.outbox.store.encode).
                        "data_base64": base64.b64encode(r.data).decode("ascii"),
                    }
                    for r in page.records
                ],
            }
            if page.next_after is not None:
                answer["next"] = page.next_after
            return answer
        if action not in ("retry", "drop"):
            return {"action": action, "error": f"unknown action {action!r}"}
        again = "found" in request
        if again:
            found = request["found"]
            if not _is_seq_list(found):
                return {"action": action, "error": "found must be a list of integers"}
        else:
            found = yield self._fixed(area, seqs)
            fixed = json.dumps({**request, "found": found}).encode("utf-8")
            if len(fixed) > REQUEST_BYTES:
                return {
                    "action": action,
                    "error": f"too many failed messages ({len(found)}) for one request",
                }
            yield self._in_thread(_rewrite_request, self.directory, path, fixed)
        count = 0
        if found:
            act = area.retry_failed if action == "retry" else area.drop_failed
            count = yield act(found)
        if again:
            # What this run found is what the first one left: none when it
            # acted before the hub died, else all.  The answer is the first
            # run's either way.
            self.log.info(
                "Failed area of {domain}: {action} of {count} messages carried out again "
                "after a restart ({left} were left)",
                domain=self.domain, action=action, count=len(found), left=count,
            )
            count = len(found)
        return {"action": action, "count": count}

    @inlineCallbacks
    def _fixed(
        self, area: Any, seqs: list[int] | None
    ) -> Generator[Deferred[Any], Any, list[int]]:
        """
        The sequence numbers of the failed messages a retry or drop acts on:
        every failed one for C{None}, else those of C{seqs} in the failed
        area; in order.
        """
        found: list[int] = []
        if seqs is None:
            after = 0
            while True:
                page = yield area.failed(after, 500)
                found.extend(record.seq for record in page)
                if len(page) < 500:
                    return found
                after = page[-1].seq
        for seq in sorted(set(seqs)):
            page = yield area.failed(seq - 1, 1)
            if page and page[0].seq == seq:
                found.append(seq)
        return found

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running is not None:
            running, self._running = self._running, None
            yield running
        if self._pool.started:
            self._pool.stop()
