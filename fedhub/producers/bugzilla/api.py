"""
A client of Bugzilla's XML-RPC web service (Bugzilla 4.4/5.0 and Red Hat's
Bugzilla), for the calls fedhub needs: bugs changed since a time
(C{Bug.search}), bugs by id (C{Bug.get}), their change history
(C{Bug.history}), comments (C{Bug.comments}) and attachments
(C{Bug.attachments}, without their data), and the server's clock
(C{Bugzilla.time}).

It stands alone so that the Bugzilla poller and the bugmail producer's
enrichment can both use it.  Results are plain JSON-ready values: every
C{dateTime} (Bugzilla sends UTC without an offset) becomes a number of
seconds since the epoch, in place, so they can go into message bodies as
they are.

An API key, when needed, is read from a file (never from the
configuration itself) and sent as C{Bugzilla_api_key} with every call; it
never appears in logs or errors (an error whose text repeats it, as a web
service's fault about a bad parameter may, has it replaced).
"""

from __future__ import annotations

import math
import xmlrpc.client
from collections.abc import Generator, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from fedhub.errors import FedhubError
from fedhub.xmlrpc import XMLRPCCaller, XMLRPCClient
from fedhub.xmlrpc import jsonable as xmlrpc_jsonable

#: The fields of a bug fedhub's messages use; C{Bug.search} returns only these.
BUG_FIELDS = (
    "id", "alias", "assigned_to", "assigned_to_detail", "classification", "component",
    "creation_time", "creator", "creator_detail", "flags", "groups", "keywords",
    "last_change_time", "op_sys", "platform", "priority", "product", "qa_contact",
    "qa_contact_detail", "resolution", "severity", "status", "summary", "url", "version",
    "whiteboard", "sub_components", "is_open",
)

#: The fields of an attachment fedhub's messages use (C{data} is left out).
ATTACHMENT_FIELDS = (
    "id", "bug_id", "content_type", "creation_time", "last_change_time", "file_name",
    "summary", "description", "flags", "is_obsolete", "is_patch", "is_private", "creator",
)


class BugzillaError(FedhubError):
    """
    Bugzilla answered something that is not what its web service promises.

    @ivar method: The method called.
    @ivar reason: What was wrong.
    """

    def __init__(self, method: str, reason: str) -> None:
        self.method = method
        self.reason = reason
        super().__init__(f"{method}: {reason}")


