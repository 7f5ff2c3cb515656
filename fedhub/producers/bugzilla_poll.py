"""
The Bugzilla poller: asks a Bugzilla's XML-RPC web service for bugs changed
since the last poll and publishes one message per event, in the format of
C{bugzilla2fedmsg} (schema C{bugzilla2fedmsg.messageV1}), for Bugzillas that
do not send bus messages themselves:

  - a bug filed: C{bugzilla.bug.new} (action C{create}, target C{bug});
  - a change of fields (one C{Bug.history} entry): C{bugzilla.bug.update}
    (action C{modify}, target C{bug}, or C{attachment} when the change is to
    an attachment), with its C{changes};
  - a comment: C{bugzilla.bug.update} (action C{create}, target C{comment})
    with the comment.

The C{bug} object of every message is the bug as it is when polled, not as it
was at the time of the event (the web service has no "as of").

Bugzilla's times have whole seconds and a change may commit after a later one
was visible, so each poll reads C{overlap} seconds again and skips what the
cursor says was already published.  Private bugs and private comments are not
published unless C{publish_private} is set: the bus is usually more widely
readable than the Bugzilla groups that hide them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import uuid
from functools import partial
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import REQUIRED, Option
from fedhub.errors import MessageError
from fedhub.interfaces import IProducerPlugin
from fedhub.logs import HubLogger
from fedhub.message import Message
from fedhub.producers.bugzilla.api import (
    UNREADABLE,
    BugzillaAPI,
    BugzillaError,
    from_epoch,
    to_epoch,
)
from fedhub.producers.bugzilla.messagev1 import (
    SCHEMA,
    bug_object,
    build_body,
    comment_object,
    event_object,
)
from fedhub.producers.bugzilla.messagev1 import user_object as _user
from fedhub.producers.poller import (
    FUTURE_MARGIN,
    START_SKEW_LIMIT,
    IPollSource,
    PollingService,
    PollResult,
    client_settings,
    http_url,
    poller_options,
    polling_service,
    require_fields,
)
from fedhub.text import SUMMARY_HEADER, escape_control
from fedhub.xmlrpc import display_url

__all__ = ["SCHEMA", "BugzillaPollPlugin", "BugzillaSource", "bug_object"]

_NAMESPACE = uuid.UUID("0b5d3c61-7f0e-5a0d-8d64-2d1f8ab4c2e9")
# Kinds of event, in the order they sort within one second of one bug.
_ORDER = {"new": 0, "change": 1, "comment": 2}

#: A page shorter than asked for but at least this long may be cut by the
#: Bugzilla, not the end of the results: Bugzilla answers a C{Bug.search}
#: whose C{limit} is above its C{max_search_results} with that many bugs,
#: silently.  The next page is asked for to find out.  (Shorter pages, the
#: usual answer of a poll that is caught up, are taken as the end.)
CAPPED_PAGE_MIN = 100


@implementer(IPollSource)
class BugzillaSource:
    """
    Turns a Bugzilla's changes into bus messages; see the module docstring.
    """

    log = HubLogger()

    def __init__(
        self,
        name: str,
        api: BugzillaAPI,
        topic: Callable[[str], str],
        *,
        url: str,
        products: Sequence[str] = (),
        components: Sequence[str] = (),
        overlap: float = 300.0,
        page_size: int = 200,
        max_pages: int = 10,
        backfill_seconds: float = 0.0,
        publish_private: bool = False,
        clock: IReactorTime | None = None,
    ) -> None:
        if overlap < 1:
            raise ValueError("overlap must be at least one second (Bugzilla's resolution)")
        self.name = name
        self.api = api
        self.topic = topic
        self.url = url
        self.products = tuple(products)
        self.components = tuple(components)
        self.overlap = overlap
        self.page_size = page_size
        self.max_pages = max_pages
        self.backfill_seconds = backfill_seconds
        self.publish_private = publish_private
        #: This process's clock: a change dated more than L{FUTURE_MARGIN}
        #: past both it and Bugzilla's (C{Bugzilla.time}) does not move the
        #: cursor.  C{None}: Bugzilla's clock alone.
        self.clock = clock
        what = ", ".join([*self.products, *self.components]) or "all products"
        self.description = f"Bugzilla {display_url(url)} ({what})"
        self.show_bug = url.rsplit("/", 1)[0] + "/show_bug.cgi?id="
        #: Events skipped because no message could be made of them.
        self.skipped = 0

    def close(self) -> Deferred[None]:
        return self.api.close()

    @inlineCallbacks
    def initial_cursor(self) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """
        The Bugzilla's own clock now (less C{backfill_seconds}).
        """
        now = yield self.api.server_time()
        if self.clock is not None and now > self.clock.seconds() + START_SKEW_LIMIT:
            # It would be the floor for good: nothing dated before it, every
            # change to come, would ever be published.
            raise BugzillaError(
                "Bugzilla.time",
                f"the clock says {now!r}, more than a day ahead of this host's: "
                "not starting from it",
            )
        start = now - self.backfill_seconds
        # "floor": nothing at or before the start is published, even though
        # the first polls read the overlap before it.
        return {"since": start, "seen": {}, "offset": 0, "last": None, "start": now,
                "high": start, "floor": start}

    @inlineCallbacks
    def poll(self, cursor: Any) -> Generator[Deferred[Any], Any, PollResult]:
        """
        The events after the cursor; see the module docstring.

        Bugs are read in pages of C{page_size}, at most C{max_pages} per
        poll; more than that is one I{pass} over several polls, all asking
        for the bugs changed since the same time.  The pass is paged by
        offset, but every page after the first starts with the last bug of
        the one before (C{last}) to see whether bugs before the offset left
        the results: the bugs after it would have moved back under the
        offset, so the pass steps back until it finds its place.  A bug on a
        page already read that changes again is not read again in the pass:
        when the pass ends, the cursor moves only as far as Bugzilla's clock
        when the pass began (C{start}), so the next pass reads that change.
        """
        require_fields(cursor, "a Bugzilla poller's", {"since": (int, float)})
        c = copy.deepcopy(cursor)
        since = float(c["since"])
        server_now = yield self.api.server_time()
        # Changes later than this do not move the cursor: the later of
        # Bugzilla's clock and this process's, plus a margin for clocks that
        # disagree a little.
        now = server_now if self.clock is None else max(server_now, self.clock.seconds())
        limit = now + FUTURE_MARGIN
        offset = int(c.get("offset", 0))
        last = c.get("last")
        if offset and not isinstance(last, int):
            offset = 0  # a pass without its place (an older cursor): start it again
        if since > limit:
            # A cursor saved before this limit was kept (or a clock that went
            # back): come back to now, reading changes again rather than
            # never asking for them.
            since, offset = now, 0
        if offset == 0:
            last, c["start"] = None, server_now
        start = float(c.get("start", since))
        query = since - self.overlap
        floor = max(query, float(c.get("floor", query)))
        bugs: list[dict[str, Any]] = []
        done = False
        # A short page that may have been cut by the Bugzilla (see
        # CAPPED_PAGE_MIN), its length and the rows asked for, while the page
        # after it is read.
        short: tuple[int, int] | None = None
        for _ in range(self.max_pages):
            # From the second page of a pass on, the last bug read is asked
            # for again: where it is tells whether the offset still holds.
            rows = self.page_size + (1 if offset else 0)
            found = yield self.api.search_changed(
                query, products=self.products, components=self.components,
                limit=rows, offset=offset)
            bugs += found
            ids = [b["id"] for b in found]
            if short is not None and len(found) > 1 and short[0] - 1 < self.page_size:
                # Bugs after the short page: the Bugzilla cut it.  Pages of
                # what it gives (the bug read again included) keep the
                # offsets right.
                self.log.warn(
                    "Bugzilla {url} answered {got} bugs to a search for {asked}: it gives at "
                    "most {got} (its max_search_results); page_size is lowered to {size}",
                    producer=self.name, url=display_url(self.url), got=short[0], asked=short[1],
                    size=short[0] - 1)
                self.page_size = short[0] - 1
            short = None
            if offset and last is not None and (not ids or ids[0] > last):
                # Bugs before the offset left the results (moved to another
                # product, made private): those after the last one read moved
                # back under the offset.  Step back to find the place again;
                # from the first page, the pass reads everything again.
                offset = max(0, offset - self.page_size)
                if offset == 0:
                    last = None
                continue
            if len(found) < rows:
                if len(found) < CAPPED_PAGE_MIN:
                    done = True
                    break
                short = (len(found), rows)
            last = max(ids) if last is None else max(last, *ids)
            offset += len(found) - 1
        if not self.publish_private:
            bugs = [b for b in bugs if not b.get("groups")]
        by_id = {b["id"]: b for b in bugs}
        ids = sorted(by_id)
        history: dict[int, list[dict[str, Any]]] = {}
        comments: dict[int, list[dict[str, Any]]] = {}
        if ids:
            history = yield self.api.history(ids, query)
            comments = yield self.api.comments(ids, query)

        seen: dict[str, float] = dict(c.get("seen", {}))
        events: list[tuple[float, int, int, str, Message]] = []
        high = float(c.get("high", since))
        if high > limit:
            high = since

        def report(kind: str, bug_id: int, error: str) -> None:
            # A row no message can be made of (a time that is not a time,
            # data of the wrong shape) would fail this poll, and every one
            # after it, for good: it is skipped instead.  Its key stays in
            # C{seen}, so it is reported once, not at every poll that reads
            # it again.
            self.skipped += 1
            self.log.warn("Skipping a {kind} event of bug {bug} of {url}: {error}",
                          producer=self.name, kind=kind, bug=bug_id, url=display_url(self.url),
                          error=escape_control(error, 300))

        def time_of(value: Any, kind: str, bug_id: int, row: str) -> float | None:
            try:
                when = to_epoch(value)
            except (BugzillaError, ValueError, OverflowError) as e:
                error = e.reason if isinstance(e, BugzillaError) else str(e)
            else:
                if when is None:
                    return 0.0  # no time at all: before every floor
                try:
                    # A time no date can hold would make every later query
                    # fail once it became the cursor.
                    if math.isfinite(when) and from_epoch(when):
                        return when
                except (ValueError, OverflowError, OSError):
                    pass
                error = f"not a time: {when!r}"
            key = f"{bug_id}:{kind}:{row}:unreadable"
            if key not in seen:
                seen[key] = since
                report(kind, bug_id, error)
            return None

        def add(key: str, when: float, kind: str, bug_id: int, make: Callable[[], Message]) -> None:
            nonlocal high
            if key in seen or when <= floor:
                return
            seen[key] = when
            if when <= limit:
                high = max(high, when)
            else:
                # A change dated far ahead is published but does not become
                # the cursor: every later query would start past the changes
                # still to come.
                self.log.warn("A {kind} event of bug {bug} of {url} is dated {when}, more than "
                              "{margin:.0f} s ahead of Bugzilla's clock and this host's: it "
                              "does not move the cursor",
                              producer=self.name, kind=kind, bug=bug_id, url=display_url(self.url),
                              when=escape_control(repr(when), 40), margin=FUTURE_MARGIN)
            try:
                message = make()
            except (MessageError, ValueError, TypeError, OverflowError, KeyError,
                    RecursionError) as e:
                report(kind, bug_id, f"{type(e).__name__}: {e}")
                return
            events.append((when, bug_id, _ORDER[kind], key, message))

        def unreadable(row: dict[str, Any], kind: str, bug_id: int, name: str) -> bool:
            # A row the API could not read (see UNREADABLE): skipped, and
            # reported once.
            if UNREADABLE not in row:
                return False
            key = f"{bug_id}:{kind}:{name}:unreadable"
            if key not in seen:
                seen[key] = since
                report(kind, bug_id, str(row[UNREADABLE]))
            return True

        for bug_id in ids:
            bug = by_id[bug_id]
            if unreadable(bug, "bug", bug_id, ""):
                continue
            created = time_of(bug.get("creation_time"), "new", bug_id, "")
            if created is not None:
                add(f"{bug_id}:new", created, "new", bug_id, partial(self._new, bug, created))
            for number, entry in enumerate(history.get(bug_id, [])):
                if unreadable(entry, "change", bug_id, str(number)):
                    continue
                when = time_of(entry.get("when"), "change", bug_id, _digest(entry))
                if when is None:
                    continue
                changes = [ch for ch in entry.get("changes") or [] if isinstance(ch, dict)]
                prefix = f"{bug_id}:change:{int(when)}:{entry.get('who')}"
                if f"{prefix}:{_digest(changes)}" in seen:
                    continue  # the whole entry, published before
                # Bugzilla makes one history entry of one user's updates
                # within one second: an entry read before may have grown
                # since.  Its changes are known one by one, and only those
                # not published yet are (the key, and so the message id, of
                # an entry published whole is the same as before).
                keys = [f"{prefix}:{_digest([ch])}" for ch in changes]
                fresh = [ch for ch, k in zip(changes, keys) if k not in seen]
                if not fresh and changes:
                    continue
                key = f"{prefix}:{_digest(fresh)}"
                add(key, when, "change", bug_id,
                    partial(self._change, bug, entry, fresh, when, key))
                for k in keys:
                    seen.setdefault(k, when)
            for comment in comments.get(bug_id, []):
                if unreadable(comment, "comment", bug_id, str(comment.get("id"))):
                    continue
                if not isinstance(comment.get("id"), int) or comment.get("count") == 0:
                    continue  # comment 0 is the description, part of the new bug
                if comment.get("is_private") and not self.publish_private:
                    continue
                when = time_of(comment.get("creation_time") or comment.get("time"), "comment",
                               bug_id, str(comment["id"]))
                if when is None:
                    continue
                add(f"{bug_id}:comment:{comment['id']}", when, "comment", bug_id,
                    partial(self._comment, bug, comment, when))

        events.sort(key=lambda e: e[:3])
        if done:
            # The pass is over.  Every bug changed before it began has been
            # read, but one read early may have changed again since: the
            # cursor goes no further than the pass's beginning, and the seen
            # table drops what the next pass reads again.
            c["offset"], c["last"] = 0, None
            since = max(since, min(high, start))
        else:
            c["offset"], c["last"] = offset, last
        c["since"], c["high"] = since, high
        c["seen"] = {k: v for k, v in seen.items() if v > since - self.overlap - 1}
        return PollResult([e[4] for e in events], c, more=not done)

    # --- messages -------------------------------------------------------------

    def _message(self, suffix: str, body: dict[str, Any], key: str, summary: str) -> Message:
        headers: dict[str, Any] = {SUMMARY_HEADER: escape_control(summary, 500)}
        component = body["bug"]["component"]["name"]
        if component:
            headers[f"fedora_messaging_rpm_{component}"] = True
        return Message.create(self.topic(suffix), body, headers=headers, schema=SCHEMA,
                              id=str(uuid.uuid5(_NAMESPACE, f"{self.url}|{key}")))

    def _new(self, bug: Mapping[str, Any], created: float) -> Message:
        body = build_body(bug, event_object(
            bug["id"], "create", "bug", created,
            _user(bug.get("creator"), bug.get("creator_detail")), []))
        title = escape_control(str(bug.get("summary") or ""), 80)
        return self._message("bugzilla.bug.new", body, f"{bug['id']}:new",
                             f"{bug.get('creator')} filed a new bug #{bug['id']} '{title}'")

    def _change(self, bug: Mapping[str, Any], entry: Mapping[str, Any],
                changes: list[dict[str, Any]], when: float, key: str) -> Message:
        fields = [{"field": ch.get("field_name"), "removed": ch.get("removed"),
                   "added": ch.get("added"),
                   **({"attachment_id": ch["attachment_id"]}
                      if ch.get("attachment_id") is not None else {})}
                  for ch in changes]
        target = "attachment" if any("attachment_id" in f for f in fields) else "bug"
        who = entry.get("who")
        body = build_body(bug, event_object(bug["id"], "modify", target, when, _user(who), fields))
        names = ", ".join(str(f["field"]) for f in fields)
        return self._message("bugzilla.bug.update", body, key,
                             f"{who} updated {names} on #{bug['id']}")

    def _comment(self, bug: Mapping[str, Any], comment: Mapping[str, Any],
                 when: float) -> Message:
        who = comment.get("creator") or comment.get("author")
        body = build_body(bug, event_object(bug["id"], "create", "comment", when, _user(who)),
                          comment=comment_object(comment, when))
        return self._message("bugzilla.bug.update", body, f"{bug['id']}:comment:{comment['id']}",
                             f"{who} commented on #{bug['id']}")


def _digest(value: Any) -> str:
    """
    A short digest of a JSON-ready value, to tell rows apart in keys.
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- the plugin ---------------------------------------------------------


