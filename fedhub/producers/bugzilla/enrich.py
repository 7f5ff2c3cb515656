"""
Enrichment of bugmail from Bugzilla's web service.

A notification mail says what changed, but only part of the bug's state.
With enrichment configured, the C{bugzilla-smtp} producer (and C{fedhub
inject-mail}) fetch the bug, and for events with a comment or a new
attachment that comment or attachment, from the Bugzilla's XML-RPC web
service, and publish a body in the format of C{bugzilla2fedmsg}
(L{fedhub.producers.bugzilla.messagev1}, schema
C{bugzilla2fedmsg.messageV1}) that Fedora's consumers read: the C{bug} from
the web service, the C{event} (what changed, by whom, when) from the mail.

Whatever goes wrong (a fault, a timeout, an answer over the size cap, a bug
or comment the API key may not see, a mail from another Bugzilla) the
producer publishes the mail-derived message instead, and says why in the
log.  A mail waits for its C{250} while the web service is asked, so every
look-up is bounded by C{enrich_timeout}; and after a failure that looks like
an outage (a timeout, a refused connection, an HTTP error) enrichment is
skipped for C{enrich_retry_after} seconds, so mail is not held up once per
message while Bugzilla is down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Iterable, Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from fedhub.config import Option
from fedhub.errors import FedhubError
from fedhub.logs import HubLogger
from fedhub.producers.bugzilla.api import BugzillaAPI, to_epoch
from fedhub.producers.bugzilla.messagev1 import (
    SCHEMA,
    attachment_object,
    build_body,
    comment_object,
    event_object,
    user_object,
)
from fedhub.producers.bugzilla.parser import BugEvent
from fedhub.text import escape_control
from fedhub.xmlrpc import (
    HTTPStatusError,
    TransportError,
    XMLRPCError,
    XMLRPCTimeout,
    display_url,
)

__all__ = [
    "BugzillaEnricher",
    "Enriched",
    "EnrichmentUnavailable",
    "enrich_options",
    "enricher_from_options",
    "messagev1_body",
]

#: Seconds before the mail's time from which comments are asked for (the
#: comment's own time may be a little earlier than the mail's C{Date}).
COMMENT_SLACK = 300.0


@dataclass(frozen=True)
class Enriched:
    """
    What an enricher returns to replace the mail-derived body: a whole body
    and the name of its schema (e.g. C{bugzilla2fedmsg.messageV1}).  The
    message keeps the mail-derived topic, headers and id.
    """

    body: Mapping[str, Any]
    schema: str


class EnrichmentUnavailable(FedhubError):
    """
    The web service's answer can not enrich this event.

    @ivar reason: Why, one line.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def enrich_options() -> dict[str, Option]:
    """
    The C{enrich_*} keys of the C{bugzilla-smtp} producer: the poller's URL
    check and client settings (L{fedhub.producers.poller.poller_options}),
    with defaults for a look-up that a mail waits for.
    """
    from fedhub.producers.bugzilla_poll import BugzillaPollPlugin
    from fedhub.producers.poller import poller_options

    poller = BugzillaPollPlugin.options
    client = poller_options(60.0)

    def positive(value: float) -> str | None:
        return None if value > 0 else "must be greater than 0"

    return {
        "enrich_url": dataclasses.replace(
            poller["url"], default=None,
            help="Bugzilla XML-RPC endpoint to enrich mail from, e.g. "
                 "https://bugzilla.example.org/xmlrpc.cgi (default: no enrichment)."),
        "enrich_api_key_file": dataclasses.replace(
            poller["api_key_file"], help="A file holding the Bugzilla API key for enrichment."),
        "enrich_timeout": dataclasses.replace(
            client["timeout"], default=5.0,
            help="Seconds an enrichment look-up may take before the mail-derived message "
                 "is published (kept below delivery_timeout)."),
        "enrich_max_response_bytes": dataclasses.replace(
            client["max_response_bytes"], default=2 * 1024 * 1024,
            help="Largest web service answer accepted for enrichment, in bytes."),
        "enrich_ca_file": dataclasses.replace(
            client["ca_file"], help="PEM bundle of the CAs that verify the Bugzilla's HTTPS "
                                    "server (default: the system's trust store)."),
        "enrich_hosts": Option(
            list, [], "Host names of the Bugzilla whose mail is enriched, as its X-Bugzilla-URL "
                      "names it (default: the host of enrich_url).", items=str),
        "enrich_retry_after": Option(
            float, 60.0, "Seconds enrichment is skipped after the web service failed "
                         "(timed out, refused, HTTP error).", check=positive),
    }


