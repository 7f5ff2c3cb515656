"""
The hub's HTTP status server.

Resources, all answering C{GET} (and C{HEAD}) only; a request with a body
is answered C{413} before its body is read (see L{_StatusChannel}):

  - C{/live}: C{200 ok} while the process runs;
  - C{/ready}: C{200} when every domain's bus is connected, every consumer
    consumes (none halted) and no producer's start failed, else C{503}; the JSON body has the details;
  - C{/metrics}: Prometheus text (OpenMetrics when asked for);
  - C{/}: a status page for people: domains and their connections,
    consumers and producers with their counters and last trouble, and the
    most recent messages, kept up to date without reloading;
  - C{/status.json} and C{/recent.json?after=N}: the same data for scripts;
  - C{/events}: the page's live feed, as Server-Sent Events: C{status}
    events with the tables every few seconds and C{recent} events with new
    entries of the recent-messages list (resumable with C{Last-Event-ID});
  - C{/static/status.css} and C{/static/status.js}: the page's files.

Everything shown comes from messages, brokers and remote services, so none of
it is trusted: the server escapes every text it puts in HTML, the page's
script only ever sets C{textContent}, JSON has C{<}, C{>} and C{&} escaped,
and every answer, Twisted's own error pages included, carries a
Content-Security-Policy that allows no inline script or style and no other
origin.  The server has no authentication:
listen on a loopback address or a Unix socket, or put it behind a proxy that
authenticates.
"""

from __future__ import annotations

import html
import json
import re
import secrets
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from importlib import resources
from typing import Any, Protocol

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, combinedLogFormatter, datetimeToLogString
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from fedhub.consumers.runner import ConsumerService
from fedhub.hub import DomainRuntime
from fedhub.logs import HubLogger
from fedhub.outbox.outbox import OutboxStats
from fedhub.status.metrics import Activity, HubMonitor, HubView, readiness
from fedhub.text import ascii_digits, escape_control, is_ip_address, summarize

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "RecentMessages",
    "StatusService",
    "build_resource",
    "render_page",
    "status_view",
]

#: The policy every answer carries: the page's own script and style files,
#: requests back to this server, nothing inline, nothing from elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Texts longer than this are cut on the page.
_MAX_TEXT = 300
_MAX_TOPIC = 255

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")

_OUTCOME_CLASS = {
    "acked": "ok",
    "confirmed": "ok",
    "dropped": "warn",
    "retried": "warn",
    "requeued": "warn",
    "dead_lettered": "bad",
    "rejected": "bad",
    "returned": "bad",
    "nacked": "bad",
}


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


def _age(seconds: float) -> str:
    """
    A short human duration: C{"<1 s"}, C{"42 s"}, C{"3 min"}, C{"2 h"},
    C{"5 d"}.
    """
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _duration(seconds: float) -> str:
    """
    A short human duration for handling times: C{"85 µs"}, C{"2.5 ms"},
    C{"120 ms"}, C{"1.50 s"}.
    """
    if seconds < 0.001:
        return f"{seconds * 1_000_000:.0f} µs"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    """
    Untrusted text made safe for logs and terminals (the HTML and JSON
    layers escape it again for their own syntax).
    """
    return escape_control(value if isinstance(value, str) else str(value), limit)


def dumps_json(value: object) -> bytes:
    """
    JSON for answers and events: ASCII only, with C{<}, C{>} and C{&}
    escaped so no byte of it can end a script or start markup.
    """
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("ascii")


# --- recent messages ----------------------------------------------------------------


class RecentMessages:
    """
    A bounded list of what recently happened to messages, newest last, each
    entry numbered so a reader can ask for what came after the last one it
    saw.  Numbers start again in every process; L{epoch}, random per list,
    tells a reader (a page left open over a restart) that its numbers no
    longer apply.  It listens to a L{HubMonitor}.

    Entries are JSON-ready dictionaries with C{id} (the number), C{time}
    (ISO 8601), C{domain}, C{source} (C{"outbox"} or the consumer),
    C{outcome}, C{topic} (C{None} when the outbox did not say), C{summary},
    C{msg_id} and C{reason}; every text escaped of control characters and cut
    to a bounded length.
    """

    log = HubLogger()

    def __init__(self, size: int = 100) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.size = size
        self.epoch = secrets.token_hex(6)
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)
        self._last = 0
        self._listeners: list[Callable[[dict[str, Any]], object]] = []

    @property
    def last_id(self) -> int:
        """
        The number of the newest entry ever added (0 before the first).
        """
        return self._last

    def add(self, activity: Activity) -> dict[str, Any]:
        """
        Add an entry for C{activity}, dropping the oldest when full, and tell
        the listeners.
        """
        message = activity.message
        self._last += 1
        entry: dict[str, Any] = {
            "id": self._last,
            "time": _iso(activity.time),
            "domain": _text(activity.domain, 100),
            "source": _text(activity.source, 100),
            "outcome": _text(activity.outcome, 50),
            "topic": _text(message.topic, _MAX_TOPIC) if message is not None else None,
            "summary": summarize(message, 200) if message is not None else "",
            "msg_id": _text(activity.msg_id, 100),
            "reason": _text(activity.reason, 200) if activity.reason else None,
        }
        self._entries.append(entry)
        for listener in list(self._listeners):
            try:
                listener(entry)
            except Exception:
                self.log.failure("Recent-message listener {listener!r} failed", listener=listener)
        return entry

    def __call__(self, activity: Activity) -> None:
        """
        Add an entry (so the list itself can be a monitor's listener).
        """
        self.add(activity)

    def entries(self, after: int = 0) -> list[dict[str, Any]]:
        """
        The entries numbered above C{after}, oldest first.
        """
        return [e for e in self._entries if e["id"] > after]

    def subscribe(self, listener: Callable[[dict[str, Any]], object]) -> None:
        """
        Call C{listener(entry)} for every entry added.
        """
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[dict[str, Any]], object]) -> None:
        """
        Stop calling a listener.
        """
        self._listeners.remove(listener)