def to_epoch(value: Any) -> float | None:
    """
    Seconds since the epoch of a Bugzilla time: a C{datetime} (naive ones
    are UTC), an XML-RPC C{DateTime}, or a number; C{None} stays C{None}.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return float(value.timestamp())
    if isinstance(value, xmlrpc.client.DateTime):
        return to_epoch(datetime.strptime(value.value, "%Y%m%dT%H:%M:%S"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise BugzillaError("-", f"not a time: {seconds!r}")
        return seconds
    raise BugzillaError("-", f"not a time: {type(value).__name__}")


def from_epoch(seconds: float) -> datetime:
    """
    A time to send to Bugzilla: naive UTC, whole seconds (C{dateTime.iso8601}
    has no fractions; rounding down keeps an "after" query inclusive).
    """
    return datetime.fromtimestamp(int(seconds), timezone.utc).replace(tzinfo=None)


def jsonable(value: Any) -> Any:
    """
    C{value} with every time turned into epoch seconds and every tuple into
    a list, so it serializes as JSON.
    """
    return xmlrpc_jsonable(value, "epoch")


#: The key of a row (a bug, a history entry, a comment) that could not be
#: made JSON-ready, put in its place with the reason: C{{"id": ...,
#: UNREADABLE: reason}} (the id when it has a whole number one).  Its reader
#: skips it, and reports it, rather than failing the whole answer for it.
UNREADABLE = "fedhub_unreadable"


def _row(value: dict[str, Any]) -> dict[str, Any]:
    """
    A row of an answer made JSON-ready, or its L{UNREADABLE} stand-in.
    """
    try:
        row: dict[str, Any] = jsonable(value)
        return row
    except RecursionError:
        stand_in: dict[str, Any] = {UNREADABLE: "its data is nested too deeply"}
        row_id = value.get("id")
        if isinstance(row_id, int) and not isinstance(row_id, bool):
            stand_in["id"] = row_id
        return stand_in


def _batches(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


#: What an error's text says in place of the API key.
HIDDEN_KEY = "<the API key>"


def _without_key(failure: Failure, key: str) -> Failure:
    """
    C{failure} with the API key taken out of its error's text: a web service
    may repeat what it was sent (a fault about a bad parameter, an error
    page), and errors end up in logs.
    """
    error = failure.value
    if error is None:
        return failure
    for name, value in list(vars(error).items()):
        if isinstance(value, str) and key in value:
            setattr(error, name, value.replace(key, HIDDEN_KEY))
    error.args = tuple(
        a.replace(key, HIDDEN_KEY) if isinstance(a, str) else a for a in error.args
    )
    return failure


class BugzillaAPI:
    """
    The Bugzilla web service calls fedhub makes.

    @ivar caller: The XML-RPC endpoint (C{.../xmlrpc.cgi}).
    """

    def __init__(self, caller: XMLRPCCaller, *, api_key: str | None = None,
                 api_key_file: str | None = None, batch_size: int = 100) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.caller = caller
        self.batch_size = batch_size
        self._api_key = api_key
        self._api_key_file = api_key_file

    @classmethod
    def connect(cls, url: str, reactor: Any, *, api_key_file: str | None = None,
                batch_size: int = 100, **client: Any) -> BugzillaAPI:
        """
        An API over a new L{XMLRPCClient} for C{url}; C{client} holds its
        keyword arguments (C{timeout}, C{max_response_bytes}, C{ca_file}).
        """
        return cls(XMLRPCClient(url, reactor, **client), api_key_file=api_key_file,
                   batch_size=batch_size)

    def close(self) -> Deferred[None]:
        """
        Close the connections.
        """
        closed: Deferred[None] = self.caller.close()
        return closed

    def _key(self) -> str | None:
        if self._api_key is None and self._api_key_file is not None:
            # A few bytes, read once on first use rather than in the constructor.
            try:
                with open(self._api_key_file, encoding="utf-8") as f:
                    self._api_key = f.read().strip()
            except OSError as e:
                raise BugzillaError("-", f"can not read the API key file "
                                         f"{self._api_key_file}: {e.strerror}") from None
        return self._api_key or None

    def _call(self, method: str, params: dict[str, Any]) -> Deferred[Any]:
        key = self._key()
        if key is not None:
            params = {**params, "Bugzilla_api_key": key}
        d: Deferred[Any] = self.caller.call(method, params)
        if key is not None:
            d.addErrback(_without_key, key)
        return d

    @inlineCallbacks
    def server_time(self) -> Generator[Deferred[Any], Any, float]:
        """
        The database server's clock (C{Bugzilla.time}), in epoch seconds.
        """
        answer = yield self._call("Bugzilla.time", {})
        if not isinstance(answer, dict) or "db_time" not in answer:
            raise BugzillaError("Bugzilla.time", "the answer has no db_time")
        when = to_epoch(answer["db_time"])
        if when is None:
            raise BugzillaError("Bugzilla.time", "the answer's db_time is null")
        return when

    @inlineCallbacks
    def search_changed(
        self, since: float, *, products: Sequence[str] = (), components: Sequence[str] = (),
        limit: int = 200, offset: int = 0, fields: Sequence[str] = BUG_FIELDS,
    ) -> Generator[Deferred[Any], Any, list[dict[str, Any]]]:
        """
        Bugs changed at or after C{since} (epoch seconds), by bug id, one
        page of at most C{limit} from C{offset}.  The order is asked for:
        without it Bugzilla sorts nothing, and what the database happens to
        return (id order on MySQL, anything on PostgreSQL) would make
        paging by offset skip and repeat bugs.
        """
        params: dict[str, Any] = {
            "last_change_time": from_epoch(since), "limit": limit, "offset": offset,
            "order": "bug_id", "include_fields": list(fields),
        }
        if products:
            params["product"] = list(products)
        if components:
            params["component"] = list(components)
        answer = yield self._call("Bug.search", params)
        return self._bugs("Bug.search", answer)

    @inlineCallbacks
    def get(self, ids: Sequence[int], fields: Sequence[str] = BUG_FIELDS
            ) -> Generator[Deferred[Any], Any, list[dict[str, Any]]]:
        """
        Bugs by id (ones that do not exist or may not be seen are left out).
        """
        bugs: list[dict[str, Any]] = []
        for batch in _batches(ids, self.batch_size):
            answer = yield self._call("Bug.get", {"ids": batch, "include_fields": list(fields),
                                                  "permissive": True})
            bugs += self._bugs("Bug.get", answer)
        return bugs

    @inlineCallbacks
    def history(self, ids: Sequence[int], new_since: float | None = None
                ) -> Generator[Deferred[Any], Any, dict[int, list[dict[str, Any]]]]:
        """
        The change history of bugs: for each bug id, its entries
        (C{when}, C{who}, C{changes} of C{field_name}/C{removed}/C{added}
        and maybe C{attachment_id}), oldest first, only those after
        C{new_since} when given.
        """
        result: dict[int, list[dict[str, Any]]] = {}
        for batch in _batches(ids, self.batch_size):
            params: dict[str, Any] = {"ids": batch}
            if new_since is not None:
                params["new_since"] = from_epoch(new_since)
            answer = yield self._call("Bug.history", params)
            if not isinstance(answer, dict) or not isinstance(answer.get("bugs"), list):
                raise BugzillaError("Bug.history", "the answer has no list of bugs")
            for bug in answer["bugs"]:
                if isinstance(bug, dict) and isinstance(bug.get("id"), int):
                    entries = bug.get("history") or []
                    result[bug["id"]] = [_row(e) for e in entries if isinstance(e, dict)]
        return result

    @inlineCallbacks
    def comments(self, ids: Sequence[int], new_since: float | None = None
                 ) -> Generator[Deferred[Any], Any, dict[int, list[dict[str, Any]]]]:
        """
        The comments of bugs: for each bug id, its comments (C{id},
        C{count}, C{text}, C{creator}, C{creation_time}, C{is_private}, ...),
        oldest first, only those after C{new_since} when given.
        """
        result: dict[int, list[dict[str, Any]]] = {}
        for batch in _batches(ids, self.batch_size):
            params: dict[str, Any] = {"ids": batch}
            if new_since is not None:
                params["new_since"] = from_epoch(new_since)
            answer = yield self._call("Bug.comments", params)
            if not isinstance(answer, dict) or not isinstance(answer.get("bugs"), dict):
                raise BugzillaError("Bug.comments", "the answer has no table of bugs")
            for key, bug in answer["bugs"].items():
                try:
                    bug_id = int(key)
                except (TypeError, ValueError):
                    continue
                comments = bug.get("comments") if isinstance(bug, dict) else None
                result[bug_id] = [_row(c) for c in comments or [] if isinstance(c, dict)]
        return result

    @inlineCallbacks
    def attachments(self, attachment_ids: Sequence[int], fields: Sequence[str] = ATTACHMENT_FIELDS
                    ) -> Generator[Deferred[Any], Any, dict[int, dict[str, Any]]]:
        """
        Attachments by id: for each one found, its C{fields} (never its data,
        which may be megabytes).
        """
        result: dict[int, dict[str, Any]] = {}
        for batch in _batches(attachment_ids, self.batch_size):
            answer = yield self._call("Bug.attachments", {"attachment_ids": batch,
                                                          "include_fields": list(fields)})
            if not isinstance(answer, dict) or not isinstance(answer.get("attachments"), dict):
                raise BugzillaError("Bug.attachments", "the answer has no table of attachments")
            for key, attachment in answer["attachments"].items():
                try:
                    attachment_id = int(key)
                except (TypeError, ValueError):
                    continue
                if isinstance(attachment, dict):
                    result[attachment_id] = jsonable(attachment)
        return result

    @staticmethod
    def _bugs(method: str, answer: Any) -> list[dict[str, Any]]:
        if not isinstance(answer, dict) or not isinstance(answer.get("bugs"), list):
            raise BugzillaError(method, "the answer has no list of bugs")
        return [_row(b) for b in answer["bugs"]
                if isinstance(b, dict) and isinstance(b.get("id"), int)]
