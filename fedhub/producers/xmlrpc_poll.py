"""
The generic XML-RPC poller: turns any XML-RPC method that lists "what
changed since X" into bus messages, configured entirely in the TOML file.

Each poll calls C{method} with C{params}, where the string C{"{cursor}"}
stands for the current cursor (exactly that string: the typed value; inside
a longer string: its text).  The answer (or the list at the dotted path
C{items} inside it) is a list of structs, the items.  Every item has an id
(C{id_field}) and a position (C{cursor_field}: a number, a string that sorts
in time order, or a C{dateTime}).  Items before the cursor are
skipped, and so are those at the cursor's very position that were published
already (APIs that answer "at or after X" repeat them), so each item is
published once (an item listed twice in one answer, once).  The new cursor
is the highest position published.  With a clock, a C{dateTime} position
more than L{FUTURE_MARGIN} past it is published (at most L{AHEAD_LIMIT} such
items at once) but does not become the cursor (see L{XMLRPCSource.poll}).

The topic is C{topic} with C{{field}} placeholders filled from the item
(values reduced to letters, digits, C{_} and C{-} so an item can not add
topic words), put behind the hub's prefix and environment.  The body is the
item itself, or C{body}: a table whose strings are templates: C{"{a.b}"}
alone is the item's value there (any JSON type), C{"{}"} the whole item,
and other strings are text with placeholders filled in.  C{{{} and C{}}}
write literal braces; any other brace is refused when the configuration
is checked.

On first start the cursor is C{initial_cursor}, or what C{initial_method}
(with C{initial_params}) answers at C{initial_path}: the service's current
position, so only what happens afterwards is published.  See
C{docs/pollers.md} for a worked example.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import REQUIRED, Option
from fedhub.errors import ConfigError, ConfigProblem, FedhubError
from fedhub.interfaces import IProducerPlugin
from fedhub.logs import HubLogger
from fedhub.message import BASE_SCHEMA, INFO, SEVERITIES, Message
from fedhub.producers.poller import (
    FUTURE_MARGIN,
    IPollSource,
    PollingService,
    PollResult,
    client_settings,
    http_url,
    poller_options,
    polling_service,
    require_fields,
)
from fedhub.text import ascii_digits, escape_control
from fedhub.xmlrpc import XMLRPCCaller, XMLRPCClient, display_url, jsonable

CURSOR = "{cursor}"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NAMESPACE = uuid.UUID("3c7f0d2a-91b4-5e6f-8a1d-6b2e4f9c0a17")
_MISSING = object()
#: Items dated beyond the clock's bound that a cursor remembers as published.
#: Past it, further such items are not published until the clock reaches
#: them or the cursor passes remembered ones (see L{XMLRPCSource.poll}).
AHEAD_LIMIT = 1000
#: Items published ahead of the clock named each in a warning of its own in
#: one poll; the others of the poll are counted in one line.
AHEAD_WARNINGS = 10
#: Problems with items remembered as reported, so that an item a service
#: keeps answering is warned about once (the most recent are kept).
WARNED_LIMIT = 1000

#: Items of one answer handled between two turns of the reactor: an answer
#: of 100,000 items (a service catching up, well under the response cap)
#: would otherwise hold it for seconds, the status page and the AMQP
#: heartbeats with it.
ITEM_SLICE = 500

#: The longest item id or reason a log line shows, in characters.
ITEM_TEXT_LIMIT = 300


class ItemError(FedhubError):
    """
    An item of the answer can not be published (no id, no position, a
    template that does not fit it).  The item is skipped with a log line.

    @ivar reason: What was wrong.
    @ivar kind: What the item is warned about once by, when the reason
        names something that changes from poll to poll (the cursor); by
        default the reason.
    """

    def __init__(self, reason: str, kind: str | None = None) -> None:
        self.reason = reason
        self.kind = reason if kind is None else kind
        super().__init__(reason)


class AnswerError(FedhubError):
    """
    The answer is not what the configuration says (no list at C{items}).

    @ivar reason: What was wrong.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def lookup(value: Any, path: str) -> Any:
    """
    The value at a dotted path (C{"user.name"}, C{"tags.0"}); the empty
    path is C{value} itself.

    @raise KeyError: when the path does not lead anywhere.
    """
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and ascii_digits(part) and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def _text(value: Any) -> str:
    """
    A value as text in a template: strings as they are, times in ISO 8601,
    everything else as JSON.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def render(template: Any, item: Any, *, cursor: Any = _MISSING,
           clean: Callable[[str], str] | None = None) -> Any:
    """
    Fill a template from C{item} (see the module docstring).  Tables and
    lists are rendered element by element; other values are kept.

    @param cursor: What C{"{cursor}"} stands for, when it may appear.
    @param clean: Applied to every filled-in value inside text.
    @raise ItemError: when a placeholder names nothing in the item.
    """
    if isinstance(template, dict):
        return {k: render(v, item, cursor=cursor, clean=clean) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, item, cursor=cursor, clean=clean) for v in template]
    if not isinstance(template, str):
        return template

    def value(path: str) -> Any:
        if path == "cursor" and cursor is not _MISSING:
            return cursor
        try:
            return lookup(item, path)
        except KeyError:
            raise ItemError(f"the item has no {path!r}") from None

    whole = _PLACEHOLDER.fullmatch(template)
    if whole is not None and whole.group(1) is not None:
        return value(whole.group(1))

    def fill(match: re.Match[str]) -> str:
        if match.group(0) == "{{":
            return "{"
        if match.group(0) == "}}":
            return "}"
        filled = _text(value(match.group(1)))
        return clean(filled) if clean is not None else filled

    return _PLACEHOLDER.sub(fill, template)


def unmatched_brace(template: str) -> str | None:
    """
    What is wrong with the braces of a template, or C{None}: outside a
    C{{field}} placeholder, only C{{{} and C{}}} (literal braces) may hold
    one.  A lone brace would otherwise be kept as text, so a typo such as
    C{"pkgdb.{action"} would only show in the messages.
    """
    masked = _PLACEHOLDER.sub(lambda m: " " * len(m.group(0)), template)
    where = min((i for i in (masked.find("{"), masked.find("}")) if i >= 0), default=-1)
    if where < 0:
        return None
    return (f"unmatched {masked[where]!r} at character {where + 1} of {template!r} "
            '(a placeholder is "{field}"; write "{{" and "}}" for literal braces)')


def topic_word(value: str) -> str:
    """
    A value made safe inside a topic: one word of letters, digits, C{_}, C{-}.
    """
    return _TOPIC_UNSAFE.sub("_", value)[:100] or "_"


def _position(value: Any) -> tuple[Any, bool]:
    """
    A JSON-storable position and whether it was a time.
    """
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.isoformat(), True
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ItemError(f"a position must be a number, a string or a dateTime, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        # NaN compares with nothing and infinity is beyond every later item:
        # either as the cursor would stop publishing for good.
        raise ItemError(f"a position must be finite, not {value!r}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        # The cursor is sent back as a parameter, which XML-RPC can not
        # carry: every later poll would fail.
        raise ItemError(f"a position must fit in 64 bits, not {value}")
    return value, False


@implementer(IPollSource)
class XMLRPCSource:
    """
    Polls one XML-RPC method as configured; see the module docstring.

    @ivar clock: This process's clock: a C{dateTime} position more than
        L{FUTURE_MARGIN} past it does not move the cursor.  C{None}: no such
        bound.
    @ivar skipped: Items skipped because they could not be published, each
        counted once while it is remembered (see L{WARNED_LIMIT}).
    """

    log = HubLogger()

    def __init__(
        self,
        name: str,
        client: XMLRPCCaller,
        topic: Callable[[str], str],
        *,
        method: str,
        params: list[Any],
        items: str,
        id_field: str,
        cursor_field: str,
        topic_template: str,
        body: Mapping[str, Any] | None = None,
        schema: str = BASE_SCHEMA,
        severity: int = INFO,
        initial_cursor: Any = None,
        initial_method: str | None = None,
        initial_params: list[Any] | None = None,
        initial_path: str = "",
        page_size: int | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        # The plugin's checks, for sources made without it.
        if initial_cursor is None and initial_method is None:
            raise ConfigError([ConfigProblem("initial_cursor", _NO_START)])
        error = _params(params)
        if error is not None:
            raise ConfigError([ConfigProblem("params", error)])
        self.name = name
        self.client = client
        self.topic = topic
        self.method = method
        self.params = params
        self.items = items
        self.id_field = id_field
        self.cursor_field = cursor_field
        self.topic_template = topic_template
        self.body = body
        self.schema = schema
        self.severity = severity
        self.initial = initial_cursor
        self.initial_method = initial_method
        self.initial_params = initial_params or []
        self.initial_path = initial_path
        self.page_size = page_size
        self.clock = clock
        self.description = f"{method} at {display_url(client.url)}"
        self.skipped = 0
        # What was reported already, oldest first (see _skip).
        self._warned: OrderedDict[str, None] = OrderedDict()
        # The position a stall was last reported at (see _check_stall).
        self._stalled_at: Any = _MISSING
        # Whether items ahead are held back, as last reported (see _check_held).
        self._holding = False

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.client.close()
        return closed

    def _turn(self) -> Deferred[None]:
        """
        Let the reactor run other work before the next slice of a large
        answer (see L{ITEM_SLICE}); at once without a clock.
        """
        if self.clock is None:
            return succeed(None)
        return deferLater(self.clock, 0, lambda: None)

    @inlineCallbacks
    def initial_cursor(self) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """
        C{initial_cursor}, or the server's answer to C{initial_method}.
        """
        value = self.initial
        if self.initial_method is not None:
            answer = yield self.client.call(self.initial_method, *self.initial_params)
            try:
                value = lookup(answer, self.initial_path)
            except KeyError:
                raise AnswerError(f"{self.initial_method} answered nothing at "
                                  f"{self.initial_path!r}") from None
        try:
            position, is_time = _position(value)
        except ItemError as e:
            raise AnswerError(f"initial cursor: {e.reason}") from None
        # "after": the start is exclusive; items at its very position existed
        # before the first start and are not published.
        return {"value": position, "time": is_time, "seen": [], "after": True}

    def _sent_cursor(self, cursor: Mapping[str, Any]) -> Any:
        if cursor.get("time"):
            return datetime.fromisoformat(cursor["value"])
        return cursor["value"]

    def _bound(self, cursor: Mapping[str, Any]) -> tuple[str, str] | None:
        """
        This process's "now" and the latest position a C{dateTime} cursor may
        reach (now and L{FUTURE_MARGIN}), as cursors hold them; C{None} for
        other cursors or without a clock.  Numbers and text have no known
        relation to time, so no bound is set on them.
        """
        if self.clock is None or not cursor.get("time"):
            return None
        now = self.clock.seconds()

        def text(when: float) -> str:
            return datetime.fromtimestamp(when, timezone.utc).replace(tzinfo=None).isoformat()

        # Now as a dateTime holds it, in whole seconds: a cursor brought
        # back to a fraction past a second would pass over the items dated
        # in that second, which the method still answers.
        return text(math.floor(now)), text(now + FUTURE_MARGIN)

    @inlineCallbacks
    def poll(self, cursor: Any) -> Generator[Deferred[Any], Any, PollResult]:
        """
        Call the method with the cursor and publish the items after it.

        An item dated more than L{FUTURE_MARGIN} past this process's clock (a
        broken clock, a corrupt row) is published, with a warning, but does
        not become the cursor: every later answer would start past the items
        still to come.  The cursor remembers it (C{"ahead"}: position and id)
        until the cursor passes its position, so it is published once.

        At most L{AHEAD_LIMIT} such items are remembered, and none is ever
        forgotten before the cursor passes it (the method would answer it
        again, and it would be published at every poll).  Past the limit,
        further items ahead are held back, unpublished and unremembered: the
        nearest are published as soon as the cursor passing remembered ones
        makes room, and any of them once the clock reaches it, like any other
        item.  Each is published once, none is skipped, and the cursor stays
        bounded, at the price of a delay once the limit is reached.

        A cursor found beyond the bound (saved without one, or a clock that
        went back) is brought back to now, and what follows is read again
        rather than lost; the ids it had published at its position join
        C{"ahead"}, even past the limit.
        """
        require_fields(cursor, "an XML-RPC poller's", {"value": (int, float, str)})
        c = copy.deepcopy(cursor)
        bound = self._bound(c)
        if bound is not None and c["value"] > bound[1]:
            self._bring_back(c, bound[0])
        params = render(self.params, {}, cursor=self._sent_cursor(c))
        answer = yield self.client.call(self.method, *params)
        try:
            found = lookup(answer, self.items)
        except KeyError:
            raise AnswerError(f"{self.method} answered nothing at {self.items!r}") from None
        if not isinstance(found, list):
            raise AnswerError(f"{self.method} answered {type(found).__name__} at "
                              f"{self.items!r}, not a list")
        current, seen = c["value"], set(c.get("seen", []))
        ahead = {(position, item_id) for position, item_id in c.get("ahead", [])}
        answered: set[tuple[Any, str]] = set()
        beyond = False
        # (position, id, item, published already)
        fresh: list[tuple[Any, str, dict[str, Any], bool]] = []
        for n, item in enumerate(found):
            if n and n % ITEM_SLICE == 0:
                yield self._turn()
            parsed = self._parse(item, c)
            if parsed is None:
                continue
            position, item_id = parsed
            if bound is not None and position > bound[1]:
                beyond = True
            if (position, item_id) in answered:
                # Listed twice in one answer: the same event (the message id
                # is made of both), published once.
                continue
            answered.add((position, item_id))
            known = (position, item_id) in ahead
            if known and (bound is None or position > bound[1] or position <= current):
                continue
            # An item published ahead that the clock has reached moves the
            # cursor like any other, without being published again.
            if position < current or (position == current
                                      and (item_id in seen or c.get("after"))):
                continue
            fresh.append((position, item_id, item, known))
        fresh.sort(key=lambda f: (f[0], f[1]))
        # Sorted by position: the items beyond the bound come last.
        movers = [f for f in fresh if bound is None or f[0] <= bound[1]]
        later = fresh[len(movers):]
        if movers:
            top = movers[-1][0]
            at_top = {f[1] for f in movers if f[0] == top}
            if top == current:
                at_top |= seen
            c["value"], c["seen"] = top, sorted(at_top)
            if top != current:
                c.pop("after", None)
        # Items ahead are remembered until the cursor passes them: the
        # method answers them at every poll until then.  Memory is bounded
        # by publishing ahead only while fewer than AHEAD_LIMIT are
        # remembered, nearest first: the others wait, unpublished, until the
        # cursor passing remembered ones makes room or the clock reaches
        # them.  Forgetting one that was published instead would publish it
        # again at every poll.
        kept = {a for a in ahead if a[0] >= c["value"]}
        room = max(0, AHEAD_LIMIT - len(kept))
        admitted, held = later[:room], later[room:]
        messages = []
        failed: set[tuple[Any, str]] = set()
        for n, (position, item_id, item, known) in enumerate([*movers, *admitted]):
            if n and n % ITEM_SLICE == 0:
                yield self._turn()
            if known:
                continue
            try:
                messages.append(self._message(position, item_id, item))
            except (ItemError, FedhubError) as e:
                failed.add((position, item_id))
                self._skip(e, f"{item_id}|{position}")
            except RecursionError:
                # The answer's parser has no depth limit; converting the
                # item does.  One such item must not fail every later poll.
                failed.add((position, item_id))
                self._skip(ItemError(f"item {item_id}: nested too deeply"),
                           f"{item_id}|{position}")
        named = unnamed = 0
        farthest: Any = None
        for position, item_id, _, _ in admitted:
            # One that failed is remembered too, so it is not tried again.
            kept.add((position, item_id))
            if (position, item_id) in failed:
                continue
            if named < AHEAD_WARNINGS:
                named += 1
                self.log.warn("Item {item} of {method} is dated {position}, more than "
                              "{margin:g} s past this host's clock: published, but the cursor "
                              "stays at {cursor}", producer=self.name,
                              item=escape_control(item_id, ITEM_TEXT_LIMIT),
                              method=self.method, position=_text(position),
                              margin=FUTURE_MARGIN, cursor=_text(c["value"]))
            else:
                # In order: the last is the farthest.
                unnamed += 1
                farthest = position
        if unnamed:
            # A server whose clock runs ahead can date a whole answer so:
            # one line for the rest, not one per item.
            self.log.warn("{count} more items of {method} dated more than {margin:g} s past this "
                          "host's clock, up to {position}, were published; the cursor stays at "
                          "{cursor}", producer=self.name, count=unnamed, method=self.method,
                          margin=FUTURE_MARGIN, position=_text(farthest),
                          cursor=_text(c["value"]))
        self._check_held(len(held), held[0][0] if held else None)
        if kept:
            c["ahead"] = [list(a) for a in sorted(kept)]
        else:
            c.pop("ahead", None)
        full = self.page_size is not None and len(found) >= self.page_size
        self._check_stall(full and not movers, c, beyond)
        # Polling again at once helps only when the cursor moved: otherwise
        # the next answer is this one again.
        return PollResult(messages, c, more=full and bool(movers))

    def _parse(self, item: Any, cursor: Mapping[str, Any]) -> tuple[Any, str] | None:
        """
        An item's position and id, or C{None} (and a warning) when it has
        none that compares with the cursor.
        """
        item_id: str | None = None
        try:
            if not isinstance(item, dict):
                raise ItemError(f"an item is a {type(item).__name__}, not a struct")
            try:
                item_id = _text(lookup(item, self.id_field))
            except KeyError:
                raise ItemError(f"an item has no {self.id_field!r} (id_field)") from None
            try:
                value = lookup(item, self.cursor_field)
            except KeyError:
                raise ItemError(f"item {item_id}: no {self.cursor_field!r} "
                                f"(cursor_field)") from None
            try:
                position, is_time = _position(value)
            except ItemError as e:
                raise ItemError(f"item {item_id}: {e.reason}") from None
        except ItemError as e:
            self._skip(e, item_id, item)
            return None
        except RecursionError:
            self._skip(ItemError("an item's id is nested too deeply"), None, item)
            return None
        current = cursor["value"]
        numbers = isinstance(position, (int, float)) and isinstance(current, (int, float))
        if is_time != bool(cursor.get("time")) or (type(position) is not type(current)
                                                   and not numbers):
            hint = ""
            if is_time and not cursor.get("time"):
                # The usual cause: a quoted initial_cursor, which is text.
                hint = (" (for a dateTime cursor_field, write initial_cursor as a TOML "
                        "date-time, without quotes, and remove the saved cursor)")
            self._skip(ItemError(f"item {item_id}: position {position!r} does not compare "
                                 f"with the cursor {current!r}{hint}",
                                 f"position {position!r} against a {type(current).__name__} "
                                 "cursor"), item_id)
            return None
        return position, item_id

    def _bring_back(self, cursor: dict[str, Any], now: str) -> None:
        """
        Move a cursor found beyond the clock's bound back to C{now}.  The
        items published at its position are remembered as ahead, so they
        are not published again.
        """
        self.log.warn("The cursor {cursor} of {method} is more than {margin:g} s past this "
                      "host's clock: brought back to {now}; what follows is read again",
                      producer=self.name, cursor=_text(cursor["value"]), method=self.method,
                      margin=FUTURE_MARGIN, now=now)
        cursor["ahead"] = [*cursor.get("ahead", []),
                           *([cursor["value"], i] for i in cursor.get("seen", []))]
        cursor["value"], cursor["seen"] = now, []
        cursor.pop("after", None)

    def _check_held(self, count: int, nearest: Any) -> None:
        """
        Warn, once until it ends, that items dated beyond the clock's bound
        are held back because L{AHEAD_LIMIT} such items are remembered
        already; say so at info level when none is held any more.

        @param count: Items of this answer held back.
        @param nearest: The position of the nearest of them.
        """
        if not count:
            if self._holding:
                self._holding = False
                self.log.info("No item of {method} is held back any more", producer=self.name,
                              method=self.method)
            return
        if self._holding:
            return
        self._holding = True
        self.log.warn("{count} items of {method} dated more than {margin:g} s past this host's "
                      "clock, from {position}, are held back: the cursor remembers as many items "
                      "published ahead of the clock as it may ({limit}).  Each is published "
                      "once the cursor passes remembered items or the clock reaches it.",
                      producer=self.name, count=count, method=self.method,
                      margin=FUTURE_MARGIN, position=_text(nearest), limit=AHEAD_LIMIT)

    def _check_stall(self, stalled: bool, cursor: Mapping[str, Any], ahead: bool) -> None:
        """
        Warn, once per position, when a full answer held nothing new: more
        items share the cursor's position than one answer holds (with an
        "at or after" method), and this poller can not get past them.  No
        position can be skipped to safely: the items at it that did not fit
        would be lost, and the method's answers say nothing of what lies
        between this position and the next.

        @param ahead: The answer held items dated beyond the clock's bound:
            they take the rest of the room (they sort last).
        """
        if not stalled:
            self._stalled_at = _MISSING
            return
        if self._stalled_at == cursor["value"]:
            return
        self._stalled_at = cursor["value"]
        if ahead:
            self.log.warn("{method} answered a full page ({page_size} items) ending in items "
                          "dated more than {margin:g} s ahead, and nothing new before them "
                          "after the cursor {cursor}: more such items may not fit in an "
                          "answer and are not read.  Correct their dates, or raise the "
                          "method's limit (and page_size).", producer=self.name,
                          method=self.method, page_size=self.page_size, margin=FUTURE_MARGIN,
                          cursor=_text(cursor["value"]))
            return
        self.log.warn("{method} answered a full page ({page_size} items) and nothing new "
                      "after the cursor {cursor}: polling can get no further.  Usually more "
                      "items share that position than one answer holds; raise the method's "
                      "limit (and page_size) above their number.", producer=self.name,
                      method=self.method, page_size=self.page_size,
                      cursor=_text(cursor["value"]))

    def _skip(self, error: Exception, item_id: str | None, item: Any = None) -> None:
        """
        Count and report an item that is skipped, once: a service answers
        the same bad item at every poll that reads its position again.  The
        item is known by its id, or without one by a digest of it, and by
        the problem, so another problem with it is reported too.
        """
        if item_id is None:
            try:
                item_id = "#" + hashlib.sha256(repr(item).encode()).hexdigest()
            except RecursionError:
                item_id = "#nested"
        # A digest: an id or a reason can be as large as an answer.
        key = hashlib.sha256(
            f"{item_id}|{error.kind if isinstance(error, ItemError) else error}".encode(
                "utf-8", "surrogatepass"
            )
        ).hexdigest()
        if key in self._warned:
            self._warned.move_to_end(key)
            return
        self._warned[key] = None
        while len(self._warned) > WARNED_LIMIT:
            self._warned.popitem(last=False)
        self.skipped += 1
        self.log.warn("Skipping an item of {method}: {error} (warned once, though later "
                      "answers may list it again)", producer=self.name, method=self.method,
                      error=escape_control(str(error), ITEM_TEXT_LIMIT))

    def _message(self, position: Any, item_id: str, item: dict[str, Any]) -> Message:
        data = jsonable(item, times="iso")
        topic = render(self.topic_template, data, clean=topic_word)
        body = data if self.body is None else render(dict(self.body), data)
        if not isinstance(body, dict):
            raise ItemError(f"item {item_id}: the body is not a table")
        key = f"{self.client.url}|{self.method}|{item_id}|{position}"
        return Message.create(self.topic(str(topic)), body, schema=self.schema,
                              severity=self.severity, id=str(uuid.uuid5(_NAMESPACE, key)))


# --- the plugin ---------------------------------------------------------


def _severity(value: int) -> str | None:
    return None if value in SEVERITIES else f"must be one of {', '.join(map(str, SEVERITIES))}"


_NO_START = "set initial_cursor or initial_method (where the first start begins)"


def _template(value: str) -> str | None:
    error = unmatched_brace(value)
    if error is not None:
        return error
    try:
        render(value, {}, clean=topic_word)
    except ItemError:
        return None  # placeholders are checked against items at run time
    except Exception as e:
        return f"is not a template: {e}"
    return None


def _strings(value: Any, where: str = "") -> Generator[tuple[str, str], None, None]:
    """
    The strings in nested tables and lists, with their dotted paths.
    """
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}.{index}" if where else str(index))


def _params(value: list[Any]) -> str | None:
    for where, text in _strings(value):
        error = unmatched_brace(text)
        if error is not None:
            return f"element {where}: {error}"
        try:
            render(text, {}, cursor=None)
        except ItemError:
            return (f'element {where}: the only placeholder allowed is "{{cursor}}", '
                    f"not in {text!r}")
    return None


def _body(value: dict[str, Any]) -> str | None:
    for where, text in _strings(value):
        error = unmatched_brace(text)
        if error is not None:
            return f"{where}: {error}"
    return None


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


@implementer(IPlugin, IProducerPlugin)
class XMLRPCPollPlugin:
    """
    The C{xmlrpc} producer plugin.
    """

    name = "xmlrpc"
    description = "Poll any XML-RPC method for new items and publish one message per item."
    options: Mapping[str, Option] = {
        "url": Option(str, REQUIRED, "The XML-RPC endpoint.", check=http_url),
        "method": Option(str, REQUIRED, "The method that lists items after a cursor."),
        "params": Option(list, [CURSOR], 'Its parameters; "{cursor}" stands for the cursor.',
                         check=_params),
        "items": Option(str, "", "Dotted path to the list of items in the answer "
                        "(empty: the answer itself)."),
        "id_field": Option(str, REQUIRED, "Dotted path to an item's unique id."),
        "cursor_field": Option(str, REQUIRED, "Dotted path to an item's position "
                               "(a number, a sortable string or a dateTime)."),
        "topic": Option(str, REQUIRED, "Topic after the hub's prefix, with {field} "
                        "placeholders.", check=_template),
        "body": Option(dict, None, "The body: a table of templates (default: the item).",
                       check=_body),
        "schema": Option(str, BASE_SCHEMA, "The fedora_messaging_schema of the messages."),
        "severity": Option(int, INFO, "The severity of the messages.", check=_severity),
        "initial_cursor": Option((int, float, str, datetime), None, "The cursor on first "
                                 "start (a TOML date-time, unquoted, for a dateTime "
                                 "cursor_field)."),
        "initial_method": Option(str, None, "A method whose answer is the cursor on first "
                                 "start (the service's current position)."),
        "initial_params": Option(list, [], "Parameters of initial_method."),
        "initial_path": Option(str, "", "Dotted path to the cursor in initial_method's answer."),
        "page_size": Option(int, None, "When an answer has this many items, poll again at "
                            "once.", check=_at_least_one),
        **poller_options(60.0),
    }

    def check_options(self, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        """
        The checks of keys taken together, which a configuration asks for
        with the others (see L{fedhub.config}): where the first start
        begins must be given one way.
        """
        if options.get("initial_cursor") is None and options.get("initial_method") is None:
            return [("initial_cursor", _NO_START)]
        return []

    def build(self, context: Any) -> PollingService:
        """
        A polling service for the configured method.  No I/O happens here.

        @raise ConfigError: when neither initial_cursor nor initial_method is set
            (a check of two keys, which options can not make one by one).
        """
        o = context.options
        problems = self.check_options(o)
        if problems:
            where = context.component.path if context.component is not None else "options"
            raise ConfigError([ConfigProblem(f"{where}.{key}", text) for key, text in problems])
        client = XMLRPCClient(o["url"], context.reactor, **client_settings(o))
        source = XMLRPCSource(
            context.name, client, context.topic, method=o["method"],
            params=list(o.get("params", [CURSOR])), items=o.get("items", ""),
            id_field=o["id_field"], cursor_field=o["cursor_field"], topic_template=o["topic"],
            body=o.get("body"), schema=o.get("schema", BASE_SCHEMA),
            severity=o.get("severity", INFO), initial_cursor=o.get("initial_cursor"),
            initial_method=o.get("initial_method"), initial_params=o.get("initial_params"),
            initial_path=o.get("initial_path", ""), page_size=o.get("page_size"),
            clock=context.reactor,
        )
        return polling_service(context, source)