# --- the view: what the page shows ------------------------------------------------------


def _cell(text: object, css: str = "") -> list[str]:
    return [_text(text), css]


def _domain_row(
    name: str, runtime: DomainRuntime, detail: Mapping[str, Any], monitor: HubMonitor, now: float
) -> list[list[str]]:
    config = runtime.config
    broker = "memory (in-process)" if config.is_memory else config.display_broker
    if detail.get("connected"):
        state = _cell("blocked by the broker", "warn") if detail.get("blocked") else _cell("connected", "ok")
    else:
        error = detail.get("error")
        state = _cell(f"disconnected: {error}" if error else "disconnected", "bad")
    cells = [_cell(name, "name"), _cell(broker), state]
    stats_method = getattr(runtime.publisher, "stats", None)
    stats = stats_method() if callable(stats_method) else None
    if isinstance(stats, OutboxStats):
        waiting = f"{stats.depth}" + (f" ({stats.in_flight} in flight)" if stats.in_flight else "")
        cells += [
            _cell(stats.published, "num"),
            _cell(stats.confirmed, "num"),
            _cell(stats.returned, "num bad" if stats.returned else "num"),
            _cell(stats.nacked, "num bad" if stats.nacked else "num"),
            _cell(waiting, "num warn" if stats.paused and stats.depth else "num"),
            _cell(_age(stats.oldest_age) if stats.oldest_age is not None else "–", "num"),
            _cell(stats.failed, "num bad" if stats.failed else "num"),
        ]
    else:
        cells += [_cell("–", "num muted")] * 7
    seen = []
    for label, times in (("published", monitor.last_confirmed), ("consumed", monitor.last_consumed)):
        when = times.get(name)
        if when is not None:
            seen.append(f"{label} {_age(max(0.0, now - when))} ago")
    cells.append(_cell("; ".join(seen) or "none yet", "" if seen else "muted"))
    return cells


def _consumer_row(name: str, service: ConsumerService, monitor: HubMonitor, now: float) -> list[list[str]]:
    component = service.component
    if service.halted:
        state = _cell("halted", "bad")
    elif service.consuming:
        state = _cell("consuming", "ok")
    elif service.running:
        state = _cell("starting", "warn")
    else:
        state = _cell("stopped", "bad")
    stats = service.stats
    notes = monitor.consumers.get(name)
    in_flight = service.in_flight
    handling = "–"
    if notes is not None and notes.handled:
        handling = _duration(notes.total_time / notes.handled)
    trouble = _cell("none", "muted")
    if notes is not None and notes.last_trouble is not None:
        when, outcome, reason = notes.last_trouble
        css = "bad" if _OUTCOME_CLASS.get(outcome) == "bad" else "warn"
        trouble = _cell(f"{outcome} {_age(max(0.0, now - when))} ago: {reason}", f"{css} error")
    return [
        _cell(name, "name"),
        _cell(component.domain),
        _cell(component.plugin),
        state,
        _cell(stats.get("consumed", 0), "num"),
        _cell(stats.get("acked", 0), "num"),
        _cell(stats.get("retried", 0), "num warn" if stats.get("retried") else "num"),
        _cell(stats.get("dead_lettered", 0), "num bad" if stats.get("dead_lettered") else "num"),
        _cell(stats.get("dropped", 0), "num"),
        _cell(in_flight, "num"),
        _cell(handling, "num"),
        trouble,
    ]


