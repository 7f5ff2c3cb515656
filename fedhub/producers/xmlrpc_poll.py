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
published once.  The new cursor is the highest position published.

The topic is C{topic} with C{{field}} placeholders filled from the item
(values reduced to letters, digits, C{_} and C{-} so an item can not add
topic words), put behind the hub's prefix and environment.  The body is the
item itself, or C{body}: a table whose strings are templates: C{"{a.b}"}
alone is the item's value there (any JSON type), C{"{}"} the whole item,
and other strings are text with placeholders filled in.  C{{{} and C{}}}
write literal braces.

On first start the cursor is C{initial_cursor}, or what C{initial_method}
(with C{initial_params}) answers at C{initial_path}: the service's current
position, so only what happens afterwards is published.  See
C{docs/pollers.md} for a worked example.
"""

from __future__ import annotations

import copy
import json
import math
import re
import uuid
from collections.abc import Callable, Generator, Mapping
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.plugin import IPlugin
from zope.interface import implementer

from fedhub.config import REQUIRED, Option
from fedhub.errors import ConfigError, ConfigProblem, FedhubError
from fedhub.interfaces import IProducerPlugin
from fedhub.logs import HubLogger
from fedhub.message import BASE_SCHEMA, INFO, SEVERITIES, Message
from fedhub.producers.poller import (
    IPollSource,
    PollingService,
    PollResult,
    client_settings,
    http_url,
    poller_options,
    polling_service,
)
from fedhub.xmlrpc import XMLRPCCaller, XMLRPCClient, jsonable

CURSOR = "{cursor}"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NAMESPACE = uuid.UUID("3c7f0d2a-91b4-5e6f-8a1d-6b2e4f9c0a17")
_MISSING = object()


class ItemError(FedhubError):
    """
    An item of the answer can not be published (no id, no position, a
    template that does not fit it).  The item is skipped with a log line.

    @ivar reason: What was wrong.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
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
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
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
    return value, False