def _mail_time(event: BugEvent) -> float | None:
    if not event.date:
        return None
    try:
        when = parsedate_to_datetime(event.date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return float(when.timestamp())


def _user(login: str, name: str | None, bug: Mapping[str, Any]) -> dict[str, Any]:
    """
    The event's user: the mail's login, with the id and real name the bug
    shows for it when it is one of the bug's people.
    """
    for field in ("assigned_to", "creator", "qa_contact"):
        if bug.get(field) == login:
            user = user_object(login, bug.get(f"{field}_detail"))
            if not user.get("real_name") and name:
                user["real_name"] = name
            return user
    user = user_object(login)
    if name:
        user["real_name"] = name
    return user


def _changes(event: BugEvent) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    for change in event.changes:
        entry: dict[str, Any] = {"field": change.name or change.field,
                                 "removed": change.removed, "added": change.added}
        if change.attachment_id is not None:
            entry["attachment_id"] = change.attachment_id
        changes.append(entry)
    return changes


def messagev1_body(
    event: BugEvent,
    bug: Mapping[str, Any],
    comments: list[dict[str, Any]] | None = None,
    attachment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The C{bugzilla2fedmsg.messageV1} body of a mail's event, from the bug the
    web service returned (times in epoch seconds) and, for an event with a
    comment, the bug's comments around the mail's time, for an attachment
    event the attachment.

    @raise EnrichmentUnavailable: when the event can not be told in that
        format with these answers (a dependency change, a comment not found).
    """
    if event.event_type == "dep_changed":
        raise EnrichmentUnavailable("a change of a bug this one depends on has no "
                                    "bugzilla2fedmsg form")
    when = _mail_time(event)
    if when is None:
        field = "creation_time" if event.event_type == "new" else "last_change_time"
        when = to_epoch(bug.get(field)) or 0.0
    user = _user(event.who, event.who_name, bug)
    comment = None
    if event.comment is not None and event.event_type != "new":
        number = event.comment.number
        # A comment another bug's (the answer is keyed by bug, but says
        # for each comment whose it is) is not this one.
        found = [c for c in comments or ()
                 if c.get("count") == number and number is not None
                 and c.get("bug_id", event.bug_id) == event.bug_id]
        if not found or not isinstance(found[0].get("id"), int):
            raise EnrichmentUnavailable(f"comment {number} of bug {event.bug_id} is not in the "
                                        "web service's answer")
        comment = comment_object(found[0])
    attached = None
    if event.event_type == "new":
        what = event_object(event.bug_id, "create", "bug", when, user, [])
    elif event.event_type == "comment":
        what = event_object(event.bug_id, "create", "comment", when, user)
    elif event.event_type == "attachment":
        if attachment is None or not isinstance(attachment.get("id"), int):
            raise EnrichmentUnavailable(f"the new attachment of bug {event.bug_id} is not in the "
                                        "web service's answer")
        if attachment.get("bug_id") != event.bug_id:
            # The attachment's id comes from the mail's "Created attachment"
            # notice, which the text of any comment can imitate: never
            # publish another bug's attachment (maybe a private one) with
            # this bug's event.
            owner = attachment.get("bug_id")
            raise EnrichmentUnavailable(
                f"attachment {attachment.get('id')} belongs to bug "
                f"{owner if isinstance(owner, int) else None}, not to bug {event.bug_id}")
        attached = attachment_object(attachment)
        what = event_object(event.bug_id, "create", "attachment", when, user)
    else:
        changes = _changes(event)
        target = "attachment" if any("attachment_id" in c for c in changes) else "bug"
        what = event_object(event.bug_id, "modify", target, when, user, changes)
    return build_body(bug, what, comment=comment, attachment=attached)


def _outage(error: BaseException | None) -> bool:
    """
    Whether a failure says the web service is unreachable or broken (rather
    than that this one bug can not be looked up).
    """
    if isinstance(error, HTTPStatusError):
        return error.status >= 500 or error.status in (404, 408, 429)
    return isinstance(error, (XMLRPCTimeout, TransportError, TimeoutError, CancelledError))


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, (TimeoutError, CancelledError)):
        return "timed out"
    if isinstance(error, XMLRPCError):
        return escape_control(f"{error.method}: {error.reason}", 300)
    reason = getattr(error, "reason", None)
    text = reason if isinstance(reason, str) else (str(error) or type(error).__name__)
    return escape_control(text, 300)


class BugzillaEnricher:
    """
    An enricher (L{fedhub.producers.bugzilla.producer.Enricher}) that turns a mail's
    event into an L{Enriched} C{bugzilla2fedmsg.messageV1} body, or C{None}
    (publish the mail-derived message); it never fails.

    @ivar api: The web service client.
    @ivar timeout: Seconds the whole look-up may take.
    @ivar retry_after: Seconds to skip enrichment after an outage.
    @ivar url: The XML-RPC endpoint (for logs).
    @ivar hosts: The host names of the Bugzilla whose mail is enriched (mail
        names it in C{X-Bugzilla-URL} or its link); mail from any other
        Bugzilla is not, as its bug ids mean other bugs.
    @ivar counters: C{enriched}, C{failed}, C{skipped} (while the web service
        is considered down), C{not_applicable} (other Bugzilla, dependency
        changes).
    """

    log = HubLogger()

    def __init__(
        self,
        api: BugzillaAPI,
        clock: IReactorTime,
        *,
        url: str,
        timeout: float = 5.0,
        retry_after: float = 60.0,
        hosts: Iterable[str] = (),
        producer: str = "bugzilla-smtp",
    ) -> None:
        self.api = api
        self.clock = clock
        self.url = url
        self.timeout = timeout
        self.retry_after = retry_after
        self.producer = producer
        self.counters = {"enriched": 0, "failed": 0, "skipped": 0, "not_applicable": 0}
        self._resume_at: float | None = None
        self.hosts = frozenset(h.lower() for h in hosts) or frozenset(
            {(urlsplit(url).hostname or "").lower()})

    def close(self) -> Deferred[None]:
        """
        Close the web service client's connections.
        """
        return self.api.close()

    def _same_bugzilla(self, event: BugEvent) -> bool:
        source = event.source or event.url
        host = (urlsplit(source).hostname or "").lower() if source else ""
        return not host or host in self.hosts

    def __call__(self, event: BugEvent) -> Deferred[dict[str, Any] | Enriched | None]:
        if event.event_type == "dep_changed":
            self.counters["not_applicable"] += 1
            return succeed(None)
        if not self._same_bugzilla(event):
            self.counters["not_applicable"] += 1
            self.log.info(
                "Bug {bug_id} is from {source}, not from {url}; publishing the mail-derived message",
                bug_id=event.bug_id, source=escape_control(event.source or event.url, 200),
                url=display_url(self.url), producer=self.producer)
            return succeed(None)
        if self._resume_at is not None:
            if self.clock.seconds() < self._resume_at:
                self.counters["skipped"] += 1
                return succeed(None)
            self._resume_at = None
        try:
            d = self._look_up(event)
        except Exception:
            d = fail(Failure())  # type: ignore[no-untyped-call]
        d.addTimeout(self.timeout, self.clock)
        return d.addCallbacks(self._enriched, self._failed, errbackArgs=(event,))

    def _look_up(self, event: BugEvent) -> Deferred[Enriched]:
        bug_id = event.bug_id
        calls: list[Deferred[Any]] = [self.api.get([bug_id])]
        if event.comment is not None and event.event_type != "new":
            when = _mail_time(event)
            since = None if when is None else when - COMMENT_SLACK
            calls.append(self.api.comments([bug_id], since).addCallback(
                lambda found: found.get(bug_id, [])))
        else:
            calls.append(succeed(None))
        attachment = event.attachment
        if event.event_type == "attachment" and attachment is not None:
            calls.append(self.api.attachments([attachment.id]).addCallback(
                lambda found: found.get(attachment.id)))
        else:
            calls.append(succeed(None))
        gathered: Deferred[list[Any]] = gatherResults(calls, consumeErrors=True)

        def build(answers: list[Any]) -> Enriched:
            bugs, comments, attached = answers
            bug = next((b for b in bugs if b.get("id") == bug_id), None)
            if bug is None:
                raise EnrichmentUnavailable(f"bug {bug_id} is not in the web service's answer "
                                            "(missing, or not visible to this API key)")
            return Enriched(messagev1_body(event, bug, comments, attached), SCHEMA)

        def first_error(failure: Failure) -> Failure:
            # The other calls are of no use any more.
            for call in calls:
                if not call.called:
                    call.cancel()
            # gatherResults wraps the first failure in a FirstError.
            inner = getattr(failure.value, "subFailure", None)
            return inner if isinstance(inner, Failure) else failure

        return gathered.addCallbacks(build, first_error)

    def _enriched(self, enriched: Enriched) -> Enriched:
        self.counters["enriched"] += 1
        return enriched

    def _failed(self, failure: Failure, event: BugEvent) -> None:
        self.counters["failed"] += 1
        error = failure.value
        outage = _outage(error)
        known = isinstance(error, (FedhubError, TimeoutError, CancelledError))
        if outage:
            self._resume_at = self.clock.seconds() + self.retry_after
        if known:
            self.log.warn(
                "Enriching bug {bug_id} from {url} failed ({reason}); publishing the mail-derived "
                "message{pause}",
                bug_id=event.bug_id, url=display_url(self.url), reason=_reason(error),
                pause=f"; not asking again for {self.retry_after:g}s" if outage else "",
                producer=self.producer)
        else:
            self.log.failure(
                "Enriching bug {bug_id} from {url} failed; publishing the mail-derived message",
                failure, bug_id=event.bug_id, url=display_url(self.url), producer=self.producer)
        return None


def enricher_from_options(
    options: Mapping[str, Any], reactor: Any, *, producer: str = "bugzilla-smtp",
    delivery_timeout: float | None = None,
) -> BugzillaEnricher | None:
    """
    The enricher the C{enrich_*} keys of a producer's options ask for, or
    C{None} when C{enrich_url} is not set.  No I/O happens here.

    @param delivery_timeout: The time the sender waits for the hand-over;
        the look-up gets at most half of it.
    """
    url = options.get("enrich_url")
    if not url:
        return None
    timeout = float(options.get("enrich_timeout") or 5.0)
    if delivery_timeout is not None and timeout > delivery_timeout / 2:
        BugzillaEnricher.log.warn(
            "enrich_timeout {timeout}s is more than half of delivery_timeout; using {used}s",
            timeout=timeout, used=delivery_timeout / 2, producer=producer)
        timeout = delivery_timeout / 2
    api = BugzillaAPI.connect(
        str(url), reactor, api_key_file=options.get("enrich_api_key_file"),
        timeout=timeout,
        max_response_bytes=int(options.get("enrich_max_response_bytes") or 2 * 1024 * 1024),
        ca_file=options.get("enrich_ca_file"),
    )
    return BugzillaEnricher(api, reactor, url=str(url), timeout=timeout,
                            retry_after=float(options.get("enrich_retry_after") or 60.0),
                            hosts=options.get("enrich_hosts") or (), producer=producer)