def _producer_row(
    name: str, producer: IService, ready: Mapping[str, Any], now: float
) -> list[list[str]]:
    running = bool(ready.get("running", getattr(producer, "running", False)))
    failure = ready.get("error")
    if failure:
        # It did not start (see readiness): that is its trouble.
        return [_cell(name, "name"), _cell(type(producer).__name__), _cell("stopped", "bad"),
                _cell("–", "muted"), _cell(str(failure), "bad error")]
    status_method = getattr(producer, "status", None)
    counters = getattr(producer, "counters", None)
    if callable(status_method):
        status = status_method()
        if not isinstance(status, Mapping):
            status = {}
        kind = f"poller: {status.get('source', '')}"
        phase = str(status.get("state", "running" if running else "stopped"))
        failing = bool(status.get("consecutive_errors"))
        css = "bad" if failing or not running else "ok"
        parts = [f"polls {status.get('polls', 0)}", f"errors {status.get('errors', 0)}",
                 f"published {status.get('published', 0)}"]
        if status.get("dropped"):
            parts.append(f"dropped {status.get('dropped')}")
        lag = status.get("lag")
        if isinstance(lag, (int, float)):
            parts.append(f"lag {_age(float(lag))}")
        error = status.get("last_error")
        if isinstance(error, Mapping):
            problem = _cell(f"{error.get('time', '')}: {error.get('error', '')}", "bad error" if failing else "warn error")
        else:
            problem = _cell("none", "muted")
        return [_cell(name, "name"), _cell(kind), _cell(phase, css), _cell(", ".join(parts)), problem]
    if isinstance(counters, Mapping):
        accepted = [f"{o} {counters.get(f'mails_{o}', 0)}" for o in ("published", "duplicate", "quarantined")]
        refused = {k[len("mails_refused_"):]: v for k, v in counters.items()
                   if isinstance(k, str) and k.startswith("mails_refused_") and v}
        parts = accepted + [f"connections {counters.get('connections', 0)}"]
        if refused:
            detail = ", ".join(f"{kind} {count}" for kind, count in sorted(refused.items()))
            parts.append(f"refused {sum(refused.values())} ({detail})")
        problem = _cell("refused mail" if refused else "none", "warn" if refused else "muted")
        port = getattr(producer, "port", None)
        where = ""
        if port is not None:
            try:
                host = port.getHost()
                where = f" on {getattr(host, 'host', '')}:{getattr(host, 'port', '')}"
            except Exception:
                where = ""
        return [
            _cell(name, "name"),
            _cell(f"SMTP listener{where}"),
            _cell("listening" if running and port is not None else ("running" if running else "stopped"),
                  "ok" if running else "bad"),
            _cell(", ".join(parts)),
            problem,
        ]
    return [
        _cell(name, "name"),
        _cell(type(producer).__name__),
        _cell("running" if running else "stopped", "ok" if running else "bad"),
        _cell("–", "muted"),
        _cell("none", "muted"),
    ]


def _guarded(kind: str, name: str, width: int, build: Callable[[], list[list[str]]]) -> list[list[str]]:
    try:
        return build()
    except Exception:
        StatusService.log.failure("Reading the status of {kind} {name} failed", kind=kind, name=name)
        return [_cell(name, "name"), _cell("status unavailable (see the log)", "bad")] + [_cell("")] * (width - 2)


def status_view(hub: HubView, monitor: HubMonitor, now: float) -> dict[str, Any]:
    """
    What the status page shows, as JSON-ready data: C{ready}, C{headline},
    C{updated} and C{sections}, each with C{id}, C{title}, C{columns},
    C{rows} (lists of C{[text, css class]} cells) and C{empty} (what to say
    when there are no rows).  The page's server-side rendering and its
    script both draw from it.
    """
    check = readiness(hub)
    problems = [
        f"domain {name} is not connected" if not d["connected"]
        else f"the broker refuses publishing in domain {name}" if d.get("publish_refused")
        else f"the outbox of domain {name} can not be used"
        for name, d in check.domains.items()
        if not d["ready"]
    ] + [
        f"consumer {name} is {'halted' if c['halted'] else 'not consuming'}"
        for name, c in check.consumers.items()
        if not c["ready"]
    ] + [
        f"producer {name} did not start"
        for name, p in check.producers.items()
        if not p["ready"]
    ]
    headline = "Ready" if check.ready else "Not ready: " + "; ".join(problems)
    domain_columns = ["Domain", "Broker", "Connection", "Published", "Confirmed", "Returned", "Nacked",
                      "Waiting", "Oldest", "Failed", "Last message"]
    consumer_columns = ["Consumer", "Domain", "Plugin", "State", "Consumed", "Acked", "Retried",
                        "Dead-lettered", "Dropped", "In hand", "Avg. time", "Last trouble"]
    producer_columns = ["Producer", "Kind", "State", "Counters", "Last trouble"]
    domains = [
        _guarded("domain", name, len(domain_columns),
                 partial(_domain_row, name, runtime, check.domains.get(name, {}), monitor, now))
        for name, runtime in hub.domains.items()
    ]
    consumers = [
        _guarded("consumer", name, len(consumer_columns), partial(_consumer_row, name, service, monitor, now))
        for name, service in hub.consumers.items()
    ]
    producers = [
        _guarded("producer", name, len(producer_columns), partial(_producer_row, name, producer, check.producers.get(name, {}), now))
        for name, producer in hub.producers.items()
    ]
    return {
        "ready": check.ready,
        "headline": _text(headline, 1000),
        "updated": _iso(now),
        "sections": [
            {"id": "domains", "title": "Domains", "columns": domain_columns, "rows": domains,
             "empty": "No domains."},
            {"id": "consumers", "title": "Consumers", "columns": consumer_columns, "rows": consumers,
             "empty": "No consumers configured."},
            {"id": "producers", "title": "Producers", "columns": producer_columns, "rows": producers,
             "empty": "No producers configured."},
        ],
    }


# --- HTML -----------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(text if isinstance(text, str) else str(text), quote=True)


def _css(css: str) -> str:
    return f' class="{_e(css)}"' if css else ""