def _at_least(minimum: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if value >= minimum else f"must be at least {minimum:g}"

    return check


@implementer(IPlugin, IProducerPlugin)
class BugzillaPollPlugin:
    """
    The C{bugzilla} producer plugin.
    """

    name = "bugzilla"
    description = "Poll a Bugzilla's XML-RPC web service and publish bugzilla.bug.* messages."
    options: Mapping[str, Option] = {
        "url": Option(str, REQUIRED, "The XML-RPC endpoint, e.g. "
                      "https://bugzilla.example.org/xmlrpc.cgi.", check=http_url),
        "products": Option(list, [], "Only bugs of these products (default: all).", items=str),
        "components": Option(list, [], "Only bugs of these components (default: all).",
                             items=str),
        "api_key_file": Option(str, None, "A file holding the API key to log in with.",
                               path=True),
        "publish_private": Option(bool, False, "Also publish private bugs and comments."),
        "overlap": Option(float, 300.0, "Seconds of history read again each poll.",
                          check=_at_least(1)),
        "page_size": Option(int, 200, "Bugs per Bug.search page.", check=_at_least(1)),
        "max_pages": Option(int, 10, "Bug.search pages per poll.", check=_at_least(1)),
        "batch_size": Option(int, 100, "Bugs per Bug.history and Bug.comments call.",
                             check=_at_least(1)),
        "backfill_seconds": Option(float, 0.0, "On first start, begin this long before now.",
                                   check=_at_least(0)),
        **poller_options(120.0),
    }

    def build(self, context: Any) -> PollingService:
        """
        A polling service for the configured Bugzilla.  No I/O happens here.
        """
        options = context.options
        api = BugzillaAPI.connect(options["url"], context.reactor,
                                  api_key_file=options.get("api_key_file"),
                                  batch_size=int(options.get("batch_size", 100)),
                                  **client_settings(options))
        source = BugzillaSource(
            context.name, api, context.topic, url=options["url"],
            products=options.get("products") or (), components=options.get("components") or (),
            overlap=float(options.get("overlap", 300.0)),
            page_size=int(options.get("page_size", 200)),
            max_pages=int(options.get("max_pages", 10)),
            backfill_seconds=float(options.get("backfill_seconds", 0.0)),
            publish_private=bool(options.get("publish_private", False)),
            clock=context.reactor,
        )
        return polling_service(context, source)
