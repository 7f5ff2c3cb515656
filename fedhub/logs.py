"""
Log output for operators: the hub's log level, and one JSON object per line.

Every fedhub component logs through a L{HubLogger}, which drops events below
the hub's log level (C{[hub] log_level}, C{info} unless configured) where
they are made: C{twistd} itself writes events of every level, and the
debug ones (each SMTP connection, each message published) would otherwise
be formatted and written too.


C{twistd --logger fedhub.logs.json_logger fedhub ...} writes every log event
of the hub's log level and above (Twisted's own too) to standard output as
a JSON object with stable keys, for journald, Loki or Elasticsearch
(C{fedhub.logs.text_logger} writes twistd's text lines, at the same
level)::

    {"time": "2026-11-28T06:00:00.123456+00:00", "level": "info",
     "namespace": "fedhub.consumers.runner.ConsumerService",
     "text": "Consumer log consumes fedhub.log for #",
     "consumer": "log", "queue": "fedhub.log"}

The keys C{msg_id}, C{topic}, C{domain}, C{producer}, C{consumer}, C{queue},
C{peer}, C{reason} and C{error} are copied from the event when present; a
failure adds C{traceback}.  Text is escaped so no event can forge a line.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from collections.abc import Mapping
from typing import IO, Any, cast

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, textFileLogObserver
from zope.interface import implementer

from fedhub.text import escape_control

#: The levels by name, least important first.
LEVELS: dict[str, LogLevel] = {level.name: level for level in
                               (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                                LogLevel.critical)}

_RANK = {level: rank for rank, level in enumerate(LEVELS.values())}

# The least important level emitted, by rank; a list so it can change in place.
_threshold = [_RANK[LogLevel.info]]


def set_log_level(level: LogLevel) -> None:
    """
    Emit events of C{level} and above from now on.
    """
    _threshold[0] = _RANK[level]


def allow_level(level: LogLevel) -> None:
    """
    Emit events of C{level} from now on, unless they are already: the log
    level only goes down.
    """
    _threshold[0] = min(_threshold[0], _RANK[level])


def log_level() -> LogLevel:
    """
    The least important level emitted.
    """
    return list(LEVELS.values())[_threshold[0]]


#: Event fields whose values come from outside the hub (messages, mail
#: peers, brokers, remote servers): L{HubLogger} escapes them in every
#: event, whichever code logs them.
UNTRUSTED_FIELDS = ("msg_id", "topic", "queue", "peer", "reason", "error", "path")


class HubLogger(Logger):
    """
    A L{Logger} that drops events below the hub's log level before any
    observer sees them, and escapes the control characters of the
    L{UNTRUSTED_FIELDS} given as text, so a message id or a reason can not
    forge a log line or drive the terminal a log is read on.
    """

    #: Fields every event of this logger carries (see L{bound}).
    fields: Mapping[str, object] = {}

    def bound(self, **fields: object) -> HubLogger:
        """
        A logger of the same namespace and source whose every event also
        carries C{fields} (the domain of a broker connection, say), unless
        the event gives them itself.
        """
        logger = HubLogger(self.namespace, self.source, self.observer)
        logger.fields = {**self.fields, **fields}
        return logger

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if _RANK.get(level, len(_RANK)) < _threshold[0]:
            return
        if self.fields:
            kwargs = {**self.fields, **kwargs}
        for key in UNTRUSTED_FIELDS:
            value = kwargs.get(key)
            if value.__class__ is str:
                kwargs[key] = escape_control(value)  # type: ignore[arg-type]
        Logger.emit(self, level, format, **kwargs)


#: Event fields copied into every JSON line that has them.
FIELDS = ("msg_id", "topic", "domain", "producer", "consumer", "queue", "peer", "reason", "error")


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """
    The JSON-ready record of one log event.
    """
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, timezone.utc).isoformat()
            if isinstance(when, (int, float))
            else None
        ),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "text": escape_control(formatEvent(event) or ""),
    }
    for key in FIELDS:
        value = event.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float, bool)):
            record[key] = value
        else:
            record[key] = escape_control(str(value))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each event as one JSON line to a text stream.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event_record(event), ensure_ascii=False, default=str)
        self.stream.write(line + "\n")
        self.stream.flush()


def at_log_level(observer: ILogObserver) -> ILogObserver:
    """
    C{observer}, given only the events of the hub's log level and above
    (L{log_level}, as it is when each event comes): Twisted's own as well
    as fedhub's, which L{HubLogger} drops before any observer sees them.
    An event without a level is given.
    """

    @implementer(ILogObserver)
    def filtered(event: dict[str, Any]) -> None:
        if _RANK.get(event.get("log_level"), len(_RANK)) >= _threshold[0]:  # type: ignore[arg-type]
            observer(event)

    return cast(ILogObserver, filtered)


def json_logger() -> ILogObserver:
    """
    The observer factory for C{twistd --logger fedhub.logs.json_logger}: one
    JSON object per line on standard output, at the hub's log level.
    """
    return at_log_level(JSONLinesObserver(sys.stdout))


def text_logger() -> ILogObserver:
    """
    The observer factory for C{twistd --logger fedhub.logs.text_logger}:
    twistd's text lines on standard output, at the hub's log level, Twisted's
    own lines included (twistd's own log file writes those whatever it is).
    """
    return at_log_level(textFileLogObserver(sys.stdout))