def _section_html(section: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{_e(column)}</th>" for column in section["columns"])
    rows = "".join(
        "<tr>" + "".join(f"<td{_css(css)}>{_e(text)}</td>" for text, css in row) + "</tr>"
        for row in section["rows"]
    )
    hidden = " hidden" if section["rows"] else ""
    return (
        f'<section class="panel" id="section-{_e(section["id"])}">'
        f"<h2>{_e(section['title'])}</h2>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
        f'<p class="empty"{hidden}>{_e(section["empty"])}</p>'
        "</section>"
    )


def _recent_html(entry: Mapping[str, Any]) -> str:
    outcome = entry["outcome"]
    topic = entry["topic"]
    summary = entry["summary"] or (f"message {entry['msg_id']}" if topic is None else "")
    if entry.get("reason"):
        summary = f"{summary} ({entry['reason']})" if summary else entry["reason"]
    time_text = entry["time"][11:19]
    return (
        f'<tr data-id="{int(entry["id"])}">'
        f'<td class="time" title="{_e(entry["time"])}">{_e(time_text)}</td>'
        f"<td>{_e(entry['domain'])}</td>"
        f"<td>{_e(entry['source'])}</td>"
        f'<td class="outcome {_OUTCOME_CLASS.get(outcome, "")}">{_e(outcome)}</td>'
        f'<td class="topic{"" if topic is not None else " muted"}">{_e(topic if topic is not None else "–")}</td>'
        f'<td class="summary">{_e(summary)}</td>'
        "</tr>"
    )


def render_page(
    template: str, view: Mapping[str, Any], recent: Iterable[Mapping[str, Any]], epoch: str = ""
) -> bytes:
    """
    Fill the page template with C{view} (see L{status_view}) and the recent
    entries (oldest first; the page shows the newest first) of the list of
    that C{epoch} (see L{RecentMessages.epoch}).  Every text is
    HTML-escaped; placeholders are replaced in one pass, so text taken from
    the hub can never be taken for a placeholder.
    """
    entries = list(recent)
    values = {
        "ready_class": "ok" if view["ready"] else "bad",
        "headline": _e(view["headline"]),
        "updated": _e(view["updated"]),
        "sections": "".join(_section_html(s) for s in view["sections"]),
        "recent": "".join(_recent_html(e) for e in reversed(entries)),
        "recent_hidden": " hidden" if entries else "",
        "last_id": str(int(entries[-1]["id"]) if entries else 0),
        "epoch": _e(epoch),
    }
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), template).encode("utf-8")


# --- resources -----------------------------------------------------------------------


class _Request(Protocol):
    """
    The parts of a C{twisted.web} request the resources use, typed.
    """

    args: dict[bytes, list[bytes]] | None
    prepath: list[bytes]
    postpath: list[bytes]

    def getHeader(self, key: bytes) -> bytes | None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...


#: The headers of every answer but its content type.
_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode("ascii")),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
)


def _security_headers(request: _Request) -> None:
    for name, value in _SECURITY_HEADERS:
        request.setHeader(name, value)


def _headers(request: _Request, content_type: str) -> None:
    request.setHeader(b"Content-Type", content_type.encode("ascii"))
    _security_headers(request)


def _query_text(request: _Request, name: bytes) -> str:
    values = (request.args or {}).get(name) or []
    return values[0].decode("latin-1") if values else ""


def _number(text: str | bytes) -> int:
    """
    A non-negative decimal number from a client, or 0 for anything else.
    """
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not ascii_digits(text) or len(text) > 18:
        return 0
    return int(text)


def _query_int(request: _Request, name: bytes) -> int:
    values = (request.args or {}).get(name) or []
    return _number(values[0]) if values else 0


def _head(resource: Any, request: _Request) -> bytes:
    """
    A C{HEAD} answer: the headers C{GET} would give, with the length of its
    body, and no body.  (Left to Twisted, C{HEAD} runs C{render_GET} and
    drops the body, logging "I think I'll eat it" for every probe.)
    """
    body = resource.render_GET(request)
    if isinstance(body, bytes):
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    return b""


class _Leaf(Resource):
    isLeaf = True

    def render_GET(self, request: _Request) -> bytes:
        raise NotImplementedError()

    def render_HEAD(self, request: _Request) -> bytes:
        return _head(self, request)


class _Live(_Leaf):
    def render_GET(self, request: _Request) -> bytes:
        _headers(request, "text/plain; charset=utf-8")
        return b"ok\n"


class _Ready(_Leaf):
    def __init__(self, hub: HubView) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._hub = hub

    def render_GET(self, request: _Request) -> bytes:
        check = readiness(self._hub)
        request.setResponseCode(200 if check.ready else 503)
        _headers(request, "application/json")
        return dumps_json(check.to_json())