@implementer(IPollSource)
class XMLRPCSource:
    """
    Polls one XML-RPC method as configured; see the module docstring.
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
    ) -> None:
        if initial_cursor is None and initial_method is None:
            raise ConfigError([ConfigProblem(f"producers.{name}",
                                             "set initial_cursor or initial_method")])
        try:
            render(params, {}, cursor=None)
        except ItemError:
            raise ConfigError([ConfigProblem(f"producers.{name}.params",
                                             'the only placeholder allowed is "{cursor}"')]
                              ) from None
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
        self.description = f"{method} at {client.url}"
        self.skipped = 0
        # The position a stall was last reported at (see _check_stall).
        self._stalled_at: Any = _MISSING

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.client.close()
        return closed

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

    @inlineCallbacks
    def poll(self, cursor: Any) -> Generator[Deferred[Any], Any, PollResult]:
        """
        Call the method with the cursor and publish the items after it.
        """
        c = copy.deepcopy(cursor)
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
        fresh: list[tuple[Any, str, dict[str, Any]]] = []
        for item in found:
            try:
                if not isinstance(item, dict):
                    raise ItemError(f"an item is a {type(item).__name__}, not a struct")
                position, is_time = _position(lookup(item, self.cursor_field))
                item_id = _text(lookup(item, self.id_field))
            except (ItemError, KeyError) as e:
                self._skip(e)
                continue
            except RecursionError:
                self._skip(ItemError("an item's id is nested too deeply"))
                continue
            numbers = isinstance(position, (int, float)) and isinstance(current, (int, float))
            if is_time != bool(c.get("time")) or (type(position) is not type(current)
                                                  and not numbers):
                hint = ""
                if is_time and not c.get("time"):
                    # The usual cause: a quoted initial_cursor, which is text.
                    hint = (" (for a dateTime cursor_field, write initial_cursor as a TOML "
                            "date-time, without quotes, and remove the saved cursor)")
                self._skip(ItemError(f"item {item_id}: position {position!r} does not compare "
                                     f"with the cursor {current!r}{hint}"))
                continue
            if position < current or (position == current
                                      and (item_id in seen or c.get("after"))):
                continue
            fresh.append((position, item_id, item))
        fresh.sort(key=lambda f: (f[0], f[1]))
        messages = []
        for position, item_id, item in fresh:
            try:
                messages.append(self._message(position, item_id, item))
            except (ItemError, FedhubError) as e:
                self._skip(e)
            except RecursionError:
                # The answer's parser has no depth limit; converting the
                # item does.  One such item must not fail every later poll.
                self._skip(ItemError(f"item {item_id}: nested too deeply"))
        if fresh:
            top = fresh[-1][0]
            at_top = {item_id for position, item_id, _ in fresh if position == top}
            if top == current:
                at_top |= seen
            c["value"], c["seen"] = top, sorted(at_top)
            if top != current:
                c.pop("after", None)
        full = self.page_size is not None and len(found) >= self.page_size
        self._check_stall(full and not fresh, c)
        return PollResult(messages, c, more=full and bool(fresh))

    def _check_stall(self, stalled: bool, cursor: Mapping[str, Any]) -> None:
        """
        Warn, once per position, when a full answer held nothing new: more
        items share the cursor's position than one answer holds (with an
        "at or after" method), and this poller can not get past them.  No
        position can be skipped to safely: the items at it that did not fit
        would be lost, and the method's answers say nothing of what lies
        between this position and the next.
        """
        if not stalled:
            self._stalled_at = _MISSING
            return
        if self._stalled_at == cursor["value"]:
            return
        self._stalled_at = cursor["value"]
        self.log.warn("{method} answered a full page ({page_size} items) and nothing new "
                      "after the cursor {cursor}: polling can get no further.  Usually more "
                      "items share that position than one answer holds; raise the method's "
                      "limit (and page_size) above their number.", producer=self.name,
                      method=self.method, page_size=self.page_size,
                      cursor=_text(cursor["value"]))

    def _skip(self, error: Exception) -> None:
        self.skipped += 1
        self.log.warn("Skipping an item of {method}: {error}", producer=self.name,
                      method=self.method, error=str(error))

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


def _template(value: str) -> str | None:
    try:
        render(value, {}, clean=topic_word)
    except ItemError:
        return None  # placeholders are checked against items at run time
    except Exception as e:
        return f"is not a template: {e}"
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
        "params": Option(list, [CURSOR], 'Its parameters; "{cursor}" stands for the cursor.'),
        "items": Option(str, "", "Dotted path to the list of items in the answer "
                        "(empty: the answer itself)."),
        "id_field": Option(str, REQUIRED, "Dotted path to an item's unique id."),
        "cursor_field": Option(str, REQUIRED, "Dotted path to an item's position "
                               "(a number, a sortable string or a dateTime)."),
        "topic": Option(str, REQUIRED, "Topic after the hub's prefix, with {field} "
                        "placeholders.", check=_template),
        "body": Option(dict, None, "The body: a table of templates (default: the item)."),
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

    def build(self, context: Any) -> PollingService:
        """
        A polling service for the configured method.  No I/O happens here.

        @raise ConfigError: when neither initial_cursor nor initial_method is set.
        """
        o = context.options
        client = XMLRPCClient(o["url"], context.reactor, **client_settings(o))
        source = XMLRPCSource(
            context.name, client, context.topic, method=o["method"],
            params=list(o.get("params", [CURSOR])), items=o.get("items", ""),
            id_field=o["id_field"], cursor_field=o["cursor_field"], topic_template=o["topic"],
            body=o.get("body"), schema=o.get("schema", BASE_SCHEMA),
            severity=o.get("severity", INFO), initial_cursor=o.get("initial_cursor"),
            initial_method=o.get("initial_method"), initial_params=o.get("initial_params"),
            initial_path=o.get("initial_path", ""), page_size=o.get("page_size"),
        )
        return polling_service(context, source)
