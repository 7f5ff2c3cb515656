"""
The C{record} consumer: append every message to a file, one serialized
message (L{fedhub.message.dump_line}) per line, for replay, audits and
debugging.  C{fedhub.message.loads} and C{iter_loads} read the file back.

Writing: lines are collected and appended together, one C{write} per batch,
at most C{flush_interval} seconds after the first line of the batch came
(C{0}: at the next turn of the reactor, so every message that arrived in the
same turn shares the write) or as soon as C{max_batch} lines wait.  A message
is acknowledged only after its line was written.  The file is opened with
C{O_APPEND}, and a write that fails half-way is cut back to where the batch
began, so the file never holds half a line; the messages of a failed batch
are retried.

Why this runs in the reactor thread: an append to a local file hands the
bytes to the operating system's page cache and returns in microseconds, and
batching makes it one system call for many messages.  C{fsync} can take
longer (milliseconds on a busy disk), so it is optional and bounded: after
every C{fsync_every} lines and/or at least every C{fsync_interval} seconds
while lines are written.  A batch whose lines complete C{fsync_every} is
synced before its messages are acknowledged, so C{fsync_every = 1} makes
every acknowledged message durable even across a power loss; without fsync,
an acknowledged message survives a crash of the hub but not of the machine.
Keep the file on a local disk: on a network file system a write can block.

Log rotation: L{RecordHandler.reopen} closes and reopens the file; the hub
calls it on C{SIGHUP} (L{fedhub.hub.Hub.reopen_files}).  Besides, before each write the handler
checks whether the path still names the file it has open (C{stat} against
C{fstat}), so a file renamed or removed by C{logrotate} is followed by a new
one at the path without any signal.  Either way, with fsync configured, the
old file is synced before it is closed.  The file is meant to have one writer.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import Option
from fedhub.errors import ConfigError, ConfigProblem, Retry
from fedhub.interfaces import IConsumerPlugin, IMessageHandler
from fedhub.logs import HubLogger
from fedhub.message import Message, dump_line
from fedhub.plugins import PluginContext

__all__ = ["RecordPlugin", "RecordHandler", "RecordSettings"]

#: The permissions of a new record file: messages may hold private data.
FILE_MODE = 0o640


@dataclass(frozen=True)
class RecordSettings:
    """
    The checked options of one C{record} consumer.

    @ivar path: The file, absolute.
    @ivar flush_interval: Seconds a line may wait for its batch's write.
    @ivar max_batch: A batch is written as soon as it has this many lines.
    @ivar fsync_every: Sync the file after this many lines; 0 never by count.
    @ivar fsync_interval: Sync the file at least this often, in seconds,
        while lines are written; 0 never by time.
    @ivar follow_rotation: Reopen when the path names another file than the
        one open.
    """

    path: str
    flush_interval: float = 0.0
    max_batch: int = 1000
    fsync_every: int = 0
    fsync_interval: float = 0.0
    follow_rotation: bool = True


@dataclass
class _Pending:
    line: bytes
    waiter: Deferred[None]


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


@implementer(IMessageHandler)
class RecordHandler:
    """
    Appends each message as one line to a file.

    @ivar writes: How many batches were written.
    @ivar syncs: How many times the file was synced.
    @ivar write: The function that writes to the file descriptor
        (C{os.write}); tests replace it to make writes fail.
    @ivar fsync: The function that syncs the file descriptor (C{os.fsync}).
    """

    log = HubLogger()

    def __init__(
        self, name: str, topics: tuple[str, ...], reactor: Any, settings: RecordSettings
    ) -> None:
        self.name = name
        self.topics = topics
        self.reactor = reactor
        self.settings = settings
        self.writes = 0
        self.syncs = 0
        self.write: Callable[[int, memoryview], int] = os.write
        self.fsync: Callable[[int], None] = os.fsync
        self._fd: int | None = None
        self._pending: list[_Pending] = []
        self._flush_call: IDelayedCall | None = None
        self._sync_call: IDelayedCall | None = None
        self._unsynced = 0

    @property
    def is_open(self) -> bool:
        """
        Whether the file is open.
        """
        return self._fd is not None

    # lifecycle

    def start(self) -> None:
        """
        Create the file's directory when needed and open the file.

        @raise ConfigError: when the file can not be opened for appending.
        """
        self._open()

    def drain(self) -> None:
        """
        The consumer is stopping: write the lines that wait now, without
        waiting for C{flush_interval}, so their messages are acknowledged
        before the subscription ends.
        """
        self._cancel_flush()
        self._flush()

    def stop(self) -> None:
        """
        Write what waits, sync when any fsync is configured, close the file.

        @raise OSError: when the sync fails; the file is closed even then.
        """
        self._cancel_flush()
        if self._pending:
            self._flush()
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._sync_call = None
        try:
            self._sync_owed()
        finally:
            # A failed sync is reported to the caller; the file is closed
            # all the same.
            self._close()

    def reopen(self) -> None:
        """
        Close the file and open the path again: call this after the file was
        renamed for rotation (the C{SIGHUP} convention).

        @raise OSError: when the sync of the old file fails; it is closed and
            the path opened even then.
        @raise ConfigError: when the path can not be opened.
        """
        if self._fd is None:
            # Not started (a start that failed and is tried again) or
            # stopped: the next start opens the path as it is then.
            return
        self.log.info(
            "Consumer {consumer} reopens {path}", consumer=self.name, path=self.settings.path
        )
        try:
            self._sync_owed()
        finally:
            # A failed sync is reported to the caller; the rotation happens
            # all the same, or lines would keep going to the renamed file.
            self._close()
            self._open()

    def _open(self) -> None:
        """
        Open the path for appending, without waiting: a FIFO (named pipe)
        put at the path would block the reactor until a reader came, and
        then at every write a slow reader holds up; it is refused.
        """
        path = self.settings.path
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(
                path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK,
                FILE_MODE,
            )
        except OSError as e:
            # ENXIO: a FIFO nothing reads (or a socket, a device without
            # its driver).
            what = (
                "is a FIFO, not a file" if e.errno == errno.ENXIO and _is_fifo(path)
                else f"can not be opened: {e.strerror}"
            )
            raise ConfigError([ConfigProblem(f"{self.name}.path", f"{path!r} {what}")]) from None
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise ConfigError(
                    [ConfigProblem(f"{self.name}.path", f"{path!r} is a FIFO, not a file")]
                )
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                self.log.failure("Consumer {consumer} could not close its file", consumer=self.name)

    # messages

    def handle(self, message: Message) -> Deferred[None]:
        """
        Queue the message's line; the Deferred fires once it is written.
        """
        waiter: Deferred[None] = Deferred()
        self._pending.append(_Pending(dump_line(message).encode("utf-8"), waiter))
        if len(self._pending) >= self.settings.max_batch:
            self._cancel_flush()
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.settings.flush_interval, self._timed_flush)
        return waiter

    def _cancel_flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _timed_flush(self) -> None:
        self._flush_call = None
        self._flush()

    def _rotated(self) -> bool:
        """
        Whether the path no longer names the open file.
        """
        assert self._fd is not None
        try:
            on_path = os.stat(self.settings.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        mine = os.fstat(self._fd)
        return (on_path.st_dev, on_path.st_ino) != (mine.st_dev, mine.st_ino)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            if self._fd is None:
                self._open()
            elif self.settings.follow_rotation and self._rotated():
                self.log.info(
                    "Consumer {consumer}: {path} was rotated; opening a new file",
                    consumer=self.name,
                    path=self.settings.path,
                )
                # Lines acknowledged in the old file get the sync they were
                # promised before it is let go, as with reopen().
                self._sync_owed()
                self._close()
                self._open()
            self._append(b"".join(item.line for item in batch))
            self.writes += 1
            self._unsynced += len(batch)
            if self.settings.fsync_every and self._unsynced >= self.settings.fsync_every:
                self._sync()
            elif self.settings.fsync_interval and self._sync_call is None:
                self._sync_call = self.reactor.callLater(
                    self.settings.fsync_interval, self._timed_sync
                )
        except (OSError, ConfigError) as e:
            reason = (
                e.strerror if isinstance(e, OSError)
                else "; ".join(problem.message for problem in e.problems)
            )
            self.log.error(
                "Consumer {consumer} could not write {count} message(s) to {path}: {reason}",
                consumer=self.name,
                count=len(batch),
                path=self.settings.path,
                reason=reason,
            )
            for item in batch:
                item.waiter.errback(Retry(f"can not write {self.settings.path}: {reason}"))
            return
        for item in batch:
            item.waiter.callback(None)

    def _append(self, data: bytes) -> None:
        """
        Append C{data} whole, or cut the file back and raise.
        """
        assert self._fd is not None
        fd = self._fd
        info = os.fstat(fd)
        # Only a regular file can be cut back (not a pipe or a device).
        start = info.st_size if stat.S_ISREG(info.st_mode) else None
        view = memoryview(data)
        try:
            while view:
                written = self.write(fd, view)
                view = view[written:]
        except OSError:
            if start is None:
                raise
            try:
                os.ftruncate(fd, start)
            except OSError:
                self.log.failure(
                    "Consumer {consumer} could not cut {path} back after a failed write",
                    consumer=self.name,
                    path=self.settings.path,
                )
            raise

    def _timed_sync(self) -> None:
        self._sync_call = None
        if self._fd is not None and self._unsynced:
            try:
                self._sync()
            except OSError as e:
                self.log.error(
                    "Consumer {consumer} could not sync {path}: {reason}",
                    consumer=self.name,
                    path=self.settings.path,
                    reason=e.strerror,
                )

    def _sync_owed(self) -> None:
        """
        Sync the lines written since the last sync, when any fsync is
        configured: what must happen before the file is let go.
        """
        if self._fd is not None and self._unsynced and (
            self.settings.fsync_every or self.settings.fsync_interval
        ):
            self._sync()

    def _sync(self) -> None:
        assert self._fd is not None
        self.fsync(self._fd)
        self.syncs += 1
        self._unsynced = 0


def _check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _check_not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _check_path(value: str) -> str | None:
    if not value or value.endswith("/"):
        return "must name a file"
    if "\x00" in value:
        return "holds a NUL character"
    return None


@implementer(IPlugin, IConsumerPlugin)
class RecordPlugin:
    """
    The plugin that builds L{RecordHandler}s.
    """

    name = "record"
    description = "Append each message as one JSON line to a file (for replay and audits)."
    options: Mapping[str, Option] = {
        "path": Option(str, "messages.jsonl", "the file; a relative path is taken in the "
                       "component's directory <state_dir>/components/<name>", _check_path),
        "flush_interval": Option(float, 0.0, "seconds lines may wait to be written together",
                                 _check_not_negative),
        "max_batch": Option(int, 1000, "write as soon as this many lines wait", _check_positive),
        "fsync_every": Option(int, 0, "sync the file after this many lines; 0 never",
                              _check_not_negative),
        "fsync_interval": Option(float, 0.0, "sync the file at least this often (seconds) "
                                 "while writing; 0 never", _check_not_negative),
        "follow_rotation": Option(bool, True, "open a new file when the path was renamed "
                                  "or removed"),
    }

    def build(self, context: PluginContext) -> RecordHandler:
        """
        Build a handler; the file is opened by its C{start}.
        """
        topics: tuple[str, ...] = ("#",)
        if context.component is not None and context.component.topics:
            topics = tuple(context.component.topics)
        options = context.options
        path = os.path.join(context.state_dir, str(options.get("path", "messages.jsonl")))
        settings = RecordSettings(
            path=os.path.abspath(path),
            flush_interval=float(options.get("flush_interval", 0.0)),
            max_batch=int(options.get("max_batch", 1000)),
            fsync_every=int(options.get("fsync_every", 0)),
            fsync_interval=float(options.get("fsync_interval", 0.0)),
            follow_rotation=bool(options.get("follow_rotation", True)),
        )
        return RecordHandler(context.name, topics, context.reactor, settings)