class _Metrics(_Leaf):
    def __init__(self, monitor: HubMonitor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._monitor = monitor

    def render_GET(self, request: _Request) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = self._monitor.render(accept.decode("latin-1") if accept else None)
        _headers(request, content_type)
        return body


class _Page(Resource):
    def __init__(self, state: _State) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._state = state

    def getChild(self, path: bytes, request: _Request) -> IResource:
        if path == b"":
            return self
        return notFound()

    def render_HEAD(self, request: _Request) -> bytes:
        return _head(self, request)

    def render_GET(self, request: _Request) -> bytes:
        state = self._state
        _headers(request, "text/html; charset=utf-8")
        recent = state.recent
        return render_page(state.assets.page, state.view(), recent.entries(), recent.epoch)


class _StatusJSON(_Leaf):
    def __init__(self, state: _State) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._state = state

    def render_GET(self, request: _Request) -> bytes:
        state = self._state
        _headers(request, "application/json")
        return dumps_json(
            {
                "ready": readiness(state.hub).to_json(),
                "view": state.view(),
                "recent": state.recent.entries(),
            }
        )


class _RecentJSON(_Leaf):
    def __init__(self, recent: RecentMessages) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._recent = recent

    def render_GET(self, request: _Request) -> bytes:
        _headers(request, "application/json")
        recent = self._recent
        after = _query_int(request, b"after") if _query_text(request, b"epoch") == recent.epoch else 0
        return dumps_json({"epoch": recent.epoch, "last": recent.last_id, "entries": recent.entries(after)})


class _File(_Leaf):
    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._body = body
        self._type = content_type

    def render_GET(self, request: _Request) -> bytes:
        _headers(request, self._type)
        # The files do not change while the process runs.
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._body


class _Events(Resource):
    isLeaf = True

    def __init__(self, feed: LiveFeed) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._feed = feed

    def render_HEAD(self, request: _Request) -> bytes:
        _headers(request, "text/event-stream; charset=utf-8")
        return b""

    def render_GET(self, request: _Request) -> bytes | int:
        # Numbers from another process (another epoch) mean nothing here.
        epoch = self._feed.recent.epoch
        after = _query_int(request, b"after") if _query_text(request, b"epoch") == epoch else 0
        last = request.getHeader(b"last-event-id")
        if last is not None:
            seen_epoch, _, number = last.decode("latin-1").partition("-")
            after = _number(number) if seen_epoch == epoch else 0
        if not self._feed.connect(request, after):
            request.setResponseCode(503)
            _headers(request, "text/plain; charset=utf-8")
            request.setHeader(b"Retry-After", b"10")
            return b"too many live views are open\n"
        return NOT_DONE_YET


# --- the live feed ------------------------------------------------------------------


@implementer(IPushProducer)
class _Stream:
    """
    One open C{/events} answer.  While the client's connection can not take
    more (Twisted pauses us) nothing is written; on resuming the client gets
    what it missed that is still in the list.
    """

    def __init__(self, feed: LiveFeed, request: _Request, after: int) -> None:
        self.feed = feed
        self.request = request
        self.sent = after
        self.paused = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.request.write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.feed.catch_up(self)

    def stopProducing(self) -> None:
        self.closed = True


def _event(kind: str, data: object, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode("ascii") if event_id is not None else b""
    return head + f"event: {kind}\n".encode("ascii") + b"data: " + dumps_json(data) + b"\n\n"


class LiveFeed:
    """
    Feeds the open C{/events} streams: new recent entries, gathered for
    C{batch_delay} seconds and sent as one event, and the status tables
    every C{interval} seconds (which also keeps idle connections alive).
    Timers run only while a stream is open.
    """

    log = HubLogger()

    def __init__(
        self,
        recent: RecentMessages,
        view: Callable[[], dict[str, Any]],
        clock: IReactorTime,
        *,
        max_streams: int = 16,
        interval: float = 2.0,
        batch_delay: float = 0.2,
    ) -> None:
        self.recent = recent
        self._view = view
        self._clock = clock
        self.max_streams = max_streams
        self.interval = interval
        self.batch_delay = batch_delay
        self.streams: list[_Stream] = []
        self._flush_call: IDelayedCall | None = None
        self._tick_call: IDelayedCall | None = None
        self._open = True
        recent.subscribe(self._added)

    def connect(self, request: _Request, after: int) -> bool:
        """
        Open a stream on C{request} that starts after entry C{after}.

        @return: C{False} when too many streams are open (or the feed is
            closed): the caller answers C{503}.
        """
        if not self._open or len(self.streams) >= self.max_streams:
            return False
        _headers(request, "text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        stream = _Stream(self, request, min(after, self.recent.last_id))
        self.streams.append(stream)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(self._gone, stream)
        stream.write(b"retry: 3000\n\n")
        self._send_status(stream)
        self.catch_up(stream)
        self._schedule_tick()
        return True

    def close(self) -> None:
        """
        End every stream and stop the timers; later connections are refused.
        """
        self._open = False
        try:
            self.recent.unsubscribe(self._added)
        except ValueError:
            pass
        for call in (self._flush_call, self._tick_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._tick_call = None
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.closed = True
            request = stream.request
            try:
                request.unregisterProducer()
                request.finish()
            except Exception:
                self.log.failure("Ending a live status stream failed")

    def catch_up(self, stream: _Stream) -> None:
        """
        Send C{stream} the entries it has not had yet.
        """
        if stream.paused or stream.closed:
            return
        entries = self.recent.entries(stream.sent)
        if entries:
            stream.sent = entries[-1]["id"]
            epoch = self.recent.epoch
            stream.write(_event("recent", {"epoch": epoch, "entries": entries}, f"{epoch}-{stream.sent}"))

    def _gone(self, result: object, stream: _Stream) -> None:
        stream.closed = True
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams:
            for call in (self._flush_call, self._tick_call):
                if call is not None and call.active():
                    call.cancel()
            self._flush_call = self._tick_call = None

    def _added(self, entry: Mapping[str, Any]) -> None:
        if self.streams and self._flush_call is None:
            self._flush_call = self._clock.callLater(self.batch_delay, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        for stream in list(self.streams):
            try:
                self.catch_up(stream)
            except Exception:
                self.log.failure("Writing to a live status stream failed")

    def _schedule_tick(self) -> None:
        if self._tick_call is None and self.streams:
            self._tick_call = self._clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._tick_call = None
        try:
            data = _event("status", self._view())
        except Exception:
            self.log.failure("Building the status view failed")
        else:
            for stream in list(self.streams):
                if not stream.paused:
                    stream.write(data)
        self._schedule_tick()

    def _send_status(self, stream: _Stream) -> None:
        try:
            stream.write(_event("status", self._view()))
        except Exception:
            self.log.failure("Building the status view failed")


# --- assembly -----------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    """
    The page's files, read from the package.

    @ivar page: The HTML template.
    @ivar files: Static files by name: their bytes and content type.
    """

    page: str
    files: Mapping[str, tuple[bytes, str]]

    @classmethod
    def load(cls) -> Assets:
        """
        Read the files shipped with this package.
        """
        folder = resources.files(__package__ or "fedhub.status")
        page = folder.joinpath("page.html").read_text(encoding="utf-8")
        files = {
            "status.css": (folder.joinpath("status.css").read_bytes(), "text/css; charset=utf-8"),
            "status.js": (folder.joinpath("status.js").read_bytes(), "text/javascript; charset=utf-8"),
        }
        return cls(page, files)


class _State:
    """
    What the resources share.
    """

    def __init__(
        self, hub: HubView, monitor: HubMonitor, recent: RecentMessages, clock: IReactorTime, assets: Assets
    ) -> None:
        self.hub = hub
        self.monitor = monitor
        self.recent = recent
        self.clock = clock
        self.assets = assets

    def view(self) -> dict[str, Any]:
        return status_view(self.hub, self.monitor, self.clock.seconds())


def host_allowed(host: bytes | None, names: frozenset[str]) -> bool:
    """
    Whether a request's C{Host} header names this server: an IP address,
    C{localhost}, or one of C{names} (the machine's own names).  A page
    reached through any other name is refused, so a web page whose name an
    attacker resolves to 127.0.0.1 (DNS rebinding) can not read it.  A
    request without the header passes: browsers always send one, and an
    HTTP/1.0 health check (HAProxy's, say) may not.
    """
    if host is None:
        return True
    if not host:
        return False
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0].lstrip("[") != "" and is_ip_address(text.partition("]")[0][1:])
    name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    if is_ip_address(name):
        return True
    return name == "localhost" or name.endswith(".localhost") or name in names


def machine_names() -> frozenset[str]:
    """
    The names this machine answers to by its own account.
    """
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return frozenset(n for n in names if n)


class _HostCheck(Resource):
    """
    Serves the status resources only to requests naming this server.
    """

    def __init__(self, root: Resource, names: frozenset[str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.root = root
        self._names = names

    def getChildWithDefault(self, path: bytes, request: _Request) -> IResource:  # type: ignore[override]
        if not host_allowed(request.getHeader(b"host"), self._names):
            return _Misdirected()
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self.root


class _Static(Resource):
    """
    The page's files; any other name is not found.
    """

    def getChild(self, path: bytes, request: _Request) -> IResource:
        return notFound()


class _Misdirected(_Leaf):
    def render_GET(self, request: _Request) -> bytes:
        request.setResponseCode(421, b"Misdirected Request")
        _headers(request, "text/plain; charset=utf-8")
        return b"this server answers only to its own names\n"


def build_resource(
    hub: HubView,
    monitor: HubMonitor,
    recent: RecentMessages,
    clock: IReactorTime,
    assets: Assets,
    feed: LiveFeed | None = None,
) -> Resource:
    """
    The root resource of the status server (see the module docstring).
    Without a C{feed} one is made; its streams end with L{LiveFeed.close}.
    """
    state = _State(hub, monitor, recent, clock, assets)
    if feed is None:
        feed = LiveFeed(recent, state.view, clock)
    root = _Page(state)
    root.putChild(b"live", _Live())  # type: ignore[no-untyped-call]
    root.putChild(b"ready", _Ready(hub))
    root.putChild(b"metrics", _Metrics(monitor))
    root.putChild(b"status.json", _StatusJSON(state))
    root.putChild(b"recent.json", _RecentJSON(recent))
    root.putChild(b"events", _Events(feed))
    static = _Static()
    for name, (body, content_type) in assets.files.items():
        static.putChild(name.encode("ascii"), _File(body, content_type))
    root.putChild(b"static", static)
    return _HostCheck(root, machine_names())


_BODY_REFUSED_TEXT = b"this server takes no request bodies\n"

#: The answer to a request with a body (see L{_StatusChannel}).
_BODY_REFUSED = b"".join(
    [
        b"HTTP/1.1 413 Content Too Large\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        *(name + b": " + value + b"\r\n" for name, value in _SECURITY_HEADERS),
        b"Content-Length: %d\r\n" % len(_BODY_REFUSED_TEXT),
        b"Connection: close\r\n",
        b"\r\n",
        _BODY_REFUSED_TEXT,
    ]
)


class _StatusChannel(HTTPChannel):
    """
    One HTTP connection of the status server.  Every resource answers
    C{GET} and C{HEAD} only, so a request announcing a body (a
    C{Content-Length} above 0, or chunked) is answered C{413} and the
    connection closed as soon as its headers are in, the body neither read
    nor kept.  Twisted would otherwise write the whole body, of any size, to
    a temporary file before any resource sees the request: a client could
    fill the disk at the speed of the loopback interface.
    """

    def allHeadersReceived(self) -> None:
        if self.length == 0:
            super().allHeadersReceived()
            return
        # Nothing more of this connection is parsed; what is already
        # buffered is dropped too.
        self.dataReceived = self.lineReceived = self.rawDataReceived = _ignore  # type: ignore[method-assign]
        if self.transport is not None:
            self.transport.write(_BODY_REFUSED)
        self.loseConnection()


def _ignore(data: bytes) -> None:
    pass


class _StatusSite(Site):
    """
    The status server's site: tells each connection when a request of it
    has arrived in full, gives every answer the security headers (Twisted's
    own error pages too: an unknown path or method), and logs each request
    at debug level only (health probes and metrics scrapes come every few
    seconds).
    """

    protocol = _StatusChannel  # type: ignore[assignment]
    access_log = HubLogger()

    def log(self, request: Any) -> None:
        self.access_log.debug(
            "{line}", line=combinedLogFormatter(datetimeToLogString(), request)
        )

    def getResourceFor(self, request: Any) -> IResource:
        connection = getattr(request.channel, "transport", None)
        if isinstance(connection, _Connection):
            connection.request_arrived(request)
        # The resources set them again with their content type; these are
        # for the answers Twisted makes itself.
        _security_headers(request)
        return super().getResourceFor(request)  # type: ignore[no-any-return,no-untyped-call]


class _Connection(ProtocolWrapper):
    """
    One connection to the status server.  Its client has
    L{_Connections.request_timeout} seconds, from the moment it connects and
    from the end of each answer, to send a complete request; otherwise the
    connection is closed.  Twisted's own idle timeout starts again with every
    byte received, so without this a client trickling a byte now and then
    would hold its connection for as long as it likes, and a few such
    clients would take every connection the server allows.

    @ivar closing: Whether the server is cutting the connection (its
        deadline passed, or a newer connection took its place).
    @ivar requested: Whether its client has sent a complete request (one
        L{_Connections} then cuts only after those that have not).
    """

    factory: _Connections

    def __init__(self, factory: _Connections, wrapped: Any) -> None:
        super().__init__(factory, wrapped)  # type: ignore[no-untyped-call]
        self._deadline: IDelayedCall | None = None
        self._waiting_since: float | None = None
        self._requests = 0
        self._lost = False
        self.closing = False
        self.requested = False

    @property
    def waiting_since(self) -> float | None:
        """
        Since when (the clock's seconds) the connection has waited for its
        client's next request; C{None} while a request is being answered or
        once it is closing.
        """
        return self._waiting_since

    def evict(self) -> None:
        """
        Cut the connection to make room for a newer one.
        """
        self._disarm()
        self._expired()

    def makeConnection(self, transport: Any) -> None:
        self._arm()
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def request_arrived(self, request: Any) -> None:
        """
        A request came in full: the deadline waits until it is answered.
        """
        self.requested = True
        self._requests += 1
        self._disarm()
        request.notifyFinish().addBoth(self._answered)

    def _answered(self, result: object) -> None:
        self._requests -= 1
        if self._requests == 0 and not self._lost:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        clock = self.factory.clock
        self._waiting_since = clock.seconds()
        self._deadline = clock.callLater(self.factory.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._waiting_since = None

    def _expired(self) -> None:
        self._deadline = None
        self._waiting_since = None
        self.closing = True
        transport = self.transport
        if transport is not None:
            # Abort: a client that does not send may not read either, and
            # a polite close would wait for it to take what is buffered.
            getattr(transport, "abortConnection", transport.loseConnection)()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._disarm()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


#: Seconds the status server's connections get to send what they have when
#: it stops, before they are cut.
CLOSE_GRACE = 1.0


class _Connections(WrappingFactory["_Connection"]):
    """
    Keeps track of the server's connections, closes those whose client is
    too slow to send a request (see L{_Connection}), and closes them all on
    request.

    At most C{limit} are open at once.  A connection beyond them takes the
    place of one that waits for its client's next request, which is cut:
    the one that has waited longest among those whose client has never
    sent a complete request, and only when there are none, the one that
    has waited longest since its last answer.  Only when every connection
    has a request being answered (an open C{/events} stream, say) is the
    new one refused.

    Clients that connect and send nothing, or trickle their requests, can
    therefore keep neither a health probe out (it connects, sends its
    request at once and is answered, while they lose their places in turn)
    nor cut a metrics scraper's kept-alive connection, which waits between
    scrapes but has been answered: a flood of new connections cuts the
    silent ones, oldest first.  A client that sends
    complete requests on many connections competes as the scraper does,
    by the time since its last answer; it costs it a request answered per
    connection and per C{request_timeout}.
    """

    noisy = False
    protocol = _Connection

    def __init__(
        self, site: Site, limit: int, clock: IReactorTime, request_timeout: float = 20.0
    ) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.limit = limit
        self.clock = clock
        self.request_timeout = request_timeout
        self._waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        # Connections being cut are gone once the reactor notices.
        open_ = [p for p in self.protocols if not p.closing]
        if len(open_) >= self.limit:
            waiting = [p for p in open_ if p.waiting_since is not None]
            if not waiting:
                return None
            silent = [p for p in waiting if not p.requested]
            min(silent or waiting, key=lambda p: p.waiting_since or 0.0).evict()
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> Deferred[None]:
        """
        Close every connection; fires once all are gone.
        """
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)

        def close(how: str) -> None:
            for protocol in list(self.protocols):
                transport = protocol.transport
                if transport is not None:
                    getattr(transport, how, transport.loseConnection)()

        close("loseConnection")
        # A client that stopped reading (a stalled /events viewer) keeps a
        # closing connection until its unsent data is taken: the hub's stop
        # would wait for it, producers and consumers still running meanwhile.
        call = self.clock.callLater(CLOSE_GRACE, close, "abortConnection")

        def closed(result: None) -> None:
            if call.active():
                call.cancel()
            return result

        d.addCallback(closed)
        return d


class StatusService(Service):
    """
    The status server of one hub, as a service: listens on an endpoint
    string when started; when stopped, ends the live streams, closes its
    connections and stops watching the hub.

    @ivar hub: The hub shown.
    @ivar endpoint: The server endpoint string, e.g.
        C{tcp:8070:interface=127.0.0.1}.
    @ivar monitor: The L{HubMonitor} (its C{registry} holds the metrics).
    @ivar recent: The L{RecentMessages} shown on the page.
    @ivar port: The listening port once listening, else C{None}.
    """

    log = HubLogger()

    def __init__(
        self,
        hub: HubView,
        endpoint: str,
        reactor: Any,
        *,
        recent_size: int = 100,
        max_connections: int = 64,
        max_streams: int = 16,
        update_interval: float = 2.0,
        request_timeout: float = 20.0,
    ) -> None:
        """
        @param recent_size: How many recent entries the page keeps.
        @param max_connections: At most this many connections at once; see
            L{_Connections} for which one a connection beyond them replaces.
        @param request_timeout: Seconds a client has to send a complete
            request, from connecting and from the end of each answer;
            slower connections are closed.
        @param max_streams: At most this many live views at once.
        @param update_interval: Seconds between status updates of live views.
        """
        self.hub = hub
        self.endpoint = endpoint
        self.reactor = reactor
        self.monitor = HubMonitor(hub, reactor)
        self.recent = RecentMessages(recent_size)
        self.monitor.add_listener(self.recent)
        self.port: IListeningPort | None = None
        self._max_connections = max_connections
        self._max_streams = max_streams
        self._interval = update_interval
        self._request_timeout = request_timeout
        self._assets: Assets | None = None
        self._feed: LiveFeed | None = None
        self._connections: _Connections | None = None
        self._listening: Deferred[None] | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        """
        Read the page's files, start watching the hub and listen.
        """
        if self._assets is None:
            self._assets = Assets.load()
        Service.startService(self)  # type: ignore[no-untyped-call]
        self.monitor.attach()
        state = _State(self.hub, self.monitor, self.recent, self.reactor, self._assets)
        self._feed = LiveFeed(
            self.recent, state.view, self.reactor, max_streams=self._max_streams, interval=self._interval
        )
        root = build_resource(self.hub, self.monitor, self.recent, self.reactor, self._assets, self._feed)
        site = _StatusSite(root, reactor=self.reactor)  # type: ignore[no-untyped-call]
        site.noisy = False
        site.displayTracebacks = False
        self._connections = _Connections(site, self._max_connections, self.reactor, self._request_timeout)
        d = serverFromString(self.reactor, self.endpoint).listen(self._connections)  # type: ignore[no-untyped-call]
        self._listening = d.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.log.info(
            "Status server on {address}",
            address=f"{getattr(address, 'host', '')}:{getattr(address, 'port', '')}"
            if hasattr(address, "port")
            else str(address),
        )
        if not self.running:
            # Stopped while the port was being opened.
            port.stopListening()
            self.port = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self.port is not None:
                waiter.callback(self.port)
            else:
                waiter.errback(RuntimeError("the status server stopped"))

    def _listen_failed(self, failure: Failure) -> None:
        self.log.failure(
            "The status server could not listen on {endpoint}", failure, endpoint=self.endpoint
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        """
        A Deferred firing with the listening port once listening, or failing
        when the server could not listen.
        """
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, end the live streams, close every connection and
        stop watching the hub.
        """
        Service.stopService(self)  # type: ignore[no-untyped-call]
        self.monitor.detach()
        if self._feed is not None:
            self._feed.close()
            self._feed = None
        port, self.port = self.port, None
        stopped: Deferred[Any] = succeed(None)
        if port is not None:
            stopped = maybeDeferred(port.stopListening)
        connections, self._connections = self._connections, None

        def close(_: object) -> Deferred[None]:
            return connections.close_all() if connections is not None else succeed(None)

        def logged(failure: Failure) -> None:
            self.log.failure("Stopping the status server failed", failure)

        return stopped.addCallback(close).addErrback(logged)

